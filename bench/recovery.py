"""How fast lost work runs again, on a local stack (Redis, API, a control and a rollout worker;
the hf engine on the tiny model from spider.testing).

Kill: a job is submitted; once its first batch has published `batch.started` (the engine is
loaded, generation has begun) the rollout worker is SIGKILLed with its process group and started
again at once, as a deployment's restart policy would. The batches it held were delivered and not
acknowledged: the broker hands them out again after SPIDER_VISIBILITY_TIMEOUT (kombu's sweep of
`unacked` runs every timeout / 4, see spider/workers/app.py). Measured, from the kill: a lost
batch's task running again (its `model.loading`: the fresh worker loads the engine first), the
lost batches' `batch.started` again (the latest of them, after that load), and `job.completed`;
each reported as a ratio to the visibility timeout (target <= 2x), median of `--repeats`, for
each timeout of `--timeouts` (one stack each, since the timeout is a worker setting). The kill
job has as many batches as the rollout worker runs at once (2 threads: `--rows` / `--batch` = 2),
so all of them are lost and the fresh worker's first task is a redelivered one.

Drop: a fault plan (spider.faults) drops the job's first `spider.run_batch` message as the
rollout worker receives it (acknowledged and never run, as when a worker dies between the
broker's BRPOP and its bookkeeping). Nothing is left in the broker for that batch: the reconciler
hands it out again once the job has been still for SPIDER_RECONCILE_AFTER_S, at its next pass
(every SPIDER_RECONCILE_INTERVAL_S). Measured: from the job's last progress (its last dispatch or
batch completion, the reconciler's own clock) to `job.resumed`, against the bound
RECONCILE_AFTER + RECONCILE_INTERVAL; and from planning to the dropped batch's `batch.started`.

Every job must end `completed` with each row exactly once, or the bench fails.

    python bench/recovery.py [--timeouts 10 20 40] [--repeats 3] [--drop-repeats 3]
        [--reconcile-after 10] [--reconcile-interval 5] [--rows 16] [--batch 8] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import make_config, workspace, write_prompts  # noqa: E402

from spider import faults  # noqa: E402
from spider.config import AppConfig  # noqa: E402
from spider.types import EventKind  # noqa: E402

ROLLOUT_WORKER = "worker-rollout"


class Follower:
    """Follows one job's events through the API (SSE) in a thread; `wait_for` blocks until an event
    that matches has arrived."""

    def __init__(self, url: str, job_id: str):
        self.url, self.job_id = url, job_id
        self.events: list[Any] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from spider.client import SpiderClient

        with SpiderClient(base_url=self.url) as client:
            for event in client.stream_events(self.job_id, reconnect_delay=0.5):
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    def wait_for(self, match: Callable[[Any], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((e for e in self.events if match(e)), None)
                if found is not None:
                    return found
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    kinds = [e.kind for e in self.events]
                    raise RuntimeError(f"job {self.job_id}: no matching event within {timeout:.0f} s; saw {kinds}")
                self._changed.wait(timeout=0.5)

    def of_kind(self, kind: str) -> list[Any]:
        with self._changed:
            return [e for e in self.events if e.kind == kind]




def check_complete(client: Any, job_id: str, rows: int, work: Path) -> None:
    """The job completed with every row exactly once, in order."""
    status = client.get_job_status(job_id)
    if status["status"] != "completed":
        raise RuntimeError(f"job {job_id} ended {status['status']}: {status}")
    result = client.download_result(job_id, work / f"{job_id}.jsonl")
    indices = [json.loads(line)["row_index"] for line in result.read_text().split("\n") if line.strip()]
    if indices != list(range(rows)):
        raise RuntimeError(f"job {job_id}: result rows {indices[:20]}... are not each row once")


def batch_of(event: Any) -> int | None:
    return event.data.get("batch")


@dataclass
class KillRun:
    lost: list[int]
    restart_s: float  # kill until the restarted worker answers
    handed_out_s: float  # kill until a lost batch's task runs again (its `model.loading` in the fresh worker)
    running_again_s: float  # kill until the last lost batch's `batch.started` again
    completed_s: float  # kill until `job.completed`


def kill_once(stack: Any, config: AppConfig, rows: int, work: Path, timeout: float) -> KillRun:
    """One job; the rollout worker SIGKILLed mid-batch and started again at once."""
    from spider.client import SpiderClient

    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        follower = Follower(stack.url, job_id)
        follower.wait_for(lambda e: e.kind == EventKind.BATCH_STARTED, timeout)
        killed_at = time.time()
        stack.kill(ROLLOUT_WORKER)
        stack.restart(ROLLOUT_WORKER)
        restart_s = time.time() - killed_at
        done = follower.wait_for(lambda e: e.kind in (EventKind.JOB_COMPLETED, EventKind.JOB_FAILED), timeout)
        check_complete(client, job_id, rows, work)
    # Lost: started before the kill and not completed before it (from the whole history, as an
    # event published just before the kill may have reached the follower after it).
    started = {batch_of(e) for e in follower.of_kind(EventKind.BATCH_STARTED) if e.ts < killed_at}
    completed = {batch_of(e) for e in follower.of_kind(EventKind.BATCH_COMPLETED) if e.ts < killed_at}
    lost = sorted(started - completed)
    if not lost:
        raise RuntimeError(f"job {job_id}: no batch was mid-generation at the kill; raise --max-tokens")
    again = [min(e.ts for e in follower.of_kind(EventKind.BATCH_STARTED) if batch_of(e) == b and e.ts > killed_at)
             for b in lost]
    # The restarted worker loads the engine for the first task it runs: that task's `model.loading`
    # is the moment the broker's redelivery reached a worker; `batch.started` follows the load.
    loading = [e.ts for e in follower.of_kind(EventKind.MODEL_LOADING) if e.ts > killed_at]
    if not loading:
        raise RuntimeError(f"job {job_id}: no model.loading after the kill")
    handed_out = min(loading)
    return KillRun(lost, restart_s, handed_out - killed_at, max(again) - killed_at, done.ts - killed_at)


@dataclass
class DropRun:
    batch: int
    still_to_resumed_s: float  # the job's last progress until `job.resumed`
    planned_to_started_s: float  # `job.planned` until the dropped batch's `batch.started`
    completed_s: float  # `job.planned` until `job.completed`


def drop_once(stack: Any, config: AppConfig, rows: int, plan: Path, work: Path, timeout: float) -> DropRun:
    """One job whose first rollout message is dropped on receipt; the reconciler finds it."""
    from spider.client import SpiderClient

    faults.write_plan(plan, [{"point": "spider.run_batch.received", "job": "*", "action": "drop"}])
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        follower = Follower(stack.url, job_id)
        resumed = follower.wait_for(lambda e: e.kind == EventKind.JOB_RESUMED, timeout)
        done = follower.wait_for(lambda e: e.kind in (EventKind.JOB_COMPLETED, EventKind.JOB_FAILED), timeout)
        check_complete(client, job_id, rows, work)
    hits = faults.read_plan(plan)["hits"]
    if [h["job"] for h in hits] != [job_id]:
        raise RuntimeError(f"the drop fired for {hits}, not once for job {job_id}")
    planned = follower.of_kind(EventKind.JOB_PLANNED)[0]
    # What moves a job: its stages dispatched (at planning) and its batches completed.
    moved = [planned.ts] + [e.ts for e in follower.of_kind(EventKind.BATCH_COMPLETED) if e.ts < resumed.ts]
    # The dropped batch first starts once the reconciler handed it out again: after every other
    # batch's first start (the reconciler dispatches before it publishes `job.resumed`, so that
    # start may come just before the event).
    first_start: dict[int, float] = {}
    for e in follower.of_kind(EventKind.BATCH_STARTED):
        first_start.setdefault(batch_of(e), e.ts)
    batches = range(-(-rows // config.job.generation.max_batch_size))
    dropped = [b for b in batches if b not in first_start or first_start[b] >= resumed.ts - 0.5]
    if len(dropped) != 1:
        raise RuntimeError(f"job {job_id}: batches {dropped} first started at the reconciler's pass, not one")
    again = follower.wait_for(lambda e: e.kind == EventKind.BATCH_STARTED and batch_of(e) == dropped[0], timeout)
    return DropRun(dropped[0], resumed.ts - max(moved), again.ts - planned.ts, done.ts - planned.ts)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeouts", type=int, nargs="+", default=[10, 20, 40], help="SPIDER_VISIBILITY_TIMEOUT values (s)")
    parser.add_argument("--repeats", type=int, default=3, help="kills per timeout")
    parser.add_argument("--drop-repeats", type=int, default=3, help="dropped messages (on the first stack); 0 skips")
    parser.add_argument("--reconcile-after", type=float, default=10.0, help="SPIDER_RECONCILE_AFTER_S")
    parser.add_argument("--reconcile-interval", type=float, default=5.0, help="SPIDER_RECONCILE_INTERVAL_S")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128, help="long enough that a batch is mid-generation when killed")
    args = parser.parse_args()

    from spider.local import LocalStack, WorkerSpec

    work, model = workspace()
    prompts = write_prompts(work / "prompts.jsonl", (f"Question {i}: tell me about {i}." for i in range(args.rows)))
    plan = work / "fault-plan.json"
    faults.write_plan(plan, [])
    workers = (WorkerSpec("control", "threads", 4), WorkerSpec("rollout", "threads", 2))
    load = os.getloadavg()
    print(f"rows={args.rows} batch={args.batch} max_tokens={args.max_tokens} repeats={args.repeats} "
          f"reconcile after {args.reconcile_after:g} s, every {args.reconcile_interval:g} s; "
          f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)

    kills: dict[int, list[KillRun]] = {}
    drops: list[DropRun] = []
    for n, timeout_s in enumerate(args.timeouts):
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SPIDER_VISIBILITY_TIMEOUT": str(timeout_s),
               "SPIDER_RECONCILE_AFTER_S": str(args.reconcile_after),
               "SPIDER_RECONCILE_INTERVAL_S": str(args.reconcile_interval), faults.PLAN_ENV: str(plan)}
        wait = 10 * timeout_s + 300  # a hung recovery fails the bench instead of hanging it
        with LocalStack(env=env, workers=workers) as stack:
            config = make_config(stack.url, model, "hf", prompts, args.rows, args.batch, args.max_tokens, request_timeout=120)
            warm = make_config(stack.url, model, "hf", prompts, 2, args.batch, 2, request_timeout=120)
            from spider.client import SpiderClient

            with SpiderClient(config=warm) as client:  # the control worker's first plan, the datasets import
                job_id = client.submit_job()["job_id"]
                Follower(stack.url, job_id).wait_for(lambda e: e.kind == EventKind.JOB_COMPLETED, wait)
            kills[timeout_s] = []
            for repeat in range(args.repeats):
                run = kill_once(stack, config, args.rows, work, wait)
                kills[timeout_s].append(run)
                print(f"  visibility {timeout_s:3d} s  kill {repeat}: lost batches {run.lost}; worker back in "
                      f"{run.restart_s:5.1f} s; handed out again after {run.handed_out_s:6.1f} s "
                      f"({run.handed_out_s / timeout_s:.2f}x); running again after {run.running_again_s:6.1f} s "
                      f"({run.running_again_s / timeout_s:.2f}x); job completed after {run.completed_s:6.1f} s",
                      flush=True)
            if n == 0:
                drop_config = make_config(stack.url, model, "hf", prompts, args.rows, args.batch, 8, request_timeout=120)
                for repeat in range(args.drop_repeats):
                    drop = drop_once(stack, drop_config, args.rows, plan, work, wait)
                    drops.append(drop)
                    print(f"  drop {repeat}: batch {drop.batch}; job still -> resumed {drop.still_to_resumed_s:5.1f} s; "
                          f"planned -> batch running again {drop.planned_to_started_s:5.1f} s; "
                          f"planned -> completed {drop.completed_s:5.1f} s", flush=True)

    load = os.getloadavg()
    print(f"load average at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("SIGKILL of the rollout worker mid-batch (worker started again at once):")
    for timeout_s, runs in kills.items():
        again = [r.running_again_s for r in runs]
        ratios = [r.running_again_s / timeout_s for r in runs]
        handed = [r.handed_out_s for r in runs]
        print(f"  visibility timeout {timeout_s:3d} s: lost batch handed out again after {spread(handed, '{:.1f}')} s = "
              f"{spread([h / timeout_s for h in handed])}x the timeout; its batch.started again (after the fresh "
              f"worker's model load) after {spread(again, '{:.1f}')} s = "
              f"{spread(ratios)}x the timeout (target <= 2x: {'met' if statistics.median(ratios) <= 2 else 'NOT met'}); "
              f"job completed after {spread([r.completed_s for r in runs], '{:.1f}')} s; "
              f"worker back after {spread([r.restart_s for r in runs], '{:.1f}')} s")
    if drops:
        bound = args.reconcile_after + args.reconcile_interval
        still = [d.still_to_resumed_s for d in drops]
        print(f"message dropped on receipt (reconciler): job still -> handed out again {spread(still, '{:.1f}')} s, "
              f"bound RECONCILE_AFTER + RECONCILE_INTERVAL = {bound:g} s "
              f"(ratio {spread([s / bound for s in still])}, within: {max(still) <= bound}); "
              f"planned -> lost batch running again {spread([d.planned_to_started_s for d in drops], '{:.1f}')} s; "
              f"planned -> completed {spread([d.completed_s for d in drops], '{:.1f}')} s")


if __name__ == "__main__":
    main()
