"""Attacks on the HTTP API by a key holder, through the real stack: oversized bodies, forged job
ids, malformed input, submits that fail half-way, server paths in answers, admission."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import unicodedata
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import redis

from spider.bundle import BUNDLE_FORMAT, BUNDLE_MAGIC
from spider.jobs.store import JobFiles, JobStore
from spider.local import free_port, terminate, wait_http
from tests.conftest import API_KEYS
from tests.helpers import SAMPLE_PROMPTS, eventually, make_config

pytestmark = pytest.mark.slow
ALICE, BOB = API_KEYS
AUTH = {"Authorization": f"Bearer {ALICE}"}
# A model that admission accepts and that no worker can load (offline): such jobs fail fast.
NO_MODEL = "no-such-org/no-such-model"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def job_body(model: str | Path = NO_MODEL, **overrides: Any) -> dict[str, Any]:
    return make_config(None, None, model, **overrides).job.model_dump(mode="json")


def submission(**extra: Any) -> dict[str, Any]:
    """A valid submit body: a job whose source is an uploaded copy of the sample prompts."""
    return {"job": job_body(), "source_files": {"prompts.jsonl": b64(SAMPLE_PROMPTS.read_bytes())}, **extra}


def admin(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


def job_ids_in_redis(stack) -> set[str]:
    """The ids of every job that has a key: record, secrets, counters or events."""
    r = admin(stack)
    keys = list(r.scan_iter("spider:job:*")) + list(r.scan_iter("spider:events:*"))
    return {key.split(":")[2] for key in keys}


def job_dirs(stack) -> set[str]:
    root = Path(stack.data_dir) / "jobs"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def alice_jobs(stack) -> list[str]:
    return admin(stack).zrange(f"spider:jobs:{hashlib.sha256(ALICE.encode()).hexdigest()[:24]}", 0, -1)


@contextmanager
def nothing_stored(stack) -> Iterator[None]:
    """Asserts that the block leaves no job behind: no record, secrets, events, owner index entry
    or files."""
    ids, dirs, owned = job_ids_in_redis(stack), job_dirs(stack), alice_jobs(stack)
    yield
    assert job_ids_in_redis(stack) - ids == set()
    assert job_dirs(stack) - dirs == set()
    assert alice_jobs(stack) == owned


@contextmanager
def api_server(stack, tmp_path: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A second API process on the stack's Redis and data dir, with settings of its own."""
    port = free_port()
    full = {
        **os.environ,
        "SPIDER_REDIS_URL": stack.redis_url,
        "SPIDER_DATA_DIR": str(stack.data_dir),
        "SPIDER_API_KEYS": ",".join(API_KEYS),
        **env,
    }
    log = tmp_path / f"api-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spider", "serve", "--port", str(port)],
            env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def alive() -> None:
        if proc.poll() is not None:
            pytest.fail(f"the second API exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", alive, 90, "the second API")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        terminate([proc], grace=10)


def wait_ended(url: str, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH).json()
        if status["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


# -- 1. the body limit holds while the body arrives ------------------------------------------------

LIMIT = 1 << 20


def raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode())
    return sock


def read_answer(sock: socket.socket, timeout: float = 10) -> str:
    """Everything the server sends until it closes the connection (or stops for `timeout` s)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def test_declared_oversize_body_is_413_before_any_byte_is_read(stack, tmp_path):
    with api_server(stack, tmp_path, SPIDER_MAX_BUNDLE_BYTES=str(LIMIT)) as (url, _):
        port = urlsplit(url).port
        sock = raw_request(port, f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                                 f"Content-Type: application/json\r\nContent-Length: {300 << 20}\r\n\r\n")
        answer = read_answer(sock)  # the body is never sent: the answer must not wait for it
        assert answer.startswith("HTTP/1.1 413"), answer
        assert "SPIDER_MAX_BUNDLE_BYTES" in answer
        # Before authentication too: an anonymous caller cannot make the API read a large body.
        sock = raw_request(port, f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT + 1}\r\n\r\n")
        assert read_answer(sock).startswith("HTTP/1.1 413")


def test_streamed_oversize_body_is_cut_off_at_the_limit_without_growing_the_api(stack, tmp_path):
    with api_server(stack, tmp_path, SPIDER_MAX_BUNDLE_BYTES=str(LIMIT)) as (url, proc):
        port = urlsplit(url).port
        api = psutil.Process(proc.pid)
        before = api.memory_info().rss
        sock = raw_request(port, f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"[" * (1 << 20)
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        sent = 0
        while sent < 200 << 20:  # a 200 MiB body, unless the server stops it first
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            try:
                sock.sendall(frame)
            except OSError:
                break  # the server closed the connection
            sent += len(chunk)
        answer = read_answer(sock)
        assert answer.startswith("HTTP/1.1 413"), answer
        assert sent < 64 << 20
        assert api.memory_info().rss - before < 32 << 20
        # Under the limit, chunked or not, the body still arrives whole.
        small = json.dumps(submission()).encode()

        def pieces() -> Iterator[bytes]:
            for i in range(0, len(small), 1000):
                yield small[i : i + 1000]

        response = httpx.post(f"{url}/v1/jobs", content=pieces(), headers=AUTH)
        assert response.status_code == 201, response.text
        httpx.post(f"{url}/v1/jobs/{response.json()['job_id']}/cancel", headers=AUTH)


# -- 2. job ids are checked before they name anything ----------------------------------------------

FORGED_IDS = [
    "0123456789abcdef:secrets",
    "0123456789abcdef:progress",
    "fedcba9876543210x",
    "0123456789ABCDEF",
    "spider:job:0123456789abcdef",
    "..",
    "*",
]


def test_forged_job_ids_are_404_and_read_no_key(stack):
    owner = hashlib.sha256(ALICE.encode()).hexdigest()[:24]
    # The job's secrets hash is shaped like a record of Alice's, in case it were ever read as one.
    forged = {"id": "x", "owner": owner, "status": "completed", "created_at": "0", "config": "{}"}
    response = httpx.post(f"{stack.url}/v1/jobs", json=submission(env=forged), headers=AUTH)
    assert response.status_code == 201, response.text
    real = response.json()["job_id"]
    ids = FORGED_IDS + [f"{real}:secrets", f"{real}:progress", f"{real}:done", real + "0", real.upper()]
    paths = ["", "/cancel", "/events", "/result", "/metadata"]
    r = admin(stack)
    marker = f"end-{uuid.uuid4().hex}"
    with r.monitor() as monitor:
        for job_id in ids:
            for suffix in paths:
                method = httpx.post if suffix == "/cancel" else httpx.get
                answer = method(f"{stack.url}/v1/jobs/{job_id}{suffix}", headers=AUTH, params={"follow": "false"})
                assert answer.status_code == 404, (job_id, suffix, answer.status_code, answer.text)
        r.echo(marker)
        seen = []
        while marker not in (command := monitor.next_command()["command"]):
            seen.append(command)
    assert not [c for c in seen if "0123456789abcdef" in c.lower() or "fedcba9876543210" in c]
    store = JobStore(r)
    assert store.get(f"{real}:secrets") is None and store.status(f"{real}:secrets") is None
    with pytest.raises(ValueError):
        store.secrets(f"{real}:x")
    with pytest.raises(ValueError):
        JobFiles(stack.data_dir, "../" + real)
    httpx.post(f"{stack.url}/v1/jobs/{real}/cancel", headers=AUTH)


def test_malformed_event_ids_and_limits_are_4xx(stack):
    response = httpx.post(f"{stack.url}/v1/jobs", json=submission(), headers=AUTH)
    job_id = response.json()["job_id"]
    for after in ("garbage", "1-2-3", "(0", "-", "+", "1" * 30 + "-0"):
        answer = httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", headers=AUTH, params={"after": after, "follow": "false"})
        assert answer.status_code == 400, (after, answer.text)
        answer = httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", headers={**AUTH, "Last-Event-ID": after},
                           params={"follow": "false"})
        assert answer.status_code == 400, (after, answer.text)
    for limit in (0, -1, 10**6):
        assert httpx.get(f"{stack.url}/v1/jobs", headers=AUTH, params={"limit": limit}).status_code == 422
    httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers=AUTH)


# -- 3. malformed input is the caller's fault, never a 500 -----------------------------------------


def forged_bundle(drop: tuple[str, ...] = (), raw_header: bytes | None = None, **changes: Any) -> str:
    """A bundle with correct magic, sizes and sha256 sums around a header of our choosing."""
    sources, payload = b"{}", b"not a pickle"
    header = {
        "format": BUNDLE_FORMAT, "python": "3.11.7", "cloudpickle": "3.0.0", "pre_processor": None,
        "post_processor": None, "tools": [], "local_modules": [], "source_modules": [],
        "sources_bytes": len(sources), "sources_sha256": hashlib.sha256(sources).hexdigest(),
        "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
        **changes,
    }
    for key in drop:
        header.pop(key)
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return b64(BUNDLE_MAGIC + struct.pack(">I", len(encoded)) + encoded + sources + payload)


MALFORMED_BUNDLES = {
    "no python": forged_bundle(drop=("python",)),
    "python is a number": forged_bundle(python=3),
    "python is not a version": forged_bundle(python="three"),
    "no cloudpickle": forged_bundle(drop=("cloudpickle",)),
    "no pre_processor": forged_bundle(drop=("pre_processor",)),
    "pre_processor is a list": forged_bundle(pre_processor=["x"]),
    "tools is a string": forged_bundle(tools="abc"),
    "tools is a mapping": forged_bundle(tools={"a": 1}),
    "a tool is a number": forged_bundle(tools=[1]),
    "a tool has no name": forged_bundle(tools=[{"parameters": {}}]),
    "a tool's name is a number": forged_bundle(tools=[{"name": 5, "parameters": {}}]),
    "a tool's name is not a tool name": forged_bundle(tools=[{"name": "a b/../c", "parameters": {}}]),
    "a tool's parameters are a list": forged_bundle(tools=[{"name": "t", "parameters": []}]),
    "two tools, one name": forged_bundle(tools=[{"name": "t", "parameters": {}}] * 2),
    "local_modules is null": forged_bundle(local_modules=None),
    "source_modules holds numbers": forged_bundle(source_modules=[1, 2]),
    "negative section size": forged_bundle(sources_bytes=-1, payload_bytes=len(b"{}not a pickle") + 1),
    "deeply nested header": forged_bundle(raw_header=b"[" * 200_000),
    "header is not UTF-8": forged_bundle(raw_header=b"\xff\xfe{}"),
    "header is a list": forged_bundle(raw_header=b"[]"),
    "bad magic": b64(b"PICKLE" + b"\x00" * 40),
    "header longer than the bundle": b64(BUNDLE_MAGIC + struct.pack(">I", 2**32 - 1) + b"{}"),
}


def malformed_bodies() -> dict[str, bytes]:
    job = job_body()
    uploaded = {"prompts.jsonl": b64(SAMPLE_PROMPTS.read_bytes())}

    def body(**parts: Any) -> bytes:
        return json.dumps({"job": job, "source_files": uploaded, **parts}).encode()

    cases = {
        "deeply nested body": b"[" * 200_000,
        "deeply nested job": b'{"job": ' + b"[" * 200_000 + b"}",
        "not UTF-8": b'{"job": "\xff"}',
        "a list": b"[]",
        "job is a list": json.dumps({"job": []}).encode(),
        "job is a string": json.dumps({"job": "x"}).encode(),
        "job with a garbage model": json.dumps({"job": {**job, "model": [1, {"a": None}]}}).encode(),
        "env is a list": body(env=["A"]),
        "env value is a number": body(env={"A": 1}),
        "env name is not a variable name": body(env={"A B=C": "x"}),
        "env value holds NUL": body(env={"A": "x\x00y"}),
        "env value is not text": b'{"job": ' + json.dumps(job).encode() + b', "env": {"A": "\\ud800"}}',
        "source_files is a string": body(source_files="x"),
        "source_files value is a number": body(source_files={"a.jsonl": 5}),
        "source_files value is not base64": body(source_files={"a.jsonl": "***"}),
        "source file name is not text": b'{"job": ' + json.dumps(job).encode()
        + b', "source_files": {"\\ud800.jsonl": "eA=="}}',
        "bundle is a number": body(bundle=5),
        "bundle is not base64": body(bundle="***"),
    }
    cases.update({f"bundle: {name}": body(bundle=bundle) for name, bundle in MALFORMED_BUNDLES.items()})
    return cases


def test_every_malformed_submission_is_4xx_and_stores_nothing(stack):
    with nothing_stored(stack):
        for name, raw in malformed_bodies().items():
            response = httpx.post(f"{stack.url}/v1/jobs", content=raw, headers={**AUTH, "Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert "detail" in response.json(), name
        headers = {**AUTH, "Content-Length": "abc"}
        sock = raw_request(urlsplit(stack.url).port, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
                           + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n{}")
        assert read_answer(sock).startswith("HTTP/1.1 4")
    assert httpx.get(f"{stack.url}/healthz").status_code == 200


# -- 4. submit is all or nothing, and source file names are checked first -------------------------

NFC, NFD = unicodedata.normalize("NFC", "é.jsonl"), unicodedata.normalize("NFD", "é.jsonl")
BAD_NAME_SETS = {
    "absolute": ["/etc/passwd"],
    "parent": ["../x.jsonl"],
    "parent inside": ["a/../../x.jsonl"],
    "NUL": ["a\x00b.jsonl"],
    "control character": ["a\nb.jsonl"],
    "empty": [""],
    "only dots and slashes": ["./"],
    "backslash": ["a\\..\\b.jsonl"],
    "long part": ["x" * 300 + ".jsonl"],
    "long name": ["ab/" * 400 + "c.jsonl"],
    "duplicate after normalising": ["a.jsonl", "./a.jsonl"],
    "duplicate slashes": ["d/a.jsonl", "d//a.jsonl"],
    "duplicate by case": ["a.jsonl", "A.jsonl"],
    "duplicate by unicode form": [NFC, NFD],
    "file and folder": ["a", "a/b.jsonl"],
    "file and folder, other order": ["d/e/f.jsonl", "d/e"],
    "too many": [f"f{i}.jsonl" for i in range(1001)],
}


def test_bad_source_file_names_are_422_before_anything_is_written(stack):
    with nothing_stored(stack):
        for name, names in BAD_NAME_SETS.items():
            body = {"job": job_body(), "env": {"SECRET": "s3cret"}, "source_files": {n: b64(b"{}\n") for n in names}}
            response = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=AUTH)
            assert response.status_code == 422, (name, response.status_code, response.text)
            assert "source_files" in response.json()["detail"], name


def test_source_files_are_stored_under_normalised_names(stack):
    data = SAMPLE_PROMPTS.read_bytes()
    body = {"job": job_body(**{"source.dataset": "prompts"}), "source_files": {"./sub//a.jsonl": b64(data), "b.jsonl": b64(data)}}
    response = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    source_dir = JobFiles(stack.data_dir, job_id).source_dir
    assert json.loads(admin(stack).hget(f"spider:job:{job_id}", "source_upload")) == ["b.jsonl", "sub/a.jsonl"]
    assert (source_dir / "sub" / "a.jsonl").read_bytes() == data and (source_dir / "b.jsonl").read_bytes() == data
    httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers=AUTH)


def test_a_submit_that_cannot_queue_the_job_leaves_nothing(stack, tmp_path):
    # An API whose Redis user may touch Spider's own keys but not the task queue's: the job's
    # files, record and queued event are written, then queueing fails.
    r = admin(stack)
    password = uuid.uuid4().hex
    r.acl_setuser("no-queue", enabled=True, passwords=[f"+{password}"], keys=["spider:*"], channels=["spider:*"],
                  categories=["+@all"])
    parts = urlsplit(stack.redis_url)
    url = f"redis://no-queue:{password}@{parts.hostname}:{parts.port}/0"
    try:
        with api_server(stack, tmp_path, SPIDER_REDIS_URL=url) as (api, _), nothing_stored(stack):
            response = httpx.post(f"{api}/v1/jobs", json=submission(env={"SECRET": "s3cret"}), headers=AUTH, timeout=60)
            assert response.status_code == 503, response.text
            detail = response.json()["detail"]
            assert "queueing the job failed" in detail and "nothing was kept" in detail
            assert str(stack.data_dir) not in detail
    finally:
        r.acl_deluser("no-queue")


def test_a_submit_that_cannot_write_its_files_leaves_nothing(stack, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with api_server(stack, tmp_path, SPIDER_DATA_DIR=str(blocker / "data")) as (api, _), nothing_stored(stack):
        response = httpx.post(f"{api}/v1/jobs", json=submission(env={"SECRET": "s3cret"}), headers=AUTH)
        assert response.status_code == 500, response.text
        detail = response.json()["detail"]
        assert "storing the job's files failed" in detail and str(blocker) not in detail


# -- 5. no server path in any answer ---------------------------------------------------------------


def test_answers_never_show_the_data_dir_and_the_config_stays_as_submitted(stack, tiny_model):
    config = make_config(stack.url, ALICE, tiny_model)
    submitted = config.job.model_dump(mode="json")
    from spider.client import SpiderClient

    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        answers = [
            client.http.get(f"/v1/jobs/{job_id}").text,
            client.http.get("/v1/jobs").text,
            client.http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"}).text,
            client.http.get(f"/v1/jobs/{job_id}/metadata").text,
        ]
    assert status["status"] == "completed", status
    assert status["config"] == submitted
    assert status["config"]["source"]["dataset"] == str(SAMPLE_PROMPTS)
    for root in {str(stack.data_dir), str(Path(stack.data_dir).resolve())}:
        for answer in answers:
            assert root not in answer
    record = admin(stack).hgetall(f"spider:job:{job_id}")
    assert json.loads(record["source_upload"]) == ["prompts.jsonl"]
    assert json.loads(record["config"]) == submitted
    # The uploaded copy was read from the job's own folder, and removed with its other intermediates.
    source_dir = JobFiles(stack.data_dir, job_id).source_dir
    eventually(lambda: not source_dir.exists())
    assert not source_dir.exists()


# -- 6. admission at submit -------------------------------------------------------------------------


def test_admission_refusal_is_422_with_its_message_and_stores_nothing(stack):
    body = submission(env={"SECRET": "s3cret"})
    body["job"]["runtime"]["limits"]["memory_mb"] = 10**7
    with nothing_stored(stack):
        response = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "job.runtime.limits.memory_mb" in response.json()["detail"]
    # A local path the client did not upload is a server path: refused too.
    body = {"job": job_body(**{"source.dataset": "/etc"})}
    with nothing_stored(stack):
        response = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 422 and "source.dataset" in response.json()["detail"], response.text


def test_a_failed_jobs_error_does_not_show_the_data_dir(stack, tiny_model):
    """A source the server cannot read fails the job; its error names the file as the user sent it."""
    body = {"job": job_body(tiny_model, **{"source.dataset": "broken.jsonl"}),
            "source_files": {"broken.jsonl": b64(b'{"question": "ok"}\n{not json\n')}}
    response = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    status = wait_ended(stack.url, job_id)
    assert status["status"] == "failed", status
    assert "'broken.jsonl'" in status["error"]  # the file by the name it was sent with
    answers = [
        httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=AUTH).text,
        httpx.get(f"{stack.url}/v1/jobs", headers=AUTH).text,
        httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", headers=AUTH, params={"follow": "false"}).text,
    ]
    for root in {str(stack.data_dir), str(Path(stack.data_dir).resolve())}:
        for answer in answers:
            assert root not in answer, answer
