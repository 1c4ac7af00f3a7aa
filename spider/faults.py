"""Crash points, for fault tests of real processes: a worker that reaches a named point of a job's
life dies right there (SIGKILL, as a crash would) or drops its task (as if the broker had lost the
message), when the fault plan says so for that job.

The plan is a JSON file named by `$SPIDER_FAULT_PLAN` (an operator setting; unset in production,
where a point costs one environment lookup): `{"faults": [{"point": ..., "job": ..., "action":
"kill" | "drop" | "wait", "seconds": ...}], "hits": []}`, where `job` is a job id or `*` (the first
job to get there) and `wait` holds the task there for `seconds` (a slow disk, say).
Each fault fires once: it moves from `faults` to `hits`, with the job it fired for.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

PLAN_ENV = "SPIDER_FAULT_PLAN"


class Dropped(BaseException):
    """A task ended at a `drop` point: it stops without doing anything more, and its message is
    acknowledged, as if the broker had lost it. Not an Exception: no stage's error handling may
    turn it into a failed job."""


def point(name: str, job_id: str) -> None:
    """Die, drop the task, or (almost always) go on, as the fault plan says for (`name`, `job_id`)."""
    plan = os.environ.get(PLAN_ENV)
    if not plan:
        return
    fault = _take(Path(plan), name, job_id)
    action = fault["action"] if fault is not None else None
    if action == "wait":
        log.warning("fault plan: waiting %ss at %s for job %s", fault.get("seconds", 1), name, job_id)
        time.sleep(float(fault.get("seconds", 1)))
    elif action == "kill":
        log.warning("fault plan: killed at %s for job %s", name, job_id)
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "drop":
        log.warning("fault plan: task dropped at %s for job %s", name, job_id)
        raise Dropped(f"{name} ({job_id})")


def _take(path: Path, name: str, job_id: str) -> dict | None:
    """The fault planned at this point for this job, moved to the hits (under a lock: every worker
    process of the machine reads the same plan)."""
    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        plan = json.load(handle)
        for fault in plan["faults"]:
            if fault["point"] == name and fault["job"] in (job_id, "*"):
                plan["faults"].remove(fault)
                plan["hits"].append({**fault, "job": job_id})
                handle.seek(0)
                handle.truncate()
                json.dump(plan, handle)
                handle.flush()
                os.fsync(handle.fileno())
                return fault
    return None


def write_plan(path: Path, faults: list[dict[str, str]]) -> None:
    """Start a fault plan (for tests)."""
    path.write_text(json.dumps({"faults": faults, "hits": []}))


def read_plan(path: Path) -> dict[str, list[dict[str, str]]]:
    with open(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        return json.load(handle)
