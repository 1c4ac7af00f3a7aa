"""bench/train.py in its tiny configuration: every trainer (Spider's on-policy step with both
samplers, TRL's DistillationTrainer and GOLDTrainer) runs its steps on real tiny models, and the
report carries the per-step numbers and the ratios against TRL from the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_bench_runs_every_trainer_and_reports_ratios(tmp_path):
    out = tmp_path / "results.json"
    runs = ["spider-same", "trl-same", "spider-cross-merged", "trl-cross"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--tiny", "--steps", "1", "--warmup", "1",
         "--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out), "--runs", *runs],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["runs"]) == runs
    for name, run in results["runs"].items():
        assert run["error"] is None, (name, run["error"])
        assert len(run["steps"]) == 2
        for step in run["steps"]:
            assert step["step_s"] > 0 and step["tokens"] == step["tokens_sampled"] + step["tokens_trained"] > 0
        assert run["tokens_per_s"] > 0
    spider = results["runs"]["spider-cross-merged"]["steps"][-1]
    staged = sum(spider[k] for k in ("sample_s", "teacher_s", "train_s", "save_s", "other_s"))
    assert abs(staged - spider["step_s"]) < 1e-6
    assert abs(spider["score_s"] + spider["align_s"] - spider["teacher_s"]) < 1e-9 and spider["score_s"] > 0
    assert 0 < spider["aligned_fraction"] <= 1
    assert "spider-same / trl-same step throughput" in proc.stdout
    assert "spider-cross-merged / trl-cross step throughput" in proc.stdout
    assert "alignment (render + re-tokenize + align) in spider-cross-merged" in proc.stdout
