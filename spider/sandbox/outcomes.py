"""What a call into user code produced: a value, a dropped row, or an error that is data.

A processor or tool that raises, times out, hits a limit or kills its interpreter does not fail
the job: its outcome carries a `CallError` that becomes an error record for the row or an error
tool message for the model.

What an interpreter sends is untrusted: `from_wire` takes any decoded JSON and never raises.
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

ErrorKind = Literal["exception", "timeout", "limit", "crash", "load", "protocol"]
ERROR_KINDS = get_args(ErrorKind)
MAX_ERROR_TEXT = 4000  # characters kept of an error's message, and of its traceback
# Deeper results would break the recursive code that later stages run on rows (dataclass
# conversion, encoders, validators); 128 is also serde_json's default.
MAX_RESULT_DEPTH = 128

_preview = reprlib.Repr()
_preview.maxstring = _preview.maxother = 80


def preview(value: Any) -> str:
    """A short repr of any decoded JSON, however large or deep, for error messages."""
    return _preview.repr(value)


def _text(value: Any, limit: int = MAX_ERROR_TEXT, tail: bool = False) -> str:
    if not isinstance(value, str):
        return preview(value)
    return value[-limit:] if tail else value[:limit]


def _deeper_than(value: list | dict, limit: int) -> bool:
    """Whether decoded JSON nests more than `limit` lists and dicts; depth-first, without
    recursion, holding one iterator per level."""
    stack = [iter(value.values() if isinstance(value, dict) else value)]
    while stack:
        for child in stack[-1]:
            if isinstance(child, (list, dict)):
                if len(stack) >= limit:
                    return True
                stack.append(iter(child.values() if isinstance(child, dict) else child))
                break
        else:
            stack.pop()
    return False


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
    def from_wire(cls, entry: Any) -> "CallError":
        """`[kind, type, message, traceback]`, each part optional; anything else still makes an error."""
        fields = list(entry[:4]) if isinstance(entry, list) else []
        kind, type_name, message, traceback = fields + [""] * (4 - len(fields))
        return cls(
            kind=kind if isinstance(kind, str) and kind in ERROR_KINDS else "exception",  # type: ignore[arg-type]
            type=_text(type_name, 200),
            message=_text(message),
            traceback=_text(traceback, tail=True),
        )


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
        """An outcome from any decoded JSON: a malformed one is an error outcome, never an exception."""
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            if entry[0] == "ok" and len(entry) == 2:
                if isinstance(entry[1], (list, dict)) and _deeper_than(entry[1], MAX_RESULT_DEPTH):
                    message = f"the result is nested more than {MAX_RESULT_DEPTH} lists or dicts deep"
                    return cls("error", error=CallError("limit", "NestingLimit", message))
                return cls("kept", value=entry[1])
            if entry[0] == "drop" and len(entry) == 1:
                return cls("dropped")
            if entry[0] == "error":
                return cls("error", error=CallError.from_wire(entry[1:5]))
        return cls("error", error=CallError("protocol", "ProtocolError", f"malformed outcome {preview(entry)}"))


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
