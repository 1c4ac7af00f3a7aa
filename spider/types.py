"""The vocabulary every Spider module speaks: messages, rows, records, batch statistics, job
statuses, events and the manifest of a bundle of user code.

Small dataclasses and enums defined once and imported everywhere; nothing else travels between
layers. Where one is stored or sent as JSON, its `to_dict` / `from_dict` are the one format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
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
    """One chat message. `tool_calls` (and the model's `reasoning_content`, when its family's
    reasoning parser split it off) on assistant messages, `tool_call_id`/`name` on tool results."""

    role: Role
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

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
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
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
            reasoning_content=data.get("reasoning_content"),
        )


def row_id(job_id: str, row_index: int, sample_index: int | None = None) -> str:
    """The stable identity of a source row (and of one sample of it): every write is keyed by it."""
    base = f"{job_id}:{row_index}"
    return base if sample_index is None else f"{base}:{sample_index}"


@dataclass
class RowError:
    """Why a row (or one sample of it) has no completion. `type` names the error (the exception
    class of the user's code, `SourceError`, `GenerationError`, ...); `kind` is set when user code
    failed and says how (`exception`, `timeout`, `limit`, `crash`, ...)."""

    type: str
    message: str
    kind: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"type": self.type, "message": self.message}
        if self.kind is not None:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowError":
        return cls(type=data["type"], message=data["message"], kind=data.get("kind"))


@dataclass
class BatchRow:
    """A source row as a rollout sees it: what to start from, its original fields, or why there is
    nothing to start from (`error`).

    A row starts from a `prompt` (one user turn) or from a whole `conversation` (the messages so
    far, for multi-turn rollouts); `prompt` is what the result records show as the row's prompt."""

    index: int
    prompt: str | None
    data: dict[str, Any]
    error: RowError | None = None
    conversation: list[Message] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "prompt": self.prompt,
            "data": self.data,
            "error": self.error.to_dict() if self.error else None,
        }
        if self.conversation is not None:
            out["conversation"] = [m.to_openai() for m in self.conversation]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BatchRow":
        conversation = data.get("conversation")
        return cls(
            index=data["index"],
            prompt=data.get("prompt"),
            data=data.get("data") or {},
            error=RowError.from_dict(data["error"]) if data.get("error") else None,
            conversation=[Message.from_openai(m) for m in conversation] if conversation is not None else None,
        )


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
    messages: list[Message]
    completion: str | None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    source: dict[str, Any] = field(default_factory=dict)
    error: RowError | None = None
    # Multi-turn rollouts only (absent from single-turn records): the tool schemas offered, one
    # entry per model turn (finish reason, tokens, latency, tool calls, and token ids / log-probs
    # with `generation.return_tokens`), why the conversation ended, tool calls and failed ones.
    tools: list[dict[str, Any]] | None = None
    turns: list[dict[str, Any]] | None = None
    stop_reason: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record as the result file holds it (messages in the OpenAI shape)."""
        out = self._base_dict()
        if self.stop_reason is not None:
            out.update(tools=self.tools, turns=self.turns, stop_reason=self.stop_reason,
                       tool_calls=self.tool_calls, tool_errors=self.tool_errors)
        return out

    def _base_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "row_index": self.row_index,
            "sample_index": self.sample_index,
            "prompt": self.prompt,
            "messages": [m.to_openai() for m in self.messages],
            "completion": self.completion,
            "finish_reason": self.finish_reason,
            "usage": asdict(self.usage),
            "source": self.source,
            "error": self.error.to_dict() if self.error else None,
        }


@dataclass
class BatchStats:
    """What one finished batch adds to its job's progress, counted once when the batch completes.
    `rows_done` counts the rows a processor dropped too; `error_examples` are a few row errors for
    the progress event, never summed."""

    rows_done: int = 0
    dropped: int = 0
    records: int = 0
    row_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    COUNTERS = ("rows_done", "records", "row_errors", "dropped", "prompt_tokens", "completion_tokens")

    def counters(self) -> dict[str, int]:
        """The integer counters, by name, as the job's progress sums them."""
        return {name: int(getattr(self, name)) for name in self.COUNTERS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BatchStats":
        known = {f.name for f in fields(cls)}
        stats = cls(**{k: v for k, v in data.items() if k in known})
        for name in cls.COUNTERS:
            setattr(stats, name, int(float(getattr(stats, name))))
        stats.generation_seconds = float(stats.generation_seconds)
        return stats


class JobStatus(StrEnum):
    """Where a job is: `queued` until a control worker plans it, `running` while its batches are
    generated, then one of the ended statuses (`completed`, `failed`, `cancelled`)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in ENDED_STATUSES


ENDED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class EventKind(StrEnum):
    """Every kind of progress event, by its dotted name."""

    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_PLANNED = "job.planned"
    JOB_RESUMED = "job.resumed"
    STAGE_RETRY = "stage.retry"
    JOB_COMPLETED = "job.completed"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    MODEL_LOADING = "model.loading"
    MODEL_LOADED = "model.loaded"
    BATCH_STARTED = "batch.started"
    BATCH_GENERATED = "batch.generated"
    BATCH_COMPLETED = "batch.completed"
    BATCH_ROW_ERRORS = "batch.row_errors"
    TRAIN_STEP = "train.step"
    TRAIN_EVAL = "train.eval"
    TRAIN_CHECKPOINT = "train.checkpoint"
    TRAIN_EXPORTED = "train.exported"
    TRAIN_TEMPLATE = "train.template"
    UPLOAD_STARTED = "upload.started"
    UPLOAD_COMPLETED = "upload.completed"
    SANDBOX_UNSAFE = "sandbox.unsafe"


# The kinds that end a job's history: nothing follows them.
ENDING_KINDS = frozenset({EventKind.JOB_COMPLETED, EventKind.JOB_FAILED, EventKind.JOB_CANCELLED})


@dataclass
class Event:
    """A progress event: `kind` is a dotted name (an `EventKind`; a client may meet kinds newer
    than its own list, so it stays a string)."""

    id: str
    job_id: str
    ts: float
    kind: str
    level: Literal["debug", "info", "warning", "error"]
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle of user code holds, read from its header without running any of it (see
    spider.bundle.bundle_manifest): the client's `python` version and `python_minor`,
    `cloudpickle`'s version, the `tools` (names) and their `tool_specs` (OpenAI-style schemas),
    the processors' qualified names, the `local_modules` pickled by value, the `source_modules`
    whose source files travel, and the bundle's size in `bytes`."""

    python: str
    python_minor: str
    cloudpickle: str
    tools: list[str]
    tool_specs: list[dict[str, Any]]
    has_pre_processor: bool
    has_post_processor: bool
    pre_processor: str | None
    post_processor: str | None
    local_modules: list[str]
    source_modules: list[str]
    bytes: int

    @property
    def has_tools(self) -> bool:
        return bool(self.tool_specs)

    def __getitem__(self, name: str) -> Any:
        # Mapping-style reads (`manifest["python_minor"]`) for code written against the dict form.
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleManifest":
        return cls(**{f.name: data[f.name] for f in fields(cls)})
