"""An off-policy dataset job, stage by stage: plan, (pre-process), generate, (post-process), finalize.

Each stage is a plain function of (context, job id[, batch index]) that reads its input from the
job's files, writes its output atomically, and hands the next stage to the dispatcher. Every stage
is idempotent: a redelivered task rewrites the same file and counts nothing twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from spider.config import JobConfig
from spider.data.sinks import read_jsonl, upload_to_hub, write_result
from spider.data.sources import SourceAccess, choose_system_prompt, load_source_rows, prompt_of, row_seed
from spider.engines.base import GenerationRequest, GenerationResult
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs.store import TERMINAL, JobFiles, JobStore, write_atomic
from spider.settings import Settings
from spider.types import Message, Record, Usage, row_id

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Hands the next stage of a job to whoever runs it (Celery queues in production)."""

    def rollout(self, job_id: str, batch_index: int) -> None: ...
    def preprocess(self, job_id: str, batch_index: int) -> None: ...
    def postprocess(self, job_id: str, batch_index: int) -> None: ...
    def finalize(self, job_id: str) -> None: ...


@dataclass
class Context:
    settings: Settings
    store: JobStore
    bus: EventBus
    dispatch: Dispatcher

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self.settings.data_dir, job_id)


@dataclass
class BatchRow:
    """A row as a rollout task sees it: the prompt, or why there is none."""

    index: int
    prompt: str | None
    data: dict[str, Any]
    error: dict[str, str] | None = None


def load_job(ctx: Context, job_id: str) -> tuple[JobConfig, Any]:
    record = ctx.store.get(job_id)
    if record is None:
        raise SpiderError(f"job {job_id} does not exist")
    return JobConfig.model_validate(record.config), record


def fail_job(ctx: Context, job_id: str, message: str) -> None:
    if ctx.store.fail(job_id, message):
        ctx.bus.publish(job_id, "job.failed", message, level="error")


def guarded(stage):
    """Run a stage; a user-caused error fails the job with its message, anything else with its
    type and message (the traceback goes to the worker's log only)."""

    def run(ctx: Context, job_id: str, *args: Any) -> None:
        try:
            stage(ctx, job_id, *args)
        except SpiderError as exc:
            fail_job(ctx, job_id, str(exc))
        except Exception as exc:
            log.error("job %s: %s failed:\n%s", job_id, stage.__name__, traceback.format_exc())
            fail_job(ctx, job_id, f"internal error in {stage.__name__}: {type(exc).__name__}: {exc}")

    run.__name__ = stage.__name__
    return run


# -- plan ---------------------------------------------------------------------------------------


@guarded
def plan_job(ctx: Context, job_id: str) -> None:
    """Load the source, give every row its index, split into batches, and start the batches."""
    config, record = load_job(ctx, job_id)
    if record.status == "running" and record.batches_total is not None:
        resume_job(ctx, job_id)  # a redelivered plan: its batches exist already
        return
    if not ctx.store.transition(job_id, "running", ["queued", "running"]):
        return  # cancelled before it started, or already ended
    ctx.bus.publish(job_id, "job.started", f"loading source {config.source.dataset!r}")
    rows = load_job_source(ctx, job_id, config)
    if not rows:
        raise SpiderError(f"source {config.source.dataset!r} (split {config.source.split!r}) has no rows")
    has_pre = record.has_bundle and _bundle_has(ctx, job_id, "has_pre_processor")
    if not has_pre:
        prompt_of(rows[0], config.source.field, 0)  # a field missing from the rows fails the job here

    files = ctx.files(job_id)
    size = config.generation.max_batch_size
    batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    for batch_index, chunk in enumerate(batches):
        first = batch_index * size
        raw = [{"index": first + k, "data": row} for k, row in enumerate(chunk)]
        if has_pre:
            write_atomic(files.root / "inputs" / f"{batch_index:06d}.json", json.dumps(raw))
        else:
            prepared = [_prepare(config, item["index"], item["data"]) for item in raw]
            write_atomic(files.batch(batch_index), json.dumps([asdict(r) for r in prepared]))
    ctx.store.set_fields(job_id, rows_total=len(rows), batches_total=len(batches))
    ctx.bus.publish(
        job_id,
        "job.planned",
        f"{len(rows)} rows in {len(batches)} batches of up to {size}",
        data={"rows_total": len(rows), "batches_total": len(batches), "duplications": config.generation.duplications},
    )
    for batch_index in range(len(batches)):
        (ctx.dispatch.preprocess if has_pre else ctx.dispatch.rollout)(job_id, batch_index)


def load_job_source(ctx: Context, job_id: str, config: JobConfig) -> list[dict[str, Any]]:
    """The job's source rows: from the files it uploaded when it did, else from the Hub or the
    operator's data roots, read with the job's own token and a datasets cache of the job's own,
    removed once the rows are loaded."""
    files = ctx.files(job_id)
    uploaded = json.loads(ctx.store.get_field(job_id, "source_upload") or "null")
    source = config.source
    if uploaded is not None:
        only = uploaded[0] if len(uploaded) == 1 else ""
        source = source.model_copy(update={"dataset": str(files.source_dir / only), "options": {
            k: v for k, v in source.options.items() if k not in ("data_files", "data_dir")}})
    cache = files.root / "datasets-cache"
    access = SourceAccess.for_job(ctx.settings.policy, files.source_dir if uploaded is not None else None, cache)
    try:
        return load_source_rows(source, token=ctx.store.secrets(job_id).get("HF_TOKEN"), access=access)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def resume_job(ctx: Context, job_id: str) -> None:
    """Hand out again every batch of a planned job that has not completed (idempotent)."""
    record = ctx.store.get(job_id)
    if record is None or record.status != "running" or record.batches_total is None:
        return
    done = ctx.store.done_batches(job_id)
    missing = [i for i in range(record.batches_total) if i not in done]
    files = ctx.files(job_id)
    for batch_index in missing:
        if files.batch(batch_index).exists():
            ctx.dispatch.rollout(job_id, batch_index)
        else:
            ctx.dispatch.preprocess(job_id, batch_index)
    if not missing and ctx.store.claim_finalize(job_id):
        ctx.dispatch.finalize(job_id)
    ctx.bus.publish(job_id, "job.resumed", f"{len(missing)} batches handed out again", data={"batches": missing})


def _bundle_has(ctx: Context, job_id: str, part: str) -> bool:
    manifest = ctx.files(job_id).root / "bundle.manifest.json"
    return manifest.exists() and bool(json.loads(manifest.read_text()).get(part))


def _prepare(config: JobConfig, index: int, data: dict[str, Any]) -> BatchRow:
    try:
        return BatchRow(index=index, prompt=prompt_of(data, config.source.field, index), data=data)
    except SpiderError as exc:
        return BatchRow(index=index, prompt=None, data=data, error={"type": "SourceError", "message": str(exc)})


# -- generate -----------------------------------------------------------------------------------


def build_requests(config: JobConfig, rows: list[BatchRow]) -> list[GenerationRequest]:
    seed = config.generation.parameters.seed
    requests = []
    for row in rows:
        if row.prompt is None:
            continue
        messages = []
        system = choose_system_prompt(config.generation.system_prompt, seed, row.index)
        if system:
            messages.append(Message(role="system", content=system))
        messages.append(Message(role="user", content=row.prompt))
        requests.append(
            GenerationRequest(
                key=str(row.index), messages=messages, n=config.generation.duplications, seed=row_seed(seed, row.index)
            )
        )
    return requests


def records_for(
    job_id: str, config: JobConfig, rows: list[BatchRow], results: dict[str, GenerationResult], requests: dict[str, GenerationRequest]
) -> list[Record]:
    """One record per (row, sample), in row order; failures become error records."""
    records = []
    for row in rows:
        request = requests.get(str(row.index))
        messages = [m.to_openai() for m in request.messages] if request else []
        result = results.get(str(row.index))
        for sample in range(config.generation.duplications):
            base = dict(
                id=row_id(job_id, row.index, sample),
                row_index=row.index,
                sample_index=sample,
                prompt=row.prompt or "",
                messages=messages,
                source=row.data,
            )
            if row.error is not None:
                records.append(Record(completion=None, error=row.error, **base))
            elif result is None or result.error is not None or sample >= len(result.completions):
                message = (result.error if result else None) or "the engine returned no completion"
                records.append(Record(completion=None, error={"type": "GenerationError", "message": message}, **base))
            else:
                completion = result.completions[sample]
                records.append(
                    Record(
                        completion=completion.text,
                        finish_reason=completion.finish_reason,
                        usage=completion.usage,
                        **{**base, "messages": messages + [{"role": "assistant", "content": completion.text}]},
                    )
                )
    return records


@guarded
def run_batch(ctx: Context, job_id: str, batch_index: int) -> None:
    """Generate one batch with the job's engine and write its shard."""
    from spider.engines import load_engine, sampling_params

    config, record = load_job(ctx, job_id)
    if record.status != "running":
        return  # cancelled or failed: generate nothing more
    files = ctx.files(job_id)
    rows = [BatchRow(**r) for r in json.loads(files.batch(batch_index).read_text())]
    requests = build_requests(config, rows)
    started = time.perf_counter()
    results: dict[str, GenerationResult] = {}
    if requests:
        engine = load_engine(config.model, ctx.store.secrets(job_id))
        try:
            results = {r.key: r for r in engine.generate(requests, sampling_params(config.generation.parameters))}
        except SpiderError:
            raise
        except Exception as exc:  # the engine failed for the whole batch: its rows become error records
            log.error("job %s batch %d: engine failed:\n%s", job_id, batch_index, traceback.format_exc())
            results = {r.key: GenerationResult(key=r.key, error=f"{type(exc).__name__}: {exc}") for r in requests}
    elapsed = time.perf_counter() - started
    records = records_for(job_id, config, rows, results, {r.key: r for r in requests})

    has_post = record.has_bundle and _bundle_has(ctx, job_id, "has_post_processor")
    target = files.root / "generated" / f"{batch_index:06d}.jsonl" if has_post else files.shard(batch_index)
    write_atomic(target, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))
    usage = Usage()
    for r in records:
        usage += r.usage
    dropped_file = files.root / "batches" / f"{batch_index:06d}.dropped"
    dropped = int(dropped_file.read_text()) if dropped_file.exists() else 0
    counts = dict(
        rows_done=len(rows) + dropped,  # rows the pre-processor dropped are done too
        dropped=dropped,
        records=len(records),
        row_errors=len({r.row_index for r in records if r.error is not None}),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        error_examples=[f"row {r.row_index}: {r.error['message']}" for r in records if r.error is not None][:3],
    )
    if has_post:
        write_atomic(
            files.root / "generated" / f"{batch_index:06d}.counts.json",
            json.dumps({**counts, "generation_seconds": elapsed}),
        )
        ctx.dispatch.postprocess(job_id, batch_index)
        _report_generation(ctx, job_id, batch_index, counts, elapsed)
        return
    complete_batch(ctx, job_id, batch_index, counts, generation_seconds=elapsed)


def _report_generation(ctx: Context, job_id: str, batch_index: int, counts: dict[str, int], elapsed: float) -> None:
    ctx.bus.publish(
        job_id,
        "batch.generated",
        f"batch {batch_index} generated ({counts['completion_tokens']} tokens in {elapsed:.1f}s)",
        data={"batch": batch_index, **counts, "seconds": elapsed},
    )


def complete_batch(
    ctx: Context, job_id: str, batch_index: int, counts: dict[str, int], generation_seconds: float = 0.0
) -> None:
    """Count a finished batch once, report progress, enforce max_row_errors, maybe finalize."""
    first, done = ctx.store.mark_batch_done(job_id, batch_index)
    if not first:
        return  # a redelivered task: its shard was rewritten identically, count nothing twice
    examples = counts.pop("error_examples", [])
    totals = ctx.store.add_progress(job_id, generation_seconds=generation_seconds, batches_done=1, **counts)
    counts["error_examples"] = examples
    config, record = load_job(ctx, job_id)
    if record.status != "running":
        return  # cancelled or failed meanwhile: its history already ended
    gen_s = totals.get("generation_seconds", 0.0)
    ctx.bus.publish(
        job_id,
        "batch.completed",
        f"batch {batch_index} done: {int(totals.get('rows_done', 0))}/{record.rows_total} rows",
        data={
            "batch": batch_index,
            "batches_done": done,
            "batches_total": record.batches_total,
            "rows_done": int(totals.get("rows_done", 0)),
            "rows_total": record.rows_total,
            "records": int(totals.get("records", 0)),
            "row_errors": int(totals.get("row_errors", 0)),
            "completion_tokens": int(totals.get("completion_tokens", 0)),
            "batch_completion_tokens": counts.get("completion_tokens", 0),
            "tokens_per_second": counts.get("completion_tokens", 0) / generation_seconds if generation_seconds else None,
            "generation_seconds": gen_s,
            "tokens_per_second_total": totals.get("completion_tokens", 0) / gen_s if gen_s else None,
            "elapsed": time.time() - (record.started_at or record.created_at),
        },
    )
    if counts.get("row_errors"):
        ctx.bus.publish(
            job_id,
            "batch.row_errors",
            f"batch {batch_index}: {counts['row_errors']} rows failed",
            level="warning",
            data={"batch": batch_index, "row_errors": counts["row_errors"], "examples": counts.get("error_examples", [])},
        )
    limit = config.generation.max_row_errors
    errors = int(totals.get("row_errors", 0))
    if limit is not None and errors > limit:
        fail_job(ctx, job_id, f"{errors} rows failed, more than generation.max_row_errors={limit}")
        return
    if record.batches_total is not None and done >= record.batches_total and ctx.store.claim_finalize(job_id):
        ctx.dispatch.finalize(job_id)


# -- finalize -----------------------------------------------------------------------------------


@guarded
def finalize_job(ctx: Context, job_id: str) -> None:
    """Merge shards in row order into the result, write metadata, upload if asked, complete the job."""
    config, record = load_job(ctx, job_id)
    if record.status in TERMINAL:
        return
    files = ctx.files(job_id)
    missing = [i for i in range(record.batches_total or 0) if not files.shard(i).exists()]
    if missing:
        raise SpiderError(f"cannot finalize: shards missing for batches {missing[:10]}")
    errors = int(record.progress.get("row_errors", 0))
    rows_total = record.rows_total or 0
    if config.generation.max_row_errors is None and rows_total and errors >= rows_total:
        first_error = _first_error(files, record.batches_total or 0)
        raise SpiderError(f"every row failed; first error: {first_error}")

    def merged():
        for i in range(record.batches_total or 0):
            yield from read_jsonl(files.shard(i))

    result = files.result(config.output.format)
    count = write_result(merged(), result, config.output.format)
    finished = time.time()
    metadata = {
        "job_id": job_id,
        "config": record.public()["config"],
        "counts": {
            "rows": rows_total,
            "records": count,
            "row_errors": errors,
            "dropped": int(record.progress.get("dropped", 0)),
            "batches": record.batches_total,
            "duplications": config.generation.duplications,
        },
        "usage": {
            "prompt_tokens": int(record.progress.get("prompt_tokens", 0)),
            "completion_tokens": int(record.progress.get("completion_tokens", 0)),
        },
        "timings": {
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finalized_at": finished,
            "queued_seconds": (record.started_at or record.created_at) - record.created_at,
            "total_seconds": finished - record.created_at,
            "generation_seconds": record.progress.get("generation_seconds", 0.0),
        },
        "format": config.output.format,
    }
    if config.output.mode == "upload_hf" and config.output.hf is not None:
        hf = config.output.hf
        write_atomic(files.metadata, json.dumps(metadata, indent=2))
        ctx.bus.publish(job_id, "upload.started", f"uploading to the Hub repo {hf.repo_id}")
        url = upload_to_hub(result, files.metadata, hf, ctx.store.secrets(job_id).get(hf.token_env), job_id)
        metadata["hub"] = {"repo_id": hf.repo_id, "repo_type": hf.repo_type, "commit": url}
        ctx.bus.publish(job_id, "upload.completed", f"uploaded to {hf.repo_id}", data=metadata["hub"])
    write_atomic(files.metadata, json.dumps(metadata, indent=2))
    if ctx.store.transition(job_id, "completed", ["running"]):
        ctx.store.drop_secrets(job_id)
        ctx.bus.publish(
            job_id,
            "job.completed",
            f"{count} records written ({errors} row errors)",
            data={"records": count, **metadata["counts"], **metadata["usage"]},
        )


def _first_error(files: JobFiles, batches: int) -> str:
    for i in range(batches):
        for record in read_jsonl(files.shard(i)):
            if record.get("error"):
                return record["error"].get("message", "")
    return "unknown"


def cancel_job(ctx: Context, job_id: str) -> bool:
    """Stop a job: no further batch starts generating. True if it was active."""
    if ctx.store.transition(job_id, "cancelled", ["queued", "running"]):
        ctx.store.drop_secrets(job_id)
        ctx.bus.publish(job_id, "job.cancelled", "job cancelled", level="warning")
        return True
    return False
