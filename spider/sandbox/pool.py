"""One job's side of a sandbox worker: a small pool of warm jailed interpreters that serve its
processor batches and tool calls, replaced after a crash, a limit hit or `max_calls` calls.

What one batch or tool call sends back is bounded by the job's `runtime.limits.output_mb`,
counted with `jailed.answer_cost` (its JSON's size plus what decoding it creates), so that the
decoded answers of one batch or tool call take at most about 1.25x output_mb of the worker's
memory, plus ROW_SLACK per row. Strings with characters beyond Latin-1 take 2 bytes a character
once decoded (4 with one beyond the Basic Multilingual Plane), so 4x is the worst case. Reading a
frame adds its bytes and its text while it is decoded: at most 2x output_mb more.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from spider.bundle import ToolSpec
from spider.errors import BundleError, SandboxError
from spider.sandbox import jailed
from spider.sandbox.interpreter import Interpreter, InterpreterFailure, LaunchSpec, encode_request
from spider.sandbox.outcomes import CallError, Outcome, ToolOutcome, preview

# Batches smaller than this per interpreter are not worth splitting across the pool.
MIN_ITEMS_PER_PART = 512
MIB = 1024 * 1024


class CheckoutTimeout(SandboxError):
    """Every interpreter of the job stayed busy with other calls for `checkout_timeout_s`."""


class OutputBudget:
    """What is left of runtime.limits.output_mb (in `jailed.answer_cost` units) for one batch,
    shared by its parts and its re-runs, or for one tool call. Thread-safe."""

    def __init__(self, total: int):
        self.left = total
        self._lock = threading.Lock()

    def take(self, cost: int) -> bool:
        """Take `cost` (nothing when it is negative: a frame within its slack) if it fits."""
        with self._lock:
            if cost > self.left:
                return False
            self.left -= max(0, cost)
            return True


class JobSandbox:
    """One job's user code on this worker: a pool of warm jailed interpreters.

    Thread-safe: concurrent calls take different interpreters (up to the pool size, then wait).
    `tool_specs` come from the bundle's manifest, so callers can offer tools to a model without
    running anything. A call waits at most `checkout_timeout_s` for a free interpreter."""

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
        output_mb: int = 64,
        checkout_timeout_s: float = 600.0,
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
        self._output_mb = output_mb
        self.checkout_timeout_s = checkout_timeout_s
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
        """An idle interpreter, or a new one while the pool has room. The caller must give it back
        with `_checkin` whatever happens (in a `finally`), or the pool loses a slot for good."""
        deadline = time.monotonic() + self.checkout_timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxError(f"job {self.job_id} is closed on this sandbox worker")
                if self._idle:
                    return self._idle.pop()
                if self._live < self._pool_size:
                    self._live += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckoutTimeout(
                        f"no interpreter of job {self.job_id} became free within {self.checkout_timeout_s:g} s: "
                        f"all {self._pool_size} stayed busy with other calls of the job"
                    )
                self._cond.wait(left)
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
        budget = OutputBudget(self._output_mb * MIB)
        parts = min(self._pool_size, len(items) // MIN_ITEMS_PER_PART)
        if parts <= 1:
            return self._process_serial(which, items, kwargs, budget)
        # A big batch is cut into contiguous parts run by several interpreters at once.
        size = -(-len(items) // parts)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="spider-sandbox") as pool:
            results = list(pool.map(lambda chunk: self._process_serial(which, chunk, kwargs, budget), chunks))
        return [outcome for result in results for outcome in result]

    def _process_serial(
        self, which: str, items: list[Any], kwargs: dict[str, Any], budget: OutputBudget
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        while len(outcomes) < len(items):
            pending = items[len(outcomes) :]
            received, failure = self._run_batch(which, pending, kwargs, budget)
            outcomes += received
            if failure is None or len(outcomes) == len(items):  # every row answered before it failed
                break
            # The interpreter died (or was killed) somewhere after the last outcome it reported.
            # Run the first unreported item alone to learn whether it is the culprit, then go on
            # with the rest.
            single, single_failure = self._run_batch(which, pending[len(received) : len(received) + 1], kwargs, budget)
            outcomes += single if single_failure is None else [Outcome("error", error=single_failure)]
        return outcomes

    def _run_batch(
        self, which: str, items: list[Any], kwargs: dict[str, Any], budget: OutputBudget
    ) -> tuple[list[Outcome], CallError | None]:
        request = {"op": "process", "which": which, "items": items, "kwargs": kwargs, "output_budget": budget.left}
        encoded = _encode(request, f"the {which} input")
        interpreter = self._checkout()
        received: list[Outcome] = []
        recycle, error = True, None  # an interpreter that has not answered in full is not reused
        try:
            recycle = self._read_outcomes(interpreter, encoded, len(items), budget, received)
        except InterpreterFailure as failure:  # it has been killed
            error = self._failure_error(failure, "row")
        except BaseException:
            interpreter.kill()  # stopped in the middle of an answer: its pipe is out of step
            raise
        finally:
            interpreter.calls += len(items) if error is None else len(received) + 1
            self._checkin(interpreter, recycle=recycle)
        return received, error

    def _read_outcomes(
        self, interpreter: Interpreter, request: bytes, count: int, budget: OutputBudget, received: list[Outcome]
    ) -> bool:
        """Send a process request and read its `count` outcomes into `received`, charging every
        frame to `budget`; returns whether the interpreter asked to be replaced. Every frame must
        hold between one outcome and as many as are still due, or be the closing dict."""
        interpreter.send(None, time.monotonic() + self._frame_timeout_s, encoded=request)
        while True:
            due = count - len(received)
            allowance = budget.left + (due + 1) * jailed.ROW_SLACK
            frame, cost = interpreter.receive(time.monotonic() + self._frame_timeout_s, allowance)
            if isinstance(frame, dict):
                if due:
                    interpreter.fail_protocol(f"{count - due} outcomes for {count} items")
                if not budget.take(cost - jailed.ROW_SLACK):
                    interpreter.fail_output_limit()
                return frame.get("recycle") is True
            if not isinstance(frame, list) or not 1 <= len(frame) <= due:
                interpreter.fail_protocol(f"an answer frame that is not a list of 1 to {due} outcomes")
            if not budget.take(cost - len(frame) * jailed.ROW_SLACK):
                interpreter.fail_output_limit()
            try:
                received += [self._outcome(entry) for entry in frame]
            except Exception as exc:  # from_wire takes any JSON; this is only a safety net
                interpreter.fail_protocol(f"an outcome that cannot be read ({type(exc).__name__})")

    def _outcome(self, entry: Any) -> Outcome:
        if entry == jailed.OUTPUT_LIMITED:
            return Outcome("error", error=self._output_limit_error("row"))
        return Outcome.from_wire(entry)

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
        output_bytes = self._output_mb * MIB
        try:
            request = {"op": "tool", "name": name, "arguments": arguments, "output_budget": output_bytes}
            encoded = _encode(request, "the tool arguments")
        except SandboxError as exc:
            return ToolOutcome(error=CallError("exception", "TypeError", str(exc)))
        try:
            interpreter = self._checkout()
        except CheckoutTimeout as exc:
            return ToolOutcome(error=CallError("timeout", "SandboxBusy", str(exc)))
        answer: Any = None
        recycle, error = True, None  # an interpreter that has not answered in full is not reused
        try:
            interpreter.send(None, time.monotonic() + self._frame_timeout_s, encoded=encoded)
            # A tool's answer is one frame, which may cost output_mb beyond its slack.
            answer, _ = interpreter.receive(time.monotonic() + self._frame_timeout_s, output_bytes + jailed.ROW_SLACK)
            if not isinstance(answer, dict):
                interpreter.fail_protocol(f"a tool answer that is not an object: {preview(answer)}")
            recycle = answer.get("recycle") is True
        except InterpreterFailure as failure:  # it has been killed
            error = self._failure_error(failure, "tool")
        except BaseException:
            interpreter.kill()  # stopped in the middle of an answer: its pipe is out of step
            raise
        finally:
            interpreter.calls += 1
            self._checkin(interpreter, recycle=recycle)
        if error is not None:
            return ToolOutcome(error=error)
        if isinstance(answer.get("content"), str):
            return ToolOutcome(content=answer["content"])
        if answer.get("limit") is True:
            return ToolOutcome(error=self._output_limit_error("tool"))
        if isinstance(answer.get("error"), list):
            return ToolOutcome(error=CallError.from_wire(answer["error"]))
        return ToolOutcome(error=CallError("protocol", "ProtocolError", "malformed answer from the interpreter"))

    def _failure_error(self, failure: InterpreterFailure, scope: str) -> CallError:
        if failure.kind == "timeout":
            message = f"the call did not finish within {self._call_timeout_s:g} s; its interpreter was killed"
            return CallError("timeout", "Timeout", message)
        if failure.type_name == "OutputLimit":
            return self._output_limit_error(scope)
        return CallError(failure.kind, failure.type_name, failure.message)  # type: ignore[arg-type]

    def _output_limit_error(self, scope: str) -> CallError:
        """The error of a row (`scope` "row") or tool call ("tool") whose answer passed output_mb."""
        counted = "counted as its JSON's size plus a share for every list, object, string and number in it"
        if scope == "row":
            what = (
                f"the row's result did not fit in what was left of runtime.limits.output_mb ({self._output_mb} MiB), "
                f"which the results of one batch share ({counted})"
            )
        else:
            what = f"the tool's answer is larger than runtime.limits.output_mb ({self._output_mb} MiB) ({counted})"
        return CallError("limit", "OutputLimit", f"{what}; return less, or raise runtime.limits.output_mb")


def _encode(obj: Any, what: str) -> bytes:
    try:
        return encode_request(obj)
    except ValueError as exc:
        raise SandboxError(
            f"{what} must be plain data (dicts, lists, strings, numbers, booleans, None) to reach the sandbox: {exc}"
        ) from None
