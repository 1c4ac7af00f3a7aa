"""The reconciler's and resume's decisions, stage by stage, on a real Redis and real job files:
what a still job lacks is handed out again, nothing is handed out while the broker holds some of
the job's work, a failed job comes back to running with its secrets, and job folders Redis no
longer knows are restored or removed. (tests/test_recovery.py runs the same on real processes.)"""

from __future__ import annotations

import json
import os
import time

import pytest
import redis

from spider.config import JobConfig
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset, on_policy, recovery
from spider.jobs.stages import Context
from spider.jobs.store import JobStore, write_atomic
from spider.policy import Policy
from spider.settings import Settings
from spider.types import BatchStats, EventKind, JobStatus
from tests.helpers import SAMPLE_PROMPTS, Recorder
from tests.test_retention import dataset_job, run_until_finalize, submit_uploaded


class Broker(Recorder):
    """Records what is handed out; `held` is the jobs the broker holds work of."""

    def __init__(self):
        super().__init__()
        self.held: set[str] = set()

    def holds(self, job_id):
        return job_id in self.held


@pytest.fixture
def ctx(redis_url, tmp_path, model_dirs):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    policy = Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),), model_dirs=(model_dirs,))
    return Context(Settings(redis_url=redis_url, data_dir=tmp_path, policy=policy),
                   JobStore(client, ended_ttl=3600), EventBus(client), Broker())


def planned(ctx, tiny_model):
    """A running job, planned (3 batches), none of them run; the stages plan dispatched are forgotten."""
    job_id = submit_uploaded(ctx, dataset_job(tiny_model))
    dataset.plan_job(ctx, job_id)
    ctx.dispatcher.calls.clear()
    return job_id


def test_a_still_job_gets_exactly_its_missing_batches_and_then_its_finalize(ctx, tiny_model):
    job_id = planned(ctx, tiny_model)
    assert ctx.store.get(job_id).batches_total == 3
    ctx.store.complete_batch(job_id, 1, BatchStats(rows_done=2, records=2))
    assert recovery.reconcile_job(ctx, job_id) == ["dataset.rollout(0)", "dataset.rollout(2)"]
    assert ctx.dispatcher.calls == [(dataset.ROLLOUT, job_id, 0), (dataset.ROLLOUT, job_id, 2)]
    assert ctx.bus.last(job_id).kind == EventKind.JOB_RESUMED
    # Every batch done, the finalize lost (claimed by a worker that died before enqueueing it).
    for i in (0, 2):
        ctx.store.complete_batch(job_id, i, BatchStats(rows_done=2, records=2))
    assert ctx.store.claim_finalize(job_id)
    ctx.dispatcher.calls.clear()
    assert recovery.reconcile_job(ctx, job_id) == [dataset.FINALIZE]


def test_nothing_is_handed_out_while_the_broker_holds_work_of_the_job(ctx, tiny_model):
    job_id = planned(ctx, tiny_model)
    ctx.dispatcher.held.add(job_id)
    before = ctx.store.r.zscore(ctx.store.keys.active_jobs(), job_id)
    time.sleep(0.01)
    assert recovery.reconcile_job(ctx, job_id) == []
    assert ctx.dispatcher.calls == []
    # Looked at: it is not looked at again until it has been still for a while.
    assert ctx.store.r.zscore(ctx.store.keys.active_jobs(), job_id) > before


def test_a_pass_looks_only_at_jobs_still_for_long_enough(ctx, tiny_model):
    still, moving = planned(ctx, tiny_model), planned(ctx, tiny_model)
    ctx.store.r.zadd(ctx.store.keys.active_jobs(), {still: time.time() - 600})
    handed = recovery.reconcile(ctx, still_for=300)
    # (The session's Redis holds other tests' jobs too: only these two are looked at here.)
    assert still in handed and moving not in handed
    assert any(call[1] == still for call in ctx.dispatcher.calls)
    assert not any(call[1] == moving for call in ctx.dispatcher.calls)
    assert moving in ctx.store.active_ids()


def test_a_queued_job_whose_plan_was_lost_is_planned_and_an_ended_one_leaves_the_index(ctx, tiny_model):
    job_id = submit_uploaded(ctx, dataset_job(tiny_model))
    assert recovery.reconcile_job(ctx, job_id) == [dataset.PLAN]
    ctx.store.fail(job_id, "it broke")
    assert job_id not in ctx.store.active_ids()
    ctx.store.touch(job_id, only_active=False)  # a stale entry, say
    assert recovery.reconcile_job(ctx, job_id) == []
    assert job_id not in ctx.store.active_ids()


def test_a_training_job_resumes_from_its_newest_checkpoint(ctx, tiny_model):
    config = JobConfig.parse({
        "model": {"provider": "hf", "name": str(tiny_model)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:12]", "field": "question"},
        "generation": {"on_policy": True, "on_policy_options": {
            "teacher": {"provider": "hf", "name": str(tiny_model)}, "groups_per_batch": 2, "group_size": 2}},
    })
    job_id = ctx.store.create("alice", config.model_dump(mode="json"), {}, has_bundle=False).id
    ctx.store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED])
    files = ctx.files(job_id)
    assert recovery.reconcile_job(ctx, job_id) == [on_policy.START]
    write_atomic(files.inputs(0), "[]")
    assert recovery.reconcile_job(ctx, job_id) == [on_policy.PREPARE]
    write_atomic(files.train_rows, json.dumps({"train": [], "eval": []}))
    assert recovery.reconcile_job(ctx, job_id) == ["on_policy.train(0)"]
    write_atomic(files.latest_checkpoint, json.dumps({"step": 4, "tokens_trained": 10}))
    assert recovery.reconcile_job(ctx, job_id) == ["on_policy.train(4)"]


def test_a_failed_job_resumes_with_its_secrets_and_recounted_counters(ctx, tiny_model):
    config = dataset_job(tiny_model)
    job_id = ctx.store.create("alice", config, {"HF_TOKEN": "hf_secret"}, has_bundle=False).id
    dataset.plan_job(ctx, job_id)
    ctx.dispatcher.calls.clear()
    ctx.store.complete_batch(job_id, 0, BatchStats(rows_done=2, records=2, completion_tokens=7))
    ctx.store.r.hset(ctx.store.keys.job(job_id, "progress"), "rows_done", 999)  # counters that drifted
    assert ctx.store.fail(job_id, "No space left on device")
    assert ctx.store.secrets(job_id) == {}
    with pytest.raises(SpiderError, match="needs its secrets again: HF_TOKEN"):
        recovery.resume(ctx, job_id)
    assert ctx.store.status(job_id) == JobStatus.FAILED
    handed = recovery.resume(ctx, job_id, {"HF_TOKEN": "hf_secret", "OTHER": "not one of its secrets"})
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.RUNNING and record.error is None
    assert ctx.store.secrets(job_id) == {"HF_TOKEN": "hf_secret"}
    assert record.progress["rows_done"] == 2 and record.progress["completion_tokens"] == 7
    assert handed == ["dataset.rollout(1)", "dataset.rollout(2)"]
    ctx.store.transition(job_id, JobStatus.CANCELLED, [JobStatus.RUNNING])
    with pytest.raises(SpiderError, match="is cancelled: there is nothing to resume"):
        recovery.resume(ctx, job_id)


def age(path, seconds):
    stamp = time.time() - seconds
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (stamp, stamp))


def test_the_sweep_restores_what_redis_lost_and_removes_what_expired(ctx, tiny_model, tmp_path):
    from spider.jobs.recovery import write_snapshot

    done_id = submit_uploaded(ctx, dataset_job(tiny_model))
    write_snapshot(ctx.files(done_id), ctx.store.get(done_id), ["prompts.jsonl"])
    run_until_finalize(ctx, done_id)
    dataset.finalize_job(ctx, done_id)
    lost_id = planned(ctx, tiny_model)
    write_snapshot(ctx.files(lost_id), ctx.store.get(lost_id), ["prompts.jsonl"])
    expired_id = planned(ctx, tiny_model)
    write_snapshot(ctx.files(expired_id), ctx.store.get(expired_id), ["prompts.jsonl"])
    young_id = planned(ctx, tiny_model)
    # Created (and never ended) longer ago than the store's time to live (3600 s).
    snapshot = ctx.files(expired_id).snapshot
    snapshot.write_text(json.dumps({**json.loads(snapshot.read_text()), "created_at": time.time() - 7200}))
    for job_id in (done_id, lost_id, expired_id):
        age(ctx.files(job_id).root, 120)
    ctx.store.r.flushdb()

    outcome = recovery.sweep_files(ctx, grace_s=60)
    assert outcome["removed"] == [expired_id] and set(outcome["restored"]) == {done_id, lost_id}
    assert not ctx.files(expired_id).root.exists()
    assert ctx.files(young_id).root.exists() and ctx.store.status(young_id) is None  # maybe a submit in progress
    done = ctx.store.get(done_id)
    assert done.status == JobStatus.COMPLETED and done.owner == "alice" and done.rows_total == 5
    lost = ctx.store.get(lost_id)
    assert lost.status == JobStatus.FAILED and "lost this job's state" in lost.error
    assert {job.id for job in ctx.store.list_for("alice")} == {done_id, lost_id}
    assert recovery.sweep_files(ctx, grace_s=60) == {"removed": [], "restored": []}
