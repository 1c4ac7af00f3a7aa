"""Recovery on real processes: workers that die between any two writes of a job, lost messages,
a Redis restarted mid-job or wiped, a full disk. Every job ends `completed` with every row exactly
once and its counters right, or `failed` with a message and then resumable.

The stack here is the tests' own: a fault plan (spider.faults) makes a worker kill itself at a named
point for one job, and the stack's supervision starts a dead worker again, as a deployment's
restart policy would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from spider import faults
from spider.client import SpiderClient
from spider.jobs.store import JobFiles, JobStore
from spider.local import LocalStack, WorkerSpec
from spider.types import EventKind
from tests.conftest import API_KEYS
from tests.helpers import make_config, read_jsonl

pytestmark = pytest.mark.slow
ALICE = API_KEYS[0]
ROWS, BATCH = 8, 2
VISIBILITY_S, RECONCILE_AFTER_S, RECONCILE_EVERY_S = 10, 6, 2


@pytest.fixture(scope="module")
def jobs_disk(tmp_path_factory):
    """A small tmpfs for the job folders, so a test can fill it (None where mounting is not allowed)."""
    data_dir = tmp_path_factory.mktemp("fault-data")
    jobs = data_dir / "jobs"
    jobs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(jobs)],
                             capture_output=True).returncode == 0
    yield data_dir, (jobs if mounted else None)
    if mounted:
        subprocess.run(["umount", "-l", str(jobs)], check=False)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, jobs_disk):
    data_dir, _ = jobs_disk
    plan = tmp_path_factory.mktemp("fault-plan") / "plan.json"
    faults.write_plan(plan, [])
    env = {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        faults.PLAN_ENV: str(plan),
        "SPIDER_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
        "SPIDER_RECONCILE_INTERVAL_S": str(RECONCILE_EVERY_S),
        "SPIDER_RECONCILE_AFTER_S": str(RECONCILE_AFTER_S),
        "SPIDER_SWEEP_INTERVAL_S": "3",
        "SPIDER_SWEEP_GRACE_S": "2",
        "SPIDER_TASK_RETRIES": "3",
        "SPIDER_RETRY_BACKOFF_S": "1",
    }
    workers = (WorkerSpec("control", "threads", 4), WorkerSpec("rollout", "threads", 2))
    # Workers die here on purpose, again and again and soon after their start: never left down.
    with LocalStack(api_keys=API_KEYS, env=env, workers=workers, data_dir=data_dir, crash_limit=1000,
                    log_dir=tmp_path_factory.mktemp("fault-logs")) as stack:
        stack.fault_plan = plan
        yield stack


def small_job(stack, model, **overrides):
    return make_config(stack.url, ALICE, model, **{
        "source.split": f"train[0:{ROWS}]", "generation.max_batch_size": BATCH,
        "generation.parameters.max_tokens": 8, **overrides})


def store_of(stack) -> JobStore:
    return JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))


def check_complete(client, job_id, status, tmp_path):
    """Completed, every row once in order, and counters that match the result."""
    assert status["status"] == "completed", status
    records = read_jsonl(client.download_result(job_id, tmp_path / f"{job_id}.jsonl"))
    assert [r["row_index"] for r in records] == list(range(ROWS))
    assert all(r["error"] is None and r["completion"] for r in records)
    progress = status["progress"]
    assert progress["rows_done"] == ROWS and progress["records"] == ROWS, progress
    assert progress["batches_done"] == ROWS // BATCH, progress
    assert sum(r["usage"]["completion_tokens"] for r in records) == progress["completion_tokens"]


# Between each pair of Redis writes of a batch's completion and of finalize, and the messages a
# broker can lose (a worker killed after BRPOP and before recording the message as unacked).
POINTS = [
    ("batch.before_complete", "kill"),   # the shard is written, nothing counted
    ("batch.after_complete", "kill"),    # counted: the redelivered batch must still finalize
    ("batch.before_claim", "kill"),
    ("batch.after_claim", "kill"),       # finalize claimed and never enqueued
    ("finalize.after_result", "kill"),
    ("finalize.before_complete", "kill"),
    ("finalize.after_complete", "kill"),  # completed, secrets and the completed event not yet done
    ("finalize.before_cleanup", "kill"),
    ("spider.plan_job.received", "drop"),
    ("spider.run_batch.received", "drop"),
    ("spider.finalize_job.received", "drop"),
]


def completed_events(client, job_id):
    return [e for e in client.stream_events(job_id, follow=False) if e.kind == EventKind.JOB_COMPLETED]


def wait_ended(client, job_id, timeout=600):
    """The job's status once it has ended (never waiting forever: a hung job fails the test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status['status']} after {timeout}s: {status}")


@pytest.mark.timeout(900)
def test_a_worker_dying_at_any_point_of_a_job_loses_nothing(fault_stack, tiny_model, tmp_path):
    stack = fault_stack
    # Each fault fires for the first job that gets there; the jobs run at once, so a crash also
    # hits the other jobs' tasks in flight.
    planned = [{"point": point, "job": "*", "action": action} for point, action in POINTS]
    faults.write_plan(stack.fault_plan, planned)
    restarted = len(stack.restarts)
    with SpiderClient(config=small_job(stack, tiny_model)) as client:
        job_ids = [client.submit_job()["job_id"] for _ in POINTS]
        for job_id in job_ids:
            check_complete(client, job_id, wait_ended(client, job_id), tmp_path)
        # A finalize killed after completing the job is redelivered (within the visibility timeout
        # and kombu's sweep): it announces the completion once and removes the intermediates.
        deadline = time.monotonic() + 3 * VISIBILITY_S
        for job_id in job_ids:
            shards = JobFiles(stack.data_dir, job_id).root / "shards"
            while time.monotonic() < deadline and (shards.exists() or not completed_events(client, job_id)):
                time.sleep(0.5)
            assert len(completed_events(client, job_id)) == 1, [e.kind for e in client.stream_events(job_id, follow=False)]
            assert not shards.exists(), "intermediates left behind"
        histories = {job_id: list(client.stream_events(job_id, follow=False)) for job_id in job_ids}
    plan = faults.read_plan(stack.fault_plan)
    assert not plan["faults"], f"points never reached: {plan['faults']}"
    assert sorted((h["point"], h["action"]) for h in plan["hits"]) == sorted(POINTS)
    # Each killed worker was started again by the stack's supervision, once.
    assert len(stack.restarts) - restarted == sum(action == "kill" for _, action in POINTS), stack.restarts
    store = store_of(stack)
    assert all(store.secrets(job_id) == {} for job_id in job_ids)
    # A lost message, or a finalize claimed and never enqueued, is found by the reconciler: its job says so.
    for hit in plan["hits"]:
        if hit["action"] == "drop" or hit["point"] == "batch.after_claim":
            assert any(e.kind == EventKind.JOB_RESUMED for e in histories[hit["job"]]), hit


def test_a_redis_restarted_mid_job_loses_nothing(fault_stack, tiny_model, tmp_path):
    stack = fault_stack
    with SpiderClient(config=small_job(stack, tiny_model, **{"generation.parameters.max_tokens": 48})) as client:
        job_id = client.submit_job()["job_id"]
        for event in client.stream_events(job_id):
            if event.kind == EventKind.BATCH_COMPLETED:
                break
        stack.kill("redis")
        time.sleep(3)
        stack.restart("redis")
        check_complete(client, job_id, wait_ended(client, job_id), tmp_path)


@contextlib.contextmanager
def full(disk: Path):
    """The disk filled to its last byte by a ballast file, until `free()` (or the end) removes it."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                continue
    finally:
        os.close(fd)
    try:
        yield lambda: ballast.unlink(missing_ok=True)
    finally:
        ballast.unlink(missing_ok=True)


def wait_for(client, job_id, kind, timeout=120):
    deadline = time.monotonic() + timeout
    for event in client.stream_events(job_id):
        if event.kind == kind:
            return event
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {kind} event for job {job_id}")


def test_a_full_disk_is_waited_out_then_a_job_that_outlasts_the_tries_fails_and_resumes(
    fault_stack, jobs_disk, tiny_model, tmp_path
):
    _, disk = jobs_disk
    if disk is None:
        pytest.skip("this machine does not let the tests mount a small tmpfs to fill")
    stack = fault_stack
    # Batches that take a few seconds to reach their shard, so the disk is full by then.
    slow = [{"point": "batch.before_shard", "job": "*", "action": "wait", "seconds": 3}] * 4
    with SpiderClient(config=small_job(stack, tiny_model)) as client:
        faults.write_plan(stack.fault_plan, slow)
        # A disk that fills and frees itself again is waited out: tries with backoff.
        job_id = client.submit_job()["job_id"]
        wait_for(client, job_id, EventKind.JOB_PLANNED)
        with full(disk) as free:
            retry = wait_for(client, job_id, EventKind.STAGE_RETRY)
            assert "No space left" in retry.message
            free()
        check_complete(client, job_id, wait_ended(client, job_id), tmp_path)

        # One that stays full fails the job once the tries are spent, with what to do about it...
        faults.write_plan(stack.fault_plan, slow)
        job_id = client.submit_job()["job_id"]
        wait_for(client, job_id, EventKind.JOB_PLANNED)
        with full(disk):
            status = wait_ended(client, job_id)
        assert status["status"] == "failed", status
        assert "No space left" in status["error"] and "spider resume" in status["error"], status["error"]
        # ... and resumes where it stopped once space is back.
        resumed = client.resume_job(job_id)
        assert resumed["status"] == "running", resumed
        check_complete(client, job_id, wait_ended(client, job_id), tmp_path)
        # A completed job has nothing to resume.
        with pytest.raises(Exception, match="nothing to resume"):
            client.resume_job(job_id)


def test_a_redis_that_lost_everything_gets_its_jobs_back_from_their_files(fault_stack, tiny_model, tmp_path):
    stack = fault_stack
    with SpiderClient(config=small_job(stack, tiny_model)) as client:
        done_id = client.submit_job()["job_id"]
        check_complete(client, done_id, wait_ended(client, done_id), tmp_path)
        # Held back in planning (its plan message lost), then Redis restarts without its data.
        faults.write_plan(stack.fault_plan, [{"point": "spider.plan_job.received", "job": "*", "action": "drop"}])
        running_id = client.submit_job()["job_id"]
        deadline = time.monotonic() + 60
        while not faults.read_plan(stack.fault_plan)["hits"] and time.monotonic() < deadline:
            time.sleep(0.2)
        stack.kill("redis")
        shutil.rmtree(stack.redis_dir)
        stack.restart("redis")
        store = store_of(stack)
        # The sweep finds the folders Redis no longer knows and restores their records.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (store.status(done_id) is None or store.status(running_id) is None):
            time.sleep(1)
        done = client.get_job_status(done_id)
        assert done["status"] == "completed", done
        records = read_jsonl(client.download_result(done_id, tmp_path / "restored.jsonl"))
        assert [r["row_index"] for r in records] == list(range(ROWS))
        lost = client.get_job_status(running_id)
        assert lost["status"] == "failed" and "lost this job's state" in lost["error"], lost
        assert {j["job_id"] for j in client.list_jobs()} >= {done_id, running_id}
        # It runs again on demand.
        client.resume_job(running_id)
        check_complete(client, running_id, wait_ended(client, running_id), tmp_path)
