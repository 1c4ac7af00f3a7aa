"""What a job keeps once it ends, and deleting a job outright.

A completed job keeps its result, metadata and (for a training job) its exported adapter, metrics
and last checkpoint; what only led there is removed unless `output.keep_intermediate` asks to keep
it. Its Redis state expires by itself (JobStore.ended_ttl); `delete_job` removes everything now.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from spider.artifacts import ArtifactPath, remove
from spider.config import JobConfig
from spider.jobs.stages import Context, cancel_job
from spider.jobs.store import JobFiles
from spider.types import JobStatus

log = logging.getLogger(__name__)


def intermediate_paths(files: JobFiles) -> list[ArtifactPath]:
    """A job's files on the way to its result: batches in each of their forms, the source copy and
    the `datasets` cache it was read with."""
    root = files.root
    return [root / "inputs", root / "batches", root / "generated", root / "shards", files.source_dir,
            files.datasets_cache]


def remove_intermediate(files: JobFiles) -> None:
    """Remove a finished dataset job's intermediate files."""
    for path in intermediate_paths(files):
        remove(path)


def remove_training_intermediate(files: JobFiles) -> None:
    """Remove a finished training job's intermediate files: its prompts' copies, the checkpoints
    before the last, and in the trainer's folder everything but the last checkpoint's state."""
    from spider.jobs.on_policy import trainer_folder

    remove_intermediate(files)
    last = json.loads(files.latest_checkpoint.read_text()) if files.latest_checkpoint.exists() else None
    if files.checkpoints.exists():
        for meta in files.checkpoints.glob("step-*.json"):
            if last is None or int(meta.stem.split("-")[1]) != int(last["step"]):
                meta.unlink(missing_ok=True)
    kept = trainer_folder(files, last, "state") if last is not None else None
    if files.trainer.exists():
        _prune(files.trainer, kept.split("/") if kept is not None else [])


def _prune(folder: ArtifactPath, kept: list[str]) -> None:
    """Remove what is in `folder` except the path `kept` (its parts) and the folders that lead to it."""
    for entry in folder.iterdir():
        if kept and entry.name == kept[0] and len(kept) > 1 and entry.is_dir() and not _is_link(entry):
            _prune(entry, kept[1:])
        elif not (kept and entry.name == kept[0] and len(kept) == 1):
            remove(entry)


def _is_link(path: ArtifactPath) -> bool:
    return isinstance(path, Path) and path.is_symlink()


def after_finalize(ctx: Context, job_id: str, config: JobConfig, ended: JobStatus = JobStatus.COMPLETED) -> None:
    """Remove a job's intermediate files once it ended as `ended` (completed, or cancelled once its
    partial result is written), unless the job asked to keep them. Safe to run twice; a job in
    another state (cancelled while finalizing) is left as it is."""
    if config.output.keep_intermediate or ctx.store.status(job_id) != ended:
        return
    files = ctx.files(job_id)
    if config.generation.on_policy:
        remove_training_intermediate(files)
    else:
        remove_intermediate(files)


def delete_job(ctx: Context, job_id: str) -> bool:
    """Remove a job: cancel it if it still runs, then its record, keys, event stream and files.
    False when there was no such job."""
    record = ctx.store.get(job_id)
    if record is None:
        return False
    if not record.status.ended:
        cancel_job(ctx, job_id)
    ctx.store.delete(job_id, record.owner)
    files = ctx.files(job_id)
    remove(files.root)
    files.drop_local(files.local.root)
    log.info("job %s deleted", job_id)
    return True
