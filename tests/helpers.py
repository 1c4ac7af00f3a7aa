"""Small helpers shared by the stack tests."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from spider.config import AppConfig, apply_override
from spider.sandbox.jail import find_firejail

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ROOT / "examples" / "data" / "prompts.jsonl"
REQUIRE_FIREJAIL = "SPIDER_REQUIRE_FIREJAIL"


def make_config(url: str, api_key: str | None, model: str | Path, provider: str = "hf", **overrides: Any) -> AppConfig:
    """A dataset job on the sample prompts; `overrides` are dotted keys under `job`."""
    data: dict[str, Any] = {
        "server": {"base_url": url, "api_key": api_key, "request_timeout": 60},
        "job": {
            "model": {"provider": provider, "name": str(model), "parameters": {}},
            "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:6]", "field": "question"},
            "generation": {"parameters": {"temperature": 0.8, "max_tokens": 16, "seed": 7}, "max_batch_size": 4},
        },
    }
    for key, value in overrides.items():
        apply_override(data["job"], key, value)
    return AppConfig.parse(data)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file. Lines end at \\n only: \\r, U+2028 and the like may sit raw in
    a line (read_text would translate \\r, splitlines would break at all of them)."""
    lines = Path(path).read_bytes().decode("utf-8").split("\n")
    return [json.loads(line) for line in lines if line.strip(" \t\r")]


def eventually(condition: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> bool:
    """Whether `condition()` holds within `timeout` seconds: for what the stack does just after a
    job ends (removing its intermediate files happens after the completion is announced)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def require_firejail(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The firejail executable (`path`, or the one the sandbox itself would find), for tests that
    run user code under it. Without it the test is skipped, or fails when SPIDER_REQUIRE_FIREJAIL=1
    (as .ci/run sets it): there, a skipped jail test would hide a sandbox that isolates nothing."""
    found = find_firejail(path)
    if found is not None:
        return found
    environ = os.environ if environ is None else environ
    where = path if path is not None else "on this machine"
    if environ.get(REQUIRE_FIREJAIL) == "1":
        pytest.fail(f"firejail is not installed ({where}) and {REQUIRE_FIREJAIL}=1 requires the jail tests to run; "
                    "scripts/install-system.sh installs it", pytrace=False)
    pytest.skip(f"firejail is not installed ({where}); scripts/install-system.sh installs it")


def require_system_tool(name: str, found: str | None, environ: Mapping[str, str] | None = None) -> str:
    """A tool that scripts/install-system.sh installs besides firejail (a Compose tool, capsh),
    for the tests that run it: `found` (its path or command), or the test is skipped; where the
    jail tests are required (SPIDER_REQUIRE_FIREJAIL=1, as in CI) every such tool is, and the test
    fails instead."""
    if found:
        return found
    environ = os.environ if environ is None else environ
    if environ.get(REQUIRE_FIREJAIL) == "1":
        pytest.fail(f"{name} is not installed and {REQUIRE_FIREJAIL}=1 requires the system tools' tests to run; "
                    "scripts/install-system.sh installs it", pytrace=False)
    pytest.skip(f"{name} is not installed; scripts/install-system.sh installs it")


@contextlib.contextmanager
def vllm_server_process(model: Path, log_dir: Path, dtype: str, max_model_len: int, name: str = "spider-tiny"):
    """`python -m vllm.entrypoints.openai.api_server` on `model`, served as `name`, with tool calls
    as a deployment serves them (Hermes parsing, tool_choice enforced); yields its /v1 URL."""
    import os
    import subprocess
    import sys

    import pytest

    from spider.local import free_port, terminate, wait_http

    port = free_port()
    log = Path(log_dir) / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def alive() -> None:
        if process.poll() is not None:
            pytest.fail(f"vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")

    try:
        wait_http(f"{base}/health", alive, 240, "the vLLM server", interval=1)
        yield f"{base}/v1"
    finally:
        terminate([process], grace=20)


class Recorder:
    """A dispatcher that records the next stages instead of queueing them (stages driven by hand)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def dispatch(self, stage, job_id, *args):
        self.calls.append((stage, job_id, *args))


@contextlib.contextmanager
def api_process(redis_url: str, data_dir: Path, log_dir: Path, api_keys: str):
    """The real API (`spider serve`) in its own process on a free port, on the given Redis; yields
    its base URL and the path of its log."""
    import subprocess
    import sys

    from spider.local import free_port, terminate, wait_http

    port = free_port()
    env = {**os.environ, "SPIDER_REDIS_URL": redis_url, "SPIDER_DATA_DIR": str(data_dir), "SPIDER_API_KEYS": api_keys}
    log = Path(log_dir) / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spider", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> None:
        if proc.poll() is not None:
            pytest.fail(f"the API exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", alive, 90, "the API")
        yield f"http://127.0.0.1:{port}", log
    finally:
        terminate([proc], grace=10)
