"""An `Engine` over a Tinker `SamplingClient`: the student's sampler of a `tinker` trainer backend
(exactly the weights saved at one tinker:// path) or a Tinker-hosted base model as teacher.

Requests are sampled from `prompt_ids`, or from messages rendered with the model's own chat
template (`spider.chat.Renderer` over a tokenizer from a local folder: never the hub). Every
request of a batch is submitted before the first is awaited, so the service runs them together.
Tinker has no constrained decoding: `tool_choice` and `regex` are not enforced (the model writes
tool calls in its own format, as with provider `hf`); penalties and `min_p` are refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import tinker
from tinker import types as tt

from spider.chat import Renderer
from spider.engines.base import (
    Completion,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
)
from spider.errors import EngineError, ModelNotFoundError
from spider.models import ModelAccess, resolve_model
from spider.types import Usage

API_KEY_SECRET = "TINKER_API_KEY"


def service_client(secrets: Mapping[str, str] | None, base_url: str | None = None) -> tinker.ServiceClient:
    """A Tinker service client with the job's own API key (`secrets["TINKER_API_KEY"]`), never the
    worker's: without the secret this raises instead of letting the SDK fall back to the
    environment or stored credentials. `base_url` None: the SDK's default endpoint."""
    api_key = (secrets or {}).get(API_KEY_SECRET)
    if not api_key:
        raise EngineError(
            f"Tinker needs the job's secret {API_KEY_SECRET} (an API key starting with 'tml-'); "
            "add it to the job's secrets"
        )
    try:
        return tinker.ServiceClient(base_url=base_url, api_key=api_key)
    except tinker.TinkerError as exc:
        raise EngineError(f"the Tinker client could not start: {exc}") from exc


def tinker_failure(exc: BaseException, what: str) -> EngineError:
    """An SDK exception as Spider's error, saying what was being done and why it failed."""
    if isinstance(exc, tinker.AuthenticationError):
        return EngineError(f"Tinker refused the API key while {what} (HTTP 401): check the job's {API_KEY_SECRET}")
    if isinstance(exc, tinker.PermissionDeniedError):
        return EngineError(f"Tinker denied access while {what} (HTTP 403): {exc}")
    return EngineError(f"Tinker failed while {what}: {exc}")


def load_tokenizer(name: str, access: ModelAccess | None = None) -> Any:
    """The tokenizer of `name` from a local model folder (spider.models.resolve_model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(name, access=access)))


class TinkerEngine(Engine):
    """Samples and scores through one Tinker `SamplingClient`.

    `tokenizer` is a callable returning the model's tokenizer, called once on first need (decoding
    text, rendering messages, the template's stop ids). Without one (None, or a model folder not
    found offline) requests must carry `prompt_ids`, completions have no text, and sampling stops
    at the model's own EOS. `owner` is a service client this engine closes with itself (the teacher's own)."""

    def __init__(
        self,
        client: tinker.SamplingClient,
        name: str,
        tokenizer: Callable[[], Any] | None = None,
        owner: tinker.ServiceClient | None = None,
    ):
        self.client = client
        self.name = name
        self._load_tokenizer = tokenizer
        self._renderer: Renderer | None = None
        self._renderer_lock = threading.Lock()
        self.tokenizer_error: str | None = None
        self._owner = owner

    @classmethod
    def for_base_model(
        cls,
        base_model: str,
        secrets: Mapping[str, str] | None,
        base_url: str | None = None,
        tokenizer_name: str | None = None,
        access: ModelAccess | None = None,
    ) -> "TinkerEngine":
        """A Tinker-hosted base model (a teacher, provider `tinker`), with the job's API key. Its
        tokenizer comes from the local folder of `tokenizer_name` (default: `base_model`)."""
        service = service_client(secrets, base_url)
        try:
            client = service.create_sampling_client(base_model=base_model).result()
        except tinker.TinkerError as exc:
            service.close("errored", detail=str(exc))  # not awaited: the error is what matters
            raise tinker_failure(exc, f"opening a sampler of {base_model!r}") from exc
        source = tokenizer_name or base_model
        return cls(client, base_model, tokenizer=lambda: load_tokenizer(source, access), owner=service)

    @property
    def renderer(self) -> Renderer | None:
        """The chat template of the model's tokenizer; None when the engine has no tokenizer, or
        its folder cannot be found offline (then `tokenizer_error` says why)."""
        if self._renderer is None and self._load_tokenizer is not None and self.tokenizer_error is None:
            with self._renderer_lock:
                if self._renderer is None and self.tokenizer_error is None:
                    try:
                        self._renderer = Renderer(self._load_tokenizer(), name=self.name)
                    except ModelNotFoundError as exc:
                        self.tokenizer_error = str(exc)
        return self._renderer

    # -- sampling ---------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        tinker_params = self._tinker_params(params)
        submitted = [self._submit(request, tinker_params) for request in requests]
        results = []
        for request, (prompt, future, error) in zip(requests, submitted):
            if future is None:
                results.append(GenerationResult(key=request.key, error=error))
                continue
            try:
                response = future.result()
            except tinker.RequestFailedError as exc:
                results.append(GenerationResult(key=request.key, error=f"Tinker could not sample: {exc}"))
                continue
            except tinker.TinkerError as exc:
                raise tinker_failure(exc, f"sampling from {self.name!r}") from exc
            results.append(GenerationResult(key=request.key, completions=self._completions(prompt, response, params)))
        return results

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        """One request, awaited on the caller's event loop (the SDK runs it on its own)."""
        prompt, future, error = self._submit(request, self._tinker_params(params))
        if future is None:
            return GenerationResult(key=request.key, error=error)
        try:
            response = await future
        except tinker.RequestFailedError as exc:
            return GenerationResult(key=request.key, error=f"Tinker could not sample: {exc}")
        except tinker.TinkerError as exc:
            raise tinker_failure(exc, f"sampling from {self.name!r}") from exc
        return GenerationResult(key=request.key, completions=self._completions(prompt, response, params))

    def _submit(self, request: GenerationRequest, params: tt.SamplingParams) -> tuple[list[int], Any, str | None]:
        """(prompt ids, the sample's future, None), or ([], None, why) when it cannot be sent."""
        if request.n < 1:
            return [], None, f"n must be at least 1, got {request.n}"
        try:
            prompt = self._prompt_ids(request)
        except Exception as exc:
            return [], None, f"the chat template could not render this conversation: {exc}"
        seeded = params if request.seed is None else params.model_copy(update={"seed": request.seed})
        future = self.client.sample(tt.ModelInput.from_ints(prompt), num_samples=request.n, sampling_params=seeded)
        return prompt, future, None

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            if not request.prompt_ids:
                raise ValueError("the request's prompt_ids are empty")
            return list(request.prompt_ids)
        if self.renderer is None:
            why = f" ({self.tokenizer_error})" if self.tokenizer_error else ""
            raise ValueError(
                f"engine {self.name!r} has no local tokenizer to render messages with{why}; send prompt_ids"
            )
        return self.renderer.render(request.messages, request.tools).ids

    def _tinker_params(self, params: SamplingParams) -> tt.SamplingParams:
        """Spider's settings in Tinker's terms. Without stop strings, generation stops at the
        template's end-of-turn and EOS ids (when the tokenizer is known) or at the model's EOS."""
        refused = [
            name
            for name, used in (
                ("presence_penalty", bool(params.presence_penalty)),
                ("frequency_penalty", bool(params.frequency_penalty)),
                ("repetition_penalty", params.repetition_penalty not in (None, 1.0)),
                ("min_p", bool(params.min_p)),
            )
            if used
        ]
        if refused:
            raise EngineError(
                f"provider 'tinker' cannot sample with {', '.join(refused)}; remove them from the parameters"
            )
        if params.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}")
        stops = [s for s in params.stop if s]
        stop: list[str] | list[int] | None = stops or None
        if stop is None and self.renderer is not None and self.renderer.stop_token_ids:
            stop = self.renderer.stop_token_ids
        return tt.SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k and params.top_k > 0 else -1,
            stop=stop,
        )

    def _completions(self, prompt: list[int], response: tt.SampleResponse, params: SamplingParams) -> list[Completion]:
        stop_ids = set(self.renderer.stop_token_ids) if self.renderer is not None else set()
        completions = []
        for sequence in response.sequences:
            token_ids = [int(t) for t in sequence.tokens]
            logprobs = [float(v) for v in sequence.logprobs] if sequence.logprobs is not None else None
            reason: str | None = sequence.stop_reason
            # Stop strings replace the stop ids on the wire; the end of the turn still ends it.
            cut = next((i for i, t in enumerate(token_ids) if t in stop_ids), None)
            if cut is not None and cut + 1 < len(token_ids):
                token_ids, reason = token_ids[: cut + 1], "stop"
                logprobs = logprobs[: cut + 1] if logprobs is not None else None
            text = self._decode(token_ids)
            found = [i for i in (text.find(s) for s in params.stop if s) if i >= 0]
            if found:
                text, reason = text[: min(found)], "stop"
            completions.append(
                Completion(
                    text=text,
                    finish_reason=reason,
                    usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(token_ids)),
                    token_ids=token_ids,
                    logprobs=logprobs if params.logprobs else None,
                    prompt_ids=list(prompt),
                )
            )
        return completions

    def _decode(self, ids: list[int]) -> str:
        """The text of `ids` (empty without a tokenizer), never ending inside a multi-byte character."""
        if self.renderer is None:
            return ""
        tokenizer = self.renderer.tokenizer
        text = tokenizer.decode(ids, skip_special_tokens=True)
        while text.endswith("\ufffd") and ids:
            ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True)
        return text

    # -- scoring ----------------------------------------------------------------------------

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Prompt log-probs (`compute_logprobs`), all requests in flight at once."""
        futures = [
            self.client.compute_logprobs(tt.ModelInput.from_ints(list(r.token_ids))) if r.token_ids else None
            for r in requests
        ]
        results = []
        for request, future in zip(requests, futures):
            if future is None:
                results.append(ScoreResult(request.key, error="nothing to score: the sequence is empty"))
                continue
            try:
                logprobs = future.result()
            except tinker.RequestFailedError as exc:
                results.append(ScoreResult(request.key, error=f"Tinker could not score: {exc}"))
                continue
            except tinker.TinkerError as exc:
                raise tinker_failure(exc, f"scoring with {self.name!r}") from exc
            values: list[float | None] = [None if v is None else float(v) for v in logprobs]
            results.append(ScoreResult(request.key, logprobs=[None] + values[1:]))
        return results

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close("success").result()
