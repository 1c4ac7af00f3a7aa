"""Celery tasks: each loads what it needs by id and calls a plain function in `spider.jobs`; and
the dispatcher that maps each stage's name to its task, queue and priority."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

from spider import faults
from spider.config import JobConfig
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset, on_policy
from spider.jobs.conversations import TOOL_CALL
from spider.jobs.mcp import MCP_CALL, MCP_LIST
from spider.jobs.stages import Context, TransientFault, fail_job
from spider.jobs.store import JobStore
from spider.queues import ROLLOUT, WAITED_ON, batch_priority, model_queue
from spider.settings import Settings, routed_models
from spider.types import EventKind
from spider.workers.app import celery_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """How a stage runs: its task, the queue of the workers that run it, and

    * `models`: for a rollout stage, the names of the models its task loads for a job, the one to
      route by first (see ModelRoutes);
    * `batched`: its first argument is a batch index, which sets its priority (batch_priority);
      every other stage goes first (WAITED_ON).
    """

    task: Any
    queue: str
    models: Callable[[JobConfig], list[str]] | None = None
    batched: bool = False

    def priority(self, args: tuple[Any, ...]) -> int:
        return batch_priority(int(args[0])) if self.batched else WAITED_ON


class ModelRoutes:
    """Which queue a job's rollout stage goes to: that of the first of the stage's models that the
    operator routes (SPIDER_ROUTED_MODELS: `spider worker --models` serves them), else `rollout`.

    A batch with a simulated user loads two models on one worker: it goes where its own model is
    served, or where its user's is when only that one is routed (a model an operator routes is
    one that should not be loaded on just any worker). A job's models never change, so they are
    read from its record once per process and job."""

    def __init__(self, routed: tuple[str, ...], store: Callable[[], JobStore]):
        self.routed = frozenset(routed)
        self._store = store
        self._models = lru_cache(maxsize=4096)(self._read_models)

    def queue(self, stage: str, job_id: str) -> str:
        spec = STAGES[stage]
        if not self.routed or spec.models is None:
            return spec.queue
        for name in self._models(stage, job_id):
            if name in self.routed:
                return model_queue(name)
        return spec.queue

    def _read_models(self, stage: str, job_id: str) -> tuple[str, ...]:
        record = self._store().get(job_id)
        if record is None:
            raise SpiderError(f"job {job_id} does not exist")  # not cached: raised, not returned
        return tuple(STAGES[stage].models(JobConfig.model_validate(record.config)))


class CeleryDispatcher:
    """Hands each stage to its task on its queue (see STAGES), with its priority; a rollout stage
    to the queue of its job's model when the operator routes that model (ModelRoutes)."""

    def __init__(self, store: JobStore | None = None, routed: tuple[str, ...] | None = None, app: Celery | None = None):
        # Defaults: this process's SPIDER_ROUTED_MODELS, and its job store, made only when a
        # rollout stage is to be routed (the API makes a dispatcher per request and routes none).
        routed = routed_models() if routed is None else routed
        made = lru_cache(maxsize=1)(lambda: store or JobStore.from_url(Settings.from_env().redis_url))
        self.routes = ModelRoutes(routed, made)
        self.app = app or celery_app

    def dispatch(self, stage: str, job_id: str, *args: Any) -> None:
        try:
            spec = STAGES[stage]
        except KeyError:
            raise SpiderError(f"no task runs the stage {stage!r}") from None
        try:
            queue = self.routes.queue(stage, job_id)
        except SpiderError:
            queue = spec.queue  # a job gone meanwhile: its task finds that out and does nothing
        self.app.send_task(spec.task.name, (job_id, *args), queue=queue, priority=spec.priority(args))

    def holds(self, job_id: str) -> bool:
        from spider.workers import broker

        queues = [q.name for q in self.app.conf.task_queues]
        with self.app.connection_for_read() as connection:
            return broker.holds(connection.default_channel.client, job_id, queues)


@lru_cache(maxsize=1)
def context() -> Context:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(client)
    bus = EventBus(client, settings.event_history, ended_ttl=settings.event_ttl_s, keys=store.keys)
    return Context(settings, store, bus, CeleryDispatcher(store, settings.routed_models))


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


@celery_app.task(name="spider.finalize_partial", bind=True, time_limit=3600, soft_time_limit=3500)
def finalize_partial(self, job_id: str) -> None:
    run_stage(self, dataset.finalize_partial, job_id)


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


def rollout_models(config: JobConfig) -> list[str]:
    """A dataset batch loads the job's model, and its simulated user's when it has one."""
    user = config.generation.user
    return [config.model.name] + ([user.model.name] if user is not None else [])


def teacher_models(config: JobConfig) -> list[str]:
    """Teacher scoring loads the on-policy job's teacher."""
    options = config.generation.on_policy_options
    return [options.teacher.name] if options is not None else []


# Every stage a job can dispatch: its task, the queue of the workers that run it, and what routes
# and orders it.
STAGES = {
    dataset.PLAN: Stage(plan_job, "control"),
    dataset.PREPROCESS: Stage(preprocess_batch, "sandbox", batched=True),
    dataset.ROLLOUT: Stage(run_batch, ROLLOUT, models=rollout_models, batched=True),
    dataset.POSTPROCESS: Stage(postprocess_batch, "sandbox", batched=True),
    dataset.FINALIZE: Stage(finalize_job, "control"),
    dataset.FINALIZE_PARTIAL: Stage(finalize_partial, "control"),
    TOOL_CALL: Stage(call_tool, "sandbox"),
    MCP_LIST: Stage(mcp_list, "sandbox"),
    MCP_CALL: Stage(mcp_call, "sandbox"),
    on_policy.START: Stage(on_policy_start, "control"),
    on_policy.PREPARE: Stage(on_policy_prepare, "sandbox"),
    on_policy.TRAIN: Stage(on_policy_train, "train"),
    on_policy.SCORE: Stage(on_policy_score, ROLLOUT, models=teacher_models),
    on_policy.FINALIZE: Stage(on_policy_finalize, "train"),
}
