"""Flower, as `spider flower` starts it: always behind basic auth (a generated login when none is
set), and showing Spider's tasks by their names, states and job ids, and its queues' lengths,
through its HTTP API. Real Flower, real workers, a real job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from spider.client import SpiderClient
from spider.local import LocalStack, WorkerSpec, free_port, terminate, wait_http
from tests.helpers import ROOT, make_config

KEY = "key-flower"


def until(fetch, done, timeout: float = 120.0, what: str = "Flower"):
    """Poll `fetch()` until `done(result)`: Flower learns of tasks and workers from events."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = fetch()
            if done(result):
                return result
        except (httpx.HTTPError, ValueError):
            result = None
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not show it in {timeout:.0f} s; last answer: {result!r:.2000}")
        time.sleep(0.5)


def test_spider_flower_generates_a_login_when_none_is_set_and_wants_it(redis_url, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    env["SPIDER_REDIS_URL"] = redis_url
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spider", "flower", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> None:
        if proc.poll() is not None:
            pytest.fail(f"spider flower exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthcheck", alive, 90, "spider flower")
        login = [line for line in log.read_text().splitlines() if line.startswith("Flower's login")]
        assert login, log.read_text()[-2000:]
        user, _, password = login[0].rsplit(" ", 1)[1].partition(":")
        assert user == "admin" and len(password) >= 20
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(user, "wrong"), timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(user, password), timeout=10).status_code == 200
        # The broker's password is on no command line.
        assert redis_url.split("@")[0].split(":")[-1] not in " ".join(_cmdline(proc.pid))
    finally:
        terminate([proc], grace=10)


def _cmdline(pid: int) -> list[str]:
    return open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory):
    workers = (WorkerSpec("control", "threads", 2), WorkerSpec("rollout", "threads", 2))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with LocalStack(api_keys=(KEY,), env=env, workers=workers, flower_port=free_port(),
                    log_dir=tmp_path_factory.mktemp("flower-stack")) as running:
        base = f"http://127.0.0.1:{running.flower_port}"
        wait_http(f"{base}/healthcheck", running.check, 90, "Flower")
        yield running, base, tuple(running.flower_auth.split(":", 1))


@pytest.mark.slow
def test_flower_shows_a_jobs_tasks_by_name_state_and_job_id(flower_stack, tiny_model):
    stack, base, auth = flower_stack
    config = make_config(stack.url, KEY, tiny_model)
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        assert client.poll_job(job_id, interval=0.5)["status"] == "completed"

    def the_jobs_tasks(tasks: dict) -> dict[str, list[dict]]:
        by_name: dict[str, list[dict]] = {}
        for task in tasks.values():
            if job_id in str(task.get("args")):
                by_name.setdefault(task["name"], []).append(task)
        return by_name

    def all_succeeded(tasks: dict) -> bool:
        mine = the_jobs_tasks(tasks)
        return (set(mine) == {"spider.plan_job", "spider.run_batch", "spider.finalize_job"}
                and all(t["state"] == "SUCCESS" for ts in mine.values() for t in ts) and len(mine["spider.run_batch"]) == 2)

    tasks = until(lambda: httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json(), all_succeeded)
    mine = the_jobs_tasks(tasks)
    # 6 rows in batches of 4: batches 0 and 1, each a task whose arguments are (job id, batch index).
    assert sorted(t["args"] for t in mine["spider.run_batch"]) == [f"('{job_id}', 0)", f"('{job_id}', 1)"]
    assert {t["worker"].split("@")[0] for t in mine["spider.run_batch"]} == {f"worker-rollout-{stack.port}"}
    assert {t["worker"].split("@")[0] for t in mine["spider.plan_job"]} == {f"worker-control-{stack.port}"}

    # Queue lengths, read by Flower from the Redis broker: this stack has no sandbox worker, so
    # two tool calls sent there wait; every other queue is drained.
    from celery import Celery

    with Celery("spider", broker=stack.redis_url) as producer:
        for call in ("c1", "c2"):
            producer.send_task("spider.call_tool", args=["0123456789abcdef", call, "tool", {}], queue="sandbox")
    expected = {"control": 0, "rollout": 0, "sandbox": 2, "train": 0}
    lengths = until(lambda: httpx.get(f"{base}/api/queues/length", auth=auth, timeout=30).json(),
                    lambda answer: {q["name"]: q["messages"] for q in answer["active_queues"]} == expected)
    assert len(lengths["active_queues"]) == 4
