"""How a dataset job's throughput grows with rollout worker processes: the same job on the local
stack with 1, 2 and 4 rollout workers (one batch at a time each, every one with its own engine on
the tiny model from spider.testing.build_tiny_model).

Each pass starts a stack of its own (Redis, API, a control worker, N rollout workers), so no
engine of another pass is alive. Every rollout worker is warm before the pass is timed: its
engine is loaded by a warm-up job, whose `model.loaded` events count the engines that were
loaded. The passes of one repeat run in a rotating order; prints, per
worker count, the median rows/s and tokens/s over the repeats, and the median of the per-repeat
ratios against 1 worker (measured in the same repeat).

    python bench/scale.py [--provider hf|vllm] [--workers 1,2,4] [--rows 256] [--batch 8] [--max-tokens 32]
                          [--repeats 3] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arithmetic, make_config, run_job, workspace, write_prompts  # noqa: E402

from spider.config import AppConfig  # noqa: E402
from spider.local import LocalStack, WorkerSpec  # noqa: E402

CONTROL = WorkerSpec("control", "threads", 4)




def warm_up(config: AppConfig, workers: int) -> None:
    """Load the engine of every rollout worker: an idle worker takes the next batch, so a job of
    as many one-row batches as workers reaches each (repeated until the events count them all)."""
    cold = workers
    for _ in range(5):
        _, status = run_job(config)
        cold -= status["engines_loaded"]
        if cold <= 0:
            return
    raise RuntimeError(f"{cold} of {workers} rollout workers did not load their engine in 5 warm-up jobs")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated numbers of rollout workers (1 first)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads per rollout worker (OMP_NUM_THREADS; 0: torch's default, one per core)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    if counts[0] != 1 or min(counts) < 1:
        parser.error("--workers must start with 1 (the baseline) and name positive counts")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    work, model = workspace("spider-bench-scale-")
    prompts = write_prompts(work / "prompts.jsonl", arithmetic(max(args.rows, 4 * max(counts))))

    runs: dict[int, list[tuple[float, int]]] = {n: [] for n in counts}
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.torch_threads:
        # One worker on its own would otherwise take every core for its matrix products, and N
        # workers would fight over them: with one thread each, N workers may use N cores.
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    for repeat in range(args.repeats):
        for count in counts[repeat % len(counts):] + counts[: repeat % len(counts)]:
            rollout = tuple(WorkerSpec("rollout", "threads", 1) for _ in range(count))
            with LocalStack(workers=(CONTROL, *rollout), env=env) as stack:
                warm_up(make_config(stack.url, model, args.provider, prompts, count, 1, 2), count)
                config = make_config(stack.url, model, args.provider, prompts, args.rows, args.batch, args.max_tokens)
                seconds, status = run_job(config)
            tokens = int(status["progress"]["completion_tokens"])
            runs[count].append((seconds, tokens))
            print(f"  repeat {repeat} workers {count}: {seconds:6.2f} s  {args.rows / seconds:6.1f} rows/s  "
                  f"{tokens / seconds:7.0f} tok/s", flush=True)

    print(f"provider={args.provider} rows={args.rows} batch={args.batch} max_tokens={args.max_tokens} "
          f"repeats={args.repeats} torch_threads={args.torch_threads or 'default'} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f}")
    base = [args.rows / s for s, _ in runs[1]]
    for count in counts:
        rates = [args.rows / s for s, _ in runs[count]]
        tokens = [t / s for s, t in runs[count]]
        ratios = [rate / one for rate, one in zip(rates, base)]
        print(f"{count} rollout worker{'s' if count > 1 else ' '}: {spread(rates, '{:.1f}')} rows/s  "
              f"{spread(tokens, '{:.0f}')} tok/s  vs 1 worker {spread(ratios)}x "
              f"(per repeat {[round(r, 2) for r in ratios]})")


if __name__ == "__main__":
    main()
