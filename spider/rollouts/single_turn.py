"""The single-turn rollout: one generation request per row (its system prompt and prompt, or the
conversation it starts from), and one record per (row, sample) from the engine's results."""

from __future__ import annotations

from spider.config import JobConfig
from spider.data.sources import choose_system_prompt, row_seed
from spider.engines.base import GenerationRequest, GenerationResult
from spider.types import BatchRow, Message, Record, RowError, row_id


def opening_messages(config: JobConfig, row: BatchRow) -> list[Message]:
    """The messages a row's generation starts from: the row's system prompt (chosen per row from
    `generation.system_prompt`) unless its conversation brings its own, then its prompt as the
    user's turn, or its whole conversation."""
    turns = list(row.conversation) if row.conversation is not None else [Message(role="user", content=row.prompt or "")]
    system = choose_system_prompt(config.generation.system_prompt, config.generation.parameters.seed, row.index)
    if system and not (turns and turns[0].role == "system"):
        turns.insert(0, Message(role="system", content=system))
    return turns


def build_requests(config: JobConfig, rows: list[BatchRow]) -> list[GenerationRequest]:
    """One request per row that has something to generate from, keyed by its row index."""
    seed = config.generation.parameters.seed
    return [
        GenerationRequest(
            key=str(row.index),
            messages=opening_messages(config, row),
            n=config.generation.duplications,
            seed=row_seed(seed, row.index),
        )
        for row in rows
        if row.error is None and (row.prompt is not None or row.conversation is not None)
    ]


def records_for(
    job_id: str,
    config: JobConfig,
    rows: list[BatchRow],
    results: dict[str, GenerationResult],
    requests: dict[str, GenerationRequest],
) -> list[Record]:
    """One record per (row, sample), in row order; failures become error records."""
    records = []
    for row in rows:
        request = requests.get(str(row.index))
        messages = list(request.messages) if request else []
        result = results.get(str(row.index))
        for sample in range(config.generation.duplications):
            base = dict(
                id=row_id(job_id, row.index, sample),
                row_index=row.index,
                sample_index=sample,
                prompt=row.prompt or "",
                source=row.data,
            )
            if row.error is not None:
                records.append(Record(messages=messages, completion=None, error=row.error, **base))
            elif result is None or result.error is not None or sample >= len(result.completions):
                message = (result.error if result else None) or "the engine returned no completion"
                error = RowError(type="GenerationError", message=message)
                records.append(Record(messages=messages, completion=None, error=error, **base))
            else:
                completion = result.completions[sample]
                answer = Message(role="assistant", content=completion.text)
                records.append(
                    Record(
                        messages=messages + [answer],
                        completion=completion.text,
                        finish_reason=completion.finish_reason,
                        usage=completion.usage,
                        **base,
                    )
                )
    return records
