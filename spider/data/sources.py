"""Loading a job's source rows: Hugging Face datasets (hub ids or builders) and local files."""

from __future__ import annotations

import datetime
import decimal
import random
import re
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spider.config import SourceConfig
from spider.errors import SourceError
from spider.policy import Policy, within
from spider.types import Message

ROLES = ("system", "user", "assistant", "tool")

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
# Builders a job may name with its own data_files: plain-data formats only (no pickles, no SQL).
FILE_BUILDERS = ("json", "csv", "parquet", "text")
# `source.options` a job may set: how to parse its files, never where Spider keeps or reads things.
BUILDER_OPTIONS = ("data_files", "data_dir", "field", "delimiter", "sep", "column_names", "header", "quotechar",
                   "skiprows", "columns", "encoding", "sample_by")
LOAD_OPTIONS = ("verification_mode", "keep_in_memory")
_SLICE = re.compile(r"^(?P<name>[\w.\-]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass(frozen=True)
class SourceAccess:
    """What a job's source may read: the files uploaded with it (`uploaded`, a folder), the
    operator's data roots, the Hub, and http(s) URLs to public hosts when the operator allows
    remote data. `cache_dir` is the job's own datasets cache (deleted with the job); `max_rows`
    the most rows a job may have (the operator's SPIDER_MAX_ROWS; None: no ceiling)."""

    uploaded: Path | None = None
    data_roots: tuple[Path, ...] = ()
    allow_remote_data: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cache_dir: Path | None = None
    max_rows: int | None = None

    @classmethod
    def for_job(cls, policy: Policy, uploaded: Path | None, cache_dir: Path | None) -> "SourceAccess":
        return cls(uploaded, policy.data_roots, policy.allow_remote_data, policy.allowed_hosts, cache_dir,
                   policy.job_ceilings.rows)

    def roots(self) -> tuple[Path, ...]:
        return self.data_roots + ((self.uploaded.resolve(),) if self.uploaded else ())

    def check_file(self, entry: str, what: str) -> None:
        """Raise SourceError unless the job may read `entry` (a path or URL)."""
        if entry.startswith("hf://datasets/") and "::" not in entry:
            return
        if re.match(r"^https?://", entry) and "::" not in entry:
            if not self.allow_remote_data:
                raise SourceError(f"{what}: {entry!r} is a URL; this server reads remote data only when the operator "
                                  "allows it (SPIDER_ALLOW_REMOTE_DATA=1)")
            from spider.netpolicy import EgressDenied, check_url

            try:
                check_url(entry, self.allowed_hosts)
            except EgressDenied as exc:
                raise SourceError(f"{what}: {exc}") from None
            return
        if "://" in entry or "::" in entry or not entry.startswith("/"):
            raise SourceError(f"{what}: {entry!r} is neither a file of the job nor a hub dataset file")
        if not within(Path(entry), self.roots()):
            raise SourceError(
                f"{what}: {entry!r} is outside what this job may read (its own uploaded files, and the operator's "
                "SPIDER_DATA_ROOTS); local files are uploaded with the job by the client"
            )


def _entries(data_files: Any) -> list[str]:
    """Every path or pattern in a `data_files` value (a string, a list, or a mapping of either)."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [e for value in data_files.values() for e in _entries(value)]
    if isinstance(data_files, (list, tuple)):
        return [e for value in data_files for e in _entries(value)]
    return [str(data_files)]


def looks_local(dataset: str) -> bool:
    """Whether `source.dataset` names a local file or folder rather than a hub id or a builder."""
    return dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in LOCAL_BUILDERS or not _HUB_DATASET.match(dataset)


def source_problems(source: SourceConfig, policy: Policy, uploaded: bool) -> list[str]:
    """What in `source` the operator's policy does not allow (checked at submit, before any file
    is read); the resolved files are checked again when the source is loaded."""
    problems = []
    for key in source.options:
        if key not in BUILDER_OPTIONS + LOAD_OPTIONS:
            problems.append(f"source.options.{key}: not an option jobs may set; allowed: {', '.join(BUILDER_OPTIONS + LOAD_OPTIONS)}")
    access = SourceAccess.for_job(policy, None, None)
    if uploaded:
        for key in ("data_files", "data_dir"):
            if key in source.options:
                problems.append(f"source.options.{key}: the job's source is the file it uploaded; leave {key} out")
        return problems
    if looks_local(source.dataset):
        if not within(Path(source.dataset), policy.data_roots):
            problems.append(
                f"source.dataset: {source.dataset!r} is a path on the server, which jobs may read only inside the "
                "operator's SPIDER_DATA_ROOTS; the client uploads local files with the job"
            )
        return problems
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    is_builder = source.dataset in _PACKAGED_DATASETS_MODULES
    if is_builder and source.dataset not in FILE_BUILDERS:
        problems.append(f"source.dataset: the {source.dataset!r} builder is not available to jobs; use one of "
                        f"{', '.join(FILE_BUILDERS)} or a hub dataset id")
        return problems
    data_dir = source.options.get("data_dir")
    if data_dir is not None and (not isinstance(data_dir, str) or is_builder or _escapes(data_dir)):
        problems.append("source.options.data_dir: only a folder inside the hub dataset's repository")
    for entry in _entries(source.options.get("data_files")):
        if not is_builder and not _escapes(entry):
            continue  # a pattern inside the hub repository
        try:
            access.check_file(entry, "source.options.data_files")
        except SourceError as exc:
            problems.append(str(exc))
    return problems


def _escapes(pattern: str) -> bool:
    """Whether a hub-repo-relative pattern points outside the repository."""
    return pattern.startswith(("/", "~", "\\")) or ".." in Path(pattern).parts or "://" in pattern or "::" in pattern


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
    if looks_local(source.dataset) or path.exists():
        if not path.exists():
            raise SourceError(f"source dataset {source.dataset!r}: no such file or directory")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise SourceError(f"source dataset {source.dataset!r}: no .json/.jsonl/.parquet/.csv files in it")
        suffixes = {p.suffix.lower() for p in files}
        unknown = sorted(suffixes - set(LOCAL_BUILDERS))
        if unknown:
            raise SourceError(
                f"source dataset {source.dataset!r}: Spider does not read {', '.join(repr(s or '(no suffix)') for s in unknown)} "
                f"files as a source; name a file ending in one of {', '.join(sorted(LOCAL_BUILDERS))}"
            )
        builders = {LOCAL_BUILDERS[s] for s in suffixes}
        if len(builders) > 1:
            raise SourceError(f"source dataset {source.dataset!r} mixes file types {sorted(suffixes)}")
        split_name = source.split.split("[")[0]
        options["data_files"] = {split_name: [str(p.resolve()) for p in files]}
        if ".tsv" in suffixes:
            options.setdefault("delimiter", "\t")
        return builders.pop(), options
    return source.dataset, options


def load_source_rows(source: SourceConfig, token: str | None = None, access: SourceAccess | None = None) -> list[dict[str, Any]]:
    """Every row of the source at once (see `iter_source_rows`)."""
    return list(iter_source_rows(source, token, access))


def iter_source_rows(
    source: SourceConfig, token: str | None = None, access: SourceAccess | None = None
) -> Iterator[dict[str, Any]]:
    """The source's rows one by one, after split slicing, shuffling (seeded) and `max_examples`:
    read from datasets' Arrow files (memory-mapped) or its stream, never all held at once.

    With `access` (every job), the files the source resolves to are checked against it before
    anything is read, and datasets keeps its cache in `access.cache_dir`. Without a `token`, none
    is sent (not the worker's own). Raises SourceError with the dataset's own message when the
    source cannot be loaded (before the first row)."""
    dataset, streaming = _open_dataset(source, token, access)
    max_rows = access.max_rows if access is not None else None
    for count, row in enumerate(dataset, 1):
        if streaming and max_rows is not None and count > max_rows:
            raise _too_many_rows(source, f"more than {max_rows}", max_rows)
        yield jsonable(dict(row) if streaming else row)


def _thread_safe_progress_bars() -> None:
    """Several tasks of a worker load sources at once, on threads. datasets resolves files with
    tqdm's `thread_map`, whose `ensure_lock` deletes tqdm's class lock on the way out when it made
    it: one thread's exit then pulls the lock from under another (AttributeError '_lock'). A lock
    made here first is never deleted. Nobody watches a worker's progress bars either."""
    import datasets
    from tqdm import tqdm

    tqdm.get_lock()
    datasets.disable_progress_bars()


def _open_dataset(source: SourceConfig, token: str | None, access: SourceAccess | None) -> tuple[Any, bool]:
    """The source as a datasets Dataset (or IterableDataset when streaming), sliced, shuffled and
    cut to `max_examples`; and whether it streams."""
    import datasets

    _thread_safe_progress_bars()
    builder_name, options = _builder_and_files(source)
    kwargs: dict[str, Any] = {k: v for k, v in options.items() if k not in LOAD_OPTIONS}
    if source.config_name:
        kwargs["name"] = source.config_name
    if source.revision:
        kwargs["revision"] = source.revision
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
    cache = str(access.cache_dir) if access is not None and access.cache_dir else None
    max_rows = access.max_rows if access is not None else None
    try:
        builder = datasets.load_dataset_builder(builder_name, cache_dir=cache, token=token or False, **kwargs)
        if access is not None:
            for entry in _entries(builder.config.data_files):
                access.check_file(str(entry), f"source {source.dataset!r}")
        if source.streaming:
            dataset = builder.as_streaming_dataset(split=split)
        else:
            builder.download_and_prepare(verification_mode=options.get("verification_mode"))
            keep = options.get("keep_in_memory")
            dataset = builder.as_dataset(split=split, in_memory=bool(keep))
    except SourceError:
        raise
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
        if max_rows is not None:
            dataset = dataset.take(max_rows + 1)  # one more tells that there are too many
        return dataset, True
    if source.shuffle:
        dataset = dataset.shuffle(seed=source.seed)
    if source.max_examples:
        dataset = dataset.select(range(min(source.max_examples, len(dataset))))
    if max_rows is not None and len(dataset) > max_rows:
        raise _too_many_rows(source, str(len(dataset)), max_rows)
    return dataset, False


def _too_many_rows(source: SourceConfig, count: str, max_rows: int) -> SourceError:
    return SourceError(
        f"source {source.dataset!r} (split {source.split!r}) has {count} rows; this server takes at most {max_rows} "
        "rows per job (SPIDER_MAX_ROWS): take fewer with source.max_examples or a split slice"
    )


def field_value(row: dict[str, Any], field: str, index: int) -> Any:
    """The value of a (dotted) `field` of a source row."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            available = ", ".join(sorted(row)) or "(none)"
            raise SourceError(f"field {field!r} is missing from source row {index}; the rows have: {available}")
        value = value[part]
    return value


def prompt_of(row: dict[str, Any], field: str, index: int) -> str:
    """The prompt text of a row (a dotted `field` reaches into nested columns)."""
    value = field_value(row, field, index)
    if not isinstance(value, str):
        raise SourceError(f"field {field!r} of source row {index} is a {type(value).__name__}, not text")
    return value


def start_of(row: dict[str, Any], field: str, index: int) -> tuple[str, list[Message] | None]:
    """What a row's rollout starts from: a prompt (text), or a conversation (a list of
    `{role, content}` messages, e.g. a chat dataset's `messages` column), with its last user
    message as the prompt the records show."""
    value = field_value(row, field, index)
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in ROLES for m in value):
        try:
            messages = [Message.from_openai({**m, "content": m.get("content") or ""}) for m in value]
        except (KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"field {field!r} of source row {index} is not a list of chat messages ({exc})") from None
        users = [m.content for m in messages if m.role == "user"]
        return (users[-1] if users else ""), messages
    raise SourceError(
        f"field {field!r} of source row {index} is a {type(value).__name__}: give text, or a list of "
        "{role, content} messages"
    )


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
