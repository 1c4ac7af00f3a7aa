"""The HTTP API: validate, authenticate, store, enqueue, stream. It never loads a model and never
runs user code."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import secrets as pysecrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from spider import __version__
from spider.api.metrics import add_metrics_route
from spider.api.submission import Submission, parse_submission
from spider.artifacts import ArtifactPath, StorePath, artifact_root, remove, unreachable_errors
from spider.errors import SpiderError
from spider.events import EventBus, follow
from spider.jobs import recovery, retention, stages
from spider.jobs.dataset import FINALIZE_PARTIAL, has_partial_result
from spider.jobs.store import DamagedRecord, JobFiles, JobStore, is_job_id, new_job_id, write_atomic
from spider.logs import JobLogContext
from spider.settings import Settings
from spider.types import EventKind, JobStatus

log = logging.getLogger(__name__)

EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
UINT64_MAX = 2**64 - 1
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
DOWNLOAD_BLOCK = 1024 * 1024


def is_event_id(value: str) -> bool:
    """Whether `value` is a Redis stream id (`<ms>-<seq>`, each a 64-bit unsigned number)."""
    return EVENT_ID.fullmatch(value) is not None and all(int(part) <= UINT64_MAX for part in value.split("-"))


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(client)
    bus = EventBus(client, settings.event_history, ended_ttl=settings.event_ttl_s, keys=store.keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.aredis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        yield
        await app.state.aredis.aclose()

    app = FastAPI(title="Spider", version=__version__, lifespan=lifespan)
    # The whole request body is bounded while it arrives, before anything parses it.
    app.add_middleware(BodyLimit, limit=settings.max_bundle_bytes)
    app.add_middleware(JobLogContext)

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        # The job store is down or refused the command: the caller may try again; nothing is wrong with its request.
        log.error("Redis error while answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": "the job store (Redis) is unavailable; try again later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The bucket cannot be reached: as with Redis, the caller may try again.
        log.error("artifact store error while answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "the artifact store is unavailable; try again later"}, status_code=503,
                            headers={"Retry-After": "5"})

    for unreachable in unreachable_errors():
        app.add_exception_handler(unreachable, store_unavailable)

    def dispatcher():
        from spider.workers.tasks import CeleryDispatcher

        return CeleryDispatcher()

    def context() -> stages.Context:
        return stages.Context(settings, store, bus, dispatcher())

    def caller(authorization: str | None = Header(default=None)) -> str:
        """The owner id of the caller's API key; every caller is 'local' when no keys are configured."""
        if not settings.api_keys:
            return "local"
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'")
        if not any(pysecrets.compare_digest(token, key) for key in settings.api_keys):
            raise HTTPException(401, "invalid API key")
        return owner_of(token)

    def owned(job_id: str, owner: str):
        """The caller's own job; anything else (another key's job, a string that is not a job id)
        is a 404 that reads no key."""
        try:
            record = store.get(job_id) if is_job_id(job_id) else None
        except DamagedRecord as exc:
            if exc.owner != owner:
                raise HTTPException(404, f"no job {job_id[:40]!r}") from None
            log.error("%s", exc)
            raise HTTPException(409, f"{exc}; the server's operator has been told") from None
        if record is None or record.owner != owner:
            raise HTTPException(404, f"no job {job_id[:40]!r}")
        return record

    add_metrics_route(app, client, store.keys, settings.metrics_token)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            client.ping()
        except redis.RedisError as exc:
            return JSONResponse({"status": "error", "redis": str(exc)}, status_code=503)
        return {"status": "ok", "version": __version__, "auth": bool(settings.api_keys)}

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, owner: str = Depends(caller)) -> dict[str, Any]:
        submission = parse_submission(await request.body(), settings)
        return await run_in_threadpool(accept, owner, submission)

    def accept(owner: str, submission: Submission) -> dict[str, Any]:
        """Store and enqueue a validated job, all or nothing: its files first (under a new id), then
        its record, then the queue. On any failure every trace is removed and the caller told."""
        job_id, files = new_job_dir(settings)
        stage = "storing the job's files"
        try:
            for name, data in submission.source_files.items():
                write_atomic(files.source_dir / name, data)
            if submission.bundle is not None:
                write_atomic(files.bundle, submission.bundle.data)
                write_atomic(files.bundle_manifest, json.dumps(submission.bundle.manifest.to_dict()))
            stage = "recording the job"
            config = submission.job.model_dump(mode="json")
            record = store.create(owner, config, submission.env, has_bundle=submission.bundle is not None, job_id=job_id)
            uploaded = sorted(submission.source_files) or None
            if uploaded:
                store.set_fields(job_id, source_upload=json.dumps(uploaded))
            recovery.write_snapshot(files, record, uploaded)
            bus.publish(job_id, EventKind.JOB_QUEUED, "job queued")
            stage = "queueing the job"
            context().dispatch(submission.first_stage, job_id)
        except Exception as exc:
            log.error("submit of job %s failed while %s", job_id, stage, exc_info=True)
            roll_back(job_id, owner, files)
            raise HTTPException(*_failure(stage, exc)) from None
        return {"job_id": job_id, "status": JobStatus.QUEUED}

    def roll_back(job_id: str, owner: str, files: JobFiles) -> None:
        """Remove what a failed submit left: files, record, secrets, owner index entry, events."""
        undo = (lambda: store.discard(job_id, owner), lambda: bus.delete(job_id), lambda: remove(files.root))
        for step in undo:
            try:
                step()
            except Exception:
                log.error("could not remove part of the failed job %s", job_id, exc_info=True)

    paths = ServerPaths(settings.data_dir, artifact_root(settings))

    def shown(record) -> dict[str, Any]:
        return paths.hidden(record.public(), record.id)

    @app.get("/v1/jobs")
    def list_jobs(limit: int = Query(100, ge=1, le=1000), owner: str = Depends(caller)) -> dict[str, Any]:
        return {"jobs": [shown(r) for r in store.list_for(owner, limit)]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        return shown(owned(job_id, owner))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        """Stop the caller's job; a dataset job's rows done so far become its partial result."""
        record = owned(job_id, owner)
        ctx = context()
        if stages.cancel_job(ctx, job_id) and not is_on_policy(record.config):
            ctx.dispatch(FINALIZE_PARTIAL, job_id)
        return shown(owned(job_id, owner))

    @app.post("/v1/jobs/{job_id}/resume")
    async def resume(job_id: str, request: Request, owner: str = Depends(caller)) -> dict[str, Any]:
        """Bring the caller's job back to work: a failed one runs again from where it stopped (its
        secrets sent again in `{"secrets": {...}}`: a failed job's are dropped), an active one has
        whatever it lost handed out again now."""
        owned(job_id, owner)
        body = await request.body()
        try:
            given = json.loads(body) if body.strip() else {}
            secrets = given.get("secrets") or {} if isinstance(given, dict) else None
            if not isinstance(secrets, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in secrets.items()):
                raise ValueError
        except ValueError:
            raise HTTPException(400, 'the body must be a JSON object like {"secrets": {"NAME": "value"}}') from None
        try:
            handed = await run_in_threadpool(recovery.resume, context(), job_id, secrets)
        except SpiderError as exc:
            raise HTTPException(409, str(exc)) from None
        return {**shown(owned(job_id, owner)), "handed_out": handed}

    @app.delete("/v1/jobs/{job_id}")
    def delete(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        """Remove the caller's job (cancelled first if it still runs): record, events and files."""
        owned(job_id, owner)
        retention.delete_job(context(), job_id)
        return {"job_id": job_id, "deleted": True}

    @app.get("/v1/jobs/{job_id}/events")
    async def events(
        job_id: str,
        request: Request,
        owner: str = Depends(caller),
        last_event_id: str | None = Header(default=None),
        after: str | None = None,
        follow_live: bool = Query(True, alias="follow"),
    ) -> StreamingResponse:
        owned(job_id, owner)
        after = last_event_id or after
        if after is not None and not is_event_id(after):
            # Refused before the stream starts: once it has, an error could only cut it short.
            raise HTTPException(400, "after / Last-Event-ID must be an event id such as '1700000000000-0' "
                                     "(two numbers below 2**64)")
        aredis = request.app.state.aredis

        async def finished() -> bool:
            status = await aredis.hget(store.keys.job(job_id), "status")
            return status is not None and JobStatus(status).ended

        async def stream():
            yield "retry: 2000\n\n"
            if not follow_live:
                for event in bus.replay(job_id, after=after):
                    yield _sse(event, paths)
                return
            async for event in follow(aredis, job_id, after=after, is_finished=finished, keys=store.keys):
                if await request.is_disconnected():
                    return
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                yield _sse(event, paths)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def partial_pending(job_id: str, record, files: JobFiles) -> HTTPException | None:
        """The 409 of a cancelled dataset job whose partial result is not written yet."""
        if record.status != JobStatus.CANCELLED or is_on_policy(record.config) or has_partial_result(files):
            return None
        return HTTPException(
            409, f"job {job_id} was cancelled; its partial result (the rows done before the cancel) is being "
                 "assembled: try again in a moment", headers={"Retry-After": "2"},
        )

    @app.get("/v1/jobs/{job_id}/result")
    def result(job_id: str, owner: str = Depends(caller)):
        """A completed job's result, or a cancelled dataset job's partial one (its metadata says so)."""
        record = owned(job_id, owner)
        files = JobFiles.of(settings, job_id)
        pending = partial_pending(job_id, record, files)
        if pending is not None:
            raise pending
        if record.status == JobStatus.CANCELLED and is_on_policy(record.config):
            raise HTTPException(409, f"training job {job_id} was cancelled: it has no result (its last checkpoint "
                                     "is not an exported adapter)")
        if record.status not in (JobStatus.COMPLETED, JobStatus.CANCELLED):
            raise HTTPException(409, f"job {job_id} is {record.status}; its result exists once it is completed")
        if is_on_policy(record.config):
            # A training job's result: the adapter, its metrics and their plot, as one archive.
            path, media, name = files.archive, "application/gzip", f"{job_id}.tar.gz"
        else:
            fmt = record.config.get("output", {}).get("format", "jsonl")
            media = "application/x-ndjson" if fmt == "jsonl" else "application/vnd.apache.parquet"
            path, name = files.result(fmt), f"{job_id}.{fmt}"
        if not path.exists():
            raise HTTPException(410, f"the result of job {job_id} is no longer stored")
        return download(path, media, name)

    @app.get("/v1/jobs/{job_id}/metrics")
    def metrics(job_id: str, owner: str = Depends(caller)):
        """A training job's metrics so far, one object per step (metrics.jsonl)."""
        record = owned(job_id, owner)
        if not is_on_policy(record.config):
            raise HTTPException(404, f"job {job_id} is not a training job; it has no training metrics")
        path = JobFiles.of(settings, job_id).metrics
        from spider.data.sinks import read_jsonl

        return {"job_id": job_id, "steps": list(read_jsonl(path)) if path.exists() else []}

    @app.get("/v1/jobs/{job_id}/metadata")
    def metadata(job_id: str, owner: str = Depends(caller)):
        record = owned(job_id, owner)
        files = JobFiles.of(settings, job_id)
        pending = partial_pending(job_id, record, files)
        if pending is not None:
            raise pending
        path = files.metadata
        if not path.exists():
            raise HTTPException(409, f"job {job_id} has no metadata yet")
        return JSONResponse(paths.hidden(json.loads(path.read_text()), job_id))

    return app


def download(path: ArtifactPath, media: str, name: str):
    """A stored file as a download: from disk as a file response; from a bucket streamed through,
    a block at a time, so that a result of any size never sits whole in the API's memory."""
    if not isinstance(path, StorePath):
        return FileResponse(path, media_type=media, filename=name)
    handle = path.open("rb")

    def blocks():
        with handle:
            while block := handle.read(DOWNLOAD_BLOCK):
                yield block

    headers = {"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(handle.size)}
    return StreamingResponse(blocks(), media_type=media, headers=headers)


def is_on_policy(config: dict[str, Any]) -> bool:
    return bool((config.get("generation") or {}).get("on_policy"))


def _sse(event, paths: "ServerPaths") -> str:
    """One Server-Sent Events message; its id lets a reconnecting client resume (Last-Event-ID)."""
    data = json.dumps(paths.hidden(event.to_dict(), event.job_id))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


class ServerPaths:
    """Takes the server's own paths out of what the API returns. Workers' messages may name the
    files they read (a source that failed to load); the submitter sees its uploaded files by the
    names it sent, and never where the server keeps them."""

    def __init__(self, data_dir: Path, store: ArtifactPath | None = None):
        roots: list[ArtifactPath] = [Path(data_dir), Path(data_dir).resolve()]
        if isinstance(store, StorePath):
            roots.append(store)
        self.roots = list(dict.fromkeys(roots))

    def hidden(self, value: Any, job_id: str) -> Any:
        pairs = [(str(root), "<data dir>") for root in self.roots]
        for root in self.roots:
            files = JobFiles(root, job_id)
            pairs += [(f"{files.source_dir}/", ""), (str(files.source_dir), "<uploaded files>"),
                      (str(files.root), "<job dir>")]
        pairs.sort(key=lambda pair: -len(pair[0]))  # the most specific path first
        return _replaced(value, pairs)


def _replaced(value: Any, pairs: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        value = _as_text(value)
        for old, new in pairs:
            if old in value:
                value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {_replaced(k, pairs): _replaced(v, pairs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replaced(v, pairs) for v in value]
    return value


def _as_text(value: str) -> str:
    """`value` with any lone surrogate (which no answer can encode) shown as U+FFFD, so that a
    stored record that holds one still reads."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub("\ufffd", value)
    return value


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413 as it arrives: a declared Content-Length
    is checked before reading anything, a chunked body is counted chunk by chunk. The app then
    reads the body from memory, so no route ever sees (or parses) more than `limit` bytes."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await _refuse(scope, receive, send, 400, "Content-Length must be a number of bytes")
                    return
                if int(value) > self.limit:
                    await self._too_large(scope, receive, send)
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: list[dict[str, Any]] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        del chunks

        async def replay() -> dict[str, Any]:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _refuse(scope, receive, send, 413, f"the request body is larger than the server's limit of "
                      f"{self.limit} bytes (SPIDER_MAX_BUNDLE_BYTES)")


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, status: int, detail: str) -> None:
    # The connection closes after the answer: the rest of the body is never read.
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    await response(scope, receive, send)


def new_job_dir(settings: Settings) -> tuple[str, JobFiles]:
    """A fresh job id whose directory this call created (so a rollback removes only its own files)."""
    try:
        JobFiles.folder(artifact_root(settings)).mkdir(parents=True, exist_ok=True)
        for _ in range(8):
            job_id = new_job_id()
            files = JobFiles.of(settings, job_id)
            try:
                files.root.mkdir()
            except FileExistsError:
                continue  # an id in use: draw another
            return job_id, files
        raise FileExistsError("no free job id")
    except (OSError, *unreachable_errors()) as exc:
        log.error("cannot create a job directory under the data dir", exc_info=True)
        raise HTTPException(*_failure("storing the job's files", exc)) from None


def _failure(stage: str, exc: Exception) -> tuple[int, str]:
    """The status and message of a submit that failed on the server's side (no paths, no hosts)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        status, why = 507, "the server is out of disk space"
    elif isinstance(exc, OSError):
        status, why = 500, "the server cannot write to its data directory"
    elif isinstance(exc, unreachable_errors()):
        status, why = 503, "the artifact store is unavailable"
    else:
        status, why = 503, "the job store or queue is unavailable"
    return status, f"the job could not be submitted: {stage} failed ({why}); nothing was kept, submit it again later"


app = create_app()
