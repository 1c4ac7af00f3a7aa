"""The one interface every generation backend implements, and the objects it speaks.

An `Engine` samples a whole batch in one call (`generate`), one request at a time on the worker's
event loop (`sample`, see spider.engines.loop), and scores given token sequences (`score`: the
log-probability of every token given the ones before it, so a teacher can score a student's
tokens). Completions carry the prompt ids they were sampled from, the sampled token ids and, when
asked (`SamplingParams.logprobs`), each sampled token's log-probability under the model's own
distribution (before temperature and filters: the same quantity `score` returns).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from spider.types import Message, ToolCall, Usage


@dataclass
class SamplingParams:
    """Sampling settings shared by every engine. `seed` here is the job seed; each request has its own."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logprobs: bool = False


@dataclass
class GenerationRequest:
    """Generate `n` completions for one conversation. `seed` (per row) makes sampling reproducible
    whatever the batching; `tools` are OpenAI-style function schemas offered to the model.
    `prompt_ids`, when given, are used as they are (no rendering): multi-turn loops and trainers
    that own the exact token sequence pass it."""

    key: str
    messages: list[Message]
    n: int = 1
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    prompt_ids: list[int] | None = None
    tool_choice: str | None = None  # auto | required | none | a tool's name (with `tools`)
    regex: str | None = None  # constrain the text to this regular expression (engines that can)


@dataclass
class Completion:
    """One sample. `tool_calls` holds calls the backend itself parsed (OpenAI-compatible endpoints);
    in-process engines leave them in `text`, in the model's own format."""

    text: str
    finish_reason: str | None
    usage: Usage
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    prompt_ids: list[int] | None = None
    constrained: bool = False  # the text was decoded under a tool-call schema; `tool_calls` hold the call
    malformed_calls: list[tuple[ToolCall, str]] = field(default_factory=list)  # parsed calls that cannot run, and why


@dataclass
class GenerationResult:
    """The answer to one request: `n` completions, or an error message for this request alone."""

    key: str
    completions: list[Completion] = field(default_factory=list)
    error: str | None = None


@dataclass
class ScoreRequest:
    """Score every token of `token_ids` (a prompt and a completion, as one sequence)."""

    key: str
    token_ids: list[int]


@dataclass
class ScoreResult:
    """`logprobs[k]` = log p(token_ids[k] | token_ids[:k]); position 0 has no context (None)."""

    key: str
    logprobs: list[float | None] = field(default_factory=list)
    error: str | None = None


def tool_call_schema(tools: list[dict[str, Any]] | None, tool_choice: str | None) -> dict[str, Any] | None:
    """The JSON schema that forces one call (`{"name": ..., "arguments": {...}}`) of any tool
    (`required`) or of the named one, for engines with constrained decoding; None for auto / none."""
    if not tools or tool_choice in (None, "auto", "none"):
        return None
    functions = [t.get("function", t) for t in tools]
    if tool_choice != "required":
        functions = [f for f in functions if f["name"] == tool_choice]
        if not functions:
            raise ValueError(f"tool_choice names {tool_choice!r}, which is not among the tools offered")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": _closed(f.get("parameters") or {"type": "object"}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """The arguments' schema with no keys beyond the declared ones (unless it says otherwise): a
    constrained model writes the call and stops, instead of inventing keys."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def constrained_call(completion: Completion) -> None:
    """Read the call out of text decoded under `tool_call_schema` (a length cut may leave it unfinished)."""
    import json
    import uuid

    completion.constrained = True
    try:
        data = json.loads(completion.text)
        call = ToolCall(id="call_" + uuid.uuid4().hex[:24], name=data["name"], arguments=dict(data["arguments"]))
    except (ValueError, KeyError, TypeError):
        return  # not a whole call: the loop reads the text as it is
    completion.tool_calls = [call]


def prompt_ids(renderer: Any, request: GenerationRequest) -> list[int]:
    """The ids a request is sampled from: its own `prompt_ids`, else its conversation rendered."""
    if request.prompt_ids is not None:
        if not request.prompt_ids:
            raise ValueError("the request's prompt_ids are empty")
        return list(request.prompt_ids)
    return renderer.render(request.messages, request.tools).ids


class Engine(abc.ABC):
    """A loaded model that turns a batch of requests into results.

    `generate` takes a whole batch in one call so backends can batch internally (vLLM's continuous
    batching, bounded concurrency for HTTP endpoints); `agenerate` is the same on the worker's
    event loop, where cancelling it (or a `sample`) stops the work it started. A failure of one
    request is reported on its result; an exception means the engine itself failed.
    """

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]: ...

    async def agenerate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """The whole batch, awaited on the worker's event loop. Cancelling it stops the work:
        engines override it to abort their requests (vLLM), stop decoding (hf) or close their
        connections (HTTP). This default runs `generate` in a thread, whose result a cancel drops."""
        import asyncio

        return await asyncio.to_thread(self.generate, requests, params)

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        """One request, awaited on the worker's event loop while others run. Engines that batch
        internally override it; this default runs a one-request batch in a thread."""
        import asyncio

        return (await asyncio.to_thread(self.generate, [request], params))[0]

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Per-token log-probabilities of given sequences (prompt log-probs)."""
        from spider.errors import EngineError

        raise EngineError(f"{type(self).__name__} cannot score token sequences")

    def close(self) -> None:
        """Release the model (GPU memory, engine processes, connections)."""
