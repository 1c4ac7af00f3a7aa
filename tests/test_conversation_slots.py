"""How a conversational batch shares the engine (`generation.max_concurrent_conversations`): at
most that many conversations generate at once; one waiting on its tool holds no slot, so the
batch's next rows generate meanwhile; conversations under way come before new ones. The slots on
their own, then on a real engine (vLLM on the CPU, the tiny model) through `conversation_records`,
the code a rollout worker runs for a batch."""

from __future__ import annotations

import asyncio

import pytest

from spider.config import JobConfig
from spider.engines.base import Engine
from spider.jobs.conversations import make_policy
from spider.rollouts.multi_turn import conversation_records
from spider.rollouts.slots import NEW, RESUMED, EngineSlots
from spider.rollouts.tools import CheckedTools, ToolAnswer
from spider.types import BatchRow
from tests.test_conversation import CLOSED, pick, vllm  # noqa: F401 (vllm: the module's engine fixture)

ROWS = 6
SLOTS = 2


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


# ------------------------------------------------------------------------------ on a real engine


class Tracked(Engine):
    """The real engine; tracks which rows are in progress (from their first request to the answer
    of their second and last turn: a named tool on the first, `max_tool_turns` 1), how many
    requests are inside it at once, and which row each tool call comes from."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.active: set[int] = set()
        self.most_active = 0
        self.inside = 0
        self.most_inside = 0
        self.order: list[int] = []
        self.started = {row: asyncio.Event() for row in range(ROWS)}
        self.owner: dict[str, int] = {}

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request, params):
        row, _, turn = (int(part) for part in request.key.split(":"))  # the loop's keys: "{row}:{sample}:{turn}"
        if turn == 0:
            self.active.add(row)
            self.most_active = max(self.most_active, len(self.active))
            self.order.append(row)
            self.started[row].set()
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            result = await self.engine.sample(request, params)
        finally:
            self.inside -= 1
        for completion in result.completions:
            for call in completion.tool_calls:
                self.owner[call.id] = row
        if turn == 1:
            self.active.discard(row)
        return result


class HeldTools(CheckedTools):
    """Row `held`'s call answers only once row `until` has started; every other call at once."""

    def __init__(self, tracked: Tracked, held: int, until: int):
        super().__init__(CLOSED, max_output_chars=10_000)
        self.tracked, self.held, self.until = tracked, held, until
        self.timed_out = False

    async def run(self, calls):
        if self.tracked.owner[calls[0].id] == self.held:
            try:
                # Generous: the machine may be loaded. A slot held through the wait would never get there.
                await asyncio.wait_for(self.tracked.started[self.until].wait(), timeout=120)
            except TimeoutError:
                self.timed_out = True
        return [ToolAnswer(pick(**call.arguments)) for call in calls]


@pytest.mark.slow
def test_a_conversation_waiting_on_its_tool_holds_no_slot(vllm):  # noqa: F811
    """Row 1 waits on its tool until row 5 has started: meanwhile both slots serve rows 0, 2, 3, 4
    and 5, so three rows are in progress with two slots; never more than two generate at once."""
    config = JobConfig(
        model={"provider": "vllm", "name": "spider/tiny"},
        source={"dataset": "d"},
        generation={
            "parameters": {"temperature": 0.0, "max_tokens": 48, "seed": 1},
            "max_tool_turns": 1,
            "tool_choice": "pick",
            "max_concurrent_conversations": SLOTS,
        },
    )
    tracked = Tracked(vllm)
    tools = HeldTools(tracked, held=1, until=ROWS - 1)
    rows = [BatchRow(index=i, prompt=f"Pick one for row {i}.", data={}) for i in range(ROWS)]
    records = vllm.loop.run(conversation_records("j", config, rows, make_policy(config, tracked, CLOSED), tools, None))

    assert not tools.timed_out, f"row {ROWS - 1} did not start while row 1 waited on its tool: {tracked.order}"
    assert tracked.most_inside == SLOTS
    assert tracked.most_active > SLOTS  # row 1 in progress without a slot, two others generating
    assert tracked.order == list(range(ROWS))  # freed slots take the batch's new rows in order
    assert [r.row_index for r in records] == list(range(ROWS))
    assert all(r.error is None and r.tool_calls == 1 for r in records), [(r.error, r.tool_calls) for r in records]
