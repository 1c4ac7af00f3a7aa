"""Recovery: no job is left running with nothing to run it.

A task can be lost (a worker killed between the broker handing it out and recording it as
unacknowledged, or between claiming a job's finalize and enqueueing it) and a job can fail of a
transient fault (a full disk, Redis down). The reconciler looks at every active job that has not
moved for a while; when nothing of it is queued or running, it hands out again whatever the job's
Redis state and files say is missing. `resume` does the same on demand, and brings a failed job
back to running. Every stage is idempotent, so handing out too much only costs duplicate work.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from spider.artifacts import ArtifactPath, artifact_root, remove
from spider.errors import SpiderError
from spider.jobs import dataset, on_policy
from spider.jobs.stages import Context, bundle_manifest, load_job
from spider.jobs.store import JobFiles, JobRecord, is_job_id, write_atomic
from spider.types import EventKind, JobStatus

log = logging.getLogger(__name__)


def reconcile(ctx: Context, still_for: float) -> dict[str, list[str]]:
    """One pass: each active job that has not moved for `still_for` seconds and has nothing queued
    or running gets its missing work handed out. Returns what was handed out, by job."""
    handed: dict[str, list[str]] = {}
    for job_id in ctx.store.still_since(still_for):
        try:
            stages = reconcile_job(ctx, job_id)
        except Exception:
            log.error("reconciling job %s failed", job_id, exc_info=True)
            continue
        if stages:
            handed[job_id] = stages
    return handed


def reconcile_job(ctx: Context, job_id: str) -> list[str]:
    """Hand out again what an active job lacks, unless some stage of it is queued or running."""
    record = ctx.store.get(job_id)
    if record is None or record.status.ended:
        ctx.store.forget_active(job_id)
        return []
    if ctx.dispatcher.holds(job_id):
        ctx.store.touch(job_id)  # alive: look again once it has been still for a while
        return []
    config, _ = load_job(ctx, job_id)
    missing = _missing_training(ctx, job_id, record) if config.generation.on_policy else _missing_dataset(ctx, job_id, record)
    for stage, *args in missing:
        ctx.dispatch(stage, job_id, *args)
    ctx.store.touch(job_id)
    shown = [f"{stage}({', '.join(map(str, args))})" if args else stage for stage, *args in missing]
    log.warning("job %s had nothing queued or running; handed out again: %s", job_id, shown)
    ctx.bus.publish(job_id, EventKind.JOB_RESUMED, f"{len(missing)} lost stages handed out again",
                    level="warning", data={"stages": shown})
    return shown


def _missing_dataset(ctx: Context, job_id: str, record: JobRecord) -> list[tuple[Any, ...]]:
    if record.status == JobStatus.QUEUED or record.batches_total is None:
        return [(dataset.PLAN,)]
    done = ctx.store.done_batches(job_id)
    missing = [i for i in range(record.batches_total) if i not in done]
    if not missing:
        return [(dataset.FINALIZE,)]  # every batch is done: the finalize was lost (it is idempotent)
    files = ctx.files(job_id)
    manifest = bundle_manifest(ctx, job_id) if record.has_bundle else None
    post = manifest is not None and manifest.has_post_processor
    return [(_batch_stage(files, i, post), i) for i in missing]


def _batch_stage(files: JobFiles, index: int, post: bool) -> str:
    """The first stage a batch has not passed, judged by which of its files exist."""
    if post and files.generated(index).exists():
        return dataset.POSTPROCESS
    if files.batch(index).exists():
        return dataset.ROLLOUT
    return dataset.PREPROCESS


def _missing_training(ctx: Context, job_id: str, record: JobRecord) -> list[tuple[Any, ...]]:
    files = ctx.files(job_id)
    if record.status == JobStatus.QUEUED:
        return [(on_policy.START,)]
    if files.train_rows.exists():
        return [(on_policy.TRAIN, on_policy.latest_step(files))]  # a finished run hands out its finalize
    if files.inputs(0).exists():
        return [(on_policy.PREPARE,)]
    return [(on_policy.START,)]


def resume(ctx: Context, job_id: str, secrets: dict[str, str] | None = None) -> list[str]:
    """Bring a job back to work: a failed one goes back to running (with `secrets` given again,
    since a failed job's secrets are dropped) and is re-examined; an active one is re-examined
    now. Counters are recounted from the batches' own statistics. Returns what was handed out."""
    record = ctx.store.get(job_id)
    if record is None:
        raise SpiderError(f"job {job_id} does not exist")
    if record.status in (JobStatus.COMPLETED, JobStatus.CANCELLED):
        raise SpiderError(f"job {job_id} is {record.status}: there is nothing to resume")
    if record.status == JobStatus.FAILED:
        missing = sorted(set(record.secret_names) - set(secrets or {}))
        if missing:
            raise SpiderError(f"resuming job {job_id} needs its secrets again: {', '.join(missing)}")
        ctx.store.set_secrets(job_id, {k: v for k, v in (secrets or {}).items() if k in record.secret_names})
        if not ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.FAILED]):
            raise SpiderError(f"job {job_id} changed status meanwhile; try again")
        ctx.store.set_fields(job_id, error="")
        ctx.store.release_finalize(job_id)
        ctx.bus.publish(job_id, EventKind.JOB_RESUMED, f"resumed after: {record.error}", data={"error": record.error})
    ctx.store.recount(job_id)
    if ctx.dispatcher.holds(job_id):
        return []
    return reconcile_job(ctx, job_id)


# -- the files of jobs Redis no longer knows ------------------------------------------------------


def sweep_files(ctx: Context, grace_s: float = 3600.0) -> dict[str, list[str]]:
    """Look at every job folder whose job Redis does not know: one past its time to live (or with
    no snapshot, older than `grace_s`) is removed; one within it (Redis lost its state: restarted
    without persistence) gets its record back from the snapshot written at submit, `completed` if
    its result is there and `failed` with a message otherwise. Folders younger than `grace_s`
    without a record may be submits in progress and are left alone."""
    outcome: dict[str, list[str]] = {"removed": [], "restored": []}
    folder = JobFiles.folder(artifact_root(ctx.settings))
    if not folder.is_dir():
        return outcome
    now = time.time()
    ttl = ctx.store.ended_ttl
    for entry in folder.iterdir():
        job_id = entry.name
        if not is_job_id(job_id) or ctx.store.status(job_id) is not None:
            continue
        files = ctx.files(job_id)
        if now - _last_write(entry) < grace_s:
            continue
        snapshot = _read_snapshot(files)
        if snapshot is None or (ttl and now - _ended_at(files, snapshot) > ttl):
            remove(entry)
            files.drop_local(files.local.root)
            outcome["removed"].append(job_id)
            continue
        _restore(ctx, job_id, files, snapshot)
        outcome["restored"].append(job_id)
    return outcome


def _last_write(folder: ArtifactPath) -> float:
    """When anything directly in the folder (or the folder itself, on a disk) was last written;
    `now` when that cannot be told, so that the folder is left alone."""
    stamps = []
    for path in [folder, *folder.iterdir()]:
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(stamps) if any(stamps) else time.time()


def _read_snapshot(files: JobFiles) -> dict[str, Any] | None:
    try:
        return json.loads(files.snapshot.read_text())
    except (OSError, ValueError):
        return None


def _ended_at(files: JobFiles, snapshot: dict[str, Any]) -> float:
    """When the job ended, as well as its files tell: its metadata's time, else its creation."""
    try:
        return files.metadata.stat().st_mtime
    except OSError:
        return float(snapshot["created_at"])


def _restore(ctx: Context, job_id: str, files: JobFiles, snapshot: dict[str, Any]) -> None:
    metadata = None
    if files.metadata.exists():
        try:
            metadata = json.loads(files.metadata.read_text())
        except ValueError:
            metadata = None
    ctx.store.create(snapshot["owner"], snapshot["config"], {}, has_bundle=snapshot["has_bundle"], job_id=job_id,
                     created_at=snapshot["created_at"], secret_names=snapshot["secret_names"])
    if snapshot.get("source_upload"):
        ctx.store.set_fields(job_id, source_upload=json.dumps(snapshot["source_upload"]))
    if metadata is not None and not metadata.get("partial") and any(files.root.glob("result.*")):
        counts = metadata.get("counts", {})
        ctx.store.set_fields(job_id, rows_total=counts.get("rows"), batches_total=counts.get("batches"))
        ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED])
        ctx.store.transition(job_id, JobStatus.COMPLETED, [JobStatus.RUNNING])
        ctx.bus.publish(job_id, EventKind.JOB_COMPLETED, "restored from its files after the server lost its state",
                        data={"restored": True, **counts})
    else:
        message = ("the server lost this job's state (its Redis restarted without persistence); "
                   "`spider resume` it (with its secrets) to run it again")
        ctx.store.fail(job_id, message)
        ctx.bus.publish(job_id, EventKind.JOB_FAILED, message, level="error")
    log.warning("job %s restored from its files as %s", job_id, ctx.store.status(job_id))


def write_snapshot(files: JobFiles, record: JobRecord, source_upload: list[str] | None) -> None:
    """What the job's folder needs to have its record back should Redis lose it (never secrets)."""
    write_atomic(files.snapshot, json.dumps({
        "id": record.id, "owner": record.owner, "created_at": record.created_at, "config": record.config,
        "has_bundle": record.has_bundle, "secret_names": record.secret_names, "source_upload": source_upload,
    }))
