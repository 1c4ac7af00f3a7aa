"""How a conversational batch shares its slots (`generation.max_concurrent_conversations`): at most
that many conversations are in progress, and the next row of the batch starts as soon as one slot
frees, not once the whole wave before it has ended. On a real engine (vLLM on the CPU, the tiny
model), through `conversation_records`, the code a rollout worker runs for a batch."""

from __future__ import annotations

import asyncio

import pytest

from spider.config import JobConfig
from spider.engines.base import Engine
from spider.jobs.conversations import make_policy
from spider.rollouts.multi_turn import conversation_records
from spider.rollouts.tools import CheckedTools, ToolAnswer
from spider.types import BatchRow
from tests.test_conversation import CLOSED, pick, vllm  # noqa: F401 (vllm: the module's engine fixture)

pytestmark = pytest.mark.slow

ROWS = 6
SLOTS = 2


class Slots(Engine):
    """The real engine; tracks which rows are in progress, from their first request to the answer of
    their second and last turn (a named tool on the first, `max_tool_turns` 1), and which row each
    tool call comes from."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.active: set[int] = set()
        self.most = 0
        self.order: list[int] = []
        self.started = {row: asyncio.Event() for row in range(ROWS)}
        self.owner: dict[str, int] = {}

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request, params):
        row, _, turn = (int(part) for part in request.key.split(":"))  # the loop's keys: "{row}:{sample}:{turn}"
        if turn == 0:
            self.active.add(row)
            self.most = max(self.most, len(self.active))
            self.order.append(row)
            self.started[row].set()
        result = await self.engine.sample(request, params)
        for completion in result.completions:
            for call in completion.tool_calls:
                self.owner[call.id] = row
        if turn == 1:
            self.active.discard(row)
        return result


class HeldTools(CheckedTools):
    """Row `held`'s call answers only once row `until` has started; every other call at once."""

    def __init__(self, slots: Slots, held: int, until: int):
        super().__init__(CLOSED, max_output_chars=10_000)
        self.slots, self.held, self.until = slots, held, until
        self.timed_out = False

    async def run(self, calls):
        if self.slots.owner[calls[0].id] == self.held:
            try:
                # Generous: the machine may be loaded. Waves would never get there.
                await asyncio.wait_for(self.slots.started[self.until].wait(), timeout=120)
            except TimeoutError:
                self.timed_out = True
        return [ToolAnswer(pick(**call.arguments)) for call in calls]


def test_a_freed_slot_takes_the_next_row_at_once_and_no_more_than_the_slots_run(vllm):  # noqa: F811
    """Row 1 waits on its tool until row 5 has started: the other slot must serve rows 0, 2, 3, 4
    and 5 one after another meanwhile (a batch run in waves of two would never start row 2)."""
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
    slots = Slots(vllm)
    tools = HeldTools(slots, held=1, until=ROWS - 1)
    rows = [BatchRow(index=i, prompt=f"Pick one for row {i}.", data={}) for i in range(ROWS)]
    records = vllm.loop.run(conversation_records("j", config, rows, make_policy(config, slots, CLOSED), tools, None))

    assert not tools.timed_out, f"row {ROWS - 1} did not start while row 1 held its slot: {slots.order}"
    assert slots.most == SLOTS
    assert slots.order == list(range(ROWS))  # freed slots take the batch's rows in order
    assert [r.row_index for r in records] == list(range(ROWS))
    assert all(r.error is None and r.tool_calls == 1 for r in records), [(r.error, r.tool_calls) for r in records]
