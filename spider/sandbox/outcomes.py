"""What a call into user code produced: a value, a dropped row, or an error that is data.

A processor or tool that raises, times out, hits a limit or kills its interpreter does not fail
the job: its outcome carries a `CallError` that becomes an error record for the row or an error
tool message for the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

ErrorKind = Literal["exception", "timeout", "limit", "crash", "load", "protocol"]


@dataclass
class CallError:
    """Why a call into user code failed.

    `kind`: `exception` (the user's code raised), `timeout` (past `call_timeout_s`), `limit`
    (memory or CPU time), `crash` (the interpreter died), `load` (the bundle did not load),
    `protocol` (the interpreter broke the pipe protocol). `type` is the exception class name,
    `message` its text, `traceback` the last frames of the user's code when there are any."""

    kind: ErrorKind
    type: str
    message: str
    traceback: str = ""

    def describe(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_wire(cls, entry: list[Any]) -> "CallError":
        kind, type_name, message, traceback = (list(entry) + ["", "", "", ""])[:4]
        return cls(kind=str(kind), type=str(type_name), message=str(message), traceback=str(traceback))  # type: ignore[arg-type]


@dataclass
class Outcome:
    """The result of a processor on one row or record: `kept` (with its new `value`), `dropped`
    (the processor returned None) or `error`."""

    status: Literal["kept", "dropped", "error"]
    value: Any = None
    error: CallError | None = None

    @property
    def kept(self) -> bool:
        return self.status == "kept"

    @property
    def dropped(self) -> bool:
        return self.status == "dropped"

    @classmethod
    def from_wire(cls, entry: Any) -> "Outcome":
        if isinstance(entry, list) and entry:
            if entry[0] == "ok" and len(entry) == 2:
                return cls("kept", value=entry[1])
            if entry[0] == "drop":
                return cls("dropped")
            if entry[0] == "error":
                return cls("error", error=CallError.from_wire(entry[1:]))
        return cls("error", error=CallError("protocol", "ProtocolError", f"malformed outcome {str(entry)[:200]!r}"))


@dataclass
class ToolOutcome:
    """The result of one tool call: `content` (the tool's string, or its JSON-encoded result) or
    an `error`. `as_tool_message()` is what the model sees either way."""

    content: str | None = None
    error: CallError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_tool_message(self) -> str:
        if self.error is None:
            return self.content or ""
        return f"Error: {self.error.describe()}"
