"""Progress events from publish to client under load: `--jobs` concurrent dataset jobs on a local
stack (Redis, API, a control and a rollout worker; the hf engine on the tiny model from
spider.testing, small batches so that events come often), and a client following each job's
Server-Sent Events stream through the API, each in its own thread. An event's latency is the
client's receive time minus the event's `ts` (set by the publisher: same machine, same clock).

Only events published after the client's stream was open count (the history replayed on connect
is older by construction). Each repeat runs the loaded side (`--jobs` jobs at once) and the
baseline (one job alone, same rows), interleaved; prints p50 / p99 / max per run, their medians
over `--repeats`, the same over all events pooled, and the ratios loaded / alone.

    python bench/events.py [--jobs 10] [--rows 40] [--batch 2] [--max-tokens 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arithmetic, make_config, workspace, write_prompts  # noqa: E402

import httpx  # noqa: E402

from spider.client.client import parse_sse  # noqa: E402
from spider.config import AppConfig  # noqa: E402
from spider.types import ENDING_KINDS, EventKind  # noqa: E402

P99_TARGET_MS = 100.0


@dataclass
class Stream:
    """What one client saw of one job: when its stream opened, and each event's latency."""

    job_id: str
    opened_at: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    history: int = 0  # events published before the stream opened (replayed, not counted)
    last_kind: str = ""
    error: str | None = None
    opened: threading.Event = field(default_factory=threading.Event)


def follow(url: str, stream: Stream) -> None:
    """Read the job's SSE stream until its ending event, timing every event as it arrives."""
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=None)) as http:
            with http.stream("GET", f"/v1/jobs/{stream.job_id}/events") as response:
                response.raise_for_status()
                stream.opened_at = time.time()
                stream.opened.set()
                for event in parse_sse(response.iter_lines()):
                    received = time.time()
                    if event.ts < stream.opened_at:
                        stream.history += 1
                    else:
                        stream.latencies_ms.append(1000 * (received - event.ts))
                    stream.last_kind = event.kind
                    if event.kind in ENDING_KINDS:
                        return
    except Exception as exc:  # reported with the run, which then fails
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.opened.set()




@dataclass
class Run:
    jobs: int
    latencies_ms: list[float]
    history: int
    wall_s: float

    def quantile(self, q: float) -> float:
        return quantile(self.latencies_ms, q)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if q < 1 else ordered[-1]


def run_jobs(url: str, config: AppConfig, jobs: int) -> Run:
    """Submit `jobs` jobs one right after the other, each one's stream followed in its own thread
    (opened before the next submit, so that little of a job's history precedes its stream), until
    all have ended."""
    from spider.client import SpiderClient

    started = time.perf_counter()
    streams: list[Stream] = []
    threads: list[threading.Thread] = []
    with SpiderClient(config=config) as client:
        for _ in range(jobs):
            streams.append(Stream(client.submit_job()["job_id"]))
            threads.append(threading.Thread(target=follow, args=(url, streams[-1]), daemon=True))
            threads[-1].start()
            streams[-1].opened.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=1800)
        statuses = [client.get_job_status(s.job_id)["status"] for s in streams]
    wall = time.perf_counter() - started
    failed = [(s.job_id, status, s.last_kind, s.error) for s, status in zip(streams, statuses)
              if status != "completed" or s.last_kind != EventKind.JOB_COMPLETED or s.error]
    if failed:
        raise RuntimeError(f"jobs that did not complete, or whose stream broke: {failed}")
    return Run(jobs, [ms for s in streams for ms in s.latencies_ms], sum(s.history for s in streams), wall)


def summary(runs: list[Run]) -> dict[str, float]:
    """Medians over runs of each run's p50 / p99 / max, and the same over all events pooled."""
    pooled = [ms for r in runs for ms in r.latencies_ms]
    return {
        "p50": statistics.median(r.quantile(0.5) for r in runs),
        "p99": statistics.median(r.quantile(0.99) for r in runs),
        "max": statistics.median(r.quantile(1.0) for r in runs),
        "pooled_p50": quantile(pooled, 0.5), "pooled_p99": quantile(pooled, 0.99), "pooled_max": max(pooled),
        "events": len(pooled),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=40, help="rows per job")
    parser.add_argument("--batch", type=int, default=2, help="rows per batch: two events per batch")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from spider.local import LocalStack, WorkerSpec

    work, model = workspace()
    prompts = write_prompts(work / "prompts.jsonl", arithmetic(args.rows))
    load_start = os.getloadavg()
    workers = (WorkerSpec("control", "threads", 4), WorkerSpec("rollout", "threads", 2))
    runs: dict[str, list[Run]] = {"alone": [], "loaded": []}
    with LocalStack(env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, workers=workers) as stack:
        config = make_config(stack.url, model, "hf", prompts, args.rows, args.batch, args.max_tokens, request_timeout=120)
        run_jobs(stack.url, make_config(stack.url, model, "hf", prompts, 2, args.batch, 2, request_timeout=120), 1)  # load the engine
        for repeat in range(args.repeats):
            for side in (("alone", "loaded") if repeat % 2 == 0 else ("loaded", "alone")):
                run = run_jobs(stack.url, config, 1 if side == "alone" else args.jobs)
                runs[side].append(run)
                print(f"  repeat {repeat} {side:6s} ({run.jobs:2d} jobs): {len(run.latencies_ms):4d} events "
                      f"(+{run.history} replayed)  p50 {run.quantile(0.5):6.1f} ms  p99 {run.quantile(0.99):6.1f} ms  "
                      f"max {run.quantile(1.0):6.1f} ms  in {run.wall_s:5.1f} s", flush=True)

    load_end = os.getloadavg()
    alone, loaded = summary(runs["alone"]), summary(runs["loaded"])
    print(f"jobs={args.jobs} rows={args.rows} batch={args.batch} max_tokens={args.max_tokens} repeats={args.repeats}; "
          f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
          f"({subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")
    for name, s in (("1 job alone", alone), (f"{args.jobs} jobs at once", loaded)):
        print(f"{name:16s}: p50 {s['p50']:6.1f} ms  p99 {s['p99']:6.1f} ms  max {s['max']:6.1f} ms (medians of runs); "
              f"pooled {s['events']} events: p50 {s['pooled_p50']:.1f} ms  p99 {s['pooled_p99']:.1f} ms  "
              f"max {s['pooled_max']:.1f} ms")
    print(f"{args.jobs} jobs / 1 job: p50 {loaded['p50'] / alone['p50']:.2f}x  p99 {loaded['p99'] / alone['p99']:.2f}x  "
          f"max {loaded['max'] / alone['max']:.2f}x")
    print(f"target p99 < {P99_TARGET_MS:.0f} ms under {args.jobs} jobs: {'met' if loaded['p99'] < P99_TARGET_MS else 'NOT met'} "
          f"(p99 {loaded['p99']:.1f} ms)")


if __name__ == "__main__":
    main()
