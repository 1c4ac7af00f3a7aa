"""Loading a job's source rows: Hugging Face datasets (hub ids or builders) and local files."""

from __future__ import annotations

import datetime
import decimal
import random
import re
from pathlib import Path
from typing import Any

from spider.config import SourceConfig
from spider.errors import SourceError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_SLICE = re.compile(r"^(?P<name>[\w.\-]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def jsonable(value: Any) -> Any:
    """Make a dataset value JSON-serializable (dates, decimals, bytes, numpy scalars and arrays)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _builder_and_files(source: SourceConfig) -> tuple[str, dict[str, Any]]:
    """Turn a local path into a builder + data_files; pass hub ids and builders through."""
    options = dict(source.options)
    path = Path(source.dataset).expanduser()
    looks_local = source.dataset.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_BUILDERS
    if looks_local or path.exists():
        if not path.exists():
            raise SourceError(f"source dataset {source.dataset!r}: no such file or directory")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise SourceError(f"source dataset {source.dataset!r}: no .json/.jsonl/.parquet/.csv files in it")
        suffixes = {p.suffix.lower() for p in files}
        builders = {LOCAL_BUILDERS[s] for s in suffixes}
        if len(builders) > 1:
            raise SourceError(f"source dataset {source.dataset!r} mixes file types {sorted(suffixes)}")
        split_name = source.split.split("[")[0]
        options["data_files"] = {split_name: [str(p) for p in files]}
        if ".tsv" in suffixes:
            options.setdefault("delimiter", "\t")
        return builders.pop(), options
    return source.dataset, options


def load_source_rows(source: SourceConfig, token: str | None = None) -> list[dict[str, Any]]:
    """The source's rows, after split slicing, shuffling (seeded) and `max_examples`.

    Raises SourceError with the dataset's own message when it cannot be loaded."""
    import datasets

    builder, options = _builder_and_files(source)
    kwargs: dict[str, Any] = dict(options)
    if source.config_name:
        kwargs["name"] = source.config_name
    if source.revision:
        kwargs["revision"] = source.revision
    if token:
        kwargs["token"] = token
    split = source.split
    stream_slice: tuple[int | None, int | None] | None = None
    if source.streaming and "[" in split:
        match = _SLICE.match(split)
        if not match:
            raise SourceError(f"streaming sources support only plain index slices like 'train[0:100]', not {split!r}")
        split = match["name"]
        start, stop = match["start"], match["stop"]
        stream_slice = (int(start) if start else None, int(stop) if stop else None)
        if any(v is not None and v < 0 for v in stream_slice):
            raise SourceError("streaming sources do not support negative slice bounds")
    try:
        dataset = datasets.load_dataset(builder, split=split, streaming=source.streaming, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs its message, not a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load source dataset {source.dataset!r} (split {source.split!r}): {message}") from None

    if source.streaming:
        start, stop = stream_slice or (None, None)
        if start:
            dataset = dataset.skip(start)
        if stop is not None:
            dataset = dataset.take(stop - (start or 0))
        if source.shuffle:
            dataset = dataset.shuffle(seed=source.seed, buffer_size=10_000)
        if source.max_examples:
            dataset = dataset.take(source.max_examples)
        rows = [jsonable(dict(row)) for row in dataset]
    else:
        if source.shuffle:
            dataset = dataset.shuffle(seed=source.seed)
        if source.max_examples:
            dataset = dataset.select(range(min(source.max_examples, len(dataset))))
        rows = [jsonable(row) for row in dataset]
    return rows


def prompt_of(row: dict[str, Any], field: str, index: int) -> str:
    """The prompt text of a row (a dotted `field` reaches into nested columns)."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            available = ", ".join(sorted(row)) or "(none)"
            raise SourceError(f"field {field!r} is missing from source row {index}; the rows have: {available}")
        value = value[part]
    if not isinstance(value, str):
        raise SourceError(f"field {field!r} of source row {index} is a {type(value).__name__}, not text")
    return value


def choose_system_prompt(prompts: str | list[str] | None, seed: int | None, row_index: int) -> str | None:
    """The system prompt of a row: the one given, or one of the list chosen per row.

    With a job seed the choice depends only on (seed, row index), so it is reproducible whatever
    the batching; without one it is random."""
    if prompts is None or isinstance(prompts, str):
        return prompts
    rng = random.Random(f"{seed}:{row_index}") if seed is not None else random
    return rng.choice(prompts)


def row_seed(seed: int | None, row_index: int) -> int | None:
    """A per-row sampling seed derived from the job seed, independent of batch composition."""
    if seed is None:
        return None
    return (seed * 1_000_003 + row_index * 7_919) % (2**31 - 1)
