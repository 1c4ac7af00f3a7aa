"""The one interface every generation backend implements, and the objects it speaks."""

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


@dataclass
class GenerationRequest:
    """Generate `n` completions for one conversation. `seed` (per row) makes sampling reproducible
    whatever the batching; `tools` are OpenAI-style function schemas offered to the model."""

    key: str
    messages: list[Message]
    n: int = 1
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass
class Completion:
    """One sample. `tool_calls` holds calls the backend itself parsed (OpenAI-compatible endpoints);
    in-process engines leave them in `text`, in the model's own format."""

    text: str
    finish_reason: str | None
    usage: Usage
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class GenerationResult:
    """The answer to one request: `n` completions, or an error message for this request alone."""

    key: str
    completions: list[Completion] = field(default_factory=list)
    error: str | None = None


class Engine(abc.ABC):
    """A loaded model that turns a batch of requests into results.

    `generate` takes a whole batch in one call so backends can batch internally (vLLM's continuous
    batching, bounded concurrency for HTTP endpoints). A failure of one request is reported on its
    result; an exception means the engine itself failed.
    """

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]: ...

    def close(self) -> None:
        """Release the model (GPU memory, engine processes, connections)."""
