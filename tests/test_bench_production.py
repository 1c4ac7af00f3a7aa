"""bench/recovery.py, bench/events.py and bench/bigjob.py (its in-process trace: the end-to-end run
shares the stack path these two exercise, and is left to the bench) with small settings: each
starts its own local stacks, runs its jobs to completion (each bench fails when a job does not
complete with every row once) and prints its measurements."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def bench(name: str, *args: str, timeout: float = 900) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_recovery_bench_times_a_kill_and_a_dropped_message():
    timeout_s = 4
    out = bench("recovery.py", "--timeouts", str(timeout_s), "--repeats", "1", "--drop-repeats", "1", "--rows", "16",
                "--batch", "8", "--max-tokens", "64", "--reconcile-after", "3", "--reconcile-interval", "1")
    kill = re.search(r"kill 0: lost batches \[([\d, ]+)\]; worker back in +([\d.]+) s; handed out again after +([\d.]+) s", out)
    assert kill, out
    assert kill.group(1).strip()
    # The broker keeps a lost message until its visibility timeout (counted from its delivery, just
    # before the kill): it cannot run again much sooner than that.
    assert float(kill.group(3)) > 0.5 * timeout_s, out
    assert f"visibility timeout {timeout_s:3d} s: lost batch handed out again after" in out
    drop = re.search(r"drop 0: batch (\d+); job still -> resumed +([\d.]+) s", out)
    assert drop, out
    assert float(drop.group(2)) >= 3 * 0.9, out  # the reconciler waits for the job to be still this long
    assert "bound RECONCILE_AFTER + RECONCILE_INTERVAL = 4 s" in out


def test_events_bench_reports_latency_quantiles_loaded_and_alone():
    out = bench("events.py", "--jobs", "3", "--rows", "6", "--repeats", "1")
    runs = re.findall(r"repeat 0 (alone|loaded) +\( ?(\d+) jobs\): +(\d+) events", out)
    assert sorted((side, int(jobs)) for side, jobs, _ in runs) == [("alone", 1), ("loaded", 3)], out
    assert all(int(events) > 0 for _, _, events in runs), out
    quantiles = re.search(r"3 jobs at once +: p50 +([\d.]+) ms +p99 +([\d.]+) ms +max +([\d.]+) ms", out)
    assert quantiles, out
    p50, p99, top = map(float, quantiles.groups())
    assert 0 < p50 <= p99 <= top, out
    assert "3 jobs / 1 job: p50" in out and "target p99 < 100 ms" in out


def test_bigjob_trace_names_the_stages_and_their_allocation_sites():
    out = bench("bigjob.py", "--trace", "--rows", "1000", "--baseline-rows", "100", "--batch", "100", "--top", "3")
    for rows in (100, 1000):
        for stage in ("the API's parse of the submit body", "dataset.load_job_source", "dataset.plan_job"):
            assert re.search(rf"^{rows} rows: {re.escape(stage)}.*: peak [\d.]+ MB traced", out, re.MULTILINE), (stage, out)
    assert "plan_job dispatched 10 batches" in out
    assert "(from spider/data/sources.py:" in out  # the rows' allocation site, inside Spider's source loading
