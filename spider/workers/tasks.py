"""Celery tasks: each loads what it needs by id and calls a plain function in `spider.jobs`; and
the dispatcher that maps each stage's name to its task and queue."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import redis

from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset, on_policy
from spider.jobs.conversations import TOOL_CALL
from spider.jobs.mcp import MCP_CALL, MCP_LIST
from spider.jobs.stages import Context
from spider.jobs.store import JobStore
from spider.settings import Settings
from spider.workers.app import celery_app


class CeleryDispatcher:
    """Hands each stage to its task on its queue (see STAGES)."""

    def dispatch(self, stage: str, job_id: str, *args: Any) -> None:
        try:
            task, queue = STAGES[stage]
        except KeyError:
            raise SpiderError(f"no task runs the stage {stage!r}") from None
        task.apply_async((job_id, *args), queue=queue)


@lru_cache(maxsize=1)
def context() -> Context:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(client)
    bus = EventBus(client, settings.event_history, ended_ttl=settings.event_ttl_s, keys=store.keys)
    return Context(settings, store, bus, CeleryDispatcher())


_pool_lock = threading.Lock()


@lru_cache(maxsize=1)
def _sandbox_pool():
    from spider.jobs.usercode import SandboxPool

    return SandboxPool(context())


def sandbox_pool():
    """The worker's one SandboxPool (tasks run on several threads: create it exactly once)."""
    with _pool_lock:
        return _sandbox_pool()


def send_tool_call(job_id: str, call_id: str, name: str, arguments: dict) -> None:
    call_tool.apply_async((job_id, call_id, name, arguments), queue="sandbox")


def tool_caller(job_id: str):
    """For rollout loops: call the job's tools on the sandbox workers."""
    from spider.jobs.usercode import ToolCaller

    ctx = context()
    return ToolCaller(ctx.store.r, job_id, send_tool_call, ctx.store.keys)


@celery_app.task(name="spider.plan_job", time_limit=1800, soft_time_limit=1700)
def plan_job(job_id: str) -> None:
    dataset.plan_job(context(), job_id)


@celery_app.task(name="spider.run_batch", time_limit=4 * 3600, soft_time_limit=4 * 3600 - 60)
def run_batch(job_id: str, batch_index: int) -> None:
    dataset.run_batch(context(), job_id, batch_index)


@celery_app.task(name="spider.finalize_job", time_limit=3600, soft_time_limit=3500)
def finalize_job(job_id: str) -> None:
    dataset.finalize_job(context(), job_id)


@celery_app.task(name="spider.finalize_partial", time_limit=3600, soft_time_limit=3500)
def finalize_partial(job_id: str) -> None:
    dataset.finalize_partial(context(), job_id)


@celery_app.task(name="spider.preprocess_batch", time_limit=3600, soft_time_limit=3500)
def preprocess_batch(job_id: str, batch_index: int) -> None:
    dataset.preprocess_batch(context(), job_id, batch_index, sandbox_pool())


@celery_app.task(name="spider.postprocess_batch", time_limit=3600, soft_time_limit=3500)
def postprocess_batch(job_id: str, batch_index: int) -> None:
    dataset.postprocess_batch(context(), job_id, batch_index, sandbox_pool())


@celery_app.task(name="spider.call_tool", time_limit=900, soft_time_limit=890)
def call_tool(job_id: str, call_id: str, name: str, arguments: dict) -> None:
    from spider.jobs import usercode

    usercode.run_tool_call(context(), sandbox_pool(), job_id, call_id, name, arguments)


# An MCP stage may first build the job's venv (up to 600 s), start its server (60 s), then wait
# for the server (MCPServerConfig.timeout_s, at most 3600 s).
@celery_app.task(name="spider.mcp_list", time_limit=4500, soft_time_limit=4450)
def mcp_list(job_id: str, server: str, reply_id: str) -> None:
    from spider.jobs import mcp

    mcp.list_tools(context(), sandbox_pool(), job_id, server, reply_id)


@celery_app.task(name="spider.mcp_call", time_limit=4500, soft_time_limit=4450)
def mcp_call(job_id: str, server: str, reply_id: str, tool: str, arguments: dict) -> None:
    from spider.jobs import mcp

    mcp.call_tool(context(), sandbox_pool(), job_id, server, reply_id, tool, arguments)


@celery_app.task(name="spider.on_policy_start", time_limit=1800, soft_time_limit=1700)
def on_policy_start(job_id: str) -> None:
    on_policy.start_job(context(), job_id)


@celery_app.task(name="spider.on_policy_prepare", time_limit=3600, soft_time_limit=3500)
def on_policy_prepare(job_id: str) -> None:
    on_policy.prepare_job(context(), job_id, sandbox_pool())


# A segment is a few steps (on_policy_options.steps_per_task); its limit is a backstop well
# beyond that, still under the broker's visibility timeout.
@celery_app.task(name="spider.on_policy_train", time_limit=3 * 3600, soft_time_limit=3 * 3600 - 60)
def on_policy_train(job_id: str, start_step: int) -> None:
    on_policy.train_segment(context(), job_id, start_step)


@celery_app.task(name="spider.on_policy_score", time_limit=3600, soft_time_limit=3500)
def on_policy_score(job_id: str, request_id: str) -> None:
    on_policy.score_sequences(context(), job_id, request_id)


@celery_app.task(name="spider.on_policy_finalize", time_limit=3600, soft_time_limit=3500)
def on_policy_finalize(job_id: str) -> None:
    on_policy.finalize_job(context(), job_id)


# Every stage a job can dispatch: its task and the queue of the workers that run it.
STAGES = {
    dataset.PLAN: (plan_job, "control"),
    dataset.PREPROCESS: (preprocess_batch, "sandbox"),
    dataset.ROLLOUT: (run_batch, "rollout"),
    dataset.POSTPROCESS: (postprocess_batch, "sandbox"),
    dataset.FINALIZE: (finalize_job, "control"),
    dataset.FINALIZE_PARTIAL: (finalize_partial, "control"),
    TOOL_CALL: (call_tool, "sandbox"),
    MCP_LIST: (mcp_list, "sandbox"),
    MCP_CALL: (mcp_call, "sandbox"),
    on_policy.START: (on_policy_start, "control"),
    on_policy.PREPARE: (on_policy_prepare, "sandbox"),
    on_policy.TRAIN: (on_policy_train, "train"),
    on_policy.SCORE: (on_policy_score, "rollout"),
    on_policy.FINALIZE: (on_policy_finalize, "train"),
}
