"""User code on sandbox workers only: the pre-processor on source rows, the post-processor on
records, and tool calls that rollout loops await.

Each sandbox worker keeps one `JobSandbox` (warm jailed interpreters) per active job and closes it
when the job ends or sits idle.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import redis

from spider.config import JobConfig
from spider.data.sources import start_of
from spider.errors import SpiderError
from spider.jobs.stages import Context, load_job
from spider.keys import DEFAULT_KEYS, Keys
from spider.sandbox.outcomes import CallError, ToolOutcome
from spider.types import BatchRow, EventKind, RowError

log = logging.getLogger(__name__)
IDLE_SECONDS = 600


class SandboxPool:
    """The worker's sandbox and its open jobs. Thread-safe: a threads-pool worker shares it."""

    def __init__(self, ctx: Context):
        from spider.sandbox import Sandbox

        self.ctx = ctx
        unsafe = os.environ.get("SPIDER_SANDBOX_UNSAFE") == "1"
        self.sandbox = Sandbox(unsafe=unsafe)
        self.jobs: dict[str, tuple[Any, float]] = {}
        self.lock = threading.Lock()

    def job(self, job_id: str, config: JobConfig):
        self.sweep()
        with self.lock:
            entry = self.jobs.get(job_id)
            if entry is None:
                bundle = self.ctx.files(job_id).bundle.read_bytes()
                job_sandbox = self.sandbox.open_job(job_id, bundle, config.runtime, self.ctx.store.secrets(job_id))
                if self.sandbox.unsafe:
                    self.ctx.bus.publish(
                        job_id, EventKind.SANDBOX_UNSAFE, "user code runs WITHOUT firejail on this worker", level="warning"
                    )
            else:
                job_sandbox = entry[0]
            self.jobs[job_id] = (job_sandbox, time.monotonic())
            return job_sandbox

    def sweep(self) -> None:
        """Close the sandboxes of jobs that ended or sat idle."""
        now = time.monotonic()
        with self.lock:
            ended = [
                job_id
                for job_id, (_, used) in self.jobs.items()
                if now - used > IDLE_SECONDS or _ended(self.ctx.store.status(job_id))
            ]
            for job_id in ended:
                self.jobs.pop(job_id, None)
                try:
                    self.sandbox.close_job(job_id)
                except Exception:
                    log.exception("closing the sandbox of job %s", job_id)


def row_error(error: CallError | None) -> RowError:
    """The error record of a row or record whose user code failed."""
    error = error or CallError("exception", "Error", "unknown")
    return RowError(type=error.type, message=error.message, kind=error.kind)


def pre_process_rows(job_sandbox: Any, config: JobConfig, raw: list[dict[str, Any]]) -> tuple[list[BatchRow], int]:
    """Run the user's pre-processor on source rows (`{"index", "data"}` each): the rows to
    generate from, and how many it dropped.

    The pre-processor returns the prompt (a string), a new row (a dict: its `source.field` is the
    prompt), or None to drop the row. An exception becomes an error record for that row."""
    outcomes = job_sandbox.pre_process([item["data"] for item in raw], config.processors.pre_kwargs)
    prepared: list[BatchRow] = []
    dropped = 0
    for item, outcome in zip(raw, outcomes):
        index, data = item["index"], item["data"]
        if outcome.dropped:
            dropped += 1
        elif outcome.status == "error":
            prepared.append(BatchRow(index, None, data, error=row_error(outcome.error)))
        elif isinstance(outcome.value, str):
            prepared.append(BatchRow(index, outcome.value, data))
        elif isinstance(outcome.value, dict):
            try:
                prompt, conversation = start_of(outcome.value, config.source.field, index)
                prepared.append(BatchRow(index, prompt, outcome.value, conversation=conversation))
            except SpiderError as exc:
                prepared.append(BatchRow(index, None, outcome.value, error=RowError("PreProcessorError", str(exc))))
        else:
            message = f"the pre-processor returned {type(outcome.value).__name__}; return a str, a dict or None"
            prepared.append(BatchRow(index, None, data, error=RowError("PreProcessorError", message)))
    return prepared, dropped


def post_process_records(
    job_sandbox: Any, config: JobConfig, records: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Run the user's post-processor on result records: the records to keep, and how many it dropped.

    It returns the record to keep (a dict, possibly reshaped) or None to drop it. An exception
    keeps the original record with `error` set to the exception. Error records pass untouched."""
    ok = [r for r in records if r.get("error") is None]
    outcomes = iter(job_sandbox.post_process(ok, config.processors.post_kwargs)) if ok else iter(())
    kept: list[dict[str, Any]] = []
    dropped = 0
    for rec in records:
        if rec.get("error") is not None:
            kept.append(rec)
            continue
        outcome = next(outcomes)
        if outcome.dropped:
            dropped += 1
        elif outcome.status == "error":
            kept.append({**rec, "error": row_error(outcome.error).to_dict()})
        elif isinstance(outcome.value, dict):
            kept.append(outcome.value)
        else:
            message = f"the post-processor returned {type(outcome.value).__name__}; return a dict or None"
            kept.append({**rec, "error": RowError("PostProcessorError", message).to_dict()})
    return kept, dropped


# -- tool calls ---------------------------------------------------------------------------------


def _ended(status: Any) -> bool:
    return status is not None and status.ended


def run_tool_call(ctx: Context, pool: SandboxPool, job_id: str, call_id: str, name: str, arguments: dict[str, Any]) -> None:
    """Run one tool call in the job's sandbox and push its outcome to the caller's reply list."""
    try:
        config, record = load_job(ctx, job_id)
        if record.status.ended:
            outcome = ToolOutcome(error=CallError("exception", "JobEnded", f"job {job_id} is {record.status}"))
        else:
            outcome = pool.job(job_id, config).call_tool(name, arguments)
    except Exception as exc:
        outcome = ToolOutcome(error=CallError("exception", type(exc).__name__, str(exc)))
    reply = {"content": outcome.content, "error": outcome.error.to_dict() if outcome.error else None}
    key = ctx.store.keys.tool_reply(call_id)
    pipe = ctx.store.r.pipeline()
    pipe.rpush(key, json.dumps(reply))
    pipe.expire(key, 3600)
    pipe.execute()


class ToolCaller:
    """What a rollout loop uses to call the job's tools: each call is a task on the `sandbox`
    queue; the answer comes back on a Redis list the caller waits on (no result backend)."""

    def __init__(self, client: redis.Redis, job_id: str, send: Any, keys: Keys = DEFAULT_KEYS):
        self.r = client
        self.job_id = job_id
        self.send = send  # send(job_id, call_id, name, arguments): enqueue the sandbox task
        self.keys = keys

    def call_many(self, calls: list[tuple[str, dict[str, Any]]], timeout: float) -> list[ToolOutcome]:
        """Run calls concurrently on the sandbox workers; a call with no answer in `timeout`
        seconds becomes a timeout error for the model."""
        ids = [uuid.uuid4().hex for _ in calls]
        for call_id, (name, arguments) in zip(ids, calls):
            self.send(self.job_id, call_id, name, arguments)
        deadline = time.monotonic() + timeout
        outcomes = []
        for call_id in ids:
            left = max(0.01, deadline - time.monotonic())
            answer = self.r.blpop([self.keys.tool_reply(call_id)], timeout=left)
            if answer is None:
                outcomes.append(ToolOutcome(error=CallError("timeout", "TimeoutError", f"no answer from the sandbox in {timeout:.0f}s")))
                continue
            data = json.loads(answer[1])
            error = data.get("error")
            outcomes.append(
                ToolOutcome(content=data.get("content"), error=CallError(**error) if error else None)
            )
        return outcomes

    def call(self, name: str, arguments: dict[str, Any], timeout: float) -> ToolOutcome:
        return self.call_many([(name, arguments)], timeout)[0]
