"""Celery tasks: each loads what it needs by id and calls a plain function in `spider.jobs`; and
the dispatcher that maps each stage's name to its task and queue."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_ready

from spider import faults
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset, on_policy
from spider.jobs.conversations import TOOL_CALL
from spider.jobs.mcp import MCP_CALL, MCP_LIST
from spider.jobs.stages import Context, TransientFault, fail_job
from spider.jobs.store import JobStore
from spider.settings import Settings
from spider.types import EventKind
from spider.workers.app import celery_app

log = logging.getLogger(__name__)


class CeleryDispatcher:
    """Hands each stage to its task on its queue (see STAGES)."""

    def dispatch(self, stage: str, job_id: str, *args: Any) -> None:
        try:
            task, queue = STAGES[stage]
        except KeyError:
            raise SpiderError(f"no task runs the stage {stage!r}") from None
        task.apply_async((job_id, *args), queue=queue)

    def holds(self, job_id: str) -> bool:
        from spider.workers import broker

        conf = celery_app.conf
        options = conf.broker_transport_options or {}
        queues = [q.name for q in conf.task_queues]
        with celery_app.connection_for_read() as connection:
            client = connection.default_channel.client
            return broker.holds(client, job_id, queues, priority_steps=options.get("priority_steps", broker.DEFAULT_PRIORITY_STEPS),
                                sep=options.get("sep", broker.PRIORITY_SEP))


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


def run_stage(task: Any, stage: Any, job_id: str, *args: Any) -> None:
    """Run a stage of a job as a task: a transient fault (TransientFault) tries the task again
    after an exponential backoff with jitter; once the tries are spent the job fails with a
    message saying what happened and how to resume it. A task dropped at a fault point ends."""
    ctx = context()
    try:
        faults.point(f"{task.name}.received", job_id)
        stage(ctx, job_id, *args)
    except faults.Dropped:
        return
    except TransientFault as fault:
        tries, limit = task.request.retries, ctx.settings.task_retries
        if tries >= limit:
            fail_job(ctx, job_id, f"gave up after {tries + 1} tries: {fault}. Once the cause is fixed, "
                                  f"`spider resume {job_id}` carries on where the job stopped")
            return
        delay = retry_delay(tries, ctx.settings.retry_backoff_s)
        log.warning("job %s: %s; trying again in %.1fs (%d/%d)", job_id, fault, delay, tries + 1, limit)
        with contextlib.suppress(Exception):  # Redis may be what is down
            ctx.bus.publish(job_id, EventKind.STAGE_RETRY, f"{fault}; trying again in {delay:.0f}s", level="warning",
                            data={"task": task.name, "try": tries + 1, "of": limit, "delay": delay})
        raise task.retry(countdown=delay, max_retries=limit, exc=fault)


def retry_delay(tries: int, first: float, cap: float = 300.0) -> float:
    """Full-jitter exponential backoff: up to first * 2**tries seconds, at most `cap`, at least half."""
    ceiling = min(cap, first * 2**tries)
    return ceiling / 2 + random.random() * ceiling / 2


@celery_app.task(name="spider.plan_job", bind=True, time_limit=1800, soft_time_limit=1700)
def plan_job(self, job_id: str) -> None:
    run_stage(self, dataset.plan_job, job_id)


@celery_app.task(name="spider.run_batch", bind=True, time_limit=4 * 3600, soft_time_limit=4 * 3600 - 60)
def run_batch(self, job_id: str, batch_index: int) -> None:
    run_stage(self, dataset.run_batch, job_id, batch_index)


@celery_app.task(name="spider.finalize_job", bind=True, time_limit=3600, soft_time_limit=3500)
def finalize_job(self, job_id: str) -> None:
    run_stage(self, dataset.finalize_job, job_id)


@celery_app.task(name="spider.preprocess_batch", bind=True, time_limit=3600, soft_time_limit=3500)
def preprocess_batch(self, job_id: str, batch_index: int) -> None:
    run_stage(self, lambda ctx, *a: dataset.preprocess_batch(ctx, *a, sandbox_pool()), job_id, batch_index)


@celery_app.task(name="spider.postprocess_batch", bind=True, time_limit=3600, soft_time_limit=3500)
def postprocess_batch(self, job_id: str, batch_index: int) -> None:
    run_stage(self, lambda ctx, *a: dataset.postprocess_batch(ctx, *a, sandbox_pool()), job_id, batch_index)


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


@celery_app.task(name="spider.on_policy_start", bind=True, time_limit=1800, soft_time_limit=1700)
def on_policy_start(self, job_id: str) -> None:
    run_stage(self, on_policy.start_job, job_id)


@celery_app.task(name="spider.on_policy_prepare", bind=True, time_limit=3600, soft_time_limit=3500)
def on_policy_prepare(self, job_id: str) -> None:
    run_stage(self, lambda ctx, *a: on_policy.prepare_job(ctx, *a, sandbox_pool()), job_id)


# A segment is a few steps (on_policy_options.steps_per_task); its limit is a backstop well
# beyond that, still under the broker's visibility timeout.
@celery_app.task(name="spider.on_policy_train", bind=True, time_limit=3 * 3600, soft_time_limit=3 * 3600 - 60)
def on_policy_train(self, job_id: str, start_step: int) -> None:
    run_stage(self, on_policy.train_segment, job_id, start_step)


@celery_app.task(name="spider.on_policy_score", time_limit=3600, soft_time_limit=3500)
def on_policy_score(job_id: str, request_id: str) -> None:
    on_policy.score_sequences(context(), job_id, request_id)


@celery_app.task(name="spider.on_policy_finalize", bind=True, time_limit=3600, soft_time_limit=3500)
def on_policy_finalize(self, job_id: str) -> None:
    run_stage(self, on_policy.finalize_job, job_id)


@worker_ready.connect
def start_reconciler(sender: Any = None, **_: Any) -> None:
    """Control workers run the reconciler (one pass at a time across all of them)."""
    queues = {q.name for q in sender.app.amqp.queues.consume_from.values()} if sender is not None else set()
    if "control" in queues:
        from spider.workers.reconciler import Reconciler

        Reconciler(context()).start()


# Every stage a job can dispatch: its task and the queue of the workers that run it.
STAGES = {
    dataset.PLAN: (plan_job, "control"),
    dataset.PREPROCESS: (preprocess_batch, "sandbox"),
    dataset.ROLLOUT: (run_batch, "rollout"),
    dataset.POSTPROCESS: (postprocess_batch, "sandbox"),
    dataset.FINALIZE: (finalize_job, "control"),
    TOOL_CALL: (call_tool, "sandbox"),
    MCP_LIST: (mcp_list, "sandbox"),
    MCP_CALL: (mcp_call, "sandbox"),
    on_policy.START: (on_policy_start, "control"),
    on_policy.PREPARE: (on_policy_prepare, "sandbox"),
    on_policy.TRAIN: (on_policy_train, "train"),
    on_policy.SCORE: (on_policy_score, "rollout"),
    on_policy.FINALIZE: (on_policy_finalize, "train"),
}
