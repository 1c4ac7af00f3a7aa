"""User code through the real stack: processors and tools shipped from a user's project folder run
on the sandbox worker under firejail; secrets reach only their own job's code; a job's tool answers calls on the sandbox queue.
(Jobs whose models call their tools: tests/test_rollout_stack.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from spider.jobs.usercode import ToolCaller
from spider.settings import Settings
from spider.workers.app import make_celery
from tests.conftest import API_KEYS
from tests.helpers import ROOT, read_jsonl

pytestmark = pytest.mark.slow
PROJECT = ROOT / "tests" / "e2e_project"


def run_script(stack, tiny_model, out, mode):
    proc = subprocess.run(
        [sys.executable, "job_script.py", stack.url, API_KEYS[0], str(tiny_model), str(out), mode],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(open(f"{out}.job.json").read())


def test_processors_from_a_users_project_shape_the_dataset(firejail, stack, tiny_model, tmp_path):
    out = tmp_path / "result.jsonl"
    job_id = run_script(stack, tiny_model, out, "dataset")["job_id"]
    records = read_jsonl(out)
    # Rows 16-23 are instructions: dropped by the pre-processor. Odd rows: dropped by the post-processor.
    assert [r["row_index"] for r in records] == [0, 2, 4, 6, 8, 10, 12, 14]
    refused = records[5]
    assert refused["error"]["type"] == "ValueError" and "refused by the user's code" in refused["error"]["message"]
    kept = [r for r in records if r["error"] is None]
    for r in kept:
        # The helper from formatting.py and the config's kwargs reached the sandbox.
        assert r["prompt"].startswith("Answer in one short sentence: ") and r["prompt"].endswith("?!")
        assert r["tag"] == "checked"
        assert r["messages"][-1]["role"] == "assistant"
        # Only this job's secret and its runtime.env are visible; nothing of the server's.
        assert r["env"] == {"SECRET_A": "alpha-secret", "SECRET_B": None, "SPIDER_API_KEYS": None,
                            "SPIDER_REDIS_URL": None, "PUBLIC_SETTING": "on"}
    metadata = json.loads(out.with_name("result.metadata.json").read_text())
    assert metadata["counts"]["dropped"] == 8 + 8  # instructions, then odd rows
    assert metadata["counts"]["records"] == 8
    import httpx

    status = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {API_KEYS[0]}"}).json()
    assert status["rows_total"] == 24 and status["progress"]["rows_done"] == 24  # dropped rows count as done


@pytest.fixture(scope="module")
def tool_job(stack, tiny_model, tmp_path_factory):
    """A job with a tool as the user's script builds it from its folder: its config and bundle."""
    return run_script(stack, tiny_model, tmp_path_factory.mktemp("tool") / "tool", "tool")


def store_job(stack, config: dict, bundle: bytes, secrets: dict[str, str]) -> str:
    """Store a job as the API does (record, secrets, bundle and manifest) without queueing it, so its
    tool is called by the test alone."""
    import redis

    from spider.api.app import owner_of
    from spider.bundle import bundle_manifest
    from spider.jobs.store import JobFiles, JobStore, new_job_id, write_atomic

    job_id = new_job_id()
    files = JobFiles(stack.data_dir, job_id)
    write_atomic(files.bundle, bundle)
    write_atomic(files.bundle_manifest, json.dumps(bundle_manifest(bundle).to_dict()))
    store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
    store.create(owner_of(API_KEYS[0]), config, secrets, has_bundle=True, job_id=job_id)
    return job_id


def test_a_tool_runs_on_the_sandbox_queue_and_answers_the_caller(firejail, stack, tool_job):
    import base64

    bundle = base64.b64decode(tool_job["bundle"])
    job_id = store_job(stack, tool_job["job"], bundle, {"SECRET_B": "beta-secret"})
    app = make_celery(Settings(redis_url=stack.redis_url))

    def send(job, call_id, name, arguments):
        app.send_task("spider.call_tool", (job, call_id, name, arguments), queue="sandbox")

    import redis

    caller = ToolCaller(redis.Redis.from_url(stack.redis_url, decode_responses=True), job_id, send)
    try:
        started = time.monotonic()
        answers = caller.call_many([("lookup_capital", {"country": "France"}), ("lookup_capital", {"country": "Japan"})],
                                   timeout=120)
        assert answers[0].ok and answers[0].content.startswith("Paris "), answers[0]
        assert answers[1].ok and answers[1].content.startswith("Tokyo ")
        env = answers[0].content.split(" ", 1)[1]
        assert "beta-secret" in env and "alpha-secret" not in env
        missing = caller.call("lookup_capital", {"nation": "France"}, timeout=60)
        assert not missing.ok and missing.error.type == "TypeError"
        unknown = caller.call("no_such_tool", {}, timeout=60)
        assert not unknown.ok and "no_such_tool" in unknown.error.message
        assert time.monotonic() - started < 120
    finally:
        import httpx

        httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {API_KEYS[0]}"})
    ended = caller.call("lookup_capital", {"country": "France"}, timeout=60)
    assert not ended.ok and ended.error.type == "JobEnded"
