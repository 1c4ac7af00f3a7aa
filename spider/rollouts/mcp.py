"""Tools of MCP servers, as a conversation loop sees them.

A job's `generation.mcp_servers` name stdio servers (a `command`, run in the job's sandbox on a
sandbox worker: `QueuedMCPServer` reaches one through tasks on the sandbox queue, as `SandboxTools`
reaches the job's own tools) and remote servers (a `url`, reached from here with the SDK's
streamable HTTP client over `spider.netpolicy.guarded_async_transport`: `RemoteMCPServer`).
`MCPTools.open` lists every server's tools and offers them to the model; `combine_tools` adds the
job's own tools. A tool name belongs to one source only: a clash is a `ToolNameClash`.

Every failure of a call is an answer for the model; a server whose tools cannot be listed is an
`MCPServerError` from `MCPTools.open`, which fails the batch. One SDK session is an
`MCPConnection` (spider.rollouts.mcp_session), here and on the sandbox worker alike.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from spider.errors import SpiderError
from spider.netpolicy import ResponseTooLarge
from spider.rollouts.mcp_session import MCPConnection, MCPServerError, describe, outcome_of
from spider.rollouts.tools import CheckedTools, ToolAnswer
from spider.sandbox.outcomes import CallError, ToolOutcome
from spider.types import ToolCall

if TYPE_CHECKING:
    from spider.config import MCPServerConfig

__all__ = [
    "CombinedTools", "MCPConnection", "MCPServer", "MCPServerError", "MCPTools", "QueuedMCPServer", "RemoteMCPServer",
    "SandboxRoute", "ToolNameClash", "combine_tools", "function_schema", "mcp_servers", "outcome_of",
]  # fmt: skip

REMOTE_MAX_RESPONSE_MB = 64
REPLY_POLL_S = 2.0


class ToolNameClash(SpiderError):
    """Two tool sources (the job's own tools, MCP servers) offer a tool of the same name."""


def function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """An MCP tool (wire form) as an OpenAI function schema."""
    parameters = tool.get("inputSchema") if isinstance(tool.get("inputSchema"), dict) else {}
    parameters = {"type": "object", "properties": {}, **parameters}
    function = {"name": tool["name"], "description": str(tool.get("description") or ""), "parameters": parameters}
    return {"type": "function", "function": function}


def answer_of(outcome: ToolOutcome) -> ToolAnswer:
    if outcome.error is not None:
        return ToolAnswer(f"error: {outcome.error.describe()}", error=outcome.error.kind)
    return ToolAnswer(outcome.content or "")


# -- servers --------------------------------------------------------------------------------------


class MCPServer(Protocol):
    """One MCP server of a job, as the rollout reaches it."""

    config: MCPServerConfig

    async def list_tools(self) -> list[dict[str, Any]]: ...

    async def call(self, tool: str, arguments: dict[str, Any]) -> ToolOutcome: ...

    async def aclose(self) -> None: ...


async def _sent(result: Awaitable[None] | None) -> None:
    if asyncio.iscoroutine(result):
        await result


@dataclass
class SandboxRoute:
    """How a rollout reaches the job's stdio MCP servers: `send_list(server, reply_id)` and
    `send_call(server, reply_id, tool, arguments)` enqueue sandbox tasks, whose answers arrive on
    the Redis lists `reply_key(reply_id)` (`aredis`: a redis.asyncio client). A listing may wait
    `list_wait_s` (a sandbox worker may first build the job's venv), a call its server's
    `timeout_s` plus `call_grace_s` (the queue, a server start)."""

    send_list: Callable[[str, str], Awaitable[None] | None]
    send_call: Callable[[str, str, str, dict[str, Any]], Awaitable[None] | None]
    aredis: Any
    reply_key: Callable[[str], str]
    list_wait_s: float = 900.0
    call_grace_s: float = 60.0


class QueuedMCPServer:
    """A stdio server of the job, running in its sandbox on a sandbox worker: every listing and
    call is a task on the sandbox queue; this process never starts the server's command."""

    def __init__(self, config: MCPServerConfig, route: SandboxRoute):
        self.config = config
        self.route = route

    async def _reply(self, reply: str, wait_s: float) -> dict[str, Any] | None:
        """The answer on the reply list, waited for in slices: a blocking pop longer than the
        client's socket timeout (redis-py 8: 5 s by default) would fail instead of waiting."""
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            got = await self.route.aredis.blpop([self.route.reply_key(reply)], timeout=min(left, REPLY_POLL_S))
            if got is not None:
                data = json.loads(got[1])
                return data if isinstance(data, dict) else {}
        return None

    async def list_tools(self) -> list[dict[str, Any]]:
        reply = uuid.uuid4().hex
        await _sent(self.route.send_list(self.config.name, reply))
        data = await self._reply(reply, self.route.list_wait_s)
        if data is None:
            raise MCPServerError(f"no sandbox worker listed the tools of MCP server {self.config.name!r} within {self.route.list_wait_s:g} s")
        if data.get("error"):
            raise MCPServerError(str(data["error"].get("message") or data["error"]))
        tools = data.get("tools")
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise MCPServerError(f"the tool listing of MCP server {self.config.name!r} is malformed")
        return tools

    async def call(self, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        reply = uuid.uuid4().hex
        await _sent(self.route.send_call(self.config.name, reply, tool, arguments))
        wait_s = self.config.timeout_s + self.route.call_grace_s
        data = await self._reply(reply, wait_s)
        if data is None:
            return ToolOutcome(error=CallError("timeout", "Timeout", f"the MCP server did not answer within {wait_s:g} s"))
        error = data.get("error")
        if error:
            kind = error.get("kind") if error.get("kind") in ("exception", "timeout", "limit", "crash", "load", "protocol") else "exception"
            return ToolOutcome(error=CallError(kind, str(error.get("type") or "Error"), str(error.get("message") or "")))
        return ToolOutcome(content=str(data.get("content") or ""))

    async def aclose(self) -> None:
        """Nothing to close here: the sandbox worker closes the session with the job or when idle."""


class RemoteMCPServer:
    """A remote server (`url`), reached from this process with the SDK's streamable HTTP client:
    every connection goes through spider.netpolicy (public addresses only, unless the operator
    allows the host in `allowed_hosts`), redirects leave the origin never, and a response longer
    than `max_response_bytes` fails its call. The session is opened on first use and again after
    it failed; `aclose` ends it (on the event loop that opened it)."""

    def __init__(self, config: MCPServerConfig, allowed_hosts: tuple[str, ...], max_response_bytes: int):
        self.config = config
        self.allowed_hosts = allowed_hosts
        self.max_response_bytes = max_response_bytes
        self.connection: MCPConnection | None = None
        self._lock = asyncio.Lock()
        # What the guarded transport last refused (the SDK turns it into a vaguer error of its own).
        self._refusal: SpiderError | None = None

    async def _connected(self) -> MCPConnection:
        async with self._lock:
            if self.connection is None or not self.connection.alive:
                if self.connection is not None:
                    await self.connection.close()
                from spider.netpolicy import EgressDenied, check_url

                try:
                    await asyncio.to_thread(check_url, self.config.url, self.allowed_hosts)
                except EgressDenied as exc:
                    raise MCPServerError(f"MCP server {self.config.name!r} ({self.config.url}) is refused: {exc}") from None
                connection = MCPConnection(repr(self.config.name), self._transport, self.config.timeout_s)
                await connection.start()
                self.connection = connection
            return self.connection

    @asynccontextmanager
    async def _transport(self, connection: MCPConnection):
        from mcp.client import streamable_http

        from spider.netpolicy import guarded_async_transport

        library = "httpx2" if hasattr(streamable_http, "httpx2") else "httpx"
        http = __import__(library)
        transport = guarded_async_transport(
            self.allowed_hosts, library, max_response_bytes=self.max_response_bytes, on_refusal=self._refused
        )
        client = http.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
            timeout=http.Timeout(30.0, read=max(300.0, self.config.timeout_s)),
        )
        async with client:
            async with streamable_http.streamable_http_client(self.config.url, http_client=client) as streams:
                yield streams

    def _refused(self, error: SpiderError) -> None:
        self._refusal = error

    async def list_tools(self) -> list[dict[str, Any]]:
        connection = await self._connected()
        return await connection.list_tools(self.config.timeout_s)

    async def call(self, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        try:
            connection = await self._connected()
        except MCPServerError as exc:
            return ToolOutcome(error=CallError("load", "MCPServerError", str(exc)))
        self._refusal = None
        outcome = await connection.call(tool, arguments, self.config.timeout_s)
        refusal, self._refusal = self._refusal, None
        if outcome.error is not None and refusal is not None:  # (with calls at once, maybe another's)
            kind = "limit" if isinstance(refusal, ResponseTooLarge) else "exception"
            return ToolOutcome(error=CallError(kind, type(refusal).__name__, str(refusal)))
        return outcome

    async def aclose(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def mcp_servers(
    configs: list[MCPServerConfig],
    route: SandboxRoute | None,
    allowed_hosts: tuple[str, ...],
    network: bool,
    max_response_mb: int = REMOTE_MAX_RESPONSE_MB,
) -> list[MCPServer]:
    """The job's servers: stdio ones through `route`, remote ones (which need `network`, the job's
    `runtime.network`) from this process."""
    servers: list[MCPServer] = []
    for config in configs:
        if config.command is not None:
            if route is None:
                raise MCPServerError(f"MCP server {config.name!r} runs in the sandbox, and no route to it was given")
            servers.append(QueuedMCPServer(config, route))
        elif not network:
            raise MCPServerError(f"MCP server {config.name!r} is remote ({config.url}): it needs runtime.network: true")
        else:
            servers.append(RemoteMCPServer(config, allowed_hosts, max_response_mb * 1024 * 1024))
    return servers


# -- the tools the model sees -----------------------------------------------------------------------


class MCPTools(CheckedTools):
    """The tools of a job's MCP servers. Open with `MCPTools.open` (lists them all), close with
    `aclose` on the same event loop."""

    def __init__(self, listed: list[tuple[MCPServer, list[dict[str, Any]]]], max_output_chars: int):
        self.servers = [server for server, _ in listed]
        self._owner: dict[str, MCPServer] = {}
        schemas = []
        for server, tools in listed:
            for tool in tools:
                name = tool["name"]
                if name in self._owner:
                    raise ToolNameClash(
                        f"the tool {name!r} is offered by both {self.origin(name)} and MCP server {server.config.name!r}; "
                        "tool names must be unique across the job's tools and its MCP servers"
                    )
                self._owner[name] = server
                schemas.append(function_schema(tool))
        super().__init__(schemas, max_output_chars)

    @classmethod
    async def open(cls, servers: list[MCPServer], max_output_chars: int) -> "MCPTools":
        """List every server's tools (at once); MCPServerError naming each server that failed."""
        listings = await asyncio.gather(*(server.list_tools() for server in servers), return_exceptions=True)
        failures = [(s, r) for s, r in zip(servers, listings) if isinstance(r, BaseException)]
        try:
            if failures:
                raise MCPServerError(
                    "; ".join(f"the tools of MCP server {s.config.name!r} could not be listed: {describe(r)}" for s, r in failures)
                )
            return cls(list(zip(servers, listings)), max_output_chars)  # type: ignore[arg-type]
        except BaseException:
            await asyncio.gather(*(server.aclose() for server in servers), return_exceptions=True)
            raise

    def origin(self, name: str) -> str:
        """Where the tool `name` comes from, for messages."""
        server = self._owner.get(name)
        return f"MCP server {server.config.name!r}" if server is not None else "no source"

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        outcomes = await asyncio.gather(*(self._owner[c.name].call(c.name, c.arguments) for c in calls), return_exceptions=True)
        return [
            answer_of(o) if isinstance(o, ToolOutcome) else ToolAnswer(f"error: the MCP call failed: {describe(o)}", error="exception")
            for o in outcomes
        ]

    async def aclose(self) -> None:
        await asyncio.gather(*(server.aclose() for server in self.servers), return_exceptions=True)


class CombinedTools(CheckedTools):
    """Several tool sources offered as one (the job's own tools and its MCP tools): each call goes
    to the source that offers its tool. `sources` maps a label (for messages) to a source."""

    def __init__(self, sources: dict[str, CheckedTools], max_output_chars: int):
        self._owner: dict[str, CheckedTools] = {}
        origins: dict[str, str] = {}
        schemas = []
        for label, source in sources.items():
            for schema in source.schemas:
                name = schema.get("function", schema)["name"]
                origin = source.origin(name) if isinstance(source, MCPTools) else label
                if name in self._owner:
                    raise ToolNameClash(
                        f"the tool {name!r} is offered by both {origins[name]} and {origin}; tool names must be unique "
                        "across the job's tools and its MCP servers: rename one"
                    )
                self._owner[name], origins[name] = source, origin
                schemas.append(schema)
        self.sources = list(sources.values())
        super().__init__(schemas, max_output_chars)

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        groups: dict[int, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(id(self._owner[call.name]), []).append(i)
        answers: list[ToolAnswer | None] = [None] * len(calls)

        async def run_group(indices: list[int]) -> None:
            source = self._owner[calls[indices[0]].name]
            try:
                done = await source.run([calls[i] for i in indices])
            except Exception as exc:
                done = [ToolAnswer(f"error: the tool could not run ({describe(exc)})", error="exception")] * len(indices)
            for i, answer in zip(indices, done):
                answers[i] = answer

        await asyncio.gather(*(run_group(indices) for indices in groups.values()))
        return [a if a is not None else ToolAnswer("error: no answer", error="exception") for a in answers]


def combine_tools(sources: dict[str, CheckedTools | None], max_output_chars: int) -> CheckedTools | None:
    """The sources that exist as one executor (None when there are none); ToolNameClash when two
    offer the same tool name."""
    present = {label: source for label, source in sources.items() if source is not None and source.schemas}
    if len(present) <= 1:
        return next(iter(present.values()), None)
    return CombinedTools(present, max_output_chars)
