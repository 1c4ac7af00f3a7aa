"""Nothing of a job is kept forever: an ended job's Redis state expires, a completed job's
intermediate files go, a failed result write leaves no temp file, and `spider jobs delete` (the
API's DELETE) removes a job outright. Real Redis, real tiny models, a real API server on a port."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from spider.api.app import create_app, owner_of
from spider.cli import main as cli
from spider.client import SpiderClient
from spider.config import JobConfig
from spider.data.sinks import write_result
from spider.errors import JobNotFoundError
from spider.events import EventBus
from spider.jobs import dataset, on_policy
from spider.jobs.stages import Context, cancel_job
from spider.jobs.store import JOB_PARTS, JobStore
from spider.policy import Policy
from spider.settings import Settings
from spider.types import EventKind, JobStatus
from tests.helpers import Recorder, SAMPLE_PROMPTS

TTL = 3600


@pytest.fixture
def ctx(redis_url, tmp_path, model_dirs):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    policy = Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),), model_dirs=(model_dirs,))
    return Context(Settings(redis_url=redis_url, data_dir=tmp_path, policy=policy),
                   JobStore(client, ended_ttl=TTL), EventBus(client), Recorder())


def dataset_job(tiny_model, **output):
    return JobConfig.parse({
        "model": {"provider": "hf", "name": str(tiny_model)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:5]", "field": "question"},
        "generation": {"parameters": {"max_tokens": 4, "seed": 1}, "max_batch_size": 2},
        "output": {"mode": "return", **output},
    }).model_dump(mode="json")


def submit_uploaded(ctx, config, owner="alice"):
    """A job whose source was uploaded with it, stored as the API stores it."""
    record = ctx.store.create(owner, {**config, "source": {**config["source"], "dataset": "prompts"}}, {},
                              has_bundle=False)
    files = ctx.files(record.id)
    files.source_dir.mkdir(parents=True)
    (files.source_dir / "prompts.jsonl").write_bytes(SAMPLE_PROMPTS.read_bytes())
    ctx.store.set_fields(record.id, source_upload=json.dumps(["prompts.jsonl"]))
    return record.id


def run_until_finalize(ctx, job_id):
    dataset.plan_job(ctx, job_id)
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        if stage == dataset.ROLLOUT:
            dataset.run_batch(ctx, *args)
        elif stage == dataset.FINALIZE:
            return
    raise AssertionError("the job was never finalized")


def job_keys(store, job_id):
    return [store.keys.job(job_id, part) for part in JOB_PARTS] + [store.keys.events(job_id)]


def ttls(store, job_id):
    """The time to live of each of the job's keys that exists (-1: none)."""
    return {key: store.r.ttl(key) for key in job_keys(store, job_id) if store.r.exists(key)}


# -- Redis state --------------------------------------------------------------------------------


def test_an_ended_jobs_keys_and_events_expire_and_a_running_ones_do_not(ctx, tiny_model):
    config = dataset_job(tiny_model)
    completed = ctx.store.create("alice", config, {"HF_TOKEN": "t"}, has_bundle=False).id
    run_until_finalize(ctx, completed)
    ctx.store.claim_finalize(completed)
    ctx.store.r.set(ctx.store.keys.job(completed, "train-lease"), "someone")
    running = ttls(ctx.store, completed)
    assert set(running) == set(job_keys(ctx.store, completed)) and set(running.values()) == {-1}

    dataset.finalize_job(ctx, completed)
    assert ctx.store.status(completed) == JobStatus.COMPLETED
    ended = ttls(ctx.store, completed)
    # The secrets are dropped at the end; everything else is still there, expiring.
    assert set(ended) == set(job_keys(ctx.store, completed)) - {ctx.store.keys.job(completed, "secrets")}
    assert all(0 < ttl <= TTL for ttl in ended.values()), ended

    cancelled = ctx.store.create("alice", config, {}, has_bundle=False).id
    ctx.bus.publish(cancelled, EventKind.JOB_QUEUED, "job queued")
    assert cancel_job(ctx, cancelled)
    assert ttls(ctx.store, cancelled) and all(0 < t <= TTL for t in ttls(ctx.store, cancelled).values())

    failed = ctx.store.create("alice", config, {}, has_bundle=False).id
    ctx.store.complete_batch(failed, 0, ctx.store.get(failed).totals)
    assert ctx.store.fail(failed, "it broke")
    # The record and what the batch wrote: the done set, its statistics, the counters.
    assert len(ttls(ctx.store, failed)) == 4 and all(0 < t <= TTL for t in ttls(ctx.store, failed).values())


def test_a_part_written_after_the_job_ended_expires_with_it(ctx, tiny_model):
    job_id = ctx.store.create("alice", dataset_job(tiny_model), {}, has_bundle=False).id
    assert cancel_job(ctx, job_id)
    # A batch that was already generating when the job was cancelled finishes now.
    ctx.store.complete_batch(job_id, 0, ctx.store.get(job_id).totals)
    for part in ("done", "batch-stats", "progress"):
        assert 0 < ctx.store.r.ttl(ctx.store.keys.job(job_id, part)) <= TTL


def test_an_expired_job_leaves_its_owners_index(ctx, tiny_model):
    quick = JobStore(ctx.store.r, ended_ttl=1)
    kept = quick.create("carol", dataset_job(tiny_model), {}, has_bundle=False).id
    ended = quick.create("carol", dataset_job(tiny_model), {}, has_bundle=False).id
    assert quick.transition(ended, JobStatus.CANCELLED, [JobStatus.QUEUED])
    assert ctx.store.r.zscore(ctx.store.keys.owner_jobs("carol"), ended) is not None
    time.sleep(1.2)
    assert [job.id for job in quick.list_for("carol")] == [kept]
    assert ctx.store.r.zrange(ctx.store.keys.owner_jobs("carol"), 0, -1) == [kept]
    quick.delete(kept, "carol")


def test_a_store_without_ttl_keeps_ended_jobs(ctx, tiny_model):
    forever = JobStore(ctx.store.r, ended_ttl=0)
    job_id = forever.create("alice", dataset_job(tiny_model), {}, has_bundle=False).id
    assert forever.transition(job_id, JobStatus.CANCELLED, [JobStatus.QUEUED])
    assert ctx.store.r.ttl(ctx.store.keys.job(job_id)) == -1
    forever.delete(job_id, "alice")


def test_the_ttls_come_from_the_environment_and_events_never_outlive_the_record(monkeypatch, redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    monkeypatch.delenv("SPIDER_EVENT_TTL_S", raising=False)
    monkeypatch.setenv("SPIDER_JOB_TTL_S", "120")
    settings = Settings.from_env()
    assert (settings.job_ttl_s, settings.event_ttl_s, JobStore(client).ended_ttl) == (120, 120, 120)
    monkeypatch.setenv("SPIDER_EVENT_TTL_S", "60")
    assert Settings.from_env().event_ttl_s == 60
    monkeypatch.setenv("SPIDER_EVENT_TTL_S", "999999")
    assert Settings.from_env().event_ttl_s == 120
    monkeypatch.delenv("SPIDER_JOB_TTL_S")
    assert JobStore(client).ended_ttl == Settings.from_env().job_ttl_s == 30 * 24 * 3600


# -- files --------------------------------------------------------------------------------------


def intermediate(files):
    return [name for name in ("inputs", "batches", "generated", "shards", "source", "datasets-cache")
            if (files.root / name).exists()]


def test_a_completed_job_keeps_its_result_and_metadata_only(ctx, tiny_model):
    job_id = submit_uploaded(ctx, dataset_job(tiny_model))
    run_until_finalize(ctx, job_id)
    files = ctx.files(job_id)
    assert intermediate(files) == ["batches", "shards", "source"]
    dataset.finalize_job(ctx, job_id)
    assert ctx.store.status(job_id) == JobStatus.COMPLETED
    assert sorted(p.name for p in files.root.iterdir()) == ["metadata.json", "result.jsonl"]
    assert len(files.result("jsonl").read_text().splitlines()) == 5
    dataset.finalize_job(ctx, job_id)  # a redelivered finalize
    assert len(files.result("jsonl").read_text().splitlines()) == 5


def test_keep_intermediate_keeps_them(ctx, tiny_model):
    job_id = submit_uploaded(ctx, dataset_job(tiny_model, keep_intermediate=True))
    run_until_finalize(ctx, job_id)
    dataset.finalize_job(ctx, job_id)
    assert ctx.store.status(job_id) == JobStatus.COMPLETED
    assert intermediate(ctx.files(job_id)) == ["batches", "shards", "source"]


def test_a_failed_finalize_leaves_no_temp_result_and_keeps_the_shards(ctx, tiny_model):
    job_id = submit_uploaded(ctx, dataset_job(tiny_model))
    run_until_finalize(ctx, job_id)
    files = ctx.files(job_id)
    with files.shard(2).open("a") as shard:
        shard.write("{not json\n")
    dataset.finalize_job(ctx, job_id)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.FAILED and "finalize_job" in record.error
    assert not list(files.root.glob(".result*")) and not files.result("jsonl").exists()
    assert intermediate(files) == ["batches", "shards", "source"]  # what a failed job ran on stays


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_write_result_removes_its_temp_file_when_the_records_fail(tmp_path, fmt):
    def records():
        yield {"a": 1}
        raise RuntimeError("the shard could not be read")

    with pytest.raises(RuntimeError):
        write_result(records(), tmp_path / f"result.{fmt}", fmt)
    assert list(tmp_path.iterdir()) == []
    assert write_result(iter([{"a": 1}]), tmp_path / f"result.{fmt}", fmt) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"result.{fmt}"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from spider.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)


def train(ctx, student, teacher, **output):
    config = JobConfig.parse({
        "model": {"provider": "hf", "name": str(student)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:8]", "field": "question"},
        "generation": {"on_policy": True, "on_policy_options": {
            "teacher": {"provider": "hf", "name": str(teacher)}, "groups_per_batch": 2, "group_size": 2,
            "max_tokens": 4, "lora_rank": 4, "seed": 3, "max_steps": 4, "steps_per_task": 2, "save_every": 2}},
        "output": {"mode": "return", **output},
    })
    job_id = ctx.store.create("alice", config.model_dump(mode="json"), {}, has_bundle=False).id
    on_policy.start_job(ctx, job_id)
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        if stage == on_policy.TRAIN:
            on_policy.train_segment(ctx, *args)
        elif stage == on_policy.FINALIZE:
            assert sorted(p.name for p in ctx.files(job_id).checkpoints.iterdir()) == [
                "step-000002.json", "step-000004.json"]
            on_policy.finalize_job(ctx, *args)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.COMPLETED, record.error
    return ctx.files(job_id)


def test_a_trained_job_keeps_its_adapter_and_last_checkpoint_only(ctx, tiny_model, teacher):
    files = train(ctx, tiny_model, teacher)
    assert sorted(p.name for p in files.checkpoints.iterdir()) == ["step-000004.json"]
    last = json.loads(files.latest_checkpoint.read_text())
    trainer = sorted(str(p.relative_to(files.trainer)) for p in files.trainer.iterdir())
    assert trainer == ["state"] and [p.name for p in (files.trainer / "state").iterdir()] == ["step-000004"]
    assert (files.trainer / "state" / "step-000004").resolve() == Path(last["state"]).resolve()
    assert files.adapter.is_dir() and files.archive.exists() and files.metrics.exists()
    assert intermediate(files) == []


def test_a_trained_job_with_keep_intermediate_keeps_its_checkpoints(ctx, tiny_model, teacher):
    files = train(ctx, tiny_model, teacher, keep_intermediate=True)
    assert sorted(p.name for p in files.checkpoints.iterdir()) == ["step-000002.json", "step-000004.json"]
    assert sorted(p.name for p in (files.trainer / "state").iterdir()) == ["step-000002", "step-000004"]
    assert (files.trainer / "sampler").exists()


# -- delete -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(redis_url, tmp_path):
    """The real API on a free port, with two users' keys."""
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, api_keys=("alice-key", "bob-key"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield url, Context(settings, JobStore(client), EventBus(client), Recorder())
    server.should_exit = True
    thread.join(timeout=10)


def stored_job(ctx, tiny_model, owner_key):
    job_id = submit_uploaded(ctx, dataset_job(tiny_model), owner=owner_of(owner_key))
    ctx.bus.publish(job_id, EventKind.JOB_QUEUED, "job queued")
    ctx.store.complete_batch(job_id, 0, ctx.store.get(job_id).totals)
    return job_id


def gone(ctx, job_id, owner_key):
    return (not any(ctx.store.r.exists(key) for key in job_keys(ctx.store, job_id))
            and ctx.store.r.zscore(ctx.store.keys.owner_jobs(owner_of(owner_key)), job_id) is None
            and not ctx.files(job_id).root.exists())


def test_deleting_a_running_job_cancels_it_then_removes_everything(api, tiny_model):
    url, ctx = api
    job_id = stored_job(ctx, tiny_model, "alice-key")
    assert ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED])
    live = ctx.store.r.pubsub()
    live.subscribe(ctx.store.keys.live(job_id))
    with SpiderClient(base_url=url, api_key="bob-key") as bob:
        with pytest.raises(JobNotFoundError):
            bob.delete_job(job_id)
    assert ctx.store.status(job_id) == JobStatus.RUNNING and ctx.files(job_id).source_dir.exists()

    with SpiderClient(base_url=url, api_key="alice-key") as alice:
        assert alice.delete_job(job_id) == {"job_id": job_id, "deleted": True}
        kinds, deadline = [], time.monotonic() + 2
        while time.monotonic() < deadline:  # None also comes for a swallowed subscribe confirmation
            message = live.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                kinds.append(json.loads(message["data"])["kind"])
        assert kinds == [EventKind.JOB_CANCELLED]
        assert gone(ctx, job_id, "alice-key")
        with pytest.raises(JobNotFoundError):
            alice.get_job_status(job_id)
        with pytest.raises(JobNotFoundError):
            alice.delete_job(job_id)
        assert alice.list_jobs() == []
    live.close()


def test_spider_jobs_delete_removes_a_completed_job(api, tiny_model, capsys):
    url, ctx = api
    job_id = stored_job(ctx, tiny_model, "alice-key")
    assert cancel_job(ctx, job_id)
    assert cli(["jobs", "delete", job_id, "--url", url, "--api-key", "bob-key"]) == 2
    assert "no job" in capsys.readouterr().err and ctx.store.get(job_id) is not None

    assert cli(["jobs", "delete", job_id, "--url", url, "--api-key", "alice-key"]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": job_id, "deleted": True}
    assert gone(ctx, job_id, "alice-key")
    response = httpx.delete(f"{url}/v1/jobs/not-a-job", headers={"Authorization": "Bearer alice-key"})
    assert response.status_code == 404
