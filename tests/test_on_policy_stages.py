"""An on-policy job's stages as plain functions (no broker, real Redis and models): redelivered
segments never train a step twice, a lost trainer resumes bit for bit from its checkpoint, a
second delivery of a running segment stands aside, cancel stops training, the token budget ends it."""

from __future__ import annotations

import json

import pytest
import redis

from spider.config import JobConfig
from spider.events import EventBus
from spider.jobs import on_policy
from spider.jobs.stages import Context, cancel_job
from spider.jobs.store import JobStore
from spider.policy import Policy
from spider.settings import Settings
from spider.types import EventKind, JobStatus
from tests.helpers import Recorder, SAMPLE_PROMPTS


@pytest.fixture
def ctx(redis_url, tmp_path, model_dirs):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    policy = Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),), model_dirs=(model_dirs,))
    return Context(Settings(redis_url=redis_url, data_dir=tmp_path, policy=policy), JobStore(client),
                   EventBus(client), Recorder())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from spider.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)


def submit(ctx, student, teacher, generation=None, **options):
    config = JobConfig.parse({
        "model": {"provider": "hf", "name": str(student)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:12]", "field": "question"},
        "generation": {"on_policy": True, **(generation or {}), "on_policy_options": {
            "teacher": {"provider": "hf", "name": str(teacher)}, "groups_per_batch": 2, "group_size": 2,
            "max_tokens": 8, "lora_rank": 4, "learning_rate": 1e-2, "seed": 3, **options}},
    })
    return ctx.store.create("alice", config.model_dump(mode="json"), {}, has_bundle=False).id


def drive(ctx, job_id, redeliver=False, before=None):
    """Run the recorded stages to the end; `redeliver` runs every segment twice (as Redis would
    after a worker's death); `before(stage, args)` runs before each."""
    on_policy.start_job(ctx, job_id)
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        if before is not None:
            before(stage, args)
        if stage == on_policy.TRAIN:
            on_policy.train_segment(ctx, *args)
            if redeliver:
                on_policy.train_segment(ctx, *args)
        elif stage == on_policy.FINALIZE:
            on_policy.finalize_job(ctx, *args)
            if redeliver:
                on_policy.finalize_job(ctx, *args)


def metrics(ctx, job_id):
    return [json.loads(line) for line in ctx.files(job_id).metrics.read_text().splitlines() if line.strip()]


def trained_steps(ctx, job_id):
    return [e.data["step"] for e in ctx.bus.replay(job_id) if e.kind == EventKind.TRAIN_STEP]


def test_redelivered_segments_and_finalize_train_nothing_twice(ctx, tiny_model, teacher):
    job_id = submit(ctx, tiny_model, teacher, max_steps=5, steps_per_task=2)
    drive(ctx, job_id, redeliver=True)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.COMPLETED, record.error
    assert trained_steps(ctx, job_id) == [1, 2, 3, 4, 5]
    assert [m["step"] for m in metrics(ctx, job_id)] == [1, 2, 3, 4, 5]
    assert [e.kind for e in ctx.bus.replay(job_id)].count(EventKind.JOB_COMPLETED) == 1
    # Only the last checkpoint is kept (save_every 0), and the trainer's older states are gone.
    assert sorted(p.name for p in ctx.files(job_id).checkpoints.iterdir()) == ["step-000005.json"]
    assert sorted(p.name for p in (ctx.files(job_id).trainer / "state").iterdir()) == ["step-000005"]


def test_a_lost_trainer_resumes_from_its_checkpoint_exactly_as_if_it_had_never_stopped(ctx, tiny_model, teacher):
    straight = submit(ctx, tiny_model, teacher, max_steps=4, steps_per_task=2)
    drive(ctx, straight)

    resumed = submit(ctx, tiny_model, teacher, max_steps=4, steps_per_task=2)

    def lose_the_worker(stage, args):
        if stage == on_policy.TRAIN and args[1] == 2:
            on_policy.release(resumed)  # a new worker process: nothing of the trainer is warm

    drive(ctx, resumed, before=lose_the_worker)
    history = list(ctx.bus.replay(resumed))
    assert [e.data["step"] for e in history if e.kind == EventKind.JOB_RESUMED] == [2]
    a, b = metrics(ctx, straight), metrics(ctx, resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("teacher_kl", "loss", "grad_norm", "tokens_trained"):
        assert [m[key] for m in a] == [m[key] for m in b], key  # bit for bit on the CPU


def test_a_second_delivery_of_a_running_segment_stands_aside(ctx, tiny_model, teacher):
    job_id = submit(ctx, tiny_model, teacher, max_steps=2, steps_per_task=2)
    on_policy.start_job(ctx, job_id)
    ctx.dispatcher.calls.clear()
    lease = on_policy.Lease(ctx, job_id)
    assert lease.take()  # another worker trains this job now
    try:
        on_policy.train_segment(ctx, job_id, 0)
    finally:
        lease.release()
    assert trained_steps(ctx, job_id) == [] and ctx.dispatcher.calls == []
    on_policy.train_segment(ctx, job_id, 0)  # once the lease is free, the segment trains
    assert trained_steps(ctx, job_id) == [1, 2]


def test_cancel_stops_training_between_steps(ctx, tiny_model, teacher):
    job_id = submit(ctx, tiny_model, teacher, max_steps=6, steps_per_task=6)
    from spider.train import loop

    real = loop.on_policy_step

    def step_then_cancel(run, step, engine_loop):
        out = real(run, step, engine_loop)
        if step == 1:
            cancel_job(ctx, job_id)
        return out

    loop.on_policy_step = step_then_cancel
    try:
        drive(ctx, job_id)
    finally:
        loop.on_policy_step = real
    assert ctx.store.get(job_id).status == JobStatus.CANCELLED
    assert trained_steps(ctx, job_id) == [1]  # the step during which it was cancelled is not kept
    assert not ctx.files(job_id).archive.exists()


def test_the_token_budget_ends_training_after_the_step_that_spends_it(ctx, tiny_model, teacher):
    job_id = submit(ctx, tiny_model, teacher, max_steps=20, steps_per_task=4, max_train_tokens=40)
    drive(ctx, job_id)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.COMPLETED, record.error
    steps = metrics(ctx, job_id)
    assert steps[-1]["tokens_trained_total"] >= 40 and steps[-2]["tokens_trained_total"] < 40
    assert len(steps) < 20
    metadata = json.loads(ctx.files(job_id).metadata.read_text())
    assert metadata["steps"] == len(steps) and metadata["tokens_trained"] == steps[-1]["tokens_trained_total"]


def test_a_source_with_no_rows_left_to_train_on_fails_clearly(ctx, tiny_model, teacher):
    job_id = submit(ctx, tiny_model, teacher, eval_every=2, eval_rows=12)
    drive(ctx, job_id)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.FAILED and "nothing is left to train on" in record.error


def test_multi_turn_conversations_train_every_student_turn_and_report_how(ctx, tiny_model, teacher):
    """A simulated user answers once: two student turns per conversation, both scored by the
    teacher and trained; the user's turn and the template between are context. A turn whose prompt
    does not extend the previous one token for token (a re-rendered answer tokenized otherwise)
    trains as its own sequence and is counted."""
    user = {"model": {"provider": "hf", "name": str(teacher)}, "max_turns": 1,
            "parameters": {"max_tokens": 6, "temperature": 1.0}}
    job_id = submit(ctx, tiny_model, teacher, generation={"user": user}, max_steps=2, steps_per_task=2)
    drive(ctx, job_id)
    record = ctx.store.get(job_id)
    assert record.status == JobStatus.COMPLETED, record.error
    for step in metrics(ctx, job_id):
        conversations = 2 * 2
        assert step["sequences"] == conversations + step["separate_turns"]
        assert step["tokens_trained"] == step["tokens_sampled"] > 8 * conversations  # both turns' tokens
        assert step["score_errors"] == 0
