"""transformers `generate`, batched with left padding and the model's chat template.

Sampling is seeded per sample, not per batch: `generate` runs in its greedy mode and the last logits
processor adds Gumbel noise drawn from that sample's own `torch.Generator` (seeded from the request's
`seed` and the sample index), so `argmax(logits / T + Gumbel)` is an exact draw from the tempered,
filtered distribution that does not depend on which other requests share the batch. The limitation:
the logits themselves come from batched matrix products whose last bits can change with the batch's
shape (padding width, batch size), so a draw that lands within that rounding distance of a tie
between two tokens can still differ. Greedy decoding has the same caveat for exact ties.

Penalties follow vLLM's meaning: `repetition_penalty` over prompt and output tokens (left padding
excluded), `presence_penalty` / `frequency_penalty` over output tokens only. Stop strings end a
sample and are cut from its text, and a sample cut inside a multi-byte character does not end on
U+FFFD, as in vLLM and the OpenAI API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from spider.engines.base import Completion, Engine, GenerationRequest, GenerationResult, SamplingParams, ScoreRequest, ScoreResult, prompt_ids
from spider.chat import Renderer, TemplateError
from spider.errors import EngineError
from spider.models import ModelAccess, resolve_model
from spider.types import Usage

PARAMETERS = ("dtype", "device", "batch_size")
SCORE_TOKENS_PER_PASS = 16_384
MICRO_BATCH_WAIT_S = 0.005
DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
}


def sample_seed(seed: int, sample_index: int) -> int:
    """The generator seed of sample `sample_index` of a request seeded with `seed`."""
    digest = hashlib.sha256(f"{seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Sample:
    """One of the `n` samples of a request: where its completion goes, its prompt, its generator
    seed, and the flag that says its request is no longer wanted (decoding it stops there)."""

    slots: list[Completion | None]
    index: int
    prompt: list[int]
    seed: int
    stop: threading.Event


class HFEngine(Engine):
    """A transformers causal LM on one device. `parameters`: `dtype` (auto, float32, bfloat16,
    float16), `device` (default cuda when available, else cpu; `auto` spreads the model with
    accelerate), `batch_size` (samples per forward pass, default 16)."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None, secrets: dict[str, str] | None = None, access: ModelAccess | None = None):
        parameters = dict(parameters or {})
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise EngineError(
                f"provider 'hf' does not know model.parameters {unknown}; it accepts {', '.join(PARAMETERS)}"
            )
        dtype_name = str(parameters.get("dtype", "auto"))
        if dtype_name not in DTYPES:
            raise EngineError(f"model.parameters.dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype_name] if DTYPES[dtype_name] == "auto" else getattr(torch, DTYPES[dtype_name])
        device = str(parameters.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        batch_size = parameters.get("batch_size", 16)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EngineError(f"model.parameters.batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.name = name

        path = resolve_model(name, token=(secrets or {}).get("HF_TOKEN"), access=access)
        self._use_tokenizer(AutoTokenizer.from_pretrained(str(path)))
        try:
            if device == "auto":
                model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="auto")
            else:
                torch.device(device)
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"transformers could not load {name!r} on device {device!r}: {exc}") from exc
        self._use_model(model)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str, batch_size: int = 16) -> "HFEngine":
        """An engine over a model already in memory (a trainer's frozen snapshot, say), used as it
        is: on its own device and dtype, never copied."""
        engine = cls.__new__(cls)
        engine.name, engine.batch_size = name, batch_size
        engine._use_tokenizer(tokenizer)
        engine._use_model(model)
        return engine

    def _use_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, name=self.name)
        try:
            self.renderer.check()
        except TemplateError as exc:
            raise EngineError(str(exc)) from None

    def _use_model(self, model: Any) -> None:
        self.model = model
        self.model.eval()
        self.device = self.model.get_input_embeddings().weight.device

        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise EngineError(f"model {self.name!r} declares no eos token (generation_config or tokenizer)")
        self.eos_ids = eos_ids
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(eos_ids)
        self.context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        # A fresh generation config, so that sampling defaults shipped with the model (temperature,
        # repetition_penalty, top_k, ...) never mix with the request's own parameters.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(eos_ids), pad_token_id=self.pad_id)
        self._lock = threading.Lock()
        self._pending: list[tuple[GenerationRequest, SamplingParams, asyncio.Future, threading.Event]] = []
        self._drainer: asyncio.Future | None = None

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        """A micro-batcher: requests that arrive within MICRO_BATCH_WAIT_S of each other, or while
        a batch is decoding, are decoded together in the next batch call. A cancelled request is
        dropped if it still waits, and stops decoding (its rows end at the next step) if not."""
        future = asyncio.get_running_loop().create_future()
        stop = threading.Event()
        future.add_done_callback(lambda done: stop.set() if done.cancelled() else None)
        self._pending.append((request, params, future, stop))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def agenerate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """The batch decoded in a thread; cancelled, its decoding stops at the next token (a
        stopping criterion reads the flag) and this returns once the model is free again."""
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._locked, requests, params, [stop] * len(requests)))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(Exception):
                await work
            raise

    async def _drain(self) -> None:
        await asyncio.sleep(MICRO_BATCH_WAIT_S)
        while self._pending:
            pending = [item for item in self._pending if not item[2].done()]  # cancelled while waiting
            self._pending = []
            groups: list[tuple[SamplingParams, list[Any]]] = []
            for item in pending:
                group = next((g for g in groups if g[0] == item[1]), None)
                if group is None:
                    groups.append((item[1], [item]))
                else:
                    group[1].append(item)
            for params, items in groups:
                items = [item for item in items if not item[2].done()]  # cancelled while others decoded
                if not items:
                    continue
                try:
                    results = await asyncio.to_thread(
                        self._locked, [item[0] for item in items], params, [item[3] for item in items]
                    )
                except Exception as exc:  # the engine failed: every waiting request hears it
                    for item in items:
                        if not item[2].done():
                            item[2].set_exception(exc)
                    continue
                for item, result in zip(items, results):
                    if not item[2].done():
                        item[2].set_result(result)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        return self._locked(requests, params, [threading.Event() for _ in requests])

    def _locked(
        self, requests: list[GenerationRequest], params: SamplingParams, stops: list[threading.Event]
    ) -> list[GenerationResult]:
        with self._lock:  # one decoding at a time: batch calls and the micro-batcher share the model
            return self._generate(requests, params, stops)

    def _generate(
        self, requests: list[GenerationRequest], params: SamplingParams, stops: list[threading.Event]
    ) -> list[GenerationResult]:
        """Decode `requests`; a request whose `stops` flag is set is decoded no further (its
        completions are then cut short or missing: whoever set it reads none of them)."""
        _check_sampling(params)
        results = [GenerationResult(key=r.key) for r in requests]
        samples: list[_Sample] = []
        filled: list[tuple[GenerationResult, list[Completion | None]]] = []
        for result, request, stop in zip(results, requests, stops):
            if request.n < 1:
                result.error = f"n must be at least 1, got {request.n}"
                continue
            try:
                ids = prompt_ids(self.renderer, request)
            except Exception as exc:
                result.error = f"the chat template could not render this conversation: {exc}"
                continue
            if self.context is not None and len(ids) >= self.context:
                result.error = (
                    f"the prompt has {len(ids)} tokens but the model's context is {self.context}: "
                    "shorten the conversation"
                )
                continue
            slots: list[Completion | None] = [None] * request.n
            filled.append((result, slots))
            for index in range(request.n):
                seed = secrets.randbits(63) if request.seed is None else sample_seed(request.seed, index)
                samples.append(_Sample(slots, index, ids, seed, stop))

        # Similar lengths together: less padding. Results do not depend on the grouping (see above).
        samples.sort(key=lambda s: len(s.prompt))
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            if all(sample.stop.is_set() for sample in chunk):
                continue
            for sample, completion in zip(chunk, self._generate_chunk(chunk, params)):
                sample.slots[sample.index] = completion
        for result, slots in filled:
            result.completions = [c for c in slots if c is not None]
        return results

    def _generate_chunk(self, chunk: list[_Sample], params: SamplingParams) -> list[Completion]:
        width = max(len(s.prompt) for s in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            input_ids[row, width - len(sample.prompt) :] = torch.tensor(sample.prompt)
            attention_mask[row, width - len(sample.prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)

        processors = LogitsProcessorList(_processors(params, chunk, width, self.device))
        finish = _Finish(
            width, [len(s.prompt) for s in chunk], self.context, self.eos_ids, params.stop, self.tokenizer,
            [s.stop for s in chunk],
        )
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode(), _attention_kernels(self.device):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([finish]),
                # The raw logits of every step (before penalties, temperature and filters): the
                # model's own log-probabilities of the sampled tokens, as `score` computes them.
                output_logits=params.logprobs,
                return_dict_in_generate=True,
            )
        generated = output.sequences[:, width:].tolist()
        completions = []
        for row, sample in enumerate(chunk):
            length = finish.lengths[row] if finish.lengths[row] is not None else len(generated[row])
            reason = finish.reasons[row] or "length"
            token_ids = generated[row][:length]
            text = self._decode(token_ids)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            logprobs = None
            if params.logprobs:
                steps = torch.stack([output.logits[t][row] for t in range(length)]) if length else None
                logprobs = [] if steps is None else (
                    torch.log_softmax(steps.float(), dim=-1).gather(1, torch.tensor(token_ids, device=steps.device)[:, None])
                    .squeeze(1).tolist()
                )
            completions.append(
                Completion(
                    text=text,
                    finish_reason=reason,
                    usage=Usage(prompt_tokens=len(sample.prompt), completion_tokens=length),
                    token_ids=token_ids,
                    logprobs=logprobs,
                    prompt_ids=list(sample.prompt),
                )
            )
        return completions

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        with self._lock:
            return self._score(requests)

    def _score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Per-token log-probs from one forward pass per group of sequences (right-padded, at most
        SCORE_TOKENS_PER_PASS tokens a pass, so memory stays bounded)."""
        results = {r.key: ScoreResult(r.key) for r in requests}
        todo = []
        for request in requests:
            if not request.token_ids:
                results[request.key].error = "nothing to score: the sequence is empty"
            elif self.context is not None and len(request.token_ids) > self.context:
                results[request.key].error = f"the sequence has {len(request.token_ids)} tokens; the context is {self.context}"
            else:
                todo.append(request)
        todo.sort(key=lambda r: len(r.token_ids))
        group: list[ScoreRequest] = []
        for request in todo + [None]:  # type: ignore[list-item]
            if group and (request is None or (len(group) + 1) * len(request.token_ids) > SCORE_TOKENS_PER_PASS):
                for done, logprobs in zip(group, self._score_group(group)):
                    results[done.key].logprobs = logprobs
                group = []
            if request is not None:
                group.append(request)
        return [results[r.key] for r in requests]

    def _score_group(self, group: list[ScoreRequest]) -> list[list[float | None]]:
        width = max(len(r.token_ids) for r in group)
        input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, request in enumerate(group):
            input_ids[row, : len(request.token_ids)] = torch.tensor(request.token_ids)
            attention_mask[row, : len(request.token_ids)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode(), _attention_kernels(self.device):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            picked = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        values = picked.tolist()
        return [[None] + values[row][: len(r.token_ids) - 1] for row, r in enumerate(group)]

    def _decode(self, ids: list[int]) -> str:
        """The text of `ids`, less a trailing character whose bytes are not all there (a sample cut
        inside a multi-byte character): like vLLM's incremental detokenizer, never end on U+FFFD."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        while text.endswith("\ufffd") and ids:
            ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def close(self) -> None:
        model, self.model = getattr(self, "model", None), None
        if model is None:
            return
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _attention_kernels(device: torch.device):
    """On CUDA, SDPA without its cuDNN backend: cuDNN builds a graph for every new (batch, query, key)
    shape, and decoding with a growing cache meets a new shape at every step of every new padded width
    (measured on an H200: 4.8 s for a first batch of 16 x 64 tokens that takes 0.3 s once warm).
    Flash and memory-efficient attention have no such warm-up."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _check_sampling(params: SamplingParams) -> None:
    problems = []
    if params.temperature < 0:
        problems.append(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k is not None and params.top_k < -1:
        problems.append(f"top_k must be -1, 0 (off) or positive, got {params.top_k}")
    if params.min_p is not None and not 0 <= params.min_p <= 1:
        problems.append(f"min_p must be in [0, 1], got {params.min_p}")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    if params.max_tokens < 1:
        problems.append(f"max_tokens must be >= 1, got {params.max_tokens}")
    if problems:
        raise EngineError("provider 'hf' cannot sample with these parameters: " + "; ".join(problems))


def _processors(params: SamplingParams, chunk: list[_Sample], width: int, device: Any) -> list[Any]:
    """Penalties, then (when sampling) temperature, top-k, top-p, min-p and the seeded draw."""
    out: list[Any] = []
    repetition = params.repetition_penalty if params.repetition_penalty is not None else 1.0
    if repetition != 1.0 or params.presence_penalty or params.frequency_penalty:
        pads = [width - len(s.prompt) for s in chunk]
        out.append(_Penalties(width, pads, repetition, params.presence_penalty, params.frequency_penalty, device))
    if params.temperature == 0:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k is not None and params.top_k > 0:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        out.append(MinPLogitsWarper(params.min_p))
    out.append(_GumbelDraw([s.seed for s in chunk], device))
    return out


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


class _Penalties(LogitsProcessor):
    """Repetition (prompt + output, padding excluded), presence and frequency (output only) penalties."""

    def __init__(self, width: int, pads: list[int], repetition: float, presence: float, frequency: float, device):
        self.width = width
        self.pads = torch.tensor(pads, device=device)
        self.repetition, self.presence, self.frequency = repetition, presence, frequency

    def __call__(self, input_ids, scores):
        if self.repetition != 1.0:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            real = (positions[None, :] >= self.pads[:, None]).to(scores.dtype)
            seen = torch.zeros_like(scores).scatter_add_(1, input_ids, real) > 0
            penalized = torch.where(scores > 0, scores / self.repetition, scores * self.repetition)
            scores = torch.where(seen, penalized, scores)
        if self.presence or self.frequency:
            output = input_ids[:, self.width :]
            counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return scores


class _GumbelDraw(LogitsProcessor):
    """Adds Gumbel noise from one generator per row: argmax then samples each row independently."""

    def __init__(self, seeds: list[int], device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        ).clamp_(min=tiny)
        return scores + (-torch.log(-torch.log(uniform))).to(scores.dtype)


class _Finish(StoppingCriteria):
    """Stopping criterion that records, per row, where and why its sample ended (eos, a stop string,
    the model's context, or its request no longer wanted: `abandoned`, one flag per row), so
    padding after the end is never mistaken for output."""

    def __init__(self, width, prompt_lengths, context, eos_ids, stops, tokenizer, abandoned):
        self.width, self.prompt_lengths, self.context = width, prompt_lengths, context
        self.eos_ids, self.stops, self.tokenizer = eos_ids, [s for s in stops if s], tokenizer
        self.abandoned = abandoned
        # A stop string of k characters spans at most 4k byte-level tokens (plus a partial one).
        self.tail = 4 * max((len(s) for s in self.stops), default=0) + 4
        self.lengths: list[int | None] = [None] * len(prompt_lengths)
        self.reasons: list[str | None] = [None] * len(prompt_lengths)

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.width
        last = input_ids[:, -1].tolist()
        for row in range(len(self.reasons)):
            if self.reasons[row] is not None:
                continue
            if self.abandoned[row].is_set():
                self.reasons[row] = "abort"  # vLLM's word for a request stopped from outside
            elif last[row] in self.eos_ids:
                self.reasons[row] = "stop"
            elif self.stops and self._stopped(input_ids[row, max(self.width, input_ids.shape[1] - self.tail) :]):
                self.reasons[row] = "stop"
            elif self.context is not None and self.prompt_lengths[row] + generated >= self.context:
                self.reasons[row] = "length"
            if self.reasons[row] is not None:
                self.lengths[row] = generated
        return torch.tensor([r is not None for r in self.reasons], device=input_ids.device)

    def _stopped(self, tail) -> bool:
        text = self.tokenizer.decode(tail.tolist(), skip_special_tokens=True)
        return any(s in text for s in self.stops)
