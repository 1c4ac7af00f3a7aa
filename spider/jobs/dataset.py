"""An off-policy dataset job, stage by stage: plan, (pre-process), generate, (post-process),
complete, finalize; or, once cancelled, a partial finalize of the rows done so far.

Each stage (see spider.jobs.stages) reads its input from the job's files, writes its output
atomically, and dispatches the next stage by name. Every stage is idempotent: a redelivered task
rewrites the same file and counts nothing twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from spider import faults
from spider.artifacts import fetch
from spider.config import JobConfig
from spider.data.sinks import jsonl_line, read_jsonl, upload_to_hub, write_result
from spider.data.sources import SourceAccess, iter_source_rows, start_of
from spider.engines.base import GenerationResult
from spider.engines.loop import Interrupted
from spider.errors import SpiderError
from spider.jobs import retention
from spider.jobs.stages import Context, bundle_manifest, fail_job, guarded, job_engine, load_job, while_running
from spider.jobs.store import JobFiles, JobRecord, write_atomic
from spider.rollouts.single_turn import build_requests, records_for
from spider.types import BatchRow, BatchStats, BundleManifest, EventKind, JobStatus, Record, RowError, Usage

if TYPE_CHECKING:
    from spider.jobs.usercode import SandboxPool

log = logging.getLogger(__name__)

# The stages of a dataset job, by the names the dispatcher knows them.
PLAN = "dataset.plan"
PREPROCESS = "dataset.preprocess"
ROLLOUT = "dataset.rollout"
POSTPROCESS = "dataset.postprocess"
FINALIZE = "dataset.finalize"
FINALIZE_PARTIAL = "dataset.finalize_partial"

# Planning asks whether the job was cancelled at most this often (one HGET), between batches.
PLAN_CHECK_S = 0.2
# A planner holds the job's `planning` mark while it writes batch files; it outlives a killed
# planner by no more than the plan task's time limit.
PLANNING_MARK_TTL_S = 1800


# -- plan ---------------------------------------------------------------------------------------


@guarded
def plan_job(ctx: Context, job_id: str) -> None:
    """Read the source row by row into batch files, then start the batches. A cancel stops it
    between two batches (within PLAN_CHECK_S); whenever it stops with the job cancelled, it hands
    the job to its partial finalize."""
    config, record = load_job(ctx, job_id)
    if record.status == JobStatus.RUNNING and record.batches_total is not None:
        resume_job(ctx, job_id)  # a redelivered plan: its batches exist already
        return
    mark = PlanningMark(ctx, job_id)
    try:
        if not ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED, JobStatus.RUNNING]):
            return  # cancelled before it started, or already ended
        mark.hold()
        _plan(ctx, job_id, config, record.has_bundle, StatusWatch(ctx, job_id))
    finally:
        mark.release()
        if ctx.store.status(job_id) == JobStatus.CANCELLED:
            ctx.dispatch(FINALIZE_PARTIAL, job_id)


def _plan(ctx: Context, job_id: str, config: JobConfig, has_bundle: bool, watch: "StatusWatch") -> None:
    if watch.stopped(now=True):
        return  # cancelled between the start and the mark: the partial finalize may have run
    ctx.bus.publish(job_id, EventKind.JOB_STARTED, f"loading source {config.source.dataset!r}")
    manifest = bundle_manifest(ctx, job_id) if has_bundle else None
    has_pre = manifest is not None and manifest.has_pre_processor
    files = ctx.files(job_id)
    size = config.generation.max_batch_size
    rows_total = batches = 0
    with contextlib.closing(job_source_rows(ctx, job_id, config)) as rows:
        for chunk in _chunks(rows, size):
            first = batches * size
            if has_pre:
                raw = [{"index": first + k, "data": row} for k, row in enumerate(chunk)]
                write_atomic(files.inputs(batches), json.dumps(raw))
            else:
                if batches == 0:
                    start_of(chunk[0], config.source.field, 0)  # a field missing from the rows fails the job here
                prepared = [_prepare(config, first + k, row) for k, row in enumerate(chunk)]
                write_atomic(files.batch(batches), json.dumps([r.to_dict() for r in prepared]))
            rows_total += len(chunk)
            batches += 1
            if watch.stopped():
                return
    if not rows_total:
        raise SpiderError(f"source {config.source.dataset!r} (split {config.source.split!r}) has no rows")
    ctx.store.set_fields(job_id, rows_total=rows_total, batches_total=batches)
    if watch.stopped(now=True):
        return  # no job.planned after job.cancelled
    ctx.bus.publish(
        job_id,
        EventKind.JOB_PLANNED,
        f"{rows_total} rows in {batches} batches of up to {size}",
        data={"rows_total": rows_total, "batches_total": batches, "duplications": config.generation.duplications},
    )
    for batch_index in range(batches):
        ctx.dispatch(PREPROCESS if has_pre else ROLLOUT, job_id, batch_index)
        if watch.stopped():
            return


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive lists of `size` rows (the last may be shorter), read as they are needed."""
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class StatusWatch:
    """Whether a job has stopped running, read from Redis at most every `every` seconds, so that
    a loop may ask after every item for the price of one HGET per interval."""

    def __init__(self, ctx: Context, job_id: str, every: float = PLAN_CHECK_S):
        self.ctx, self.job_id, self.every = ctx, job_id, every
        self.asked = time.monotonic()

    def stopped(self, now: bool = False) -> bool:
        if not now and time.monotonic() - self.asked < self.every:
            return False
        self.asked = time.monotonic()
        return self.ctx.store.status(self.job_id) != JobStatus.RUNNING


class PlanningMark:
    """Held while a planner may write a job's batch files: the partial finalize of a cancelled job
    waits for it to go (the planner then dispatches it), so that no batch file appears after the
    job's intermediate files were removed. A key of its own with a TTL: a killed planner's mark
    expires, and a mark set after the job was deleted leaves no record behind."""

    def __init__(self, ctx: Context, job_id: str):
        self.r = ctx.store.r
        self.key = ctx.store.keys.job(job_id, "planning")

    def hold(self) -> None:
        self.r.set(self.key, 1, ex=PLANNING_MARK_TTL_S)

    def release(self) -> None:
        self.r.delete(self.key)

    def held(self) -> bool:
        return bool(self.r.exists(self.key))


def job_source_rows(ctx: Context, job_id: str, config: JobConfig) -> Iterator[dict[str, Any]]:
    """The job's source rows, one by one: from the files it uploaded when it did, else from the
    Hub or the operator's data roots, read with the job's own token and a datasets cache of the
    job's own, removed once the rows are read (or the iterator is closed)."""
    files = ctx.files(job_id)
    uploaded = json.loads(ctx.store.get_field(job_id, "source_upload") or "null")
    source = config.source
    # `datasets` reads real files: with the store elsewhere, the uploaded ones are fetched here first.
    source_dir = fetch(files.source_dir, files.local.source_dir) if uploaded is not None else None
    if source_dir is not None:
        only = uploaded[0] if len(uploaded) == 1 else ""
        source = source.model_copy(update={"dataset": str(source_dir / only), "options": {
            k: v for k, v in source.options.items() if k not in ("data_files", "data_dir")}})
    access = SourceAccess.for_job(ctx.settings.policy, source_dir, files.datasets_cache)
    try:
        yield from iter_source_rows(source, token=ctx.store.secrets(job_id).get("HF_TOKEN"), access=access)
    finally:
        shutil.rmtree(files.datasets_cache, ignore_errors=True)
        files.drop_local(files.local.source_dir)


def load_job_source(ctx: Context, job_id: str, config: JobConfig) -> list[dict[str, Any]]:
    """Every source row of the job at once (see `job_source_rows`)."""
    return list(job_source_rows(ctx, job_id, config))


def resume_job(ctx: Context, job_id: str) -> None:
    """Hand out again every batch of a planned job that has not completed (idempotent)."""
    record = ctx.store.get(job_id)
    if record is None or record.status != JobStatus.RUNNING or record.batches_total is None:
        return
    done = ctx.store.done_batches(job_id)
    missing = [i for i in range(record.batches_total) if i not in done]
    files = ctx.files(job_id)
    for batch_index in missing:
        ctx.dispatch(ROLLOUT if files.batch(batch_index).exists() else PREPROCESS, job_id, batch_index)
    if not missing and ctx.store.claim_finalize(job_id):
        ctx.dispatch(FINALIZE, job_id)
    ctx.bus.publish(job_id, EventKind.JOB_RESUMED, f"{len(missing)} batches handed out again", data={"batches": missing})


def _prepare(config: JobConfig, index: int, data: dict[str, Any]) -> BatchRow:
    try:
        prompt, conversation = start_of(data, config.source.field, index)
        return BatchRow(index=index, prompt=prompt, data=data, conversation=conversation)
    except SpiderError as exc:
        return BatchRow(index=index, prompt=None, data=data, error=RowError("SourceError", str(exc)))


# -- pre-process (sandbox workers) --------------------------------------------------------------


@guarded
def preprocess_batch(ctx: Context, job_id: str, batch_index: int, pool: SandboxPool) -> None:
    """Run the user's pre-processor on one batch of source rows, then hand the batch to rollout."""
    from spider.jobs import usercode

    if ctx.store.status(job_id) != JobStatus.RUNNING:
        return  # one HGET: a cancelled job's queued batches go at once
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        return
    files = ctx.files(job_id)
    raw = json.loads(files.inputs(batch_index).read_text())
    prepared, dropped = usercode.pre_process_rows(pool.job(job_id, config), config, raw)
    # The count travels with the batch and is added once, when the batch completes.
    write_atomic(files.dropped(batch_index), str(dropped))
    write_atomic(files.batch(batch_index), json.dumps([r.to_dict() for r in prepared]))
    ctx.dispatch(ROLLOUT, job_id, batch_index)


# -- generate (rollout workers) -----------------------------------------------------------------


@guarded
def run_batch(ctx: Context, job_id: str, batch_index: int) -> None:
    """Generate one batch with the job's engine and write its shard (or, with a post-processor,
    its generated records). Cancelled meanwhile, the generation stops (see `while_running`) and
    the batch writes nothing and counts nothing."""
    if ctx.store.status(job_id) != JobStatus.RUNNING:
        return  # one HGET: a cancelled job's queued batches go at once
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        return  # cancelled or failed: generate nothing more
    if batch_index in ctx.store.done_batches(job_id):
        finalize_when_done(ctx, job_id, record)  # a redelivered batch: whoever counted it may have died since
        return
    files = ctx.files(job_id)
    rows = [BatchRow.from_dict(r) for r in json.loads(files.batch(batch_index).read_text())]
    manifest = bundle_manifest(ctx, job_id) if record.has_bundle else None
    if is_conversational(config, manifest):
        records, elapsed = _conversation_batch(ctx, job_id, batch_index, config, rows, manifest)
    else:
        records, elapsed = _single_turn_batch(ctx, job_id, batch_index, config, rows)
    if ctx.store.status(job_id) != JobStatus.RUNNING:
        return  # it ended while the last answers came: its partial result is assembled without them
    dropped = int(files.dropped(batch_index).read_text()) if files.dropped(batch_index).exists() else 0
    stats = _batch_stats(rows, records, dropped, elapsed)
    lines = "".join(jsonl_line(r.to_dict()) for r in records)
    if manifest is not None and manifest.has_post_processor:
        write_atomic(files.generated(batch_index), lines)
        write_atomic(files.generated_stats(batch_index), json.dumps(stats.to_dict()))
        ctx.dispatch(POSTPROCESS, job_id, batch_index)
        ctx.bus.publish(
            job_id,
            EventKind.BATCH_GENERATED,
            f"batch {batch_index} generated ({stats.completion_tokens} tokens in {elapsed:.1f}s)",
            data={"batch": batch_index, **stats.to_dict(), "seconds": elapsed},
        )
        return
    faults.point("batch.before_shard", job_id)
    write_atomic(files.shard(batch_index), lines)
    complete_batch(ctx, job_id, batch_index, stats)


def _single_turn_batch(
    ctx: Context, job_id: str, batch_index: int, config: JobConfig, rows: list[BatchRow]
) -> tuple[list[Record], float]:
    """One answer per (row, sample): the whole batch in one engine call."""
    from spider.engines import sampling_params

    requests = build_requests(config, rows)
    results: dict[str, GenerationResult] = {}
    elapsed = 0.0
    if requests:
        engine = job_engine(ctx, job_id, config.model, ctx.store.secrets(job_id))
        _report_start(ctx, job_id, batch_index, len(requests))
        started = time.perf_counter()  # generation only: the model is loaded by now
        try:
            answers = while_running(ctx, job_id, engine.agenerate(requests, sampling_params(config.generation.parameters)))
            results = {r.key: r for r in answers}
        except (SpiderError, Interrupted):
            raise
        except Exception as exc:  # the engine failed for the whole batch: its rows become error records
            log.error("job %s batch %d: engine failed:\n%s", job_id, batch_index, traceback.format_exc())
            results = {r.key: GenerationResult(key=r.key, error=f"{type(exc).__name__}: {exc}") for r in requests}
        elapsed = time.perf_counter() - started
    return records_for(job_id, config, rows, results, {r.key: r for r in requests}), elapsed


def _report_start(ctx: Context, job_id: str, batch_index: int, rows: int) -> None:
    ctx.bus.publish(
        job_id, EventKind.BATCH_STARTED, f"batch {batch_index}: generating {rows} rows",
        data={"batch": batch_index, "rows": rows},
    )


def is_conversational(config: JobConfig, manifest: BundleManifest | None) -> bool:
    """Whether rows become conversations (tools to call, or a simulated user) rather than one answer."""
    generation = config.generation
    return bool((manifest is not None and manifest.has_tools) or generation.mcp_servers or generation.user)


def _conversation_batch(
    ctx: Context, job_id: str, batch_index: int, config: JobConfig, rows: list[BatchRow], manifest: BundleManifest | None
) -> tuple[list[Record], float]:
    """One conversation per (row, sample), all on the worker's engine loop at once."""
    from spider.jobs import conversations

    secrets = ctx.store.secrets(job_id)
    engine = job_engine(ctx, job_id, config.model, secrets)
    user_engine = job_engine(ctx, job_id, config.generation.user.model, secrets) if config.generation.user else None
    runnable = sum(1 for r in rows if r.error is None)
    _report_start(ctx, job_id, batch_index, runnable)
    started = time.perf_counter()
    records = while_running(ctx, job_id, conversations.batch_records(ctx, job_id, config, rows, manifest, engine, user_engine))
    return records, time.perf_counter() - started


def _batch_stats(rows: list[BatchRow], records: list[Record], dropped: int, seconds: float) -> BatchStats:
    usage = Usage()
    for r in records:
        usage += r.usage
    failed = [r for r in records if r.error is not None]
    return BatchStats(
        rows_done=len(rows) + dropped,  # rows the pre-processor dropped are done too
        dropped=dropped,
        records=len(records),
        row_errors=len({r.row_index for r in failed}),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        generation_seconds=seconds,
        error_examples=[f"row {r.row_index}: {r.error.message}" for r in failed if r.error][:3],
    )


# -- post-process (sandbox workers) -------------------------------------------------------------


@guarded
def postprocess_batch(ctx: Context, job_id: str, batch_index: int, pool: SandboxPool) -> None:
    """Run the user's post-processor on one batch of records, write the batch's shard, complete it."""
    from spider.jobs import usercode

    if ctx.store.status(job_id) != JobStatus.RUNNING:
        return
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        return
    files = ctx.files(job_id)
    records = list(read_jsonl(files.generated(batch_index)))
    stats = BatchStats.from_dict(json.loads(files.generated_stats(batch_index).read_text()))
    kept, dropped = usercode.post_process_records(pool.job(job_id, config), config, records)
    write_atomic(files.shard(batch_index), "".join(jsonl_line(r) for r in kept))
    stats.records = len(kept)
    stats.dropped += dropped
    complete_batch(ctx, job_id, batch_index, stats)


# -- complete -----------------------------------------------------------------------------------


def complete_batch(ctx: Context, job_id: str, batch_index: int, stats: BatchStats) -> None:
    """Count a finished batch once, report progress, enforce max_row_errors, maybe finalize.

    Counting is one atomic Redis step (JobStore.complete_batch). A redelivered batch counts
    nothing, but goes through every later step: the worker that counted it may have died before
    it checked the row error limit or whether the job was done."""
    faults.point("batch.before_complete", job_id)
    first, done, totals = ctx.store.complete_batch(job_id, batch_index, stats)
    faults.point("batch.after_complete", job_id)
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.RUNNING:
        return  # cancelled or failed meanwhile: its history already ended
    if first:
        _report_batch(ctx, job_id, batch_index, stats, totals, done, record)
    limit = config.generation.max_row_errors
    if limit is not None and totals.row_errors > limit:
        fail_job(ctx, job_id, f"{totals.row_errors} rows failed, more than generation.max_row_errors={limit}")
        return
    hf = config.output.hf
    if (first and config.output.mode == "upload_hf" and hf is not None and hf.upload_every
            and done % hf.upload_every == 0 and done < (record.batches_total or 0)):
        # New shards go up as they come; finalize sends the rest, never the whole result again.
        from spider.data.sinks import upload_shards

        files = ctx.files(job_id)
        upload_shards({i: files.shard(i) for i in ctx.store.done_batches(job_id)}, config.output.format,
                      hf, ctx.store.secrets(job_id).get(hf.token_env), job_id)
    faults.point("batch.before_claim", job_id)
    finalize_when_done(ctx, job_id, record, done)


def finalize_when_done(ctx: Context, job_id: str, record: JobRecord, done: int | None = None) -> bool:
    """Hand out the job's finalize once every batch is done, exactly once (whoever claims it, or
    the reconciler if that one died before it could). True when every batch is done."""
    done = len(ctx.store.done_batches(job_id)) if done is None else done
    if record.batches_total is None or done < record.batches_total:
        return False
    if ctx.store.claim_finalize(job_id):
        faults.point("batch.after_claim", job_id)
        ctx.dispatch(FINALIZE, job_id)
    return True


def _report_batch(
    ctx: Context, job_id: str, batch_index: int, stats: BatchStats, totals: BatchStats, done: int, record: JobRecord
) -> None:
    seconds = stats.generation_seconds
    ctx.bus.publish(
        job_id,
        EventKind.BATCH_COMPLETED,
        f"batch {batch_index} done: {totals.rows_done}/{record.rows_total} rows",
        data={
            "batch": batch_index,
            "batches_done": done,
            "batches_total": record.batches_total,
            "rows_done": totals.rows_done,
            "rows_total": record.rows_total,
            "records": totals.records,
            "row_errors": totals.row_errors,
            "completion_tokens": totals.completion_tokens,
            "batch_completion_tokens": stats.completion_tokens,
            "tokens_per_second": stats.completion_tokens / seconds if seconds else None,
            "generation_seconds": totals.generation_seconds,
            "tokens_per_second_total": (
                totals.completion_tokens / totals.generation_seconds if totals.generation_seconds else None
            ),
            "elapsed": time.time() - (record.started_at or record.created_at),
        },
    )
    if stats.row_errors:
        ctx.bus.publish(
            job_id,
            EventKind.BATCH_ROW_ERRORS,
            f"batch {batch_index}: {stats.row_errors} rows failed",
            level="warning",
            data={"batch": batch_index, "row_errors": stats.row_errors, "examples": stats.error_examples},
        )


# -- finalize -----------------------------------------------------------------------------------


@guarded
def finalize_job(ctx: Context, job_id: str) -> None:
    """Merge shards in row order into the result, write metadata, upload if asked, complete the job."""
    config, record = load_job(ctx, job_id)
    if record.status.ended:
        if record.status == JobStatus.COMPLETED:  # a redelivery: the finalize before it may have died half-way
            _announce_completed(ctx, job_id)
        retention.after_finalize(ctx, job_id, config)
        return
    files = ctx.files(job_id)
    batches = record.batches_total or 0
    missing = [i for i in range(batches) if not files.shard(i).exists()]
    if missing:
        raise SpiderError(f"cannot finalize: shards missing for batches {missing[:10]}")
    totals = record.totals
    rows_total = record.rows_total or 0
    if config.generation.max_row_errors is None and rows_total and totals.row_errors >= rows_total:
        raise SpiderError(f"every row failed; first error: {_first_error(files, batches)}")

    result = files.result(config.output.format)
    # Called once per pass: a Parquet result is written in two, holding one chunk at a time.
    count = write_result(lambda: shard_records(files, range(batches)), result, config.output.format)
    faults.point("finalize.after_result", job_id)
    finished = time.time()
    metadata = {
        "job_id": job_id,
        "partial": False,
        "config": record.public()["config"],
        "counts": {
            "rows": rows_total,
            "records": count,
            "row_errors": totals.row_errors,
            "dropped": totals.dropped,
            "batches": record.batches_total,
            "duplications": config.generation.duplications,
        },
        "usage": {"prompt_tokens": totals.prompt_tokens, "completion_tokens": totals.completion_tokens},
        "timings": {
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finalized_at": finished,
            "queued_seconds": (record.started_at or record.created_at) - record.created_at,
            "total_seconds": finished - record.created_at,
            "generation_seconds": totals.generation_seconds,
        },
        "format": config.output.format,
    }
    if config.output.mode == "upload_hf" and config.output.hf is not None:
        hf = config.output.hf
        write_atomic(files.metadata, json.dumps(metadata, indent=2))
        ctx.bus.publish(job_id, EventKind.UPLOAD_STARTED, f"uploading to the Hub repo {hf.repo_id}")
        url = upload_to_hub(result, files.metadata, hf, ctx.store.secrets(job_id).get(hf.token_env), job_id,
                            shards={i: files.shard(i) for i in range(batches)} if hf.upload_every else None)
        metadata["hub"] = {"repo_id": hf.repo_id, "repo_type": hf.repo_type, "commit": url}
        ctx.bus.publish(job_id, EventKind.UPLOAD_COMPLETED, f"uploaded to {hf.repo_id}", data=metadata["hub"])
    write_atomic(files.metadata, json.dumps(metadata, indent=2))
    faults.point("finalize.before_complete", job_id)
    if ctx.store.transition(job_id, JobStatus.COMPLETED, [JobStatus.RUNNING]):
        faults.point("finalize.after_complete", job_id)
        _announce_completed(ctx, job_id, metadata)
    faults.point("finalize.before_cleanup", job_id)
    retention.after_finalize(ctx, job_id, config)


def _announce_completed(ctx: Context, job_id: str, metadata: dict[str, Any] | None = None) -> None:
    """Drop a completed job's secrets and publish its `job.completed` (once: a redelivered finalize
    of a job whose finalize died after completing it publishes it only if it is missing)."""
    ctx.store.drop_secrets(job_id)
    if metadata is None:
        last = ctx.bus.last(job_id)
        if last is not None and last.kind == EventKind.JOB_COMPLETED:
            return
        files = ctx.files(job_id)
        if not files.metadata.exists():
            return
        metadata = json.loads(files.metadata.read_text())
    counts = metadata["counts"]
    ctx.bus.publish(
        job_id,
        EventKind.JOB_COMPLETED,
        f"{counts['records']} records written ({counts['row_errors']} row errors)",
        data={**counts, **metadata["usage"]},
    )


def shard_records(files: JobFiles, batches: Iterable[int]) -> Iterator[dict[str, Any]]:
    """The records of the given batches' shards, batch after batch (row order within each)."""
    for i in batches:
        yield from read_jsonl(files.shard(i))


# -- finalize a cancelled job -------------------------------------------------------------------


@guarded
def finalize_partial(ctx: Context, job_id: str) -> None:
    """A cancelled job's rows done so far as its result: the shards that exist, merged in row
    order, with metadata saying `"partial": true` and what is in it; then its intermediate files
    are removed as after a finalize. It runs after the planner stopped writing batches (the
    planner dispatches it again when it stops), one at a time (a lease); once it has written the
    metadata a redelivery only cleans up. It never uploads to the Hub."""
    config, record = load_job(ctx, job_id)
    if record.status != JobStatus.CANCELLED or config.generation.on_policy:
        return
    files = ctx.files(job_id)
    if not has_partial_result(files):
        if PlanningMark(ctx, job_id).held() or not _lease_partial(ctx, job_id):
            return
        _write_partial(ctx, job_id, config, record, files)
    retention.after_finalize(ctx, job_id, config, ended=JobStatus.CANCELLED)


def has_partial_result(files: JobFiles) -> bool:
    """Whether a cancelled job's partial result (and its metadata) is written."""
    try:
        return bool(json.loads(files.metadata.read_text()).get("partial"))
    except (OSError, ValueError):
        return False


def _lease_partial(ctx: Context, job_id: str) -> bool:
    """True for one caller at a time: the one that assembles the cancelled job's partial result.
    The lease lapses after the visibility timeout, by when a killed worker's task is redelivered."""
    return bool(ctx.store.r.set(ctx.store.keys.job(job_id, "partial"), 1, nx=True, ex=ctx.settings.visibility_timeout))


def _write_partial(ctx: Context, job_id: str, config: JobConfig, record: JobRecord, files: JobFiles) -> None:
    shards = files.shard(0).parent
    present = sorted(int(p.name.split(".")[0]) for p in shards.glob("[0-9]*.jsonl")) if shards.exists() else []
    tally = PartialTally()
    count = write_result(tally.counted(shard_records(files, present)), files.result(config.output.format),
                         config.output.format)
    finished = time.time()
    metadata = {
        "job_id": job_id,
        "partial": True,
        "config": record.public()["config"],
        "counts": {
            "rows": len(tally.rows),
            "records": count,
            "row_errors": len(tally.failed_rows),
            "batches": len(present),
            "rows_total": record.rows_total,
            "batches_total": record.batches_total,
            "duplications": config.generation.duplications,
        },
        "usage": {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens},
        "timings": {
            "created_at": record.created_at,
            "started_at": record.started_at,
            "cancelled_at": record.finished_at,
            "finalized_at": finished,
        },
        "format": config.output.format,
    }
    write_atomic(files.metadata, json.dumps(metadata, indent=2))
    log.info("job %s: partial result of %d records from %d batches", job_id, count, len(present))


class PartialTally:
    """What a partial result holds, counted as its records stream by."""

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.failed_rows: set[int] = set()
        self.prompt_tokens = self.completion_tokens = 0

    def counted(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            row = record.get("row_index")  # a post-processor may reshape records
            if row is not None:
                self.rows.add(row)
                if record.get("error"):
                    self.failed_rows.add(row)
            usage = record.get("usage") or {}
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
            yield record


def _first_error(files: JobFiles, batches: int) -> str:
    for i in range(batches):
        for record in read_jsonl(files.shard(i)):
            if record.get("error"):
                return record["error"].get("message", "")
    return "unknown"
