"""Writing a job's result: merged shards as JSONL or Parquet; and pushing a job's output to the
Hugging Face Hub: a dataset job's records into a dataset repo, an on-policy job's trained adapter
into a model repo."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spider.artifacts import ArtifactPath, fetch, staged
from spider.config import HFOutput
from spider.errors import SpiderError

log = logging.getLogger(__name__)
T = TypeVar("T")


# JSON's own whitespace: a line of only these is blank. (str.strip would also take U+2028 and the like.)
JSON_WHITESPACE = " \t\r\n"
# Characters that str.splitlines and many other readers take for line breaks but JSON leaves raw in a
# string: written escaped, so that a JSONL line stays one line for any reader.
LINE_BREAKS_IN_STRINGS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def read_jsonl(path: ArtifactPath) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file (on disk or in the artifact store), read as a stream: lines end
    at \\n only (not at \\r, U+2028 and the like, which may sit raw in a line), blank lines are
    skipped."""
    with path.open("r", encoding="utf-8", newline="\n") as handle:
        for line in handle:
            if line.strip(JSON_WHITESPACE):
                yield json.loads(line)


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSONL line for `record`, ending in \\n: non-ASCII text kept as it is, except the line
    breaks of LINE_BREAKS_IN_STRINGS, which are escaped."""
    line = json.dumps(record, ensure_ascii=False)
    for raw, escaped in LINE_BREAKS_IN_STRINGS.items():
        line = line.replace(raw, escaped)
    return line + "\n"


def write_result(
    records: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]], path: ArtifactPath, fmt: str
) -> int:
    """Write records to `path` and return how many were written. The result appears whole or not
    at all (see spider.artifacts.staged): a failed write leaves no half result beside the job's files.

    `records` may be a function that yields them afresh on each call (finalize's merge of the
    shards): then a Parquet result is written in two passes, one for the schema and one for the
    rows, holding one chunk of rows at a time; otherwise all rows are held at once."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown result format {fmt!r}")
    count = 0
    with staged(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                for record in records() if callable(records) else records:
                    handle.write(jsonl_line(record))
                    count += 1
        else:
            count = _write_parquet(records if callable(records) else _once(list(records)), tmp)
    return count


PARQUET_CHUNK = 10_000


def _write_parquet(records: Callable[[], Iterable[dict[str, Any]]], path: Path) -> int:
    """Parquet in chunks of PARQUET_CHUNK rows: the first pass finds the one schema every chunk
    fits (a column null in one chunk and text in another is text), the second writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def tables():
        for chunk in _chunks(records(), PARQUET_CHUNK):
            # Nested free-form fields (source rows, usage) vary per row: keep them as JSON text so
            # one odd row cannot break the schema. A field only some rows have is a column too.
            flat = [_flatten_for_parquet(r) for r in chunk]
            names = list(dict.fromkeys(name for row in flat for name in row))
            yield pa.table({name: [row.get(name) for row in flat] for name in names})

    schemas = [table.schema for table in tables()]
    if not schemas:
        pq.write_table(pa.table({}), path)
        return 0
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for table in tables():
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
            writer.write_table(table.select(schema.names).cast(schema))
            count += len(table)
    return count


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _once(rows: list[dict[str, Any]]) -> Callable[[], Iterable[dict[str, Any]]]:
    return lambda: rows


def _flatten_for_parquet(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        out[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
    return out


# -- the Hugging Face Hub -------------------------------------------------------------------------

CARD = "README.md"
SPLIT = "train"
DEFAULT_CONFIG = "default"
JOBS_BEGIN = "<!-- spider:jobs -->"
JOBS_END = "<!-- /spider:jobs -->"
JOBS_TABLE_HEAD = "| config | job | model | source | records |\n|---|---|---|---|---|\n"
CARD_HEADER = re.compile(r"\A---[ \t]*\n(?:(?P<yaml>.*?)\n)?---[ \t]*(?:\n|\Z)", re.DOTALL)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DATASETS_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "tsv": "csv",
                     "txt": "text", "arrow": "arrow"}
CONFLICT_TRIES = 5  # commits raced by another job writing to the same repo, re-read and rebuilt


@dataclass(frozen=True)
class HubRetry:
    """How transient Hub failures (5xx, 429, a lost connection) are retried: `tries` attempts in
    all, waiting `first_wait_s` after the first failure and twice as long after each next one,
    at most `max_wait_s`."""

    tries: int = 4
    first_wait_s: float = 1.0
    max_wait_s: float = 8.0

    def waits(self) -> Iterator[float]:
        wait = self.first_wait_s
        for _ in range(self.tries - 1):
            yield wait
            wait = min(wait * 2, self.max_wait_s)


HUB_RETRY = HubRetry()


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset job's files go in its repo. A config's files share its folder (`data/` for
    the default config, else the config's name) and are found by one glob per format; each file
    is named by the job id, so jobs writing to one repo never touch each other's files: the
    result (`<job>.jsonl`) or its shards (`<job>-000003.jsonl`), and `<job>.metadata.json`."""

    config_name: str
    folder: str
    fmt: str
    job_id: str

    @classmethod
    def of(cls, hf: HFOutput, fmt: str, job_id: str) -> "DatasetLayout":
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"unknown result format {fmt!r}")
        name = hf.config_name or DEFAULT_CONFIG
        return cls(name, "data" if name == DEFAULT_CONFIG else name, fmt, job_id)

    @property
    def data_files(self) -> str:
        return f"{self.folder}/*.{self.fmt}"

    @property
    def result(self) -> str:
        return f"{self.folder}/{self.job_id}.{self.fmt}"

    @property
    def metadata(self) -> str:
        return f"{self.folder}/{self.job_id}.metadata.json"

    def shard(self, index: int) -> str:
        return f"{self.folder}/{self.job_id}-{index:06d}.{self.fmt}"


@dataclass(frozen=True)
class RepoState:
    """What a commit is built on: the repo's head commit, its files there, its dataset card."""

    sha: str
    private: bool
    files: frozenset[str]
    card: str | None


def hub_endpoint() -> str:
    """The Hub uploads go to: `HF_ENDPOINT`, as huggingface_hub reads it, but read at each upload
    (huggingface_hub reads it once, at import), else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def upload_to_hub(
    result: ArtifactPath,
    metadata: ArtifactPath,
    hf: HFOutput,
    token: str | None,
    job_id: str,
    shards: Mapping[int, ArtifactPath] | None = None,
) -> str:
    """Commit a dataset job's output to the dataset repo `hf.repo_id` (created, private when asked,
    if missing) as the config `hf.config_name` (else `default`): its records, its metadata and the
    dataset card, merged with the card already there. Returns the commit's URL.

    The records are `result` (the merged file), or, when `hf.upload_every` had `upload_shards`
    send them batch by batch, the `shards` (batch index -> JSONL shard) the repo still lacks: the
    whole result is never sent again. One commit, so a reader sees the job's files all or none."""
    _check_target(hf, token, "dataset", "a dataset job's records go")
    if hf.upload_every is not None and shards is None:
        raise ValueError("hf.upload_every is set: pass the job's `shards`, most of which are on the Hub already")
    layout = DatasetLayout.of(hf, result.suffix.lstrip("."), job_id)
    summary = json.loads(metadata.read_text())
    row = _job_row(layout, summary)

    with tempfile.TemporaryDirectory(prefix="spider-hub-") as scratch:
        shard_files = _ShardFiles(shards or {}, layout, Path(scratch))
        # A result or metadata in a bucket is fetched once here; a commit built again reuses it.
        summary_file = fetch(metadata, Path(scratch) / "metadata.json")
        result_file = fetch(result, Path(scratch) / f"result{result.suffix}") if shards is None else None

        def operations(state: RepoState) -> list[Any]:
            from huggingface_hub import CommitOperationAdd

            card = merge_dataset_card(state.card, hf.repo_id, layout, row)
            if shards is None:
                records = [CommitOperationAdd(path_in_repo=layout.result, path_or_fileobj=str(result_file))]
            else:
                records = shard_files.missing(state.files)
            return [
                *records,
                CommitOperationAdd(path_in_repo=layout.metadata, path_or_fileobj=str(summary_file)),
                CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()),
            ]

        records = (summary.get("counts") or {}).get("records", "?")
        return _HubRepo(hf, token).commit(operations, f"Spider job {job_id}: {records} records")


def upload_shards(shards: Mapping[int, ArtifactPath], fmt: str, hf: HFOutput, token: str | None, job_id: str) -> list[int]:
    """Commit the completed batches' shards (batch index -> JSONL shard) that the dataset repo does
    not hold yet, in the job's `fmt`, with the config in the dataset card; returns the batch
    indices whose shards the repo lacked and now holds. What is on the Hub decides, so a call
    after a crash or a redelivered task sends nothing twice, and two calls racing commit each
    shard once (both may list it). Shards without records are skipped;
    `upload_to_hub(..., shards=...)` finishes the job."""
    _check_target(hf, token, "dataset", "a dataset job's records go")
    layout = DatasetLayout.of(hf, fmt, job_id)
    sent: list[int] = []
    with tempfile.TemporaryDirectory(prefix="spider-hub-") as scratch:
        shard_files = _ShardFiles(shards, layout, Path(scratch))

        def operations(state: RepoState) -> list[Any]:
            from huggingface_hub import CommitOperationAdd

            records = shard_files.missing(state.files)
            sent[:] = shard_files.indices(records)
            if not records:
                return []
            card = merge_dataset_card(state.card, hf.repo_id, layout, None)
            if card != state.card:
                records.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
            return records

        _HubRepo(hf, token).commit(operations, f"Spider job {job_id}: shards")
    return sent


def upload_folder_to_hub(folder: Path, hf: HFOutput, token: str | None, job_id: str) -> str:
    """Commit an exported model folder (a PEFT adapter: adapter_config.json,
    adapter_model.safetensors, tokenizer files and its README.md model card; or whole weights) to
    the root of the model repo `hf.repo_id` (created, private when asked, if missing), where
    `PeftModel.from_pretrained(repo_id)` finds it. Returns the commit's URL."""
    _check_target(hf, token, "model", "a trained adapter goes")
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    if not files.keys() & {"adapter_config.json", "config.json"}:
        raise SpiderError(f"{folder} is not an exported model folder (no adapter_config.json or config.json)")

    def operations(state: RepoState) -> list[Any]:
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in files.items()]

    return _HubRepo(hf, token).commit(operations, f"Spider job {job_id}: trained weights")


def merge_dataset_card(card: str | None, repo_id: str, layout: DatasetLayout, job_row: str | None) -> str:
    """The dataset card with `layout`'s config among its `configs` (the others kept as they are)
    and, when given, the job's row in the table of jobs; the rest of an existing card is kept.

    Refused, as the job's records would not load: a config of that name that reads other files
    (another format, or files a person chose), and a repo whose first config holds another
    format (`datasets` reads every config of a repo with the builder its first config needs)."""
    header, body = _split_card(card, repo_id)
    configs = header.get("configs")
    configs = [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []
    ours = next((c for c in configs if c.get("config_name") == layout.config_name), None)
    if ours is not None and layout.data_files not in _data_file_patterns(ours.get("data_files")):
        raise SpiderError(
            f"the config {layout.config_name!r} of the dataset repo {repo_id} reads "
            f"{_data_file_patterns(ours.get('data_files')) or 'no files'}, not {layout.data_files}: "
            "choose another output.hf.config_name (or the output.format its files have)"
        )
    first = configs[0] if configs else None
    builders = {_builder(p) for p in _data_file_patterns(first.get("data_files"))} - {None} if first else set()
    if builders and builders != {_builder(layout.data_files)}:
        raise SpiderError(
            f"the dataset repo {repo_id} is read as {'/'.join(sorted(builders))} files (its first config, "
            f"{first.get('config_name')!r}, reads {_data_file_patterns(first.get('data_files'))}), and `datasets` "
            f"reads all of a repo's configs alike: this job's {layout.fmt} files would not load; choose the "
            "output.format of the repo's files, or another output.hf.repo_id"
        )
    if ours is None:
        configs.append({"config_name": layout.config_name, "data_files": [{"split": SPLIT, "path": layout.data_files}]})
    header["configs"] = configs
    if body is None:
        body = _card_body(repo_id)
    if job_row is not None:
        body = _with_job_row(body, layout.job_id, job_row)
    return f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n{body}"


def _builder(pattern: str) -> str | None:
    """The `datasets` builder that reads files matching `pattern`, when its extension says."""
    return DATASETS_BUILDERS.get(pattern.rsplit("/", 1)[-1].rpartition(".")[2].lower())


def _data_file_patterns(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    patterns: list[str] = []
    for item in data_files if isinstance(data_files, list) else []:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, dict):
            path = item.get("path")
            patterns.extend([path] if isinstance(path, str) else [p for p in path or [] if isinstance(p, str)])
    return patterns


def _split_card(card: str | None, repo_id: str) -> tuple[dict[str, Any], str | None]:
    """A card's YAML header and the text after it (None: no card yet)."""
    if card is None:
        return {}, None
    match = CARD_HEADER.match(card)
    if match is None:
        return {}, card
    try:
        header = yaml.safe_load(match.group("yaml") or "") or {}
    except yaml.YAMLError as exc:
        raise SpiderError(f"the dataset card (README.md) of {repo_id} has a YAML header that does not parse: "
                          f"{exc}; fix it on the Hub") from exc
    if not isinstance(header, dict):
        raise SpiderError(f"the dataset card (README.md) of {repo_id} has a YAML header that is not a mapping")
    return header, card[match.end():]


def _card_body(repo_id: str) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    return (
        f"\n# {name}\n\n"
        "Records generated with Spider, an engine for LLM knowledge distillation: each record is a "
        "model's completion (or whole conversation) for one row of a source dataset, with the row's "
        "index, the model's token usage, and an error where a row failed.\n\n"
        f'Each config is a subset: `datasets.load_dataset("{repo_id}", "<config>")`. Every Spider job '
        "writing here adds its own files, named by its job id (`<job>.metadata.json` holds its "
        "full config and counts), and a row below.\n\n"
        f"{JOBS_BEGIN}\n{JOBS_TABLE_HEAD}{JOBS_END}\n"
    )


def _job_row(layout: DatasetLayout, metadata: Mapping[str, Any]) -> str:
    """The job's row in the card's table of jobs: its config, id, model, source and record count."""
    config = metadata.get("config") or {}

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    model = (config.get("model") or {}).get("name", "")
    source = (config.get("source") or {}).get("dataset", "")
    records = (metadata.get("counts") or {}).get("records", "")
    return f"| `{layout.config_name}` | `{layout.job_id}` | {cell(model)} | {cell(source)} | {cell(records)} |"


def _with_job_row(body: str, job_id: str, row: str) -> str:
    """The card's text with `row` in its table of jobs (added at the end of a card without one)."""
    start, end = body.find(JOBS_BEGIN), body.find(JOBS_END)
    if start < 0 or end < start:
        table = f"{JOBS_BEGIN}\n{JOBS_TABLE_HEAD}{row}\n{JOBS_END}\n"
        return body.rstrip("\n") + "\n\n## Spider jobs\n\n" + table
    if f"`{job_id}`" in body[start:end]:  # the same job finalized again: its row is there
        return body
    return body[:end] + row + "\n" + body[end:]


class _ShardFiles:
    """A job's shards as files to commit in its format (Parquet ones converted once, in
    `scratch`), and which of them the repo lacks."""

    def __init__(self, shards: Mapping[int, ArtifactPath], layout: DatasetLayout, scratch: Path):
        self.shards = dict(shards)
        self.layout = layout
        self.scratch = scratch
        self._converted: dict[int, Path] = {}

    def missing(self, present: frozenset[str]) -> list[Any]:
        from huggingface_hub import CommitOperationAdd

        operations = []
        for index in sorted(self.shards):
            path = self.layout.shard(index)
            if path in present or self.shards[index].stat().st_size == 0:
                continue
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(self._file(index))))
        return operations

    def indices(self, operations: Iterable[Any]) -> list[int]:
        by_path = {self.layout.shard(i): i for i in self.shards}
        return [by_path[op.path_in_repo] for op in operations]

    def _file(self, index: int) -> Path:
        """The shard as a local file in the job's format (a shard in a bucket is fetched once)."""
        if index not in self._converted:
            target = self.scratch / f"{index:06d}.{self.layout.fmt}"
            if self.layout.fmt == "jsonl":
                target = fetch(self.shards[index], target)
            else:
                write_result(read_jsonl(self.shards[index]), target, self.layout.fmt)
            self._converted[index] = target
        return self._converted[index]


def _check_target(hf: HFOutput, token: str | None, repo_type: str, what: str) -> None:
    if not token:
        raise SpiderError(
            f"output.mode is 'upload_hf' but no token was sent to upload to {hf.repo_id}: pass "
            f"env=({hf.token_env!r},) to the client with {hf.token_env} set in your environment"
        )
    if hf.repo_type != repo_type:
        raise SpiderError(
            f"{what} to a {repo_type} repo, but output.hf.repo_type is {hf.repo_type!r} for {hf.repo_id}: "
            f"set output.hf.repo_type: {repo_type}"
        )


class _Conflict(Exception):
    """Another commit landed on the repo between reading it and committing."""


class _HubRepo:
    """The repo an upload writes to: created when missing, read and committed to with retries of
    transient failures; every failure that is not transient becomes a SpiderError naming it."""

    def __init__(self, hf: HFOutput, token: str):
        from huggingface_hub import HfApi

        self.hf = hf
        self.token = token
        self.api = HfApi(endpoint=hub_endpoint(), token=token, library_name="spider")
        self.name = f"the {hf.repo_type} repo {hf.repo_id}"

    def commit(self, operations: Callable[[RepoState], list[Any]], message: str) -> str:
        """Build the commit's operations on the repo's current state and commit them on top of that
        state; a commit that lost a race with another is built again on the new state."""
        self._retrying(lambda: self.api.create_repo(
            self.hf.repo_id, repo_type=self.hf.repo_type, private=self.hf.private, exist_ok=True))

        def attempt() -> str:
            state = self._state()
            if self.hf.private and not state.private:
                raise SpiderError(
                    f"{self.name} exists and is public, but output.hf.private is true: make it private on the "
                    "Hub, or set output.hf.private: false"
                )
            ops = operations(state)
            if not ops:
                return self._commit_url(state.sha)
            try:
                info = self.api.create_commit(
                    self.hf.repo_id, ops, commit_message=message, repo_type=self.hf.repo_type, parent_commit=state.sha
                )
            except Exception as exc:
                if _status(exc) == 412:
                    raise _Conflict() from exc
                raise
            log.info("uploaded %d files to %s: %s", len(ops), self.name, info.commit_url)
            return info.commit_url

        for _ in range(CONFLICT_TRIES):
            try:
                return self._retrying(attempt)
            except _Conflict:
                log.info("%s changed while committing to it: building the commit again", self.name)
        raise SpiderError(f"{self.name} kept changing under {CONFLICT_TRIES} commits in a row: try again later")

    def _state(self) -> RepoState:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        info = self.api.repo_info(self.hf.repo_id, repo_type=self.hf.repo_type)
        files = frozenset(s.rfilename for s in info.siblings or [])
        card = None
        if CARD in files:
            from huggingface_hub import hf_hub_url

            url = hf_hub_url(self.hf.repo_id, CARD, repo_type=self.hf.repo_type, revision=info.sha,
                             endpoint=self.api.endpoint)
            response = get_session().get(url, headers=build_hf_headers(token=self.token), follow_redirects=True)
            hf_raise_for_status(response)
            card = response.content.decode("utf-8")
        return RepoState(sha=info.sha, private=bool(info.private), files=files, card=card)

    def _commit_url(self, sha: str) -> str:
        prefix = "" if self.hf.repo_type == "model" else f"{self.hf.repo_type}s/"
        return f"{self.api.endpoint}/{prefix}{self.hf.repo_id}/commit/{sha}"

    def _retrying(self, call: Callable[[], T]) -> T:
        waits = HUB_RETRY.waits()
        while True:
            try:
                return call()
            except (SpiderError, _Conflict):
                raise
            except Exception as exc:
                if not self._transient(exc):
                    raise self._error(exc) from exc
                wait = next(waits, None)
                if wait is None:
                    raise SpiderError(
                        f"the Hub at {self.api.endpoint} did not take the upload to {self.name} "
                        f"after {HUB_RETRY.tries} tries: {_describe(exc)}"
                    ) from exc
                log.warning("%s: %s; trying again in %.1fs", self.name, _describe(exc), wait)
                time.sleep(wait)

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

        for cause in _causes(exc):
            if isinstance(cause, OfflineModeIsEnabled):
                return False
            if isinstance(cause, HfHubHTTPError):
                return _status(cause) in TRANSIENT_STATUS
            if isinstance(cause, HTTPError):  # the transport's: a refused or lost connection, a timeout
                return True
        return False

    def _error(self, exc: BaseException) -> SpiderError:
        from huggingface_hub.errors import OfflineModeIsEnabled

        status = next((s for s in map(_status, _causes(exc)) if s is not None), None)
        env = self.hf.token_env
        if any(isinstance(c, OfflineModeIsEnabled) for c in _causes(exc)):
            return SpiderError(f"cannot upload to {self.name}: HF_HUB_OFFLINE is set on the server")
        if status == 401:
            return SpiderError(
                f"the Hub refused the token in {env} for {self.name} (401 Unauthorized): it is invalid or "
                f"expired; send a valid write token as {env}"
            )
        if status == 403:
            return SpiderError(
                f"the token in {env} may not write to {self.name} (403 Forbidden): use a write token of the "
                f"namespace {self.hf.repo_id.split('/')[0]!r}, or a repo_id in your own namespace"
            )
        if status == 404:
            return SpiderError(
                f"{self.name} was not found, or the token in {env} cannot see it (404): check output.hf.repo_id "
                "and output.hf.repo_type"
            )
        return SpiderError(f"the Hub refused the upload to {self.name}: {_describe(exc)}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
