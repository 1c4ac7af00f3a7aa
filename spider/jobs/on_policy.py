"""An on-policy distillation job, stage by stage: start, (prepare), train segments, finalize.

* `on_policy.start` (control): load the source, keep `eval_rows` held-out prompts, write the
  prompts (or hand them to the pre-processor on the sandbox queue: `on_policy.prepare`), start
  the first training segment.
* `on_policy.train` (train): up to `steps_per_task` steps from the newest checkpoint, then a
  checkpoint and the next segment. A segment is idempotent by step number: a redelivered one
  resumes from the checkpoint and never trains a step twice, and a lease in Redis keeps a second
  delivery of a running segment from training beside it. The trainer stays warm in the worker
  process between segments.
* `on_policy.score` (rollout): the teacher's log-probs of token sequences, when the teacher runs
  on rollout workers (`teacher_in_process: false`) instead of in the train worker.
* `on_policy.finalize` (train): export the adapter (and merged weights when asked), the metrics
  and their plot, upload to the Hub when asked, complete the job.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spider.artifacts import fetch, publish, remove, staged
from spider.config import JobConfig
from spider.errors import SpiderError
from spider.jobs import retention
from spider.jobs.stages import Context, JobLoop, bundle_manifest, guarded, job_engine, load_job
from spider.jobs.store import JobFiles, write_atomic
from spider.train.backends import EXPORT_SCRATCH
from spider.types import BatchRow, EventKind, JobStatus

log = logging.getLogger(__name__)

START = "on_policy.start"
PREPARE = "on_policy.prepare"
TRAIN = "on_policy.train"
SCORE = "on_policy.score"
FINALIZE = "on_policy.finalize"


# -- start --------------------------------------------------------------------------------------


@guarded
def start_job(ctx: Context, job_id: str) -> None:
    """Load the source, split off the held-out prompts, and start training (or the pre-processor)."""
    from spider.jobs.dataset import load_job_source

    config, record = load_job(ctx, job_id)
    files = ctx.files(job_id)
    if record.status == JobStatus.RUNNING and (files.train_rows.exists() or record.rows_total is not None):
        _continue(ctx, job_id, files)  # a redelivered start
        return
    if not ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED, JobStatus.RUNNING]):
        return  # cancelled before it started, or already ended
    ctx.bus.publish(job_id, EventKind.JOB_STARTED, f"loading source {config.source.dataset!r}")
    rows = load_job_source(ctx, job_id, config)
    options = config.generation.on_policy_options
    if len(rows) <= options.eval_rows:
        raise SpiderError(
            f"the source has {len(rows)} rows and on_policy_options.eval_rows holds out {options.eval_rows}: "
            "nothing is left to train on"
        )
    ctx.store.set_fields(job_id, rows_total=len(rows))
    manifest = bundle_manifest(ctx, job_id) if record.has_bundle else None
    if manifest is not None and manifest.has_pre_processor:
        write_atomic(files.inputs(0), json.dumps([{"index": i, "data": row} for i, row in enumerate(rows)]))
        ctx.dispatch(PREPARE, job_id)
        return
    prepared = [_prepare(config, i, row) for i, row in enumerate(rows)]
    _write_prompts(ctx, job_id, config, prepared)


@guarded
def prepare_job(ctx: Context, job_id: str, pool: Any) -> None:
    """Run the user's pre-processor over the source rows (sandbox workers), then start training."""
    from spider.jobs import usercode

    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        return
    files = ctx.files(job_id)
    raw = json.loads(files.inputs(0).read_text())
    prepared, _dropped = usercode.pre_process_rows(pool.job(job_id, config), config, raw)
    _write_prompts(ctx, job_id, config, prepared)


def _prepare(config: JobConfig, index: int, data: dict[str, Any]) -> BatchRow:
    from spider.data.sources import start_of

    prompt, conversation = start_of(data, config.source.field, index)  # a missing field fails the job
    return BatchRow(index=index, prompt=prompt, data=data, conversation=conversation)


def _write_prompts(ctx: Context, job_id: str, config: JobConfig, prepared: list[BatchRow]) -> None:
    from spider.rollouts.single_turn import opening_messages

    options = config.generation.on_policy_options
    usable = [r for r in prepared if r.error is None]
    failed = [r for r in prepared if r.error is not None]
    if failed:
        ctx.bus.publish(
            job_id, EventKind.BATCH_ROW_ERRORS, f"{len(failed)} source rows cannot be prompts", level="warning",
            data={"row_errors": len(failed), "examples": [f"row {r.index}: {r.error.message}" for r in failed[:3]]},
        )
    held = options.eval_rows
    if len(usable) <= held:
        raise SpiderError(f"{len(usable)} usable prompts, and eval_rows holds out {held}: nothing is left to train on")
    prompts = [{"index": r.index, "messages": [m.to_openai() for m in opening_messages(config, r)]} for r in usable]
    train, held_out = prompts[: len(prompts) - held], prompts[len(prompts) - held :]
    steps = options.max_steps or math.ceil(len(train) / options.groups_per_batch)
    files = ctx.files(job_id)
    write_atomic(files.train_rows, json.dumps({"train": train, "eval": held_out}))
    ctx.store.set_fields(job_id, batches_total=steps)
    ctx.bus.publish(
        job_id,
        EventKind.JOB_PLANNED,
        f"{steps} steps over {len(train)} prompts ({held} held out for eval), "
        f"{options.groups_per_batch} prompts x {options.group_size} samples per step",
        data={"steps": steps, "train_rows": len(train), "eval_rows": held, "groups_per_batch": options.groups_per_batch,
              "group_size": options.group_size},
    )
    ctx.dispatch(TRAIN, job_id, 0)


def _continue(ctx: Context, job_id: str, files: JobFiles) -> None:
    """A redelivered start or prepare: hand out the segment that resumes from the newest checkpoint."""
    if files.train_rows.exists():
        ctx.dispatch(TRAIN, job_id, latest_step(files))


# -- checkpoints ----------------------------------------------------------------------------------


def latest(files: JobFiles) -> dict[str, Any] | None:
    """The newest whole checkpoint's meta (step = steps done), or None before the first."""
    path = files.latest_checkpoint
    return json.loads(path.read_text()) if path.exists() else None


def latest_step(files: JobFiles) -> int:
    meta = latest(files)
    return int(meta["step"]) if meta else 0


# The folders of a checkpoint that live in the trainer's folder (a local backend's; a Tinker state
# is a tinker:// path and stays where it is).
TRAINER_FOLDERS = ("state", "sampler_path")


def save_checkpoint(files: JobFiles, run: Any, step: int, tokens_trained: int, keep: set[int]) -> dict[str, Any]:
    """Trainer state (weights, optimizer, RNG) + the data position (the step: every batch is a
    function of it) and counters, after `step` steps. Its folders are published to the artifact
    store before its meta.json (so a meta names only folders that are whole there), and the meta
    says where they are in the trainer's folder (`trainer_files`), so that a worker on another
    machine can fetch them. Then the folders of checkpoints not in `keep` and of samplers no
    checkpoint names are removed."""
    state = run.backend.save_state(f"step-{step:06d}")
    meta = {"step": step, "state": state, "sampler_path": run.sampler_path, "tokens_trained": tokens_trained,
            "saved_at": time.time()}
    meta["trainer_files"] = {key: rel for key in TRAINER_FOLDERS if (rel := _in_trainer(files, meta[key])) is not None}
    for rel in meta["trainer_files"].values():
        publish(files.local.trainer / rel, files.trainer / rel)
    write_atomic(files.checkpoints / f"step-{step:06d}.json", json.dumps(meta))
    write_atomic(files.latest_checkpoint, json.dumps(meta))
    kept = {meta["trainer_files"].get("sampler_path")}
    for old in sorted(files.checkpoints.glob("step-*.json")):
        number = int(old.stem.split("-")[1])
        info = json.loads(old.read_text())
        if number == step or number in keep:
            kept.add(trainer_folder(files, info, "sampler_path"))
            continue
        state_folder = trainer_folder(files, info, "state")
        if state_folder is not None:
            _remove_trainer_folder(files, state_folder)
        old.unlink(missing_ok=True)
    for trainer in dict.fromkeys([files.local.trainer, files.trainer]):
        sampler_root = trainer / "sampler"
        for folder in sampler_root.glob("step-*") if sampler_root.exists() else []:
            if f"sampler/{folder.name}" not in kept:
                remove(folder)
    return meta


def _in_trainer(files: JobFiles, path: str) -> str | None:
    """Where `path` (a folder the local trainer wrote) is in this worker's trainer folder; None
    for a state elsewhere (a Tinker checkpoint)."""
    if not isinstance(path, str) or "://" in path:
        return None
    try:
        return Path(path).resolve().relative_to(files.local.trainer.resolve()).as_posix()
    except ValueError:
        return None


def trainer_folder(files: JobFiles, meta: dict[str, Any], key: str) -> str | None:
    """The folder of a checkpoint's `state` or `sampler_path` within the trainer's folder, as its
    meta names it (or, for a meta written without `trainer_files`, as its path says)."""
    named = (meta.get("trainer_files") or {}).get(key)
    return named if named is not None else _in_trainer(files, meta[key])


def _remove_trainer_folder(files: JobFiles, rel: str) -> None:
    """Remove a checkpoint's folder from the trainer's folder, here and in the store."""
    for trainer in dict.fromkeys([files.local.trainer, files.trainer]):
        remove(trainer / rel)


def localized(files: JobFiles, meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint `meta` with its trainer folders on this worker's disk: fetched from the
    artifact store when this worker does not have them (it trains a job another machine
    checkpointed), and its paths pointing at them."""
    meta = dict(meta)
    for key, rel in (meta.get("trainer_files") or {}).items():
        local = files.local.trainer / rel
        if not local.is_dir():
            fetch(files.trainer / rel, local)
        meta[key] = str(local)
    return meta


# -- train segments ------------------------------------------------------------------------------


@dataclass
class WarmRun:
    """A trainer kept in the worker process between segments of one job."""

    run: Any  # spider.train.loop.TrainRun
    step: int  # steps this trainer has done
    tokens_trained: int
    closers: list[Any]


_warm: dict[str, WarmRun] = {}
_warm_lock = threading.Lock()


class Lease:
    """Who trains a job now: a Redis key with a TTL well under the broker's visibility timeout, renewed
    by a thread while the segment runs. A second delivery of a running segment finds it taken and
    stops; once a dead worker's lease runs out, its redelivered segment takes over."""

    def __init__(self, ctx: Context, job_id: str):
        self.r = ctx.store.r
        self.key = ctx.store.keys.job(job_id, "train-lease")
        self.token = uuid.uuid4().hex
        self.ttl = max(5, min(900, ctx.settings.visibility_timeout // 2))
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> bool:
        if not self.r.set(self.key, self.token, nx=True, ex=self.ttl):
            return False
        self._thread = threading.Thread(target=self._renew, name="spider-train-lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.r.get(self.key) != self.token:
                    self.lost.set()
                    return
                self.r.expire(self.key, self.ttl)
            except Exception:  # Redis unreachable for a moment: try again at the next tick
                log.warning("could not renew the training lease %s", self.key, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.r.get(self.key) == self.token:
                self.r.delete(self.key)
        except Exception:  # it expires by itself
            log.warning("could not release the training lease %s", self.key, exc_info=True)


@guarded
def train_segment(ctx: Context, job_id: str, start_step: int) -> None:
    """Train the steps [start, start + steps_per_task) that are not done yet, checkpoint, go on."""
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        _forget(job_id, ctx.files(job_id))
        return
    lease = Lease(ctx, job_id)
    if not lease.take():
        log.info("job %s: segment %d is being trained by another worker", job_id, start_step)
        return
    try:
        next_step = _train(ctx, job_id, config, start_step, lease)
    except BaseException:
        _forget(job_id)
        raise
    finally:
        lease.release()
    if next_step is None:
        return
    if next_step == "done":
        ctx.dispatch(FINALIZE, job_id)
    else:
        ctx.dispatch(TRAIN, job_id, next_step)


def _train(ctx: Context, job_id: str, config: JobConfig, start_step: int, lease: Lease) -> Any:
    from spider.train.loop import on_policy_step, teacher_kl_of

    options = config.generation.on_policy_options
    files = ctx.files(job_id)
    total = int(ctx.store.get_field(job_id, "batches_total") or 0)
    meta = latest(files)
    done = int(meta["step"]) if meta else 0
    end = min(start_step + options.steps_per_task, total)
    tokens = int(meta["tokens_trained"]) if meta else 0
    if done >= total or _budget_spent(options, tokens):
        return "done"
    if done > end:
        return None  # a redelivered segment: a later one has checkpointed, so it was handed out
    if done == end:
        return end  # a redelivered segment whose steps are done: hand out the next one (again)
    warm = _warm_run(ctx, job_id, config, meta)
    run, loop = warm.run, JobLoop(ctx, job_id)  # a cancel stops the sampling in flight
    if done == 0 and options.eval_every:  # where the curve starts
        _append_metrics(files, {"step": 0, "eval_teacher_kl": _evaluate(ctx, job_id, run, 0, loop, teacher_kl_of)})
    keep = {k for k in range(0, total + 1, options.save_every)} if options.save_every else set()
    step = done
    while step < end:
        if ctx.store.status(job_id) != JobStatus.RUNNING:
            _forget(job_id, files)
            return None  # cancelled or failed meanwhile: train nothing more
        metrics = on_policy_step(run, step, loop)
        if ctx.store.status(job_id) != JobStatus.RUNNING:
            _forget(job_id, files)
            return None  # cancelled during the step: its update is not kept
        step += 1
        tokens += int(metrics["tokens_trained"])
        warm.step, warm.tokens_trained = step, tokens
        metrics.update(step=step, steps_total=total, tokens_trained_total=tokens,
                       elapsed=time.time() - (ctx.store.get(job_id).started_at or time.time()))
        if options.eval_every and (step % options.eval_every == 0 or step == total):
            metrics["eval_teacher_kl"] = _evaluate(ctx, job_id, run, step, loop, teacher_kl_of)
        _append_metrics(files, metrics)
        _publish_step(ctx, job_id, metrics)
        ctx.store.touch(job_id)
        if lease.lost.is_set():
            _forget(job_id)
            return None  # another worker trains this job now; its checkpoints are the ones that count
        if (options.save_every and step % options.save_every == 0) or step == end or _budget_spent(options, tokens):
            save_checkpoint(files, run, step, tokens, keep)
            ctx.bus.publish(job_id, EventKind.TRAIN_CHECKPOINT, f"checkpoint after step {step}", data={"step": step})
        if _budget_spent(options, tokens):
            ctx.bus.publish(job_id, EventKind.TRAIN_CHECKPOINT, f"token budget of {options.max_train_tokens} spent",
                            data={"step": step, "tokens_trained": tokens})
            return "done"
    return "done" if step >= total else step


def _budget_spent(options: Any, tokens: int) -> bool:
    return options.max_train_tokens is not None and tokens >= options.max_train_tokens


def _evaluate(ctx: Context, job_id: str, run: Any, step: int, loop: Any, teacher_kl_of: Any) -> float | None:
    started = time.perf_counter()
    kl, tokens = teacher_kl_of(run, run.data.eval_rows, 10_000_000 + step, loop)
    seconds = time.perf_counter() - started
    ctx.bus.publish(
        job_id, EventKind.TRAIN_EVAL, f"step {step}: held-out teacher KL {kl if kl is None else round(kl, 4)}",
        data={"step": step, "eval_teacher_kl": kl, "eval_tokens": tokens, "seconds": seconds},
    )
    return kl


def _append_metrics(files: JobFiles, metrics: dict[str, Any]) -> None:
    """One line per step; a resumed segment first drops lines of steps it is about to redo."""
    from spider.data.sinks import read_jsonl

    kept = [m for m in read_jsonl(files.metrics) if m["step"] < metrics["step"]] if files.metrics.exists() else []
    lines = [json.dumps(m) for m in kept] + [json.dumps(metrics, default=_plain)]
    write_atomic(files.metrics, "\n".join(lines) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _publish_step(ctx: Context, job_id: str, metrics: dict[str, Any]) -> None:
    kl = metrics.get("teacher_kl")
    ctx.bus.publish(
        job_id,
        EventKind.TRAIN_STEP,
        f"step {metrics['step']}/{metrics['steps_total']}: teacher KL {'-' if kl is None else f'{kl:.4f}'}, "
        f"{metrics['tokens_trained']} tokens trained in {metrics['step_s']:.1f}s",
        data=json.loads(json.dumps(metrics, default=_plain)),
    )


def _forget(job_id: str, files: JobFiles | None = None) -> None:
    """Close this worker's warm trainer of a job. With `files` (the job has ended, or its result
    is in the store), also remove this worker's local copies of its trainer's files."""
    with _warm_lock:
        warm = _warm.pop(job_id, None)
    if warm is not None:
        for close in warm.closers:
            try:
                close()
            except Exception:  # closing is best effort; the worker goes on
                log.exception("job %s: closing the trainer failed", job_id)
    if files is not None:
        local = files.local
        files.drop_local(local.trainer, local.adapter, local.merged, local.plot, local.metrics,
                         local.root / EXPORT_SCRATCH)


def _warm_run(ctx: Context, job_id: str, config: JobConfig, meta: dict[str, Any] | None) -> WarmRun:
    """The trainer of this job in this worker: kept from the previous segment when it is at the
    checkpoint's step, else built and restored from the checkpoint."""
    done = int(meta["step"]) if meta else 0
    with _warm_lock:
        warm = _warm.get(job_id)
    if warm is not None and warm.step == done:
        return warm
    _forget(job_id)
    from spider.train.build import build_run

    if meta is not None:
        meta = localized(ctx.files(job_id), meta)

    about = {"model": config.model.name, "backend": config.generation.on_policy_options.resolved_backend}
    ctx.bus.publish(job_id, EventKind.MODEL_LOADING, f"loading student {config.model.name!r}", data=about)
    started = time.perf_counter()
    run, closers = build_run(ctx, job_id, config, meta)
    ctx.bus.publish(
        job_id, EventKind.MODEL_LOADED, f"student loaded in {time.perf_counter() - started:.1f}s",
        data={**about, "seconds": time.perf_counter() - started, **run.backend.info()},
    )
    if meta is not None:
        ctx.bus.publish(job_id, EventKind.JOB_RESUMED, f"training resumes after step {done}", data={"step": done})
    warm = WarmRun(run, done, int(meta["tokens_trained"]) if meta else 0, closers)
    with _warm_lock:
        _warm[job_id] = warm
    return warm


# -- teacher scoring on rollout workers -----------------------------------------------------------


def score_sequences(ctx: Context, job_id: str, request_id: str) -> None:
    """Score the token sequences a train worker left under `request_id` with the job's teacher,
    and push the answer where it waits (rollout workers)."""
    from spider.engines.base import ScoreRequest

    r = ctx.store.r
    keys = ctx.store.keys
    payload = r.get(keys.score_request(request_id))
    if payload is None:
        return  # the trainer gave up waiting; nobody needs the answer
    config, record = load_job(ctx, job_id)
    reply: dict[str, Any]
    if record.status != JobStatus.RUNNING:
        reply = {"error": f"job {job_id} is {record.status}"}
    else:
        try:
            sequences = json.loads(payload)
            engine = job_engine(ctx, job_id, config.generation.on_policy_options.teacher, ctx.store.secrets(job_id))
            results = engine.score([ScoreRequest(key=str(i), token_ids=ids) for i, ids in enumerate(sequences)])
            reply = {"results": [{"logprobs": res.logprobs, "error": res.error} for res in results]}
        except Exception as exc:  # the trainer reports it; this worker goes on
            log.exception("job %s: scoring failed", job_id)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
    pipe = r.pipeline()
    pipe.rpush(keys.score_reply(request_id), json.dumps(reply))
    pipe.expire(keys.score_reply(request_id), 600)
    pipe.delete(keys.score_request(request_id))
    pipe.execute()


# -- finalize -------------------------------------------------------------------------------------


@guarded
def finalize_job(ctx: Context, job_id: str) -> None:
    """Export what was trained, write metadata, upload when asked, complete the job."""
    from spider.train.build import export_run
    from spider.train.plot import plot_metrics

    config, record = load_job(ctx, job_id)
    if record.status.ended:
        return
    files = ctx.files(job_id)
    meta = latest(files)
    if meta is None:
        raise SpiderError("cannot finalize: the job has no checkpoint")
    warm = _warm_run(ctx, job_id, config, meta)
    from spider.data.sinks import read_jsonl

    metrics = list(read_jsonl(files.metrics)) if files.metrics.exists() else []
    final = metrics[-1] if metrics else {}
    public = record.public()["config"]
    exported = export_run(warm.run, config, public, final, files)
    plot_metrics(metrics, files.local.plot)
    for local, stored in ((files.local.adapter, files.adapter), (files.local.merged, files.merged),
                          (files.local.plot, files.plot)):
        if local.exists():
            publish(local, stored)
    ctx.bus.publish(job_id, EventKind.TRAIN_EXPORTED, f"adapter exported ({', '.join(exported)})", data={"files": exported})
    first = metrics[0] if metrics else {}
    evals = [m["eval_teacher_kl"] for m in metrics if m.get("eval_teacher_kl") is not None]
    metadata = {
        "job_id": job_id,
        "kind": "on_policy",
        "config": public,
        "steps": int(meta["step"]),
        "tokens_trained": int(meta["tokens_trained"]),
        "final_metrics": final,
        "teacher_kl": {"first": first.get("teacher_kl"), "last": final.get("teacher_kl")},
        "eval_teacher_kl": {"first": evals[0] if evals else None, "last": evals[-1] if evals else None},
        "exported": exported,
        "timings": {"created_at": record.created_at, "started_at": record.started_at, "finalized_at": time.time()},
    }
    _archive(files)
    if config.output.mode == "upload_hf" and config.output.hf is not None:
        from spider.data.sinks import upload_folder_to_hub

        hf = config.output.hf
        write_atomic(files.metadata, json.dumps(metadata, indent=2, default=_plain))
        ctx.bus.publish(job_id, EventKind.UPLOAD_STARTED, f"uploading the adapter to the Hub repo {hf.repo_id}")
        url = upload_folder_to_hub(files.local.adapter, hf, ctx.store.secrets(job_id).get(hf.token_env), job_id)
        metadata["hub"] = {"repo_id": hf.repo_id, "repo_type": hf.repo_type, "commit": url}
        ctx.bus.publish(job_id, EventKind.UPLOAD_COMPLETED, f"uploaded to {hf.repo_id}", data=metadata["hub"])
    write_atomic(files.metadata, json.dumps(metadata, indent=2, default=_plain))
    _forget(job_id, files)
    if ctx.store.transition(job_id, JobStatus.COMPLETED, [JobStatus.RUNNING]):
        ctx.store.drop_secrets(job_id)
        ctx.bus.publish(
            job_id, EventKind.JOB_COMPLETED, f"{metadata['steps']} steps trained; adapter exported",
            data={"steps": metadata["steps"], "tokens_trained": metadata["tokens_trained"],
                  "teacher_kl": metadata["teacher_kl"], "eval_teacher_kl": metadata["eval_teacher_kl"]},
        )
    retention.after_finalize(ctx, job_id, config)


def _archive(files: JobFiles) -> None:
    """adapter/ (+ merged/), metrics.jsonl and metrics.png in one .tar.gz: the job's result, built
    from this worker's local copies and published whole."""
    local = files.local
    metrics = fetch(files.metrics, local.metrics) if files.metrics.exists() else local.metrics
    with staged(files.archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in (local.adapter, local.merged, metrics, local.plot):
            if path.exists():
                tar.add(path, arcname=path.name)


def release(job_id: str) -> None:
    """Drop a job's warm trainer from this worker (cancelled or failed jobs)."""
    _forget(job_id)
