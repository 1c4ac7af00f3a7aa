"""The escape suite: user code tries to get out, and each attempt must fail while the job's
sandbox keeps serving calls.

Everything is real: firejail, the jailed interpreters, the job users, the process limits. The
attempts run as tools (and one as a processor) of jobs opened on one sandbox, with tight limits.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.sandbox import Sandbox
from spider.sandbox.jail import job_uid

pytestmark = pytest.mark.usefixtures("firejail")

LIMITS = SandboxLimits(memory_mb=256, call_timeout_s=2.0, cpu_seconds=10, max_processes=32, file_size_mb=8)
SERVER_SECRET = "server-secret-" + uuid.uuid4().hex
OTHER_JOB_SECRET = "other-job-secret-" + uuid.uuid4().hex


# -- the attempts (shipped by value into the jail) --------------------------------------------


def ping() -> str:
    return "pong"


def try_read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return "read: " + handle.read(64).decode(errors="replace")
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def try_list(path: str) -> str:
    import os

    try:
        return "listed: " + ",".join(sorted(os.listdir(path)))
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def try_write(path: str) -> str:
    try:
        with open(path, "w") as handle:
            handle.write("escaped")
        return "written"
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def try_connect(host: str, port: int) -> str:
    import socket

    try:
        socket.create_connection((host, port), timeout=2).close()
        return "connected"
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def try_resolve(name: str) -> str:
    import socket

    try:
        return "resolved: " + socket.gethostbyname(name)
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def find_text(needle: str) -> str:
    """Look for `needle` in this process's environment and in every visible process's."""
    import os

    if any(needle in value for value in os.environ.values()):
        return "found in os.environ"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as handle:
                    if needle.encode() in handle.read():
                        return f"found in /proc/{pid}/{name}"
            except OSError:
                continue
    return "not found"


def write_private(name: str, text: str) -> str:
    import os

    with open(name, "w") as handle:
        handle.write(text)
    return os.path.abspath(name)


def fork_bomb() -> str:
    import os
    import time

    while True:
        try:
            os.fork()
        except OSError:
            pass
        time.sleep(0.005)


def hog_memory(megabytes: int) -> str:
    block = bytearray(megabytes * 1024 * 1024)
    return f"allocated {len(block)}"


def spin_in_c() -> str:
    import itertools

    return str(sum(itertools.count()))  # a C loop that never looks at signals


def kill_parent() -> str:
    import os
    import signal

    results = []
    for pid in (os.getppid(), 1):
        try:
            os.kill(pid, signal.SIGKILL)
            results.append(f"killed {pid}")
        except OSError as exc:
            results.append(f"blocked: {type(exc).__name__}")
    return "; ".join(results)


def become_root() -> str:
    import os

    try:
        os.setuid(0)
        return "root"
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def leave_background(marker: str) -> str:
    import os
    import subprocess
    import time

    subprocess.Popen(["/usr/bin/sleep", marker], start_new_session=True)
    pid = os.fork()
    if pid == 0:  # a classic daemon: fork, setsid, fork again, outlive the parent
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", marker + "1"])
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.2)
    return "left behind"


def count_leftovers(marker: str) -> int:
    import os

    found = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                found += marker.encode() in handle.read()
        except OSError:
            continue
    return found


def row_spins(row):
    if row.get("spin"):
        spin_in_c()
    return row


TOOLS = [
    ping, try_read, try_list, try_write, try_connect, try_resolve, find_text, write_private, fork_bomb,
    hog_memory, spin_in_c, kill_parent, become_root, leave_background, count_leftovers,
]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    base = Path(tempfile.mkdtemp(prefix="spider-escape-test-", dir="/tmp"))
    base.chmod(0o755)
    box = Sandbox(base / "root", pool_size=1)
    yield box
    box.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def other_job(sandbox):
    """A neighbour job with a secret and a private file."""
    bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
    secrets = {"NEIGHBOUR_TOKEN": OTHER_JOB_SECRET}
    job = sandbox.open_job("neighbour-" + uuid.uuid4().hex[:6], bundle, RuntimeConfig(limits=LIMITS), secrets)
    yield job
    sandbox.close_job(job.job_id)


@pytest.fixture(scope="module")
def job(sandbox, other_job):
    os.environ["SPIDER_TEST_SERVER_SECRET"] = SERVER_SECRET
    try:
        bundle = build_bundle(pre_processor=row_spins, tools=[(f, tool_spec(f)) for f in TOOLS])
        job = sandbox.open_job("attacker-" + uuid.uuid4().hex[:6], bundle, RuntimeConfig(limits=LIMITS), {"OWN_TOKEN": "mine"})
    finally:
        del os.environ["SPIDER_TEST_SERVER_SECRET"]
    yield job
    sandbox.close_job(job.job_id)


def call(job, tool, /, **arguments) -> str:
    outcome = job.call_tool(tool, arguments)
    assert outcome.ok, outcome.error
    return outcome.content


def still_serving(job) -> None:
    assert job.call_tool("ping", {}).content == "pong"


def job_processes(job_id: str) -> list[str]:
    """Command lines (with their state) of the processes running as the job's user on the host."""
    uid = job_uid(job_id)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{state} {cmdline}")
        except OSError:
            continue
    return found


def settled_leftovers(job_id: str, unwanted, wait_s: float = 3.0) -> list[str]:
    """The job's unwanted processes, once killed ones have had a moment to be reaped."""
    deadline = time.monotonic() + wait_s
    while True:
        leftovers = [cmd for cmd in job_processes(job_id) if unwanted(cmd)]
        if not leftovers or time.monotonic() > deadline:
            return leftovers
        time.sleep(0.1)


# -- the suite ---------------------------------------------------------------------------------


def test_network_connections_fail(job):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert call(job, "try_connect", host="127.0.0.1", port=server.getsockname()[1]).startswith("blocked")
    finally:
        server.close()
    assert call(job, "try_connect", host="1.1.1.1", port=443).startswith("blocked")
    assert call(job, "try_resolve", name="pypi.org").startswith("blocked")
    still_serving(job)


def test_system_secrets_are_unreadable(job):
    assert call(job, "try_read", path="/etc/shadow").startswith("blocked")
    assert call(job, "try_list", path="/root").startswith("blocked")
    assert call(job, "try_read", path="/proc/1/environ").startswith("blocked")
    assert call(job, "become_root").startswith("blocked")
    still_serving(job)


def test_another_jobs_scratch_and_secrets_are_out_of_reach(job, other_job, sandbox):
    private = call(other_job, "write_private", name="notes.txt", text="neighbour's data")
    assert Path(private).read_text() == "neighbour's data"  # it exists, on the host
    assert call(other_job, "find_text", needle=OTHER_JOB_SECRET) == "found in os.environ"  # its own secret reaches it
    assert call(job, "try_read", path=private).startswith("blocked")
    assert call(job, "try_list", path=str(Path(private).parent)).startswith("blocked")
    assert call(job, "try_read", path=str(sandbox.root / "jobs" / other_job.job_id / "bundle.bin")).startswith("blocked")
    assert call(job, "try_list", path=str(sandbox.root / "jobs")) == "listed: " + job.job_id
    assert call(job, "find_text", needle=OTHER_JOB_SECRET) == "not found"
    assert call(job, "find_text", needle="mine") == "found in os.environ"
    still_serving(job)


def test_the_servers_files_and_environment_are_invisible(job):
    cwd = Path.cwd()
    assert call(job, "try_list", path=str(cwd)).startswith("blocked")
    assert call(job, "try_read", path=str(Path(__file__))).startswith("blocked")
    assert call(job, "try_read", path=f"/proc/{os.getpid()}/environ").startswith("blocked")
    assert call(job, "find_text", needle=SERVER_SECRET) == "not found"
    still_serving(job)


def test_writes_outside_the_scratch_dir_fail(job, sandbox):
    scratch = sandbox.root / "jobs" / job.job_id / "scratch"
    targets = [
        Path("/tmp") / f"escape-{uuid.uuid4().hex}",
        Path("/etc") / f"escape-{uuid.uuid4().hex}",
        Path("/usr/lib") / f"escape-{uuid.uuid4().hex}",
        Path("/dev/shm") / f"escape-{uuid.uuid4().hex}",
        Path("/var/tmp") / f"escape-{uuid.uuid4().hex}",
        sandbox.root / f"escape-{uuid.uuid4().hex}",
        scratch.parent / "bundle.bin",
        sandbox.runtime_dir / "spider_jail.py",
        Path.cwd() / f"escape-{uuid.uuid4().hex}",
    ]
    originals = {t: t.read_bytes() for t in targets if t.exists()}
    for target in targets:
        assert call(job, "try_write", path=str(target)).startswith("blocked"), target
    for target in targets:
        assert (target.read_bytes() == originals[target]) if target in originals else not target.exists(), target
    assert call(job, "try_write", path=str(scratch / "fine.txt")) == "written"
    assert (scratch / "fine.txt").read_text() == "escaped"
    still_serving(job)


def test_a_fork_bomb_is_contained_and_cleaned_up(job):
    started = time.monotonic()
    outcome = job.call_tool("fork_bomb", {})
    assert outcome.error is not None and outcome.error.kind == "timeout"
    assert time.monotonic() - started < LIMITS.call_timeout_s + 3
    still_serving(job)
    assert settled_leftovers(job.job_id, lambda cmd: "spider_jail.py" not in cmd) == []


def test_allocating_ten_times_the_memory_limit_fails(job):
    outcome = job.call_tool("hog_memory", {"megabytes": 10 * LIMITS.memory_mb})
    assert outcome.error is not None and outcome.error.type == "MemoryError" and outcome.error.kind == "limit"
    still_serving(job)


def test_spinning_forever_is_stopped(job):
    started = time.monotonic()
    outcome = job.call_tool("spin_in_c", {})
    assert outcome.error.kind == "timeout"
    assert time.monotonic() - started < LIMITS.call_timeout_s + 3
    still_serving(job)
    outcomes = job.pre_process([{"i": 0}, {"i": 1, "spin": True}, {"i": 2}])
    assert [o.status for o in outcomes] == ["kept", "error", "kept"]
    assert outcomes[1].error.kind == "timeout"
    still_serving(job)


def test_killing_the_parent_fails(job):
    assert call(job, "kill_parent") == "blocked: PermissionError; blocked: PermissionError"
    still_serving(job)


def test_no_background_process_outlives_its_call(job):
    marker = "3141.%d" % (uuid.uuid4().int % 10_000)
    assert call(job, "leave_background", marker=marker) == "left behind"
    assert settled_leftovers(job.job_id, lambda cmd: marker in cmd) == []
    host_wide = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker.encode() in _cmdline(p)]
    assert host_wide == []
    assert call(job, "count_leftovers", marker=marker) == "0"
    still_serving(job)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_job_variables_never_reach_the_processes_that_run_as_root(sandbox):
    """firejail and the interpreter's first moments run as root: the job's variables (which could
    say LD_PRELOAD) and secrets must not be in their environment, only in the job user's code."""
    bundle = build_bundle(tools=[(find_text, tool_spec(find_text))])
    runtime = RuntimeConfig(limits=LIMITS, env={"LD_PRELOAD": "/nonexistent/preload.so"})
    job = sandbox.open_job("env-" + uuid.uuid4().hex[:6], bundle, runtime, {"ROOTLESS_SECRET": "rootless-" + SERVER_SECRET})
    try:
        assert call(job, "find_text", needle="rootless-" + SERVER_SECRET) == "found in os.environ"
        (interpreter,) = job._idle
        firejail_env = Path(f"/proc/{interpreter.process.pid}/environ").read_bytes()
        assert b"rootless-" not in firejail_env and b"LD_PRELOAD" not in firejail_env
    finally:
        sandbox.close_job(job.job_id)


def test_the_neighbour_job_is_unharmed(other_job):
    still_serving(other_job)
    assert json.loads(json.dumps(call(other_job, "find_text", needle=OTHER_JOB_SECRET))) == "found in os.environ"
