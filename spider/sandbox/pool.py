"""One job's side of a sandbox worker: a small pool of warm jailed interpreters that serve its
processor batches and tool calls, replaced after a crash, a limit hit or `max_calls` calls.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from spider.client.bundle import ToolSpec
from spider.errors import BundleError, SandboxError
from spider.sandbox import jailed
from spider.sandbox.interpreter import Interpreter, InterpreterFailure, LaunchSpec, encode_request
from spider.sandbox.outcomes import CallError, Outcome, ToolOutcome

# Batches smaller than this per interpreter are not worth splitting across the pool.
MIN_ITEMS_PER_PART = 512


class JobSandbox:
    """One job's user code on this worker: a pool of warm jailed interpreters.

    Thread-safe: concurrent calls take different interpreters (up to the pool size, then wait).
    `tool_specs` come from the bundle's manifest, so callers can offer tools to a model without
    running anything."""

    def __init__(
        self,
        job_id: str,
        manifest: dict[str, Any],
        bundle_sha256: str,
        launch: LaunchSpec,
        pool_size: int,
        max_calls: int,
        call_timeout_s: float,
        start_timeout_s: float,
        kill_grace_s: float,
    ):
        self.job_id = job_id
        self.manifest = manifest
        self.bundle_sha256 = bundle_sha256
        self.tool_specs: list[ToolSpec] = [ToolSpec.from_schema_dict(d) for d in manifest["tool_specs"]]
        self._launch = launch
        self._pool_size = pool_size
        self._max_calls = max_calls
        self._call_timeout_s = call_timeout_s
        self._start_timeout_s = start_timeout_s
        # A frame is due at most one call (plus the jail's flush interval) after the previous one.
        self._frame_timeout_s = call_timeout_s + kill_grace_s + jailed.FLUSH_INTERVAL_S
        self._idle: list[Interpreter] = []
        self._live = 0
        self._closed = False
        self._cond = threading.Condition()
        self.interpreters_started = 0
        self.interpreters_replaced = 0

    # -- the pool -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start one interpreter now, so that a bundle that cannot load fails at open time."""
        self._checkin(self._checkout())

    def _start(self) -> Interpreter:
        try:
            interpreter = Interpreter(self._launch, self._start_timeout_s)
        except InterpreterFailure as failure:
            if failure.kind == "load":
                hint = ""
                if failure.type_name == "ModuleNotFoundError":
                    hint = (
                        " (a module the functions use by name is not installed in the sandbox: add its package "
                        "to runtime.packages, or keep the module a local file of your project so it travels by value)"
                    )
                raise BundleError(
                    f"the user code could not be loaded in the sandbox: {failure.type_name}: {failure.message}{hint}"
                ) from None
            raise SandboxError(f"could not start a jailed interpreter for job {self.job_id}: {failure.message}") from None
        self.interpreters_started += 1
        return interpreter

    def _checkout(self) -> Interpreter:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxError(f"job {self.job_id} is closed on this sandbox worker")
                if self._idle:
                    return self._idle.pop()
                if self._live < self._pool_size:
                    self._live += 1
                    break
                self._cond.wait()
        try:
            return self._start()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _checkin(self, interpreter: Interpreter, recycle: bool = False) -> None:
        retire = recycle or not interpreter.alive or interpreter.calls >= self._max_calls
        with self._cond:
            if not retire and not self._closed:
                self._idle.append(interpreter)
                self._cond.notify()
                return
            self._live -= 1
            self._cond.notify()
        if interpreter.calls:
            self.interpreters_replaced += 1
        interpreter.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for interpreter in idle:
            interpreter.close()

    # -- processors ---------------------------------------------------------------------------

    def pre_process(self, rows: list[dict[str, Any]], kwargs: dict[str, Any] | None = None) -> list[Outcome]:
        """Run the pre-processor on each source row. Without one, every row is kept as it is."""
        return self._process("pre_processor", rows, kwargs or {})

    def post_process(self, records: list[dict[str, Any]], kwargs: dict[str, Any] | None = None) -> list[Outcome]:
        """Run the post-processor on each output record. Without one, every record is kept."""
        return self._process("post_processor", records, kwargs or {})

    def _process(self, which: str, items: list[Any], kwargs: dict[str, Any]) -> list[Outcome]:
        if not self.manifest[f"has_{which}"]:
            return [Outcome("kept", value=item) for item in items]
        parts = min(self._pool_size, len(items) // MIN_ITEMS_PER_PART)
        if parts <= 1:
            return self._process_serial(which, items, kwargs)
        # A big batch is cut into contiguous parts run by several interpreters at once.
        size = -(-len(items) // parts)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="spider-sandbox") as pool:
            results = list(pool.map(lambda chunk: self._process_serial(which, chunk, kwargs), chunks))
        return [outcome for result in results for outcome in result]

    def _process_serial(self, which: str, items: list[Any], kwargs: dict[str, Any]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        while len(outcomes) < len(items):
            pending = items[len(outcomes) :]
            received, failure = self._run_batch(which, pending, kwargs)
            outcomes += received
            if failure is None:
                break
            # The interpreter died somewhere after the last outcome it reported. Run the first
            # unreported item alone to learn whether it is the culprit, then go on with the rest.
            single, single_failure = self._run_batch(which, pending[len(received) : len(received) + 1], kwargs)
            outcomes += single if single_failure is None else [Outcome("error", error=single_failure)]
        return outcomes

    def _run_batch(self, which: str, items: list[Any], kwargs: dict[str, Any]) -> tuple[list[Outcome], CallError | None]:
        request = _encode({"op": "process", "which": which, "items": items, "kwargs": kwargs}, f"the {which} input")
        interpreter = self._checkout()
        received: list[Outcome] = []
        recycle = False
        try:
            for frame in interpreter.request_stream(request, self._frame_timeout_s):
                if isinstance(frame, list):
                    received += [Outcome.from_wire(entry) for entry in frame]
                elif isinstance(frame, dict):
                    recycle = bool(frame.get("recycle"))
            if len(received) != len(items):
                interpreter.kill()
                raise InterpreterFailure("protocol", "ProtocolError", f"{len(received)} outcomes for {len(items)} items")
        except InterpreterFailure as failure:
            interpreter.calls += len(received) + 1
            self._checkin(interpreter)
            return received[: len(items)], self._failure_error(failure)
        interpreter.calls += len(items)
        self._checkin(interpreter, recycle=recycle)
        return received, None

    # -- tools --------------------------------------------------------------------------------

    def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Call one tool with the model's arguments. Every failure is a ToolOutcome with an error,
        ready to be fed back to the model; the job goes on."""
        names = [spec.name for spec in self.tool_specs]
        if name not in names:
            available = ", ".join(names) or "none"
            message = f"no tool named {name!r}; available tools: {available}"
            return ToolOutcome(error=CallError("exception", "UnknownTool", message))
        if not isinstance(arguments, dict):
            return ToolOutcome(error=CallError("exception", "TypeError", "tool arguments must be a JSON object"))
        try:
            request = _encode({"op": "tool", "name": name, "arguments": arguments}, "the tool arguments")
        except SandboxError as exc:
            return ToolOutcome(error=CallError("exception", "TypeError", str(exc)))
        interpreter = self._checkout()
        try:
            answer = list(interpreter.request_stream(request, self._frame_timeout_s))[-1]
        except InterpreterFailure as failure:
            interpreter.calls += 1
            self._checkin(interpreter)
            return ToolOutcome(error=self._failure_error(failure))
        interpreter.calls += 1
        self._checkin(interpreter, recycle=bool(isinstance(answer, dict) and answer.get("recycle")))
        if isinstance(answer, dict) and isinstance(answer.get("content"), str):
            return ToolOutcome(content=answer["content"])
        if isinstance(answer, dict) and isinstance(answer.get("error"), list):
            return ToolOutcome(error=CallError.from_wire(answer["error"]))
        return ToolOutcome(error=CallError("protocol", "ProtocolError", "malformed answer from the interpreter"))

    def _failure_error(self, failure: InterpreterFailure) -> CallError:
        if failure.kind == "timeout":
            message = f"the call did not finish within {self._call_timeout_s:g} s; its interpreter was killed"
            return CallError("timeout", "Timeout", message)
        return CallError(failure.kind, failure.type_name, failure.message)  # type: ignore[arg-type]


def _encode(obj: Any, what: str) -> bytes:
    try:
        return encode_request(obj)
    except ValueError as exc:
        raise SandboxError(
            f"{what} must be plain data (dicts, lists, strings, numbers, booleans, None) to reach the sandbox: {exc}"
        ) from None
