"""On-policy distillation through the real stack (client -> API -> control / train / rollout workers):
students learn from SmolLM2-135M-Instruct across tokenizers and with its own; a killed train
worker's job resumes from its checkpoint and ends at exactly max_steps; the product brief's config
runs on the Tinker SDK against the fake Tinker service."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from spider.client import SpiderClient
from spider.config import AppConfig
from spider.jobs.store import JobFiles
from spider.models import SMOLLM2_135M_INSTRUCT
from spider.types import EventKind
from tests.conftest import API_KEYS, SAMPLE_PROMPTS

pytestmark = pytest.mark.slow
ALICE = API_KEYS[0]


def on_policy_config(stack, student: str | Path, teacher: Any, provider: str = "hf", split: str = "train",
                     **options: Any) -> AppConfig:
    return AppConfig.parse({
        "server": {"base_url": stack.url, "api_key": ALICE, "request_timeout": 60},
        "job": {
            "model": {"provider": provider, "name": str(student)},
            "source": {"dataset": str(SAMPLE_PROMPTS), "split": split, "field": "question"},
            "generation": {"on_policy": True, "on_policy_options": {"teacher": teacher, **options}},
        },
    })


def run(config: AppConfig, tmp_path: Path, env: dict[str, str] | None = None, on_event=None):
    events = []

    def seen(event):
        events.append(event)
        if on_event is not None:
            on_event(event)

    with SpiderClient(config=config, env=env or {}) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=0.5, on_event=seen)
        archive = client.download_result(job_id, tmp_path / f"{job_id}.tar.gz") if status["status"] == "completed" else None
        steps = client.training_metrics(job_id)
    return job_id, status, events, archive, steps


def evals(steps: list[dict[str, Any]]) -> list[float]:
    return [s["eval_teacher_kl"] for s in steps if s.get("eval_teacher_kl") is not None]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from spider.models import resolve_model

    return resolve_model(SMOLLM2_135M_INSTRUCT)


LEARNING = dict(groups_per_batch=4, group_size=4, max_tokens=24, eval_every=8, eval_rows=8, steps_per_task=8,
                save_every=8, seed=0)


def test_a_student_with_another_tokenizer_learns_from_smollm2(stack, tiny_model, smollm2, tmp_path):
    """The tiny student's 1024-token BPE shares no vocabulary with SmolLM2's 49152-token one: every
    teacher score goes through the aligner. Held-out reverse KL must fall by more than half: its
    step-to-step noise on 8 prompts x 24 tokens is a few tenths of a nat, the drop several nats."""
    config = on_policy_config(stack, tiny_model, {"provider": "hf", "name": SMOLLM2_135M_INSTRUCT},
                              lora_rank=0, learning_rate=3e-3, max_steps=24, **LEARNING)
    job_id, status, events, archive, steps = run(config, tmp_path)
    assert status["status"] == "completed", status
    curve = evals(steps)
    assert len(curve) == 4 and [s["step"] for s in steps if s.get("eval_teacher_kl") is not None] == [0, 8, 16, 24]
    assert curve[-1] < 0.5 * curve[0], curve
    trained = [s for s in steps if s["step"] > 0]
    assert [s["step"] for s in trained] == list(range(1, 25))
    # Across tokenizers the aligner reports what it matched. A random student samples lone bytes of
    # multibyte characters, which the teacher cannot score as written: about a fifth of its tokens
    # at first. Those count as its worst tokens, so it learns to write text the teacher reads.
    fractions = [s["aligned_fraction"] for s in trained]
    assert fractions[0] < 0.95 and trained[0]["unaligned_tokens"] > 0, fractions
    assert sum(fractions[-4:]) / 4 > sum(fractions[:4]) / 4, fractions
    assert all(0 < s["alignment"]["align/aligned_token_fraction"] <= 1 for s in trained)
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.TRAIN_STEP) == 24 and kinds.count(EventKind.TRAIN_EVAL) == 4
    assert kinds[-1] == EventKind.JOB_COMPLETED
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"adapter/config.json", "adapter/model.safetensors", "adapter/README.md", "metrics.jsonl",
                "metrics.png"} <= names, names
        card = tar.extractfile("adapter/README.md").read().decode()
    assert SMOLLM2_135M_INSTRUCT in card and "teacher_kl" in card
    metadata = json.loads(archive.with_name(f"{job_id}.metadata.json").read_text())
    assert metadata["steps"] == 24 and metadata["eval_teacher_kl"]["last"] == pytest.approx(curve[-1])


def test_a_same_tokenizer_student_learns_with_lora_and_the_teacher_on_rollout_workers(stack, smollm2, tmp_path,
                                                                                      model_dirs):
    """The first 2 of SmolLM2's 30 layers as the student (its tokenizer: the identity path), LoRA, and
    the teacher scoring as tasks on the rollout queue."""
    from spider.testing import build_truncated_model

    student = build_truncated_model(smollm2, model_dirs / "smollm2-2-layers", layers=2)
    config = on_policy_config(stack, student, {"provider": "hf", "name": SMOLLM2_135M_INSTRUCT},
                              lora_rank=16, learning_rate=3e-3, max_steps=10, teacher_in_process=False,
                              **{**LEARNING, "eval_every": 5, "max_tokens": 16})
    job_id, status, events, archive, steps = run(config, tmp_path)
    assert status["status"] == "completed", status
    curve = evals(steps)
    assert len(curve) == 3 and curve[-1] < 0.75 * curve[0], curve
    trained = [s for s in steps if s["step"] > 0]
    assert all(s["aligned_fraction"] == 1.0 and s["unaligned_tokens"] == 0 for s in trained)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"} <= names


def test_a_killed_train_worker_resumes_from_its_checkpoint_and_stops_at_max_steps(stack, tiny_model, tmp_path):
    config = on_policy_config(stack, tiny_model, {"provider": "hf", "name": str(tiny_model)}, lora_rank=8,
                              learning_rate=1e-3, max_steps=10, groups_per_batch=2, group_size=2, max_tokens=16,
                              steps_per_task=4, save_every=0)
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        files = JobFiles(stack.data_dir, job_id)
        for event in client.stream_events(job_id):
            if event.kind == EventKind.TRAIN_STEP and event.data["step"] == 5:
                stack.kill("worker-train")  # in the segment of steps 5-8, after the checkpoint of step 4
                break
        killed_after = json.loads(files.latest_checkpoint.read_text())["step"]
        started = time.monotonic()
        stack.restart("worker-train")
        status = client.poll_job(job_id, interval=0.5, on_event=lambda e: None)
        recovered_s = time.monotonic() - started
        steps = client.training_metrics(job_id)
        history = list(client.stream_events(job_id))
    assert status["status"] == "completed", status
    assert killed_after in (4, 8), killed_after
    assert [s["step"] for s in steps] == list(range(1, 11))  # each step once in the metrics, lost ones redone
    resumed = [e for e in history if e.kind == EventKind.JOB_RESUMED]
    assert [e.data["step"] for e in resumed] == [killed_after]
    done = [e.data["step"] for e in history if e.kind == EventKind.TRAIN_STEP]
    assert max(done) == 10 and done.count(10) == 1  # never past max_steps
    assert all(done.count(k) == 1 for k in range(1, killed_after + 1))  # checkpointed steps never train again
    assert 5 in done[done.index(killed_after + 1) + 1 :] or killed_after == 8  # the lost step ran again
    assert json.loads(files.latest_checkpoint.read_text())["step"] == 10
    print(f"recovered and finished {recovered_s:.0f}s after the kill")
    from spider.cli import main

    png = tmp_path / "curves.png"
    assert main(["plot", job_id, "-o", str(png), "--url", stack.url, "--api-key", ALICE]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_briefs_on_policy_config_runs_on_tinker(stack, fake_tinker, tmp_path):
    """The product brief's on-policy YAML, with model names swapped for small ones the fake Tinker
    service serves (a mock: the hosted service cannot be reached from here) and the key in
    `on_policy_options.api_key`, as users type it."""
    text = (Path(__file__).parent / "data" / "brief_on_policy.yaml").read_text()
    text = text.replace("Qwen/Qwen3-8B", fake_tinker.student).replace("Qwen/Qwen3-30B-A3B", fake_tinker.teacher)
    text = text.replace("api_key: \n", f"api_key: {fake_tinker.key}\n", 1)
    data = __import__("yaml").safe_load(io.StringIO(text))
    data["server"] = {"base_url": stack.url, "api_key": ALICE, "request_timeout": 180}
    data["job"]["source"] = {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:8]", "field": "question"}
    data["job"]["output"] = {"mode": "return"}  # the Hub upload is tested against the stand-in Hub
    options = data["job"]["generation"]["on_policy_options"]
    options["max_tokens"] = 16  # the tiny models' context; every other value is the brief's
    config = AppConfig.parse(data)
    job_id, status, events, archive, steps = run(config, tmp_path)
    assert status["status"] == "completed", status
    assert "TINKER_API_KEY" in status["secret_names"] and fake_tinker.key not in json.dumps(status)
    trained = [s for s in steps if s["step"] > 0]
    assert len(trained) == 1  # 8 rows, 4 held out for eval_every: 5, 4 per step: one pass is one step
    assert all(s.get("post_kl") is not None for s in trained)  # compute_post_kl: true
    routes = {route.rsplit("/", 1)[-1] for route, _key in fake_tinker.server.requests}
    assert {"forward_backward", "optim_step", "asample"} <= routes, routes
    assert all(key == fake_tinker.key for _route, key in fake_tinker.server.requests if key)
    with tarfile.open(archive) as tar:
        assert "adapter/adapter_model.safetensors" in tar.getnames()


def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
    """Current weather of a city.

    Args:
        city: The city's name.
    """
    import os

    return json.dumps({"city": city, "temperature_c": 21, "uid": os.getuid()})


def test_the_student_calls_a_tool_in_the_jail_and_trains_on_its_own_turns_only(stack, tiny_model, firejail, tmp_path):
    """Multi-turn tool on-policy: the student samples on the worker's vLLM engine with a new LoRA
    adapter each step, its first turn is constrained to a call of the job's tool, the call runs in
    the sandbox, and the tool's answer is context: both student turns train, nothing else."""
    config = on_policy_config(stack, tiny_model, {"provider": "hf", "name": str(tiny_model)}, provider="vllm",
                              split="train[0:4]", lora_rank=4, learning_rate=1e-3, max_steps=2, groups_per_batch=2,
                              group_size=2, max_tokens=32, steps_per_task=2, save_every=0)
    data = config.model_dump(mode="json")
    data["job"]["model"]["parameters"] = {"max_model_len": 1024, "dtype": "float32"}
    data["job"]["generation"].update(tool_choice="get_weather", max_tool_turns=1)
    config = AppConfig.parse(data)
    with SpiderClient(config=config) as client:
        client.add_tool(get_weather)
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=0.5, on_event=lambda e: None)
        steps = client.training_metrics(job_id)
    assert status["status"] == "completed", status.get("error")
    for step in steps:
        # The first turn is constrained to a call (its argument an enum: a random student finishes it).
        assert step["tool_calls"] == 4 and step["tool_errors"] == 0
        assert step["tokens_trained"] == step["tokens_sampled"]  # the student's turns: call and answer
        assert step["sequences"] == 4 + step["separate_turns"] and step["score_errors"] == 0
