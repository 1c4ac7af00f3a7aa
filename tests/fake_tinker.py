"""A fake Tinker service for tests: a local HTTP server that the real `tinker` SDK talks to, backed
by Spider's own `LocalBackend` (one per created model), so training and sampling are real.

    from tests.fake_tinker import fake_tinker_server

    with fake_tinker_server(api_keys=["tml-test-key"]) as server:
        backend = TinkerBackend(str(model_dir), {"TINKER_API_KEY": "tml-test-key"}, base_url=server.url,
                                lora=LoraSpec(rank=4), seed=0)
        ...
        server.models[model_id].backend     # the LocalBackend behind a training run
        server.requests                     # (route, api key) of every request received

A base model name is what LocalBackend loads: a local model folder (spider.testing.build_tiny_model)
or a hub id spider.models.resolve_model finds offline (a model folder copied to
`spider.models.models_dir() / "org/name"` answers to "org/name", as a Tinker job's hub id must). Keys are checked as the service checks them:
an `X-API-Key` without the `tml-` prefix, or not among `api_keys`, is answered 401 on every route.
`make_backend` replaces LocalBackend (same `TrainingBackend` interface) for a test that needs to.

The routes are those SDK 0.38 uses to train, sample and export: client/config,
client/dynamic_config, create_session, session_heartbeat, sessions/{id}/finish, telemetry,
create_model, get_info, forward_backward, optim_step, save_weights, load_weights,
save_weights_for_sampler, save_weights_external, training_runs/{id}/checkpoints/{checkpoint}/
external_weights_urls (and the signed downloads it lists), DELETE of a checkpoint,
create_sampling_session, samplers/{id}, asample, retrieve_future, get_server_capabilities and
healthz; with the service's wire formats: JSON, and protobuf (the SDK's `tinker.proto`) for
forward_backward requests and for forward_backward and sample results. Work is asynchronous as on
the service: a request returns a future id, `retrieve_future` long-polls for its result, and the
requests of one training run execute in `seq_id` order whatever order they arrive in. A finished
session's runs and samplers are released; their checkpoints stay readable. Not served: custom
losses, optimizers other than Adam, inflight sampling clients, encrypted exports, the REST
listings. Differences that cannot be helped: `stop=[]` does not disable EOS (LocalBackend's
sampler always stops at it), and stop token ids cut the sample after the fact.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from spider.engines.base import Engine, GenerationRequest, SamplingParams, ScoreRequest
from spider.train.backend import AdamParams, Datum, LoraSpec, TrainingBackend

API_PREFIX = "/api/v1"
POLL_WAIT_S = 20.0  # retrieve_future holds a request this long before answering try_again
DEFAULT_MAX_TOKENS = 128
CHECKPOINT_ROUTE = r"/training_runs/(?P<model_id>[^/]+)/checkpoints/(?P<checkpoint_id>.+?)"


@dataclass(frozen=True)
class ModelSpec:
    """What a create_model request asks for, as the fake's backends take it."""

    base_model: str
    rank: int
    seed: int | None


BackendFactory = Callable[[ModelSpec, Path], TrainingBackend]


def local_backend(spec: ModelSpec, workdir: Path) -> TrainingBackend:
    """Spider's LocalBackend on the CPU: a LoRA of `spec.rank` over every linear layer, seeded with
    `spec.seed` (0 when the request names none, so runs of the fake repeat)."""
    from spider.train.local import LocalBackend

    return LocalBackend(spec.base_model, LoraSpec(rank=spec.rank), work_dir=workdir, device="cpu", seed=spec.seed or 0)


class Failure(Exception):
    """A request the fake service refuses: HTTP `status` with `detail`, as the service answers."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> "Reply":
        return cls(status, json.dumps(payload).encode())


class Pending:
    """A future of the service: its result is a JSON payload or protobuf bytes, or an error."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.done = threading.Event()
        self.reply: Reply | None = None

    def run(self, work: Callable[[], dict[str, Any] | bytes]) -> None:
        try:
            result = work()
        except Failure as exc:
            self.reply = Reply.json({"error": exc.detail, "category": "user"})
        except Exception as exc:  # the backend failed: the SDK raises RequestFailedError with this text
            self.reply = Reply.json({"error": f"{type(exc).__name__}: {exc}", "category": "server"})
        else:
            self.reply = (
                Reply(200, result, "application/x-protobuf") if isinstance(result, bytes) else Reply.json(result)
            )
        self.done.set()


class HostedModel:
    """One training run: its backend, and a worker that runs its requests in `seq_id` order (the
    service's promise: requests of one client execute in the order the client submitted them)."""

    def __init__(self, model_id: str, spec: ModelSpec, backend: TrainingBackend):
        self.model_id = model_id
        self.spec = spec
        self.backend = backend
        self.lock = threading.Lock()  # the backend and its samplers, one call at a time
        self._queue: dict[int, tuple[Pending, Callable[[], Any]]] = {}
        self._next_seq = 1
        self._ready = threading.Condition()
        self.closed = False
        threading.Thread(target=self._work, name=f"fake-tinker-{model_id}", daemon=True).start()

    def submit(self, seq_id: int, pending: Pending, work: Callable[[], Any]) -> None:
        with self._ready:
            if seq_id < self._next_seq or seq_id in self._queue:
                raise Failure(400, f"seq_id {seq_id} of model {self.model_id} was already used")
            self._queue[seq_id] = (pending, work)
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._ready:
                while self._next_seq not in self._queue and not self.closed:
                    self._ready.wait()
                if self.closed:
                    return
                pending, work = self._queue.pop(self._next_seq)
                self._next_seq += 1
            with self.lock:
                pending.run(work)

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify()
        with self.lock:
            self.backend.close()


@dataclass
class Checkpoint:
    """A saved state or sampler weights: the run that saved it and the backend's own path (which
    outlives the run: a finished session's checkpoints are read by a fresh backend of its spec)."""

    model: HostedModel
    local_path: str


@dataclass
class HostedSampler:
    """A sampling session: the weights it samples, and the engine over them, opened on first use
    on `host` (the run that saved them, or a reader backend once that run has closed)."""

    sampler_id: str
    base_model: str
    model_path: str | None
    checkpoint: Checkpoint
    host: HostedModel | None = None
    engine: Engine | None = None

    def open(self, host: HostedModel) -> Engine:
        if self.engine is None or self.host is not host:
            self.host, self.engine = host, host.backend.sampler(self.checkpoint.local_path)
        return self.engine

    def release(self) -> None:
        engine, self.engine, self.host = self.engine, None, None
        if engine is not None:
            engine.close()


@dataclass
class Session:
    session_id: str
    finished: bool = False
    heartbeats: int = 0
    model_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)


class FakeTinker:
    """The service's state and its routes; `FakeTinkerServer` puts it on a socket."""

    def __init__(
        self, api_keys: Iterable[str], make_backend: BackendFactory, workdir: Path, fwdbwd_max_chunk_len: int = 1024
    ):
        self.api_keys = set(api_keys)
        self.make_backend = make_backend
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fwdbwd_max_chunk_len = fwdbwd_max_chunk_len
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, HostedModel] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self.samplers: dict[str, HostedSampler] = {}
        self.futures: dict[str, Pending] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.telemetry_batches = 0
        self._base_samplers: dict[str, Checkpoint] = {}
        self._readers: dict[ModelSpec, HostedModel] = {}
        self._downloads: dict[str, Path] = {}  # the token of a signed download URL -> its folder
        self.url = ""  # set once the server listens: signed download URLs point at it
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-tinker")
        self._counter = itertools.count()
        self._routes: dict[tuple[str, str], Callable[[dict[str, str], bytes], Reply]] = {
            ("POST", "/client/config"): self.client_config,
            ("POST", "/client/dynamic_config"): self.dynamic_config,
            ("POST", "/create_session"): self.create_session,
            ("POST", "/session_heartbeat"): self.session_heartbeat,
            ("POST", "/telemetry"): self.telemetry,
            ("POST", "/create_model"): self.create_model,
            ("POST", "/get_info"): self.get_info,
            ("POST", "/forward_backward"): self.forward_backward,
            ("POST", "/optim_step"): self.optim_step,
            ("POST", "/save_weights"): self.save_weights,
            ("POST", "/load_weights"): self.load_weights,
            ("POST", "/save_weights_for_sampler"): self.save_weights_for_sampler,
            ("POST", "/save_weights_external"): self.save_weights_external,
            ("POST", "/create_sampling_session"): self.create_sampling_session,
            ("POST", "/asample"): self.asample,
            ("POST", "/retrieve_future"): self.retrieve_future,
            ("GET", "/get_server_capabilities"): self.server_capabilities,
            ("GET", "/healthz"): lambda headers, body: Reply.json({"status": "ok"}),
        }
        self._patterns: list[tuple[str, re.Pattern[str], Callable[..., Reply]]] = [
            ("POST", re.compile(r"/sessions/(?P<session_id>[^/]+)/finish"), self.finish_session),
            ("GET", re.compile(r"/samplers/(?P<sampler_id>[^/]+)"), self.get_sampler),
            ("GET", re.compile(rf"{CHECKPOINT_ROUTE}/external_weights_urls"), self.external_weights_urls),
            ("DELETE", re.compile(CHECKPOINT_ROUTE), self.delete_checkpoint),
        ]

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        api_key = headers.get("x-api-key")
        route = path.split("?", 1)[0].removeprefix(API_PREFIX)
        with self._lock:
            self.requests.append((route, api_key))
        if method == "GET" and path.startswith("/files/"):  # a signed URL: the token is the credential
            return self.download(path.split("?", 1)[0].removeprefix("/files/"))
        if not path.startswith(API_PREFIX):
            return Reply.json({"detail": f"no route {path}"}, 404)
        if not api_key or not api_key.startswith("tml-"):
            return Reply.json({"detail": "Invalid API key format: Tinker keys start with 'tml-'"}, 401)
        if api_key not in self.api_keys:
            return Reply.json({"detail": "Invalid API key"}, 401)
        try:
            handler = self._routes.get((method, route))
            if handler is not None:
                return handler(headers, body)
            for verb, pattern, matched_handler in self._patterns:
                match = pattern.fullmatch(route)
                if verb == method and match:
                    return matched_handler(**match.groupdict())
            return Reply.json({"detail": f"no route {method} {path}"}, 404)
        except Failure as exc:
            return Reply.json({"detail": exc.detail}, exc.status)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed request: 400, which the SDK does not retry
            return Reply.json({"detail": f"malformed request: {type(exc).__name__}: {exc}"}, 400)

    def _future(self, work: Callable[[], Any], model: HostedModel | None = None, seq_id: int | None = None,
                extra: dict[str, Any] | None = None) -> Reply:
        """A new future running `work`: in `model`'s order at `seq_id`, or on the pool."""
        pending = Pending(f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}")
        with self._lock:
            self.futures[pending.request_id] = pending
        if model is not None and seq_id is not None:
            model.submit(seq_id, pending, work)
        else:
            self._pool.submit(pending.run, work)
        payload = {"request_id": pending.request_id, **(extra or {})}
        if model is not None:
            payload.setdefault("model_id", model.model_id)
        return Reply.json(payload)

    def retrieve_future(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        with self._lock:
            pending = self.futures.get(request["request_id"])
        if pending is None:
            raise Failure(404, f"no future {request['request_id']}")
        if not pending.done.wait(POLL_WAIT_S):
            return Reply.json({"type": "try_again", "queue_state": "active"})
        assert pending.reply is not None
        return pending.reply

    # -- session ----------------------------------------------------------------------------

    def client_config(self, headers: dict[str, str], body: bytes) -> Reply:
        return Reply.json(
            {
                "pjwt_auth_enabled": False,
                "parallel_fwdbwd_chunks": True,
                "fwdbwd_max_chunk_len": self.fwdbwd_max_chunk_len,
                "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
            }
        )

    def dynamic_config(self, headers: dict[str, str], body: bytes) -> Reply:
        return Reply.json({"refresh_interval_sec": 300, "sample_cancel_enabled": False})

    def create_session(self, headers: dict[str, str], body: bytes) -> Reply:
        session = Session(f"session-{uuid.uuid4().hex[:12]}")
        with self._lock:
            self.sessions[session.session_id] = session
        return Reply.json({"type": "create_session", "session_id": session.session_id})

    def session_heartbeat(self, headers: dict[str, str], body: bytes) -> Reply:
        session = self._session(json.loads(body)["session_id"])
        if session.finished:
            return Reply.json({"detail": f"session {session.session_id} has finished"}, 410)
        session.heartbeats += 1
        return Reply.json({"type": "session_heartbeat"})

    def finish_session(self, session_id: str) -> Reply:
        """The session ends: its training runs and samplers are released (their checkpoints stay)."""
        session = self._session(session_id)
        session.finished = True
        with self._lock:
            models = [self.models.pop(m) for m in session.model_ids if m in self.models]
            samplers = [self.samplers.pop(i) for i in session.sampler_ids if i in self.samplers]
            samplers += [s for s in self.samplers.values() if s.host in models]
        for sampler in samplers:
            with sampler.host.lock if sampler.host is not None else contextlib.nullcontext():
                sampler.release()
        for model in models:
            model.close()
        return Reply.json({})

    def telemetry(self, headers: dict[str, str], body: bytes) -> Reply:
        with self._lock:
            self.telemetry_batches += 1
        return Reply.json({"status": "accepted"})

    def server_capabilities(self, headers: dict[str, str], body: bytes) -> Reply:
        names = sorted({model.spec.base_model for model in self.models.values()})
        models = [{"model_name": n, "trainable": True, "sampleable": True} for n in names]
        return Reply.json({"supported_models": models})

    def _session(self, session_id: str) -> Session:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise Failure(404, f"no session {session_id}")
        return session

    # -- training runs ----------------------------------------------------------------------

    def create_model(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        session = self._session(request["session_id"])
        lora = request.get("lora_config") or {}
        if lora.get("rank") is None:
            raise Failure(400, "the fake trains LoRA adapters only: lora_config.rank is required")
        if not all(lora.get(part, True) for part in ("train_mlp", "train_attn", "train_unembed")):
            raise Failure(400, "the fake trains LoRA on every layer LocalBackend adapts; train_* cannot be turned off")
        if (request.get("optimizer_config") or {}).get("type", "adamw") != "adamw":
            raise Failure(400, "the fake trains with Adam only")
        spec = ModelSpec(request["base_model"], int(lora["rank"]), lora.get("seed"))
        model_id = f"{session.session_id}:train:{request['model_seq_id']}"

        def create() -> dict[str, Any]:
            self._host(model_id, spec, session)
            return {"model_id": model_id, "type": "create_model"}

        return self._future(create)

    def _host(self, model_id: str, spec: ModelSpec, session: Session) -> HostedModel:
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        model = HostedModel(model_id, spec, self.make_backend(spec, workdir))
        with self._lock:
            if model_id in self.models:
                raise Failure(409, f"model {model_id} exists")
            self.models[model_id] = model
            session.model_ids.append(model_id)
        return model

    def get_info(self, headers: dict[str, str], body: bytes) -> Reply:
        model = self._model(json.loads(body)["model_id"])
        name = model.spec.base_model
        return Reply.json(
            {
                "type": "get_info",
                "model_id": model.model_id,
                "model_data": {"arch": "llama", "model_name": name, "tokenizer_id": name},
                "is_lora": True,
                "lora_rank": model.spec.rank,
                "model_name": name,
            }
        )

    def _model(self, model_id: str) -> HostedModel:
        with self._lock:
            model = self.models.get(model_id)
        if model is None:
            raise Failure(404, f"no model {model_id}")
        return model

    def forward_backward(self, headers: dict[str, str], body: bytes) -> Reply:
        if headers.get("content-encoding") == "zstd":
            import zstandard

            body = zstandard.ZstdDecompressor().decompress(body)
        request = pb.ForwardBackwardRequest()
        request.ParseFromString(body)
        model = self._model(request.model_id)
        data = [_spider_datum(d) for d in request.data]
        config = {key: value.number for key, value in request.loss_fn_config_v2.items() if value.HasField("number")}
        config = config or dict(request.loss_fn_config)
        loss_fn, forward_only = request.loss_fn, request.forward_only

        def run() -> bytes:
            if forward_only:
                return _forward_backward_proto(model.backend.forward(data), {})
            out = model.backend.forward_backward(data, loss_fn, config or None)
            return _forward_backward_proto(out.logprobs, out.metrics)

        return self._future(run, model, request.seq_id)

    def optim_step(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        model = self._model(request["model_id"])
        if "adam_params" not in request:
            raise Failure(400, "the fake trains with Adam only: send adam_params")
        fields = AdamParams.__dataclass_fields__
        adam = AdamParams(**{k: v for k, v in request["adam_params"].items() if k in fields})

        def run() -> dict[str, Any]:
            metrics = model.backend.optim_step(adam).metrics
            # The service names every metric with its reduction, as forward_backward's are.
            return {"metrics": {(k if ":" in k else f"{k}:mean"): float(v) for k, v in metrics.items()}}

        return self._future(run, model, request["seq_id"])

    def save_weights(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        model = self._model(request["model_id"])
        name = request.get("path") or f"state-{next(self._counter)}"
        path = f"tinker://{model.model_id}/weights/{name}"

        def run() -> dict[str, Any]:
            with self._lock:
                if path in self.checkpoints and not request.get("overwrite"):
                    raise Failure(409, f"checkpoint {path} exists; save under another name or overwrite it")
            checkpoint = Checkpoint(model, model.backend.save_state(name))
            with self._lock:
                self.checkpoints[path] = checkpoint
            return {"path": path, "type": "save_weights"}

        return self._future(run, model, request["seq_id"])

    def load_weights(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        checkpoint = self._checkpoint(request["path"], "weights")
        if not request.get("optimizer"):
            raise Failure(400, "the fake restores weights together with the optimizer state (optimizer: true) only")
        if request.get("session_id") is not None:  # a new training run whose first request is this load
            session = self._session(request["session_id"])
            model_id = f"{session.session_id}:train:{request['model_seq_id']}"

            def create() -> dict[str, Any]:
                model = self._host(model_id, checkpoint.model.spec, session)
                with model.lock:
                    model.backend.load_state(checkpoint.local_path)
                return {"path": request["path"], "model_id": model_id, "type": "load_weights"}

            return self._future(create)
        model = self._model(request["model_id"])

        def load() -> dict[str, Any]:
            model.backend.load_state(checkpoint.local_path)
            return {"path": request["path"], "model_id": model.model_id, "type": "load_weights"}

        return self._future(load, model, request["seq_id"])

    def _checkpoint(self, path: str, kind: str) -> Checkpoint:
        if not re.fullmatch(rf"tinker://[^/]+/{kind}/[^/]+", path):
            raise Failure(400, f"{path!r} is not a tinker://<run>/{kind}/<name> path")
        with self._lock:
            checkpoint = self.checkpoints.get(path)
        if checkpoint is None:
            raise Failure(404, f"no checkpoint {path}")
        return checkpoint

    # -- sampling ---------------------------------------------------------------------------

    def save_weights_for_sampler(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        model = self._model(request["model_id"])
        if request.get("kind", "snapshot") != "snapshot":
            raise Failure(400, "the fake saves snapshot sampler weights only")
        name = request.get("path") or f"ephemeral-{next(self._counter)}"
        path = f"tinker://{model.model_id}/sampler_weights/{name}"
        session_id = model.model_id.split(":train:")[0]

        def run() -> dict[str, Any]:
            checkpoint = Checkpoint(model, model.backend.save_weights_for_sampler(name))
            with self._lock:
                self.checkpoints[path] = checkpoint
            if request.get("path") is not None:
                return {"path": path, "type": "save_weights_for_sampler"}
            sampler_id = self._open_sampler(session_id, request["sampling_session_seq_id"], checkpoint, None)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self._future(run, model, request["seq_id"])

    def save_weights_external(self, headers: dict[str, str], body: bytes) -> Reply:
        """The run's current weights as an adapter folder (LocalBackend's sampler format, which is
        PEFT's), listed file by file at signed URLs by `external_weights_urls`."""
        request = json.loads(body)
        model = self._model(request["model_id"])
        if request.get("age_encryption_recipients"):
            raise Failure(400, "the fake does not encrypt exports")
        path = f"tinker://{model.model_id}/external_weights/{request['path']}"

        def run() -> dict[str, Any]:
            local = model.backend.save_weights_for_sampler(f"external-{request['path']}")
            with self._lock:
                self.checkpoints[path] = Checkpoint(model, local)
            size = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
            return {"path": path, "size_bytes": size, "type": "save_weights_external"}

        return self._future(run, model, request["seq_id"])

    def external_weights_urls(self, model_id: str, checkpoint_id: str) -> Reply:
        checkpoint = self._checkpoint(f"tinker://{model_id}/{checkpoint_id}", "external_weights")
        folder = Path(checkpoint.local_path)
        token = uuid.uuid4().hex
        with self._lock:
            self._downloads[token] = folder
        files = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
        expires = datetime.now(timezone.utc) + timedelta(hours=1)
        urls = {name: f"{self.url}/files/{token}/{name}" for name in files}
        return Reply.json({"urls": urls, "expires": expires.isoformat()})

    def download(self, rest: str) -> Reply:
        token, _, name = rest.partition("/")
        with self._lock:
            folder = self._downloads.get(token)
        target = (folder / name).resolve() if folder is not None else None
        if target is None or not target.is_relative_to(folder.resolve()) or not target.is_file():
            return Reply.json({"detail": "no such signed URL"}, 404)
        return Reply(200, target.read_bytes(), "application/octet-stream")

    def delete_checkpoint(self, model_id: str, checkpoint_id: str) -> Reply:
        with self._lock:
            checkpoint = self.checkpoints.pop(f"tinker://{model_id}/{checkpoint_id}", None)
            if checkpoint is not None:
                self._downloads = {t: f for t, f in self._downloads.items() if f != Path(checkpoint.local_path)}
        if checkpoint is None:
            raise Failure(404, f"no checkpoint {checkpoint_id} of {model_id}")
        return Reply.json({})

    def create_sampling_session(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        session = self._session(request["session_id"])
        if request.get("model_path"):
            checkpoint = self._checkpoint(request["model_path"], "sampler_weights")
        elif request.get("base_model"):
            checkpoint = self._base_checkpoint(request["base_model"], session)
        else:
            raise Failure(400, "create_sampling_session needs model_path or base_model")
        sampler_id = self._open_sampler(session.session_id, request["sampling_session_seq_id"], checkpoint,
                                        request.get("model_path"))
        return Reply.json({"type": "create_sampling_session", "sampling_session_id": sampler_id})

    def _base_checkpoint(self, base_model: str, session: Session) -> Checkpoint:
        """A base model's own weights: a rank-1 adapter saved before any step (its LoRA delta is
        zero at initialization), kept once per base model."""
        with self._lock:
            checkpoint = self._base_samplers.get(base_model)
        if checkpoint is None:
            model = self._host(f"base:{base_model}:{uuid.uuid4().hex[:6]}", ModelSpec(base_model, 1, 0), session)
            with model.lock:
                checkpoint = Checkpoint(model, model.backend.save_weights_for_sampler("base"))
            with self._lock:
                checkpoint = self._base_samplers.setdefault(base_model, checkpoint)
        return checkpoint

    def _open_sampler(self, session_id: str, seq_id: int, checkpoint: Checkpoint, model_path: str | None) -> str:
        session = self._session(session_id)
        sampler_id = f"{session_id}:sample:{seq_id}"
        with self._lock:
            if sampler_id in self.samplers:
                raise Failure(409, f"sampling session {sampler_id} exists")
            base_model = checkpoint.model.spec.base_model
            self.samplers[sampler_id] = HostedSampler(sampler_id, base_model, model_path, checkpoint)
            session.sampler_ids.append(sampler_id)
        return sampler_id

    def _host_of(self, sampler: HostedSampler) -> HostedModel:
        """Where a sampler's engine runs: the run that saved its weights while that run lives,
        else a reader backend of the same spec (one per spec, kept for the server's life)."""
        owner = sampler.checkpoint.model
        if not owner.closed:
            return owner
        with self._lock:
            reader = self._readers.get(owner.spec)
            if reader is None:
                workdir = Path(tempfile.mkdtemp(prefix="reader-", dir=self.workdir))
                backend = self.make_backend(owner.spec, workdir)
                reader = self._readers[owner.spec] = HostedModel(f"reader:{len(self._readers)}", owner.spec, backend)
        return reader

    def get_sampler(self, sampler_id: str) -> Reply:
        sampler = self._sampler(sampler_id)
        return Reply.json(
            {"sampler_id": sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}
        )

    def _sampler(self, sampler_id: str) -> HostedSampler:
        with self._lock:
            sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise Failure(404, f"no sampling session {sampler_id}")
        return sampler

    def asample(self, headers: dict[str, str], body: bytes) -> Reply:
        request = json.loads(body)
        if not request.get("sampling_session_id"):
            raise Failure(400, "the fake samples through sampling sessions only (sampling_session_id)")
        sampler = self._sampler(request["sampling_session_id"])
        prompt = _prompt_tokens(request["prompt"])
        n = int(request.get("num_samples", 1))
        params, seed, stop_ids = _sampling_params(request.get("sampling_params") or {})
        want_prompt_logprobs = bool(request.get("prompt_logprobs"))
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if request.get(unsupported):
                raise Failure(400, f"the fake does not serve {unsupported}")
        if request.get("target_prompt_logprobs") is not None or request.get("prompt_logprobs_last_n") is not None:
            raise Failure(400, "the fake does not serve target_prompt_logprobs or prompt_logprobs_last_n")

        def run() -> bytes:
            host = self._host_of(sampler)
            with host.lock:
                engine = sampler.open(host)
                generation = GenerationRequest(key="sample", messages=[], n=n, seed=seed, prompt_ids=prompt)
                result = engine.generate([generation], params)[0]
                if result.error is not None:
                    raise Failure(400, result.error)
                prompt_logprobs = engine.score([ScoreRequest("prompt", prompt)])[0] if want_prompt_logprobs else None
            if prompt_logprobs is not None and prompt_logprobs.error is not None:
                raise Failure(400, prompt_logprobs.error)
            response = pb.SampleResponse()
            for completion in result.completions:
                tokens, logprobs, reason = _cut_at(
                    completion.token_ids, completion.logprobs or [], completion.finish_reason, stop_ids
                )
                sequence = response.sequences.add()
                sequence.stop_reason = pb.STOP_REASON_STOP if reason == "stop" else pb.STOP_REASON_LENGTH
                sequence.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
                sequence.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
            if prompt_logprobs is not None:
                values = [math.nan if v is None else v for v in prompt_logprobs.logprobs]
                response.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
            return response.SerializeToString()

        sequence_ids = [f"{sampler.sampler_id}:seq:{uuid.uuid4().hex[:10]}" for _ in range(n)]
        return self._future(run, extra={"sample_sequence_ids": sequence_ids})

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            models = [*self.models.values(), *self._readers.values()]
            samplers = list(self.samplers.values())
        for sampler in samplers:
            sampler.release()
        for model in models:
            model.close()


# -- wire formats -------------------------------------------------------------------------------


def _tensor(message: pb.Tensor) -> np.ndarray:
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}.get(message.dtype)
    if dtype is None:
        raise Failure(400, f"unsupported tensor dtype {message.dtype}")
    shape = list(message.shape)
    if message.WhichOneof("encoding") == "sparse_csr":
        values = np.frombuffer(message.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(message.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(message.sparse_csr.col_indices, dtype=np.int64)
        dense = np.zeros(shape, dtype=dtype)
        for row in range(len(crow) - 1):
            dense[row, col[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
        return dense
    array = np.frombuffer(message.dense, dtype=dtype)
    return array.reshape(shape) if shape else array


def _spider_datum(message: pb.Datum) -> Datum:
    tokens: list[int] = []
    for chunk in message.model_input:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise Failure(400, "the fake trains on token chunks only")
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
    inputs = {name: _tensor(tensor) for name, tensor in message.loss_fn_inputs.items()}
    unknown = sorted(set(inputs) - {"target_tokens", "logprobs", "advantages", "weights"})
    if unknown:
        raise Failure(400, f"the fake does not know loss_fn_inputs {unknown}")
    if "target_tokens" not in inputs:
        raise Failure(400, "every datum needs loss_fn_inputs.target_tokens")

    def values(name: str) -> list[float] | None:
        return inputs[name].astype(np.float64).tolist() if name in inputs else None

    try:
        targets = inputs["target_tokens"].astype(np.int64).tolist()
        return Datum(tokens, targets, values("logprobs"), values("advantages"), values("weights"))
    except ValueError as exc:
        raise Failure(400, str(exc)) from None


def _forward_backward_proto(logprobs: list[list[float]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput as the service sends it: one ArrayRecord whose `logprobs` field holds
    every datum's values back to back, with byte offsets between them."""
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in metrics.items():  # the service names each metric with its reduction
        output.metrics[key if ":" in key else f"{key}:sum"] = float(value)
    record = output.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
    arrays = [np.asarray(values, dtype=np.float32) for values in logprobs]
    offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = offsets.tobytes()
    return output.SerializeToString()


def _prompt_tokens(model_input: dict[str, Any]) -> list[int]:
    tokens: list[int] = []
    for chunk in model_input.get("chunks", []):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise Failure(400, "the fake samples from token chunks only")
        tokens.extend(int(t) for t in chunk["tokens"])
    if not tokens:
        raise Failure(400, "the prompt is empty")
    return tokens


def _sampling_params(raw: dict[str, Any]) -> tuple[SamplingParams, int | None, set[int]]:
    """Tinker's sampling params as LocalBackend's sampler takes them: (params, seed, stop ids)."""
    stop = raw.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stop_strings = [s for s in stops if isinstance(s, str)]
    top_k = raw.get("top_k", -1)
    params = SamplingParams(
        temperature=float(raw.get("temperature", 1.0)),
        top_p=float(raw.get("top_p", 1.0)),
        top_k=None if top_k in (None, -1, 0) else int(top_k),
        max_tokens=int(raw.get("max_tokens") or DEFAULT_MAX_TOKENS),
        stop=stop_strings,
        logprobs=True,
    )
    return params, raw.get("seed"), {int(s) for s in stops if not isinstance(s, str)}


def _cut_at(
    tokens: list[int], logprobs: list[float], reason: str | None, stop_ids: set[int]
) -> tuple[list[int], list[float], str | None]:
    """The sample up to and including its first stop id (sampling is causal: the tokens before
    it are what a sampler told to stop there would have drawn)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1], logprobs[: i + 1], "stop"
    return tokens, logprobs, reason


# -- the HTTP server ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.service.handle(method, self.path, headers, body)
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    service: FakeTinker


@dataclass
class FakeTinkerServer:
    """A running fake service: its base URL (give it to `ServiceClient(base_url=...)`) and state."""

    url: str
    service: FakeTinker

    @property
    def models(self) -> dict[str, HostedModel]:
        return self.service.models

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.service.requests


@contextlib.contextmanager
def fake_tinker_server(
    api_keys: Iterable[str] = ("tml-test-key",),
    make_backend: BackendFactory = local_backend,
    workdir: str | Path | None = None,
    fwdbwd_max_chunk_len: int = 1024,
) -> Iterator[FakeTinkerServer]:
    """The fake service on 127.0.0.1 at a free port, in a thread; stopped (and every backend
    closed) on exit. `fwdbwd_max_chunk_len` is the service's chunk size for forward_backward
    (the SDK splits larger batches into chunks that run in order)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fake-tinker-"))
        root = Path(workdir)
        service = FakeTinker(api_keys, make_backend, root, fwdbwd_max_chunk_len)
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.service = service
        service.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, name="fake-tinker-http", daemon=True)
        thread.start()
        try:
            yield FakeTinkerServer(service.url, service)
        finally:
            httpd.shutdown()
            httpd.server_close()
            service.close()
