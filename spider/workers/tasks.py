"""Celery tasks: each loads what it needs by id and calls a plain function in `spider.jobs`; and
the dispatcher that maps each stage's name to its task, queue and priority."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery

from spider.config import JobConfig
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset, on_policy
from spider.jobs.conversations import TOOL_CALL
from spider.jobs.mcp import MCP_CALL, MCP_LIST
from spider.jobs.stages import Context
from spider.jobs.store import JobStore
from spider.settings import Settings, routed_models
from spider.queues import ROLLOUT, WAITED_ON, batch_priority, model_queue
from spider.workers.app import celery_app


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


@celery_app.task(name="spider.plan_job", time_limit=1800, soft_time_limit=1700)
def plan_job(job_id: str) -> None:
    dataset.plan_job(context(), job_id)


@celery_app.task(name="spider.run_batch", time_limit=4 * 3600, soft_time_limit=4 * 3600 - 60)
def run_batch(job_id: str, batch_index: int) -> None:
    dataset.run_batch(context(), job_id, batch_index)


@celery_app.task(name="spider.finalize_job", time_limit=3600, soft_time_limit=3500)
def finalize_job(job_id: str) -> None:
    dataset.finalize_job(context(), job_id)


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
    TOOL_CALL: Stage(call_tool, "sandbox"),
    MCP_LIST: Stage(mcp_list, "sandbox"),
    MCP_CALL: Stage(mcp_call, "sandbox"),
    on_policy.START: Stage(on_policy_start, "control"),
    on_policy.PREPARE: Stage(on_policy_prepare, "sandbox"),
    on_policy.TRAIN: Stage(on_policy_train, "train"),
    on_policy.SCORE: Stage(on_policy_score, ROLLOUT, models=teacher_models),
    on_policy.FINALIZE: Stage(on_policy_finalize, "train"),
}
