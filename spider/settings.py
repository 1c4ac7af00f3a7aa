"""Server-side settings, read from the environment: one place for every knob the processes share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spider.policy import Policy


def cache_dir() -> Path:
    """Spider's cache root (`$SPIDER_CACHE_DIR`, default `~/.cache/spider`): models, venvs."""
    return Path(os.environ.get("SPIDER_CACHE_DIR") or Path.home() / ".cache" / "spider")


DEFAULT_JOB_TTL_S = 30 * 24 * 3600


def job_ttl_s() -> int:
    """How long an ended job's Redis state is kept (`$SPIDER_JOB_TTL_S`, seconds; 0 keeps it forever)."""
    return int(os.environ.get("SPIDER_JOB_TTL_S", DEFAULT_JOB_TTL_S))


def event_ttl_s(job_ttl: int) -> int:
    """How long an ended job's event history is kept (`$SPIDER_EVENT_TTL_S`, default the job's own
    time): never longer than its record, since nobody can read the events of a job that is gone."""
    events = int(os.environ.get("SPIDER_EVENT_TTL_S", job_ttl))
    if job_ttl and (events == 0 or events > job_ttl):
        return job_ttl
    return events


def routed_models(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The model names that get a rollout queue of their own (`$SPIDER_ROUTED_MODELS` in `env`,
    default this process's: comma-separated, exactly as jobs write `model.name`), each once, in
    the order given."""
    env = os.environ if env is None else env
    names = (name.strip() for name in env.get("SPIDER_ROUTED_MODELS", "").split(","))
    return tuple(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class Settings:
    """What the API and the workers need to find each other.

    `data_dir` holds job artifacts (batches, shards, results). Every worker and the API must see
    the same directory: on several machines, mount shared storage there (NFS, a shared volume), or
    set `data_url` to an S3-compatible bucket (`s3://bucket/prefix`; `s3_endpoint_url` for a store
    other than AWS): the artifacts live there, and `data_dir` keeps only each process's local
    copies of a job's files while it works on them (see spider.artifacts).
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = field(default_factory=lambda: cache_dir() / "data")
    data_url: str | None = None
    s3_endpoint_url: str | None = None
    api_keys: tuple[str, ...] = ()
    max_bundle_bytes: int = 64 * 1024 * 1024
    event_history: int = 10_000
    # How long an ended job's record, counters and secrets are kept, and its event history (seconds;
    # 0 for forever). The events never outlive the record.
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    event_ttl_s: int = DEFAULT_JOB_TTL_S
    visibility_timeout: int = 4 * 3600
    # The reconciler (spider.workers.reconciler): how often it looks, how long an active job must
    # have been still to be re-examined, how often job folders Redis does not know are swept, and
    # how old such a folder must be first (a younger one may be a submit in progress).
    reconcile_interval_s: float = 30.0
    reconcile_after_s: float = 120.0
    sweep_interval_s: float = 3600.0
    sweep_grace_s: float = 3600.0
    # A stage that meets a transient fault is tried again this many times, after a backoff that
    # starts at retry_backoff_s and doubles (with jitter, at most 300 s).
    task_retries: int = 8
    retry_backoff_s: float = 5.0
    # The models whose jobs go to a rollout queue of their own, served by the workers started with
    # `spider worker --models NAME` (see spider.workers.app.model_queue); every other job's batches
    # go to `rollout`. Only the operator names them, so the number of queues stays theirs to bound.
    routed_models: tuple[str, ...] = ()
    policy: Policy = field(default_factory=Policy)
    # The bearer token /metrics wants (SPIDER_METRICS_TOKEN); None: /metrics answers everyone.
    metrics_token: str | None = None

    @classmethod
    def from_env(cls) -> "Settings":
        keys = [k.strip() for k in os.environ.get("SPIDER_API_KEYS", "").split(",") if k.strip()]
        keys_file = os.environ.get("SPIDER_API_KEYS_FILE")
        if keys_file:
            keys += [line.strip() for line in Path(keys_file).read_text().splitlines() if line.strip()]
        return cls(
            redis_url=os.environ.get("SPIDER_REDIS_URL", cls.redis_url),
            data_dir=Path(os.environ.get("SPIDER_DATA_DIR") or cache_dir() / "data"),
            data_url=os.environ.get("SPIDER_DATA_URL") or None,
            s3_endpoint_url=os.environ.get("SPIDER_S3_ENDPOINT_URL") or None,
            api_keys=tuple(keys),
            max_bundle_bytes=int(os.environ.get("SPIDER_MAX_BUNDLE_BYTES", cls.max_bundle_bytes)),
            job_ttl_s=job_ttl_s(),
            event_ttl_s=event_ttl_s(job_ttl_s()),
            visibility_timeout=int(os.environ.get("SPIDER_VISIBILITY_TIMEOUT", cls.visibility_timeout)),
            reconcile_interval_s=float(os.environ.get("SPIDER_RECONCILE_INTERVAL_S", cls.reconcile_interval_s)),
            reconcile_after_s=float(os.environ.get("SPIDER_RECONCILE_AFTER_S", cls.reconcile_after_s)),
            sweep_interval_s=float(os.environ.get("SPIDER_SWEEP_INTERVAL_S", cls.sweep_interval_s)),
            sweep_grace_s=float(os.environ.get("SPIDER_SWEEP_GRACE_S", cls.sweep_grace_s)),
            task_retries=int(os.environ.get("SPIDER_TASK_RETRIES", cls.task_retries)),
            retry_backoff_s=float(os.environ.get("SPIDER_RETRY_BACKOFF_S", cls.retry_backoff_s)),
            routed_models=routed_models(),
            policy=Policy.from_env(),
            metrics_token=os.environ.get("SPIDER_METRICS_TOKEN") or None,
        )
