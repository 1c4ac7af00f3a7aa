"""A local stack whose artifacts are in an S3 bucket (moto's server, over HTTP; SPIDER_DATA_URL): a
dataset job with an uploaded source and a post-processor (so the sandbox reads the bundle from
the bucket) runs to the end, its result and metadata download through the API, and no file of the
job is left on the workers' disk."""

from __future__ import annotations

import json

import pytest

from spider.client import SpiderClient
from spider.local import LocalStack
from tests import helpers
from tests.helpers import make_config
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def bucket_stack(tmp_path_factory):
    """moto's server, a bucket, and a stack of this module's own with its artifacts there."""
    with s3_server(tmp_path_factory.mktemp("moto")) as s3:
        bucket = s3.new_bucket()
        env = {**s3.env, "SPIDER_DATA_URL": f"s3://{bucket}/cluster", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        with LocalStack(env=env, log_dir=tmp_path_factory.mktemp("bucket-stack-logs")) as stack:
            yield stack, s3, bucket


def shout(record):
    return {**record, "shouted": record["prompt"].upper()}


@pytest.mark.slow
def test_a_post_processor_job_runs_on_a_bucket_and_leaves_nothing_on_the_workers_disk(
        bucket_stack, firejail, tiny_model, tmp_path):
    stack, s3, bucket = bucket_stack
    rows = [{"question": f"Question {i}: why?"} for i in range(5)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = make_config(stack.url, None, tiny_model, **{"source.dataset": str(source), "source.split": "train",
                                                         "generation.max_batch_size": 2})
    out = tmp_path / "result.jsonl"
    with SpiderClient(config=config, post_processor=shout) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["status"] == "completed", status
        client.download_result(job_id, out)
        metadata = client.http.get(f"/v1/jobs/{job_id}/metadata").json()

    records = helpers.read_jsonl(out)
    assert [r["row_index"] for r in records] == [0, 1, 2, 3, 4]
    for record, row in zip(records, rows):
        assert record["error"] is None and row["question"] in record["prompt"]
        assert record["shouted"] == record["prompt"].upper()
    assert metadata["counts"]["records"] == 5 and metadata["counts"]["batches"] == 3

    # The bucket holds what a completed job keeps (intermediates removed after finalize) ...
    prefix = f"cluster/jobs/{job_id}/"
    kept = ["bundle.manifest.json", "bundle.pkl", "job.json", "metadata.json", "result.jsonl"]
    helpers.eventually(lambda: [k[len(prefix):] for k in s3.keys(bucket, prefix)] == kept)
    assert [k[len(prefix):] for k in s3.keys(bucket, prefix)] == kept
    # ... and the workers' disk nothing of the job: its source was fetched and removed again.
    jobs_on_disk = stack.data_dir / "jobs"
    assert not jobs_on_disk.exists() or list(jobs_on_disk.iterdir()) == []

    # Deleting the job removes its files from the bucket.
    with SpiderClient(base_url=stack.url) as client:
        assert client.http.delete(f"/v1/jobs/{job_id}").json() == {"job_id": job_id, "deleted": True}
    assert s3.keys(bucket, prefix) == []
