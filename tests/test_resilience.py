"""Crashes: a rollout worker killed mid-job and a restarted API lose nothing."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from spider.client import SpiderClient
from spider.jobs.store import JobFiles, JobStore
from spider.types import EventKind
from tests.conftest import API_KEYS
from tests.helpers import make_config, read_jsonl

pytestmark = pytest.mark.slow
ALICE = API_KEYS[0]


def test_killed_rollout_worker_loses_nothing(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model,
        **{"source.split": "train[0:24]", "generation.max_batch_size": 4, "generation.parameters.max_tokens": 256},
    )
    store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        files = JobFiles(stack.data_dir, job_id)
        completed: set[int] = set()
        in_flight = None
        for event in client.stream_events(job_id):
            if event.kind == EventKind.BATCH_COMPLETED:
                completed.add(event.data["batch"])
            elif event.kind == EventKind.BATCH_STARTED and completed:
                in_flight = event.data["batch"]  # generating now, after at least one batch finished
                break
        assert in_flight is not None, "the job ended before a batch started after another completed"
        stack.kill("worker-rollout")
        # The batch was still generating when its worker died: not done, no shard.
        assert in_flight not in store.done_batches(job_id)
        assert not files.shard(in_flight).exists()
        stack.restart("worker-rollout")
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["status"] == "completed", status
        records = read_jsonl(client.download_result(job_id, tmp_path / "r.jsonl"))
        history = list(client.stream_events(job_id))
    assert [r["row_index"] for r in records] == list(range(24))
    assert len({r["id"] for r in records}) == 24
    assert all(r["completion"] for r in records)
    # The killed batch was handed out again, generated again, and counted once.
    started = [e for e in history if e.kind == EventKind.BATCH_STARTED and e.data["batch"] == in_flight]
    done = [e for e in history if e.kind == EventKind.BATCH_COMPLETED and e.data["batch"] == in_flight]
    assert len(started) >= 2 and len(done) == 1
    assert status["progress"]["rows_done"] == 24 and status["progress"]["batches_done"] == 6


def test_restarted_api_keeps_jobs_and_streams_resume(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model, **{"source.split": "train[0:16]", "generation.max_batch_size": 2})
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        seen = []
        restarted = threading.Event()

        def restart_api_once() -> None:
            stack.kill("api")
            time.sleep(1)
            stack.restart("api")
            restarted.set()

        for event in client.stream_events(job_id, reconnect_delay=0.5):
            seen.append(event)
            if event.kind == "job.planned" and not restarted.is_set():
                threading.Thread(target=restart_api_once).start()
        assert restarted.wait(60)
        assert seen[-1].kind == "job.completed"
        ids = [e.id for e in seen]
        assert len(ids) == len(set(ids))  # the reconnect resumed after the last event, no repeats
        history = list(client.stream_events(job_id))
        assert [e.id for e in history] == ids  # and missed nothing
        assert client.get_job_status(job_id)["status"] == "completed"
