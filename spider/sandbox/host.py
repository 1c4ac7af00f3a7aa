"""What an open job holds on a sandbox worker outside its jails: its directory and the lock that
says a live worker owns it (`JobHost`), its egress proxy, and its scratch quota (a tmpfs mounted
on the scratch dir when the worker is root, else a `ScratchWatch` that polls it)."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from spider.errors import SandboxError
from spider.sandbox.egress import EgressProxy

log = logging.getLogger("spider.sandbox")

OWNER_LOCK = "owner.lock"
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


class JobHost:
    """What an open job holds on the worker outside its jails: a lock on its directory (held for
    as long as the job is open, so that a worker starting later can tell a dead worker's leftovers
    from a live neighbour's job) and its egress proxy. `close()` stops the proxy and removes the
    directory, unmounting the scratch quota first."""

    def __init__(self, job_dir: Path, lock_fd: int):
        self.job_dir = job_dir
        self.proxy: EgressProxy | None = None
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, job_dir: Path) -> "JobHost":
        """Make `job_dir` (mode 0711), locked from the moment it appears: it is made under another
        name with its lock held, then renamed into place."""
        staging = job_dir.with_name(f".{job_dir.name}.{secrets.token_hex(4)}")
        staging.mkdir(mode=0o711)
        os.chmod(staging, 0o711)
        lock_fd = os.open(staging / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            os.rename(staging, job_dir)
        except OSError:
            os.close(lock_fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise SandboxError(
                f"job {job_dir.name} is open in another sandbox worker on this host that shares the root "
                f"{job_dir.parent.parent}; give each worker process a root of its own (SPIDER_SANDBOX_DIR)"
            ) from None
        return cls(job_dir, lock_fd)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        remove_job_dir(self.job_dir)
        os.close(self._lock_fd)


def remove_unowned_job_dir(job_dir: Path) -> bool:
    """Remove `job_dir` unless a live worker holds its owner lock; whether it is gone."""
    try:
        fd = os.open(job_dir / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        remove_job_dir(job_dir)  # every job dir appears with its lock: this one is from an older version
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        remove_job_dir(job_dir)
    finally:
        os.close(fd)
    return True


def remove_job_dir(job_dir: Path) -> None:
    """Unmount the job's scratch quota (if any), then delete its directory."""
    unmount_scratch(job_dir / "scratch")
    shutil.rmtree(job_dir, ignore_errors=True)


def _libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def mount_scratch(scratch: Path, uid: int, disk_mb: int, max_files: int) -> None:
    """Mount a tmpfs of `disk_mb` MiB and `max_files` files and directories on `scratch`, owned by
    `uid` with mode 0700 (the tmpfs's own root takes one more inode)."""
    options = f"size={disk_mb}m,nr_inodes={max_files + 1},mode=0700,uid={uid},gid={uid}"
    try:
        _libc_call("mount", b"spider-scratch", os.fsencode(scratch), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode())
    except OSError as exc:
        raise SandboxError(
            f"cannot mount the scratch quota of {scratch} (a tmpfs: {exc.strerror}); the sandbox worker needs "
            "CAP_SYS_ADMIN, which firejail needs too"
        ) from None


def unmount_scratch(scratch: Path) -> None:
    """Detach every tmpfs mounted on `scratch` (jails still running keep theirs until they end)."""
    for _ in range(8):
        if not os.path.ismount(scratch):
            return
        try:
            _libc_call("umount2", os.fsencode(scratch), _MNT_DETACH | _UMOUNT_NOFOLLOW)
        except OSError as exc:
            log.warning("cannot unmount the scratch quota %s: %s", scratch, exc)
            return


def scratch_usage(scratch: Path, stop_bytes: int, stop_files: int) -> tuple[int, int]:
    """Bytes (allocated blocks) and entries under `scratch`; counting stops past either bound."""
    used, files = 0, 0
    stack = [str(scratch)]
    while stack and used <= stop_bytes and files <= stop_files:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    files += 1
                    try:
                        used += entry.stat(follow_symlinks=False).st_blocks * 512
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue
    return used, files


class ScratchWatch:
    """The scratch quota of a worker that cannot mount one: a thread that measures each watched
    scratch dir every `interval_s` seconds and empties one that holds more than its quota."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._watched: dict[str, tuple[Path, int, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str, scratch: Path, disk_mb: int, max_files: int) -> None:
        with self._lock:
            self._watched[job_id] = (scratch, disk_mb * 1024 * 1024, max_files)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="spider-scratch-watch", daemon=True)
                self._thread.start()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._watched.pop(job_id, None)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                watched = list(self._watched.items())
            for job_id, (scratch, max_bytes, max_files) in watched:
                self.check(job_id, scratch, max_bytes, max_files)

    def check(self, job_id: str, scratch: Path, max_bytes: int, max_files: int) -> bool:
        """Empty `scratch` if it is over its quota; whether it was."""
        used, files = scratch_usage(scratch, max_bytes, max_files)
        if used <= max_bytes and files <= max_files:
            return False
        log.warning(
            "job %s holds more than its scratch quota (%d MiB, %d files) and its scratch dir was emptied",
            job_id, max_bytes // (1024 * 1024), max_files,
        )  # fmt: skip
        try:
            entries = list(os.scandir(scratch))
        except OSError:
            return True
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        return True
