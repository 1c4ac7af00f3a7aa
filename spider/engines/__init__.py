"""Generation backends behind one interface (`Engine`), and the one engine a worker process holds.

A rollout worker holds up to `SPIDER_MAX_ENGINES` models at once (default 2: a policy and a teacher
or simulated user do not evict each other): `load_engine` returns the engine already loaded for the
same (provider, name, parameters) and closes the least recently used one before loading one more.
Backends are imported only when used, so the API and CPU workers never import vLLM or torch.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from spider.engines.base import (
    Completion,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
)
from spider.errors import EngineError

if TYPE_CHECKING:
    from spider.config import GenerationParameters, ModelConfig

__all__ = [
    "Completion",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "ScoreRequest",
    "ScoreResult",
    "close_engine",
    "create_engine",
    "load_engine",
    "sampling_params",
]

EngineKey = tuple[str, str, str]
DEFAULT_MAX_ENGINES = 2

_lock = threading.Lock()
_loaded: "OrderedDict[EngineKey, Engine]" = OrderedDict()  # least recently used first


def max_engines() -> int:
    """How many engines a worker keeps loaded (`SPIDER_MAX_ENGINES`): on a GPU, give each engine
    its share of memory (vLLM's `gpu_memory_utilization`) when more than one is kept."""
    return max(1, int(os.environ.get("SPIDER_MAX_ENGINES") or DEFAULT_MAX_ENGINES))


def engine_key(model: "ModelConfig", secrets: dict[str, str] | None = None) -> EngineKey:
    """What makes two model configs the same engine: provider, name and parameters (and, for HTTP
    endpoints, the credentials: two jobs with different API keys never share a client)."""
    params = json.dumps(model.parameters, sort_keys=True, default=str)
    if model.provider in ("openai", "tinker") and secrets:
        digest = hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest()
        params += f"|{digest}"
    return model.provider, model.name, params


def create_engine(model: "ModelConfig", secrets: dict[str, str] | None = None) -> Engine:
    """A new engine for a job's `model`, not cached: the caller closes it. `secrets` are the job's
    own (an endpoint's API key, HF_TOKEN for gated models), never read from other jobs or from the
    worker's environment. What the job may reach is the operator's policy (`spider.policy`): local
    model folders, remote code, outbound hosts."""
    from spider.models import ModelAccess
    from spider.policy import Policy

    policy = Policy.from_env()
    if model.provider == "vllm":
        from spider.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model.name, model.parameters, secrets, access=ModelAccess.from_env(), allow_remote_code=policy.allow_remote_code
        )
    if model.provider == "openai":
        from spider.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(model.name, model.parameters, secrets, allowed_hosts=policy.allowed_hosts)
    if model.provider == "hf":
        from spider.engines.hf_engine import HFEngine

        return HFEngine(model.name, model.parameters, secrets, access=ModelAccess.from_env())
    if model.provider == "tinker":
        # A Tinker-hosted model (an on-policy job's teacher), at the operator's Tinker endpoint.
        from spider.engines.tinker_engine import TinkerEngine
        from spider.train.backends import tinker_base_url

        return TinkerEngine.for_base_model(model.name, secrets, base_url=tinker_base_url(), access=ModelAccess.from_env())
    raise EngineError(f"unknown model.provider {model.provider!r}; use 'vllm', 'hf' or 'openai'")


def load_engine(model: "ModelConfig", secrets: dict[str, str] | None = None) -> Engine:
    """The engine of this process for `model`: reused when the same model is asked for again; when
    `max_engines()` are loaded already, the least recently used is closed before a new one starts."""
    key = engine_key(model, secrets)
    with _lock:
        engine = _loaded.get(key)
        if engine is not None:
            _loaded.move_to_end(key)
            return engine
        while len(_loaded) >= max_engines():
            _loaded.popitem(last=False)[1].close()
        engine = create_engine(model, secrets)
        _loaded[key] = engine
        return engine


def loaded_engines() -> list[Engine]:
    """The engines this process holds, least recently used first."""
    with _lock:
        return list(_loaded.values())


def close_engine() -> None:
    """Close every engine this process holds."""
    with _lock:
        while _loaded:
            _loaded.popitem(last=False)[1].close()


def sampling_params(generation: "GenerationParameters") -> SamplingParams:
    """The engines' sampling settings from a job's `generation.parameters` (its `seed` seeds rows instead)."""
    return SamplingParams(
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        min_p=generation.min_p,
        max_tokens=generation.max_tokens,
        stop=list(generation.stop),
        presence_penalty=generation.presence_penalty,
        frequency_penalty=generation.frequency_penalty,
        repetition_penalty=generation.repetition_penalty,
    )


atexit.register(close_engine)
