"""docker-compose.yml, checked by a real Compose tool (`docker compose config`, else Debian's
docker-compose: no Docker engine runs here) and against what the local stack runs: the same
worker commands, Redis with AOF and a password, GPUs for rollout and train, and a sandbox service
with exactly the capabilities a jail needs (shown by running a real jail with only those)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from spider.cli import build_parser
from spider.local import DEFAULT_WORKERS, worker_command
from tests.helpers import ROOT, require_system_tool

COMPOSE_FILE = ROOT / "docker-compose.yml"
REQUIRED = {"SPIDER_REDIS_PASSWORD": "composetest1", "SPIDER_API_KEYS": "key1,key2", "FLOWER_BASIC_AUTH": "admin:pw"}
GPU_ROLES = {"rollout", "train"}


def compose_tool() -> list[str]:
    """`docker compose` where the plugin is installed, else `docker-compose`."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [require_system_tool("a Compose tool (docker compose or docker-compose)", shutil.which("docker-compose"))]


def compose_config(**env: str) -> subprocess.CompletedProcess:
    """`<compose> -f docker-compose.yml config` with exactly `env` for the file's variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SPIDER_", "FLOWER_"))}
    return subprocess.run([*compose_tool(), "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True,
                          env={**clean, **env}, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The file as Compose resolves it (anchors merged, variables filled in)."""
    done = compose_config(**REQUIRED)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def spider_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("command", [""])[0] == "spider"}


def test_compose_accepts_the_file_and_refuses_it_without_a_required_setting(compose):
    assert set(compose["services"]) == {"redis", "api", "control", "rollout", "train", "sandbox", "flower"}
    for name in REQUIRED:
        done = compose_config(**{k: v for k, v in REQUIRED.items() if k != name})
        assert done.returncode != 0 and name in done.stderr, (name, done.stderr)


def test_each_worker_service_runs_the_local_stacks_worker_command(compose):
    workers = {name: svc["command"][1:] for name, svc in spider_services(compose).items() if svc["command"][1] == "worker"}
    assert workers == {spec.queues: worker_command(spec) for spec in DEFAULT_WORKERS}
    parser = build_parser()
    for name, svc in spider_services(compose).items():
        args = parser.parse_args(svc["command"][1:])  # every command is a valid `spider` invocation
        assert args.command == {"api": "serve", "flower": "flower"}.get(name, "worker")
    assert parser.parse_args(compose["services"]["api"]["command"][1:]).host == "0.0.0.0"


def test_redis_keeps_an_append_only_file_and_wants_a_password(compose):
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    password = command[command.index("--requirepass") + 1]
    assert password == REQUIRED["SPIDER_REDIS_PASSWORD"]
    assert "redis-data:/data" in {_volume_spec(v) for v in _volumes(compose["services"]["redis"])}  # a volume of its own
    for name, svc in spider_services(compose).items():
        assert svc["environment"]["SPIDER_REDIS_URL"] == f"redis://:{password}@redis:6379/0", name


def test_only_the_api_holds_the_api_keys_and_every_role_shares_the_artifact_volume(compose):
    for name, svc in spider_services(compose).items():
        env = svc["environment"]
        assert ("SPIDER_API_KEYS" in env) == (name == "api"), name
        assert env["SPIDER_DATA_DIR"] == "/data"
        assert "spider-data:/data" in {_volume_spec(v) for v in _volumes(svc)}, name
    assert compose["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == REQUIRED["FLOWER_BASIC_AUTH"]


def test_rollout_and_train_reserve_gpus_and_nothing_else_does(compose):
    for name, svc in compose["services"].items():
        devices = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices", [])
        if name in GPU_ROLES:
            assert [(d["driver"], d["capabilities"], str(d["count"])) for d in devices] == [("nvidia", ["gpu"], "all")]
        else:
            assert devices == [], name
    done = compose_config(**REQUIRED, SPIDER_ROLLOUT_GPUS="1", SPIDER_TRAIN_GPUS="2")
    assert done.returncode == 0, done.stderr
    counts = {name: str(yaml.safe_load(done.stdout)["services"][name]["deploy"]["resources"]["reservations"]
                        ["devices"][0]["count"]) for name in GPU_ROLES}
    assert counts == {"rollout": "1", "train": "2"}


def test_every_setting_the_file_reads_is_documented_in_its_header():
    text = COMPOSE_FILE.read_text()
    header = text[: text.index("\nx-env:")]
    settings = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert settings >= set(REQUIRED) | {"SPIDER_ROLLOUT_GPUS", "SPIDER_TRAIN_GPUS"}
    assert {name for name in settings if name not in header} == set()
    assert "--scale rollout=" in header


def _volumes(svc: dict) -> list:
    return svc.get("volumes", [])


def _volume_spec(volume) -> str:
    """`source:target` of a volume in either of the forms Compose normalises to."""
    if isinstance(volume, dict):
        return f"{volume['source']}:{volume['target']}"
    return ":".join(volume.split(":")[:2])


# -- the sandbox service's capabilities ---------------------------------------------------------


def run_jail_probe(capabilities: set[str]) -> subprocess.CompletedProcess:
    """tests/jail_probe.py as root with only `capabilities` (Docker's names) in its bounding set,
    as a container with `cap_drop: [ALL]` and those in `cap_add` has them."""
    capsh = require_system_tool("capsh", shutil.which("capsh"))
    keep = {f"cap_{c.lower()}" for c in capabilities}
    bounding = subprocess.run([capsh, "--print"], capture_output=True, text=True, check=True).stdout
    present = re.search(r"^Bounding set =(.*)$", bounding, re.M)[1].split(",")
    drop = ",".join(c for c in present if c not in keep)
    command = f"exec {sys.executable} {ROOT / 'tests' / 'jail_probe.py'}"
    return subprocess.run([capsh, f"--drop={drop}", "--", "-c", command], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_the_sandbox_service_has_exactly_the_capabilities_a_jail_needs(compose, firejail):
    if os.geteuid() != 0:
        pytest.skip("the jail's per-job users and scratch quota need a root sandbox worker, as the service runs")
    sandbox = compose["services"]["sandbox"]
    assert sandbox["cap_drop"] == ["ALL"]
    assert set(sandbox["security_opt"]) == {"seccomp=unconfined", "apparmor=unconfined"}
    capabilities = set(sandbox["cap_add"])
    assert len(capabilities) == len(sandbox["cap_add"])
    done = run_jail_probe(capabilities)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["add"] == "42"
    # Each one is needed: without it, some step of a job's jail fails.
    for capability in sorted(capabilities):
        without = run_jail_probe(capabilities - {capability})
        assert without.returncode != 0, f"the jail works without {capability}: {without.stdout}"
    # No other service gets capabilities beyond Docker's defaults.
    assert [name for name, svc in compose["services"].items() if svc.get("cap_add") and name != "sandbox"] == []


def test_a_missing_system_tool_fails_where_the_system_tools_are_required_and_skips_elsewhere():
    from tests.helpers import REQUIRE_FIREJAIL

    with pytest.raises(pytest.fail.Exception, match=f"capsh is not installed and {REQUIRE_FIREJAIL}=1"):
        require_system_tool("capsh", None, environ={REQUIRE_FIREJAIL: "1"})
    with pytest.raises(pytest.skip.Exception, match="capsh is not installed; scripts/install-system.sh installs it"):
        require_system_tool("capsh", None, environ={})
    assert require_system_tool("capsh", "/usr/sbin/capsh", environ={REQUIRE_FIREJAIL: "1"}) == "/usr/sbin/capsh"
    # install-system.sh installs both tools these tests need.
    script = (ROOT / "scripts" / "install-system.sh").read_text()
    assert "missing+=(docker-compose)" in script and "missing+=(libcap2-bin)" in script
