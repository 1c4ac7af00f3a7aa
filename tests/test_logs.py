"""Structured logs: a stack whose processes log JSON (SPIDER_LOG_FORMAT=json) runs a real job;
every line its API, workers and Flower wrote parses, and the lines about the job carry its id."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from spider.client import SpiderClient
from spider.errors import SpiderError
from spider.local import LocalStack, WorkerSpec, free_port
from spider.logs import JsonFormatter, about_job, job_of_path, log_format
from tests.helpers import ROOT, make_config

KEY = "key-logs"
FIELDS = {"time", "level", "logger", "message", "process", "pid"}


def log_lines(path: Path) -> list[dict]:
    """Every line of a process's log, each of which must be one JSON object with the common fields."""
    lines = [line for line in path.read_bytes().decode().split("\n") if line]
    assert lines, f"{path.name} is empty"
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name}: a line that is not JSON: {line[:300]!r}")
        assert FIELDS <= set(entry), (path.name, entry)
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory):
    env = {"SPIDER_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    workers = (WorkerSpec("control", "threads", 2), WorkerSpec("rollout", "threads", 2))
    with LocalStack(api_keys=(KEY,), env=env, workers=workers, flower_port=free_port(),
                    log_dir=tmp_path_factory.mktemp("json-logs")) as running:
        yield running


@pytest.mark.slow
def test_a_jobs_lines_in_every_process_log_are_json_and_carry_its_id(json_stack, tiny_model):
    config = make_config(json_stack.url, KEY, tiny_model)
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        assert client.poll_job(job_id, interval=0.5)["status"] == "completed"
        client.get_job_status(job_id)
    logs = json_stack.log_dir
    control, rollout = log_lines(logs / "worker-control.log"), log_lines(logs / "worker-rollout.log")
    api = log_lines(logs / "api.log")

    def tasks_done(entries: list[dict]) -> dict[str, str | None]:
        """Celery's 'Task <name>[<id>] succeeded' lines: the task name -> the job id the line carries."""
        return {e["message"].split("[")[0].removeprefix("Task "): e.get("job_id")
                for e in entries if e["logger"] == "celery.app.trace" and "succeeded" in e["message"]}

    assert tasks_done(control) == {"spider.plan_job": job_id, "spider.finalize_job": job_id}
    assert tasks_done(rollout) == {"spider.run_batch": job_id}
    # Each worker logs under its node name; lines about no job carry none.
    assert {e["process"].split("@")[0] for e in rollout} == {f"worker-rollout-{json_stack.port}"}
    ready = [e for e in rollout if e["message"].endswith(" ready.")]
    assert ready and all("job_id" not in e for e in ready)
    # The API's access log: requests about the job carry its id, the submit (before it had one) none.
    access = [e for e in api if e["logger"] == "uvicorn.access"]
    about = [e for e in access if f"/v1/jobs/{job_id}" in e["message"]]
    assert about and all(e.get("job_id") == job_id for e in about)
    submits = [e for e in access if '"POST /v1/jobs HTTP' in e["message"]]
    assert submits and all("job_id" not in e for e in submits)
    assert {e["process"] for e in api} == {"api"}
    flower = log_lines(logs / "flower.log")
    assert {e["process"] for e in flower} == {"flower"} and any(e["logger"].startswith("flower.") for e in flower)


def test_the_formatter_writes_one_ascii_line_with_the_job_and_the_traceback():
    formatter = JsonFormatter("worker-x@host")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("spider.test", logging.ERROR, __file__, 1, "row %s:\u2028%s", ("a", "b"),
                                   sys.exc_info())
    with about_job("0123456789abcdef"):
        line = formatter.format(record)
    assert "\n" not in line and line.isascii()  # U+2028 and the traceback's newlines are escaped
    entry = json.loads(line)
    assert entry["message"] == "row a:\u2028b" and entry["job_id"] == "0123456789abcdef"
    assert entry["level"] == "ERROR" and entry["logger"] == "spider.test" and entry["process"] == "worker-x@host"
    assert "ValueError: boom" in entry["exception"]
    assert "job_id" not in json.loads(formatter.format(logging.LogRecord("x", 20, "", 1, "m", (), None)))


def test_only_job_ids_become_the_job_of_a_line():
    assert job_of_path("/v1/jobs/0123456789abcdef/events") == "0123456789abcdef"
    assert job_of_path("/v1/jobs/0123456789abcdef") == "0123456789abcdef"
    assert job_of_path("/v1/jobs/not-a-job-id") is None and job_of_path("/v1/jobs") is None
    with about_job("../../etc"):
        line = json.loads(JsonFormatter("api").format(logging.LogRecord("x", 20, "", 1, "m", (), None)))
    assert "job_id" not in line


def test_an_unknown_log_format_is_refused(monkeypatch):
    monkeypatch.setenv("SPIDER_LOG_FORMAT", "xml")
    with pytest.raises(SpiderError, match="unknown log format 'xml'"):
        log_format()
    assert log_format("json") == "json"
    monkeypatch.delenv("SPIDER_LOG_FORMAT")
    assert log_format() == "text"
    proc = subprocess.run([sys.executable, "-m", "spider", "serve", "--log-format", "xml"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'xml'" in proc.stderr
