"""Malformed and oversized input to the real API app (in process, on a throwaway Redis): every
fault is a 4xx that names the field's path, nothing is a 5xx, and a Redis that is down is a 503."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from spider.api.app import create_app, owner_of
from spider.api.submission import parse_submission
from spider.config import AppConfig, apply_override
from spider.errors import ConfigError
from spider.events import EventBus
from spider.jobs.store import JobStore
from spider.local import free_port
from spider.policy import Policy
from spider.settings import Settings
from spider.types import EventKind
from tests.helpers import SAMPLE_PROMPTS, make_config

KEY = "key-bad-input"
AUTH = {"Authorization": f"Bearer {KEY}"}


def job_body(**overrides: Any) -> dict[str, Any]:
    return make_config(None, None, "no-such-org/no-such-model", **overrides).job.model_dump(mode="json")


def submit_body(job: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A valid submit body: its source is an uploaded copy of the sample prompts."""
    prompts = base64.b64encode(SAMPLE_PROMPTS.read_bytes()).decode()
    return {"job": job if job is not None else job_body(), "source_files": {"prompts.jsonl": prompts}, **extra}


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "roots").mkdir()
    return Settings(
        redis_url=redis_url, data_dir=root / "data", api_keys=(KEY,), policy=Policy(data_roots=((root / "roots").resolve(),))
    )


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    with TestClient(create_app(settings), raise_server_exceptions=False) as running:
        yield running


def post_job(client: TestClient, body: Any) -> Any:
    raw = body if isinstance(body, str) else json.dumps(body)
    return client.post("/v1/jobs", content=raw, headers={**AUTH, "Content-Type": "application/json"})


def test_the_base_submission_is_valid(settings):
    """Every refusal below differs from this accepted body only in its bad field."""
    submission = parse_submission(json.dumps(submit_body()).encode(), settings)
    assert submission.job.generation.duplications == 1


def test_a_lone_surrogate_is_refused_with_its_path(client):
    job = job_body()
    job["generation"]["system_prompt"] = "you are \ud800 helpful"
    answer = post_job(client, submit_body(job))
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("job.generation.system_prompt: not valid Unicode text")
    job = job_body()
    job["source"]["options"] = {"bad\udfffkey": 1}
    answer = post_job(client, submit_body(job))
    assert answer.status_code == 422 and answer.json()["detail"].startswith("job.source.options: a key is not valid")
    answer = post_job(client, submit_body(env={"TOKEN": "\ud83d"}))
    assert answer.status_code == 422 and answer.json()["detail"].startswith("env.TOKEN: not valid Unicode text")


def test_a_stored_record_with_a_lone_surrogate_still_lists(client, settings):
    """A record written before submits were checked: the owner's list and the job itself still
    answer, the bad character shown as U+FFFD."""
    store = JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))
    config = job_body()
    config["generation"]["system_prompt"] = "before \ud800 after"
    record = store.create(owner_of(KEY), config, {}, has_bundle=False)
    listed = client.get("/v1/jobs", headers=AUTH)
    assert listed.status_code == 200, listed.text
    shown = {job["job_id"]: job for job in listed.json()["jobs"]}[record.id]
    assert shown["config"]["generation"]["system_prompt"] == "before \ufffd after"
    one = client.get(f"/v1/jobs/{record.id}", headers=AUTH)
    assert one.status_code == 200 and one.json()["config"]["generation"]["system_prompt"] == "before \ufffd after"


def test_deep_nesting_is_refused_before_it_is_parsed_or_stored(client):
    deep = "[" * 100_000 + "]" * 100_000
    answer = post_job(client, '{"job": ' + deep + "}")
    assert answer.status_code == 422 and "nests deeper than" in answer.json()["detail"]
    for depth in (70, 900, 100_000):
        nested = "[" * depth + "1" + "]" * depth
        raw = json.dumps(submit_body()).replace('"pre_kwargs": {}', '"pre_kwargs": {"x": ' + nested + "}", 1)
        answer = post_job(client, raw)
        assert answer.status_code == 422, (depth, answer.text[:300])
        detail = answer.json()["detail"]
        assert "deeper than" in detail
        if depth < 1000:  # what json itself can read: the path of the fault is named
            assert detail.startswith("job.processors.pre_kwargs.x[0][0]")
    # Within the body's bound but past a free-form value's: refused by the config, by path.
    nested = "[" * 40 + "1" + "]" * 40
    raw = json.dumps(submit_body()).replace('"options": {}', '"options": {"x": ' + nested + "}", 1)
    answer = post_job(client, raw)
    assert answer.status_code == 422 and "job.source.options: Value error, x[0]" in answer.json()["detail"]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", str(10**30), "abc", "1e3", "", "NaN"])
def test_a_list_limit_out_of_range_is_422(client, limit):
    answer = client.get("/v1/jobs", params={"limit": limit}, headers=AUTH)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["query", "limit"]


def test_an_unknown_source_file_type_is_refused_at_submit(client, settings):
    body = submit_body()
    body["source_files"] = {"prompts.txt": body["source_files"]["prompts.jsonl"]}
    answer = post_job(client, body)
    assert answer.status_code == 422 and answer.json()["detail"].startswith("source_files: 'prompts.txt' is not a file type")
    # A file in the operator's data roots whose type no builder reads.
    rows = settings.policy.data_roots[0] / "rows.txt"
    rows.write_text('{"question": "hi"}\n')
    answer = post_job(client, {"job": job_body(**{"source.dataset": str(rows)})})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("job.source.dataset:")
    assert "not a file type" in answer.json()["detail"]


# (dotted path under `job`, a value past its bound, the path the 422 must name)
OVER_BOUNDS = [
    ("generation.duplications", 2**63, "job.generation.duplications"),
    ("generation.duplications", 1025, "job.generation.duplications"),
    ("generation.parameters.max_tokens", 10**30, "job.generation.parameters.max_tokens"),
    ("generation.max_batch_size", 10**30, "job.generation.max_batch_size"),
    ("generation.parameters.stop", ["x"] * 100_000, "job.generation.parameters.stop"),
    ("generation.parameters.stop", ["x" * 1001], "job.generation.parameters.stop.0"),
    ("generation.system_prompt", "x" * 10_000_000, "job.generation.system_prompt"),
    ("generation.system_prompt", ["x"] * 1025, "job.generation.system_prompt"),
    ("generation.parameters.seed", 2**64, "job.generation.parameters.seed"),
    ("generation.max_row_errors", 2**64, "job.generation.max_row_errors"),
    ("runtime.env", {"BIG": "x" * (64 * 1024 + 1)}, "job.runtime.env.BIG"),
    ("runtime.env", {f"V{i}": "x" for i in range(257)}, "job.runtime.env"),
    ("runtime.packages", ["numpy"] * 1025, "job.runtime.packages"),
    ("source.max_examples", 2**63, "job.source.max_examples"),
    ("source.field", "x" * 1001, "job.source.field"),
    ("model.name", "x" * 1001, "job.model.name"),
    ("output.hf", {"repo_id": "x" * 1001}, "job.output.hf.repo_id"),
    ("source.options", {f"k{i}": i for i in range(10_001)}, "job.source.options"),
]


@pytest.mark.parametrize(("dotted", "value", "path"), OVER_BOUNDS, ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(OVER_BOUNDS)])
def test_a_value_past_its_bound_is_422_naming_its_path(client, dotted, value, path):
    job = job_body()
    apply_override(job, dotted, value)
    answer = post_job(client, submit_body(job))
    assert answer.status_code == 422, answer.text[:300]
    lines = answer.json()["detail"].splitlines()
    assert any(line.strip().startswith(f"{path}:") for line in lines), lines[:5]


AT_BOUNDS = [
    ("generation.duplications", 1024),
    ("generation.max_batch_size", 100_000),
    ("generation.parameters.max_tokens", 1_000_000),
    ("generation.parameters.stop", ["x" * 1000] * 64),
    ("generation.system_prompt", ["x" * 1_000_000]),
    ("runtime.env", {"BIG": "x" * (64 * 1024)}),
]


@pytest.mark.parametrize(("dotted", "value"), AT_BOUNDS, ids=[d for d, _ in AT_BOUNDS])
def test_a_value_at_its_bound_is_accepted(settings, dotted, value):
    job = job_body()
    apply_override(job, dotted, value)
    submission = parse_submission(json.dumps(submit_body(job)).encode(), settings)
    assert submission.job.model_dump(mode="json") is not None


def test_request_env_is_bounded(client):
    answer = post_job(client, submit_body(env={"TOKEN": "x" * (64 * 1024 + 1)}))
    assert answer.status_code == 422 and answer.json()["detail"].startswith("env.TOKEN:")
    answer = post_job(client, submit_body(env={f"V{i}": "x" for i in range(257)}))
    assert answer.status_code == 422 and "more than the limit of 256" in answer.json()["detail"]


def test_nan_and_infinity_are_refused(client):
    # Python's json reads NaN and Infinity; no setting means them.
    raw = json.dumps(submit_body()).replace('"temperature": 0.8', '"temperature": Infinity', 1)
    answer = post_job(client, raw)
    assert answer.status_code == 422 and "job.generation.parameters.temperature: Input should be a finite number" in answer.text


def test_a_yaml_config_is_bounded_by_the_same_schema(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "job:\n  model: {name: a/b}\n  source: {dataset: a/b}\n  generation:\n    duplications: 9223372036854775808\n"
    )
    with pytest.raises(ConfigError, match=r"job\.generation\.duplications: Input should be less than or equal to 100000"):
        AppConfig.load(path)


@pytest.fixture(scope="module")
def stored_job(client, settings) -> str:
    """A job of the caller's with two events."""
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(r)
    record = store.create(owner_of(KEY), job_body(), {}, has_bundle=False)
    bus = EventBus(r, keys=store.keys)
    bus.publish(record.id, EventKind.JOB_QUEUED, "queued")
    bus.publish(record.id, EventKind.JOB_QUEUED, "again")
    return record.id


@pytest.mark.parametrize("bad", ["99999999999999999999-0", "0-18446744073709551616", "garbage", "1" * 30 + "-0", "(0"])
@pytest.mark.parametrize("follow", ["false", "true"])
def test_a_bad_last_event_id_is_refused_before_streaming(client, stored_job, bad, follow):
    answer = client.get(f"/v1/jobs/{stored_job}/events", params={"follow": follow}, headers={**AUTH, "Last-Event-ID": bad})
    assert answer.status_code == 400, answer.text
    assert not answer.headers["content-type"].startswith("text/event-stream")
    answer = client.get(f"/v1/jobs/{stored_job}/events", params={"follow": follow, "after": bad}, headers=AUTH)
    assert answer.status_code == 400, answer.text


def test_a_good_last_event_id_resumes_after_it(client, stored_job):
    first = client.get(f"/v1/jobs/{stored_job}/events", params={"follow": "false"}, headers=AUTH)
    ids = [line[4:] for line in first.text.splitlines() if line.startswith("id: ")]
    assert len(ids) == 2
    rest = client.get(f"/v1/jobs/{stored_job}/events", params={"follow": "false"}, headers={**AUTH, "Last-Event-ID": ids[0]})
    assert rest.status_code == 200
    assert [line[4:] for line in rest.text.splitlines() if line.startswith("id: ")] == ids[1:]
    # The largest id Redis has is still an id: nothing after it.
    top = client.get(f"/v1/jobs/{stored_job}/events", params={"follow": "false"},
                     headers={**AUTH, "Last-Event-ID": f"{2**64 - 1}-{2**64 - 1}"})
    assert top.status_code == 200 and "id: " not in top.text


def test_every_endpoint_answers_503_while_redis_is_down(tmp_path):
    """The app pointed at a port nobody listens on: each route is a 503 saying the store is down."""
    down = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path / "data", api_keys=(KEY,))
    app = create_app(down)
    job_id = "0123456789abcdef"
    seen = []
    with TestClient(app, raise_server_exceptions=False) as dead:
        for route in app.routes:
            if not isinstance(route, APIRoute):
                continue
            path = route.path.replace("{job_id}", job_id)
            for method in route.methods:
                body = json.dumps(submit_body()) if method == "POST" and path == "/v1/jobs" else None
                answer = dead.request(method, path, content=body, headers=AUTH)
                seen.append((method, route.path))
                assert answer.status_code == 503, (method, path, answer.status_code, answer.text[:300])
                detail = answer.json().get("detail") or answer.json().get("redis")
                assert "unavailable" in detail or "Connection refused" in detail or "Error" in detail, detail
    assert ("GET", "/v1/jobs/{job_id}/events") in seen and ("POST", "/v1/jobs") in seen
    jobs = Path(down.data_dir) / "jobs"
    assert not jobs.exists() or not list(jobs.iterdir())  # the failed submit kept no files
