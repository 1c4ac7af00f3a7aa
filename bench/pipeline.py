"""What the distributed path costs: a dataset job through the local stack (client -> API -> Celery
-> rollout worker -> shards -> merge) against calling the same engine in-process on the same rows.

Both sides use the same engine kind, model, rows, batch size and sampling; both are warmed first
(the engine is loaded before timing). Prints the ratio stack / in-process.

    python bench/pipeline.py [--provider vllm|hf] [--rows 128] [--batch 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spider.client import SpiderClient  # noqa: E402
from spider.config import AppConfig  # noqa: E402
from spider.engines import load_engine, sampling_params  # noqa: E402
from spider.jobs.dataset import BatchRow, build_requests  # noqa: E402
from spider.local import LocalStack  # noqa: E402
from spider.testing import build_tiny_model  # noqa: E402


def make_config(url: str, model: Path, provider: str, prompts: Path, rows: int, batch: int, max_tokens: int) -> AppConfig:
    return AppConfig.parse({
        "server": {"base_url": url},
        "job": {
            "model": {"provider": provider, "name": str(model), "parameters": {"dtype": "float32"}},
            "source": {"dataset": str(prompts), "split": f"train[0:{rows}]", "field": "question"},
            "generation": {"parameters": {"temperature": 1.0, "max_tokens": max_tokens, "seed": 3},
                           "max_batch_size": batch},
        },
    })


def in_process(config: AppConfig, questions: list[str]) -> tuple[float, int]:
    job = config.job
    engine = load_engine(job.model)
    rows = [BatchRow(index=i, prompt=q, data={}) for i, q in enumerate(questions)]
    engine.generate(build_requests(job, rows[:2]), sampling_params(job.generation.parameters))  # warm
    started = time.perf_counter()
    tokens = 0
    size = job.generation.max_batch_size
    for first in range(0, len(rows), size):
        for result in engine.generate(build_requests(job, rows[first : first + size]), sampling_params(job.generation.parameters)):
            tokens += sum(c.usage.completion_tokens for c in result.completions)
    return time.perf_counter() - started, tokens


def through_stack(config: AppConfig) -> tuple[float, int]:
    with SpiderClient(config=config) as client:
        started = time.perf_counter()
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        elapsed = time.perf_counter() - started
    assert status["status"] == "completed", status
    return elapsed, int(status["progress"]["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    work = Path(tempfile.mkdtemp(prefix="spider-bench-"))
    model = build_tiny_model(work / "tiny")
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(args.rows)]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))

    with LocalStack(env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}) as stack:
        config = make_config(stack.url, model, args.provider, prompts, args.rows, args.batch, args.max_tokens)
        warm = make_config(stack.url, model, args.provider, prompts, 2, args.batch, 4)
        through_stack(warm)  # load the engine in the rollout worker
        stack_s, stack_tokens = through_stack(config)
    local_s, local_tokens = in_process(config, questions)

    print(f"provider={args.provider} rows={args.rows} batch={args.batch} max_tokens={args.max_tokens}")
    print(f"in-process engine : {local_s:7.2f} s  {local_tokens} tokens  {local_tokens / local_s:8.0f} tok/s")
    print(f"through the stack : {stack_s:7.2f} s  {stack_tokens} tokens  {stack_tokens / stack_s:8.0f} tok/s")
    print(f"stack / in-process wall time: {stack_s / local_s:.2f}x "
          f"(overhead {1000 * (stack_s - local_s) / (args.rows / args.batch):.0f} ms per batch)")


if __name__ == "__main__":
    main()
