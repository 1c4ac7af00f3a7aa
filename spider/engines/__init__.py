"""Generation backends behind one interface (`Engine`), and the one engine a worker process holds.

A rollout worker holds one model at a time: `load_engine` returns the engine already loaded for the
same (provider, name, parameters) and closes it before loading a different one. Backends are imported
only when used, so the API and CPU workers never import vLLM or torch.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import threading
from typing import TYPE_CHECKING

from spider.engines.base import Completion, Engine, GenerationRequest, GenerationResult, SamplingParams
from spider.errors import EngineError

if TYPE_CHECKING:
    from spider.config import GenerationParameters, ModelConfig

__all__ = [
    "Completion",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "close_engine",
    "create_engine",
    "load_engine",
    "sampling_params",
]

EngineKey = tuple[str, str, str]

_lock = threading.Lock()
_loaded: tuple[EngineKey, Engine] | None = None


def engine_key(model: "ModelConfig", secrets: dict[str, str] | None = None) -> EngineKey:
    """What makes two model configs the same engine: provider, name and parameters (and, for HTTP
    endpoints, the credentials: two jobs with different API keys never share a client)."""
    params = json.dumps(model.parameters, sort_keys=True, default=str)
    if model.provider == "openai" and secrets:
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
        raise EngineError(
            "provider 'tinker' samples through the trainer backend of an on-policy job, not through a "
            "generation engine; for dataset jobs use provider 'vllm', 'hf' or 'openai'"
        )
    raise EngineError(f"unknown model.provider {model.provider!r}; use 'vllm', 'hf' or 'openai'")


def load_engine(model: "ModelConfig", secrets: dict[str, str] | None = None) -> Engine:
    """The engine of this process for `model`: reused when the same model is asked for again, and
    the previous engine closed first when a different one is asked for (one model in memory)."""
    global _loaded
    key = engine_key(model, secrets)
    with _lock:
        if _loaded is not None and _loaded[0] == key:
            return _loaded[1]
        _close_loaded()
        engine = create_engine(model, secrets)
        _loaded = (key, engine)
        return engine


def close_engine() -> None:
    """Close the engine this process holds, if any."""
    with _lock:
        _close_loaded()


def _close_loaded() -> None:
    global _loaded
    if _loaded is not None:
        engine, _loaded = _loaded[1], None
        engine.close()


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
