"""Throughput of the generation engines, each against a baseline measured in the same run.

* hf:     transformers, `batch_size` 16 vs 1 (one request per forward pass).
* vllm:   one `generate` call for the whole batch vs one call per request; and the same requests
          sent one at a time, concurrently, through `Engine.sample` on the engine loop (the async
          interface conversation loops use) vs the batch call (median of `--repeats`, interleaved).
* openai: `max_concurrency` 16 vs 1 against a local endpoint that takes 50 ms per request.

The tiny random model (spider.testing) is used unless `--model` names another (e.g.
HuggingFaceTB/SmolLM2-135M-Instruct). Run: `python bench/engines.py [--requests 32] [--max-tokens 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("OMP_NUM_THREADS", "2")


def requests_for(count: int, n: int = 1):
    from spider.engines import GenerationRequest
    from spider.types import Message

    topics = ["the river", "a spider", "the old library", "Paris", "a quiet song", "the last batch"]
    return [
        GenerationRequest(f"r{i}", [Message("user", f"Tell me about {topics[i % len(topics)]} ({i}).")], n=n, seed=i)
        for i in range(count)
    ]


def timed(engine, batches, params) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = 0
    for batch in batches:
        for result in engine.generate(batch, params):
            assert result.error is None, result.error
            tokens += sum(c.usage.completion_tokens for c in result.completions)
    return time.perf_counter() - started, tokens


def report(name: str, baseline: tuple[float, int], candidate: tuple[float, int], labels: tuple[str, str]) -> None:
    base_rate, rate = baseline[1] / baseline[0], candidate[1] / candidate[0]
    print(
        f"{name:7s} {labels[0]:>24s}: {base_rate:8.1f} tok/s ({baseline[0]:6.2f} s)   "
        f"{labels[1]:>24s}: {rate:8.1f} tok/s ({candidate[0]:6.2f} s)   ratio {rate / base_rate:5.2f}x"
    )


def bench_hf(model: str, dtype: str, threads: int, requests, params) -> None:
    import torch

    from spider.engines.hf_engine import HFEngine

    torch.set_num_threads(threads)
    results = {}
    for batch_size in (1, 16):
        engine = HFEngine(model, {"dtype": dtype, "batch_size": batch_size})
        timed(engine, [requests[:2]], params)  # warm-up
        results[batch_size] = timed(engine, [requests], params)
        engine.close()
    report("hf", results[1], results[16], ("batch_size=1", "batch_size=16"))


def timed_async(engine, requests, params) -> tuple[float, int]:
    """Every request sent on its own through `engine.sample`, all at once, on the engine loop."""
    import asyncio

    async def together():
        return await asyncio.gather(*(engine.sample(r, params) for r in requests))

    started = time.perf_counter()
    results = engine.loop.run(together())
    elapsed = time.perf_counter() - started
    assert all(r.error is None for r in results)
    return elapsed, sum(c.usage.completion_tokens for r in results for c in r.completions)


def median_run(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return sorted(runs, key=lambda run: run[1] / run[0])[len(runs) // 2]


def bench_vllm(model: str, dtype: str, requests, params, repeats: int) -> None:
    from spider.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, {"dtype": dtype, "max_model_len": 1024})
    try:
        timed(engine, [requests[:2]], params)  # warm-up
        one_by_one = timed(engine, [[r] for r in requests], params)
        batch_runs, async_runs = [], []
        for _ in range(repeats):
            batch_runs.append(timed(engine, [requests], params))
            async_runs.append(timed_async(engine, requests, params))
    finally:
        engine.close()
    together = median_run(batch_runs)
    report("vllm", one_by_one, together, ("one call per request", "one call per batch"))
    report("vllm", together, median_run(async_runs), ("one call per batch", "concurrent sample() calls"))
    spread = [round(t[1] / t[0]) for t in async_runs]
    print(f"        concurrent sample() tok/s over {repeats} repeats: {spread}")


class SlowEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every request after `latency_s`."""

    def __init__(self, latency_s: float, completion_tokens: int):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(latency_s)
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
                    for i in range(body.get("n", 1))
                ]
                usage = {"prompt_tokens": 10, "completion_tokens": completion_tokens * len(choices)}
                data = json.dumps({"choices": choices, "usage": usage}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def bench_openai(requests, params) -> None:
    from spider.engines.openai_engine import OpenAIEngine

    endpoint = SlowEndpoint(latency_s=0.05, completion_tokens=params.max_tokens)
    try:
        results = {}
        for concurrency in (1, 16):
            engine = OpenAIEngine("bench", {"base_url": endpoint.url, "max_concurrency": concurrency})
            results[concurrency] = timed(engine, [requests], params)
            engine.close()
    finally:
        endpoint.close()
    report("openai", results[1], results[16], ("max_concurrency=1", "max_concurrency=16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model name or folder (default: a freshly built tiny model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for hf (small models: 1 is fastest)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "vllm", "openai"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the vllm batch/async pair")
    args = parser.parse_args()

    from spider.engines import SamplingParams
    from spider.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(build_tiny_model(os.path.join(scratch, "tiny")))
        requests = requests_for(args.requests)
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
        print(f"model={args.model or 'tiny'} requests={args.requests} max_tokens={args.max_tokens}")
        if "hf" not in args.skip:
            bench_hf(model, args.dtype, args.threads, requests, params)
        if "vllm" not in args.skip:
            bench_vllm(model, args.dtype, requests, params, args.repeats)
        if "openai" not in args.skip:
            bench_openai(requests, params)


if __name__ == "__main__":
    main()
