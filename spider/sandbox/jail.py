"""The firejail command line that confines one interpreter (or one dependency build).

The filesystem view is built from an allow-list: system directories are visible read-only,
`/etc` is reduced to what Python, TLS and name resolution need, `/dev` is private, and every
other top-level directory is hidden, except the few paths the jail needs (the runtime, the
job's venv, the job's own directory), which are whitelisted, read-only but for the scratch dir.
When the worker runs as root, the jailed interpreter switches to a user id of its own per job
before it runs any user code: that makes the process-count limit per job, keeps other jobs'
and the server's files out of reach by plain permissions too, and lets the interpreter kill
every process of its job after each call without touching anything else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from spider.errors import SandboxError

# Shown read-only as they are; everything else at the top level is hidden or whitelisted.
SYSTEM_TOP_DIRS = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "sys", "run", "var"}
# firejail keeps its own state under /run/firejail; /var/run and /var/lock are links into /run.
KEEP_IN_RUN = {"firejail"}
PRIVATE_ETC = [
    "alternatives", "ca-certificates", "ssl", "pki", "crypto-policies", "hosts", "host.conf", "nsswitch.conf",
    "resolv.conf", "gai.conf", "localtime", "timezone", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "passwd", "group", "mime.types", "protocols", "services", "python3", "os-release",
]
# Job users live far above any uid a system hands out.
JAIL_UID_BASE = 1_600_000_000
JAIL_UID_SPAN = 500_000_000
BUILD_UID = JAIL_UID_BASE - 1
MiB = 1024 * 1024


def find_firejail(explicit: str | Path | None = None) -> str | None:
    """The firejail executable to use, or None when it is not installed."""
    if explicit is not None:
        path = Path(explicit)
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which("firejail") or next(
        (p for p in ("/usr/bin/firejail", "/usr/local/bin/firejail") if os.access(p, os.X_OK)), None
    )


def job_uid(job_id: str) -> int:
    """A user id of this job's own (stable, so every worker of the host agrees on it)."""
    digest = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    return JAIL_UID_BASE + digest % JAIL_UID_SPAN


@dataclass
class JailLimits:
    memory_mb: int
    cpu_seconds_total: int
    max_processes: int
    file_size_mb: int
    open_files: int = 1024


@dataclass
class JailSpec:
    """What one jail may see and do. Paths are absolute and resolved."""

    readable: list[Path]
    writable: list[Path]
    limits: JailLimits
    network: bool = False
    extra_etc: list[str] = field(default_factory=list)
    hostname: str = "spider-sandbox"


# firejail 0.9.72 prints these even with --quiet; they say nothing about the jailed program.
FIREJAIL_NOISE = (": unmount: Invalid argument",)


def strip_firejail_noise(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not any(n in line for n in FIREJAIL_NOISE))


def _top(path: Path) -> str:
    return path.parts[1]


def firejail_argv(firejail: str, spec: JailSpec, command: list[str]) -> list[str]:
    """The full argv that runs `command` inside a jail described by `spec`."""
    keep_caps = os.geteuid() == 0
    argv = [
        firejail,
        "--noprofile",
        "--quiet",
        # As root, the interpreter keeps CAP_SETUID/SETGID only to switch to the job's user before
        # running anything else; switching clears every capability for good (nonewprivs).
        "--caps.keep=setuid,setgid" if keep_caps else "--caps.drop=all",
        "--nonewprivs",
        "--seccomp",
        "--nogroups",
        "--ipc-namespace",
        "--private-dev",
        "--dbus-user=none",
        "--dbus-system=none",
        "--nosound",
        "--no3d",
        "--novideo",
        f"--hostname={spec.hostname}",
        f"--rlimit-as={spec.limits.memory_mb * MiB}",
        f"--rlimit-cpu={spec.limits.cpu_seconds_total}",
        f"--rlimit-nproc={spec.limits.max_processes}",
        f"--rlimit-fsize={spec.limits.file_size_mb * MiB}",
        f"--rlimit-nofile={spec.limits.open_files}",
    ]
    if spec.network:
        argv.append("--protocol=unix,inet,inet6")
    else:
        argv += ["--net=none", "--protocol=unix"]
    argv.append("--read-only=/")
    allowed = [p for p in spec.readable + spec.writable]
    allowed_tops = {_top(p) for p in allowed}
    for entry in sorted(os.listdir("/")):
        if entry in SYSTEM_TOP_DIRS or entry in allowed_tops:
            continue
        argv.append(f"--blacklist=/{entry}")
    # /run and /var stay (firejail needs /run/firejail) but lose their contents: sockets of other
    # services, caches, spools. A top directory holding whitelisted paths is replaced by a tmpfs
    # holding only those, so it needs no blacklist.
    if "run" not in allowed_tops:
        argv += [f"--blacklist=/run/{e}" for e in sorted(_listdir("/run")) if e not in KEEP_IN_RUN]
    if "var" not in allowed_tops:
        argv += [f"--blacklist=/var/{e}" for e in sorted(_listdir("/var")) if not os.path.islink(f"/var/{e}")]
    for path in allowed:
        argv.append(f"--whitelist={path}")
    for top in sorted(allowed_tops):
        argv.append(f"--read-only=/{top}")
    for path in spec.writable:
        argv.append(f"--read-write={path}")
    argv.append("--read-only=/dev/shm")
    etc = [name for name in PRIVATE_ETC + spec.extra_etc if os.path.exists(f"/etc/{name}")]
    argv.append("--private-etc=" + ",".join(etc))
    argv.append("--")
    return argv + command


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def check_traversable(path: Path) -> None:
    """Jailed job users are not root: every directory above the sandbox root must let others
    through (o+x), or the jail cannot reach its runtime and venvs."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise SandboxError(
                f"the sandbox root {path} is not reachable by the jail's users: {parent} is not "
                f"searchable by others (mode {oct(mode & 0o777)}); pick a root such as /var/lib/spider/sandbox "
                f"or run `chmod o+x {parent}`"
            )
