"""How Spider is started: what `spider serve` listens on, the password on Redis, which role holds
which server secret, and the same in docker-compose.yml (checked by its structure: no Docker here)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
import yaml

from spider.local import LocalStack, WorkerSpec, free_port, start_redis, terminate
from tests.helpers import ROOT

# The CLI of the tree under test (run from its root), whatever the installed `spider` script imports.
SPIDER = [sys.executable, "-m", "spider"]


# -- spider serve ----------------------------------------------------------------------------------


def serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPIDER_API_KEYS", "SPIDER_API_KEYS_FILE")}
    # No Redis is needed to listen: /healthz then answers 503, which is enough to know it serves.
    return {**env, "SPIDER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", **extra}


def listening(proc: subprocess.Popen, port: int, timeout: float = 90) -> set[str]:
    """The addresses the server process listens on, once it serves on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        found = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"spider serve did not listen on port {port}")


def serving(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([*SPIDER, "serve", "--port", str(port), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)
    return proc, port


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "no-such-host.invalid"])
def test_serve_refuses_an_open_non_loopback_address_without_keys(host):
    port = free_port()
    proc = subprocess.run([*SPIDER, "serve", "--host", host, "--port", str(port)], env=serve_env(),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert f"refusing to serve on {host} without API keys" in proc.stderr
    assert "--insecure-open" in proc.stderr and "SPIDER_API_KEYS" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_listens_on_loopback_by_default_and_elsewhere_only_with_keys_or_on_purpose(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("key-from-file\n")
    cases = [
        ([], serve_env(), {"127.0.0.1"}),
        (["--host", "0.0.0.0"], serve_env(SPIDER_API_KEYS="k1,k2"), {"0.0.0.0"}),
        (["--host", "0.0.0.0"], serve_env(SPIDER_API_KEYS_FILE=str(keys_file)), {"0.0.0.0"}),
        (["--host", "0.0.0.0", "--insecure-open"], serve_env(), {"0.0.0.0"}),
    ]
    started = [(serving(args, env), want, args) for args, env, want in cases]
    try:
        for (proc, port), want, args in started:
            assert listening(proc, port) == want, args
            answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert answer.status_code in (200, 503)
    finally:
        terminate([proc for (proc, _), _, _ in started], grace=10)
    insecure = started[-1][0][0]
    assert "without API keys (--insecure-open)" in insecure.stderr.read()


# -- the local stack: Redis's password, and secrets only where they are needed -----------------------


def test_private_redis_requires_its_password(tmp_path):
    proc, url = start_redis(tmp_path)
    try:
        match = re.fullmatch(r"redis://:([0-9a-f]{48})@127\.0\.0\.1:(\d+)/0", url)
        assert match, url
        password, port = match.groups()
        assert redis.Redis.from_url(url).ping()
        # The server answers NOAUTH to a client without the password.
        for command in (b"PING", b"GET spider:jobs:x", b"KEYS *"):
            with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
                sock.sendall(command + b"\r\n")
                assert sock.recv(1024).startswith(b"-NOAUTH"), command
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=int(port)).get("spider:jobs:x")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=int(port), password="wrong").ping()
        # Not on the command line, where every local user could read it.
        assert password not in " ".join(psutil.Process(proc.pid).cmdline())
        second, other = start_redis(tmp_path)
        second.terminate()
        second.wait()
        assert other.split("@")[0] != url.split("@")[0]  # a fresh password each time
    finally:
        proc.terminate()
        proc.wait()


def test_local_stack_hands_the_api_keys_to_the_api_only(tmp_path, monkeypatch):
    keys_file = tmp_path / "more-keys"
    keys_file.write_text("key-carol\n")
    monkeypatch.setenv("SPIDER_API_KEYS", "key-from-the-operators-shell")
    monkeypatch.setenv("SPIDER_API_KEYS_FILE", str(keys_file))
    monkeypatch.delenv("SPIDER_REDIS_URL", raising=False)
    workers = (WorkerSpec("control", "threads", 1), WorkerSpec("sandbox", "threads", 1))
    with LocalStack(api_keys=("key-alice",), workers=workers, log_dir=tmp_path / "logs") as stack:
        assert re.fullmatch(r"redis://:[0-9a-f]{48}@127\.0\.0\.1:\d+/0", stack.redis_url)
        port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).get("spider:jobs:x")
        environ = {name: stack.environment(name) for name in stack.procs if name != "redis"}
        assert set(environ) == {"api", "worker-control", "worker-sandbox"}
        # What the running API really has (a worker's own /proc environ is gone once Celery
        # renames its process).
        assert psutil.Process(stack.procs["api"].pid).environ() == environ["api"]
        assert environ["api"]["SPIDER_API_KEYS"] == "key-alice"
        assert environ["api"]["SPIDER_API_KEYS_FILE"] == str(keys_file)
        for name, env in environ.items():
            assert env["SPIDER_REDIS_URL"] == stack.redis_url, name
            if name != "api":
                assert "SPIDER_API_KEYS" not in env and "SPIDER_API_KEYS_FILE" not in env, name
        # The API serves with exactly the keys it was given, the file's included.
        assert httpx.get(f"{stack.url}/v1/jobs").status_code == 401
        for key, status in (("key-alice", 200), ("key-carol", 200), ("key-from-the-operators-shell", 401)):
            assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == status


# -- docker-compose.yml ------------------------------------------------------------------------------

COMPOSE = ROOT / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${X}, ${X:-default}, ${X:?error} (unset or empty: error)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        found = env.get(match["name"], "")
        if match["op"] == ":?" and not found:
            raise MissingVariable(f"{match['name']}: {match['arg']}")
        if match["op"] == ":-" and not found:
            return match["arg"]
        return found

    return _VARIABLE.sub(substitute, value)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


FULL_ENV = {"SPIDER_REDIS_PASSWORD": "pw123", "SPIDER_API_KEYS": "k1,k2", "FLOWER_BASIC_AUTH": "ops:secret"}


def test_compose_redis_requires_a_password_everywhere():
    services = compose()["services"]
    command = services["redis"]["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${SPIDER_REDIS_PASSWORD:?")
    resolved = interpolate(services, FULL_ENV)
    urls = {name: svc["environment"]["SPIDER_REDIS_URL"] for name, svc in resolved.items()
            if "SPIDER_REDIS_URL" in svc.get("environment", {})}
    # Flower too: `spider flower` runs on Spider's own Celery app, whose broker is SPIDER_REDIS_URL.
    assert set(urls) == {"api", "control", "rollout", "sandbox", "train", "flower"}
    assert set(urls.values()) == {"redis://:pw123@redis:6379/0"}
    for service in resolved.values():  # the password is on no command line
        assert not any("redis://" in str(arg) for arg in service.get("command") or [])
    with pytest.raises(MissingVariable, match="SPIDER_REDIS_PASSWORD"):
        interpolate(services, {**FULL_ENV, "SPIDER_REDIS_PASSWORD": ""})


def test_compose_gives_each_role_only_the_secrets_it_needs():
    services = compose()["services"]
    for name, svc in services.items():
        env = svc.get("environment", {})
        assert "HF_TOKEN" not in env, name
        assert "FLOWER_UNAUTHENTICATED_API" not in env, name
        if name != "api":
            assert "SPIDER_API_KEYS" not in env and "SPIDER_API_KEYS_FILE" not in env, name
    api = services["api"]
    assert api["command"][api["command"].index("--host") + 1] == "0.0.0.0"
    assert "--insecure-open" not in api["command"]
    assert api["environment"]["SPIDER_API_KEYS"].startswith("${SPIDER_API_KEYS:?")
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    for missing in ("SPIDER_API_KEYS", "FLOWER_BASIC_AUTH"):
        for value in (None, ""):
            env = {k: v for k, v in FULL_ENV.items() if k != missing}
            if value is not None:
                env[missing] = value
            with pytest.raises(MissingVariable, match=missing):
                interpolate(services, env)
    resolved = interpolate(services, FULL_ENV)
    assert resolved["api"]["environment"]["SPIDER_API_KEYS"] == "k1,k2"
    assert resolved["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:secret"


def test_compose_api_command_refuses_to_serve_without_keys():
    """The api service's own command, run here with its environment and no keys, refuses."""
    api = interpolate(compose()["services"]["api"], FULL_ENV)
    assert api["command"][0] == "spider"
    env = serve_env(SPIDER_API_KEYS="")
    proc = subprocess.run([*SPIDER, *api["command"][1:]], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in proc.stderr
