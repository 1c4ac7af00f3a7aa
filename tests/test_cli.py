"""The `spider` command line against the running stack, and the deployment files' commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spider.cli import build_parser
from tests.conftest import API_KEYS
from tests.helpers import ROOT, make_config, read_jsonl

SPIDER = str(Path(sys.executable).with_name("spider"))


def spider(*args: str, stack=None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if stack is not None:
        env.update(SPIDER_URL=stack.url, SPIDER_API_KEY=API_KEYS[0])
    proc = subprocess.run([SPIDER, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_submit_status_logs_download(stack, tiny_model, tmp_path):
    config = make_config(None, None, tiny_model)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    job_id = json.loads(spider("submit", str(path), stack=stack).stdout)["job_id"]
    logs = spider("logs", "-f", job_id, stack=stack).stdout
    assert "job.queued" in logs and "job.completed" in logs
    status = json.loads(spider("status", job_id, stack=stack).stdout)
    assert status["status"] == "completed"
    assert job_id in [j["job_id"] for j in json.loads(spider("status", stack=stack).stdout)]
    out = tmp_path / "out.jsonl"
    spider("download", job_id, "-o", str(out), stack=stack)
    assert len(read_jsonl(out)) == 6
    history = spider("logs", job_id, stack=stack).stdout
    assert history.splitlines() == logs.splitlines()
    cancelled = json.loads(spider("cancel", job_id, stack=stack).stdout)
    assert cancelled["status"] == "completed"  # an ended job stays as it ended


def test_errors_are_one_line_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job:\n  model: {name: m}\n  source: {dataset: d, feild: x}\n")
    proc = spider("run", str(bad), check=False)
    assert proc.returncode == 2
    assert "job.source.feild: unknown key; did you mean 'field'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = spider("status", "abc", check=False)
    assert proc.returncode == 2 and "no server given" in proc.stderr
    proc = spider("worker", "--queues", "rollouts", check=False)
    assert proc.returncode == 2 and "unknown queues ['rollouts']" in proc.stderr


def test_deployment_commands_are_valid_cli_invocations():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    parser = build_parser()
    commands = [svc["command"] for svc in compose["services"].values() if svc.get("command", [""])[0] == "spider"]
    assert {c[1] for c in commands} == {"serve", "worker", "flower"}
    for command in commands:
        parser.parse_args(command[1:])
    queues = {c[c.index("--queues") + 1] for c in commands if "--queues" in c}
    from spider.local import DEFAULT_WORKERS
    from spider.workers.app import QUEUES

    assert queues == {"control", "rollout", "sandbox", "train"} == set(QUEUES)
    assert {w.queues for w in DEFAULT_WORKERS} == queues


@pytest.mark.slow
def test_up_serves_the_stack_with_flower_and_stops_cleanly(tmp_path):
    import signal
    import time

    import httpx

    from spider.local import free_port

    port, flower = free_port(), free_port()
    proc = subprocess.Popen(
        [SPIDER, "up", "--port", str(port), "--flower-port", str(flower), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert f"Spider is up at http://127.0.0.1:{port}" in line
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
        flower_line = proc.stdout.readline()
        assert f"Flower: http://127.0.0.1:{flower}" in flower_line
        user, _, password = flower_line.split("FLOWER_BASIC_AUTH=")[1].rstrip(")\n").partition(":")
        deadline = time.monotonic() + 60
        workers = {}
        while time.monotonic() < deadline and len(workers) < 4:
            try:
                workers = httpx.get(f"http://127.0.0.1:{flower}/api/workers", params={"refresh": "true"}, timeout=10,
                                    auth=(user, password)).json()
            except (httpx.HTTPError, ValueError):
                time.sleep(1)
        # Flower answers no one without the password.
        assert httpx.get(f"http://127.0.0.1:{flower}/api/workers", timeout=10).status_code == 401
        queues = {q["name"] for info in workers.values() for q in info.get("active_queues", [])}
        assert queues == {"control", "rollout", "sandbox", "train"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # its watchdog stops the stack it started
            proc.wait()
            raise
        assert code == 0
    leftovers = subprocess.run(["pgrep", "-f", f"(worker-.*-{port}@)|(--port {port})|(--port {flower})"], capture_output=True)
    assert leftovers.returncode == 1, leftovers.stdout


@pytest.mark.slow
def test_ctrl_c_during_run_cancels_the_job(stack, tiny_model, tmp_path):
    import signal

    import httpx

    config = make_config(None, None, tiny_model, **{
        "source.split": "train", "generation.duplications": 8, "generation.max_batch_size": 1,
        "generation.parameters.max_tokens": 64,
    })
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    proc = subprocess.Popen(
        [SPIDER, "run", str(path), "--url", stack.url, "--api-key", API_KEYS[0], "-o", str(tmp_path / "out.jsonl")],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    line = proc.stderr.readline()
    assert line.startswith("job ") and line.strip().endswith("submitted"), line
    job_id = line.split()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"job {job_id} cancelled; wrote its partial result" in err
    status = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {API_KEYS[0]}"}).json()
    assert status["status"] == "cancelled"
    # The rows done before the cancel (if any) were downloaded, and say they are a part.
    assert (tmp_path / "out.jsonl").exists()
    assert json.loads((tmp_path / "out.metadata.json").read_text())["partial"] is True


def test_progress_shows_model_loading_then_generation_tokens_per_second():
    from spider.cli import Progress
    from spider.types import Event

    def event(kind, level="info", **data):
        return Event(id="1-0", job_id="0123456789abcdef", ts=0.0, kind=kind, level=level, message=kind, data=data)

    progress = Progress()
    task = progress.bar.tasks[0]
    assert progress.phase == "queued"
    progress(event("job.planned", rows_total=8, batches_total=2, duplications=1))
    assert progress.phase == "generating" and task.total == 8
    progress(event("model.loading", model="m", provider="vllm"))
    assert progress.phase == "loading model"
    progress(event("model.loaded", model="m", provider="vllm", seconds=70.0))
    assert progress.phase == "generating"
    # 96 tokens in 2 s of generation: the 70 s of loading are not in the rate.
    progress(event("batch.completed", rows_done=4, rows_total=8, tokens_per_second_total=48.0))
    assert task.completed == 4 and task.fields["tps"] == "48 tok/s"
    progress(event("model.loading", model="m", provider="vllm"))  # a second worker loads: rows keep going
    assert progress.phase == "generating"
    progress(event("job.completed", records=8))
    assert progress.phase == "completed"


def test_progress_counts_a_training_jobs_steps_and_shows_its_teacher_kl(capsys):
    from spider.cli import Progress
    from spider.types import Event

    def event(kind, **data):
        return Event(id="1-0", job_id="0123456789abcdef", ts=0.0, kind=kind, level="info", message=kind, data=data)

    progress = Progress()
    task = progress.bar.tasks[0]
    progress(event("job.planned", steps=12, train_rows=24, eval_rows=8, groups_per_batch=2, group_size=4))
    assert progress.phase == "training" and task.total == 12 and task.fields["unit"] == "steps"
    progress(event("model.loading", model="s", backend="local"))
    assert progress.phase == "loading model"
    progress(event("train.step", step=1, steps_total=12, teacher_kl=2.5, loss=10.0, learning_rate=1e-4,
                   grad_norm=3.0, tokens_trained=96, aligned_fraction=0.97, step_s=1.5))
    assert progress.phase == "training" and task.completed == 1 and task.fields["tps"] == "KL 2.500"
    progress(event("train.step", step=2, steps_total=12, teacher_kl=2.0, eval_teacher_kl=2.2, loss=8.0,
                   learning_rate=1e-4, grad_norm=2.0, tokens_trained=90, aligned_fraction=1.0, step_s=1.4))
    assert task.completed == 2 and task.fields["tps"] == "KL 2.000 (held-out 2.200)"
    progress(event("job.completed", steps=12))
    assert progress.phase == "completed"
    printed = capsys.readouterr().err
    assert "step 1: teacher KL 2.5000" in printed and "aligned 97.0%" in printed


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(tmp_path):
    """So that a restart policy (systemd's on-failure, the local stack's supervision) starts it
    again. The error here: a Redis whose user may not BRPOP, the call every consumer makes."""
    from spider.local import free_port, redis_server_binary

    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\nuser default on nopass ~* &* +@all -brpop\n')
    redis_proc = subprocess.Popen([redis_server_binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        env = {**os.environ, "SPIDER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        worker = subprocess.run([sys.executable, "-m", "spider", "worker", "--queues", "control"], env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        redis_proc.kill()
        redis_proc.wait()
    assert "Unrecoverable error" in worker.stderr and "NoPermissionError" in worker.stderr, worker.stderr[-3000:]
    assert worker.returncode == 1
