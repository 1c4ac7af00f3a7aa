"""The dataset pipeline's stages as plain functions (no broker): plan, generate, finalize, upload."""

from __future__ import annotations

import json

import pytest
import redis

from spider.config import JobConfig
from spider.events import EventBus
from spider.jobs import dataset
from spider.jobs.stages import Context, cancel_job
from spider.jobs.store import JobStore
from spider.keys import Keys
from spider.policy import Policy
from spider.settings import Settings
from spider.types import EventKind
from tests.helpers import Recorder, SAMPLE_PROMPTS


@pytest.fixture
def ctx(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # The sample prompts are read where they lie: the operator lets jobs read their folder.
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, policy=Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),)))
    return Context(settings, JobStore(client), EventBus(client), Recorder())


def job(tiny_model, **output):
    return JobConfig.parse({
        "model": {"provider": "hf", "name": str(tiny_model)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:5]", "field": "question"},
        "generation": {"parameters": {"max_tokens": 8, "seed": 1}, "max_batch_size": 2},
        "output": output or {"mode": "return"},
    })


def run_all(ctx, job_id):
    """Drive the recorded stages to the end, redelivering every rollout once (as a crash would)."""
    dataset.plan_job(ctx, job_id)
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        if stage == dataset.ROLLOUT:
            dataset.run_batch(ctx, *args)
            dataset.run_batch(ctx, *args)  # a redelivered task must not duplicate anything
        elif stage == dataset.FINALIZE:
            dataset.finalize_job(ctx, *args)


def test_stages_are_idempotent_and_finalize_once(ctx, tiny_model):
    config = job(tiny_model)
    record = ctx.store.create("owner", config.model_dump(mode="json"), {}, has_bundle=False)
    run_all(ctx, record.id)
    done = ctx.store.get(record.id)
    assert done.status == "completed"
    assert done.progress["rows_done"] == 5 and done.progress["batches_done"] == 3
    lines = (ctx.files(record.id).result("jsonl")).read_text().split("\n")[:-1]
    assert [json.loads(line)["row_index"] for line in lines] == [0, 1, 2, 3, 4]
    kinds = [e.kind for e in ctx.bus.replay(record.id)]
    assert kinds.count("batch.completed") == 3 and kinds.count("job.completed") == 1


def test_upload_hf_without_a_token_fails_clearly(ctx, tiny_model):
    config = job(tiny_model, mode="upload_hf", hf={"repo_id": "me/data"})
    record = ctx.store.create("owner", config.model_dump(mode="json"), {}, has_bundle=False)
    run_all(ctx, record.id)
    failed = ctx.store.get(record.id)
    assert failed.status == "failed"
    assert "no token was sent" in failed.error and "HF_TOKEN" in failed.error


def test_a_redelivered_plan_resumes_only_the_missing_batches(ctx, tiny_model):
    config = job(tiny_model)
    record = ctx.store.create("owner", config.model_dump(mode="json"), {}, has_bundle=False)
    dataset.plan_job(ctx, record.id)
    first = [c for c in ctx.dispatcher.calls if c[0] == dataset.ROLLOUT]
    assert [c[2] for c in first] == [0, 1, 2]
    dataset.run_batch(ctx, record.id, 1)
    ctx.dispatcher.calls.clear()
    dataset.plan_job(ctx, record.id)  # the control worker died before acknowledging the plan
    assert ctx.dispatcher.calls == [(dataset.ROLLOUT, record.id, 0), (dataset.ROLLOUT, record.id, 2)]
    assert ctx.bus.replay(record.id)[-1].kind == "job.resumed"
    run_all_dispatched(ctx)
    assert ctx.store.get(record.id).status == "completed"
    assert ctx.store.get(record.id).progress["rows_done"] == 5


def run_all_dispatched(ctx):
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        {dataset.ROLLOUT: dataset.run_batch, dataset.FINALIZE: dataset.finalize_job}[stage](ctx, *args)


def test_model_loading_is_reported_and_not_counted_as_generation(ctx, tiny_model, monkeypatch):
    """A slow model load (the tiny model's, delayed by LOAD_DELAY s) is reported once per worker,
    and each batch's generation time is the time its engine call took, nothing more."""
    import time

    import spider.engines

    LOAD_DELAY = 2.0
    real_load = spider.engines.load_engine
    calls: list[tuple[int, float]] = []  # (batch, seconds) of every engine call

    def slow_load(model, secrets=None):
        time.sleep(LOAD_DELAY)
        engine = real_load(model, secrets)
        agenerate = engine.agenerate

        async def timed(requests, params):
            started = time.perf_counter()
            try:
                return await agenerate(requests, params)
            finally:
                calls.append((int(requests[0].key) // 2, time.perf_counter() - started))

        monkeypatch.setattr(engine, "agenerate", timed)
        return engine

    spider.engines.close_engine()  # an engine left loaded by another test would not load again
    monkeypatch.setattr(spider.engines, "load_engine", slow_load)
    record = ctx.store.create("owner", job(tiny_model).model_dump(mode="json"), {}, has_bundle=False)
    run_all(ctx, record.id)
    spider.engines.close_engine()
    assert ctx.store.get(record.id).status == "completed"
    events = ctx.bus.replay(record.id)
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.MODEL_LOADING) == 1 and kinds.count(EventKind.MODEL_LOADED) == 1
    assert kinds.index(EventKind.MODEL_LOADING) < kinds.index(EventKind.MODEL_LOADED) < kinds.index(EventKind.BATCH_STARTED)
    loaded = next(e for e in events if e.kind == EventKind.MODEL_LOADED)
    assert loaded.data["seconds"] >= LOAD_DELAY and loaded.data["model"] == str(tiny_model)
    # Batches are counted from their first run (run_all runs each twice).
    first_run = {}
    for batch, seconds in calls:
        first_run.setdefault(batch, seconds)
    done = [e.data for e in events if e.kind == EventKind.BATCH_COMPLETED]
    cumulative = [0.0] + [d["generation_seconds"] for d in done]
    for d, before, after in zip(done, cumulative, cumulative[1:]):
        assert after - before == pytest.approx(first_run[d["batch"]], abs=0.05)
    last = done[-1]
    assert last["tokens_per_second_total"] == pytest.approx(last["completion_tokens"] / last["generation_seconds"])


def test_an_ended_jobs_event_history_expires(ctx, tiny_model):
    ttl = 3600
    bus = EventBus(ctx.store.r, ended_ttl=ttl)
    ctx = Context(ctx.settings, ctx.store, bus, ctx.dispatcher)
    keys = ctx.store.keys
    config = job(tiny_model).model_dump(mode="json")

    completed = ctx.store.create("owner", config, {}, has_bundle=False)
    dataset.plan_job(ctx, completed.id)
    assert ctx.store.r.ttl(keys.events(completed.id)) == -1  # a running job's history stays
    run_all_dispatched(ctx)
    assert ctx.store.get(completed.id).status == "completed"
    assert 0 < ctx.store.r.ttl(keys.events(completed.id)) <= ttl

    cancelled = ctx.store.create("owner", config, {}, has_bundle=False)
    bus.publish(cancelled.id, EventKind.JOB_QUEUED, "job queued")
    assert cancel_job(ctx, cancelled.id)
    assert 0 < ctx.store.r.ttl(keys.events(cancelled.id)) <= ttl

    failed = ctx.store.create("owner", {**config, "source": {**config["source"], "field": "nope"}}, {}, has_bundle=False)
    dataset.plan_job(ctx, failed.id)
    assert ctx.store.get(failed.id).status == "failed"
    assert 0 < ctx.store.r.ttl(keys.events(failed.id)) <= ttl


def test_every_key_of_a_job_has_the_stores_prefix(ctx, tiny_model):
    keys = Keys("spider-test-prefix")
    store = JobStore(ctx.store.r, keys)
    ctx = Context(ctx.settings, store, EventBus(ctx.store.r, keys=keys), ctx.dispatcher)
    record = store.create("prefixed-owner", job(tiny_model).model_dump(mode="json"), {"HF_TOKEN": "x"}, has_bundle=False)
    run_all(ctx, record.id)
    assert store.get(record.id).status == "completed"
    written = set(ctx.store.r.scan_iter(f"*{record.id}*")) | set(ctx.store.r.scan_iter("*prefixed-owner*"))
    assert written and all(key.startswith("spider-test-prefix:") for key in written), written
    assert [e.kind for e in ctx.bus.replay(record.id)][-1] == "job.completed"
