"""The sandbox library with real firejail, real jailed interpreters and real processes.

User functions here are defined in this test module, which is a local file: they travel by value
into jails that cannot see this repository at all.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from spider.bundle import BUNDLE_MAGIC, build_bundle, split_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.errors import BundleError, SandboxError
from spider.sandbox import Sandbox
from spider.sandbox.jail import job_uid

USERPKG = Path(__file__).parent / "userpkg"
pytestmark = pytest.mark.usefixtures("firejail")


@pytest.fixture(scope="module")
def sandbox_root():
    base = Path(tempfile.mkdtemp(prefix="spider-sandbox-test-", dir="/tmp"))
    base.chmod(0o755)
    yield base / "root"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(sandbox_root):
    box = Sandbox(sandbox_root, pool_size=2)
    yield box
    box.close()


def new_job(sandbox, runtime=None, secrets=None, **bundle_args):
    job_id = f"t-{uuid.uuid4().hex[:10]}"
    return sandbox.open_job(job_id, build_bundle(**bundle_args), runtime or RuntimeConfig(), secrets or {})


def fast_limits(**overrides):
    return RuntimeConfig(limits=SandboxLimits(**{"call_timeout_s": 1.0, **overrides}))


# -- user functions (shipped by value) ---------------------------------------------------------


def reformat(row, suffix="?"):
    if row.get("skip"):
        return None
    if row.get("fail"):
        raise ValueError(f"row {row['i']} is bad")
    return {"prompt": row["text"].strip().capitalize() + suffix}


def returns_a_set(row):
    return {"tags": {1, 2}}


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": sum(values) / len(values)}


def whoami() -> dict:
    import os

    return {"pid": os.getpid(), "uid": os.getuid(), "cwd": os.getcwd(), "env": dict(os.environ)}


INTERPRETER = {}


def interpreter_id() -> str:
    """A token that is new in every interpreter (each unpickles its own copy of INTERPRETER)."""
    import uuid

    return INTERPRETER.setdefault("id", uuid.uuid4().hex)


def chatty(row):
    print("user output on stdout", row)
    return row


def spin(seconds: float = 1e9) -> str:
    end = __import__("time").monotonic() + seconds
    while __import__("time").monotonic() < end:
        pass
    return "done"


def stubborn_spin() -> str:
    import signal
    import time

    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        try:
            time.sleep(0.01)
        except BaseException:
            pass


def crash_on(row):
    import os

    if row.get("crash"):
        os._exit(7)
    return {"i": row["i"]}


def segfault() -> str:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return "still alive"


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def connect(port: int) -> str:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        return f"blocked: {type(exc).__name__}: {exc}"
    return "connected"


def fixed_kwarg(query: str, api_key: str) -> str:
    return f"{query} with {api_key}"


def uses_yaml(row):
    return {"dumped": yaml.safe_dump(row)}  # noqa: F821 (bound below; the jail has no yaml)


import yaml  # noqa: E402  (a third-party module: it travels by name)

# -- processors ------------------------------------------------------------------------------


def test_processors_keep_drop_and_error_per_row(sandbox):
    job = new_job(sandbox, pre_processor=reformat, post_processor=lambda r: r if len(r["prompt"]) > 4 else None)
    rows = [{"text": " hello "}, {"skip": True}, {"fail": True, "i": 2}, {"text": "why"}]
    outcomes = job.pre_process(rows, {"suffix": "!"})
    assert [o.status for o in outcomes] == ["kept", "dropped", "error", "kept"]
    assert outcomes[0].value == {"prompt": "Hello!"} and outcomes[3].value == {"prompt": "Why!"}
    error = outcomes[2].error
    assert (error.kind, error.type, error.message) == ("exception", "ValueError", "row 2 is bad")
    assert "reformat" in error.traceback
    post = job.post_process([o.value for o in outcomes if o.kept])
    assert [o.status for o in post] == ["kept", "dropped"]
    sandbox.close_job(job.job_id)


def test_a_non_json_result_is_an_error_for_that_row(sandbox):
    job = new_job(sandbox, post_processor=returns_a_set)
    (outcome,) = job.post_process([{"a": 1}])
    assert outcome.status == "error" and outcome.error.type == "TypeError"
    assert "not JSON data" in outcome.error.message
    sandbox.close_job(job.job_id)


def test_no_processor_keeps_everything_without_running_anything(sandbox):
    job = new_job(sandbox, tools=[(add, tool_spec(add))])
    assert [o.value for o in job.pre_process([{"a": 1}, {"b": 2}])] == [{"a": 1}, {"b": 2}]
    sandbox.close_job(job.job_id)


def test_user_output_does_not_disturb_the_pipe(sandbox):
    job = new_job(sandbox, pre_processor=chatty)
    assert [o.value for o in job.pre_process([{"x": i} for i in range(50)])] == [{"x": i} for i in range(50)]
    sandbox.close_job(job.job_id)


def test_user_project_with_local_helper_modules_runs_in_the_jail(sandbox, tmp_path):
    out = tmp_path / "user.bundle"
    subprocess.run([sys.executable, "make_bundle.py", str(out)], cwd=USERPKG, check=True, timeout=120)
    job = sandbox.open_job(f"user-{uuid.uuid4().hex[:8]}", out.read_bytes(), RuntimeConfig(), {})
    pre = job.pre_process([{"question": "what  is a jail"}, {"question": ""}], {"tag": "demo"})
    assert [o.value for o in pre] == [{"prompt": "Q: What is a jail", "tag": "demo"}, None]
    assert [o.status for o in pre] == ["kept", "dropped"]
    post = job.post_process([{"completion": "two words"}, {"completion": "eggs and ham"}, {"completion": "one"}])
    assert [o.status for o in post] == ["kept", "dropped", "dropped"]
    assert post[0].value == {"completion": "two words", "reason": "ok", "words": 2}
    assert [spec.name for spec in job.tool_specs] == ["convert", "square", "shout"]
    assert job.call_tool("convert", {"value": 2, "unit": "cm", "precision": 3}).content == "0.020 m (centimetre)"
    assert job.call_tool("square", {"base": 12}).content == "144"
    assert job.call_tool("shout", {"text": "hey"}).content == "HEY!"
    sandbox.close_job(job.job_id)


def test_functions_importing_local_modules_when_they_run_work_in_the_jail(sandbox, tmp_path):
    """Processors and tools whose bodies import the user's local modules (one imported lazily by
    another, a package with a relative import) find them in a jail that has none of their files."""
    out = tmp_path / "lazy.bundle"
    subprocess.run([sys.executable, "make_lazy_bundle.py", str(out)], cwd=USERPKG, check=True, timeout=120)
    job = sandbox.open_job(f"lazy-{uuid.uuid4().hex[:8]}", out.read_bytes(), RuntimeConfig(), {})
    pre = job.pre_process([{"question": "what  is a jail"}])
    assert [o.value for o in pre] == [{"prompt": "Q: What is a jail"}]
    post = job.post_process([{"prompt": "Q: Why", "completion": "two words"}, {"prompt": "Q: Why", "completion": "eggs"}])
    assert [o.value for o in post] == [{"prompt": "Q: Why", "completion": "two words", "question": "Why"}, None]
    assert job.call_tool("headline", {"text": "jails  everywhere"}).content == "*** JAILS EVERYWHERE ***"
    assert job.call_tool("count", {"text": "the state of the jail"}).content == '{"words": 5, "content_words": 2}'
    # A failure inside a shipped module points at its file and line.
    failed = job.call_tool("count", {"text": 7})
    assert failed.error.type == "AttributeError"
    assert 'wordtools/counting.py", line 7' in failed.error.traceback and "text.lower()" in failed.error.traceback
    sandbox.close_job(job.job_id)


def test_a_big_batch_is_shared_by_the_pool_and_keeps_its_order(sandbox):
    job = new_job(sandbox, pre_processor=crash_on)
    rows = [{"i": i} for i in range(3000)]
    outcomes = job.pre_process(rows)
    assert [o.value["i"] for o in outcomes] == list(range(3000))
    # Two parts ran; a second interpreter starts unless the first part finished before it was needed.
    assert job.interpreters_started in (1, 2)
    sandbox.close_job(job.job_id)


# -- tools -----------------------------------------------------------------------------------


def test_tool_results_errors_and_hidden_kwargs(sandbox):
    def broken(x: int) -> int:
        return 1 // x

    job = new_job(
        sandbox,
        tools=[
            (add, tool_spec(add)),
            (stats, tool_spec(stats)),
            (broken, tool_spec(broken)),
            (fixed_kwarg, tool_spec(fixed_kwarg, kwargs={"api_key": "K-123"})),
        ],
    )
    assert [s.name for s in job.tool_specs] == ["add", "stats", "broken", "fixed_kwarg"]
    assert job.tool_specs[0].to_openai()["function"]["description"] == "Add two integers."
    assert job.call_tool("add", {"a": 2, "b": 40}).content == "42"
    assert job.call_tool("stats", {"values": [1, 2, 3]}).content == '{"n": 3, "mean": 2.0}'
    failed = job.call_tool("broken", {"x": 0})
    assert not failed.ok and failed.error.type == "ZeroDivisionError"
    assert failed.as_tool_message() == "Error: ZeroDivisionError: integer division or modulo by zero"
    assert job.call_tool("add", {"a": 1}).error.type == "TypeError"
    unknown = job.call_tool("nope", {})
    assert unknown.error.type == "UnknownTool" and "add, stats" in unknown.error.message
    assert job.call_tool("fixed_kwarg", {"query": "q"}).content == "q with K-123"
    # The model cannot override a fixed keyword argument.
    assert job.call_tool("fixed_kwarg", {"query": "q", "api_key": "mine"}).content == "q with K-123"
    sandbox.close_job(job.job_id)


def test_a_slow_call_times_out_and_the_interpreter_survives(sandbox):
    job = new_job(sandbox, runtime=fast_limits(), tools=[(spin, tool_spec(spin)), (interpreter_id, tool_spec(interpreter_id))])
    before = job.call_tool("interpreter_id", {})
    started = time.monotonic()
    outcome = job.call_tool("spin", {})
    assert time.monotonic() - started < 1.9
    assert outcome.error.kind == "timeout" and outcome.error.type == "CallTimeout"
    assert job.call_tool("spin", {"seconds": 0.1}).content == "done"
    assert job.call_tool("interpreter_id", {}).content == before.content
    sandbox.close_job(job.job_id)


def test_a_call_that_defeats_the_alarm_is_killed_with_its_jail(sandbox):
    tools = [(stubborn_spin, tool_spec(stubborn_spin)), (interpreter_id, tool_spec(interpreter_id))]
    job = new_job(sandbox, runtime=fast_limits(), tools=tools)
    first = job.call_tool("interpreter_id", {}).content
    started = time.monotonic()
    outcome = job.call_tool("stubborn_spin", {})
    elapsed = time.monotonic() - started
    assert outcome.error.kind == "timeout" and "killed" in outcome.error.message
    assert 1.0 <= elapsed < 4.0
    second = job.call_tool("interpreter_id", {})
    assert second.ok and second.content != first
    sandbox.close_job(job.job_id)


def test_a_crash_fails_only_its_own_row(sandbox):
    job = new_job(sandbox, pre_processor=crash_on, tools=[(segfault, tool_spec(segfault)), (add, tool_spec(add))])
    rows = [{"i": i, "crash": i == 5} for i in range(10)]
    outcomes = job.pre_process(rows)
    assert [o.status for o in outcomes] == ["kept"] * 5 + ["error"] + ["kept"] * 4
    assert outcomes[5].error.kind == "crash"
    assert [o.value["i"] for o in outcomes if o.kept] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    crashed = job.call_tool("segfault", {})
    assert crashed.error.kind == "crash"
    assert job.call_tool("add", {"a": 1, "b": 1}).content == "2"
    sandbox.close_job(job.job_id)


def test_interpreters_are_recycled_after_n_calls(sandbox_root):
    box = Sandbox(sandbox_root, pool_size=1, max_calls_per_interpreter=3)
    try:
        job = new_job(box, tools=[(interpreter_id, tool_spec(interpreter_id))])
        pids = [job.call_tool("interpreter_id", {}).content for _ in range(7)]
        # The warm-up interpreter serves calls 1-3, the next 4-6, a third one call 7.
        assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
        assert job.interpreters_started == 3
    finally:
        box.close()


def test_the_pool_serves_concurrent_calls(sandbox):
    job = new_job(sandbox, tools=[(nap, tool_spec(nap))])
    job.call_tool("nap", {"seconds": 0})
    results = []
    threads = [threading.Thread(target=lambda: results.append(job.call_tool("nap", {"seconds": 0.8}))) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 1.5
    assert [r.content for r in results] == ["0.8", "0.8"]
    sandbox.close_job(job.job_id)


# -- environment, secrets, network -----------------------------------------------------------


def test_the_jail_environment_is_built_from_nothing(sandbox, monkeypatch):
    monkeypatch.setenv("SPIDER_SERVER_ONLY_SECRET", "server-side-value")
    job = new_job(
        sandbox,
        runtime=RuntimeConfig(env={"MODE": "test"}),
        secrets={"MY_API_KEY": "job-secret"},
        tools=[(whoami, tool_spec(whoami))],
    )
    seen = __import__("json").loads(job.call_tool("whoami", {}).content)
    assert seen["env"]["MY_API_KEY"] == "job-secret" and seen["env"]["MODE"] == "test"
    assert set(seen["env"]) == {"MY_API_KEY", "MODE", "PATH", "HOME", "TMPDIR", "LANG"}
    assert seen["cwd"] == seen["env"]["HOME"] and seen["cwd"].endswith(f"{job.job_id}/scratch")
    assert seen["uid"] == job_uid(job.job_id) and seen["uid"] != 0
    sandbox.close_job(job.job_id)


@pytest.fixture()
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(5)
    yield server.getsockname()[1]
    server.close()


def test_network_is_off_unless_the_job_opts_in(sandbox, listener):
    closed = new_job(sandbox, tools=[(connect, tool_spec(connect))])
    assert closed.call_tool("connect", {"port": listener}).content.startswith("blocked")
    sandbox.close_job(closed.job_id)
    # With network, a jail still has its own namespace: the host's loopback (where Redis and the
    # API listen) stays out of reach; egress goes through the worker's checked proxy only
    # (tests/test_security_jail_network.py).
    opened = new_job(sandbox, runtime=RuntimeConfig(network=True), tools=[(connect, tool_spec(connect))])
    assert opened.call_tool("connect", {"port": listener}).content.startswith("blocked")
    sandbox.close_job(opened.job_id)


# -- refusing what cannot run safely ----------------------------------------------------------


def test_no_firejail_no_user_code_unless_unsafe(sandbox_root, caplog):
    with pytest.raises(SandboxError, match="firejail is not installed"):
        Sandbox(sandbox_root, firejail="/nonexistent/firejail")
    box = Sandbox(sandbox_root, firejail="/nonexistent/firejail", unsafe=True)
    try:
        with caplog.at_level(logging.WARNING, logger="spider.sandbox"):
            for _ in range(2):
                job = new_job(box, tools=[(add, tool_spec(add))])
                assert job.call_tool("add", {"a": 1, "b": 2}).content == "3"
                box.close_job(job.job_id)
        warnings = [r for r in caplog.records if "WITHOUT isolation" in r.getMessage()]
        assert len(warnings) == 2
    finally:
        box.close()


def rewrite_python(bundle: bytes, version: str) -> bytes:
    import json
    import struct

    header, _ = split_bundle(bundle)
    sections = bundle[len(BUNDLE_MAGIC) + 4 + struct.unpack_from(">I", bundle, len(BUNDLE_MAGIC))[0] :]
    header["python"] = version
    data = json.dumps(header).encode()
    return BUNDLE_MAGIC + struct.pack(">I", len(data)) + data + sections


def test_python_version_mismatch_is_a_clear_error(sandbox):
    bundle = rewrite_python(build_bundle(pre_processor=reformat), "3.10.4")
    with pytest.raises(BundleError, match=r"Python 3\.10\.4.*this sandbox runs Python 3\.11"):
        sandbox.open_job("mismatch", bundle, RuntimeConfig(), {})


def test_a_bundle_that_cannot_load_fails_at_open(sandbox):
    with pytest.raises(BundleError, match="(?s)No module named 'yaml'.*runtime.packages"):
        new_job(sandbox, pre_processor=uses_yaml)


def test_bad_job_input_is_refused(sandbox):
    bundle = build_bundle(pre_processor=reformat)
    with pytest.raises(SandboxError, match="job id"):
        sandbox.open_job("../escape", bundle, RuntimeConfig(), {})
    with pytest.raises(SandboxError, match="environment variable name"):
        sandbox.open_job("envbad", bundle, RuntimeConfig(), {"BAD NAME": "x"})
    job = new_job(sandbox, pre_processor=reformat)
    with pytest.raises(SandboxError, match="plain data"):
        job.pre_process([{"when": object()}])
    sandbox.close_job(job.job_id)


def test_open_is_idempotent_and_close_removes_the_scratch(sandbox):
    bundle = build_bundle(pre_processor=reformat)
    job = sandbox.open_job("reopen", bundle, RuntimeConfig(), {})
    assert sandbox.open_job("reopen", bundle, RuntimeConfig(), {}) is job
    assert sandbox.job("reopen") is job
    with pytest.raises(SandboxError, match="different bundle"):
        sandbox.open_job("reopen", build_bundle(pre_processor=chatty), RuntimeConfig(), {})
    scratch = sandbox.root / "jobs" / "reopen" / "scratch"
    assert scratch.is_dir()
    sandbox.close_job("reopen")
    assert not scratch.exists()
    with pytest.raises(SandboxError, match="not open"):
        sandbox.job("reopen")
    with pytest.raises(SandboxError, match="closed"):
        job.pre_process([{"text": "x"}])
