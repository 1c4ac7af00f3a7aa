"""Each job's scratch dir has a disk and a file-count quota (`runtime.limits.disk_mb`,
`max_files`): a tmpfs of that size when the worker runs as root, a polling check otherwise.

Real firejail and real mounts: the quota must hold inside the jails' mount namespaces, fail only
the call that hits it, and go away with the job, or with a worker that died.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.errors import SandboxError
from spider.sandbox import Sandbox
from spider.sandbox.jail import job_uid

pytestmark = pytest.mark.usefixtures("firejail")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs quota needs a worker running as root")

DISK_MB, MAX_FILES = 16, 200
LIMITS = SandboxLimits(memory_mb=256, call_timeout_s=20.0, cpu_seconds=20, file_size_mb=8, disk_mb=DISK_MB, max_files=MAX_FILES)


# -- what the jailed code does (shipped by value) ----------------------------------------------


def ping() -> str:
    return "pong"


def fill_disk(total_mb: int, file_mb: int) -> str:
    """Write `total_mb` in files of `file_mb` each (each under the file-size limit)."""
    block = b"x" * (1024 * 1024)
    for index in range(-(-total_mb // file_mb)):
        with open(f"fill-{index}.bin", "wb") as handle:
            for _ in range(file_mb):
                handle.write(block)
    return f"wrote {total_mb} MB"


def make_files(count: int) -> str:
    import os

    os.makedirs("many", exist_ok=True)
    for index in range(count):
        open(f"many/{index}", "w").close()
    return f"made {count} files"


def clear() -> str:
    import os
    import shutil

    for name in os.listdir("."):
        shutil.rmtree(name) if os.path.isdir(name) else os.unlink(name)
    return "cleared"


def write_small(name: str) -> str:
    with open(name, "w") as handle:
        handle.write("still works")
    return open(name).read()


def scratch_stats() -> str:
    import json
    import os

    stats = os.statvfs(".")
    return json.dumps({"bytes": stats.f_blocks * stats.f_frsize, "files": stats.f_files})


TOOLS = [ping, fill_disk, make_files, clear, write_small, scratch_stats]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    path = Path(tempfile.mkdtemp(prefix="spider-disk-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(base):
    box = Sandbox(base / "root", pool_size=1)
    yield box
    box.close()


def open_job(sandbox, prefix="disk"):
    bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
    return sandbox.open_job(f"{prefix}-{uuid.uuid4().hex[:8]}", bundle, RuntimeConfig(limits=LIMITS), {})


def call(job, tool, /, **arguments):
    outcome = job.call_tool(tool, arguments)
    assert outcome.ok, outcome.error
    return outcome.content


def mounts_on(path: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line for line in mounts if line.split()[1] == str(path)]


def scratch_of(sandbox, job_id: str) -> Path:
    return sandbox.root / "jobs" / job_id / "scratch"


def bytes_used(path: Path) -> int:
    """What the files under `path` occupy; a file the quota poller removes meanwhile counts nothing."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def entries(path: Path) -> int:
    """Files and folders under `path`, counted while the quota poller may be removing them."""
    while True:
        try:
            return sum(1 for _ in path.rglob("*"))
        except FileNotFoundError:
            time.sleep(0.05)


# -- the hard quota (a worker running as root) -------------------------------------------------


@as_root
def test_the_scratch_dir_is_a_tmpfs_of_the_jobs_quota(sandbox):
    job = open_job(sandbox)
    try:
        (mount,) = mounts_on(scratch_of(sandbox, job.job_id))
        source, _, kind, options = mount.split()[:4]
        assert (source, kind) == ("spider-scratch", "tmpfs")
        options = set(options.split(","))
        assert {f"size={DISK_MB * 1024}k", f"nr_inodes={MAX_FILES + 1}", "mode=700", "nosuid", "nodev"} <= options
        assert f"uid={job_uid(job.job_id)}" in options
        # The jail sees the same file system, not the directory under it.
        assert json.loads(call(job, "scratch_stats")) == {"bytes": DISK_MB * 1024 * 1024, "files": MAX_FILES + 1}
    finally:
        sandbox.close_job(job.job_id)


@as_root
def test_writing_three_times_the_quota_fails_that_call_only(sandbox):
    job = open_job(sandbox)
    try:
        outcome = job.call_tool("fill_disk", {"total_mb": 3 * DISK_MB, "file_mb": 4})
        assert outcome.error is not None and outcome.error.type == "OSError", outcome
        assert "No space left on device" in outcome.error.message
        assert bytes_used(scratch_of(sandbox, job.job_id)) <= DISK_MB * 1024 * 1024
        assert call(job, "ping") == "pong"
        assert call(job, "clear") == "cleared"
        assert call(job, "write_small", name="after.txt") == "still works"
    finally:
        sandbox.close_job(job.job_id)


@as_root
def test_making_twice_max_files_fails_that_call_only(sandbox):
    job = open_job(sandbox)
    try:
        outcome = job.call_tool("make_files", {"count": 2 * MAX_FILES})
        assert outcome.error is not None and outcome.error.type == "OSError", outcome
        assert "No space left on device" in outcome.error.message
        made = sum(1 for _ in scratch_of(sandbox, job.job_id).rglob("*"))
        assert made <= MAX_FILES
        assert call(job, "ping") == "pong"
        assert call(job, "clear") == "cleared"
        assert call(job, "make_files", count=MAX_FILES // 2) == f"made {MAX_FILES // 2} files"
    finally:
        sandbox.close_job(job.job_id)


@as_root
def test_closing_the_job_unmounts_and_removes_its_scratch(sandbox):
    job = open_job(sandbox)
    scratch = scratch_of(sandbox, job.job_id)
    call(job, "write_small", name="left.txt")
    assert len(mounts_on(scratch)) == 1
    sandbox.close_job(job.job_id)
    assert mounts_on(scratch) == []
    assert not scratch.parent.exists()


DYING_WORKER = """
import os, signal, sys
from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.sandbox import Sandbox

def write_small(name: str) -> str:
    with open(name, "w") as handle:
        handle.write("left behind")
    return name

box = Sandbox(sys.argv[1], pool_size=1)
limits = SandboxLimits(disk_mb=8, max_files=50)
job = box.open_job(sys.argv[2], build_bundle(tools=[(write_small, tool_spec(write_small))]), RuntimeConfig(limits=limits), {})
job.call_tool("write_small", {"name": "left.txt"})
os.kill(os.getpid(), signal.SIGKILL)
"""


def die_with_a_job_open(root: Path, job_id: str) -> None:
    subprocess.run([sys.executable, "-c", DYING_WORKER, str(root), job_id], timeout=120)
    assert (root / "jobs" / job_id / "scratch" / "left.txt").exists()


@as_root
def test_a_dead_workers_scratch_is_unmounted_and_removed(base, sandbox):
    root = base / "shared-root"
    job_id = "dead-" + uuid.uuid4().hex[:8]
    die_with_a_job_open(root, job_id)
    scratch = root / "jobs" / job_id / "scratch"
    assert len(mounts_on(scratch)) == 1
    # A worker starting on the same root clears what the dead one left.
    box = Sandbox(root, pool_size=1)
    try:
        assert mounts_on(scratch) == [] and not scratch.parent.exists()
        # And a job reopened on a worker that finds its leftovers gets a fresh quota.
        die_with_a_job_open(root, job_id)
        bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
        job = box.open_job(job_id, bundle, RuntimeConfig(limits=LIMITS), {})
        assert len(mounts_on(scratch)) == 1
        assert json.loads(call(job, "scratch_stats"))["bytes"] == DISK_MB * 1024 * 1024
        assert not (scratch / "left.txt").exists()
        box.close_job(job_id)
        assert mounts_on(scratch) == []
    finally:
        box.close()


@as_root
def test_a_live_neighbours_job_is_left_alone(sandbox):
    job = open_job(sandbox)
    scratch = scratch_of(sandbox, job.job_id)
    call(job, "write_small", name="mine.txt")
    neighbour = Sandbox(sandbox.root, pool_size=1)  # another worker process on the same root
    try:
        neighbour.close_job(job.job_id)
        bundle = build_bundle(tools=[(ping, tool_spec(ping))])
        with pytest.raises(SandboxError, match="open in another sandbox worker"):
            neighbour.open_job(job.job_id, bundle, RuntimeConfig(limits=LIMITS), {})
        assert (scratch / "mine.txt").exists() and len(mounts_on(scratch)) == 1
        assert call(job, "write_small", name="mine.txt") == "still works"
    finally:
        neighbour.close()
        sandbox.close_job(job.job_id)


# -- the weaker quota (a worker that cannot mount one) -----------------------------------------


def test_polling_empties_a_scratch_dir_over_its_quota(base):
    box = Sandbox(base / "poll-root", pool_size=1, disk_quota="poll", quota_poll_s=0.2)
    try:
        job = open_job(box, prefix="poll")
        scratch = scratch_of(box, job.job_id)
        assert mounts_on(scratch) == []
        assert call(job, "fill_disk", total_mb=3 * DISK_MB, file_mb=4) == f"wrote {3 * DISK_MB} MB"
        deadline = time.monotonic() + 20
        while bytes_used(scratch) > DISK_MB * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bytes_used(scratch) <= DISK_MB * 1024 * 1024
        assert call(job, "write_small", name="after.txt") == "still works"
        assert call(job, "make_files", count=2 * MAX_FILES) == f"made {2 * MAX_FILES} files"
        deadline = time.monotonic() + 20
        while entries(scratch) > MAX_FILES and time.monotonic() < deadline:
            time.sleep(0.1)
        assert entries(scratch) <= MAX_FILES
        assert call(job, "ping") == "pong"
    finally:
        box.close()
