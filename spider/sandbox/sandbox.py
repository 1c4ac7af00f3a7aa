"""The worker-wide sandbox (one per sandbox worker process): it owns a root directory with the
jail runtime, the dependency venvs and one private directory per open job, and opens each job's
`JobSandbox` (spider.sandbox.pool), the pool of warm jailed interpreters that serve its calls.

Around each job's jails it keeps what lives outside them (spider.sandbox.host): the job's scratch
quota (a tmpfs of `runtime.limits.disk_mb` and `max_files` when the worker is root, a polling check
otherwise) and, for a job with `runtime.network`, its egress proxy (spider.sandbox.egress).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets as secrets_module
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cloudpickle

from spider.bundle import bundle_manifest
from spider.config import RuntimeConfig
from spider.errors import BundleError, SandboxError
from spider.policy import Policy
from spider.sandbox import jailed
from spider.sandbox.egress import EgressProxy, EgressRules
from spider.sandbox.host import OWNER_LOCK, JobHost, ScratchWatch, mount_scratch, remove_unowned_job_dir
from spider.sandbox.interpreter import JailConfig, LaunchSpec
from spider.sandbox.mcp import MCPHub, MCPServerHandle, mcp_launch
from spider.sandbox.pool import JobSandbox
from spider.sandbox.jail import (
    SYSTEM_TOP_DIRS,
    JailLimits,
    JailSpec,
    check_traversable,
    find_firejail,
    firejail_argv,
    job_uid,
    write_profile,
)
from spider.sandbox.venvs import VenvCache
from spider.types import BundleManifest

if TYPE_CHECKING:
    from spider.config import MCPServerConfig

log = logging.getLogger("spider.sandbox")

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_root() -> Path:
    """Where a sandbox worker keeps its jails' files: `$SPIDER_SANDBOX_DIR`, else, for a worker
    running as root (whose jails switch to unprivileged users, who cannot pass through /root),
    /var/lib/spider/sandbox, else `<cache dir>/sandbox`."""
    if os.environ.get("SPIDER_SANDBOX_DIR"):
        return Path(os.environ["SPIDER_SANDBOX_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/spider/sandbox")
    from spider.settings import cache_dir

    return cache_dir() / "sandbox"


def _python_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"the jail interpreter {python} cannot run: {exc}") from None
    if out.returncode != 0:
        raise SandboxError(f"the jail interpreter {python} cannot run: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


class Sandbox:
    """The sandbox of one worker process.

    `root` (default: `default_root()`) holds everything the jails see; when the worker runs as
    root it must be reachable by other users. Without firejail it refuses to run user code, unless `unsafe=True`, which
    runs it in plain subprocesses with resource limits only and logs a warning for every job.
    `pool_size` is the number of warm interpreters per job, `max_calls_per_interpreter` how many
    calls (rows or tool calls) one serves before it is replaced. `policy` (default:
    `Policy.from_env()`) is the operator's: whether `runtime.network` is honoured, which hosts the
    egress proxies let through, what dependency builds may fetch.

    `disk_quota` says how a job's scratch dir is held to `runtime.limits.disk_mb` and
    `max_files`: "auto" mounts a tmpfs of that size and inode count on it when the worker runs as
    root (a hard limit: a write past it fails with ENOSPC in the user's code), and falls back to
    "poll" otherwise: every `quota_poll_s` seconds the worker measures each scratch dir and empties
    one that is over its quota. Polling is weaker: a job may overshoot for one interval, and files
    it deleted but holds open are not seen."""

    def __init__(
        self,
        root: str | Path | None = None,
        unsafe: bool = False,
        pool_size: int = 2,
        max_calls_per_interpreter: int = 100_000,
        python: str = "/usr/bin/python3",
        firejail: str | Path | None = None,
        venv_build_timeout_s: float = 600.0,
        start_timeout_s: float = 60.0,
        kill_grace_s: float = 1.0,
        policy: Policy | None = None,
        disk_quota: str = "auto",
        quota_poll_s: float = 1.0,
    ):
        if disk_quota not in ("auto", "poll"):
            raise SandboxError(f"disk_quota must be 'auto' or 'poll', not {disk_quota!r}")
        if pool_size < 1 or max_calls_per_interpreter < 1:
            raise SandboxError("pool_size and max_calls_per_interpreter must be at least 1")
        self.firejail = find_firejail(firejail)
        if self.firejail is None and not unsafe:
            raise SandboxError(
                "firejail is not installed, so user code cannot be isolated and will not run; install it "
                "(scripts/install-system.sh does), or start the sandbox worker in unsafe mode to run user "
                "code without isolation (only for code you trust)"
            )
        self.jailed = self.firejail is not None
        # True when user code runs without isolation (unsafe mode and no firejail).
        self.unsafe = not self.jailed
        self.root = Path(root if root is not None else default_root()).resolve()
        self.python = python
        if not Path(python).exists():
            raise SandboxError(
                f"the jail interpreter {python} does not exist; install the system Python with venv support "
                "(apt-get install python3 python3-venv) or pass python=..."
            )
        if self.jailed and Path(python).resolve().parts[1] not in SYSTEM_TOP_DIRS:
            raise SandboxError(
                f"the jail interpreter {python} lives under {Path(python).resolve().parts[1]!r}, which jails hide; "
                "use the system Python in /usr (apt-get install python3 python3-venv)"
            )
        self.python_version = _python_version(python)
        self.python_minor = ".".join(self.python_version.split(".")[:2])
        self.pool_size = pool_size
        self.max_calls = max_calls_per_interpreter
        self.start_timeout_s = start_timeout_s
        self.kill_grace_s = kill_grace_s
        self.as_root = os.geteuid() == 0
        self.policy = policy if policy is not None else Policy.from_env()
        # A tmpfs per job needs CAP_SYS_ADMIN in the worker's mount namespace: root has it.
        self.tmpfs_quota = disk_quota == "auto" and self.as_root
        self._scratch_watch = ScratchWatch(quota_poll_s)
        for directory in (self.root, self.root / "jobs"):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o711 if directory.name == "jobs" else 0o755)
        if self.as_root and self.jailed:
            check_traversable(self.root)
        self.runtime_dir = self._install_runtime()
        self.venvs = VenvCache(
            self.root / "venvs", python, self.python_minor, self.firejail, build_timeout_s=venv_build_timeout_s,
            policy=self.policy,
        )  # fmt: skip
        self._jobs: dict[str, JobSandbox] = {}
        self._hosts: dict[str, JobHost] = {}
        self._lock = threading.Lock()
        self._job_locks: dict[str, threading.Lock] = {}
        self._mcp_hub: MCPHub | None = None
        if not self.jailed:
            log.warning("sandbox in UNSAFE mode: firejail is unavailable, user code runs without isolation")
        if not self.tmpfs_quota:
            log.warning(
                "job scratch quotas (runtime.limits.disk_mb, max_files) are enforced by polling every %g s only; "
                "run the sandbox worker as root for a hard quota (a tmpfs per job)", quota_poll_s,
            )  # fmt: skip
        self._remove_dead_jobs()

    # -- the runtime the jails load ---------------------------------------------------------

    def _install_runtime(self) -> Path:
        """Copy the jail program and cloudpickle into a content-addressed directory of the root."""
        files: dict[str, bytes] = {"spider_jail.py": Path(jailed.__file__).read_bytes()}
        package = Path(cloudpickle.__file__).parent
        for source in sorted(package.glob("*.py")):
            files[f"cloudpickle/{source.name}"] = source.read_bytes()
        digest = hashlib.sha256()
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + data + b"\0")
        parent = self.root / "runtime"
        parent.mkdir(exist_ok=True)
        os.chmod(parent, 0o755)
        target = parent / digest.hexdigest()[:16]
        if target.exists():
            return target
        staging = parent / f".staging-{secrets_module.token_hex(6)}"
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, 0o644)
        for directory in (staging, staging / "cloudpickle"):
            os.chmod(directory, 0o755)
        try:
            os.rename(staging, target)
        except OSError:  # another worker installed the same runtime first
            shutil.rmtree(staging, ignore_errors=True)
        return target

    # -- jobs ---------------------------------------------------------------------------------

    def open_job(
        self, job_id: str, bundle: bytes, runtime: RuntimeConfig | None = None, secrets: dict[str, str] | None = None
    ) -> "JobSandbox":
        """Get a job ready to run: check its bundle, build or reuse its venv, start one interpreter
        (which loads the bundle, so a bundle that cannot load fails here, as a BundleError).
        Opening an open job again with the same bundle returns the same JobSandbox."""
        runtime = runtime or RuntimeConfig()
        secrets = dict(secrets or {})
        if not JOB_ID_PATTERN.match(job_id or ""):
            raise SandboxError(f"job id {job_id!r} is not usable as a directory name (letters, digits, '_', '.', '-')")
        if runtime.network and not self.policy.sandbox_network:
            raise SandboxError(
                "runtime.network is switched off on this worker: the operator does not let user code reach the "
                "network (SPIDER_SANDBOX_NETWORK=0); remove `runtime.network: true` from the job"
            )
        manifest = bundle_manifest(bundle)
        bundle_sha256 = hashlib.sha256(bundle).hexdigest()  # the whole of it: sources and tool specs too
        if manifest.python_minor != self.python_minor:
            raise BundleError(
                f"the user code was serialized with Python {manifest.python}, but this sandbox runs Python "
                f"{self.python_version}; serialized functions only load on the same minor version: run the "
                f"client with Python {self.python_minor}"
            )
        env = self._job_env(runtime, secrets)
        with self._lock:
            job_lock = self._job_locks.setdefault(job_id, threading.Lock())
        with job_lock:
            existing = self._jobs.get(job_id)
            if existing is not None:
                if existing.bundle_sha256 != bundle_sha256:
                    raise SandboxError(f"job {job_id} is already open with a different bundle; close it first")
                return existing
            venv = self.venvs.ensure(runtime.packages)
            job = self._create_job(job_id, bundle, bundle_sha256, manifest, runtime, env, venv)
            with self._lock:
                self._jobs[job_id] = job
        return job

    def job(self, job_id: str) -> "JobSandbox":
        """An open job; SandboxError when it was not opened on this worker."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise SandboxError(f"job {job_id} is not open on this sandbox worker")
        return job

    def close_job(self, job_id: str) -> None:
        """Kill the job's interpreters and MCP servers and delete its directory (scratch included). Idempotent."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            self._job_locks.pop(job_id, None)
            host = self._hosts.pop(job_id, None)
        self.close_mcp_servers(job_id)
        if job is not None:
            job.close()
        if host is not None:
            host.close()
        self._scratch_watch.forget(job_id)
        if JOB_ID_PATTERN.match(job_id or ""):
            remove_unowned_job_dir(self.root / "jobs" / job_id)  # a dead worker's leftovers, not a neighbour's job

    def close(self) -> None:
        """Close every open job."""
        with self._lock:
            ids = list(self._jobs)
        for job_id in ids:
            self.close_job(job_id)
        with self._lock:
            hub, self._mcp_hub = self._mcp_hub, None
        if hub is not None:
            hub.close()

    # -- MCP servers ------------------------------------------------------------------------------

    def mcp_server(self, job_id: str, server: MCPServerConfig) -> MCPServerHandle:
        """The open job's stdio MCP server `server`: started on first use in a jail of the job's own
        profile (the one its interpreters start in: its user, scratch, venv, network and limits),
        kept while it is used, stopped with the job (close_job) or when idle."""
        job = self.job(job_id)
        with self._lock:
            if self._mcp_hub is None:
                self._mcp_hub = MCPHub(lambda open_id: open_id in self._jobs, start_timeout_s=self.start_timeout_s)
            hub = self._mcp_hub
        # The job's interpreters' launch and output limit, which this sandbox gave its JobSandbox.
        return MCPServerHandle(hub, job_id, server, mcp_launch(job._launch, server, job._output_mb))

    def close_mcp_servers(self, job_id: str) -> None:
        """Stop the job's MCP servers (their jails' process groups are killed)."""
        with self._lock:
            hub = self._mcp_hub
        if hub is not None:
            hub.close_job(job_id)

    def _job_env(self, runtime: RuntimeConfig, secrets: dict[str, str]) -> dict[str, str]:
        for origin, mapping in (("runtime.env", runtime.env), ("secrets", secrets)):
            for name, value in mapping.items():
                if not ENV_NAME_PATTERN.match(name):
                    raise SandboxError(f"{origin} name {name!r} is not a valid environment variable name")
                if not isinstance(value, str) or "\x00" in value:
                    raise SandboxError(f"{origin}[{name!r}] must be a string without NUL characters")
        return {**runtime.env, **secrets}

    def _create_job(
        self,
        job_id: str,
        bundle: bytes,
        bundle_sha256: str,
        manifest: BundleManifest,
        runtime: RuntimeConfig,
        user_env: dict[str, str],
        venv: Path,
    ) -> "JobSandbox":
        job_dir = self.root / "jobs" / job_id
        if job_dir.exists():
            remove_unowned_job_dir(job_dir)  # what a worker that died left
        host = JobHost.create(job_dir)
        job = None
        try:
            job = self._start_job(job_id, job_dir, host, bundle, bundle_sha256, manifest, runtime, user_env, venv)
            job.warm_up()
        except BaseException:
            if job is not None:
                job.close()
            self._scratch_watch.forget(job_id)
            host.close()
            raise
        with self._lock:
            self._hosts[job_id] = host
        return job

    def _start_job(
        self,
        job_id: str,
        job_dir: Path,
        host: "JobHost",
        bundle: bytes,
        bundle_sha256: str,
        manifest: BundleManifest,
        runtime: RuntimeConfig,
        user_env: dict[str, str],
        venv: Path,
    ) -> "JobSandbox":
        bundle_path = job_dir / "bundle.bin"
        bundle_path.write_bytes(bundle)
        os.chmod(bundle_path, 0o644)
        limits = runtime.limits
        scratch = job_dir / "scratch"
        scratch.mkdir(mode=0o700)
        uid = job_uid(job_id) if self.as_root else None
        if uid is not None:
            os.chown(scratch, uid, uid)
        # The quota is in place before any jail starts, so that every jail's mount namespace
        # (a copy of the worker's, taken when firejail starts) holds the job's tmpfs.
        if self.tmpfs_quota:
            mount_scratch(scratch, uid if uid is not None else os.getuid(), limits.disk_mb, limits.max_files)
        else:
            self._scratch_watch.watch(job_id, scratch, limits.disk_mb, limits.max_files)
        if not self.jailed:
            log.warning("job %s: running user code WITHOUT isolation (unsafe mode: firejail unavailable)", job_id)
        readable = [self.runtime_dir, venv, bundle_path]
        egress_socket = None
        if runtime.network and self.jailed:
            egress_dir = job_dir / "egress"
            egress_dir.mkdir(mode=0o711)
            os.chmod(egress_dir, 0o711)
            rules = EgressRules.for_jobs(self.policy)
            host.proxy = EgressProxy(egress_dir / "proxy.sock", rules, owner=uid, name=f"job-{job_id}").start()
            egress_socket = host.proxy.socket_path
            readable.append(egress_dir)
        # firejail and the interpreter start as root, so they get a fixed environment: the job's
        # own variables (which could name LD_PRELOAD & co.) are set by the interpreter only after
        # it has become the job's user.
        basics = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8"}
        job_env = {**basics, "PATH": f"{venv}/bin:{basics['PATH']}", **user_env}
        config = JailConfig(
            scratch=scratch,
            runtime_dir=self.runtime_dir,
            bundle=bundle_path,
            # The system interpreter, not the venv's `bin/python`: nothing a package build wrote
            # into the venv runs before the switch to the job's user; the venv is entered after.
            venv=venv,
            env=job_env,
            call_timeout_s=limits.call_timeout_s,
            cpu_seconds=limits.cpu_seconds,
            uid=uid,
            gid=uid,
            # Inside a jail the interpreter is alone in its pid namespace with its own user:
            # killing "every process it may signal" kills exactly its own leftovers.
            reap_others=self.jailed and uid is not None,
            # The jail's way out (runtime.network): a relay on its loopback to this socket.
            egress_socket=egress_socket,
        )
        command = [self.python, "-I", "-S", str(self.runtime_dir / "spider_jail.py")]
        preexec = None
        if self.jailed:
            spec = JailSpec(
                readable=readable,
                writable=[scratch],
                limits=JailLimits(
                    memory_mb=limits.memory_mb,
                    cpu_seconds_total=limits.cpu_seconds * (self.max_calls + 1),
                    max_processes=limits.max_processes,
                    file_size_mb=limits.file_size_mb,
                ),
                network=runtime.network,
                extra_etc=[f"python{self.python_minor}"],
            )
            command = firejail_argv(self.firejail, write_profile(spec, job_dir / "jail.profile"), command)
        else:
            preexec = _unjailed_limits(limits.memory_mb, limits.cpu_seconds * (self.max_calls + 1), limits.file_size_mb)
        launch = LaunchSpec(argv=command, env=basics, cwd=scratch, config=config, preexec=preexec)
        return JobSandbox(
            job_id=job_id,
            manifest=manifest,
            bundle_sha256=bundle_sha256,
            launch=launch,
            pool_size=self.pool_size,
            max_calls=self.max_calls,
            call_timeout_s=limits.call_timeout_s,
            start_timeout_s=self.start_timeout_s,
            kill_grace_s=self.kill_grace_s,
            output_mb=limits.output_mb,
        )

    def _remove_dead_jobs(self) -> None:
        """Remove the directories (and unmount the scratch quotas) that workers which died left."""
        try:
            entries = list((self.root / "jobs").iterdir())
        except OSError:
            return
        for job_dir in entries:  # job dirs, and job dirs still under their staging names
            if job_dir.is_dir() and not job_dir.is_symlink() and (job_dir / OWNER_LOCK).exists():
                if remove_unowned_job_dir(job_dir):
                    log.info("removed the leftovers of job %s, which a worker that died had open", job_dir.name)


def _unjailed_limits(memory_mb: int, cpu_seconds: int, file_size_mb: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_mb * 1024 * 1024,) * 2)

    return apply
