"""A big dataset job end to end, against a job a tenth its size: wall time, rows/s, and the peak
memory of every process of the stack, to see whether any grows with the row count.

Each size runs on a fresh local stack (Redis, API, a control and a rollout worker). The source is
a JSONL file of small rows, uploaded with the job (as `SpiderClient` sends a local file); the
engine is cheap (hf on the tiny model from spider.testing, `max_tokens` 1) and batches are big
(`--batch` rows), so the job's own plumbing dominates: upload, planning, shards, merge, download.
A 2-row job first loads the engine and imports everything, then the idle RSS of each process is
noted. While the job runs and its result is downloaded through the API, psutil samples every
0.2 s the RSS of each process of `LocalStack.procs` with its children; the peak is reported per
process and per phase (planning: until `job.planned`; generation and finalize: after it;
download), with the ratio big / small. Memory flat in the row count means a ratio near 1.

`--trace` instead runs the stages a big job's memory grows in within this process under
tracemalloc, for both sizes: the API's parse of the submit body (spider.api.submission), the
plan's source load (spider.jobs.dataset.load_job_source) and the whole plan (plan_job, on a
private Redis, its dispatches recorded); prints each one's peak, and the allocation sites of
what its returned value holds (the parsed submission, the loaded rows).

    python bench/bigjob.py [--rows 100000] [--baseline-rows 10000] [--batch 1000] [--repeats 1] [--trace]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import workspace  # noqa: E402

from spider.config import AppConfig  # noqa: E402
from spider.types import EventKind  # noqa: E402

MB = 1024 * 1024
PHASES = ("plan", "generate+finalize", "download")


def write_source(path: Path, rows: int) -> Path:
    """`rows` small JSONL rows (~60 bytes each)."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for i in range(rows):
            handle.write(json.dumps({"question": f"Question {i}: what is {i} plus {i}?", "id": i}) + "\n")
    return path


def make_config(url: str, model: Path, source: Path, batch: int) -> AppConfig:
    return AppConfig.parse({
        "server": {"base_url": url, "request_timeout": 600},
        "job": {
            "model": {"provider": "hf", "name": str(model), "parameters": {"dtype": "float32", "batch_size": 250}},
            "source": {"dataset": str(source), "split": "train", "field": "question"},
            "generation": {"parameters": {"temperature": 1.0, "max_tokens": 1, "seed": 3}, "max_batch_size": batch},
        },
    })


class MemorySampler:
    """Samples the RSS of each named process and its descendants every `interval` seconds; keeps
    the peak per process for the phase currently set."""

    def __init__(self, procs: dict[str, Any], interval: float = 0.2):
        import psutil

        self._psutil = psutil
        self.procs = {name: psutil.Process(p.pid) for name, p in procs.items()}
        self.interval = interval
        self.phase = "idle"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self, proc: Any) -> int:
        """The RSS of a process and its descendants (0 for what has gone meanwhile)."""
        total = 0
        try:
            family = [proc, *proc.children(recursive=True)]
        except self._psutil.Error:
            return 0
        for member in family:
            try:
                total += member.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def sample(self) -> None:
        peaks = self.peaks.setdefault(self.phase, {})
        for name, proc in self.procs.items():
            peaks[name] = max(peaks.get(name, 0), self.rss(proc))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak(self, name: str, phases: tuple[str, ...] = PHASES) -> int:
        return max(self.peaks.get(p, {}).get(name, 0) for p in phases)


@dataclasses.dataclass
class Run:
    rows: int
    wall_s: float  # submit until completed
    plan_s: float  # submit until job.planned
    download_s: float
    idle: dict[str, int]
    peaks: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # phase -> process -> bytes

    def peak(self, name: str) -> int:
        return max(self.peaks.get(p, {}).get(name, 0) for p in PHASES)


def one_run(model: Path, source: Path, rows: int, batch: int, work: Path) -> Run:
    """A fresh stack: a warm-up job, then the measured job and its download."""
    from spider.client import SpiderClient
    from spider.local import LocalStack, WorkerSpec

    workers = (WorkerSpec("control", "threads", 4), WorkerSpec("rollout", "threads", 2))
    with LocalStack(env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, workers=workers) as stack:
        warm_source = write_source(work / "warm.jsonl", 2)
        with SpiderClient(config=make_config(stack.url, model, warm_source, batch)) as client:
            status = client.poll_job(client.submit_job()["job_id"], on_event=lambda e: None)
            assert status["status"] == "completed", status
        with MemorySampler(stack.procs) as sampler:
            idle = dict(sampler.peaks["idle"])
            with SpiderClient(config=make_config(stack.url, model, source, batch)) as client:
                started = time.perf_counter()
                sampler.phase = "plan"
                job_id = client.submit_job()["job_id"]
                planned_at = None
                for event in client.stream_events(job_id):
                    if event.kind == EventKind.JOB_PLANNED:
                        planned_at = time.perf_counter()
                        sampler.phase = "generate+finalize"
                wall = time.perf_counter() - started
                status = client.get_job_status(job_id)
                if status["status"] != "completed":
                    raise RuntimeError(f"job {job_id} ended {status['status']}: {status.get('error')}")
                sampler.phase = "download"
                began = time.perf_counter()
                result = client.download_result(job_id, work / f"{job_id}.jsonl")
                download = time.perf_counter() - began
        with open(result, "rb") as handle:
            records = sum(1 for line in handle if line.strip())
        if records != rows:
            raise RuntimeError(f"job {job_id}: {records} records in the result, expected {rows}")
        result.unlink()
    return Run(rows, wall, (planned_at or started) - started, download, idle, sampler.peaks)


def trace_stages(rows: int, batch: int, model: Path, work: Path, top: int) -> None:
    """The API's parse of a submit body and plan_job, each alone under tracemalloc."""
    import tracemalloc

    import redis

    from spider.api.submission import parse_submission
    from spider.client.client import job_and_secrets
    from spider.events import EventBus
    from spider.jobs import dataset
    from spider.jobs.stages import Context
    from spider.jobs.store import JobStore, write_atomic
    from spider.local import start_redis
    from spider.settings import Settings

    source = write_source(work / f"source-{rows}.jsonl", rows)
    config = make_config("http://unused", model, source, batch)
    job, _ = job_and_secrets(config.job, {})
    body = json.dumps({"job": job, "env": {}, "bundle": None,
                       "source_files": {source.name: base64.b64encode(source.read_bytes()).decode()}}).encode()
    server, url = start_redis(work / f"redis-{rows}")
    try:
        settings = dataclasses.replace(Settings.from_env(), redis_url=url, data_dir=work / f"data-{rows}")
        client = redis.Redis.from_url(url, decode_responses=True)
        store = JobStore(client)

        class Recorded:
            def __init__(self) -> None:
                self.calls: list[tuple[Any, ...]] = []

            def dispatch(self, stage: str, job_id: str, *args: Any) -> None:
                self.calls.append((stage, job_id, *args))

        recorded = Recorded()
        ctx = Context(settings, store, EventBus(client, keys=store.keys), recorded)

        def submit() -> Any:
            return parse_submission(body, settings)

        submission = traced(f"{rows} rows: the API's parse of the submit body ({len(body) / MB:.1f} MB)", submit, top)
        record = store.create("bench", submission.job.model_dump(mode="json"), {}, has_bundle=False)
        files = ctx.files(record.id)
        for name, data in submission.source_files.items():
            write_atomic(files.source_dir / name, data)
        store.set_fields(record.id, source_upload=json.dumps(sorted(submission.source_files)))
        del submission
        config_obj = config.job
        rows_loaded = traced(f"{rows} rows: dataset.load_job_source (plan_job's first step)",
                             lambda: dataset.load_job_source(ctx, record.id, config_obj), top)
        del rows_loaded
        traced(f"{rows} rows: dataset.plan_job", lambda: dataset.plan_job(ctx, record.id), top)
        print(f"  plan_job dispatched {len(recorded.calls)} batches")
    finally:
        server.terminate()
        server.wait()


def traced(what: str, call: Any, top: int) -> Any:
    """Run `call` under tracemalloc; print its peak and the sites holding the most at the peak."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start(8)
    try:
        result = call()
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    print(f"{what}: peak {peak / MB:.1f} MB traced, {current / MB:.1f} MB still held on return "
          f"(the returned value and what it keeps)")
    # Held on return (what the stage's result keeps); the peak's own sites are those of the
    # stage's working set, which the returned value is part of.
    spider_root = str(Path(__file__).resolve().parent.parent / "spider")
    for stat in snapshot.statistics("traceback")[:top]:
        frames = list(stat.traceback)  # innermost last
        ours = next((f for f in reversed(frames) if f.filename.startswith(spider_root)), None)
        via = f"  (from {Path(ours.filename).relative_to(spider_root.rsplit('/', 1)[0])}:{ours.lineno})" if ours else ""
        print(f"    {stat.size / MB:7.1f} MB  {stat.count:8d} blocks  {frames[-1].filename}:{frames[-1].lineno}{via}")
    return result


def mb(value: float) -> str:
    return f"{value / MB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="tracemalloc the submit parse and plan_job in-process")
    parser.add_argument("--top", type=int, default=8, help="allocation sites shown per traced stage")
    args = parser.parse_args()

    work, model = workspace()
    if args.trace:
        from spider.config import SourceConfig
        from spider.data.sources import load_source_rows

        # Imports and datasets' first-use caches, which would otherwise show as the first stage's memory.
        load_source_rows(SourceConfig(dataset=str(write_source(work / "warm.jsonl", 2)), split="train", field="question"))
        for rows in (args.baseline_rows, args.rows):
            trace_stages(rows, args.batch, model, work, args.top)
        return

    load_start = os.getloadavg()
    sources = {rows: write_source(work / f"source-{rows}.jsonl", rows) for rows in (args.baseline_rows, args.rows)}
    runs: dict[int, list[Run]] = {rows: [] for rows in sources}
    for repeat in range(args.repeats):
        for rows in (sorted(sources) if repeat % 2 == 0 else sorted(sources, reverse=True)):
            run = one_run(model, sources[rows], rows, args.batch, work)
            runs[rows].append(run)
            peaks = "  ".join(f"{name} {mb(run.peak(name))}" for name in run.idle)
            print(f"  repeat {repeat} {rows:7d} rows: {run.wall_s:6.1f} s ({rows / run.wall_s:6.0f} rows/s; planned after "
                  f"{run.plan_s:5.1f} s; download {run.download_s:4.1f} s); peak RSS MB: {peaks}", flush=True)

    load_end = os.getloadavg()
    small, big = args.baseline_rows, args.rows
    print(f"rows={big} baseline={small} batch={args.batch} repeats={args.repeats}; load average {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end ({subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")
    wall = {rows: statistics.median(r.wall_s for r in rs) for rows, rs in runs.items()}
    print(f"wall time: {small} rows {wall[small]:.1f} s ({small / wall[small]:.0f} rows/s), {big} rows {wall[big]:.1f} s "
          f"({big / wall[big]:.0f} rows/s); ratio {wall[big] / wall[small]:.2f}x for {big / small:.0f}x the rows")
    print("peak RSS (process with its children, MB, medians of repeats): idle before the job, then the peak of "
          "each phase; ratio big / small of the peak over all phases and of the growth over idle")
    for name in runs[small][0].idle:
        def med(rows: int, pick: Any) -> float:
            return statistics.median(pick(r) for r in runs[rows])

        line = [f"  {name:15s}"]
        for rows in (small, big):
            phases = " ".join(f"{p} {mb(med(rows, lambda r, p=p: r.peaks.get(p, {}).get(name, 0)))}" for p in PHASES)
            line.append(f"{rows}: idle {mb(med(rows, lambda r: r.idle[name]))} | {phases}")
        peak_ratio = med(big, lambda r: r.peak(name)) / med(small, lambda r: r.peak(name))
        growth_small = med(small, lambda r: r.peak(name) - r.idle[name])
        growth_big = med(big, lambda r: r.peak(name) - r.idle[name])
        growth = f"{growth_big / growth_small:.1f}x" if growth_small > MB else "n/a (small run grew < 1 MB)"
        line.append(f"peak ratio {peak_ratio:.2f}x, growth {mb(growth_small)} -> {mb(growth_big)} MB ({growth})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
