"""One conversation, turn by turn: the model answers, its tool calls run, a simulated user may
reply, until the model answers without a call and the user is done (or a limit is reached).

`run_conversation` is a coroutine on the worker's engine loop: while it waits for tools or for
its simulated user, other conversations keep the engine busy. Dataset jobs run it with the
teacher as the policy; on-policy training will run it with the student's sampler.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from spider.engines.base import Completion, Engine, GenerationRequest, SamplingParams
from spider.rollouts.parsers import ParsedTurn, ReasoningParser, ToolCallParser
from spider.rollouts.tools import ToolAnswer, ToolExecutor
from spider.rollouts.users import SimulatedUser
from spider.types import Message, ToolCall

STOP_ANSWERED = "answered"  # the model answered without a tool call, and no user follows
STOP_MAX_TOOL_TURNS = "max_tool_turns"
STOP_MAX_USER_TURNS = "max_user_turns"
STOP_ERROR = "error"


@dataclass
class Limits:
    """`max_tool_turns`: model turns that call tools, per user turn; `tool_choice`: auto | required |
    none | a tool's name, applied to the model's first turn after each user message (later turns
    of its tool loop are `auto`, so it can answer with what the tools returned)."""

    max_tool_turns: int = 8
    tool_choice: str = "auto"


@dataclass
class TurnInfo:
    """What one model turn cost and how it ended."""

    index: int
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    tool_calls: int = 0
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    prompt_ids: list[int] | None = None  # what the turn was sampled from (with `return_tokens`)


@dataclass
class Trajectory:
    """A whole conversation and how it went."""

    messages: list[Message]
    turns: list[TurnInfo] = field(default_factory=list)
    stop_reason: str = STOP_ANSWERED
    tool_calls: int = 0
    tool_errors: int = 0
    user_turns: int = 0
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.turns)


@dataclass
class Policy:
    """The model whose turns are recorded, and how to read them."""

    engine: Engine
    params: SamplingParams
    parser: ToolCallParser | None = None
    reasoning: ReasoningParser | None = None
    return_tokens: bool = False


class Gate(Protocol):
    """Held around each turn the conversation generates (spider.rollouts.slots)."""

    def turn(self) -> AbstractAsyncContextManager[Any]: ...


class _Open:
    def turn(self) -> AbstractAsyncContextManager[Any]:
        return nullcontext()


async def run_conversation(
    key: str,
    messages: list[Message],
    policy: Policy,
    tools: ToolExecutor | None = None,
    user: SimulatedUser | None = None,
    limits: Limits | None = None,
    seed: int | None = None,
    gate: Gate | None = None,
) -> Trajectory:
    """Play the conversation that starts with `messages` to its end. `gate` is entered around each
    policy turn, and around each simulated-user turn when the user runs on the policy's engine:
    never while a tool runs."""
    limits = limits or Limits()
    gate = gate or _Open()
    user_gate = gate if user is not None and user.engine is policy.engine else _Open()
    trajectory = Trajectory(messages=list(messages))
    schemas = tools.schemas if tools is not None and limits.tool_choice != "none" else None
    turn_seed = seed
    while True:
        choice = limits.tool_choice
        tool_turns = 0
        while True:
            async with gate.turn():
                parsed, completion = await _model_turn(key, trajectory, policy, schemas, choice, turn_seed)
            turn_seed = None if turn_seed is None else turn_seed + 1
            if parsed is None:
                trajectory.stop_reason = STOP_ERROR
                return trajectory
            calls = parsed.tool_calls + [call for call, _ in parsed.malformed]
            if not calls or schemas is None:
                break
            if tool_turns >= limits.max_tool_turns:
                trajectory.stop_reason = STOP_MAX_TOOL_TURNS
                return trajectory
            await _run_tools(trajectory, tools, parsed)  # type: ignore[arg-type]
            tool_turns += 1
            choice = "auto"
        if user is None:
            trajectory.stop_reason = STOP_ANSWERED
            return trajectory
        if trajectory.user_turns >= user.max_turns:
            trajectory.stop_reason = STOP_MAX_USER_TURNS
            return trajectory
        async with user_gate.turn():
            text, why = await user.reply(trajectory.messages, key, turn_seed)
        if text is None:
            trajectory.stop_reason = why
            return trajectory
        trajectory.messages.append(Message("user", text))
        trajectory.user_turns += 1


async def _model_turn(
    key: str,
    trajectory: Trajectory,
    policy: Policy,
    schemas: list[dict[str, Any]] | None,
    tool_choice: str,
    seed: int | None,
) -> tuple[ParsedTurn | None, Completion | None]:
    request = GenerationRequest(
        key=f"{key}:{len(trajectory.turns)}",
        messages=list(trajectory.messages),
        seed=seed,
        tools=schemas,
        tool_choice=tool_choice if schemas else None,
    )
    started = time.perf_counter()
    result = await policy.engine.sample(request, policy.params)
    latency = time.perf_counter() - started
    if result.error is not None or not result.completions:
        trajectory.error = result.error or "the engine returned no completion"
        return None, None
    completion = result.completions[0]
    parsed = _read(completion, policy, schemas is not None)
    trajectory.messages.append(
        Message(
            "assistant",
            parsed.content,
            tool_calls=parsed.tool_calls + [call for call, _ in parsed.malformed],
            reasoning_content=parsed.reasoning,
        )
    )
    trajectory.turns.append(
        TurnInfo(
            index=len(trajectory.turns),
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
            latency_s=latency,
            tool_calls=len(parsed.tool_calls) + len(parsed.malformed),
            token_ids=list(completion.token_ids) if policy.return_tokens else None,
            logprobs=list(completion.logprobs) if policy.return_tokens and completion.logprobs is not None else None,
            prompt_ids=list(completion.prompt_ids) if policy.return_tokens and completion.prompt_ids is not None else None,
        )
    )
    return parsed, completion


def _read(completion: Completion, policy: Policy, tools_offered: bool) -> ParsedTurn:
    """The turn's calls: those the engine parsed itself (an OpenAI endpoint, constrained decoding),
    else those in the text, in the format of the model's family."""
    text = completion.text
    reasoning = None
    if policy.reasoning is not None:
        reasoning, text = policy.reasoning.split(text)
    if completion.tool_calls or completion.malformed_calls:
        parsed = ParsedTurn(content=text if not completion.constrained else "", tool_calls=list(completion.tool_calls),
                            malformed=list(completion.malformed_calls))
    elif tools_offered and policy.parser is not None:
        parsed = policy.parser.parse(text)
    else:
        parsed = ParsedTurn(content=text)
    parsed.reasoning = reasoning
    return parsed


async def _run_tools(trajectory: Trajectory, tools: ToolExecutor, parsed: ParsedTurn) -> None:
    """Run the turn's calls (concurrently) and append one tool message per call, in order."""
    answers: dict[str, ToolAnswer] = {}
    for call, why in parsed.malformed:
        answers[call.id] = ToolAnswer(f"error: the call to {call.name!r} could not be read: {why}", error="malformed")
    if parsed.tool_calls:
        for call, answer in zip(parsed.tool_calls, await tools.call_many(parsed.tool_calls)):
            answers[call.id] = answer
    ordered: list[ToolCall] = parsed.tool_calls + [call for call, _ in parsed.malformed]
    for call in ordered:
        answer = answers[call.id]
        trajectory.tool_calls += 1
        trajectory.tool_errors += answer.error is not None
        trajectory.messages.append(Message("tool", answer.content, tool_call_id=call.id, name=call.name))
