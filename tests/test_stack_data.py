"""What the local stack keeps: its Redis, killed and started again on its folder, has every job and
its events; a process of it that dies unasked is started again, one that keeps dying is left down
and said so; JSONL is split at \\n only, so text with U+2028, U+2029 or U+0085 (in source rows, in
records) goes through a job unharmed."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from spider.client import SpiderClient
from spider.data.sinks import jsonl_line, read_jsonl, write_result
from spider.errors import SpiderError
from spider.local import LocalStack
from tests import helpers
from tests.helpers import make_config

# Every character that str.splitlines breaks at, and the three that JSON leaves raw in a string.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
SEPARATORS = "\u2028\u2029\x85"


# -- Redis persistence ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """A stack of this module's own: its Redis is killed and restarted here."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with LocalStack(env=env, log_dir=tmp_path_factory.mktemp("stack-data-logs")) as stack:
        yield stack


def events_of(stack: LocalStack, job_id: str) -> list[tuple[str, str]]:
    with SpiderClient(base_url=stack.url) as client:
        return [(e.id, e.kind) for e in client.stream_events(job_id, follow=False)]


@pytest.mark.slow
def test_a_killed_redis_restarted_on_its_folder_keeps_jobs_and_events(own_stack, tiny_model):
    config = make_config(own_stack.url, None, tiny_model)
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        before = client.poll_job(job_id, on_event=lambda e: None)
    assert before["status"] == "completed"
    events = events_of(own_stack, job_id)
    assert events[0][1] == "job.queued" and events[-1][1] == "job.completed"
    assert (own_stack.redis_dir / "appendonlydir").is_dir()

    own_stack.kill("redis")  # SIGKILL: no chance to save anything on the way out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{own_stack.url}/v1/jobs/{job_id}", timeout=5).raise_for_status()
    own_stack.restart("redis")  # returns once the API and every worker are back on it

    with SpiderClient(config=config) as client:
        after = client.get_job_status(job_id)
    assert {k: after[k] for k in ("status", "rows_total", "progress")} == {
        k: before[k] for k in ("status", "rows_total", "progress")}
    assert events_of(own_stack, job_id) == events


# -- supervision ------------------------------------------------------------------------------------


def crash(stack: LocalStack, name: str) -> int:
    """SIGKILL the process `name` (and its group) from outside, as the OOM killer would; its pid."""
    pid = stack.procs[name].pid
    os.killpg(pid, signal.SIGKILL)
    stack.procs[name].wait(timeout=30)
    return pid


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_started_again_and_runs_the_next_job(own_stack, tiny_model):
    restarted = len(own_stack.restarts)
    old = crash(own_stack, "worker-rollout")
    assert helpers.eventually(lambda: own_stack.procs["worker-rollout"].pid != old, timeout=10)
    assert own_stack.restarts[restarted:] == ["worker-rollout"]
    own_stack.wait_ready()
    with SpiderClient(config=make_config(own_stack.url, None, tiny_model)) as client:
        job_id = client.submit_job()["job_id"]
        assert client.poll_job(job_id, on_event=lambda e: None)["status"] == "completed"


@pytest.mark.slow
def test_a_worker_that_keeps_dying_soon_after_its_start_is_left_down_and_said_so(own_stack):
    own_stack.crash_limit, own_stack.QUICK_EXIT_S = 2, 3600.0  # every exit is one soon after a start
    try:
        restarted = len(own_stack.restarts)
        first = crash(own_stack, "worker-sandbox")  # 1st in a row: started again
        assert helpers.eventually(lambda: own_stack.procs["worker-sandbox"].pid != first, timeout=10)
        second = crash(own_stack, "worker-sandbox")  # 2nd in a row: left down
        assert helpers.eventually(lambda: "worker-sandbox" in own_stack.given_up, timeout=10)
        assert own_stack.restarts[restarted:] == ["worker-sandbox"]
        assert own_stack.procs["worker-sandbox"].pid == second and own_stack.procs["worker-sandbox"].poll() is not None
        with pytest.raises(SpiderError, match="local worker-sandbox exited 2 times in a row .* left down"):
            own_stack.wait(interval=0.1)
    finally:
        own_stack.crash_limit, own_stack.QUICK_EXIT_S = LocalStack.crash_limit, LocalStack.QUICK_EXIT_S
        own_stack.restart("worker-sandbox")  # asked for: it starts, and the stack serves as before
    assert own_stack.given_up == {} and own_stack.procs["worker-sandbox"].poll() is None


# -- JSONL --------------------------------------------------------------------------------------------


def test_jsonl_keeps_every_line_break_inside_a_record(tmp_path):
    records = [{"row_index": i, "text": f"a{sep}b", "nested": {"list": [sep, "x" + sep]}} for i, sep in
               enumerate(LINE_BREAKS)]
    path = tmp_path / "result.jsonl"
    assert write_result(records, path, "jsonl") == len(records)
    assert list(read_jsonl(path)) == records
    assert helpers.read_jsonl(path) == records
    # Written escaped: a reader that breaks at every line break still sees one record per line.
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records
    assert all(jsonl_line(r).count("\n") == 1 and jsonl_line(r).endswith("\n") for r in records)
    # Text other than line breaks stays as it is.
    assert jsonl_line({"t": "é中"}) == '{"t": "é中"}\n'


def test_jsonl_from_other_writers_splits_at_newline_only(tmp_path):
    """Another writer leaves U+2028, U+2029 and U+0085 raw in its strings (as json.dumps does with
    ensure_ascii=False) and may put \\r between tokens or end lines with \\r\\n."""
    rows = [{"question": f"one{sep}two", "i": i} for i, sep in enumerate(SEPARATORS)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    text += '{"question":\r "cr between tokens", "i": 3}\r\n\n  \n'
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text.encode("utf-8"))
    assert len(text.splitlines()) > 6  # what a splitlines reader would have broken apart
    expected = [*rows, {"question": "cr between tokens", "i": 3}]
    assert list(read_jsonl(path)) == expected
    assert helpers.read_jsonl(path) == expected


def mark_separators(record):
    return {**record, "marked": "model\u2028output\u2029with\x85breaks " + record["prompt"]}


@pytest.mark.slow
def test_a_post_processor_job_keeps_line_separators_of_rows_and_records(own_stack, firejail, tiny_model, tmp_path):
    rows = [{"question": f"Question {i}:{sep}why{sep}not?"} for i, sep in enumerate(SEPARATORS)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = make_config(own_stack.url, None, tiny_model, **{"source.dataset": str(source), "source.split": "train"})
    out = tmp_path / "result.jsonl"
    with SpiderClient(config=config, post_processor=mark_separators) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["status"] == "completed", status
        client.download_result(job_id, out)
    records = helpers.read_jsonl(out)
    assert [r["row_index"] for r in records] == [0, 1, 2]
    for record, row in zip(records, rows):
        assert record["error"] is None
        assert row["question"] in record["prompt"]
        assert record["marked"] == "model\u2028output\u2029with\x85breaks " + record["prompt"]
