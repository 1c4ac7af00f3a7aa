"""What a sandbox worker does with its privileges, in one run: open a job (its scratch quota is a
tmpfs owned by the job's user), call its tools in the jail (no network), kill a call that runs past
its time, and remove the job. Run as a program (tests/test_compose.py runs it with only some
capabilities); prints one JSON line and exits 0 when every step worked."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def spin() -> str:
    """Run until killed."""
    while True:
        pass


def write_scratch() -> int:
    """Write a file in the job's scratch directory (its working directory)."""
    Path("note.txt").write_text("x" * 1000)
    return Path("note.txt").stat().st_size


def main() -> int:
    from spider.bundle import build_bundle, tool_spec
    from spider.config import RuntimeConfig, SandboxLimits
    from spider.sandbox import Sandbox

    base = Path(tempfile.mkdtemp(prefix="spider-jail-probe-", dir="/tmp"))
    base.chmod(0o755)
    box = Sandbox(base / "root", pool_size=1)
    steps: dict[str, object] = {}
    try:
        tools = [(f, tool_spec(f)) for f in (add, spin, write_scratch)]
        runtime = RuntimeConfig(limits=SandboxLimits(call_timeout_s=2.0))
        job = box.open_job(f"probe-{uuid.uuid4().hex[:8]}", build_bundle(tools=tools), runtime, {})
        steps["add"] = job.call_tool("add", {"a": 2, "b": 40}).content
        steps["scratch"] = job.call_tool("write_scratch", {}).content
        killed = job.call_tool("spin", {})
        steps["timeout"] = killed.error.kind if killed.error else None
        steps["after_kill"] = job.call_tool("add", {"a": 1, "b": 1}).content
        box.close_job(job.job_id)
        steps["removed"] = not any((base / "root").glob("jobs/*"))
    except Exception as exc:  # the probe reports what failed; the test reads it
        steps["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        box.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(steps))
    expected = {"add": "42", "scratch": "1000", "timeout": "timeout", "after_kill": "2", "removed": True}
    return 0 if steps == expected else 1


if __name__ == "__main__":
    sys.exit(main())
