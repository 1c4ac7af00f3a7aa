"""One jailed interpreter, seen from the worker: start it, send it requests, kill it.

Requests go out in `marshal` format; everything read back is untrusted: answers are ASCII JSON
(never unpickled or unmarshalled here), each frame's cost (`jailed.answer_cost`: its size plus
what decoding it would create) is checked against what the caller allows before it is decoded,
any failure to decode it is the interpreter's failure, and every read and write has a deadline.
Each of these failures kills the jail's whole process group.
"""

from __future__ import annotations

import collections
import fcntl
import gc
import json
import marshal
import os
import select
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from spider.sandbox.jail import strip_firejail_noise
from spider.sandbox.jailed import answer_cost
from spider.sandbox.outcomes import CallError, preview

_LEN = struct.Struct(">I")
MAX_FRAME_BYTES = 512 * 1024 * 1024  # whatever the caller allows
HELLO_COST = 1024 * 1024  # the start-up answer: a pid, a version and the tools' names
STDERR_TAIL_BYTES = 16 * 1024
PIPE_BYTES = 1024 * 1024
MARSHAL_VERSION = 4
LARGE_FRAME_BYTES = 1024 * 1024


def encode_request(obj: Any) -> bytes:
    """A frame body for the jail: marshal (version 4, stable across Python 3 versions) takes
    only plain data and is several times faster than JSON on big batches. Raises ValueError
    for anything else."""
    return marshal.dumps(obj, MARSHAL_VERSION)


def _enlarge_pipe(fd: int) -> None:
    """Big batches cross the pipe in far fewer wake-ups with a 1 MiB buffer than with 64 KiB."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass


class InterpreterFailure(Exception):
    """The interpreter missed a deadline, died, or broke the protocol; it has been killed."""

    def __init__(self, kind: str, type_name: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.type_name = type_name
        self.message = message


@dataclass(frozen=True)
class JailConfig:
    """What a jailed interpreter needs to start serving one job, sent as its first frame.

    spider.sandbox.jailed reads it back as a plain dict (it runs with the standard library only):
    `to_wire` is the one place where it becomes one, with paths as strings."""

    scratch: Path
    """The job's private, writable directory: the interpreter's cwd, HOME and TMPDIR."""
    runtime_dir: Path
    """The sandbox's copy of the jail program and of cloudpickle, put on sys.path."""
    bundle: Path
    """The job's bundle file, which the interpreter loads before it answers ready."""
    venv: Path
    """The job's dependency venv, entered (site-packages added) after the switch to the job's user."""
    env: dict[str, str]
    """The whole environment of the user's code (the job's variables and secrets included), set
    only after the switch to the job's user, so that nothing in it affects firejail or the start."""
    call_timeout_s: float
    """Wall clock per call (one row of a batch, or one tool call)."""
    cpu_seconds: int
    """CPU time per call."""
    uid: int | None = None
    """The job's own user to switch to; None when the worker does not run as root (no switch)."""
    gid: int | None = None
    """The job's own group, switched to with `uid`."""
    reap_others: bool = False
    """Kill every other process the interpreter may signal before each answer: only safe when it
    is alone in its pid namespace with its own user (jailed, as the job's user)."""
    egress_socket: Path | None = None
    """The worker's egress proxy for `runtime.network` jobs; the jail relays its loopback to it."""

    def to_wire(self) -> dict[str, Any]:
        """The frame the jail reads: plain data only (marshal takes nothing else)."""
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in wire.items():
            if isinstance(value, Path):
                wire[name] = str(value)
        wire["env"] = dict(self.env)
        return wire


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one interpreter: its argv, its environment (built from nothing: firejail and
    the interpreter's first moments see only this), its cwd, the start-up configuration sent as its
    first frame, and a function run in the child before exec (the limits of an unjailed run)."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    config: JailConfig
    preexec: Callable[[], None] | None = None


class Interpreter:
    """A running jailed interpreter serving one job's calls."""

    def __init__(self, launch: LaunchSpec, start_timeout_s: float):
        self.calls = 0
        self.broken = False
        self._stderr_tail: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self.process = subprocess.Popen(
            launch.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=launch.env,
            cwd=launch.cwd,
            start_new_session=True,
            preexec_fn=launch.preexec,
            bufsize=0,
        )
        self._in = self.process.stdin.fileno()
        self._out = self.process.stdout.fileno()
        for fd in (self._in, self._out):
            _enlarge_pipe(fd)
        os.set_blocking(self._in, False)
        self._stderr_reader = threading.Thread(target=self._drain_stderr, name="spider-jail-stderr", daemon=True)
        self._stderr_reader.start()
        deadline = time.monotonic() + start_timeout_s
        self.send(launch.config.to_wire(), deadline)
        hello, _ = self.receive(deadline, HELLO_COST)
        if isinstance(hello, dict) and "error" in hello:
            self.kill()
            error = CallError.from_wire(hello["error"])
            raise InterpreterFailure("load", error.type, error.message)
        if not isinstance(hello, dict) or hello.get("ready") is not True:
            self.fail_protocol(f"unexpected start-up answer {preview(hello)}")
        self.pid_in_jail = hello.get("pid")
        self.tools = hello.get("tools", [])

    # -- transport ------------------------------------------------------------------------------

    def send(self, obj: Any, deadline: float, encoded: bytes | None = None) -> None:
        data = encoded if encoded is not None else encode_request(obj)
        view = memoryview(_LEN.pack(len(data)) + data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("timeout", "Timeout", "the interpreter stopped reading its requests")
            _, writable, _ = select.select([], [self._in], [], remaining)
            if not writable:
                continue
            try:
                written = os.write(self._in, view)
            except (BrokenPipeError, OSError):
                self._fail_dead()
            view = view[written:]

    def receive(self, deadline: float, limit: int) -> tuple[Any, int]:
        """The next frame, decoded, and its cost (`jailed.answer_cost`). Raises InterpreterFailure
        (after killing the jail) when the deadline passes, the interpreter dies, the frame costs
        more than `limit` (kind "limit", type "OutputLimit": then it is not even read), or it is
        not ASCII JSON that this process can decode (too deep, too big for memory)."""
        limit = min(limit, MAX_FRAME_BYTES)
        (size,) = _LEN.unpack(self._read_exact(_LEN.size, deadline))
        if size > limit:
            self._fail("limit", "OutputLimit", f"the interpreter announced a {size}-byte frame; it may send {limit}")
        body = self._read_exact(size, deadline)
        if not body.isascii():  # the jail writes ASCII, whose text takes a byte a character while decoded
            self.fail_protocol("the interpreter sent a frame that is not ASCII JSON")
        cost = answer_cost(body)
        if cost > limit:
            self._fail("limit", "OutputLimit", f"the interpreter sent a frame that costs {cost}; it may send {limit}")
        try:
            return self._decode(body), cost
        except RecursionError:
            self.fail_protocol("the interpreter sent a frame nested too deeply to decode")
        except MemoryError:
            self._fail("limit", "MemoryError", "the sandbox worker ran out of memory decoding the interpreter's answer")
        except ValueError:
            self.fail_protocol("the interpreter sent a frame that is not JSON")

    @staticmethod
    def _decode(body: bytearray) -> Any:
        if len(body) < LARGE_FRAME_BYTES:
            return json.loads(body)
        # Decoding a big batch creates many containers at once: collections in the middle of it
        # would only walk objects that are all alive.
        gc.disable()
        try:
            return json.loads(body)
        finally:
            gc.enable()

    def _read_exact(self, size: int, deadline: float) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("timeout", "Timeout", "")
            readable, _, _ = select.select([self._out], [], [], remaining)
            if not readable:
                continue
            got = self.process.stdout.readinto(view[filled:])
            if not got:
                self._fail_dead()
            filled += got
        return buffer

    # -- failure --------------------------------------------------------------------------------

    def _fail(self, kind: str, type_name: str, message: str) -> NoReturn:
        self.kill()
        raise InterpreterFailure(kind, type_name, message)

    def fail_protocol(self, message: str) -> NoReturn:
        """Kill the interpreter for an answer that breaks the protocol, and raise InterpreterFailure."""
        self._fail("protocol", "ProtocolError", message)

    def fail_output_limit(self) -> NoReturn:
        """Kill the interpreter for an answer over its output budget, and raise InterpreterFailure."""
        self._fail("limit", "OutputLimit", "")

    def _fail_dead(self) -> NoReturn:
        self.kill()
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = {
                "SIGKILL": "it was killed (out of memory, or a limit was hit)",
                "SIGXCPU": "it ran out of CPU time",
                "SIGXFSZ": "it wrote a file larger than the file-size limit",
                "SIGSEGV": "it crashed (segmentation fault)",
            }.get(name, f"it was terminated by {name}")
        else:
            reason = f"it exited with status {code}"
        tail = self.stderr_tail()
        message = f"the interpreter died: {reason}" + (f"; stderr: {tail}" if tail else "")
        raise InterpreterFailure("crash", "InterpreterCrash", message)

    def kill(self) -> None:
        """Kill the jail: its process group holds firejail and the sandbox's pid-namespace init,
        whose death takes every process of the jail with it."""
        self.broken = True
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the interpreter to exit, then make sure it has."""
        if self.process.returncode is None and not self.broken:
            try:
                self.send({"op": "exit"}, time.monotonic() + 1)
                self.process.wait(timeout=1)
            except (InterpreterFailure, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()

    @property
    def alive(self) -> bool:
        return not self.broken and self.process.poll() is None

    # -- stderr ---------------------------------------------------------------------------------

    def _drain_stderr(self) -> None:
        fd = self.process.stderr.fileno()
        try:
            while chunk := os.read(fd, 65536):
                self._stderr_tail.append(chunk)
                self._stderr_size += len(chunk)
                while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                    self._stderr_size -= len(self._stderr_tail.popleft())
        except (OSError, ValueError):
            pass

    def stderr_tail(self, limit: int = 1000) -> str:
        """The last of what the interpreter wrote to stderr (the user's prints included)."""
        self._stderr_reader.join(timeout=0.5)
        text = strip_firejail_noise(b"".join(self._stderr_tail).decode(errors="replace")).strip()
        return text[-limit:]
