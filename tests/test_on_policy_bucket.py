"""An on-policy job whose artifacts are in an S3 bucket (moto's server, over HTTP), its stages run as
plain functions by two "machines" that share only Redis and the bucket: each checkpoint is
published to the bucket, and the second machine, resuming the job, fetches the newest one and
trains on exactly as the first would have."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import redis

from spider.artifacts import StorePath
from spider.events import EventBus
from spider.jobs import on_policy
from spider.jobs.stages import Context
from spider.jobs.store import JobStore
from spider.policy import Policy
from spider.settings import Settings
from spider.types import EventKind, JobStatus
from tests.helpers import SAMPLE_PROMPTS, Recorder
from tests.s3_server import s3_with_credentials
from tests.test_on_policy_stages import submit


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server, with the credentials s3fs reads from the environment of this process."""
    with s3_with_credentials(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from spider.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)


@pytest.fixture
def machines(s3, redis_url, tmp_path, model_dirs):
    """Two contexts with one Redis, one bucket and one dispatcher, each with its own local disk."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    policy = Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),), model_dirs=(model_dirs,))
    url = f"s3://{s3.new_bucket()}/spider"
    recorder = Recorder()
    return [Context(Settings(redis_url=redis_url, data_dir=tmp_path / name, data_url=url, s3_endpoint_url=s3.url,
                             policy=policy), JobStore(client), EventBus(client), recorder) for name in ("a", "b")]


def drive(machines, job_id, machine_of):
    """Run the recorded stages to the end, each on the machine `machine_of(stage, args)` names."""
    first = machines[0]
    on_policy.start_job(first, job_id)
    calls = first.dispatcher.calls
    while calls:
        stage, *args = calls.pop(0)
        ctx = machine_of(stage, args)
        if stage == on_policy.TRAIN:
            on_policy.train_segment(ctx, *args)
        elif stage == on_policy.FINALIZE:
            on_policy.finalize_job(ctx, *args)


def metrics(ctx, job_id):
    return [json.loads(line) for line in ctx.files(job_id).metrics.read_text().split("\n") if line.strip()]


def test_a_job_resumed_on_another_machine_fetches_its_checkpoint_from_the_bucket(machines, tiny_model, teacher):
    a, b = machines
    straight = submit(a, tiny_model, teacher, max_steps=4, steps_per_task=2)
    drive(machines, straight, lambda stage, args: a)
    assert a.store.get(straight).status == JobStatus.COMPLETED, a.store.get(straight).error

    moved = submit(a, tiny_model, teacher, max_steps=4, steps_per_task=2)
    published: dict[str, object] = {}

    def machine_of(stage, args):
        if stage == on_policy.TRAIN and args[1] == 0:
            return a
        if not published:  # machine a is gone, with its disk; b takes the job over
            files = a.files(moved)
            published["meta"] = json.loads(files.latest_checkpoint.read_text())
            published["state"] = sorted(p.name for p in (files.trainer / "state").iterdir())
            on_policy.release(moved)
            shutil.rmtree(a.settings.data_dir)
        return b

    drive(machines, moved, machine_of)
    record = b.store.get(moved)
    assert record.status == JobStatus.COMPLETED, record.error

    # The checkpoint after step 2 was in the bucket, and named its folders there.
    meta = published["meta"]
    assert meta["step"] == 2 and meta["trainer_files"] == {"state": "state/step-000002",
                                                           "sampler_path": "sampler/step-000002"}
    assert published["state"] == ["step-000002"]
    resumed = [e.data["step"] for e in b.bus.replay(moved) if e.kind == EventKind.JOB_RESUMED]
    assert resumed == [2]
    # ... and b trained on from it exactly as a did without a stop (bit for bit on the CPU).
    for key in ("teacher_kl", "loss", "grad_norm", "tokens_trained"):
        assert [m[key] for m in metrics(b, moved)] == [m[key] for m in metrics(a, straight)], key

    files = b.files(moved)
    assert isinstance(files.archive, StorePath)
    with tarfile.open(fileobj=io.BytesIO(files.archive.read_bytes()), mode="r:gz") as tar:
        members = tar.getnames()
    assert {"adapter/adapter_config.json", "metrics.jsonl", "metrics.png"} <= set(members)
    assert (files.adapter / "adapter_config.json").exists() and files.metadata.exists()
    # Retention kept the last checkpoint's state only, in the bucket; b's disk holds nothing of the job.
    assert sorted(p.name for p in (files.trainer / "state").iterdir()) == ["step-000004"]
    assert sorted(p.name for p in files.checkpoints.iterdir()) == ["step-000004.json"]
    assert not files.local.root.exists()
    assert not (b.settings.data_dir / "jobs").exists() or not any((b.settings.data_dir / "jobs").iterdir())
