"""Crashes: a rollout worker killed mid-job and a restarted API lose nothing."""

from __future__ import annotations

import threading
import time

import pytest

from spider.client import SpiderClient
from tests.conftest import API_KEYS
from tests.helpers import make_config, read_jsonl

pytestmark = pytest.mark.slow
ALICE = API_KEYS[0]


def test_killed_rollout_worker_loses_nothing(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model,
        **{"source.split": "train[0:24]", "generation.max_batch_size": 2, "generation.parameters.max_tokens": 32},
    )
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        for event in client.stream_events(job_id):
            if event.kind == "batch.completed":
                break
        stack.kill("worker-rollout")
        stack.restart("worker-rollout")
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["status"] == "completed", status
        records = read_jsonl(client.download_result(job_id, tmp_path / "r.jsonl"))
    assert [r["row_index"] for r in records] == list(range(24))
    assert len({r["id"] for r in records}) == 24
    assert all(r["completion"] for r in records)


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
