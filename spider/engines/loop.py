"""The worker process's one event loop: async engines (vLLM's AsyncLLM, httpx.AsyncClient, the hf
micro-batcher) live on it for as long as the process, so many conversations at different turns
share one engine. Synchronous code (Celery tasks) hands it coroutines and waits for their results,
or (`run_unless`) cancels them when what they work for is no longer wanted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a cancelled coroutine may take to unwind (vLLM aborting its requests, an hf decode
# noticing its stop flag, HTTP connections closing) before `run_unless` gives up waiting.
UNWIND_TIMEOUT_S = 10.0


class Interrupted(Exception):
    """`run_unless` cancelled the coroutine: its `stopped` check said the work is no longer wanted."""


class EngineLoop:
    """An asyncio loop running in a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, name="spider-engine-loop", daemon=True)
        self.thread.start()
        ready.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; the returned future can be waited on from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (never call this from the loop itself)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("EngineLoop.run called from the loop's own thread; await the coroutine instead")
        return self.submit(coro).result(timeout)

    def run_unless(self, coro: Coroutine[Any, Any, T], stopped: Callable[[], bool], poll_s: float = 0.5) -> T:
        """Run `coro` on the loop, asking `stopped()` every `poll_s` seconds while it runs. When it
        answers True the coroutine is cancelled (every await in it raises CancelledError: engines
        abort their requests there) and, once it has unwound, Interrupted is raised. A `stopped`
        that raises counts as False: a moment without Redis must not end good work."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("EngineLoop.run_unless called from the loop's own thread; await the coroutine instead")
        running: list[asyncio.Task[Any]] = []  # touched only on the loop's thread
        cancel_before_start = False

        async def tracked() -> T:
            running.append(asyncio.current_task())  # type: ignore[arg-type]
            if cancel_before_start:
                coro.close()
                raise asyncio.CancelledError
            return await coro

        def cancel() -> None:
            nonlocal cancel_before_start
            if running:
                running[0].cancel()
            else:
                cancel_before_start = True

        future = self.submit(tracked())
        while True:
            try:
                return future.result(timeout=poll_s)
            except concurrent.futures.TimeoutError:
                pass
            try:
                stop = stopped()
            except Exception:
                log.warning("could not tell whether to stop; going on", exc_info=True)
                stop = False
            if stop:
                self.loop.call_soon_threadsafe(cancel)
                try:  # the future ends once the coroutine has unwound
                    future.result(timeout=UNWIND_TIMEOUT_S)
                except concurrent.futures.TimeoutError:
                    log.warning("a cancelled coroutine did not unwind within %.0f s", UNWIND_TIMEOUT_S)
                except BaseException:  # CancelledError, or whatever the unwinding raised: it is dropped
                    pass
                raise Interrupted()

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread


_lock = threading.Lock()
_loop: EngineLoop | None = None


def engine_loop() -> EngineLoop:
    """This process's engine loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = EngineLoop()
        return _loop
