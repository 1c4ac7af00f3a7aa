"""Running the tools a model asks for, as a conversation loop sees them.

A `ToolExecutor` offers tool schemas (OpenAI function format) and runs calls, several at once.
Every failure is an answer for the model, never an exception of the loop: an unknown tool,
arguments that do not match the tool's schema, a tool that raises or runs out of time, an
answer longer than the limit (truncated with a marker). `SandboxTools` runs the job's own tools
(from `add_tool`) as tasks on the sandbox queue and awaits their answers on Redis.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from spider.types import ToolCall

TRUNCATION_MARKER = "\n[... tool output truncated: {omitted} more characters ...]"


@dataclass
class ToolAnswer:
    """What goes back to the model for one call; `error` names the kind of failure, if any."""

    content: str
    error: str | None = None


class ToolExecutor(Protocol):
    """Tools a conversation may call."""

    @property
    def schemas(self) -> list[dict[str, Any]]: ...

    async def call_many(self, calls: list[ToolCall]) -> list[ToolAnswer]: ...


def check_call(call: ToolCall, schemas: dict[str, dict[str, Any]]) -> str | None:
    """Why `call` cannot run (unknown tool, arguments against the schema), or None."""
    schema = schemas.get(call.name)
    if schema is None:
        return f"there is no tool named {call.name!r}; the tools are: {', '.join(sorted(schemas)) or 'none'}"
    import jsonschema

    parameters = schema.get("function", schema).get("parameters") or {"type": "object"}
    try:
        jsonschema.validate(call.arguments, parameters)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the arguments"
        return f"the arguments of {call.name!r} do not match its schema at {where}: {exc.message}"
    except jsonschema.SchemaError:
        return None  # the tool's own schema is loose: let the tool judge its arguments
    return None


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATION_MARKER.format(omitted=len(text) - limit)


class CheckedTools:
    """Checks every call against the schemas before it reaches `run`, truncates answers, and
    turns every failure into an answer for the model. Subclasses provide `run`."""

    def __init__(self, schemas: list[dict[str, Any]], max_output_chars: int):
        self._schemas = list(schemas)
        self._by_name = {s.get("function", s)["name"]: s for s in self._schemas}
        self.max_output_chars = max_output_chars

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return self._schemas

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        raise NotImplementedError

    async def call_many(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        answers: list[ToolAnswer | None] = [None] * len(calls)
        runnable = []
        for i, call in enumerate(calls):
            problem = check_call(call, self._by_name)
            if problem is not None:
                answers[i] = ToolAnswer(f"error: {problem}", error="invalid_call")
            else:
                runnable.append(i)
        if runnable:
            try:
                done = await self.run([calls[i] for i in runnable])
            except Exception as exc:  # the executor itself failed: every call hears why
                done = [ToolAnswer(f"error: the tool could not run ({type(exc).__name__}: {exc})", error="exception")] * len(runnable)
            for i, answer in zip(runnable, done):
                answers[i] = answer
        return [ToolAnswer(truncate(a.content, self.max_output_chars), a.error) for a in answers if a is not None]


class SandboxTools(CheckedTools):
    """The job's own tools, each call a task on the sandbox queue (`send(call_id, name, arguments)`),
    its answer awaited on the Redis list `reply_key(call_id)` (`aredis`: a redis.asyncio client)."""

    def __init__(
        self,
        schemas: list[dict[str, Any]],
        send: Callable[[str, str, dict[str, Any]], Awaitable[None] | None],
        aredis: Any,
        reply_key: Callable[[str], str],
        timeout_s: float,
        max_output_chars: int,
    ):
        super().__init__(schemas, max_output_chars)
        self.send = send
        self.aredis = aredis
        self.reply_key = reply_key
        self.timeout_s = timeout_s

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        ids = [uuid.uuid4().hex for _ in calls]
        for reply, call in zip(ids, calls):
            sent = self.send(reply, call.name, call.arguments)
            if asyncio.iscoroutine(sent):
                await sent
        return list(await asyncio.gather(*(self._answer(reply) for reply in ids)))

    async def _answer(self, reply: str) -> ToolAnswer:
        # Waited for in short slices: a client's socket timeout (5 s by default in redis-py) must
        # never end a long tool call.
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        got = None
        while got is None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return ToolAnswer(f"error: the tool did not answer within {self.timeout_s:g} s", error="timeout")
            got = await self.aredis.blpop([self.reply_key(reply)], timeout=max(0.1, min(2.0, left)))
        data = json.loads(got[1])
        error = data.get("error")
        if error:
            kind = error.get("kind") or "exception"
            return ToolAnswer(f"error: {error.get('type', 'Error')}: {error.get('message', '')}", error=kind)
        return ToolAnswer(str(data.get("content") or ""))
