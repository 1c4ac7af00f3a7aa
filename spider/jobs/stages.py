"""What every kind of job is made of: stages that run on workers, a context they share, and a
dispatcher that hands the next stage to whoever runs it.

A stage is a plain function of (context, job id, *arguments) that reads its input by id, writes its
output atomically and dispatches the next stage by name. Recipes (spider.jobs.dataset, ...) are
made of stages; this module knows none of them.
"""

from __future__ import annotations

import errno
import json
import logging
import time
import traceback
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from spider.config import JobConfig, ModelConfig
from spider.engines.loop import Interrupted, engine_loop
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs.store import JobFiles, JobRecord, JobStore
from spider.settings import Settings
from spider.types import ACTIVE_STATUSES, BundleManifest, EventKind, JobStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often work in flight asks whether its job still runs (one HGET each time).
STATUS_POLL_S = 0.5


class Dispatcher(Protocol):
    """Hands a stage of a job to whoever runs it (Celery queues in production, a list in tests).
    Stages are named by their recipe (`dataset.rollout`, ...): a new kind of job adds names, not
    methods."""

    def dispatch(self, stage: str, job_id: str, *args: Any) -> None: ...

    def holds(self, job_id: str) -> bool:
        """Whether some stage of the job is queued or running (the reconciler hands out nothing then)."""
        ...


@dataclass
class Context:
    """What stages share within one process: settings, the job store, the event bus, the dispatcher."""

    settings: Settings
    store: JobStore
    bus: EventBus
    dispatcher: Dispatcher

    def files(self, job_id: str) -> JobFiles:
        return JobFiles.of(self.settings, job_id)

    def dispatch(self, stage: str, job_id: str, *args: Any) -> None:
        self.dispatcher.dispatch(stage, job_id, *args)
        self.store.touch(job_id)


def load_job(ctx: Context, job_id: str) -> tuple[JobConfig, JobRecord]:
    record = ctx.store.get(job_id)
    if record is None:
        raise SpiderError(f"job {job_id} does not exist")
    return JobConfig.model_validate(record.config), record


def bundle_manifest(ctx: Context, job_id: str) -> BundleManifest | None:
    """The manifest of the job's bundle of user code, or None when it sent none."""
    path = ctx.files(job_id).bundle_manifest
    return BundleManifest.from_dict(json.loads(path.read_text())) if path.exists() else None


def fail_job(ctx: Context, job_id: str, message: str) -> None:
    if ctx.store.fail(job_id, message):
        ctx.bus.publish(job_id, EventKind.JOB_FAILED, message, level="error")


def cancel_job(ctx: Context, job_id: str) -> bool:
    """Stop a job: no further stage of it starts, and work in flight (`while_running`) stops
    within STATUS_POLL_S. True if it was active."""
    if ctx.store.transition(job_id, JobStatus.CANCELLED, ACTIVE_STATUSES):
        ctx.store.drop_secrets(job_id)
        ctx.bus.publish(job_id, EventKind.JOB_CANCELLED, "job cancelled", level="warning")
        return True
    return False


class TransientFault(Exception):
    """A stage met a fault that may pass (Redis unreachable, a full or read-only disk, the Hub
    answering 5xx): the stage is tried again later instead of failing its job (see
    spider.workers.tasks), and fails it only once the tries are spent."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.cause = cause


# Disk faults an operator can fix (space, quota, a read-only remount, an I/O error), by errno.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a fault of the infrastructure that may pass, rather than of the job."""
    import redis

    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
        return True
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(("MISCONF", "LOADING", "READONLY")):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if type(exc).__name__ == "HfHubHTTPError" and (status is None or status == 429 or status >= 500):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def while_running(ctx: Context, job_id: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the worker's engine loop for as long as the job runs: once it is cancelled
    (or failed) the coroutine is cancelled, which stops its generation (engines abort their
    requests there), and Interrupted is raised (`guarded` ends the stage quietly on it)."""
    return engine_loop().run_unless(coro, lambda: ctx.store.status(job_id) != JobStatus.RUNNING, STATUS_POLL_S)


class JobLoop:
    """The engine loop as a job's long work uses it: `run(coro)` is `while_running`, so a cancel
    stops what the coroutine is doing (the on-policy loop samples through it)."""

    def __init__(self, ctx: Context, job_id: str):
        self.ctx, self.job_id = ctx, job_id

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return while_running(self.ctx, self.job_id, coro)


def guarded(stage: Callable[..., None]) -> Callable[..., None]:
    """Run a stage; a user-caused error fails the job with its message, a transient fault is
    raised as TransientFault for the task to try again later, anything else fails the job with its
    type and message (the traceback goes to the worker's log only). A stage interrupted because
    its job stopped ends quietly: the job has ended already."""

    def run(ctx: Context, job_id: str, *args: Any) -> None:
        try:
            stage(ctx, job_id, *args)
        except Interrupted:
            log.info("job %s: %s stopped: the job no longer runs", job_id, stage.__name__)
        except SpiderError as exc:
            if is_transient(exc):
                raise TransientFault(stage.__name__, exc) from exc
            fail_job(ctx, job_id, str(exc))
        except Exception as exc:
            if is_transient(exc):
                raise TransientFault(stage.__name__, exc) from exc
            log.error("job %s: %s failed:\n%s", job_id, stage.__name__, traceback.format_exc())
            fail_job(ctx, job_id, f"internal error in {stage.__name__}: {type(exc).__name__}: {exc}")

    run.__name__ = stage.__name__
    run.__doc__ = stage.__doc__
    return run


# Engine keys -> the engine `load_engine` gave for them in this process (weakly: a closed engine
# is never kept alive by this).
_engines: "weakref.WeakValueDictionary[tuple[str, str, str], Any]" = weakref.WeakValueDictionary()


def job_engine(ctx: Context, job_id: str, model: ModelConfig, secrets: dict[str, str]) -> Any:
    """The worker's engine for `model`. When it has to be loaded (which can take minutes), the job
    hears of it through `model.loading` and `model.loaded` events (with the seconds it took); the
    load is never counted as generation time."""
    from spider.engines import engine_key, load_engine, loaded_engines

    key = engine_key(model, secrets)
    known = _engines.get(key)
    if known is not None and any(engine is known for engine in loaded_engines()):
        return load_engine(model, secrets)
    about = {"model": model.name, "provider": model.provider}
    ctx.bus.publish(job_id, EventKind.MODEL_LOADING, f"loading model {model.name!r} ({model.provider})", data=about)
    started = time.perf_counter()
    engine = load_engine(model, secrets)
    seconds = time.perf_counter() - started
    _engines[key] = engine
    ctx.bus.publish(
        job_id, EventKind.MODEL_LOADED, f"model {model.name!r} loaded in {seconds:.1f}s", data={**about, "seconds": seconds}
    )
    return engine
