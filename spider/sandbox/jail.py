"""The firejail command line that confines one interpreter (or one dependency build).

The filesystem view is built from an allow-list: system directories are visible read-only,
`/etc` is reduced to what Python, TLS and name resolution need, `/dev` is private, and every
other top-level directory is hidden, except the few paths the jail needs (the runtime, the
job's venv, the job's own directory), which are whitelisted, read-only but for the scratch dir.
The network is never the host's: every jail gets an empty network namespace (loopback only); one
with network access reaches out through the worker's egress proxy alone (spider.sandbox.egress).
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
    "passwd", "group", "mime.types", "protocols", "services", "python3", "os-release", "debian_version",
    "lsb-release", "issue", "system-release", "redhat-release", "shells",
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
    # A jail always has a network namespace of its own with loopback only; `network` lets it
    # open inet sockets there, for the relay to the worker's egress proxy (spider.sandbox.egress),
    # whose socket directory must be in `readable`.
    network: bool = False
    extra_etc: list[str] = field(default_factory=list)
    hostname: str = "spider-sandbox"


# firejail 0.9.72 prints these even with --quiet; they say nothing about the jailed program.
FIREJAIL_NOISE = (": unmount: Invalid argument",)


def strip_firejail_noise(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not any(n in line for n in FIREJAIL_NOISE))


def _top(path: Path) -> str:
    return path.parts[1]


def firejail_profile(spec: JailSpec) -> str:
    """The firejail profile of a jail described by `spec`.

    A profile file rather than command-line options: firejail takes at most 128 arguments, and
    the allow-lists below grow with what the host has in /, /etc, /run and /var."""
    for path in spec.readable + spec.writable:
        if "\n" in str(path) or "," in str(path):
            raise SandboxError(f"the sandbox path {str(path)!r} contains a newline or a comma; pick a plainer root")
    lines = [
        "quiet",
        # As root, the interpreter keeps CAP_SETUID/SETGID only to switch to the job's user before
        # running anything else; switching clears every capability for good (nonewprivs).
        "caps.keep setuid,setgid" if os.geteuid() == 0 else "caps.drop all",
        "nonewprivs",
        "seccomp",
        "nogroups",
        "ipc-namespace",
        "private-dev",
        "dbus-user none",
        "dbus-system none",
        "nosound",
        "no3d",
        "novideo",
        f"hostname {spec.hostname}",
        f"rlimit-as {spec.limits.memory_mb * MiB}",
        f"rlimit-cpu {spec.limits.cpu_seconds_total}",
        f"rlimit-nproc {spec.limits.max_processes}",
        f"rlimit-fsize {spec.limits.file_size_mb * MiB}",
        f"rlimit-nofile {spec.limits.open_files}",
    ]
    lines += ["net none", "protocol unix,inet,inet6" if spec.network else "protocol unix"]
    lines.append("read-only /")
    allowed = spec.readable + spec.writable
    allowed_tops = {_top(p) for p in allowed}
    lines += [f"blacklist /{e}" for e in sorted(os.listdir("/")) if e not in SYSTEM_TOP_DIRS | allowed_tops]
    # /etc keeps only what Python, TLS and name resolution read. (firejail's private-etc does the
    # same by copying, which costs ~150 ms per jail start; a blacklist is a cheap mount.)
    keep_etc = set(PRIVATE_ETC) | set(spec.extra_etc)
    lines += [f"blacklist /etc/{e}" for e in sorted(_listdir("/etc")) if e not in keep_etc]
    # /run and /var stay (firejail needs /run/firejail) but lose their contents: sockets of other
    # services, caches, spools. A top directory holding whitelisted paths is replaced by a tmpfs
    # holding only those, so it needs no blacklist.
    if "run" not in allowed_tops:
        lines += [f"blacklist /run/{e}" for e in sorted(_listdir("/run")) if e not in KEEP_IN_RUN]
    if "var" not in allowed_tops:
        lines += [f"blacklist /var/{e}" for e in sorted(_listdir("/var")) if not os.path.islink(f"/var/{e}")]
    lines += [f"whitelist {path}" for path in allowed]
    lines += [f"read-only /{top}" for top in sorted(allowed_tops)]
    lines += [f"read-write {path}" for path in spec.writable]
    lines.append("read-only /dev/shm")
    return "\n".join(lines) + "\n"


def write_profile(spec: JailSpec, path: Path) -> Path:
    """Write the profile of `spec` to `path` (readable by the worker only)."""
    path.write_text(firejail_profile(spec))
    os.chmod(path, 0o600)
    return path


def firejail_argv(firejail: str, profile: Path, command: list[str]) -> list[str]:
    """The argv that runs `command` in a jail set up by the profile file `profile`."""
    return [firejail, f"--profile={profile}", "--", *command]


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
