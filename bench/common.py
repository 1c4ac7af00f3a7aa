"""What the stack benchmarks share: a scratch folder with the tiny model and a prompts file, and one
job run through the client from submit to its end."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable


def workspace(prefix: str = "spider-bench-") -> tuple[Path, Path]:
    """A scratch folder that jobs may load model folders from (SPIDER_MODEL_DIRS, for this process
    and the stacks it starts), with the tiny random model from spider.testing in it."""
    from spider.testing import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["SPIDER_MODEL_DIRS"] = str(work)
    return work, build_tiny_model(work / "tiny")


def write_prompts(path: Path, questions: Iterable[str]) -> Path:
    """A JSONL source of `{"question": ...}` rows."""
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    return path


def arithmetic(rows: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i}?" for i in range(rows)]


def make_config(url: str, model: Path, provider: str, prompts: Path, rows: int, batch: int, max_tokens: int,
                request_timeout: float | None = None) -> Any:
    """A sampling job on the first `rows` prompts, `batch` rows per task, seeded."""
    from spider.config import AppConfig

    server: dict[str, Any] = {"base_url": url}
    if request_timeout is not None:
        server["request_timeout"] = request_timeout
    return AppConfig.parse({
        "server": server,
        "job": {
            "model": {"provider": provider, "name": str(model), "parameters": {"dtype": "float32"}},
            "source": {"dataset": str(prompts), "split": f"train[0:{rows}]", "field": "question"},
            "generation": {"parameters": {"temperature": 1.0, "max_tokens": max_tokens, "seed": 3},
                           "max_batch_size": batch},
        },
    })


def run_job(config: Any) -> tuple[float, dict]:
    """Submit, wait for the end; the wall time from submit to completed, and the final status."""
    from spider.client import SpiderClient

    with SpiderClient(config=config) as client:
        started = time.perf_counter()
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        elapsed = time.perf_counter() - started
        status["engines_loaded"] = sum(1 for e in client.stream_events(job_id) if e.kind == "model.loaded")
    assert status["status"] == "completed", status
    return elapsed, status
