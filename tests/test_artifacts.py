"""The artifact store on both of its backends, a folder on disk and an S3 bucket (moto's server, over
HTTP): files are published whole or not at all, listed, removed, streamed, and moved between the
store and a worker's own disk; a job's files name the store and their local copies."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import tracemalloc
import uuid
from pathlib import Path

import pytest

from spider.artifacts import READ_BLOCK, StorePath, artifact_root, fetch, publish, remove, staged, write_atomic
from spider.data.sinks import read_jsonl, write_result
from spider.errors import SpiderError
from spider.jobs.store import JobFiles
from spider.settings import Settings
from tests.s3_server import s3_with_credentials

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server, with the credentials s3fs reads from the environment of this process."""
    with s3_with_credentials(tmp_path_factory.mktemp("moto")) as server:
        yield server


def bucket_settings(s3, data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, data_url=f"s3://{s3.new_bucket()}/spider", s3_endpoint_url=s3.url)


@pytest.fixture(params=["disk", "bucket"])
def root(request, tmp_path):
    """A fresh folder of the store: on disk, or in a fresh bucket."""
    if request.param == "disk":
        return tmp_path / "store"
    return artifact_root(bucket_settings(request.getfixturevalue("s3"), tmp_path / "local"))


def names(paths) -> list[str]:
    return sorted(p.name for p in paths)


def test_written_files_read_back_and_are_replaced_whole(root):
    path = root / "jobs" / "a" / "metadata.json"
    assert not path.exists()
    write_atomic(path, json.dumps({"n": 1}))
    assert path.exists() and path.is_file() and not path.is_dir() and path.parent.is_dir()
    assert json.loads(path.read_text()) == {"n": 1}
    write_atomic(path, b"\x00\xffbytes")
    assert path.read_bytes() == b"\x00\xffbytes" and path.stat().st_size == 7
    assert names(path.parent.iterdir()) == ["metadata.json"]  # no temp file beside it


def test_a_reader_sees_a_file_whole_or_not_at_all(root):
    path = root / "shard.jsonl"
    versions = [bytes([ord("a") + i]) * (3 * MiB) for i in range(2)]
    stop = threading.Event()
    seen: list[bytes | None] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(path.read_bytes())
            except FileNotFoundError:
                seen.append(None)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            write_atomic(path, versions[i % 2])
    finally:
        stop.set()
        reader.join()
    whole = [data for data in seen if data is not None]
    assert whole, "the reader never saw the file"
    assert all(data in versions for data in whole), sorted({len(d) for d in whole})


def test_a_failed_staged_write_keeps_the_old_file_and_leaves_nothing_else(root):
    path = root / "result.jsonl"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with staged(path) as tmp:
            tmp.write_bytes(b"half of a new resu")
            raise RuntimeError("the writer died")
    assert path.read_text() == "old\n"
    assert names(root.iterdir()) == ["result.jsonl"]
    with staged(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n"


def test_a_failed_result_write_leaves_no_result(root):
    def records():
        yield {"row_index": 0}
        raise RuntimeError("a shard could not be read")

    with pytest.raises(RuntimeError):
        write_result(records(), root / "result.jsonl", "jsonl")
    assert not (root / "result.jsonl").exists()
    assert write_result([{"row_index": 0, "text": "a\u2028b"}], root / "result.jsonl", "jsonl") == 1
    assert list(read_jsonl(root / "result.jsonl")) == [{"row_index": 0, "text": "a\u2028b"}]


def test_listing_and_removal(root):
    for name in ("checkpoints/step-000001.json", "checkpoints/step-000002.json", "checkpoints/old/x.json", "other.txt"):
        write_atomic(root / name, name)
    checkpoints = root / "checkpoints"
    assert [p.name for p in checkpoints.glob("step-*.json")] == ["step-000001.json", "step-000002.json"]
    assert [p.stem for p in checkpoints.glob("step-*.json")] == ["step-000001", "step-000002"]
    assert names(checkpoints.iterdir()) == ["old", "step-000001.json", "step-000002.json"]
    (checkpoints / "step-000001.json").unlink()
    (checkpoints / "step-000001.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (checkpoints / "step-000001.json").unlink()
    remove(checkpoints / "old")
    remove(checkpoints / "never-there")
    assert names(checkpoints.iterdir()) == ["step-000002.json"]
    remove(checkpoints)
    assert not checkpoints.exists() and not (checkpoints / "step-000002.json").exists()
    assert names(root.iterdir()) == ["other.txt"]


def test_a_large_file_is_read_as_a_stream(root, tmp_path):
    size = 48 * MiB
    block = hashlib.sha256(b"spider").digest() * (MiB // 32)
    path = root / "result.jsonl"
    with staged(path) as tmp:
        with open(tmp, "wb") as handle:
            for _ in range(size // MiB):
                handle.write(block)
    assert path.stat().st_size == size
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(MiB):
                digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == hashlib.sha256(block * (size // MiB)).hexdigest()
    # A bucket is read READ_BLOCK bytes at a time (the client copies a block a few times over):
    # what is held stays a few blocks, far below the file's size.
    assert peak < min(size / 2, 6 * READ_BLOCK), f"reading held {peak / MiB:.1f} MiB of a {size / MiB:.0f} MiB file"


def test_folders_are_published_and_fetched_whole(root, tmp_path):
    local = tmp_path / "trainer" / "state" / "step-000002"
    (local / "weights").mkdir(parents=True)
    (local / "weights" / "adapter.safetensors").write_bytes(os.urandom(2048))
    (local / "trainer_state.pt").write_bytes(b"state")
    stored = root / "train" / "trainer" / "state" / "step-000002"
    publish(local, stored)
    assert names(stored.iterdir()) == ["trainer_state.pt", "weights"]
    elsewhere = tmp_path / "other-machine" / "step-000002"
    got = fetch(stored, elsewhere)
    if isinstance(root, StorePath):
        assert got == elsewhere
    else:
        assert got == stored  # the store is this disk: nothing is copied
    assert (got / "trainer_state.pt").read_bytes() == b"state"
    assert (got / "weights" / "adapter.safetensors").read_bytes() == (local / "weights" / "adapter.safetensors").read_bytes()
    assert [p.name for p in got.parent.iterdir()] == ["step-000002"]  # no temp folder left


def test_job_files_on_disk_are_their_own_local_copies(tmp_path):
    settings = Settings(data_dir=tmp_path)
    files = JobFiles.of(settings, uuid.uuid4().hex[:16])
    assert files.root == tmp_path / "jobs" / files.root.name and files.local is files and not files.is_remote
    write_atomic(files.train_rows, "{}")
    files.drop_local(files.local.root)  # the copies are the artifacts here: nothing is removed
    assert files.train_rows.read_text() == "{}"
    assert files.datasets_cache == files.root / "datasets-cache"


def test_job_files_in_a_bucket_keep_local_copies_apart(s3, tmp_path):
    settings = bucket_settings(s3, tmp_path)
    job_id = uuid.uuid4().hex[:16]
    files = JobFiles.of(settings, job_id)
    assert isinstance(files.root, StorePath) and str(files.root) == f"{settings.data_url}/jobs/{job_id}"
    assert files.is_remote and files.local.root == tmp_path / "jobs" / job_id
    assert files.datasets_cache == files.local.root / "datasets-cache"
    write_atomic(files.source_dir / "rows.jsonl", '{"q": 1}\n')
    local = fetch(files.source_dir, files.local.source_dir)
    assert (local / "rows.jsonl").read_text() == '{"q": 1}\n'
    files.drop_local(files.local.source_dir)
    assert not files.local.root.exists()  # the job's local folder goes with its last copy
    assert (files.source_dir / "rows.jsonl").exists()
    bucket = settings.data_url.split("/")[2]
    assert s3.keys(bucket) == [f"spider/jobs/{job_id}/source/rows.jsonl"]


def test_a_data_url_that_is_not_a_bucket_is_refused(tmp_path):
    for url in ("gs://bucket/x", "s3://", "/srv/data"):
        with pytest.raises(SpiderError, match="s3://bucket/prefix"):
            artifact_root(Settings(data_dir=tmp_path, data_url=url))
