"""Server-side settings, read from the environment: one place for every knob the processes share."""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class Settings:
    """What the API and the workers need to find each other.

    `data_dir` holds job artifacts (batches, shards, results). Every worker and the API must see
    the same directory: on several machines, mount shared storage there (NFS, a shared volume).
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = field(default_factory=lambda: cache_dir() / "data")
    api_keys: tuple[str, ...] = ()
    max_bundle_bytes: int = 64 * 1024 * 1024
    event_history: int = 10_000
    # How long an ended job's record, counters and secrets are kept, and its event history (seconds;
    # 0 for forever). The events never outlive the record.
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    event_ttl_s: int = DEFAULT_JOB_TTL_S
    visibility_timeout: int = 4 * 3600
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
            api_keys=tuple(keys),
            max_bundle_bytes=int(os.environ.get("SPIDER_MAX_BUNDLE_BYTES", cls.max_bundle_bytes)),
            job_ttl_s=job_ttl_s(),
            event_ttl_s=event_ttl_s(job_ttl_s()),
            visibility_timeout=int(os.environ.get("SPIDER_VISIBILITY_TIMEOUT", cls.visibility_timeout)),
            policy=Policy.from_env(),
            metrics_token=os.environ.get("SPIDER_METRICS_TOKEN") or None,
        )
