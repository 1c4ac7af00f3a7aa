"""An off-policy job end to end through real processes: client -> API -> Celery -> engine -> dataset."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from spider.client import SpiderClient
from spider.errors import AuthError, JobNotFoundError
from tests.conftest import API_KEYS
from tests.helpers import ROOT, make_config, read_jsonl

pytestmark = pytest.mark.slow
ALICE, BOB = API_KEYS


def run_job(config, tmp_path, **client_kwargs):
    events = []
    with SpiderClient(config=config, **client_kwargs) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=0.5, on_event=events.append)
        path = None
        if status["status"] == "completed":
            path = client.download_result(job_id, tmp_path / f"{job_id}.jsonl")
    return job_id, status, events, path


def check_rows(job_id, records, rows, duplications):
    """Every (row, sample) exactly once, in row order, with a real completion."""
    assert [(r["row_index"], r["sample_index"]) for r in records] == [
        (i, s) for i in range(rows) for s in range(duplications)
    ]
    assert len({r["id"] for r in records}) == rows * duplications
    assert all(r["id"] == f"{job_id}:{r['row_index']}:{r['sample_index']}" for r in records)
    assert all(r["error"] is None and r["completion"] for r in records), [r["error"] for r in records if r["error"]]
    assert all(r["usage"]["completion_tokens"] > 0 for r in records)


def test_vllm_job_end_to_end(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model, "vllm",
        **{"source.split": "train[0:10]", "generation.duplications": 2, "generation.max_batch_size": 3},
    )
    job_id, status, events, path = run_job(config, tmp_path)
    assert status["status"] == "completed", status
    records = read_jsonl(path)
    check_rows(job_id, records, rows=10, duplications=2)
    # The source fields travel with each record.
    assert records[0]["source"]["question"] == records[0]["prompt"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "job.queued" and kinds[-1] == "job.completed"
    assert kinds.count("batch.completed") == 4  # ceil(10 / 3)
    progress = [e.data for e in events if e.kind == "batch.completed"]
    # Batches run concurrently and may finish in any order: each adds its own rows to the count.
    done = sorted(p["rows_done"] for p in progress)
    assert done[-1] == 10
    assert sorted(b - a for a, b in zip([0, *done], done)) == [1, 3, 3, 3]
    assert all(p["rows_total"] == 10 and p["completion_tokens"] > 0 for p in progress)
    metadata = json.loads(path.with_name(path.stem + ".metadata.json").read_text())
    assert metadata["counts"]["records"] == 20 and metadata["counts"]["rows"] == 10
    assert metadata["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in records)
    assert metadata["config"]["model"]["name"] == str(tiny_model)
    assert metadata["config"]["generation"]["duplications"] == 2


def test_greedy_vllm_job_repeats_its_one_answer_for_each_duplication(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model, "vllm",
        **{"generation.duplications": 2, "generation.parameters.temperature": 0.0},
    )
    job_id, status, _, path = run_job(config, tmp_path)
    assert status["status"] == "completed", status
    records = read_jsonl(path)
    check_rows(job_id, records, rows=6, duplications=2)
    for row in range(6):
        first, second = [r for r in records if r["row_index"] == row]
        assert first["id"] != second["id"]
        assert first["completion"] == second["completion"] and first["usage"] == second["usage"]
        assert first["messages"] == second["messages"]


def test_seed_makes_vllm_jobs_reproducible_whatever_the_batching(stack, tiny_model, tmp_path):
    first = make_config(stack.url, ALICE, tiny_model, "vllm", **{"generation.max_batch_size": 2})
    second = make_config(stack.url, ALICE, tiny_model, "vllm", **{"generation.max_batch_size": 5})
    _, s1, _, p1 = run_job(first, tmp_path)
    _, s2, _, p2 = run_job(second, tmp_path)
    assert s1["status"] == s2["status"] == "completed"
    assert [r["completion"] for r in read_jsonl(p1)] == [r["completion"] for r in read_jsonl(p2)]


def test_system_prompt_list_is_chosen_per_row_reproducibly(stack, tiny_model, tmp_path):
    prompts = ["You are terse.", "You are verbose.", "You are a pirate."]
    config = make_config(
        stack.url, ALICE, tiny_model, "vllm", **{"generation.system_prompt": prompts, "source.split": "train[0:12]"}
    )
    _, status, _, path = run_job(config, tmp_path)
    assert status["status"] == "completed"
    chosen = [r["messages"][0]["content"] for r in read_jsonl(path)]
    assert set(chosen) <= set(prompts) and len(set(chosen)) > 1
    _, _, _, again = run_job(config, tmp_path)
    assert [r["messages"][0]["content"] for r in read_jsonl(again)] == chosen


def test_parquet_output(stack, tiny_model, tmp_path):
    import pyarrow.parquet as pq

    config = make_config(stack.url, ALICE, tiny_model, "vllm", **{"output.format": "parquet"})
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        assert client.poll_job(job_id, on_event=lambda e: None)["status"] == "completed"
        path = client.download_result(job_id, tmp_path / "out.parquet")
    table = pq.read_table(path).to_pylist()
    assert [r["row_index"] for r in table] == list(range(6))
    assert all(r["completion"] for r in table)


def test_hf_engine_job(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model, "hf", **{"generation.duplications": 2})
    job_id, status, events, path = run_job(config, tmp_path)
    assert status["status"] == "completed", status
    check_rows(job_id, read_jsonl(path), rows=6, duplications=2)


def test_openai_engine_job_against_a_vllm_server(stack, tiny_model, vllm_server, tmp_path):
    config = make_config(
        stack.url, ALICE, "spider-tiny", "openai",
        **{"model.parameters": {"base_url": vllm_server, "max_concurrency": 4}, "generation.duplications": 2},
    )
    job_id, status, events, path = run_job(config, tmp_path)
    assert status["status"] == "completed", status
    check_rows(job_id, read_jsonl(path), rows=6, duplications=2)
    # Same seed, same server: the same dataset again.
    _, _, _, again = run_job(config, tmp_path)
    assert [r["completion"] for r in read_jsonl(again)] == [r["completion"] for r in read_jsonl(path)]


def test_cancel_stops_a_running_job(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model,
        **{"source.split": "train", "generation.duplications": 8, "generation.max_batch_size": 1,
           "generation.parameters.max_tokens": 64},
    )
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        for event in client.stream_events(job_id):
            if event.kind == "batch.completed":
                break
        asked = time.monotonic()
        client.cancel_job(job_id)
        kinds = [e.kind for e in client.stream_events(job_id)]
        assert kinds[-1] == "job.cancelled"
        status = client.get_job_status(job_id)
        assert status["status"] == "cancelled"
        assert time.monotonic() - asked < 5
    # The batch in flight when the cancel arrived may still finish; nothing starts after it.
    shards = stack.data_dir / "jobs" / job_id / "shards"
    time.sleep(1.5)
    count = len(list(shards.glob("*.jsonl")))
    time.sleep(3)
    assert len(list(shards.glob("*.jsonl"))) == count
    assert count <= status["progress"]["batches_done"] + 1 < 32


def test_invalid_value_is_422_naming_the_field(stack, tiny_model):
    body = make_config(stack.url, ALICE, tiny_model).job.model_dump(mode="json")
    body["generation"]["parameters"]["temperature"] = -1
    response = httpx.post(f"{stack.url}/v1/jobs", json={"job": body}, headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 422
    assert "job.generation.parameters.temperature" in response.json()["detail"]


def test_unknown_key_is_422_with_a_suggestion(stack, tiny_model):
    body = make_config(stack.url, ALICE, tiny_model).job.model_dump(mode="json")
    body["generation"]["duplication"] = 3
    response = httpx.post(f"{stack.url}/v1/jobs", json={"job": body}, headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "job.generation.duplication: unknown key" in detail and "did you mean 'duplications'" in detail


def test_missing_or_invalid_api_key_is_401(stack, tiny_model):
    for key in (None, "not-a-key"):
        config = make_config(stack.url, key, tiny_model)
        with SpiderClient(config=config) as client:
            with pytest.raises(AuthError):
                client.submit_job()
            with pytest.raises(AuthError):
                client.list_jobs()


def test_another_keys_job_is_404(stack, tiny_model, tmp_path):
    with SpiderClient(config=make_config(stack.url, ALICE, tiny_model)) as alice:
        job_id = alice.submit_job()["job_id"]
        assert job_id in [j["job_id"] for j in alice.list_jobs()]
    with SpiderClient(config=make_config(stack.url, BOB, tiny_model)) as bob:
        for call in (bob.get_job_status, bob.cancel_job, lambda j: list(bob.stream_events(j))):
            with pytest.raises(JobNotFoundError):
                call(job_id)
        with pytest.raises(JobNotFoundError):
            bob.download_result(job_id, tmp_path / "x.jsonl")
        assert job_id not in [j["job_id"] for j in bob.list_jobs()]


def test_secrets_are_never_returned(stack, tiny_model, monkeypatch):
    monkeypatch.setenv("SPIDER_TEST_SECRET", "s3cret-value")
    with SpiderClient(config=make_config(stack.url, ALICE, tiny_model), env="SPIDER_TEST_SECRET") as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["secret_names"] == ["SPIDER_TEST_SECRET"]
        raw = client.http.get(f"/v1/jobs/{job_id}").text + client.http.get("/v1/jobs").text
        raw += client.http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"}).text
        assert "s3cret-value" not in raw
    import redis

    assert not redis.Redis.from_url(stack.redis_url).exists(f"spider:job:{job_id}:secrets")


def test_ended_jobs_event_histories_expire(stack, tiny_model, tmp_path):
    import redis

    month = 30 * 24 * 3600  # SPIDER_EVENT_TTL_S's default: the job's own TTL (SPIDER_JOB_TTL_S)
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    completed, status, _, _ = run_job(make_config(stack.url, ALICE, tiny_model), tmp_path)
    assert status["status"] == "completed"
    assert month - 600 < r.ttl(f"spider:events:{completed}") <= month  # set by the worker that finalized it
    config = make_config(stack.url, ALICE, tiny_model, **{"source.split": "train", "generation.max_batch_size": 1})
    with SpiderClient(config=config) as client:
        cancelled = client.submit_job()["job_id"]
        assert r.ttl(f"spider:events:{cancelled}") == -1  # a live job's history stays
        client.cancel_job(cancelled)
        assert [e.kind for e in client.stream_events(cancelled)][-1] == "job.cancelled"
    assert month - 600 < r.ttl(f"spider:events:{cancelled}") <= month  # set by the API that cancelled it


def test_missing_dataset_fails_the_job_with_its_message(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model, **{"source.dataset": "no-such-user/no-such-dataset"})
    _, status, events, _ = run_job(config, tmp_path)
    assert status["status"] == "failed"
    assert "cannot load source dataset 'no-such-user/no-such-dataset'" in status["error"]
    assert "Traceback" not in status["error"]
    assert events[-1].kind == "job.failed" and events[-1].message == status["error"]


def test_missing_field_fails_the_job_with_its_message(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model, **{"source.field": "questoin"})
    _, status, _, _ = run_job(config, tmp_path)
    assert status["status"] == "failed"
    assert "field 'questoin' is missing" in status["error"] and "question" in status["error"]


def test_late_client_gets_the_whole_history_and_last_event_id_resumes(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model)
    _, status, live, _ = run_job(config, tmp_path)
    assert status["status"] == "completed"
    with SpiderClient(config=config) as client:
        late = list(client.stream_events(status["job_id"]))
        assert [e.id for e in late] == [e.id for e in live]
        assert late[0].kind == "job.queued" and late[-1].kind == "job.completed"
        middle = late[len(late) // 2]
        resumed = list(client.stream_events(status["job_id"], after=middle.id))
        assert [e.id for e in resumed] == [e.id for e in late[late.index(middle) + 1 :]]
        started = time.monotonic()
        assert list(client.stream_events(status["job_id"], after=late[-1].id)) == []
        assert time.monotonic() - started < 5  # an ended job's stream closes at once
        response = client.http.get(
            f"/v1/jobs/{status['job_id']}/events", headers={"Last-Event-ID": middle.id}, params={"follow": "false"}
        )
        assert middle.id not in response.text and late[-1].id in response.text


BAD_ROWS = ROOT / "tests" / "data" / "some_bad_rows.jsonl"


def test_bad_rows_become_error_records_and_the_job_goes_on(stack, tiny_model, tmp_path):
    config = make_config(stack.url, ALICE, tiny_model, **{"source.dataset": str(BAD_ROWS), "source.split": "train"})
    _, status, events, path = run_job(config, tmp_path)
    assert status["status"] == "completed", status
    records = read_jsonl(path)
    assert [r["row_index"] for r in records] == [0, 1, 2, 3, 4]
    failed = {r["row_index"]: r["error"] for r in records if r["error"]}
    assert set(failed) == {1, 3}
    assert "is a NoneType: give text" in failed[1]["message"] and "is a list: give text" in failed[3]["message"]
    assert all(r["completion"] for r in records if not r["error"])
    warnings = [e for e in events if e.kind == "batch.row_errors"]
    assert warnings and warnings[0].level == "warning" and warnings[0].data["row_errors"] == 2
    assert status["progress"]["row_errors"] == 2


def test_more_row_errors_than_allowed_fails_the_job(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model,
        **{"source.dataset": str(BAD_ROWS), "source.split": "train", "generation.max_row_errors": 1},
    )
    _, status, _, _ = run_job(config, tmp_path)
    assert status["status"] == "failed"
    assert status["error"] == "2 rows failed, more than generation.max_row_errors=1"
