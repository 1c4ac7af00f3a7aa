"""The stages of a job that run user code, on sandbox workers only: pre-processing a batch of
source rows, post-processing a batch of records, and tool calls that rollout loops await.

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
from dataclasses import asdict
from typing import Any

import redis

from spider.config import JobConfig
from spider.errors import SpiderError
from spider.jobs.dataset import BatchRow, Context, complete_batch, guarded, load_job
from spider.jobs.store import TERMINAL, write_atomic
from spider.sandbox.outcomes import CallError, ToolOutcome

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
                        job_id, "sandbox.unsafe", "user code runs WITHOUT firejail on this worker", level="warning"
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
                if now - used > IDLE_SECONDS or self.ctx.store.status(job_id) in TERMINAL
            ]
            for job_id in ended:
                self.jobs.pop(job_id, None)
                try:
                    self.sandbox.close_job(job_id)
                except Exception:
                    log.exception("closing the sandbox of job %s", job_id)


def _error_dict(error: CallError | None) -> dict[str, str]:
    error = error or CallError("exception", "Error", "unknown")
    return {"type": error.type, "message": error.message, "kind": error.kind}


@guarded
def preprocess_batch(ctx: Context, job_id: str, batch_index: int, pool: SandboxPool) -> None:
    """Run the user's pre-processor on one batch of source rows, then hand the batch to rollout.

    The pre-processor returns the prompt (a string), a new row (a dict: its `source.field` is the
    prompt), or None to drop the row. An exception becomes an error record for that row."""
    config, record = load_job(ctx, job_id)
    if record.status != "running":
        return
    files = ctx.files(job_id)
    raw = json.loads((files.root / "inputs" / f"{batch_index:06d}.json").read_text())
    outcomes = pool.job(job_id, config).pre_process([item["data"] for item in raw], config.processors.pre_kwargs)
    prepared: list[BatchRow] = []
    dropped = 0
    for item, outcome in zip(raw, outcomes):
        index, data = item["index"], item["data"]
        if outcome.dropped:
            dropped += 1
        elif outcome.status == "error":
            prepared.append(BatchRow(index, None, data, error=_error_dict(outcome.error)))
        elif isinstance(outcome.value, str):
            prepared.append(BatchRow(index, outcome.value, data))
        elif isinstance(outcome.value, dict):
            from spider.data.sources import prompt_of

            try:
                prepared.append(BatchRow(index, prompt_of(outcome.value, config.source.field, index), outcome.value))
            except SpiderError as exc:
                prepared.append(BatchRow(index, None, outcome.value, error={"type": "PreProcessorError", "message": str(exc)}))
        else:
            message = f"the pre-processor returned {type(outcome.value).__name__}; return a str, a dict or None"
            prepared.append(BatchRow(index, None, data, error={"type": "PreProcessorError", "message": message}))
    # The count travels with the batch and is added once, when the batch completes.
    write_atomic(files.root / "batches" / f"{batch_index:06d}.dropped", str(dropped))
    write_atomic(files.batch(batch_index), json.dumps([asdict(r) for r in prepared]))
    ctx.dispatch.rollout(job_id, batch_index)


@guarded
def postprocess_batch(ctx: Context, job_id: str, batch_index: int, pool: SandboxPool) -> None:
    """Run the user's post-processor on one batch of records and write the batch's shard.

    It returns the record to keep (a dict, possibly reshaped) or None to drop it. An exception
    keeps the original record with `error` set to the exception."""
    config, record = load_job(ctx, job_id)
    if record.status != "running":
        return
    files = ctx.files(job_id)
    generated = files.root / "generated" / f"{batch_index:06d}.jsonl"
    records = [json.loads(line) for line in generated.read_text().splitlines() if line.strip()]
    counts = json.loads((files.root / "generated" / f"{batch_index:06d}.counts.json").read_text())
    ok = [r for r in records if r.get("error") is None]
    outcomes = iter(pool.job(job_id, config).post_process(ok, config.processors.post_kwargs)) if ok else iter(())
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
            kept.append({**rec, "error": _error_dict(outcome.error)})
        elif isinstance(outcome.value, dict):
            kept.append(outcome.value)
        else:
            message = f"the post-processor returned {type(outcome.value).__name__}; return a dict or None"
            kept.append({**rec, "error": {"type": "PostProcessorError", "message": message}})
    write_atomic(files.shard(batch_index), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    counts["records"] = len(kept)
    counts["dropped"] = counts.get("dropped", 0) + dropped
    complete_batch(ctx, job_id, batch_index, counts, generation_seconds=counts.pop("generation_seconds", 0.0))


# -- tool calls ---------------------------------------------------------------------------------


def reply_key(call_id: str) -> str:
    return f"spider:tool-reply:{call_id}"


def run_tool_call(ctx: Context, pool: SandboxPool, job_id: str, call_id: str, name: str, arguments: dict[str, Any]) -> None:
    """Run one tool call in the job's sandbox and push its outcome to the caller's reply list."""
    try:
        config, record = load_job(ctx, job_id)
        if record.status in TERMINAL:
            outcome = ToolOutcome(error=CallError("exception", "JobEnded", f"job {job_id} is {record.status}"))
        else:
            outcome = pool.job(job_id, config).call_tool(name, arguments)
    except Exception as exc:
        outcome = ToolOutcome(error=CallError("exception", type(exc).__name__, str(exc)))
    reply = {"content": outcome.content, "error": outcome.error.to_dict() if outcome.error else None}
    pipe = ctx.store.r.pipeline()
    pipe.rpush(reply_key(call_id), json.dumps(reply))
    pipe.expire(reply_key(call_id), 3600)
    pipe.execute()


class ToolCaller:
    """What a rollout loop uses to call the job's tools: each call is a task on the `sandbox`
    queue; the answer comes back on a Redis list the caller waits on (no result backend)."""

    def __init__(self, client: redis.Redis, job_id: str, send: Any):
        self.r = client
        self.job_id = job_id
        self.send = send  # send(job_id, call_id, name, arguments): enqueue the sandbox task

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
            answer = self.r.blpop([reply_key(call_id)], timeout=left)
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
