"""Engine slots: how many conversations of one batch are inside the engine at once.

A conversation holds a slot only while one of its turns is being generated. While it waits for a
tool or for a simulated user on another engine it holds none, and the slot goes to the next
conversation that has a turn to generate: the engine keeps `size` sequences running whenever the
batch has that many runnable conversations. Conversations already under way come before those not
yet started (each kind in the order it asked), so a batch finishes what it began before it opens
more, and the number in progress stays near `size` plus those waiting on tools.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

RESUMED, NEW = 0, 1


class EngineSlots:
    """At most `size` turns in the engine at once, granted by priority (resumed before new), then
    first come, first served."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"engine slots must be at least 1, not {size}")
        self.size = size
        self.free = size
        self.inside = 0
        self.most_inside = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def gate(self) -> ConversationGate:
        """The gate of one conversation: its first turn asks as new, its later turns as resumed."""
        return ConversationGate(self)

    @asynccontextmanager
    async def held(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            yield
        finally:
            self.inside -= 1
            self._release()

    async def _acquire(self, priority: int) -> None:
        if self.free and not self._waiting:
            self.free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._order), granted)
        heapq.heappush(self._waiting, entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as it was cancelled: pass the slot on
            elif entry in self._waiting:  # a release may already have dropped it
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)  # the slot passes to the waiter, `free` unchanged
                return
        self.free += 1


class ConversationGate:
    """One conversation's way into the engine slots (see `run_conversation`'s `gate`)."""

    def __init__(self, slots: EngineSlots) -> None:
        self.slots = slots
        self.started = False

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        priority = RESUMED if self.started else NEW
        self.started = True
        async with self.slots.held(priority):
            yield
