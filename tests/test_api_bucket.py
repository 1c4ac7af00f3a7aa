"""The API (in process, on a throwaway Redis) with its artifacts in an S3 bucket (moto's server, over
HTTP): a submit writes the job's files to the bucket, a result streams out of it, the bucket's
address never shows in an answer, and a bucket that cannot be reached is a 503 that keeps nothing."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from starlette.testclient import TestClient

from spider.api.app import create_app, owner_of
from spider.artifacts import write_atomic
from spider.jobs.store import JobFiles, JobStore
from spider.local import free_port
from spider.settings import Settings
from spider.types import JobStatus
from tests.helpers import SAMPLE_PROMPTS, make_config
from tests.s3_server import CREDENTIALS, s3_with_credentials

KEY, OTHER_KEY = "key-bucket", "key-no-bucket"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server, with the credentials s3fs reads from the environment of this process."""
    with s3_with_credentials(tmp_path_factory.mktemp("moto")) as server:
        yield server


def submit_body() -> str:
    job = make_config(None, None, "no-such-org/no-such-model").job.model_dump(mode="json")
    prompts = base64.b64encode(SAMPLE_PROMPTS.read_bytes()).decode()
    return json.dumps({"job": job, "source_files": {"prompts.jsonl": prompts}})


def post_job(client: TestClient, key: str = KEY):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return client.post("/v1/jobs", content=submit_body(), headers=headers)


def test_submit_stores_in_the_bucket_and_the_result_streams_from_it(s3, redis_url, tmp_path):
    bucket = s3.new_bucket()
    settings = Settings(redis_url=redis_url, data_dir=tmp_path / "api", data_url=f"s3://{bucket}/spider",
                        s3_endpoint_url=s3.url, api_keys=(KEY,))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        # Nothing consumes the queue here: the job stays queued, its files in the bucket.
        answer = post_job(client)
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["job_id"]
        # The uploaded source, and the record as submitted (what brings it back should Redis lose it).
        assert s3.keys(bucket) == [f"spider/jobs/{job_id}/job.json", f"spider/jobs/{job_id}/source/prompts.jsonl"]
        files = JobFiles.of(settings, job_id)
        assert (files.source_dir / "prompts.jsonl").read_bytes() == SAMPLE_PROMPTS.read_bytes()
        assert not (tmp_path / "api").exists()  # the API keeps nothing on its own disk

        # As a finalize leaves a job: a result bigger than a download block, metadata naming the bucket.
        result = b"".join(json.dumps({"row_index": i, "text": "x" * 900}).encode() + b"\n" for i in range(3000))
        write_atomic(files.result("jsonl"), result)
        write_atomic(files.metadata, json.dumps({"job_id": job_id, "where": f"{files.root}/result.jsonl"}))
        JobStore(redis.Redis.from_url(redis_url, decode_responses=True)).transition(
            job_id, JobStatus.COMPLETED, [JobStatus.QUEUED])
        with client.stream("GET", f"/v1/jobs/{job_id}/result", headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(result))
            assert f'filename="{job_id}.jsonl"' in response.headers["content-disposition"]
            chunks = list(response.iter_raw())
        assert b"".join(chunks) == result and len(result) > 2 * 1024 * 1024
        metadata = client.get(f"/v1/jobs/{job_id}/metadata", headers=AUTH).json()
        assert metadata["where"] == "<job dir>/result.jsonl" and bucket not in json.dumps(metadata)


def test_a_bucket_that_cannot_be_reached_is_a_503_that_keeps_nothing(redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = Settings(redis_url=redis_url, data_dir=tmp_path / "api", data_url="s3://nowhere/spider",
                        s3_endpoint_url=f"http://127.0.0.1:{free_port()}", api_keys=(OTHER_KEY,))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        answer = post_job(client, OTHER_KEY)
        assert answer.status_code == 503, answer.text
        assert "artifact store is unavailable" in answer.json()["detail"] and "127.0.0.1" not in answer.text
        listed = client.get("/v1/jobs", headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert listed.json() == {"jobs": []}
    assert JobStore(redis.Redis.from_url(redis_url, decode_responses=True)).list_for(owner_of(OTHER_KEY)) == []
