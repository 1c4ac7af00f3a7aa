"""The local stack's lifecycle: no process of it outlives the command that started it (`spider up`,
`spider run`), whatever signal ends that command, SIGKILL included. (What its Redis keeps across a
restart: tests/test_stack_data.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from spider.local import LocalStack, WorkerSpec, free_port
from tests.helpers import ROOT, make_config

SPIDER = [sys.executable, "-m", "spider"]
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL]


def command_env() -> dict[str, str]:
    """This environment without a server to talk to: the command starts its own stack."""
    return {k: v for k, v in os.environ.items() if k not in ("SPIDER_URL", "SPIDER_API_KEY", "SPIDER_REDIS_URL")}


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return str(proc.pid)


def survivors(procs: list[psutil.Process], timeout: float) -> list[str]:
    """The processes of `procs` still alive once they have all gone, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [describe(p) for p in procs if alive(p)]


def stack_tree(pid: int) -> list[psutil.Process]:
    """Every descendant of the command `pid`, after checking that the whole stack is among them."""
    procs = psutil.Process(pid).children(recursive=True)
    lines = " | ".join(describe(p) for p in procs)
    for part in ("redis-server", "spider.watchdog", "spider serve", "worker-control", "worker-rollout",
                 "worker-sandbox", "worker-train"):
        assert part in lines, f"{part} is not running: {lines}"
    return procs


def end(command: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """Kill what a failed test left behind, so that it does not load the machine for the next."""
    if command.poll() is None:
        command.kill()
        command.wait()
    for proc in procs:
        if alive(proc):
            proc.kill()


def start_up(folder: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    """`spider up` in `folder`; with `sigint_ignored`, as a shell starts `spider up &` (SIGINT ignored)."""
    folder.mkdir()
    as_background_job = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    with open(folder / "up.log", "wb") as err:
        return subprocess.Popen([*SPIDER, "up", "--port", str(free_port()), "--data-dir", str(folder / "data")],
                                cwd=ROOT, env=command_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=as_background_job)


def up_tree(command: subprocess.Popen, folder: Path) -> list[psutil.Process]:
    line = command.stdout.readline()
    assert "Spider is up at http://127.0.0.1:" in line, (folder / "up.log").read_text()[-3000:]
    return stack_tree(command.pid)


def job_file(path: Path, tiny_model: Path, **overrides) -> Path:
    """A job for `spider run`, naming no server: the command starts the local stack unless given --url."""
    config = make_config(None, None, tiny_model, **overrides)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def start_run(job: Path, folder: Path, *options: str) -> subprocess.Popen:
    folder.mkdir()
    with open(folder / "run.log", "wb") as err:
        return subprocess.Popen([*SPIDER, "run", str(job), "-o", str(folder / "out.jsonl"), *options], cwd=ROOT,
                                env=command_env(), stdout=subprocess.DEVNULL, stderr=err)


def wait_for(command: subprocess.Popen, folder: Path, until: str, timeout: float = 120) -> str:
    """The stderr of `spider run` once it shows `until`."""
    log = folder / "run.log"
    deadline = time.monotonic() + timeout
    while until not in log.read_text() and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert until in text, f"`spider run` ({command.poll()}) did not show {until!r}:\n{text[-3000:]}"
    return text


def run_tree(command: subprocess.Popen, folder: Path) -> list[psutil.Process]:
    """The stack of `spider run`, once its job is submitted."""
    wait_for(command, folder, "submitted")
    return stack_tree(command.pid)


@pytest.mark.slow
def test_spider_up_leaves_no_process_behind_whatever_ends_it(tmp_path):
    # One `spider up` per signal, started together: they wait on each other's start-up less.
    commands = {sig: start_up(tmp_path / signal.Signals(sig).name) for sig in SIGNALS}
    trees: dict[int, list[psutil.Process]] = {}
    try:
        trees = {sig: up_tree(command, tmp_path / signal.Signals(sig).name) for sig, command in commands.items()}
        for sig, command in commands.items():
            command.send_signal(sig)
        exits = {sig: command.wait(timeout=60) for sig, command in commands.items()}
        assert exits == {sig: -signal.SIGKILL if sig == signal.SIGKILL else 0 for sig in SIGNALS}
        assert {sig: survivors(tree, timeout=45) for sig, tree in trees.items()} == {sig: [] for sig in SIGNALS}
    finally:
        for sig, command in commands.items():
            end(command, trees.get(sig, []))


@pytest.mark.slow
def test_spider_up_stops_with_an_error_when_a_worker_keeps_dying_soon_after_its_start(tmp_path):
    """Its supervision starts a worker that died again; one that keeps dying soon after each start
    (here SIGKILLed from outside each time) is left down, and `spider up` stops, saying which."""
    command = start_up(tmp_path / "up")
    tree: list[psutil.Process] = []
    try:
        tree = up_tree(command, tmp_path / "up")
        killed = kill_until_it_exits(command, "worker-sandbox", tree)
        assert command.wait(timeout=60) == 2
        check_left_down((tmp_path / "up" / "up.log").read_text(), "worker-sandbox", killed)
        assert survivors(tree, timeout=45) == []
    finally:
        end(command, tree)


def kill_until_it_exits(command: subprocess.Popen, name: str, tree: list[psutil.Process]) -> int:
    """SIGKILL the stack's process `name` under `command` each time it is started again, until
    `command` exits (at most 12 times); how many times. Each one killed joins `tree`."""
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    while command.poll() is None and len(killed) < 12 and time.monotonic() < deadline:
        current = [p for p in psutil.Process(command.pid).children(recursive=True)
                   if alive(p) and p.pid not in killed and name in describe(p)]
        if current:
            os.killpg(current[0].pid, signal.SIGKILL)
            killed.add(current[0].pid)
            tree.append(current[0])
        time.sleep(0.1)
    return len(killed)


def check_left_down(log: str, name: str, killed: int) -> None:
    """`log` says that `name` was started again after each kill but the last, then left down."""
    assert f"local {name} exited 5 times in a row" in log and "left down" in log, log[-3000:]
    assert log.count(f"local {name} exited with code -9; starting it again") == killed - 1
    assert 5 <= killed <= 10  # the first kill may come more than 30 s after its start


def test_spider_up_started_as_a_background_job_still_stops_on_sigint(tmp_path):
    """A shell starts `spider up &` with SIGINT ignored; `kill -INT` stops it all the same."""
    command = start_up(tmp_path / "background", sigint_ignored=True)
    tree: list[psutil.Process] = []
    try:
        tree = up_tree(command, tmp_path / "background")
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=60) == 0
        assert survivors(tree, timeout=45) == []
    finally:
        end(command, tree)


def engine_core(worker: psutil.Process, command: subprocess.Popen, timeout: float = 180) -> list[psutil.Process]:
    """The processes of vLLM's engine core under `worker`, once it has started one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and command.poll() is None:
        procs = worker.children(recursive=True)
        if any("EngineCore" in describe(p) for p in procs):
            return procs
        time.sleep(0.5)
    raise AssertionError(f"no vLLM engine core under the rollout worker (command: {command.poll()})")


@pytest.mark.slow
def test_spider_run_stops_with_an_error_when_its_rollout_worker_keeps_dying(tiny_model, tmp_path):
    """The job's events are followed no longer once no rollout worker is left to run it."""
    job = job_file(tmp_path / "long.yaml", tiny_model, **{
        "source.split": "train", "generation.max_batch_size": 1, "generation.parameters.max_tokens": 64})
    command = start_run(job, tmp_path / "run")
    tree: list[psutil.Process] = []
    try:
        tree = run_tree(command, tmp_path / "run")
        killed = kill_until_it_exits(command, "worker-rollout", tree)
        assert command.wait(timeout=90) == 2
        log = (tmp_path / "run" / "run.log").read_text()
        check_left_down(log, "worker-rollout", killed)
        assert "error: local worker-rollout exited 5 times" in log
        assert not (tmp_path / "run" / "out.jsonl").exists()
        assert survivors(tree, timeout=45) == []
    finally:
        end(command, tree)


# Exit statuses: a stop signal is reported as the shell does (128 + its number); Ctrl-C cancels
# the job, which then ends cancelled (1).
RUN_EXIT = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGHUP: 128 + signal.SIGHUP, signal.SIGINT: 1,
            signal.SIGKILL: -signal.SIGKILL}


@pytest.mark.slow
def test_spider_run_leaves_no_process_behind_whatever_ends_it(tiny_model, tmp_path):
    """TERM, HUP and Ctrl-C come while a job runs on the hf engine. SIGKILL comes while the job's
    vLLM engine loads: its engine core is the rollout worker's child, with a worker process of its
    own, and only the watchdog is left to stop them."""
    folders = {sig: tmp_path / signal.Signals(sig).name for sig in SIGNALS}
    # Long enough to be running when the signal comes: 64 rows of 64 tokens, one at a time.
    hf_job = job_file(tmp_path / "hf.yaml", tiny_model, **{
        "source.split": "train", "generation.max_batch_size": 1, "generation.duplications": 2,
        "generation.parameters.max_tokens": 64})
    vllm_job = job_file(tmp_path / "vllm.yaml", tiny_model, **{
        "model.provider": "vllm", "model.parameters": {"dtype": "float32", "max_model_len": 512}})
    # Started together: they wait on each other's start-up less.
    commands = {sig: start_run(vllm_job if sig == signal.SIGKILL else hf_job, folder) for sig, folder in folders.items()}
    trees: dict[int, list[psutil.Process]] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            trees[sig] = run_tree(commands[sig], folders[sig])
            commands[sig].send_signal(sig)
        trees[signal.SIGKILL] = run_tree(commands[signal.SIGKILL], folders[signal.SIGKILL])
        rollout = next(p for p in trees[signal.SIGKILL] if "worker-rollout" in describe(p))
        trees[signal.SIGKILL] += engine_core(rollout, commands[signal.SIGKILL])
        commands[signal.SIGKILL].kill()
        exits = {sig: command.wait(timeout=90) for sig, command in commands.items()}
        assert exits == RUN_EXIT
        assert {sig: survivors(tree, timeout=45) for sig, tree in trees.items()} == {sig: [] for sig in SIGNALS}
        # Only Ctrl-C's cancelled job leaves a result: the rows it did before (a partial result).
        assert [sig for sig, folder in folders.items() if (folder / "out.jsonl").exists()] == [signal.SIGINT]
    finally:
        for sig, command in commands.items():
            end(command, trees.get(sig, []))


# A starter of one watched group, whose leader starts a child in its group and one in a session of
# its own that outlives the leader (as a daemon's double fork does); prints the leader's pid.
STARTER = """
import subprocess, sys, time
from spider.watchdog import Watchdog

LEADER = '''
import subprocess, time
subprocess.Popen(["sleep", "300"])
subprocess.Popen(["sleep", "301"], start_new_session=True)
time.sleep(4)
'''
dog = Watchdog(grace=2)
leader = subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True)
dog.watch(leader.pid)
print(leader.pid, flush=True)
time.sleep(300)
"""


def test_watchdog_stops_a_descendant_that_left_the_group_once_its_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    procs: list[psutil.Process] = []
    try:
        leader = psutil.Process(int(starter.stdout.readline()))
        deadline = time.monotonic() + 30
        while len(leader.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = leader.children()
        assert sorted(p.cmdline()[-1] for p in procs) == ["300", "301"]
        # The leader exits: its child in a session of its own has no parent in the stack any more.
        assert survivors([leader], timeout=30) == []
        starter.kill()
        starter.wait()
        assert survivors(procs, timeout=20) == []
    finally:
        end(starter, procs)


@pytest.mark.slow
def test_spider_run_stopped_by_sigterm_cancels_its_job_on_a_server(tiny_model, tmp_path):
    """A server's job would run on with no one to collect its result."""
    workers = (WorkerSpec("control", "threads", 2), WorkerSpec("rollout", "threads", 1))
    with LocalStack(workers=workers, log_dir=tmp_path / "logs") as stack:
        job = job_file(tmp_path / "job.yaml", tiny_model, **{
            "source.split": "train", "generation.max_batch_size": 1, "generation.parameters.max_tokens": 64})
        command = start_run(job, tmp_path / "run", "--url", stack.url)
        try:
            job_id = wait_for(command, tmp_path / "run", "submitted").split("job ", 1)[1].split()[0]
            command.send_signal(signal.SIGTERM)
            assert command.wait(timeout=60) == 128 + signal.SIGTERM
            assert "stopped by SIGTERM" in (tmp_path / "run" / "run.log").read_text()
            assert httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "cancelled"
        finally:
            end(command, [])
