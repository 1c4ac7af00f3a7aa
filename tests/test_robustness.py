"""Faults that used to surface as internal errors: a damaged job record in Redis (the owner's list
and the job itself still answer clearly) and a source file of a type no builder reads (the plan
fails the job with a message naming the suffix). Real Redis, the real API app, real stages."""

from __future__ import annotations

import json

import pytest
import redis
from starlette.testclient import TestClient

from spider.api.app import create_app, owner_of
from spider.config import JobConfig, SourceConfig
from spider.data.sources import LOCAL_BUILDERS, load_source_rows
from spider.errors import SourceError
from spider.events import EventBus
from spider.jobs import dataset
from spider.jobs.stages import Context
from spider.jobs.store import DamagedRecord, JobStore
from spider.policy import Policy
from spider.settings import Settings
from spider.types import JobStatus
from tests.helpers import SAMPLE_PROMPTS, Recorder

KEY, OTHER = "key-robust", "key-robust-other"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("robustness")
    (root / "roots").mkdir()
    return Settings(redis_url=redis_url, data_dir=root / "data", api_keys=(KEY, OTHER),
                    policy=Policy(data_roots=((root / "roots").resolve(),)))


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    with TestClient(create_app(settings), raise_server_exceptions=False) as running:
        yield running


@pytest.fixture
def store(settings) -> JobStore:
    return JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))


def a_config() -> dict:
    return JobConfig.parse({
        "model": {"provider": "hf", "name": "no-such-org/no-such-model"},
        "source": {"dataset": str(SAMPLE_PROMPTS), "field": "question"},
    }).model_dump(mode="json")


# (what is damaged, how to damage the record hash, what the error must say)
DAMAGES = [
    ("a missing field", lambda r, key: r.hdel(key, "config"), "its field 'config' is missing"),
    ("config not JSON", lambda r, key: r.hset(key, "config", "{not json"), "a field that holds JSON does not"),
    ("an unknown status", lambda r, key: r.hset(key, "status", "exploded"), "'exploded' is not a valid JobStatus"),
    ("a bad timestamp", lambda r, key: r.hset(key, "created_at", "yesterday"), "ValueError"),
]


@pytest.mark.parametrize("what,damage,why", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_record_is_skipped_in_the_list_and_answers_a_clear_error(client, store, what, damage, why):
    owner = owner_of(KEY)
    before = store.create(owner, a_config(), {}, has_bundle=False).id
    damaged = store.create(owner, a_config(), {}, has_bundle=False).id
    after = store.create(owner, a_config(), {}, has_bundle=False).id
    damage(store.r, store.keys.job(damaged))
    with pytest.raises(DamagedRecord, match=why):
        store.get(damaged)

    listed = client.get("/v1/jobs", headers=AUTH)
    assert listed.status_code == 200, listed.text
    ids = [job["job_id"] for job in listed.json()["jobs"]]
    assert before in ids and after in ids and damaged not in ids
    # It stays indexed: it was not an expired record, and GET of it keeps saying what is wrong.
    assert store.r.zscore(store.keys.owner_jobs(owner), damaged) is not None

    one = client.get(f"/v1/jobs/{damaged}", headers=AUTH)
    assert one.status_code == 409, one.text
    assert one.json()["detail"].startswith(f"the stored record of job {damaged} is damaged (")
    assert why in one.json()["detail"]
    # Another key learns nothing about it.
    stranger = client.get(f"/v1/jobs/{damaged}", headers={"Authorization": f"Bearer {OTHER}"})
    assert stranger.status_code == 404


def test_a_record_without_an_owner_is_no_ones(client, store):
    job_id = store.create(owner_of(KEY), a_config(), {}, has_bundle=False).id
    store.r.hdel(store.keys.job(job_id), "owner")
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    assert client.get("/v1/jobs", headers=AUTH).status_code == 200


# -- a source file no builder reads -------------------------------------------------------------


def test_an_unknown_file_suffix_is_a_source_error_naming_it(tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text('{"question": "hi"}\n')
    with pytest.raises(SourceError) as caught:
        load_source_rows(SourceConfig(dataset=str(rows), field="question"))
    message = str(caught.value)
    assert "'.txt'" in message
    assert all(suffix in message for suffix in LOCAL_BUILDERS)
    bare = tmp_path / "rows"
    bare.write_text('{"question": "hi"}\n')
    with pytest.raises(SourceError, match=r"'\(no suffix\)'"):
        load_source_rows(SourceConfig(dataset=str(bare), field="question"))


def test_the_plan_of_a_source_of_unknown_type_fails_the_job_with_that_message(settings, store):
    """The file appeared after submit (where its type is checked first): the plan stage meets it."""
    rows = settings.policy.data_roots[0] / "late.txt"
    rows.write_text('{"question": "hi"}\n')
    config = a_config()
    config["source"]["dataset"] = str(rows)
    job_id = store.create("robust", config, {}, has_bundle=False).id
    ctx = Context(settings, store, EventBus(store.r), Recorder())
    dataset.plan_job(ctx, job_id)
    record = store.get(job_id)
    assert record.status == JobStatus.FAILED
    assert "does not read '.txt' files as a source" in record.error
    assert "internal error" not in record.error and "KeyError" not in record.error
    assert ctx.dispatcher.calls == []
    assert json.loads(store.r.hget(store.keys.job(job_id), "config"))["source"]["dataset"] == str(rows)
