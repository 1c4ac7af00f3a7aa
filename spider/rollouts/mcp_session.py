"""One MCP SDK session kept open, for the rollout's remote servers and the sandbox worker's stdio
servers alike: `MCPConnection` holds a `ClientSession` in a task of its own, lists a server's
tools and calls them with a timeout, and `outcome_of` says what the model reads of a result."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from spider.errors import SpiderError
from spider.sandbox.outcomes import CallError, ToolOutcome

MAX_LIST_PAGES = 100
PING_TIMEOUT_S = 10.0


class MCPServerError(SpiderError):
    """An MCP server could not be started or reached, or its tools could not be listed."""


class MCPConnection:
    """One MCP `ClientSession`, kept open in a task of its own (the SDK's sessions and transports
    must be entered and left by one task) over the streams that `open_transport(self)` yields.
    Calls come from any task of the same event loop. A transport that sees its server go calls
    `fail`; a connection that is not `alive` is closed, and its owner starts a new one."""

    def __init__(
        self, label: str, open_transport: Callable[["MCPConnection"], AbstractAsyncContextManager[Any]], start_timeout_s: float
    ):
        self.label = label
        self.start_timeout_s = start_timeout_s
        self.failure: CallError | None = None
        self.last_used = time.monotonic()
        self._open_transport = open_transport
        self._session: Any = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._session is not None and not self._stop.is_set()

    async def start(self) -> None:
        """Start the transport and initialize the session; MCPServerError when it cannot."""
        self._task = asyncio.create_task(self._run(), name=f"mcp-{self.label}")
        try:
            await asyncio.wait_for(self._ready.wait(), self.start_timeout_s)
        except asyncio.TimeoutError:
            self.fail(CallError("timeout", "StartTimeout", f"it did not start within {self.start_timeout_s:g} s"))
        if self._session is None:
            await self.close()
            why = self.failure.describe() if self.failure else "it stopped"
            raise MCPServerError(f"MCP server {self.label} could not be started: {why}")

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            async with self._open_transport(self) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    self._session = session
                    self._ready.set()
                    await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 (what ends a session is the failure's reason)
            if self.failure is None and not self._stop.is_set():
                self.failure = CallError("crash", type(exc).__name__, describe(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._session = None
            self._stop.set()
            self._ready.set()

    def fail(self, error: CallError) -> None:
        """The server is gone (or unusable): record why and end the session."""
        if self.failure is None:
            self.failure = error
        self._stop.set()
        self._ready.set()

    async def close(self) -> None:
        """End the session and its transport (which stops a stdio server). Idempotent."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 15)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()

    def _live_session(self) -> Any:
        self.last_used = time.monotonic()
        if not self.alive:
            why = self.failure.describe() if self.failure else "it was closed"
            raise MCPServerError(f"MCP server {self.label} is not running: {why}")
        return self._session

    async def list_tools(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every tool of the server (all pages), as MCP `Tool` objects in their wire form."""
        import mcp.types

        session = self._live_session()
        tools: list[dict[str, Any]] = []
        cursor = None
        deadline = time.monotonic() + timeout_s
        try:
            for _ in range(MAX_LIST_PAGES):
                if cursor is None:
                    request = session.list_tools()
                else:
                    request = session.list_tools(params=mcp.types.PaginatedRequestParams(cursor=cursor))
                result = await self._request(request, deadline - time.monotonic())
                tools += [tool.model_dump(by_alias=True, exclude_none=True, mode="json") for tool in result.tools]
                cursor = getattr(result, "next_cursor", None) or getattr(result, "nextCursor", None)
                if not cursor:
                    break
        except TimeoutError:
            raise MCPServerError(f"MCP server {self.label} did not list its tools within {timeout_s:g} s") from None
        except Exception as exc:
            raise MCPServerError(f"MCP server {self.label} could not list its tools: {self._reason(exc)}") from None
        return tools

    async def call(self, tool: str, arguments: dict[str, Any], timeout_s: float) -> ToolOutcome:
        """Call one tool; every failure is a ToolOutcome error. A call past `timeout_s` is
        abandoned; a server that then does not answer a ping either is closed."""
        try:
            session = self._live_session()
        except MCPServerError as exc:
            return ToolOutcome(error=CallError("crash", "MCPServerGone", str(exc)))
        try:
            result = await self._request(session.call_tool(tool, arguments), timeout_s)
        except TimeoutError:
            await self._check_responsive()
            message = f"the tool {tool!r} of MCP server {self.label} did not answer within {timeout_s:g} s"
            return ToolOutcome(error=CallError("timeout", "Timeout", message))
        except Exception as exc:
            if self.failure is not None:  # the server went during the call
                failure = self.failure
                return ToolOutcome(error=CallError(failure.kind, failure.type, f"the server stopped: {failure.message}"))
            return ToolOutcome(error=CallError("exception", type(exc).__name__, describe(exc)))
        finally:
            self.last_used = time.monotonic()
        return outcome_of(result)

    async def _request(self, request: Any, timeout_s: float) -> Any:
        """The result of a request of the session, waited for at most `timeout_s` (TimeoutError)
        and no longer than the connection lives (ConnectionError when it fails first: a request
        whose answer can no longer come is not left to the SDK to notice)."""
        call = asyncio.ensure_future(request)
        call.add_done_callback(lambda task: task.cancelled() or task.exception())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({call, stopped}, timeout=max(timeout_s, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not call.done():
                call.cancel()
        if call in done:
            return call.result()
        if stopped in done:
            raise ConnectionError("the connection to the server ended")
        raise TimeoutError

    async def _check_responsive(self) -> None:
        session = self._session
        if session is None:
            return
        try:
            await self._request(session.send_ping(), PING_TIMEOUT_S)
        except Exception:
            self.fail(CallError("timeout", "Unresponsive", "it stopped answering (a call timed out, then a ping)"))

    def _reason(self, exc: BaseException) -> str:
        if self.failure is not None:
            return f"the server stopped: {self.failure.describe()}"
        return describe(exc)


def describe(exc: BaseException) -> str:
    """One line about an exception, looking inside the exception groups of task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text[:2000]


def outcome_of(result: Any) -> ToolOutcome:
    """What the model reads of a `CallToolResult`: its text blocks (other blocks named), else its
    structured content as JSON; `isError` makes it an error."""
    data = result.model_dump(by_alias=True, exclude_none=True, mode="json")
    parts = []
    for block in data.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.get('mimeType', '')}, {len(block.get('data', '')) * 3 // 4} bytes]")
        elif kind == "resource":
            resource = block.get("resource") or {}
            parts.append(str(resource["text"]) if "text" in resource else f"[resource {resource.get('uri', '')}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.get('uri', '')}]")
        else:
            parts.append(json.dumps(block))
    text = "\n".join(parts)
    if not parts and data.get("structuredContent") is not None:
        text = json.dumps(data["structuredContent"])
    if data.get("isError"):
        return ToolOutcome(error=CallError("exception", "ToolError", text or "the tool reported an error"))
    return ToolOutcome(content=text)
