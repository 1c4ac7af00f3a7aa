"""Sandbox latency and throughput, against baselines measured in the same run.

* per-call latency of a trivial tool: in-process call vs warm jailed interpreter vs a fresh jail
  (firejail + interpreter + bundle load) per call; median and p99;
* tool calls per second with the interpreter pool saturated;
* post-processing 10k records: jailed vs running the same function in-process.

Run: `.venv/bin/python bench/sandbox.py` (as root, with firejail installed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig
from spider.sandbox import Sandbox
from spider.sandbox.interpreter import Interpreter, encode_request


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


BANNED = re.compile(r"\b(as an ai|i cannot|lorem)\b", re.IGNORECASE)
SPACES = re.compile(r"\s+")


def clean_record(record, min_words=5):
    """A typical post-processor: normalise the completion, drop refusals and short answers,
    reshape the record and add a few statistics."""
    text = SPACES.sub(" ", record["completion"]).strip()
    if BANNED.search(text):
        return None
    words = text.split()
    if len(words) < min_words:
        return None
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    return {
        "id": record["id"],
        "messages": record["messages"][:-1] + [{"role": "assistant", "content": text}],
        "stats": {
            "words": len(words),
            "sentences": len(sentences),
            "mean_word_length": round(sum(map(len, words)) / len(words), 3),
            "unique_ratio": round(len(set(w.lower() for w in words)) / len(words), 3),
        },
    }


def keep_non_empty(record):
    """A trivial post-processor: the IPC cost of the sandbox is all there is to measure."""
    return record if record["completion"] else None


def make_records(n: int) -> list[dict]:
    body = (
        "The jailed interpreter  serves calls over a pipe. Each call is checked against its limits, "
        "and nothing of it survives the call. Distillation datasets are filtered this way!  "
    )
    records = []
    for i in range(n):
        completion = body * (1 + i % 3) + ("As an AI I cannot" if i % 17 == 0 else "") + ("" if i % 13 else " short")
        records.append(
            {
                "id": f"job:{i}:0",
                "row_index": i,
                "prompt": f"Question number {i}: explain the sandbox.",
                "messages": [
                    {"role": "user", "content": f"Question number {i}: explain the sandbox."},
                    {"role": "assistant", "content": completion},
                ],
                "completion": completion,
                "usage": {"prompt_tokens": 12, "completion_tokens": 60},
            }
        )
    return records


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def bench_latency(sandbox: Sandbox, calls: int, fresh_calls: int) -> dict[str, tuple[float, float]]:
    job = sandbox.open_job("bench-latency", build_bundle(tools=[(add, tool_spec(add))]), RuntimeConfig(), {})
    results = {}
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        add(**{"a": i, "b": 1})
        samples.append(time.perf_counter() - started)
    results["in-process call"] = percentiles(samples)

    for i in range(50):
        job.call_tool("add", {"a": i, "b": 1})
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        outcome = job.call_tool("add", {"a": i, "b": 1})
        samples.append(time.perf_counter() - started)
        assert outcome.content == str(i + 1)
    results["warm jailed interpreter"] = percentiles(samples)

    # A fresh jail per call: firejail, interpreter start, bundle load, the call, exit.
    request = encode_request({"op": "tool", "name": "add", "arguments": {"a": 1, "b": 2}})
    samples = []
    for _ in range(fresh_calls):
        started = time.perf_counter()
        interpreter = Interpreter(job._launch, start_timeout_s=30)
        answer = list(interpreter.request_stream(request, 30))[-1]
        interpreter.close()
        samples.append(time.perf_counter() - started)
        assert answer["content"] == "3"
    results["fresh jail per call (start, load, call, exit)"] = percentiles(samples)

    # For reference: the floor of any jail start, firejail running `true` with no policy.
    samples = []
    for _ in range(fresh_calls):
        started = time.perf_counter()
        subprocess.run([sandbox.firejail, "--noprofile", "--quiet", "--net=none", "/usr/bin/true"], check=True)
        samples.append(time.perf_counter() - started)
    results["bare `firejail --net=none true`"] = percentiles(samples)
    sandbox.close_job(job.job_id)
    return results


def bench_throughput(sandbox_root: Path, pool_size: int, threads: int, seconds: float) -> float:
    box = Sandbox(sandbox_root, pool_size=pool_size)
    job = box.open_job(f"bench-throughput-{pool_size}", build_bundle(tools=[(add, tool_spec(add))]), RuntimeConfig(), {})
    for _ in range(pool_size):  # start the whole pool first
        workers = [threading.Thread(target=job.call_tool, args=("add", {"a": 1, "b": 1})) for _ in range(pool_size)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def hammer(slot: int) -> None:
        while time.perf_counter() < deadline:
            job.call_tool("add", {"a": slot, "b": 1})
            counts[slot] += 1

    started = time.perf_counter()
    runners = [threading.Thread(target=hammer, args=(slot,)) for slot in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    rate = sum(counts) / (time.perf_counter() - started)
    box.close()
    return rate


def bench_postprocess(sandbox: Sandbox, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    records = make_records(n)
    results = {}
    for name, func in (("clean_record", clean_record), ("keep_non_empty", keep_non_empty)):
        job = sandbox.open_job(f"bench-post-{name.replace('_', '-')}", build_bundle(post_processor=func), RuntimeConfig(), {})
        job.post_process(records)  # warm the pool
        local, jailed = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            expected = [func(r) for r in records]
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            outcomes = job.post_process(records)
            jailed.append(time.perf_counter() - started)
        assert [o.value for o in outcomes] == expected
        results[name] = (statistics.median(local), statistics.median(jailed))
        sandbox.close_job(job.job_id)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--fresh-calls", type=int, default=40)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="spider-bench-sandbox-", dir="/tmp"))
    base.chmod(0o755)
    try:
        sandbox = Sandbox(base / "root", pool_size=2)
        print("## Per-call latency of a trivial tool (ms)")
        latency = bench_latency(sandbox, args.calls, args.fresh_calls)
        baseline = latency["warm jailed interpreter"][0]
        print("| path | median | p99 | median vs warm jail |")
        print("|---|---|---|---|")
        for name, (median, p99) in latency.items():
            print(f"| {name} | {median * 1e3:.4f} | {p99 * 1e3:.4f} | {median / baseline:.3g}x |")

        print(f"\n## Tool calls per second, pool saturated ({args.seconds:g} s, 4 caller threads)")
        print("| pool size | calls/s | vs pool of 1 |")
        print("|---|---|---|")
        rates = {size: bench_throughput(base / "root", size, threads=4, seconds=args.seconds) for size in (1, 2)}
        for size, rate in rates.items():
            print(f"| {size} | {rate:.0f} | {rate / rates[1]:.2f}x |")

        print(f"\n## Post-processing {args.records} records (median of {args.repeats}, s)")
        print("| post-processor | in-process | jailed (pool of 2) | jailed / in-process |")
        print("|---|---|---|---|")
        for name, (local, jailed) in bench_postprocess(sandbox, args.records, args.repeats).items():
            print(f"| {name} | {local:.3f} | {jailed:.3f} | {jailed / local:.2f}x |")
        sandbox.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
