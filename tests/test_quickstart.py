"""The README's first command: `spider run configs/quickstart.yaml` with no server running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_jsonl

pytestmark = pytest.mark.slow


def test_quickstart_writes_a_dataset_answered_by_smollm2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPIDER_") or k == "SPIDER_CACHE_DIR"}
    out = tmp_path / "quickstart.jsonl"
    spider = Path(sys.executable).with_name("spider")
    proc = subprocess.run(
        [str(spider), "run", "configs/quickstart.yaml", "-o", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    records = read_jsonl(out)
    assert [r["row_index"] for r in records] == list(range(8))
    assert all(r["error"] is None and r["completion"] for r in records)
    france = next(r for r in records if "France" in r["prompt"])
    assert "Paris" in france["completion"]
    metadata = json.loads(out.with_name("quickstart.metadata.json").read_text())
    assert metadata["config"]["model"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["usage"]["completion_tokens"] > 0
    # The progress line shows the model's load as its own phase, and tokens/s of generation alone.
    assert "model.loaded: model 'HuggingFaceTB/SmolLM2-135M-Instruct' loaded in" in proc.stderr
    shown = int(re.findall(r"([\d,]+) tok/s", proc.stderr)[-1].replace(",", ""))
    rate = metadata["usage"]["completion_tokens"] / metadata["timings"]["generation_seconds"]
    assert abs(shown - rate) <= 1
    # The local stack it started is gone: no spider processes were left behind.
    port = re.search(r"local stack at http://127.0.0.1:(\d+)", proc.stderr).group(1)
    leftovers = subprocess.run(["pgrep", "-f", f"(worker-.*-{port}@)|(--port {port})"], capture_output=True)
    assert leftovers.returncode == 1, leftovers.stdout
