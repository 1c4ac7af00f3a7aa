"""Writing a job's result: merged shards as JSONL or Parquet, and pushing it to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from spider.config import HFOutput
from spider.errors import SpiderError


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_result(records: Iterable[dict[str, Any]], path: Path, fmt: str) -> int:
    """Write records to `path` (temp file + rename) and return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(records)
        count = len(rows)
        # Nested free-form fields (source rows, usage) vary per row: keep them as JSON text so one
        # odd row cannot break the schema.
        table = pa.Table.from_pylist([_flatten_for_parquet(r) for r in rows])
        pq.write_table(table, tmp)
    else:
        raise ValueError(f"unknown result format {fmt!r}")
    tmp.replace(path)
    return count


def _flatten_for_parquet(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        out[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
    return out


def upload_to_hub(result: Path, metadata: Path, hf: HFOutput, token: str | None, job_id: str) -> str:
    """Push the result and metadata to the Hub repo `hf.repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    if not token:
        raise SpiderError(
            f"output.mode is 'upload_hf' but no token was sent: pass env=({hf.token_env!r},) to the client "
            f"with {hf.token_env} set in your environment"
        )
    api = HfApi(token=token)
    api.create_repo(hf.repo_id, repo_type=hf.repo_type, private=hf.private, exist_ok=True)
    folder = f"data/{hf.config_name}" if hf.config_name else "data"
    api.upload_file(
        path_or_fileobj=str(result),
        path_in_repo=f"{folder}/{job_id}{result.suffix}",
        repo_id=hf.repo_id,
        repo_type=hf.repo_type,
        commit_message=f"Spider job {job_id}: result",
    )
    info = api.upload_file(
        path_or_fileobj=str(metadata),
        path_in_repo=f"{folder}/{job_id}.metadata.json",
        repo_id=hf.repo_id,
        repo_type=hf.repo_type,
        commit_message=f"Spider job {job_id}: metadata",
    )
    return str(getattr(info, "commit_url", info))
