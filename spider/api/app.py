"""The HTTP API: validate, authenticate, store, enqueue, stream. It never loads a model and never
runs user code."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets as pysecrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from spider import __version__
from spider.config import JobConfig
from spider.errors import BundleError, ConfigError
from spider.events import EventBus, follow
from spider.jobs import dataset
from spider.jobs.store import TERMINAL, JobFiles, JobStore, write_atomic
from spider.settings import Settings

BODY_KEYS = {"job", "env", "bundle", "source_files"}


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(client)
    bus = EventBus(client, settings.event_history)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.aredis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        yield
        await app.state.aredis.aclose()

    app = FastAPI(title="Spider", version=__version__, lifespan=lifespan)

    def dispatcher():
        from spider.workers.tasks import CeleryDispatcher

        return CeleryDispatcher()

    def context() -> dataset.Context:
        return dataset.Context(settings, store, bus, dispatcher())

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
        record = store.get(job_id)
        if record is None or record.owner != owner:
            raise HTTPException(404, f"no job {job_id!r}")
        return record

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            client.ping()
        except redis.RedisError as exc:
            return JSONResponse({"status": "error", "redis": str(exc)}, status_code=503)
        return {"status": "ok", "version": __version__, "auth": bool(settings.api_keys)}

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, owner: str = Depends(caller)) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(422, "the request body must be JSON: {job, env, bundle}") from None
        if not isinstance(body, dict) or "job" not in body:
            raise HTTPException(422, "the request body must be a JSON object with a `job` key")
        unknown = set(body) - BODY_KEYS
        if unknown:
            raise HTTPException(422, f"unknown request keys {sorted(unknown)}; expected {sorted(BODY_KEYS)}")
        try:
            job = JobConfig.parse(body["job"])
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        if job.generation.on_policy:
            raise HTTPException(
                422, "job.generation.on_policy: on-policy training jobs are not served by this server version"
            )
        if job.model.provider == "tinker":
            raise HTTPException(422, "job.model.provider: 'tinker' serves on-policy jobs only; use vllm, openai or hf")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise HTTPException(422, "env must map variable names to string values")
        bundle = _decode_bundle(body.get("bundle"), settings.max_bundle_bytes)
        source_files = _decode_source_files(body.get("source_files"), settings.max_bundle_bytes)
        config = job.model_dump(mode="json")
        record = store.create(owner, config, env, has_bundle=bundle is not None)
        files = JobFiles(settings.data_dir, record.id)
        if source_files:
            # The job reads the copy sent with it, wherever its workers run.
            for name, data in source_files.items():
                write_atomic(files.root / "source" / name, data)
            only = next(iter(source_files)) if len(source_files) == 1 else None
            config["source"]["dataset"] = str(files.root / "source" / (only or ""))
            store.set_fields(record.id, config=json.dumps(config), source_label=job.source.dataset)
        if bundle is not None:
            write_atomic(files.bundle, bundle.data)
            write_atomic(files.root / "bundle.manifest.json", json.dumps(bundle.manifest))
        bus.publish(record.id, "job.queued", "job queued")
        from spider.workers.tasks import plan_job

        plan_job.apply_async((record.id,), queue="control")
        return {"job_id": record.id, "status": record.status}

    @app.get("/v1/jobs")
    def list_jobs(limit: int = 100, owner: str = Depends(caller)) -> dict[str, Any]:
        return {"jobs": [r.public() for r in store.list_for(owner, limit)]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        return owned(job_id, owner).public()

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, owner: str = Depends(caller)) -> dict[str, Any]:
        owned(job_id, owner)
        dataset.cancel_job(context(), job_id)
        return owned(job_id, owner).public()

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
        aredis = request.app.state.aredis

        async def finished() -> bool:
            status = await aredis.hget(f"spider:job:{job_id}", "status")
            return status in TERMINAL

        async def stream():
            yield "retry: 2000\n\n"
            if not follow_live:
                for event in bus.replay(job_id, after=last_event_id or after):
                    yield _sse(event)
                return
            async for event in follow(aredis, job_id, after=last_event_id or after, is_finished=finished):
                if await request.is_disconnected():
                    return
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                yield _sse(event)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/result")
    def result(job_id: str, owner: str = Depends(caller)):
        record = owned(job_id, owner)
        if record.status != "completed":
            raise HTTPException(409, f"job {job_id} is {record.status}; its result exists once it is completed")
        fmt = record.config.get("output", {}).get("format", "jsonl")
        path = JobFiles(settings.data_dir, job_id).result(fmt)
        if not path.exists():
            raise HTTPException(410, f"the result of job {job_id} is no longer stored")
        media = "application/x-ndjson" if fmt == "jsonl" else "application/vnd.apache.parquet"
        return FileResponse(path, media_type=media, filename=f"{job_id}.{fmt}")

    @app.get("/v1/jobs/{job_id}/metadata")
    def metadata(job_id: str, owner: str = Depends(caller)):
        owned(job_id, owner)
        path = JobFiles(settings.data_dir, job_id).metadata
        if not path.exists():
            raise HTTPException(409, f"job {job_id} has no metadata yet")
        return JSONResponse(json.loads(path.read_text()))

    return app


def _sse(event) -> str:
    """One Server-Sent Events message; its id lets a reconnecting client resume (Last-Event-ID)."""
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.to_dict())}\n\n"


class _Bundle:
    def __init__(self, data: bytes, manifest: dict[str, Any]):
        self.data = data
        self.manifest = manifest


def _decode_source_files(encoded: Any, limit: int) -> dict[str, bytes]:
    if not encoded:
        return {}
    if not isinstance(encoded, dict):
        raise HTTPException(422, "source_files must map file names to base64 strings")
    out, total = {}, 0
    for name, data in encoded.items():
        parts = Path(name).parts
        if not isinstance(data, str) or Path(name).is_absolute() or ".." in parts or not parts:
            raise HTTPException(422, f"source_files: bad entry {name!r}")
        try:
            out[name] = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"source_files: {name!r} is not valid base64") from None
        total += len(out[name])
        if total > limit:
            raise HTTPException(413, f"source files are larger than the server's limit of {limit} bytes")
    return out


def _decode_bundle(encoded: Any, limit: int) -> _Bundle | None:
    if encoded in (None, ""):
        return None
    if not isinstance(encoded, str):
        raise HTTPException(422, "bundle must be a base64 string")
    if len(encoded) * 3 // 4 > limit:
        raise HTTPException(413, f"bundle is larger than the server's limit of {limit} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "bundle is not valid base64") from None
    from spider.client.bundle import bundle_manifest

    try:
        manifest = bundle_manifest(data)
    except BundleError as exc:
        raise HTTPException(422, f"bundle: {exc}") from None
    return _Bundle(data, manifest)


app = create_app()
