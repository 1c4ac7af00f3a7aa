"""One jailed interpreter, seen from the worker: start it, send it requests, kill it.

Requests go out in `marshal` format; everything read back is untrusted: answers are JSON (never
unpickled or unmarshalled here),
their size is bounded, and every read and write has a deadline after which the jail's whole
process group is killed.
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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from spider.sandbox.jail import strip_firejail_noise

_LEN = struct.Struct(">I")
MAX_FRAME_BYTES = 512 * 1024 * 1024
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


@dataclass
class LaunchSpec:
    """How to start one interpreter: its argv, its environment (built from nothing) and the
    start-up configuration sent as its first frame."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    config: dict[str, Any]
    preexec: Any = None


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
        self.send(launch.config, deadline)
        hello = self.receive(deadline)
        if "error" in hello:
            self.kill()
            kind, type_name, message, tb = (list(hello["error"]) + ["", "", "", ""])[:4]
            raise InterpreterFailure("load", str(type_name), str(message))
        if not hello.get("ready"):
            self.kill()
            raise InterpreterFailure("protocol", "ProtocolError", f"unexpected start-up answer {str(hello)[:200]}")
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

    def receive(self, deadline: float) -> Any:
        """The next frame, decoded; raises InterpreterFailure (after killing the jail) when the
        deadline passes, the interpreter dies, or the frame is not JSON."""
        (size,) = _LEN.unpack(self._read_exact(_LEN.size, deadline))
        if size > MAX_FRAME_BYTES:
            self._fail("protocol", "ProtocolError", f"the interpreter sent a {size}-byte frame")
        body = self._read_exact(size, deadline)
        try:
            if size < LARGE_FRAME_BYTES:
                return json.loads(body)
            # Decoding a big batch creates many containers at once: collections in the middle
            # of it would only walk objects that are all alive.
            gc.disable()
            try:
                return json.loads(body)
            finally:
                gc.enable()
        except ValueError:
            self._fail("protocol", "ProtocolError", "the interpreter sent a frame that is not JSON")

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

    def request_stream(self, request: bytes, frame_timeout_s: float) -> Iterator[Any]:
        """Send `request` (an encoded JSON object) and yield its answer frames; each must come
        within `frame_timeout_s` of the previous one."""
        self.send(None, time.monotonic() + frame_timeout_s, encoded=request)
        while True:
            frame = self.receive(time.monotonic() + frame_timeout_s)
            yield frame
            if isinstance(frame, dict):
                return

    # -- failure --------------------------------------------------------------------------------

    def _fail(self, kind: str, type_name: str, message: str) -> None:
        self.kill()
        raise InterpreterFailure(kind, type_name, message)

    def _fail_dead(self) -> None:
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
