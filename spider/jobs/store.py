"""Job records, progress counters and secrets in Redis; job artifacts on the shared data dir."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import redis

from spider.errors import SpiderError
from spider.keys import DEFAULT_KEYS, Keys, checked_job_id, is_job_id, new_job_id
from spider.settings import job_ttl_s
from spider.types import ACTIVE_STATUSES, BatchStats, JobStatus

__all__ = ["COUNTERS", "DamagedRecord", "JobFiles", "JobRecord", "JobStore", "is_job_id", "new_job_id", "redact", "write_atomic"]

log = logging.getLogger(__name__)

# The job's progress counters: what its batches add up to, as the API shows them.
COUNTERS = ("batches_done",) + BatchStats.COUNTERS

# Every key of a job besides its event stream: the record hash, then its parts (see Keys.job).
JOB_PARTS = ("", "secrets", "progress", "done", "finalize", "train-lease")


# Set the status (ARGV[1]) of job ARGV[2] (record KEYS[1]) only if the current one is among
# ARGV[3..]; returns 1 when it changed. In the same step the server-wide counts follow: the job
# moves between the sets of queued (KEYS[2]) and running (KEYS[3]) jobs, and a job that ends is
# counted in the hash of ended jobs by status (KEYS[4]).
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
local active = {queued = KEYS[2], running = KEYS[3]}
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if active[current] then redis.call('SREM', active[current], ARGV[2]) end
    if active[ARGV[1]] then
      redis.call('SADD', active[ARGV[1]], ARGV[2])
    else
      redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
    end
    return 1
  end
end
return 0
"""


@dataclass
class JobRecord:
    """What the API shows about a job. Secrets are never part of it."""

    id: str
    owner: str
    status: JobStatus
    created_at: float
    config: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    rows_total: int | None = None
    batches_total: int | None = None
    has_bundle: bool = False
    secret_names: list[str] = field(default_factory=list)
    progress: dict[str, float] = field(default_factory=dict)

    @property
    def totals(self) -> BatchStats:
        """What the job's finished batches add up to."""
        return BatchStats.from_dict(self.progress)

    def public(self) -> dict[str, Any]:
        """The API's view of the job (no owner hash, redacted config)."""
        return {
            "job_id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "rows_total": self.rows_total,
            "batches_total": self.batches_total,
            "progress": self.progress,
            "secret_names": self.secret_names,
            "config": redact(self.config),
        }


class DamagedRecord(SpiderError):
    """A job's stored record cannot be read: a field is missing, `config` is not JSON, its status
    is not one Spider knows. `owner` is the record's owner field, when it has one, so that only
    its owner hears that it exists."""

    def __init__(self, job_id: str, owner: str | None, why: str):
        self.job_id = job_id
        self.owner = owner
        super().__init__(f"the stored record of job {job_id} is damaged ({why}) and cannot be read")


def _damage(exc: Exception) -> str:
    """What is wrong with a record, from the error that reading it raised."""
    if isinstance(exc, KeyError):
        return f"its field {exc.args[0]!r} is missing"
    if isinstance(exc, json.JSONDecodeError):
        return "a field that holds JSON does not"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a job config with secret-bearing fields blanked (on_policy_options.api_key)."""
    copy = json.loads(json.dumps(config))
    options = (copy.get("generation") or {}).get("on_policy_options") or {}
    if options.get("api_key"):
        options["api_key"] = "***"
    return copy


class JobStore:
    """All job state that must survive any one process: records, counters, secrets, batch completion.

    Once a job ends, its keys and event stream expire after `ended_ttl` seconds (default
    `$SPIDER_JOB_TTL_S`; 0 keeps them forever); an owner's index drops the ids whose record is gone
    the next time it is listed."""

    def __init__(self, client: redis.Redis, keys: Keys = DEFAULT_KEYS, ended_ttl: int | None = None):
        self.r = client
        self.keys = keys
        self.ended_ttl = job_ttl_s() if ended_ttl is None else ended_ttl
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(redis.Redis.from_url(url, decode_responses=True))

    def _key(self, job_id: str, part: str = "") -> str:
        return self.keys.job(job_id, part)

    def _owner_index(self, owner: str) -> str:
        return self.keys.owner_jobs(owner)

    def create(
        self,
        owner: str,
        config: dict[str, Any],
        secrets: dict[str, str],
        has_bundle: bool,
        job_id: str | None = None,
    ) -> JobRecord:
        """Store a new queued job (record, secrets, owner index entry) in one transaction.
        `job_id` is one from new_job_id(), when the caller needed it before the record existed."""
        job_id = checked_job_id(job_id) if job_id is not None else new_job_id()
        now = time.time()
        record = {
            "id": job_id,
            "owner": owner,
            "status": JobStatus.QUEUED,
            "created_at": now,
            "config": json.dumps(config),
            "has_bundle": int(has_bundle),
            "secret_names": json.dumps(sorted(secrets)),
        }
        pipe = self.r.pipeline()
        pipe.hset(self._key(job_id), mapping=record)
        if secrets:
            pipe.hset(self._key(job_id, "secrets"), mapping=secrets)
        pipe.zadd(self._owner_index(owner), {job_id: now})
        pipe.sadd(self.keys.jobs_in(JobStatus.QUEUED), job_id)
        pipe.execute()
        return self.get(job_id)  # type: ignore[return-value]

    def discard(self, job_id: str, owner: str) -> None:
        """Remove every trace of a job that was never handed out (a submit that failed half-way):
        its record, secrets, counters and owner index entry."""
        self.delete(job_id, owner)

    def delete(self, job_id: str, owner: str) -> None:
        """Remove a job's record, every part of it, its event stream and its owner index entry."""
        pipe = self.r.pipeline()
        pipe.delete(*(self._key(job_id, part) for part in JOB_PARTS), self.keys.events(job_id))
        pipe.zrem(self._owner_index(owner), job_id)
        for status in ACTIVE_STATUSES:
            pipe.srem(self.keys.jobs_in(status), job_id)
        pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when there is none (or `job_id` is not a job id at all)."""
        if not is_job_id(job_id):
            return None
        pipe = self.r.pipeline()
        pipe.hgetall(self._key(job_id))
        pipe.hgetall(self._key(job_id, "progress"))
        raw, progress = pipe.execute()
        if not raw:
            return None

        try:
            return self._record(raw, progress)
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedRecord(job_id, raw.get("owner"), _damage(exc)) from None

    @staticmethod
    def _record(raw: dict[str, str], progress: dict[str, str]) -> JobRecord:
        def num(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) not in (None, "") else None

        return JobRecord(
            id=raw["id"],
            owner=raw["owner"],
            status=JobStatus(raw["status"]),
            created_at=float(raw["created_at"]),
            config=json.loads(raw["config"]),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            error=raw.get("error") or None,
            rows_total=int(raw["rows_total"]) if raw.get("rows_total") else None,
            batches_total=int(raw["batches_total"]) if raw.get("batches_total") else None,
            has_bundle=raw.get("has_bundle") == "1",
            secret_names=json.loads(raw.get("secret_names") or "[]"),
            progress={name: float(progress.get(name, 0)) for name in COUNTERS + ("generation_seconds",)},
        )

    def list_for(self, owner: str, limit: int = 100) -> list[JobRecord]:
        if limit < 1:
            return []
        ids = self.r.zrevrange(self._owner_index(owner), 0, limit - 1)
        jobs: dict[str, JobRecord | None] = {}
        for job_id in ids:
            try:
                jobs[job_id] = self.get(job_id)
            except DamagedRecord as exc:
                # One unreadable record must not hide the owner's other jobs; it stays in the index
                # (GET of it says what is wrong) and the operator hears of it.
                log.error("listing the jobs of owner %s: %s", owner, exc)
        gone = [i for i, job in jobs.items() if job is None]
        if gone:  # their records expired: so do their index entries
            self.r.zrem(self._owner_index(owner), *gone)
        return [job for job in jobs.values() if job is not None]

    def transition(self, job_id: str, to: JobStatus, allowed_from: Iterable[JobStatus]) -> bool:
        """Atomically move a job to status `to` if its current status is one of `allowed_from`."""
        to = JobStatus(to)
        keys = [self._key(job_id), self.keys.jobs_in(JobStatus.QUEUED), self.keys.jobs_in(JobStatus.RUNNING),
                self.keys.jobs_ended()]
        changed = bool(self._transition(keys=keys, args=[to, job_id, *allowed_from]))
        if changed:
            stamp = "started_at" if to == JobStatus.RUNNING else "finished_at" if to.ended else None
            if stamp:
                self.r.hset(self._key(job_id), stamp, time.time())
            if to.ended:
                self._expire(job_id)
        return changed

    def _expire(self, job_id: str) -> None:
        """Give an ended job's keys and event stream their time to live."""
        if not self.ended_ttl:
            return
        pipe = self.r.pipeline()
        for key in [self._key(job_id, part) for part in JOB_PARTS] + [self.keys.events(job_id)]:
            pipe.expire(key, self.ended_ttl)
        pipe.execute()

    def _expire_late(self, key: str, record_ttl: int) -> None:
        """A part written after its job ended (a redelivered batch finishing) expires with the record."""
        if record_ttl > 0:
            self.r.expire(key, record_ttl)

    def status(self, job_id: str) -> JobStatus | None:
        if not is_job_id(job_id):
            return None
        status = self.r.hget(self._key(job_id), "status")
        return JobStatus(status) if status is not None else None

    def set_fields(self, job_id: str, **values: Any) -> None:
        self.r.hset(self._key(job_id), mapping={k: v for k, v in values.items() if v is not None})

    def get_field(self, job_id: str, name: str) -> str | None:
        if not is_job_id(job_id):
            return None
        return self.r.hget(self._key(job_id), name)

    def fail(self, job_id: str, message: str) -> bool:
        """Mark a non-terminal job failed with a message for the user; False if it had already ended."""
        if self.transition(job_id, JobStatus.FAILED, ACTIVE_STATUSES):
            self.r.hset(self._key(job_id), "error", message)
            self.drop_secrets(job_id)
            return True
        return False

    def add_progress(self, job_id: str, stats: BatchStats) -> BatchStats:
        """Add one finished batch to the job's counters; returns the job's totals."""
        pipe = self.r.pipeline()
        key = self._key(job_id, "progress")
        for name, value in stats.counters().items():
            pipe.hincrby(key, name, value)
            pipe.hincrby(self.keys.work_done(), name, value)  # the server-wide totals (/metrics)
        pipe.hincrby(key, "batches_done", 1)
        pipe.hincrby(self.keys.work_done(), "batches_done", 1)
        pipe.hincrbyfloat(key, "generation_seconds", stats.generation_seconds)
        pipe.hincrbyfloat(self.keys.work_done(), "generation_seconds", stats.generation_seconds)
        pipe.hgetall(key)
        pipe.ttl(self._key(job_id))
        *_, totals, record_ttl = pipe.execute()
        self._expire_late(key, record_ttl)
        return BatchStats.from_dict(totals)

    def mark_batch_done(self, job_id: str, batch_index: int) -> tuple[bool, int]:
        """Record a finished batch. Returns (first time this batch finished, batches finished so far)."""
        pipe = self.r.pipeline()
        pipe.sadd(self._key(job_id, "done"), batch_index)
        pipe.scard(self._key(job_id, "done"))
        pipe.ttl(self._key(job_id))
        added, done, record_ttl = pipe.execute()
        self._expire_late(self._key(job_id, "done"), record_ttl)
        return bool(added), int(done)

    def done_batches(self, job_id: str) -> set[int]:
        return {int(i) for i in self.r.smembers(self._key(job_id, "done"))}

    def claim_finalize(self, job_id: str) -> bool:
        """True for exactly one caller: the one that should enqueue finalization."""
        return bool(self.r.set(self._key(job_id, "finalize"), 1, nx=True))

    def secrets(self, job_id: str) -> dict[str, str]:
        return self.r.hgetall(self._key(job_id, "secrets"))

    def drop_secrets(self, job_id: str) -> None:
        self.r.delete(self._key(job_id, "secrets"))


class JobFiles:
    """Where a job's artifacts live under the shared data dir: every path of a job is named here.

    A dataset job's batch goes `inputs/` (source rows, when a pre-processor shapes them) ->
    `batches/` (the rows to generate from) -> `generated/` (records, when a post-processor shapes
    them) -> `shards/` (the batch's final records) -> the merged `result.<format>`."""

    def __init__(self, data_dir: Path, job_id: str):
        self.root = self.folder(data_dir) / checked_job_id(job_id)

    @staticmethod
    def folder(data_dir: Path) -> Path:
        """The folder of every job's folder."""
        return Path(data_dir) / "jobs"

    @property
    def source_dir(self) -> Path:
        """The source files uploaded with the job (record field `source_upload` lists their names)."""
        return self.root / "source"

    @property
    def datasets_cache(self) -> Path:
        """The job's own `datasets` cache while its source loads (removed once the rows are read)."""
        return self.root / "datasets-cache"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.pkl"

    @property
    def bundle_manifest(self) -> Path:
        """The bundle's manifest as JSON (BundleManifest.to_dict), written at submit."""
        return self.root / "bundle.manifest.json"

    def inputs(self, index: int) -> Path:
        """A batch's source rows with their indices, before the pre-processor."""
        return self.root / "inputs" / f"{index:06d}.json"

    def batch(self, index: int) -> Path:
        """A batch's rows as the rollout reads them (BatchRow.to_dict each)."""
        return self.root / "batches" / f"{index:06d}.json"

    def dropped(self, index: int) -> Path:
        """How many of a batch's rows the pre-processor dropped."""
        return self.root / "batches" / f"{index:06d}.dropped"

    def generated(self, index: int) -> Path:
        """A batch's records before the post-processor."""
        return self.root / "generated" / f"{index:06d}.jsonl"

    def generated_stats(self, index: int) -> Path:
        """The statistics of a generated batch (BatchStats.to_dict), completed after post-processing."""
        return self.root / "generated" / f"{index:06d}.counts.json"

    def shard(self, index: int) -> Path:
        return self.root / "shards" / f"{index:06d}.jsonl"

    def result(self, fmt: str) -> Path:
        return self.root / f"result.{fmt}"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    # An on-policy job: its prompts, checkpoints, metrics and the trained adapter.

    @property
    def train_rows(self) -> Path:
        """The prompts it trains on and the held-out ones it evaluates on (JSON)."""
        return self.root / "train" / "rows.json"

    @property
    def checkpoints(self) -> Path:
        """One meta.json per checkpoint (`step-000004.json`: where the trainer state is, the step, counters)."""
        return self.root / "train" / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """The meta.json of the newest checkpoint, copied here atomically once it is whole."""
        return self.root / "train" / "latest.json"

    @property
    def trainer(self) -> Path:
        """The local trainer's own folder: its saved states and the weights each step samples from."""
        return self.root / "train" / "trainer"

    @property
    def metrics(self) -> Path:
        """One JSON line per step (the `train.step` events' data)."""
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        """The exported PEFT adapter folder (model card, tokenizer, chat template)."""
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        """Merged weights (base + adapter), when the job asked for them."""
        return self.root / "merged"

    @property
    def plot(self) -> Path:
        """The training curves as a PNG."""
        return self.root / "metrics.png"

    @property
    def archive(self) -> Path:
        """What an on-policy job's result download is: adapter, metrics and plot in one .tar.gz."""
        return self.root / "result.tar.gz"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either nothing or all of it (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
