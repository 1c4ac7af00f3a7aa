"""Dependency venvs for user code: built once per requirement set (from PyPI, inside a jail),
cached, shared by jobs, and failing clearly."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig
from spider.errors import SandboxError
from spider.sandbox import Sandbox
from spider.sandbox.venvs import READY_MARKER, VenvCache, normalize_requirements

pytestmark = pytest.mark.usefixtures("firejail")

# A small pure-Python package from PyPI with no dependencies of its own.
PACKAGE = "pyjokes==0.8.3"


def joke_version() -> str:
    from importlib.metadata import version

    import pyjokes

    return version("pyjokes") if pyjokes.get_joke() else ""


def installed_where() -> str:
    import pyjokes

    return pyjokes.__file__


@pytest.fixture(scope="module")
def sandbox():
    base = Path(tempfile.mkdtemp(prefix="spider-venv-test-", dir="/tmp"))
    base.chmod(0o755)
    box = Sandbox(base / "root")
    yield box
    box.close()
    shutil.rmtree(base, ignore_errors=True)


def test_a_runtime_package_is_importable_and_its_venv_is_reused(sandbox, caplog):
    bundle = build_bundle(tools=[(joke_version, tool_spec(joke_version)), (installed_where, tool_spec(installed_where))])
    with caplog.at_level(logging.INFO, logger="spider.sandbox"):
        first = sandbox.open_job("venv-a", bundle, RuntimeConfig(packages=[PACKAGE]), {})
        assert first.call_tool("joke_version", {}).content == "0.8.3"
        venv = sandbox.venvs.path_for([PACKAGE])
        assert first.call_tool("installed_where", {}).content.startswith(str(venv))
        built_at = (venv / READY_MARKER).stat().st_mtime_ns
        # Same requirements, written differently: the same venv, not built again.
        second = sandbox.open_job("venv-b", bundle, RuntimeConfig(packages=[f" {PACKAGE} ", PACKAGE]), {})
        assert second.call_tool("installed_where", {}).content.startswith(str(venv))
    assert (venv / READY_MARKER).stat().st_mtime_ns == built_at
    builds = [r for r in caplog.records if r.getMessage().startswith("built venv") and PACKAGE in r.getMessage()]
    assert len(builds) == 1
    # A job without packages does not see it.
    plain = sandbox.open_job("venv-c", bundle, RuntimeConfig(), {})
    missing = plain.call_tool("installed_where", {})
    assert missing.error.type == "ModuleNotFoundError"
    for job_id in ("venv-a", "venv-b", "venv-c"):
        sandbox.close_job(job_id)


def test_the_key_depends_on_requirements_and_python(sandbox):
    cache = sandbox.venvs
    assert cache.key(["b", "a"]) == cache.key(["a", "b", "a"])
    assert cache.key(["a"]) != cache.key(["a==1"])
    other_python = VenvCache(cache.root, cache.python, "3.12", cache.firejail)
    assert other_python.key(["a"]) != cache.key(["a"])


def test_two_workers_build_one_venv_once(sandbox, caplog):
    requirement = "six==1.16.0"
    caches = [VenvCache(sandbox.venvs.root, sandbox.python, sandbox.python_minor, sandbox.firejail) for _ in range(2)]
    paths = []
    with caplog.at_level(logging.INFO, logger="spider.sandbox"):
        threads = [threading.Thread(target=lambda c=c: paths.append(c.ensure([requirement]))) for c in caches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert (paths[0] / "lib").is_dir()
    assert len([r for r in caplog.records if r.getMessage().startswith("built venv") and requirement in r.getMessage()]) == 1


def test_an_unknown_package_is_a_clear_error(sandbox):
    name = f"spider-no-such-package-{uuid.uuid4().hex[:8]}"
    bundle = build_bundle(tools=[(joke_version, tool_spec(joke_version))])
    with pytest.raises(SandboxError, match=rf"(?s)could not install runtime.packages \['{name}'\].*No matching distribution"):
        sandbox.open_job("venv-bad", bundle, RuntimeConfig(packages=[name]), {})
    assert not sandbox.venvs.path_for([name]).exists()


def test_a_build_past_its_time_limit_is_stopped(sandbox):
    slow = VenvCache(sandbox.venvs.root, sandbox.python, sandbox.python_minor, sandbox.firejail, build_timeout_s=0.3)
    with pytest.raises(SandboxError, match="took longer than 0.3 s"):
        slow.ensure(["pyjokes==0.6.0"])
    assert not slow.path_for(["pyjokes==0.6.0"]).exists()


def test_pip_options_are_not_requirements():
    for bad in ["--index-url=https://elsewhere", "-e /work", "-r /etc/passwd", ""]:
        with pytest.raises(SandboxError):
            normalize_requirements([bad])
    assert normalize_requirements(["b>=1", "a", "a"]) == ["a", "b>=1"]
