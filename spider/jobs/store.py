"""Job records, progress counters and secrets in Redis; job artifacts on the shared data dir."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import redis

from spider.artifacts import ArtifactPath, StorePath, artifact_root, remove, write_atomic
from spider.errors import SpiderError
from spider.keys import DEFAULT_KEYS, Keys, checked_job_id, is_job_id, new_job_id
from spider.settings import Settings, job_ttl_s
from spider.types import ACTIVE_STATUSES, BatchStats, JobStatus

__all__ = ["COUNTERS", "DamagedRecord", "JobFiles", "JobRecord", "JobStore", "is_job_id", "new_job_id", "redact", "write_atomic"]

log = logging.getLogger(__name__)

# The job's progress counters: what its batches add up to, as the API shows them.
COUNTERS = ("batches_done",) + BatchStats.COUNTERS

# Every key of a job besides its event stream: the record hash, then its parts (see Keys.job).
JOB_PARTS = ("", "secrets", "progress", "done", "batch-stats", "finalize", "train-lease")


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

# Record a finished batch once, in one step: its index joins the done set, its statistics are kept
# by index (so the totals can always be recounted) and added to the job's counters. A crash can
# only come before or after this, never half-way. KEYS: done, batch-stats, progress, record, and
# the server-wide totals (/metrics).
# ARGV: index, stats JSON, generation seconds, then counter name/value pairs. Returns
# {1 if this call recorded it, batches done, the counters as a flat list}.
_COMPLETE_BATCH = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  for i = 4, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
  end
  redis.call('HINCRBY', KEYS[3], 'batches_done', 1)
  redis.call('HINCRBYFLOAT', KEYS[3], 'generation_seconds', ARGV[3])
  redis.call('HINCRBY', KEYS[5], 'batches_done', 1)
  redis.call('HINCRBYFLOAT', KEYS[5], 'generation_seconds', ARGV[3])
  local ttl = redis.call('TTL', KEYS[4])
  if ttl > 0 then
    for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return {added, redis.call('SCARD', KEYS[1]), redis.call('HGETALL', KEYS[3])}
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
        self._complete_batch = client.register_script(_COMPLETE_BATCH)

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
        created_at: float | None = None,
        secret_names: list[str] | None = None,
    ) -> JobRecord:
        """Store a new queued job (record, secrets, owner index entry) in one transaction.
        `job_id` is one from new_job_id(), when the caller needed it before the record existed;
        `created_at` and `secret_names` are given when a record is restored from the job's files."""
        job_id = checked_job_id(job_id) if job_id is not None else new_job_id()
        now = created_at if created_at is not None else time.time()
        record = {
            "id": job_id,
            "owner": owner,
            "status": JobStatus.QUEUED,
            "created_at": now,
            "config": json.dumps(config),
            "has_bundle": int(has_bundle),
            "secret_names": json.dumps(sorted(secrets) if secret_names is None else sorted(secret_names)),
        }
        pipe = self.r.pipeline()
        pipe.hset(self._key(job_id), mapping=record)
        if secrets:
            pipe.hset(self._key(job_id, "secrets"), mapping=secrets)
        pipe.zadd(self._owner_index(owner), {job_id: now})
        pipe.zadd(self.keys.active_jobs(), {job_id: now})
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
        pipe.zrem(self.keys.active_jobs(), job_id)
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
                self.r.zrem(self.keys.active_jobs(), job_id)
                self._expire(job_id)
            else:
                self.touch(job_id, only_active=False)
        return changed

    # -- what is active, and whether it moves ----------------------------------------------------

    def touch(self, job_id: str, only_active: bool = True) -> None:
        """Note that an active job just moved (a stage dispatched or a batch completed): the
        reconciler only looks at jobs that have not moved for a while."""
        if only_active:
            self.r.zadd(self.keys.active_jobs(), {job_id: time.time()}, xx=True)
        else:
            self.r.zadd(self.keys.active_jobs(), {job_id: time.time()})

    def active_ids(self) -> list[str]:
        """Every queued or running job, oldest move first."""
        return list(self.r.zrange(self.keys.active_jobs(), 0, -1))

    def still_since(self, seconds: float) -> list[str]:
        """The active jobs that have not moved for `seconds`."""
        return list(self.r.zrangebyscore(self.keys.active_jobs(), "-inf", time.time() - seconds))

    def forget_active(self, job_id: str) -> None:
        """Drop a job from the active index (its record is gone, or it ended meanwhile)."""
        self.r.zrem(self.keys.active_jobs(), job_id)

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

    def complete_batch(self, job_id: str, batch_index: int, stats: BatchStats) -> tuple[bool, int, BatchStats]:
        """Record a finished batch and add its statistics to the job's counters, atomically.
        Returns (first time this batch finished, batches finished so far, the job's totals);
        a redelivered batch changes nothing."""
        counters = [item for pair in stats.counters().items() for item in pair]
        added, done, flat = self._complete_batch(
            keys=[self._key(job_id, "done"), self._key(job_id, "batch-stats"), self._key(job_id, "progress"),
                  self._key(job_id), self.keys.work_done()],
            args=[batch_index, json.dumps(stats.to_dict()), stats.generation_seconds, *counters],
        )
        totals = dict(zip(flat[::2], flat[1::2]))
        if added:
            self.touch(job_id)
        return bool(added), int(done), BatchStats.from_dict(totals)

    def recount(self, job_id: str) -> BatchStats:
        """Recompute the job's counters from the statistics of its finished batches, and store them."""
        per_batch = self.r.hgetall(self._key(job_id, "batch-stats"))
        done = self.done_batches(job_id)
        totals = BatchStats()
        for index, raw in per_batch.items():
            if int(index) not in done:
                continue
            stats = BatchStats.from_dict(json.loads(raw))
            for name in BatchStats.COUNTERS:
                setattr(totals, name, getattr(totals, name) + getattr(stats, name))
            totals.generation_seconds += stats.generation_seconds
        key = self._key(job_id, "progress")
        pipe = self.r.pipeline()
        pipe.delete(key)
        pipe.hset(key, mapping={**totals.counters(), "batches_done": len(done),
                                "generation_seconds": totals.generation_seconds})
        pipe.execute()
        return totals

    def done_batches(self, job_id: str) -> set[int]:
        return {int(i) for i in self.r.smembers(self._key(job_id, "done"))}

    def claim_finalize(self, job_id: str) -> bool:
        """True for exactly one caller: the one that should enqueue finalization. (Should that
        caller die before it does, the reconciler enqueues it: finalize is idempotent.)"""
        return bool(self.r.set(self._key(job_id, "finalize"), 1, nx=True))

    def release_finalize(self, job_id: str) -> None:
        """Let the job's finalize be claimed again (a failed job resumed)."""
        self.r.delete(self._key(job_id, "finalize"))

    def set_secrets(self, job_id: str, secrets: dict[str, str]) -> None:
        """Give a job its secrets again (a failed job resumed: they were dropped when it failed)."""
        pipe = self.r.pipeline()
        pipe.delete(self._key(job_id, "secrets"))
        if secrets:
            pipe.hset(self._key(job_id, "secrets"), mapping=secrets)
        pipe.execute()

    def secrets(self, job_id: str) -> dict[str, str]:
        return self.r.hgetall(self._key(job_id, "secrets"))

    def drop_secrets(self, job_id: str) -> None:
        self.r.delete(self._key(job_id, "secrets"))


class JobFiles:
    """Where a job's artifacts live in the artifact store (the data dir, or a bucket: see
    spider.artifacts): every path of a job is named here.

    A dataset job's batch goes `inputs/` (source rows, when a pre-processor shapes them) ->
    `batches/` (the rows to generate from) -> `generated/` (records, when a post-processor shapes
    them) -> `shards/` (the batch's final records) -> the merged `result.<format>`.

    `local` names the same files on this process's own disk (under its data dir), for what must
    be a real file: source files `datasets` reads, the trainer's working folder, an export. With
    artifacts in the data dir itself it is this very object, and nothing is ever copied."""

    def __init__(self, data_dir: ArtifactPath, job_id: str, local_dir: Path | None = None):
        self.root = self.folder(data_dir) / checked_job_id(job_id)
        local = JobFiles(local_dir, job_id) if local_dir is not None else None
        self.local: JobFiles = self if local is None or local.root == self.root else local

    @classmethod
    def of(cls, settings: Settings, job_id: str) -> "JobFiles":
        """The job's files in the store `settings` name, with local copies under its data dir."""
        return cls(artifact_root(settings), job_id, Path(settings.data_dir))

    @staticmethod
    def folder(data_dir: ArtifactPath) -> ArtifactPath:
        """The folder of every job's folder."""
        return (data_dir if isinstance(data_dir, StorePath) else Path(data_dir)) / "jobs"

    @property
    def is_remote(self) -> bool:
        """Whether the store is elsewhere than this disk (its files reach here only as copies)."""
        return self.local is not self

    def drop_local(self, *paths: Path) -> None:
        """Remove local copies (`paths`, under `local.root`) once the store has what they held,
        then the job's local folder if nothing else is left in it. Nothing happens when the store
        is this disk: there, the copies are the artifacts."""
        if not self.is_remote:
            return
        for path in paths:
            remove(path)
        folder = self.local.root
        for parent in sorted({p.parent for p in paths if p.parent != folder}, key=lambda p: -len(p.parts)):
            _remove_if_empty(parent)
        _remove_if_empty(folder)

    @property
    def source_dir(self) -> ArtifactPath:
        """The source files uploaded with the job (record field `source_upload` lists their names)."""
        return self.root / "source"

    @property
    def datasets_cache(self) -> Path:
        """The job's own `datasets` cache while its source loads (removed once the rows are read):
        always on this process's disk."""
        return self.local.root / "datasets-cache"

    @property
    def snapshot(self) -> ArtifactPath:
        """The job's record as submitted, without secrets: what brings the record back should
        Redis lose it (spider.jobs.recovery.sweep_files)."""
        return self.root / "job.json"

    @property
    def bundle(self) -> ArtifactPath:
        return self.root / "bundle.pkl"

    @property
    def bundle_manifest(self) -> ArtifactPath:
        """The bundle's manifest as JSON (BundleManifest.to_dict), written at submit."""
        return self.root / "bundle.manifest.json"

    def inputs(self, index: int) -> ArtifactPath:
        """A batch's source rows with their indices, before the pre-processor."""
        return self.root / "inputs" / f"{index:06d}.json"

    def batch(self, index: int) -> ArtifactPath:
        """A batch's rows as the rollout reads them (BatchRow.to_dict each)."""
        return self.root / "batches" / f"{index:06d}.json"

    def dropped(self, index: int) -> ArtifactPath:
        """How many of a batch's rows the pre-processor dropped."""
        return self.root / "batches" / f"{index:06d}.dropped"

    def generated(self, index: int) -> ArtifactPath:
        """A batch's records before the post-processor."""
        return self.root / "generated" / f"{index:06d}.jsonl"

    def generated_stats(self, index: int) -> ArtifactPath:
        """The statistics of a generated batch (BatchStats.to_dict), completed after post-processing."""
        return self.root / "generated" / f"{index:06d}.counts.json"

    def shard(self, index: int) -> ArtifactPath:
        return self.root / "shards" / f"{index:06d}.jsonl"

    def result(self, fmt: str) -> ArtifactPath:
        return self.root / f"result.{fmt}"

    @property
    def metadata(self) -> ArtifactPath:
        return self.root / "metadata.json"

    # An on-policy job: its prompts, checkpoints, metrics and the trained adapter.

    @property
    def train_rows(self) -> ArtifactPath:
        """The prompts it trains on and the held-out ones it evaluates on (JSON)."""
        return self.root / "train" / "rows.json"

    @property
    def checkpoints(self) -> ArtifactPath:
        """One meta.json per checkpoint (`step-000004.json`: where the trainer state is, the step, counters)."""
        return self.root / "train" / "checkpoints"

    @property
    def latest_checkpoint(self) -> ArtifactPath:
        """The meta.json of the newest checkpoint, copied here atomically once it is whole."""
        return self.root / "train" / "latest.json"

    @property
    def trainer(self) -> ArtifactPath:
        """The local trainer's own folder: its saved states and the weights each step samples from.
        The trainer works in `local.trainer`; each checkpoint's folders are published here."""
        return self.root / "train" / "trainer"

    @property
    def metrics(self) -> ArtifactPath:
        """One JSON line per step (the `train.step` events' data)."""
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> ArtifactPath:
        """The exported PEFT adapter folder (model card, tokenizer, chat template)."""
        return self.root / "adapter"

    @property
    def merged(self) -> ArtifactPath:
        """Merged weights (base + adapter), when the job asked for them."""
        return self.root / "merged"

    @property
    def plot(self) -> ArtifactPath:
        """The training curves as a PNG."""
        return self.root / "metrics.png"

    @property
    def archive(self) -> ArtifactPath:
        """What an on-policy job's result download is: adapter, metrics and plot in one .tar.gz."""
        return self.root / "result.tar.gz"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another process of this machine works on the job), or gone
        pass
