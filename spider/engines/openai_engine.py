"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM's server, SGLang, TGI, ...).

Requests of a batch run concurrently on the worker's event loop (one `httpx.AsyncClient`), at most
`max_concurrency` at a time; cancelling a batch or a `sample` closes its HTTP requests (a server
such as vLLM's aborts a request whose connection closes). Rate limits (429),
server errors (5xx), timeouts and dropped connections are retried with exponential backoff and full
jitter, waiting at least as long as the server's `Retry-After` asks. A request that still fails, or
that the server refuses (400, 422), becomes an error on its own result. Errors that concern every
request alike (401/403: the key; 404: the model or the URL) raise EngineError instead.

`top_k`, `min_p` and `repetition_penalty` are not part of the OpenAI API: when set, they are sent
as the extra body fields that vLLM, SGLang and TGI read. A server that does not know them refuses
the request and says so on each result; they are never dropped silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

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
from spider.netpolicy import EgressDenied, check_url, guarded_async_transport, guarded_transport
from spider.types import Message, ToolCall, Usage

logger = logging.getLogger(__name__)

PARAMETERS = ("base_url", "api_key_env", "max_concurrency", "timeout", "max_retries")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
FATAL_STATUSES = frozenset({401, 403, 404})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 300.0


class OpenAIEngine(Engine):
    """Chat completions over HTTP. `parameters`: `base_url` (default OpenAI's), `api_key_env` (the
    name of the job secret holding the key, default OPENAI_API_KEY; without it no key is sent),
    `max_concurrency` (default 16), `timeout` (seconds per attempt, default 600), `max_retries`
    (default 5).

    The key comes from `secrets` only (the job's own), never from the worker's environment. With
    `allowed_hosts` given (always, for jobs), every connection goes to a public address or to one
    of those hosts (`spider.netpolicy`); None means no such check (for the operator's own use)."""

    def __init__(
        self,
        name: str,
        parameters: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
        allowed_hosts: tuple[str, ...] | None = None,
    ):
        parameters = dict(parameters or {})
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise EngineError(
                f"provider 'openai' does not know model.parameters {unknown}; it accepts {', '.join(PARAMETERS)}"
            )
        self.name = name
        self.base_url = str(parameters.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        key_env = parameters.get("api_key_env")
        api_key = (secrets or {}).get(key_env or "OPENAI_API_KEY")
        if key_env and not api_key:
            raise EngineError(
                f"model.parameters.api_key_env names {key_env!r}, but the job was not sent that secret: "
                f"pass it in the client's env (env={{{key_env!r}: ...}}); workers never lend their own keys"
            )
        self.max_concurrency = _positive_int(parameters, "max_concurrency", 16)
        self.max_retries = _positive_int(parameters, "max_retries", 5, allow_zero=True)
        timeout = parameters.get("timeout", 600.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise EngineError(f"model.parameters.timeout must be a positive number of seconds, got {timeout!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        transport = async_transport = None
        if allowed_hosts is not None:
            try:
                check_url(self.base_url, allowed_hosts)
            except EgressDenied as exc:
                raise EngineError(f"model.parameters.base_url: {exc}") from None
            transport = guarded_transport(allowed_hosts, limits=limits)
            async_transport = guarded_async_transport(allowed_hosts, limits=limits)
        common = dict(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(float(timeout)), limits=limits,
                      follow_redirects=False)
        self.client = httpx.Client(transport=transport, **common)  # scoring, from worker threads
        # Sampling, on the engine loop: proxy variables would route around the guarded transport.
        self.aclient = httpx.AsyncClient(transport=async_transport, trust_env=allowed_hosts is None, **common)
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="spider-openai")

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        from spider.engines.loop import engine_loop

        return engine_loop().run(self.agenerate(requests, params))

    async def agenerate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """Every request at once (at most `max_concurrency` in flight). An error that concerns
        every request (the key, the model, the URL) stops the rest early and is raised."""
        refused = asyncio.Event()
        outcomes = await asyncio.gather(*(self._one(r, params, refused) for r in requests), return_exceptions=True)
        fatal = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if fatal is not None:
            raise fatal
        return list(outcomes)  # type: ignore[arg-type]

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        """One request (at most `max_concurrency` of this engine's requests are in flight)."""
        return await self._one(request, params, asyncio.Event())

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Prompt log-probs from an endpoint that returns them for token-id prompts (vLLM's
        `/completions` with `prompt_logprobs`); other endpoints answer with an error per request."""
        return list(self._executor.map(self._score_one, requests))

    def _score_one(self, request: ScoreRequest) -> ScoreResult:
        body = {"model": self.name, "prompt": list(request.token_ids), "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 0}
        try:
            response = self.client.post("/completions", json=body)
        except EgressDenied as exc:
            raise EngineError(f"model.parameters.base_url: {exc}") from None
        except httpx.TransportError as exc:
            return ScoreResult(request.key, error=f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return ScoreResult(request.key, error=f"HTTP {response.status_code}: {_detail(response)}")
        try:
            table = response.json()["choices"][0]["prompt_logprobs"]
            logprobs: list[float | None] = [None]
            for token, entry in zip(request.token_ids[1:], table[1:]):
                logprobs.append(float(entry[str(token)]["logprob"]))
        except (ValueError, KeyError, TypeError, IndexError):
            return ScoreResult(request.key, error="the endpoint does not return prompt log-probs for token ids")
        if len(logprobs) != len(request.token_ids):
            return ScoreResult(request.key, error="the endpoint returned log-probs for a different number of tokens")
        return ScoreResult(request.key, logprobs=logprobs)

    def request_body(self, request: GenerationRequest, params: SamplingParams) -> dict[str, Any]:
        """The chat-completions JSON body of one request."""
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [_wire_message(m) for m in request.messages],
            # Greedy samples of one prompt are all the same (and servers such as vLLM's refuse n > 1
            # without sampling): one is asked for and repeated.
            "n": 1 if params.temperature == 0 else request.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.top_k is not None and params.top_k > 0:
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice in ("auto", "required", "none"):
                body["tool_choice"] = request.tool_choice
            elif request.tool_choice:
                body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice}}
        if params.logprobs:
            body["logprobs"] = True
            body["return_tokens_as_token_ids"] = True  # vLLM's server: tokens as "token_id:<id>"
        return body

    async def _one(self, request: GenerationRequest, params: SamplingParams, refused: asyncio.Event) -> GenerationResult:
        """One request with its retries; `refused` is set on an error that concerns every request."""
        body = self.request_body(request, params)
        attempt = 0
        while True:
            if refused.is_set():
                return GenerationResult(request.key, error="not sent: the endpoint refused another request")
            try:
                async with self._slots:
                    response = await self.aclient.post("/chat/completions", json=body)
            except EgressDenied as exc:
                refused.set()
                raise EngineError(f"model.parameters.base_url: {exc}") from None
            except httpx.TransportError as exc:  # connection refused/reset, timeouts, protocol errors
                problem, wait = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code == 200:
                    return _repeat_greedy(_parse(request, response), request.n if params.temperature == 0 else 1)
                detail = _detail(response)
                if response.status_code in FATAL_STATUSES:
                    refused.set()
                    raise EngineError(_fatal_message(response.status_code, detail, self))
                if response.status_code not in RETRY_STATUSES:
                    return GenerationResult(request.key, error=f"HTTP {response.status_code}: {detail}")
                problem, wait = f"HTTP {response.status_code}: {detail}", retry_after(response)
            if attempt >= self.max_retries:
                return GenerationResult(request.key, error=f"gave up after {attempt + 1} attempts; last: {problem}")
            delay = backoff_delay(attempt, wait)
            logger.info("retrying %s in %.2fs after %s", request.key, delay, problem)
            await asyncio.sleep(delay)
            attempt += 1

    def close(self) -> None:
        from spider.engines.loop import engine_loop

        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        loop = engine_loop()
        if loop.in_loop:
            asyncio.ensure_future(self.aclient.aclose())
        else:
            try:
                loop.run(self.aclient.aclose(), timeout=10)
            except Exception:  # connections a dead server left behind close with the process
                logger.debug("closing the async client raised", exc_info=True)


def backoff_delay(attempt: int, retry_after_s: float | None = None) -> float:
    """Full-jitter exponential backoff, but never shorter than the server's Retry-After."""
    jittered = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt))
    if retry_after_s is None:
        return jittered
    return max(min(retry_after_s, RETRY_AFTER_MAX_S), jittered)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    millis = response.headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse(request: GenerationRequest, response: httpx.Response) -> GenerationResult:
    try:
        data = response.json()
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total_completion = int(usage.get("completion_tokens") or 0)
        completions = []
        # Endpoints report one completion-token total for all n choices: it is split evenly.
        share, extra = divmod(total_completion, max(len(choices), 1))
        for i, choice in enumerate(choices):
            message = choice.get("message") or {}
            token_ids, logprobs = _sampled_tokens(choice.get("logprobs"))
            calls, malformed = _tool_calls(message.get("tool_calls") or [])
            completions.append(
                Completion(
                    text=message.get("content") or "",
                    finish_reason=choice.get("finish_reason"),
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=share + (1 if i < extra else 0)),
                    tool_calls=calls,
                    malformed_calls=malformed,
                    token_ids=token_ids,
                    logprobs=logprobs,
                )
            )
    except (ValueError, KeyError, TypeError) as exc:
        return GenerationResult(request.key, error=f"unreadable response ({exc}): {response.text[:500]}")
    return GenerationResult(request.key, completions=completions)


def _repeat_greedy(result: GenerationResult, n: int) -> GenerationResult:
    if n > 1 and len(result.completions) == 1:
        one = result.completions[0]
        result.completions = [one] + [
            dataclasses.replace(one, token_ids=list(one.token_ids), tool_calls=list(one.tool_calls)) for _ in range(n - 1)
        ]
    return result


def _sampled_tokens(data: dict[str, Any] | None) -> tuple[list[int], list[float] | None]:
    """Token ids (where the endpoint gives them as `token_id:<id>`) and log-probs of a choice."""
    if not data or not data.get("content"):
        return [], None
    entries = data["content"]
    logprobs = [float(e["logprob"]) for e in entries]
    tokens = [str(e.get("token", "")) for e in entries]
    ids = [int(t.split(":", 1)[1]) for t in tokens if t.startswith("token_id:")]
    return (ids if len(ids) == len(tokens) else []), logprobs


def _tool_calls(entries: list[dict[str, Any]]) -> tuple[list[ToolCall], list[tuple[ToolCall, str]]]:
    """The calls an endpoint parsed, and those whose arguments are not a JSON object (kept, with
    why, so the model is told instead of the call vanishing)."""
    calls, malformed = [], []
    for data in entries:
        function = data["function"]
        call = ToolCall(id=data.get("id") or "", name=function["name"], arguments={})
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                malformed.append((call, f"the arguments are not JSON ({exc.msg}): {arguments[:200]!r}"))
                continue
        if not isinstance(arguments, dict):
            malformed.append((call, f"the arguments are not a JSON object: {json.dumps(arguments)[:200]}"))
            continue
        call.arguments = arguments
        calls.append(call)
    return calls, malformed


def _wire_message(message: Message) -> dict[str, Any]:
    """The OpenAI wire form: tool-call arguments travel as JSON strings, not objects."""
    out = message.to_openai()
    for call in out.get("tool_calls", []):
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else None
        return str(message or error)[:500]
    except ValueError:
        return response.text[:500]


def _fatal_message(status: int, detail: str, engine: OpenAIEngine) -> str:
    hint = {
        401: "the API key is missing or wrong: check model.parameters.api_key_env",
        403: "the API key may not use this model or endpoint",
        404: f"check model.name ({engine.name!r}) and model.parameters.base_url ({engine.base_url})",
    }[status]
    return f"the endpoint answered HTTP {status} ({detail}): {hint}"


def _positive_int(parameters: dict[str, Any], key: str, default: int, allow_zero: bool = False) -> int:
    value = parameters.get(key, default)
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise EngineError(f"model.parameters.{key} must be an integer >= {low}, got {value!r}")
    return value
