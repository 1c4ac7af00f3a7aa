"""The conversation loop on a real engine (vLLM on the CPU, the tiny model): tool calls parsed,
run and fed back, constrained decoding for `tool_choice`, every malformed call answered, a
simulated user on another provider, per-turn token ids and log-probs."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Literal

import pytest

from spider.bundle import tool_spec
from spider.config import JobConfig, ModelConfig
from spider.engines import SamplingParams, close_engine, load_engine
from spider.engines.base import Engine
from spider.jobs.conversations import make_policy
from spider.rollouts.conversation import Limits, Policy, run_conversation
from spider.rollouts.multi_turn import conversation_records
from spider.rollouts.parsers import ToolCallParser, parse_hermes
from spider.rollouts.tools import CheckedTools, ToolAnswer, check_call, truncate
from spider.rollouts.users import SimulatedUser
from spider.types import BatchRow, Message, ToolCall

pytestmark = pytest.mark.slow


def get_weather(city: Literal["Paris", "Rome", "Tokyo"], unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Current weather of a city.

    Args:
        city: The city's name.
        unit: celsius or fahrenheit.
    """
    return f"{city}: 21 degrees {unit}"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def pick(option: Literal["first", "second"]) -> str:
    """Pick an option."""
    return f"picked {option}"


def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"failed on purpose: {reason}")


SCHEMAS = [tool_spec(get_weather).to_openai(), tool_spec(add).to_openai(), tool_spec(pick).to_openai(),
           tool_spec(fail).to_openai()]
# What the tiny random model may be made to call: arguments from a closed set (it never ends a
# free string or number on its own).
CLOSED = [SCHEMAS[0], SCHEMAS[2]]


class PythonTools(CheckedTools):
    """Runs the tools in this test process (the sandbox path is tested in tests/test_rollout_stack.py).
    `delay_s` stands in for a slow tool."""

    def __init__(self, delay_s: float = 0.0, max_output_chars: int = 10_000, schemas=SCHEMAS):
        super().__init__(schemas, max_output_chars)
        self.functions = {"get_weather": get_weather, "add": add, "pick": pick, "fail": fail}
        self.delay_s = delay_s
        self.calls: list[ToolCall] = []

    async def run(self, calls):
        self.calls += calls
        await asyncio.sleep(self.delay_s)
        answers = []
        for call in calls:
            try:
                answers.append(ToolAnswer(str(self.functions[call.name](**call.arguments))))
            except Exception as exc:
                answers.append(ToolAnswer(f"error: {type(exc).__name__}: {exc}", error="exception"))
        return answers


class Forced(Engine):
    """The real engine, made to write given texts turn after turn by constrained decoding
    (`regex`), so that each malformed form of a call is produced by the model itself."""

    def __init__(self, engine, texts):
        self.engine, self.texts = engine, list(texts)

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request, params):
        text = self.texts.pop(0) if self.texts else "done."
        request = dataclasses.replace(request, tool_choice=None, regex=re.escape(text))
        return await self.engine.sample(request, dataclasses.replace(params, max_tokens=200))


@pytest.fixture(scope="module")
def vllm(tiny_model):
    engine = load_engine(ModelConfig(provider="vllm", name=str(tiny_model), parameters={"dtype": "float32", "max_model_len": 1024}))
    yield engine
    close_engine()


def run(vllm, coroutine):
    return vllm.loop.run(coroutine)


def policy(engine, tokenizer, **kwargs) -> Policy:
    return Policy(engine, SamplingParams(temperature=0.0, max_tokens=48, logprobs=True),
                  parser=ToolCallParser("hermes", tokenizer, SCHEMAS), **kwargs)


def test_hermes_blocks_are_read_and_malformed_ones_kept():
    parsed = parse_hermes('Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                          '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>')
    assert parsed.content == "Let me check." and [c.name for c in parsed.tool_calls] == ["add"]
    assert parsed.tool_calls[0].arguments == {"a": 1, "b": 2}
    assert len(parsed.malformed) == 1 and parsed.malformed[0][0].name == "add" and "not JSON" in parsed.malformed[0][1]
    assert parse_hermes("no calls here").content == "no calls here"


def test_calls_are_checked_against_the_schemas():
    by_name = {s["function"]["name"]: s for s in SCHEMAS}
    assert check_call(ToolCall("1", "add", {"a": 1, "b": 2}), by_name) is None
    assert "no tool named 'mul'" in check_call(ToolCall("1", "mul", {}), by_name)
    assert "do not match its schema" in check_call(ToolCall("1", "add", {"a": "one", "b": 2}), by_name)
    assert "'b' is a required property" in check_call(ToolCall("1", "add", {"a": 1}), by_name)
    assert truncate("x" * 50, 10).startswith("x" * 10) and "40 more characters" in truncate("x" * 50, 10)


def test_required_tool_choice_makes_the_model_call_and_the_answer_goes_back(vllm):
    tools = PythonTools(schemas=CLOSED)
    messages = [Message("user", "What is the weather in Paris?")]
    trajectory = run(vllm, run_conversation("r0", messages, policy(vllm, vllm.tokenizer, return_tokens=True), tools,
                                            limits=Limits(max_tool_turns=2, tool_choice="required"), seed=1))
    roles = [m.role for m in trajectory.messages]
    assert roles[:4] == ["user", "assistant", "tool", "assistant"], roles
    call = trajectory.messages[1].tool_calls[0]
    assert call.name in ("get_weather", "pick") and tools.calls[0] == call
    assert trajectory.messages[2].tool_call_id == call.id and trajectory.messages[2].name == call.name
    assert trajectory.messages[2].content == str(PythonTools().functions[call.name](**call.arguments))
    assert trajectory.tool_calls >= 1 and trajectory.stop_reason in ("answered", "max_tool_turns")
    first = trajectory.turns[0]
    assert first.token_ids and first.logprobs and len(first.token_ids) == len(first.logprobs)
    assert first.prompt_tokens > 0 and first.latency_s > 0


def test_a_named_tool_is_the_one_called(vllm):
    tools = PythonTools(schemas=CLOSED)
    trajectory = run(vllm, run_conversation("r1", [Message("user", "Pick one")], policy(vllm, vllm.tokenizer), tools,
                                            limits=Limits(max_tool_turns=1, tool_choice="pick"), seed=2))
    assert trajectory.messages[1].tool_calls[0].name == "pick"
    assert trajectory.messages[1].tool_calls[0].arguments["option"] in ("first", "second")


def test_every_malformed_call_gets_its_tool_message_and_the_conversation_goes_on(vllm):
    turns = [
        '<tool_call>{"name": "mul", "arguments": {"a": 1}}</tool_call>',          # unknown tool
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": </tool_call>',     # not JSON
        '<tool_call>{"name": "add", "arguments": {"a": "x", "b": 2}}</tool_call>',  # against the schema
        '<tool_call>{"name": "fail", "arguments": {"reason": "x"}}</tool_call>',  # the tool raises
        "All done.",
    ]
    tools = PythonTools(schemas=[SCHEMAS[1], SCHEMAS[3]])  # add, fail: the prompt stays in the tiny model's context
    trajectory = run(vllm, run_conversation("r2", [Message("user", "go")], policy(Forced(vllm, turns), vllm.tokenizer),
                                            tools, limits=Limits(max_tool_turns=8)))
    answers = [m.content for m in trajectory.messages if m.role == "tool"]
    assert len(answers) == 4 and trajectory.tool_errors == 4 and trajectory.tool_calls == 4
    assert "no tool named 'mul'" in answers[0]
    assert "could not be read" in answers[1] and "not JSON" in answers[1]
    assert "do not match its schema" in answers[2]
    assert "ValueError: failed on purpose" in answers[3]
    assert trajectory.messages[-1].content == "All done." and trajectory.stop_reason == "answered"


def test_tool_turns_stop_at_the_limit(vllm):
    looping = ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'] * 5
    trajectory = run(vllm, run_conversation("r3", [Message("user", "go")], policy(Forced(vllm, looping), vllm.tokenizer),
                                            PythonTools(), limits=Limits(max_tool_turns=2)))
    assert trajectory.stop_reason == "max_tool_turns" and trajectory.tool_calls == 2


def test_long_tool_output_is_truncated_with_a_marker(vllm):
    tools = PythonTools(max_output_chars=8)
    call = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "ok"]
    trajectory = run(vllm, run_conversation("r4", [Message("user", "go")], policy(Forced(vllm, call), vllm.tokenizer), tools))
    answer = next(m.content for m in trajectory.messages if m.role == "tool")
    assert answer.startswith("Paris: 2") and "tool output truncated" in answer


def test_a_simulated_user_on_another_provider_asks_the_follow_ups(vllm, tiny_model):
    from spider.engines.hf_engine import HFEngine

    user_engine = HFEngine(str(tiny_model), {"dtype": "float32"})
    try:
        user = SimulatedUser(user_engine, SamplingParams(temperature=1.0, max_tokens=12), max_turns=2)
        trajectory = run(vllm, run_conversation("r5", [Message("user", "Hello!")], policy(vllm, vllm.tokenizer), None,
                                                user=user, seed=3))
        assert trajectory.user_turns == 2 and trajectory.stop_reason == "max_user_turns"
        assert [m.role for m in trajectory.messages] == ["user", "assistant"] * 3
        # The user model sees the conversation from its side: roles flipped, its own system prompt.
        view = user.view(trajectory.messages)
        assert view[0].role == "system" and [m.role for m in view[1:3]] == ["assistant", "user"]
        stopper = SimulatedUser(Forced(vllm, ["Thanks, bye! [DONE]"]), SamplingParams(max_tokens=20), max_turns=5,
                                stop_phrase="[DONE]")
        ended = run(vllm, run_conversation("r6", [Message("user", "Hi")], policy(vllm, vllm.tokenizer), None, user=stopper))
        assert ended.stop_reason == "user_stop_phrase" and ended.user_turns == 0
    finally:
        user_engine.close()


def test_conversations_waiting_on_tools_do_not_hold_the_engine(vllm):
    """While some conversations wait on slow tools, the others keep generating."""
    slow = PythonTools(delay_s=0.5, schemas=CLOSED)

    async def many(count):
        return await asyncio.gather(*(
            run_conversation(f"c{i}", [Message("user", f"Weather in city {i}?")], policy(vllm, vllm.tokenizer), slow,
                             limits=Limits(max_tool_turns=1, tool_choice="get_weather"), seed=i)
            for i in range(count)))

    started = time.perf_counter()
    results = run(vllm, many(12))
    elapsed = time.perf_counter() - started
    assert all(r.tool_calls == 1 for r in results)
    # Twelve conversations with a 0.5 s tool each: far less than twelve tool waits end to end.
    assert elapsed < 12 * 0.5, elapsed


def test_reasoning_is_split_into_reasoning_content(vllm, tiny_model):
    from transformers import AutoTokenizer

    from spider.rollouts.parsers import ReasoningParser

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    reasoning = ReasoningParser("deepseek_r1", tokenizer)
    assert reasoning.split("<think>Paris is in France.</think>The capital is Paris.") == (
        "Paris is in France.", "The capital is Paris.")
    forced = Forced(vllm, ["<think>Two and two.</think>Four."])
    trajectory = run(vllm, run_conversation("r7", [Message("user", "2 + 2?")],
                                            policy(forced, vllm.tokenizer, reasoning=reasoning)))
    answer = trajectory.messages[-1]
    assert answer.reasoning_content == "Two and two." and answer.content == "Four."
    assert answer.to_openai()["reasoning_content"] == "Two and two."


# ------------------------------------------------------------ a batch's engine slots (spider.rollouts.slots)
# At most `generation.max_concurrent_conversations` conversations of a batch generate at once; one
# waiting on its tool holds no slot, so the batch's next rows generate meanwhile. Through
# `conversation_records`, the code a rollout worker runs for a batch (the slots alone:
# tests/test_conversation_slots.py).

SLOT_ROWS = 6
SLOTS = 2


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
        self.started = {row: asyncio.Event() for row in range(SLOT_ROWS)}
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
def test_a_conversation_waiting_on_its_tool_holds_no_slot(vllm):
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
    tools = HeldTools(tracked, held=1, until=SLOT_ROWS - 1)
    rows = [BatchRow(index=i, prompt=f"Pick one for row {i}.", data={}) for i in range(SLOT_ROWS)]
    records = vllm.loop.run(conversation_records("j", config, rows, make_policy(config, tracked, CLOSED), tools, None))

    assert not tools.timed_out, f"row {SLOT_ROWS - 1} did not start while row 1 waited on its tool: {tracked.order}"
    assert tracked.most_inside == SLOTS
    assert tracked.most_active > SLOTS  # row 1 in progress without a slot, two others generating
    assert tracked.order == list(range(SLOT_ROWS))  # freed slots take the batch's new rows in order
    assert [r.row_index for r in records] == list(range(SLOT_ROWS))
    assert all(r.error is None and r.tool_calls == 1 for r in records), [(r.error, r.tool_calls) for r in records]
