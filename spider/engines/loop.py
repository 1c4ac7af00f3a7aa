"""The worker process's one event loop: async engines (vLLM's AsyncLLM, httpx.AsyncClient, the hf
micro-batcher) live on it for as long as the process, so many conversations at different turns
share one engine. Synchronous code (Celery tasks) hands it coroutines and waits for their results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
