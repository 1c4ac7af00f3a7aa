"""Operator ceilings (SPIDER_MAX_*) on what a job may ask for, through the real API: by default
today's bounds; lowered, a job above one is a 422 naming the field and the ceiling; raised (up to
the hard limit), a job above the default is accepted; a setting outside 1..hard limit stops the
server from starting. A source with more rows than SPIDER_MAX_ROWS fails its job when it loads."""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import subprocess
import sys

import httpx
import pytest
import redis

from spider.config import HARD_MAX_DUPLICATIONS, HARD_MAX_TOKENS, JobConfig, apply_override
from spider.events import EventBus
from spider.jobs import dataset
from spider.jobs.stages import Context
from spider.jobs.store import JobStore
from spider.local import start_redis
from spider.policy import JobCeilings, Policy
from spider.settings import Settings
from spider.types import JobStatus
from tests.helpers import ROOT, SAMPLE_PROMPTS, Recorder, api_process

KEY = "key-ceilings"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = {"provider": "hf", "name": "no-such-org/no-such-model"}
LOWERED = {
    "SPIDER_MAX_ROWS": "5",
    "SPIDER_MAX_DUPLICATIONS": "4",
    "SPIDER_MAX_TOKENS": "64",
    "SPIDER_MAX_BATCH_SIZE": "8",
    "SPIDER_MAX_CONCURRENT_CONVERSATIONS": "16",
    "SPIDER_MAX_TOOL_TURNS": "3",
    "SPIDER_MAX_USER_TURNS": "2",
}
# (dotted path under `job`, a value above the lowered ceiling, the variable the 422 names, the ceiling)
ABOVE = [
    ("source.max_examples", 6, "SPIDER_MAX_ROWS", 5),
    ("generation.duplications", 5, "SPIDER_MAX_DUPLICATIONS", 4),
    ("generation.parameters.max_tokens", 65, "SPIDER_MAX_TOKENS", 64),
    ("generation.user.parameters.max_tokens", 65, "SPIDER_MAX_TOKENS", 64),
    ("generation.max_batch_size", 9, "SPIDER_MAX_BATCH_SIZE", 8),
    ("generation.max_concurrent_conversations", 17, "SPIDER_MAX_CONCURRENT_CONVERSATIONS", 16),
    ("generation.max_tool_turns", 4, "SPIDER_MAX_TOOL_TURNS", 3),
    ("generation.user.max_turns", 3, "SPIDER_MAX_USER_TURNS", 2),
]


def job(**overrides) -> dict:
    body = {"model": dict(MODEL), "source": {"dataset": "prompts", "field": "question"},
            "generation": {"parameters": {"max_tokens": 16}, "max_batch_size": 4}}
    if any(key.startswith("generation.user.") for key in overrides):
        body["generation"]["user"] = {"model": dict(MODEL)}
    for key, value in overrides.items():
        apply_override(body, key, value)
    return body


def submit(url: str, body: dict) -> httpx.Response:
    files = {"prompts.jsonl": base64.b64encode(SAMPLE_PROMPTS.read_bytes()).decode()}
    return httpx.post(f"{url}/v1/jobs", json={"job": body, "source_files": files}, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("ceilings-redis"))
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def lowered(own_redis, tmp_path_factory):
    with _api(own_redis, tmp_path_factory, LOWERED) as url:
        yield url


@pytest.fixture(scope="module")
def defaults(own_redis, tmp_path_factory):
    with _api(own_redis, tmp_path_factory, {}) as url:
        yield url


@contextlib.contextmanager
def _api(redis_url: str, tmp_path_factory, settings: dict[str, str]):
    """The real API started with exactly these SPIDER_MAX_* settings; yields its URL."""
    root = tmp_path_factory.mktemp("ceilings-api")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("SPIDER_MAX_"):
                patch.delenv(name)
        for name, value in settings.items():
            patch.setenv(name, value)
        with api_process(redis_url, root / "data", root, KEY) as (url, _log):
            yield url


def test_a_job_within_the_lowered_ceilings_is_accepted(lowered):
    at = {path: value - 1 for path, value, _, _ in ABOVE}
    answer = submit(lowered, job(**at))
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize(("path", "value", "variable", "ceiling"), ABOVE, ids=[a[0] for a in ABOVE])
def test_a_job_above_a_lowered_ceiling_is_422_naming_the_field_and_the_ceiling(lowered, path, value, variable, ceiling):
    answer = submit(lowered, job(**{path: value}))
    assert answer.status_code == 422, answer.text
    lines = [line.strip() for line in answer.json()["detail"].splitlines()]
    assert f"job.{path}: {value} is above this server's ceiling of {ceiling} ({variable})" in lines


def test_every_problem_is_named_at_once(lowered):
    answer = submit(lowered, job(**{"generation.duplications": 5, "generation.max_batch_size": 9}))
    detail = answer.json()["detail"]
    assert answer.status_code == 422 and "SPIDER_MAX_DUPLICATIONS" in detail and "SPIDER_MAX_BATCH_SIZE" in detail


def test_the_default_ceilings_are_the_bounds_a_job_had_before(defaults):
    assert submit(defaults, job(**{"generation.duplications": 1024})).status_code == 201
    answer = submit(defaults, job(**{"generation.duplications": 1025}))
    assert answer.status_code == 422
    assert "job.generation.duplications: 1025 is above this server's ceiling of 1024 (SPIDER_MAX_DUPLICATIONS)" in \
        answer.json()["detail"]
    answer = submit(defaults, job(**{"generation.parameters.max_tokens": 1_000_001}))
    assert answer.status_code == 422 and "ceiling of 1000000 (SPIDER_MAX_TOKENS)" in answer.json()["detail"]
    # No rows ceiling unless the operator sets one.
    assert submit(defaults, job(**{"source.max_examples": 10**12})).status_code == 201


def test_an_operator_may_raise_a_ceiling_up_to_its_hard_limit(own_redis, tmp_path_factory):
    raised = {"SPIDER_MAX_DUPLICATIONS": str(HARD_MAX_DUPLICATIONS), "SPIDER_MAX_TOKENS": "2000000"}
    with _api(own_redis, tmp_path_factory, raised) as url:
        assert submit(url, job(**{"generation.duplications": 5000, "generation.parameters.max_tokens": 2_000_000})
                      ).status_code == 201
        # The hard limit is the schema's: no setting reaches past it.
        answer = submit(url, job(**{"generation.duplications": HARD_MAX_DUPLICATIONS + 1}))
        assert answer.status_code == 422 and "job.generation.duplications" in answer.json()["detail"]
        assert "less than or equal to 100000" in answer.json()["detail"]


@pytest.mark.parametrize("value", ["0", "-3", "lots", str(HARD_MAX_TOKENS + 1)])
def test_a_ceiling_outside_its_range_stops_the_server_from_starting(value):
    env = {**os.environ, "SPIDER_MAX_TOKENS": value}
    proc = subprocess.run([sys.executable, "-m", "spider", "serve", "--port", "1"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: SPIDER_MAX_TOKENS={value}") or \
        proc.stderr.startswith(f"error: SPIDER_MAX_TOKENS='{value}'"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_source_with_more_rows_than_the_ceiling_fails_its_job_when_it_loads(redis_url, tmp_path):
    """The rows of a source are known only once it loads (the plan stage, on a control worker)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    policy = Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),), job_ceilings=JobCeilings(rows=5))
    ctx = Context(Settings(redis_url=redis_url, data_dir=tmp_path, policy=policy), store, EventBus(client), Recorder())
    config = JobConfig.parse({"model": MODEL, "source": {"dataset": str(SAMPLE_PROMPTS), "field": "question"}})
    for split, streaming in (("train", False), ("train", True)):
        source = config.model_dump(mode="json")
        source["source"].update(split=split, streaming=streaming)
        job_id = store.create("ceilings", source, {}, has_bundle=False).id
        dataset.plan_job(ctx, job_id)
        record = store.get(job_id)
        assert record.status == JobStatus.FAILED, record
        assert "rows; this server takes at most 5 rows per job (SPIDER_MAX_ROWS)" in record.error
        assert ctx.dispatcher.calls == []
    # Within the ceiling, the same source plans.
    within = copy.deepcopy(config.model_dump(mode="json"))
    within["source"]["split"] = "train[0:5]"
    job_id = store.create("ceilings", within, {}, has_bundle=False).id
    dataset.plan_job(ctx, job_id)
    assert store.get(job_id).rows_total == 5
