"""The vocabulary every Spider module speaks: rows, messages, batches, records, events.

Small dataclasses defined once and imported everywhere; nothing else travels between layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class ToolCall:
    """One call the model asked for: `arguments` is the decoded JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    """One chat message. `tool_calls` on assistant messages, `tool_call_id`/`name` on tool results."""

    role: Role
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI / HF chat-template shape of this message."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_openai(cls, data: dict[str, Any]) -> "Message":
        calls = [
            ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"].get("arguments") or {})
            for c in data.get("tool_calls") or []
        ]
        return cls(
            role=data["role"],
            content=data.get("content") or "",
            tool_calls=calls,
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
        )


Conversation = list[Message]


def row_id(job_id: str, row_index: int, sample_index: int | None = None) -> str:
    """The stable identity of a source row (and of one sample of it): every write is keyed by it."""
    base = f"{job_id}:{row_index}"
    return base if sample_index is None else f"{base}:{sample_index}"


@dataclass
class Row:
    """One source row after pre-processing: the prompt to generate from, plus the original fields."""

    index: int
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """The unit of rollout work: consecutive rows of one job, owned by one task, written as one shard."""

    job_id: str
    index: int
    rows: list[Row]


@dataclass
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __iadd__(self, other: "Usage") -> "Usage":
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        return self


@dataclass
class Record:
    """One output row of a dataset job: one sample of one source row, or the error that replaced it."""

    id: str
    row_index: int
    sample_index: int
    prompt: str
    messages: list[dict[str, Any]]
    completion: str | None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    source: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Event:
    """A progress event: `kind` is a dotted name (`job.started`, `batch.completed`, `train.step`, ...)."""

    id: str
    job_id: str
    ts: float
    kind: str
    level: Literal["debug", "info", "warning", "error"]
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
