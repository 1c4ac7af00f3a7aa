"""A conversational batch's engine slots (`generation.max_concurrent_conversations`), on their own:
conversations under way come before new ones, and a cancelled waiter or holder gives its slot
back. On a real engine, through `conversation_records`: tests/test_conversation.py."""

from __future__ import annotations

import asyncio

import pytest

from spider.rollouts.slots import NEW, RESUMED, EngineSlots


# ------------------------------------------------------------------------------ the slots alone


def test_resumed_conversations_come_before_new_ones_each_in_the_order_they_asked():
    async def scenario() -> list[str]:
        slots = EngineSlots(1)
        order: list[str] = []
        release = asyncio.Event()

        async def turn(name: str, priority: int, hold: asyncio.Event | None = None) -> None:
            async with slots.held(priority):
                order.append(name)
                if hold is not None:
                    await hold.wait()

        first = asyncio.create_task(turn("holder", NEW, release))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(turn(name, priority)) for name, priority in
                   [("new 1", NEW), ("new 2", NEW), ("resumed 1", RESUMED), ("resumed 2", RESUMED)]]
        await asyncio.sleep(0)
        assert slots.free == 0 and len(slots._waiting) == 4
        release.set()
        await asyncio.gather(first, *waiting)
        assert slots.free == 1 and slots.most_inside == 1
        return order

    assert asyncio.run(scenario()) == ["holder", "resumed 1", "resumed 2", "new 1", "new 2"]


def test_a_cancelled_waiter_or_holder_gives_its_slot_back():
    async def scenario() -> None:
        slots = EngineSlots(1)
        release = asyncio.Event()

        async def turn(hold: asyncio.Event | None = None) -> None:
            async with slots.held(NEW):
                if hold is not None:
                    await hold.wait()

        holder = asyncio.create_task(turn(release))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(turn())
        await asyncio.sleep(0)
        waiter.cancel()  # cancelled while it waits: it leaves the queue
        await asyncio.gather(waiter, return_exceptions=True)
        assert slots._waiting == []
        after = asyncio.create_task(turn())
        await asyncio.sleep(0)
        holder.cancel()  # cancelled while it holds the slot: the next waiter gets it
        await asyncio.gather(holder, return_exceptions=True)
        await asyncio.wait_for(after, timeout=5)
        assert slots.free == 1 and slots.inside == 0

    asyncio.run(scenario())


def test_engine_slots_refuse_a_size_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        EngineSlots(0)
