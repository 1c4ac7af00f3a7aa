"""What the distributed path costs: a dataset job through the local stack (client -> API -> Celery
-> rollout worker -> shards -> merge) against calling the same engine in-process on the same rows.

Both sides use the same engine kind, model, rows, batch size and sampling; both are warmed first
(the engine is loaded before timing). Only one engine is alive at a time: the in-process side runs
in a child process that exits when it has timed its pass, and the rollout worker (which keeps its
engine) is stopped after each stack pass and started again before the next. The repeats of the two
sides are interleaved (the order alternating); prints the medians, their spread and the ratio
stack / in-process.

    python bench/pipeline.py [--provider vllm|hf] [--rows 128] [--batch 16] [--max-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arithmetic, make_config, run_job, workspace, write_prompts  # noqa: E402

from spider.config import AppConfig  # noqa: E402

ROLLOUT_WORKER = "worker-rollout"




def in_process(config: AppConfig, questions: list[str]) -> tuple[float, int]:
    """Batch after batch on an engine loaded in this process (run in the child)."""
    from spider.engines import load_engine, sampling_params
    from spider.rollouts.single_turn import build_requests
    from spider.types import BatchRow

    job = config.job
    engine = load_engine(job.model)
    try:
        rows = [BatchRow(index=i, prompt=q, data={}) for i, q in enumerate(questions)]
        params = sampling_params(job.generation.parameters)
        engine.generate(build_requests(job, rows[:2]), params)  # warm
        started = time.perf_counter()
        tokens = 0
        size = job.generation.max_batch_size
        for first in range(0, len(rows), size):
            for result in engine.generate(build_requests(job, rows[first : first + size]), params):
                tokens += sum(c.usage.completion_tokens for c in result.completions)
        return time.perf_counter() - started, tokens
    finally:
        engine.close()


def in_child(args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """One in-process pass in a fresh interpreter, so its engine is gone when it returns."""
    argv = [sys.executable, __file__, "--child", str(work), "--provider", args.provider, "--rows", str(args.rows),
            "--batch", str(args.batch), "--max-tokens", str(args.max_tokens)]
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], result["tokens"]


def through_stack(config: AppConfig) -> tuple[float, int]:
    elapsed, status = run_job(config)
    return elapsed, int(status["progress"]["completion_tokens"])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one in-process pass
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    if args.child is not None:
        config = make_config("http://unused", args.child / "tiny", args.provider, args.child / "prompts.jsonl",
                             args.rows, args.batch, args.max_tokens)
        questions = [json.loads(line)["question"] for line in (args.child / "prompts.jsonl").read_text().split("\n") if line.strip()]
        seconds, tokens = in_process(config, questions)
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
        return

    from spider.local import LocalStack

    work, model = workspace()  # jobs (and the child) may load the model folder from there
    questions = arithmetic(args.rows)
    prompts = write_prompts(work / "prompts.jsonl", questions)

    local_runs: list[tuple[float, int]] = []
    stack_runs: list[tuple[float, int]] = []
    with LocalStack(env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}) as stack:
        config = make_config(stack.url, model, args.provider, prompts, args.rows, args.batch, args.max_tokens)
        warm = make_config(stack.url, model, args.provider, prompts, 2, args.batch, 4)
        stack.kill(ROLLOUT_WORKER, signal.SIGTERM)  # no engine in the stack while the child runs
        for repeat in range(args.repeats):
            for side in (("local", "stack") if repeat % 2 == 0 else ("stack", "local")):
                if side == "local":
                    local_runs.append(in_child(args, work))
                else:
                    stack.restart(ROLLOUT_WORKER)
                    through_stack(warm)  # load the engine in the rollout worker
                    stack_runs.append(through_stack(config))
                    stack.kill(ROLLOUT_WORKER, signal.SIGTERM)
                seconds, tokens = (local_runs if side == "local" else stack_runs)[-1]
                print(f"  repeat {repeat} {side:5s}: {seconds:6.2f} s  {tokens} tokens", flush=True)

    local_s = [s for s, _ in local_runs]
    stack_s = [s for s, _ in stack_runs]
    ratios = [s / l for s, l in zip(stack_s, local_s)]
    batches = args.rows / args.batch
    print(f"provider={args.provider} rows={args.rows} batch={args.batch} max_tokens={args.max_tokens} repeats={args.repeats}")
    print(f"in-process engine : {spread(local_s)} s  tokens {[t for _, t in local_runs]}  "
          f"{statistics.median(t / s for s, t in local_runs):.0f} tok/s")
    print(f"through the stack : {spread(stack_s)} s  tokens {[t for _, t in stack_runs]}  "
          f"{statistics.median(t / s for s, t in stack_runs):.0f} tok/s")
    print(f"stack / in-process wall time: {spread(ratios)}x (per repeat {[round(r, 3) for r in ratios]}); "
          f"ratio of medians {statistics.median(stack_s) / statistics.median(local_s):.3f}x; overhead "
          f"{1000 * (statistics.median(stack_s) - statistics.median(local_s)) / batches:.0f} ms per batch")


if __name__ == "__main__":
    main()
