"""The local stack's watchdog: a small process that stops the stack's processes once the process that
started them is gone, however it ended (SIGKILL included), so that none of them outlives it.

The starter holds the write end of the watchdog's stdin and writes `watch <pid> <stage>` for each
process it starts as the leader of its own process group. The end of that input (the starter closed
it after its own orderly stop, or died) or a new parent (the starter died while a forked copy of it
still holds the pipe) stops what is left of the watched groups: SIGTERM stage by stage (0 first: the
API and workers before Redis), then SIGKILL after the grace period. Descendants that left their
group (a jailed interpreter runs in a session of its own) are tracked from /proc while the starter
lives, and stopped with their stage.

    python -m spider.watchdog <starter pid> <grace seconds> [<folder to remove afterwards>]
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 1.0


@dataclass(frozen=True)
class ProcInfo:
    """One line of /proc/<pid>/stat, the fields the watchdog needs."""

    pid: int
    state: str
    ppid: int
    pgid: int
    start: int  # clock ticks after boot: with the pid, names one process even after pid reuse

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")  # a zombie has exited; only its parent's wait is left


def proc_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcInfo(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def all_procs() -> list[ProcInfo]:
    infos = (proc_info(int(name)) for name in os.listdir("/proc") if name.isdigit()) if os.path.isdir("/proc") else ()
    return [info for info in infos if info is not None]


class Watch:
    """The watched process groups and the strays: descendants of theirs in other groups."""

    def __init__(self) -> None:
        self.groups: dict[int, int] = {}  # pgid -> stage
        self.strays: dict[tuple[int, int], int] = {}  # (pid, start) -> stage

    def note_strays(self) -> None:
        procs = {info.pid: info for info in all_procs()}
        children: dict[int, list[ProcInfo]] = {}
        for info in procs.values():
            children.setdefault(info.ppid, []).append(info)
        # From every member of a watched group (its leader may have died before its children).
        for member in procs.values():
            stage = self.groups.get(member.pgid)
            if stage is None:
                continue
            todo = list(children.get(member.pid, []))
            while todo:
                info = todo.pop()
                if info.pgid not in self.groups:
                    self.strays.setdefault((info.pid, info.start), stage)
                    todo.extend(children.get(info.pid, []))
        # Forget strays that are gone, so that their pids may be reused by anyone.
        for key in list(self.strays):
            info = procs.get(key[0])
            if info is None or info.start != key[1] or not info.alive:
                del self.strays[key]

    def survivors(self, stage: int) -> list[ProcInfo]:
        groups = {pgid for pgid, s in self.groups.items() if s == stage}
        strays = {key for key, s in self.strays.items() if s == stage}
        return [
            info for info in all_procs()
            if info.alive and (info.pgid in groups or (info.pid, info.start) in strays)
        ]

    def signal_stage(self, stage: int, sig: int) -> None:
        for pgid, s in self.groups.items():
            if s == stage:
                _quietly(os.killpg, pgid, sig)
        for info in self.survivors(stage):
            if info.pgid not in self.groups:
                _quietly(os.kill, info.pid, sig)

    def stop(self, grace: float) -> None:
        """SIGTERM each stage in turn, SIGKILL what is left of it after `grace` seconds."""
        self.note_strays()
        for stage in sorted(set(self.groups.values()) | set(self.strays.values())):
            self.signal_stage(stage, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.survivors(stage) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.survivors(stage):
                self.signal_stage(stage, signal.SIGKILL)


def _quietly(kill, pid: int, sig: int) -> None:
    try:
        kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(starter: int, grace: float, remove: Path | None) -> None:
    """Follow the starter's lines until they end or the starter is gone, then stop what is watched."""
    watch = Watch()
    pending = b""
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _watch, pid, stage = line.decode().split()
                watch.groups[int(pid)] = int(stage)
        if os.getppid() != starter:
            break
        watch.note_strays()
    watch.stop(grace)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


class Watchdog:
    """The starter's end of a watchdog process: `watch` each process group as it starts, `finish`
    once it has stopped them."""

    def __init__(self, grace: float, remove: Path | None = None, log: Path | None = None):
        self.grace = grace
        argv = [sys.executable, "-m", "spider.watchdog", str(os.getpid()), str(grace)]
        if remove is not None:
            argv.append(str(remove))
        out = open(log, "ab") if log else subprocess.DEVNULL
        # A session of its own: a signal to the starter's process group (a terminal's Ctrl-C or
        # hangup, `kill -- -<pgid>`) does not reach the watchdog, which must outlive the starter.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True)
        if log:
            out.close()

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the watchdog is gone (or finished): the starter's own stop still runs

    def watch(self, pid: int, stage: int = 0) -> None:
        self._send(f"watch {pid} {stage}")

    def finish(self) -> None:
        """End the watch: the watchdog stops what the watched processes left behind, and exits."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=3 * self.grace + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str]) -> int:
    # The starter's terminal signals are the starter's to handle; its death is this process's cue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    starter, grace = int(argv[0]), float(argv[1])
    serve(starter, grace, Path(argv[2]) if len(argv) > 2 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
