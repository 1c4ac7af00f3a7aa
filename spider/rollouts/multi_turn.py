"""The multi-turn rollout of a dataset batch: one conversation per (row, sample), sharing the
engine: at most `generation.max_concurrent_conversations` of them generating at once, a
conversation waiting on a tool giving its slot to the next (spider.rollouts.slots); each recorded as its whole
trajectory: the messages with tool calls, tool results and reasoning, the tool schemas offered,
per-turn metadata, the stop reason and the count of tool errors."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from spider.config import JobConfig
from spider.data.sources import row_seed
from spider.rollouts.conversation import Limits, Policy, Trajectory, run_conversation
from spider.rollouts.single_turn import opening_messages
from spider.rollouts.slots import EngineSlots
from spider.rollouts.tools import ToolExecutor
from spider.rollouts.users import SimulatedUser
from spider.types import BatchRow, Record, RowError, Usage, row_id


def sample_seed(config: JobConfig, row: BatchRow, sample: int) -> int | None:
    """The seed of one conversation: the row's seed, moved per sample so samples differ."""
    seed = row_seed(config.generation.parameters.seed, row.index)
    return None if seed is None else seed + 7_919 * sample


async def conversation_records(
    job_id: str,
    config: JobConfig,
    rows: list[BatchRow],
    policy: Policy,
    tools: ToolExecutor | None,
    user: SimulatedUser | None,
) -> list[Record]:
    """One record per (row, sample), in row order."""
    generation = config.generation
    limits = Limits(max_tool_turns=generation.max_tool_turns, tool_choice=generation.tool_choice)
    slots = EngineSlots(generation.max_concurrent_conversations)

    async def one(row: BatchRow, sample: int) -> Trajectory:
        return await run_conversation(
            f"{row.index}:{sample}", opening_messages(config, row), policy, tools, user, limits,
            seed=sample_seed(config, row, sample), gate=slots.gate(),
        )

    runnable = [row for row in rows if row.error is None and (row.prompt is not None or row.conversation is not None)]
    futures = {
        (row.index, sample): asyncio.ensure_future(one(row, sample))
        for row in runnable
        for sample in range(generation.duplications)
    }
    if futures:
        try:
            await asyncio.wait(futures.values())
        except asyncio.CancelledError:
            # The batch was cancelled (its job was): every conversation stops where it waits (an
            # engine turn, a tool call, the simulated user) before the toolkit closes.
            for future in futures.values():
                future.cancel()
            await asyncio.gather(*futures.values(), return_exceptions=True)
            raise
    schemas = tools.schemas if tools is not None else None
    records = []
    for row in rows:
        for sample in range(generation.duplications):
            base = dict(id=row_id(job_id, row.index, sample), row_index=row.index, sample_index=sample,
                        prompt=row.prompt or "", source=row.data)
            future = futures.get((row.index, sample))
            if future is None:
                records.append(Record(messages=opening_messages(config, row) if row.error is None else [],
                                      completion=None, error=row.error, **base))
                continue
            exc = future.exception()
            if exc is not None:
                error = RowError(type="RolloutError", message=f"{type(exc).__name__}: {exc}")
                records.append(Record(messages=opening_messages(config, row), completion=None, error=error, **base))
                continue
            records.append(trajectory_record(future.result(), schemas, base))
    return records


def trajectory_record(trajectory: Trajectory, schemas: list[dict[str, Any]] | None, base: dict[str, Any]) -> Record:
    """The record of one conversation; an engine failure part-way keeps what was said so far."""
    answers = [m for m in trajectory.messages if m.role == "assistant"]
    last = trajectory.turns[-1] if trajectory.turns else None
    error = RowError(type="GenerationError", message=trajectory.error) if trajectory.error else None
    return Record(
        messages=trajectory.messages,
        completion=answers[-1].content if answers and error is None else None,
        finish_reason=last.finish_reason if last else None,
        usage=Usage(prompt_tokens=trajectory.prompt_tokens, completion_tokens=trajectory.completion_tokens),
        error=error,
        tools=schemas,
        turns=[_turn(t) for t in trajectory.turns],
        stop_reason=trajectory.stop_reason,
        tool_calls=trajectory.tool_calls,
        tool_errors=trajectory.tool_errors,
        **base,
    )


def _turn(turn: Any) -> dict[str, Any]:
    data = asdict(turn)
    data.pop("prompt_ids")  # the record holds the messages; the ids are for trainers
    if data["token_ids"] is None:
        data.pop("token_ids")
        data.pop("logprobs")
    return data
