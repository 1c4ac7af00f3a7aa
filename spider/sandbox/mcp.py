"""A job's stdio MCP servers on a sandbox worker.

Each runs in a jail of the job's own profile, the one its interpreters run in (its user, scratch
dir, venv, network setting and limits), started as `spider_jail.py --mcp-server`: the harness
becomes the job's user and only then runs the server's command, whose stdin and stdout are the
MCP transport. Nothing of the server runs as the worker's user, nor outside the jail.

What the server sends is untrusted: a message longer than the job's `runtime.limits.output_mb` stops
the server, its stderr is kept as a bounded tail, and every read has a deadline. The worker keeps
one `MCPConnection` (spider.rollouts.mcp_session) per (job, server) on an event loop of its own (`MCPHub`),
closes it with the job (Sandbox.close_job) or after `idle_s` unused, and kills the jail's whole
process group when it does; a worker that dies takes its jails with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spider.errors import SandboxError
from spider.sandbox.interpreter import JailConfig, LaunchSpec, encode_request
from spider.sandbox.jail import strip_firejail_noise
from spider.sandbox.outcomes import CallError, ToolOutcome

if TYPE_CHECKING:
    from spider.config import MCPServerConfig

log = logging.getLogger("spider.sandbox")

_LEN = struct.Struct(">I")
HELLO_BYTES = 64 * 1024
STDERR_TAIL_BYTES = 16 * 1024
IDLE_S = 600.0
SWEEP_INTERVAL_S = 30.0
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIB = 1024 * 1024


@dataclass(frozen=True)
class MCPLaunch:
    """How to start one stdio MCP server of a job: the job's jail (`argv` ends in the harness's
    `--mcp-server` mode, `env` and `cwd` as for its interpreters, `config` its start-up frame),
    the server's `command` and extra `server_env`, and the longest message it may send."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    config: JailConfig
    command: list[str]
    server_env: dict[str, str]
    max_message_bytes: int
    preexec: Callable[[], None] | None = field(default=None, compare=False)


def mcp_launch(job_launch: LaunchSpec, server: MCPServerConfig, output_mb: int) -> MCPLaunch:
    """The launch of `server` in the jail the job's interpreters start in (`job_launch`)."""
    if server.command is None:
        raise SandboxError(f"MCP server {server.name!r} has no command: a remote server is not run in the sandbox")
    for part in server.command:
        if not isinstance(part, str) or not part or "\x00" in part:
            raise SandboxError(f"the command of MCP server {server.name!r} holds an empty part or a NUL character")
    for name, value in server.env.items():
        if not ENV_NAME.match(name) or "\x00" in value:
            raise SandboxError(f"MCP server {server.name!r}: env name {name!r} or its value is not usable")
    return MCPLaunch(
        argv=[*job_launch.argv, "--mcp-server"],
        env=dict(job_launch.env),
        cwd=job_launch.cwd,
        config=job_launch.config,
        command=list(server.command),
        server_env=dict(server.env),
        max_message_bytes=output_mb * MIB,
        preexec=_dies_with_worker(job_launch.preexec),
    )


PR_SET_PDEATHSIG = 1


def _dies_with_worker(then: Callable[[], None] | None) -> Callable[[], None]:
    """A preexec function that has the kernel kill the jail (firejail, whose death takes the jail
    with it) when the worker dies: a server that ignores the end of its input must not outlive
    the worker that would have stopped it. Then `then` (an unjailed run's limits)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the line above
            os._exit(1)
        if then is not None:
            then()

    return preexec


class JailedServer:
    """One server process in its jail, seen from the worker: start it, bridge its pipes to an MCP
    session's streams, kill it."""

    def __init__(self, launch: MCPLaunch, label: str):
        self.launch = launch
        self.label = label
        self.process: asyncio.subprocess.Process | None = None
        self.hello: dict[str, Any] = {}
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self._stderr_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the jail and read its hello; SandboxError (after killing it) when it does not come."""
        launch = self.launch
        self.process = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=launch.env,
            cwd=launch.cwd,
            start_new_session=True,
            preexec_fn=launch.preexec,
            limit=launch.max_message_bytes + 1,
        )
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain_stderr())
        assert self.process.stdin is not None and self.process.stdout is not None
        for frame in (launch.config.to_wire(), {"command": launch.command, "env": launch.server_env}):
            data = encode_request(frame)
            self.process.stdin.write(_LEN.pack(len(data)) + data)
        try:
            await self.process.stdin.drain()
            (size,) = _LEN.unpack(await self.process.stdout.readexactly(_LEN.size))
            if size > HELLO_BYTES:
                raise SandboxError(f"its jail announced a {size}-byte start-up answer")
            hello = json.loads(await self.process.stdout.readexactly(size))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.kill()
            raise SandboxError(f"its jail did not start ({type(exc).__name__}){self.stderr_note()}") from None
        except BaseException:
            await self.kill()
            raise
        if isinstance(hello, dict) and "error" in hello:
            await self.kill()
            error = CallError.from_wire(hello["error"])
            raise SandboxError(error.describe())
        if not isinstance(hello, dict) or hello.get("ready") is not True:
            await self.kill()
            raise SandboxError("its jail sent an unexpected start-up answer")
        self.hello = hello

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        try:
            while chunk := await self.process.stderr.read(65536):
                self._stderr.append(chunk)
                self._stderr_size += len(chunk)
                while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr) > 1:
                    self._stderr_size -= len(self._stderr.popleft())
        except (OSError, ValueError):
            pass

    def stderr_tail(self, limit: int = 1000) -> str:
        text = strip_firejail_noise(b"".join(self._stderr).decode(errors="replace")).strip()
        return text[-limit:]

    def stderr_note(self) -> str:
        tail = self.stderr_tail()
        return f"; stderr: {tail}" if tail else ""

    def exit_error(self) -> CallError:
        """Why the server's output ended."""
        code = self.process.returncode if self.process is not None else None
        if code is None:
            reason = "it closed its output"
        elif code < 0:
            try:
                reason = f"it was terminated by {signal.Signals(-code).name}"
            except ValueError:
                reason = f"it was terminated by signal {-code}"
        else:
            reason = f"it exited with status {code}"
        return CallError("crash", "MCPServerExited", f"the server stopped: {reason}{self.stderr_note()}")

    @asynccontextmanager
    async def streams(self, connection: Any):
        """The session's read and write streams over the server's stdout and stdin. When the
        server's output ends, breaks a message's size limit or stops parsing, `connection.fail`."""
        import anyio

        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        stdin, stdout = self.process.stdin, self.process.stdout
        read_writer, read_stream = anyio.create_memory_object_stream(0)
        write_stream, write_reader = anyio.create_memory_object_stream(0)

        async def pump_out() -> None:
            async with read_writer:
                while True:
                    try:
                        line = await stdout.readline()
                    except ValueError:  # a line past the limit (asyncio's LimitOverrunError)
                        limit = self.launch.max_message_bytes // MIB
                        message = f"the server sent a message longer than runtime.limits.output_mb ({limit} MiB)"
                        connection.fail(CallError("limit", "OutputLimit", message))
                        return
                    if not line:
                        await asyncio.sleep(0.05)  # let the exit status arrive, for the message
                        connection.fail(self.exit_error())
                        return
                    if line.strip():
                        await read_writer.send(_parse(line))

        async def pump_in() -> None:
            async with write_reader:
                async for message in write_reader:
                    stdin.write(_serialize(message).encode() + b"\n")
                    await stdin.drain()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(pump_out)
                tasks.start_soon(pump_in)
                try:
                    yield read_stream, write_stream
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.kill()

    async def kill(self) -> None:
        """Kill the jail's process group (firejail and its pid namespace, and so every process
        of the server) and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            await asyncio.wait_for(process.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("MCP server %s (pid %d) did not die after SIGKILL", self.label, process.pid)


def _parse(line: bytes) -> Any:
    """A JSON-RPC message for the session, or the exception that says why the line is not one."""
    import mcp.types
    from mcp.shared.message import SessionMessage

    try:
        adapter = getattr(mcp.types, "jsonrpc_message_adapter", None)
        message = adapter.validate_json(line) if adapter is not None else mcp.types.JSONRPCMessage.model_validate_json(line)
    except ValueError as exc:
        return exc
    return SessionMessage(message)


def _serialize(session_message: Any) -> str:
    import mcp.types

    if hasattr(mcp.types, "jsonrpc_message_adapter"):  # mcp 2
        return session_message.message.model_dump_json(by_alias=True, exclude_unset=True)
    return session_message.message.model_dump_json(by_alias=True, exclude_none=True)


class MCPHub:
    """The sandbox worker's stdio MCP sessions, one per (job, server), on an event loop of their own
    (a daemon thread); the worker's task threads call in and wait. `job_open(job_id)` says whether
    a job is still open: a session is never started for, and never kept by, a closed job."""

    def __init__(self, job_open: Callable[[str], bool], idle_s: float = IDLE_S, start_timeout_s: float = 60.0):
        self.job_open = job_open
        self.idle_s = idle_s
        self.start_timeout_s = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="spider-mcp", daemon=True)
        self._thread.start()
        self._connections: dict[tuple[str, str], Any] = {}  # touched on the loop only
        self._servers: dict[tuple[str, str], JailedServer] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._closed = False
        self._sweeper = asyncio.run_coroutine_threadsafe(self._sweep_forever(), self._loop)

    def _wait(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    # -- sessions, on the loop ------------------------------------------------------------------------

    async def _connection(self, job_id: str, server: MCPServerConfig, launch: MCPLaunch) -> Any:
        from spider.rollouts.mcp_session import MCPConnection, MCPServerError

        key = (job_id, server.name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is not None and connection.alive:
                return connection
            if connection is not None:
                await self._drop(key)
            if self._closed or not self.job_open(job_id):
                raise SandboxError(f"job {job_id} is not open on this sandbox worker")
            jailed = JailedServer(launch, repr(server.name))
            try:
                await asyncio.wait_for(jailed.start(), self.start_timeout_s)
            except asyncio.TimeoutError:
                await jailed.kill()
                raise SandboxError(
                    f"MCP server {server.name!r} did not start within {self.start_timeout_s:g} s{jailed.stderr_note()}"
                ) from None
            except SandboxError as exc:
                raise SandboxError(f"MCP server {server.name!r} could not be started: {exc}") from None
            connection = MCPConnection(repr(server.name), jailed.streams, self.start_timeout_s)
            try:
                await connection.start()
            except MCPServerError as exc:
                await jailed.kill()
                raise SandboxError(f"{exc}{jailed.stderr_note()}") from None
            self._connections[key], self._servers[key] = connection, jailed
            log.info("job %s: MCP server %r started in its jail (pid %s)", job_id, server.name, jailed.hello.get("pid"))
            return connection

    async def _drop(self, key: tuple[str, str]) -> None:
        connection = self._connections.pop(key, None)
        jailed = self._servers.pop(key, None)
        if connection is not None:
            await connection.close()
        if jailed is not None:
            await jailed.kill()

    async def _list(self, job_id: str, server: MCPServerConfig, launch: MCPLaunch) -> list[dict[str, Any]]:
        from spider.rollouts.mcp_session import MCPServerError

        connection = await self._connection(job_id, server, launch)
        try:
            return await connection.list_tools(server.timeout_s)
        except MCPServerError as exc:
            raise SandboxError(str(exc)) from None

    async def _call(self, job_id: str, server: MCPServerConfig, launch: MCPLaunch, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        try:
            connection = await self._connection(job_id, server, launch)
        except SandboxError as exc:
            return ToolOutcome(error=CallError("load", "MCPServerError", str(exc)))
        return await connection.call(tool, arguments, server.timeout_s)

    async def _close_job(self, job_id: str) -> None:
        async def drop(key: tuple[str, str]) -> None:
            async with self._locks.setdefault(key, asyncio.Lock()):  # after a start under way
                await self._drop(key)
            self._locks.pop(key, None)

        keys = {key for key in [*self._connections, *self._locks] if key[0] == job_id}
        await asyncio.gather(*(drop(key) for key in keys))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await self.sweep()

    async def sweep(self) -> None:
        """Close the sessions that sat unused for `idle_s`, died, or whose job was closed."""
        now = time.monotonic()
        for key, connection in list(self._connections.items()):
            if not connection.alive or now - connection.last_used > self.idle_s or not self.job_open(key[0]):
                await self._drop(key)

    # -- for the worker's threads ---------------------------------------------------------------------

    def list_tools(self, job_id: str, server: MCPServerConfig, launch: MCPLaunch) -> list[dict[str, Any]]:
        """The server's tools (MCP wire form), starting it first if it is not running; SandboxError
        when it cannot start or list them."""
        wait_s = self.start_timeout_s + server.timeout_s + 30
        try:
            return self._wait(self._list(job_id, server, launch), wait_s)
        except TimeoutError:
            raise SandboxError(f"MCP server {server.name!r} did not list its tools within {wait_s:g} s") from None

    def call_tool(self, job_id: str, server: MCPServerConfig, launch: MCPLaunch, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        """One call; every failure is a ToolOutcome error."""
        try:
            return self._wait(self._call(job_id, server, launch, tool, arguments), self.start_timeout_s + server.timeout_s + 60)
        except TimeoutError:
            return ToolOutcome(error=CallError("timeout", "Timeout", f"the MCP server {server.name!r} did not answer"))

    def pid(self, job_id: str, name: str) -> int | None:
        """The pid of the server's jail (firejail), while it runs."""
        jailed = self._servers.get((job_id, name))
        return jailed.process.pid if jailed is not None and jailed.process is not None else None

    def close_job(self, job_id: str) -> None:
        """Stop every MCP server of the job and wait until their jails are gone."""
        self._wait(self._close_job(job_id), 60)

    def close(self) -> None:
        """Stop every server and the loop."""
        self._closed = True
        jobs = {key[0] for key in list(self._connections)}
        for job_id in jobs:
            self.close_job(job_id)
        self._sweeper.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)


class MCPServerHandle:
    """One stdio MCP server of an open job, for a worker's task threads (Sandbox.mcp_server)."""

    def __init__(self, hub: MCPHub, job_id: str, server: MCPServerConfig, launch: MCPLaunch):
        self.hub = hub
        self.job_id = job_id
        self.server = server
        self.launch = launch

    def list_tools(self) -> list[dict[str, Any]]:
        return self.hub.list_tools(self.job_id, self.server, self.launch)

    def call_tool(self, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
        return self.hub.call_tool(self.job_id, self.server, self.launch, tool, arguments)

    @property
    def pid(self) -> int | None:
        return self.hub.pid(self.job_id, self.server.name)
