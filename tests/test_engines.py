"""Generation engines against real backends: transformers, vLLM (CPU) in-process, a vLLM OpenAI server
started here, and a small HTTP server on 127.0.0.1 that scripts 429/5xx answers for the retry logic.

Every engine runs the same tiny random model (built by `spider.testing.build_tiny_model`), in float32
so greedy outputs can be compared token for token across backends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from spider.config import GenerationParameters, ModelConfig
from spider.engines import (
    GenerationRequest,
    SamplingParams,
    close_engine,
    create_engine,
    load_engine,
    sampling_params,
)
from spider.engines.hf_engine import HFEngine
from spider.engines.openai_engine import OpenAIEngine, backoff_delay
from spider.errors import EngineError
from spider.testing import build_tiny_model
from spider.types import Message, ToolCall

os.environ.setdefault("OMP_NUM_THREADS", "2")

PROMPTS = [
    "Hello there!",
    "What is the capital of France?",
    "Write a long letter about the river and the old library, please.",
    "2 + 2 = ?",
    "Café, naïve, 東京 😀",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=16)
VLLM_PARAMETERS = {"dtype": "float32", "max_model_len": 512}


def ask(text: str, key: str | None = None, **kwargs) -> GenerationRequest:
    return GenerationRequest(key=key or text, messages=[Message("user", text)], **kwargs)


def texts(results) -> list[list[str]]:
    return [[c.text for c in r.completions] for r in results]


@pytest.fixture(scope="session")
def tiny(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="session")
def hf(tiny) -> HFEngine:
    import torch

    torch.set_num_threads(2)
    engine = HFEngine(str(tiny), {"dtype": "float32", "batch_size": 3})
    yield engine
    engine.close()


def hf_reference(hf, requests, params):
    """Each request alone through transformers: the reference other engines are compared with."""
    return [hf.generate([r], params)[0] for r in requests]


# --------------------------------------------------------------------------------------- transformers


def test_hf_seeded_sampling_is_reproducible_and_independent_of_batching(hf):
    requests = [ask(p, seed=100 + i) for i, p in enumerate(PROMPTS)]
    together = hf.generate(requests, SAMPLED)
    alone = hf_reference(hf, requests, SAMPLED)
    reordered = hf.generate(list(reversed(requests)), SAMPLED)[::-1]
    assert texts(together) == texts(alone) == texts(reordered)
    assert len({t[0] for t in texts(together)}) == len(PROMPTS)

    reseeded = hf.generate([ask(PROMPTS[0], seed=999)], SAMPLED)
    assert texts(reseeded) != texts(together[:1])
    unseeded = [hf.generate([ask(PROMPTS[0])], SAMPLED)[0].completions[0].text for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_hf_n_samples_are_distinct_and_reproducible(hf):
    first = hf.generate([ask(PROMPTS[2], seed=5, n=3), ask(PROMPTS[0], seed=6)], SAMPLED)
    again = hf.generate([ask(PROMPTS[2], seed=5, n=3)], SAMPLED)
    assert len(first[0].completions) == 3 and len(first[1].completions) == 1
    assert len(set(texts(first)[0])) == 3
    assert texts(first)[0] == texts(again)[0]
    for c in first[0].completions:
        assert c.usage.prompt_tokens > 0 and 0 < c.usage.completion_tokens <= SAMPLED.max_tokens


def test_hf_stop_string_ends_and_is_cut(hf):
    full = hf.generate([ask(PROMPTS[2])], SamplingParams(temperature=0.0, max_tokens=40))[0].completions[0]
    stop = next(full.text[i : i + 2] for i in range(4, len(full.text)) if full.text[i : i + 2].isalnum())
    cut = hf.generate([ask(PROMPTS[2])], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))
    completion = cut[0].completions[0]
    assert completion.text == full.text[: full.text.find(stop)]
    assert completion.finish_reason == "stop"
    assert completion.usage.completion_tokens < full.usage.completion_tokens


def test_hf_penalties_change_greedy_output(hf):
    requests = [ask(p) for p in PROMPTS]
    plain = hf.generate(requests, GREEDY)
    penalized = hf.generate(requests, SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=3.0))
    presence = hf.generate(requests, SamplingParams(temperature=0.0, max_tokens=24, presence_penalty=2.0))
    assert texts(plain) != texts(penalized)
    assert texts(plain) != texts(presence)


def test_hf_too_long_prompt_is_an_error_of_that_request_only(hf):
    results = hf.generate([ask("river " * 1100, key="long"), ask(PROMPTS[0], key="short")], GREEDY)
    assert results[0].error and "context" in results[0].error and not results[0].completions
    assert results[1].error is None and results[1].completions


def test_hf_stops_at_the_model_context(hf):
    prompt = "river " * 1000
    result = hf.generate([ask(prompt, seed=3)], SamplingParams(temperature=1.0, max_tokens=200))[0]
    usage = result.completions[0].usage
    assert result.completions[0].finish_reason == "length"
    assert usage.prompt_tokens + usage.completion_tokens == 1024


def test_hf_refuses_what_it_cannot_honour(tiny, hf):
    with pytest.raises(EngineError, match="tensor_parallel_size"):
        HFEngine(str(tiny), {"tensor_parallel_size": 2})
    with pytest.raises(EngineError, match="dtype"):
        HFEngine(str(tiny), {"dtype": "int3"})
    with pytest.raises(EngineError, match="top_p"):
        hf.generate([ask("hi")], SamplingParams(top_p=0.0))


def test_load_engine_reuses_and_replaces(tiny, monkeypatch):
    monkeypatch.setenv("SPIDER_MAX_ENGINES", "1")
    config = ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32"})
    first = load_engine(config)
    assert load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32"})) is first
    second = load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32", "batch_size": 2}))
    assert second is not first and first.model is None and second.model is not None
    close_engine()
    assert second.model is None
    # A Tinker-hosted model (an on-policy teacher) needs the job's own Tinker key; no worker lends one.
    with pytest.raises(EngineError, match="TINKER_API_KEY"):
        create_engine(ModelConfig(provider="tinker", name="Qwen/Qwen3-8B"))


def test_load_engine_keeps_two_models_by_default(tiny):
    """A policy and a teacher (or simulated user) on one worker do not evict each other."""
    policy = load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32"}))
    teacher = load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32", "batch_size": 2}))
    for _ in range(3):
        assert load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32"})) is policy
        assert load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32", "batch_size": 2})) is teacher
    assert policy.model is not None and teacher.model is not None
    third = load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32", "batch_size": 3}))
    assert policy.model is None and teacher.model is not None  # the least recently used went
    close_engine()
    assert third.model is None and teacher.model is None


def assert_logprobs_match_scoring(engine, results, tolerance):
    """The log-probs that came with each sampled token equal a separate scoring pass over the same ids."""
    from spider.engines import ScoreRequest

    completions = [c for r in results for c in r.completions]
    assert completions and all(c.token_ids and c.logprobs and len(c.logprobs) == len(c.token_ids) for c in completions)
    scores = engine.score([ScoreRequest(str(i), c.prompt_ids + c.token_ids) for i, c in enumerate(completions)])
    for completion, score in zip(completions, scores):
        assert score.error is None and score.logprobs[0] is None
        scored = score.logprobs[len(completion.prompt_ids):]
        assert max(abs(a - b) for a, b in zip(scored, completion.logprobs)) < tolerance
        assert all(v <= 0 for v in scored)


def test_hf_token_ids_and_logprobs_equal_a_scoring_pass(hf):
    requests = [ask(p, seed=i, n=2) for i, p in enumerate(PROMPTS)]
    results = hf.generate(requests, SamplingParams(temperature=0.9, max_tokens=12, logprobs=True))
    for result in results:
        for completion in result.completions:
            assert hf.tokenizer.decode(completion.token_ids, skip_special_tokens=True).startswith(completion.text)
    assert_logprobs_match_scoring(hf, results, tolerance=1e-3)


def test_hf_prompt_ids_are_used_as_given(hf):
    rendered = hf.renderer.render([Message("user", PROMPTS[1])]).ids
    by_ids = hf.generate([GenerationRequest("x", [], prompt_ids=rendered)], GREEDY)[0]
    by_messages = hf.generate([ask(PROMPTS[1])], GREEDY)[0]
    assert by_ids.completions[0].token_ids == by_messages.completions[0].token_ids
    assert by_ids.completions[0].prompt_ids == rendered


def test_hf_micro_batcher_decodes_concurrent_requests_together(hf):
    import asyncio

    calls = []
    original = hf._generate

    def counting(requests, *rest):
        calls.append(len(requests))
        return original(requests, *rest)

    hf._generate = counting
    try:
        async def many():
            return await asyncio.gather(*(hf.sample(ask(p, seed=i), GREEDY) for i, p in enumerate(PROMPTS * 2)))

        results = asyncio.run(many())
    finally:
        del hf._generate
    assert [r.key for r in results] == [p for p in PROMPTS * 2]
    assert texts(results) == texts(hf.generate([ask(p) for p in PROMPTS * 2], GREEDY))
    assert sum(calls) == 10 and len(calls) < 10


def test_sampling_params_from_job_config():
    generation = GenerationParameters(temperature=0.3, top_k=20, stop="###", max_tokens=7, seed=4)
    params = sampling_params(generation)
    assert (params.temperature, params.top_k, params.stop, params.max_tokens) == (0.3, 20, ["###"], 7)


# ----------------------------------------------------------------------------------------- vLLM (CPU)


def engine_processes() -> set[int]:
    """The processes of the vLLM engines this test process started: its own `VLLM::` children (the
    engine cores) and theirs. The session's OpenAI server runs its own engine core under its server
    process: that one is not ours to close."""
    found = set()
    for child in psutil.Process().children():
        try:
            if child.name().startswith("VLLM::"):
                found |= {p.pid for p in [child, *child.children(recursive=True)] if is_live(p)}
        except psutil.NoSuchProcess:
            pass
    return found


def is_live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="class")
def vllm(tiny):
    """The in-process vLLM engine, for the tests of one class: closed before the OpenAI server starts."""
    engine = load_engine(ModelConfig(provider="vllm", name=str(tiny), parameters=VLLM_PARAMETERS))
    yield engine
    close_engine()


@pytest.mark.slow
class TestVLLM:

    def test_greedy_equals_transformers(self, vllm, hf):
        requests = [ask(p) for p in PROMPTS]
        results = vllm.generate(requests, GREEDY)
        reference = hf_reference(hf, requests, GREEDY)
        assert texts(results) == texts(reference)
        for got, want in zip(results, reference):
            assert got.completions[0].finish_reason == want.completions[0].finish_reason
            assert got.completions[0].usage == want.completions[0].usage

    def test_penalties_and_stop_map_like_transformers(self, vllm, hf):
        params = SamplingParams(
            temperature=0.0, max_tokens=24, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7
        )
        requests = [ask(p) for p in PROMPTS]
        assert texts(vllm.generate(requests, params)) == texts(hf_reference(hf, requests, params))

        full = hf.generate([ask(PROMPTS[2])], SamplingParams(temperature=0.0, max_tokens=40))[0].completions[0].text
        stop = next(full[i : i + 2] for i in range(4, len(full)) if full[i : i + 2].isalnum())
        stopped = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop])
        got = vllm.generate([ask(PROMPTS[2])], stopped)[0].completions[0]
        assert got.text == full[: full.find(stop)] and got.finish_reason == "stop"

    def test_seeded_sampling_is_reproducible_and_independent_of_batching(self, vllm):
        requests = [ask(p, seed=100 + i) for i, p in enumerate(PROMPTS)]
        together = vllm.generate(requests, SAMPLED)
        alone = [vllm.generate([r], SAMPLED)[0] for r in requests]
        mixed = vllm.generate([ask("padding " * 30, seed=1), *reversed(requests)], SAMPLED)[1:][::-1]
        assert texts(together) == texts(alone) == texts(mixed)
        assert len({t[0] for t in texts(together)}) == len(PROMPTS)
        assert texts(vllm.generate([ask(PROMPTS[0], seed=999)], SAMPLED)) != texts(together[:1])

    def test_n_samples(self, vllm):
        first = vllm.generate([ask(PROMPTS[2], seed=5, n=3), ask(PROMPTS[0], seed=6)], SAMPLED)
        again = vllm.generate([ask(PROMPTS[2], seed=5, n=3)], SAMPLED)
        assert [len(r.completions) for r in first] == [3, 1]
        assert len(set(texts(first)[0])) == 3
        assert texts(first)[0] == texts(again)[0]

    def test_too_long_prompt_is_an_error_of_that_request_only(self, vllm):
        results = vllm.generate([ask(PROMPTS[0], key="a"), ask("river " * 600, key="long"), ask(PROMPTS[1], key="b")], GREEDY)
        assert [r.key for r in results] == ["a", "long", "b"]
        assert results[1].error and "max_model_len" in results[1].error and not results[1].completions
        assert results[0].completions and results[2].completions and results[0].error is None

    def test_generation_stops_at_max_model_len(self, vllm):
        result = vllm.generate([ask("river " * 480, seed=3)], SamplingParams(temperature=1.0, max_tokens=100))[0]
        usage = result.completions[0].usage
        assert result.completions[0].finish_reason == "length"
        assert usage.prompt_tokens + usage.completion_tokens == VLLM_PARAMETERS["max_model_len"]

    def test_unknown_parameter_is_refused(self, tiny):
        from pydantic import ValidationError

        with pytest.raises(ValidationError, match="no_such_option"):
            create_engine(ModelConfig(provider="vllm", name=str(tiny), parameters={"no_such_option": 1}))

    def test_token_ids_and_logprobs_equal_a_scoring_pass(self, vllm):
        requests = [ask(p, seed=i, n=2) for i, p in enumerate(PROMPTS)]
        results = vllm.generate(requests, SamplingParams(temperature=0.9, max_tokens=12, logprobs=True))
        assert_logprobs_match_scoring(vllm, results, tolerance=1e-4)

    def test_greedy_with_several_samples_repeats_the_one_greedy_answer(self, vllm):
        result = vllm.generate([ask(PROMPTS[1], n=3)], GREEDY)[0]
        assert result.error is None and len(result.completions) == 3
        assert len({tuple(c.token_ids) for c in result.completions}) == 1
        assert result.completions[0].token_ids is not result.completions[1].token_ids

    def test_concurrent_requests_take_about_one_batch_call(self, vllm):
        """N requests sent one at a time on the engine loop are scheduled together by vLLM."""
        import asyncio

        params = SamplingParams(temperature=1.0, max_tokens=48)
        requests = [ask(p, seed=i) for i, p in enumerate(PROMPTS * 4)]
        vllm.generate(requests[:2], params)  # warm
        started = time.perf_counter()
        vllm.generate(requests, params)
        batch_s = time.perf_counter() - started

        async def one_at_a_time():
            return await asyncio.gather(*(vllm.sample(r, params) for r in requests))

        started = time.perf_counter()
        results = vllm.loop.run(one_at_a_time())
        async_s = time.perf_counter() - started
        sequential_started = time.perf_counter()
        for request in requests[:4]:
            vllm.generate([request], params)
        sequential_s = (time.perf_counter() - sequential_started) * len(requests) / 4
        assert all(r.completions for r in results)
        assert async_s < 2 * batch_s + 0.5, (async_s, batch_s)
        assert async_s < sequential_s / 2, (async_s, sequential_s)

    def test_load_engine_reuses_then_closes_for_another_model(self, vllm, tiny, monkeypatch):
        monkeypatch.setenv("SPIDER_MAX_ENGINES", "1")
        same = ModelConfig(provider="vllm", name=str(tiny), parameters=dict(VLLM_PARAMETERS))
        assert load_engine(same) is vllm
        children = engine_processes()
        assert children, "vLLM runs its engine core in child processes"
        load_engine(ModelConfig(provider="hf", name=str(tiny), parameters={"dtype": "float32"}))
        assert vllm.llm is None
        deadline = time.time() + 30  # engine cores exit after their shutdown; slower on a loaded machine
        while engine_processes() & children and time.time() < deadline:
            time.sleep(0.2)
        assert not engine_processes() & children


# ------------------------------------------------------------------ OpenAI engine on a real vLLM server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="class")
def server(vllm_server):
    """The session's vLLM OpenAI server on the tiny model (served as `spider-tiny`); its /v1 URL."""
    close_engine()  # one in-process vLLM engine on this machine at a time
    return vllm_server


@pytest.mark.slow
class TestOpenAIOnVLLMServer:

    def test_greedy_equals_transformers(self, server, hf):
        engine = OpenAIEngine("spider-tiny", {"base_url": server, "max_concurrency": 4})
        requests = [ask(p) for p in PROMPTS]
        results = engine.generate(requests, GREEDY)
        reference = hf_reference(hf, requests, GREEDY)
        assert texts(results) == texts(reference)
        for got, want in zip(results, reference):
            assert got.completions[0].usage == want.completions[0].usage
            assert got.completions[0].finish_reason == want.completions[0].finish_reason
        engine.close()

    def test_scoring_and_sampled_logprobs_through_the_server(self, server, hf):
        engine = OpenAIEngine("spider-tiny", {"base_url": server})
        results = engine.generate([ask(p, seed=i) for i, p in enumerate(PROMPTS[:3])],
                                  SamplingParams(temperature=1.0, max_tokens=10, logprobs=True))
        for result in results:
            completion = result.completions[0]
            prompt = hf.renderer.render([Message("user", result.key)]).ids
            completion.prompt_ids = prompt
            assert len(completion.token_ids) == completion.usage.completion_tokens
        assert_logprobs_match_scoring(engine, results, tolerance=1e-3)
        engine.close()

    def test_seed_and_n_pass_through(self, server):
        engine = OpenAIEngine("spider-tiny", {"base_url": server})
        requests = [ask(PROMPTS[2], seed=11, n=3), ask(PROMPTS[0], seed=12)]
        first, again = engine.generate(requests, SAMPLED), engine.generate(requests, SAMPLED)
        assert [len(r.completions) for r in first] == [3, 1]
        assert len(set(texts(first)[0])) == 3
        assert texts(first) == texts(again)
        assert texts(engine.generate([ask(PROMPTS[2], seed=13, n=3)], SAMPLED))[0] != texts(first)[0]
        engine.close()

    def test_request_errors_stay_on_their_result(self, server):
        engine = OpenAIEngine("spider-tiny", {"base_url": server, "max_retries": 0})
        results = engine.generate([ask("river " * 600, key="long"), ask(PROMPTS[0], key="ok")], GREEDY)
        assert results[0].error and results[0].error.startswith("HTTP 400") and not results[0].completions
        assert results[1].error is None and results[1].completions
        engine.close()

    def test_unknown_model_fails_the_engine(self, server):
        engine = OpenAIEngine("no-such-model", {"base_url": server})
        with pytest.raises(EngineError, match="HTTP 404"):
            engine.generate([ask("hi")], GREEDY)
        engine.close()


# ---------------------------------------------------------- retries against a scripted local HTTP server


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering /chat/completions from a per-prompt script of
    (status, headers) steps, then 200. It records every attempt, and how many ran at once."""

    def __init__(self, delay_s: float = 0.0):
        self.script: dict[str, list[tuple[int, dict[str, str]]]] = defaultdict(list)
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.attempts[prompt].append(time.monotonic())
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    step = server.script[prompt].pop(0) if server.script[prompt] else (200, {})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay_s)
                    status, headers = step
                    if status == 0:  # drop the connection without answering
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    payload = server.answer(body) if status == 200 else {"error": {"message": f"scripted {status}"}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f"echo {i}: {prompt}"}, "finish_reason": "stop"}
            for i in range(body.get("n", 1))
        ]
        if prompt == "call a tool":
            choices[0]["message"] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            }
            choices[0]["finish_reason"] = "tool_calls"
        return {"choices": choices, "usage": {"prompt_tokens": 9, "completion_tokens": 4 * len(choices) + 1}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


def test_retries_429_and_5xx_honouring_retry_after(scripted):
    scripted.script["flaky"] = [(429, {"Retry-After": "1"}), (500, {})]
    engine = OpenAIEngine("m", {"base_url": scripted.url, "max_retries": 3})
    results = engine.generate([ask("flaky"), ask("steady")], GREEDY)
    assert [r.error for r in results] == [None, None]
    assert results[0].completions[0].text == "echo 0: flaky"
    attempts = scripted.attempts["flaky"]
    assert len(attempts) == 3 and len(scripted.attempts["steady"]) == 1
    assert attempts[1] - attempts[0] >= 1.0  # Retry-After: 1
    assert attempts[2] - attempts[1] < 1.0  # plain backoff: at most 0.5 s * 2


def test_dropped_connection_is_retried(scripted):
    scripted.script["drop"] = [(0, {})]
    engine = OpenAIEngine("m", {"base_url": scripted.url, "max_retries": 2})
    result = engine.generate([ask("drop")], GREEDY)[0]
    assert result.error is None and len(scripted.attempts["drop"]) == 2


def test_gives_up_after_max_retries_on_that_request_only(scripted):
    scripted.script["down"] = [(503, {"Retry-After": "0"})] * 10
    engine = OpenAIEngine("m", {"base_url": scripted.url, "max_retries": 2})
    results = engine.generate([ask("down"), ask("up")], GREEDY)
    assert "gave up after 3 attempts" in results[0].error and "HTTP 503" in results[0].error
    assert len(scripted.attempts["down"]) == 3
    assert results[1].error is None


def test_client_errors_are_not_retried(scripted):
    scripted.script["bad"] = [(400, {})]
    engine = OpenAIEngine("m", {"base_url": scripted.url})
    result = engine.generate([ask("bad")], GREEDY)[0]
    assert result.error == "HTTP 400: scripted 400" and len(scripted.attempts["bad"]) == 1


def test_auth_failure_fails_the_engine(scripted, monkeypatch):
    scripted.script["secret"] = [(401, {})]
    engine = OpenAIEngine("m", {"base_url": scripted.url, "api_key_env": "SPIDER_TEST_KEY"},
                          secrets={"SPIDER_TEST_KEY": "sk-test-123"})
    with pytest.raises(EngineError, match="api_key_env"):
        engine.generate([ask("secret")], GREEDY)
    assert scripted.headers[0]["Authorization"] == "Bearer sk-test-123"
    # The worker's own environment never stands in for a secret the job did not send.
    monkeypatch.setenv("SPIDER_MISSING_KEY", "sk-of-the-worker")
    with pytest.raises(EngineError, match="SPIDER_MISSING_KEY"):
        OpenAIEngine("m", {"base_url": scripted.url, "api_key_env": "SPIDER_MISSING_KEY"})


def test_the_jobs_own_secret_is_the_key_and_keys_separate_engines(scripted, monkeypatch):
    from spider.config import ModelConfig
    from spider.engines import engine_key

    monkeypatch.setenv("SPIDER_JOB_KEY", "sk-of-the-worker")
    engine = OpenAIEngine("m", {"base_url": scripted.url, "api_key_env": "SPIDER_JOB_KEY"},
                          secrets={"SPIDER_JOB_KEY": "sk-of-the-job"})
    engine.generate([ask("hello")], GREEDY)
    assert scripted.headers[-1]["Authorization"] == "Bearer sk-of-the-job"
    engine.close()
    model = ModelConfig(provider="openai", name="m", parameters={"base_url": scripted.url})
    assert engine_key(model, {"OPENAI_API_KEY": "a"}) != engine_key(model, {"OPENAI_API_KEY": "b"})
    local = ModelConfig(provider="hf", name="m")
    assert engine_key(local, {"HF_TOKEN": "a"}) == engine_key(local, {"HF_TOKEN": "b"})


def test_concurrency_is_bounded():
    server = ScriptedServer(delay_s=0.2)
    try:
        engine = OpenAIEngine("m", {"base_url": server.url, "max_concurrency": 3})
        started = time.monotonic()
        results = engine.generate([ask(f"q{i}") for i in range(12)], GREEDY)
        elapsed = time.monotonic() - started
        assert [r.completions[0].text for r in results] == [f"echo 0: q{i}" for i in range(12)]
        assert server.max_in_flight == 3
        assert 0.75 <= elapsed < 3.0  # 4 waves of 0.2 s
    finally:
        server.close()


def test_body_carries_sampling_tools_and_parses_tool_calls(scripted):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = [
        Message("user", "weather?"),
        Message("assistant", "", tool_calls=[ToolCall("c0", "get_weather", {"city": "Lyon"})]),
        Message("tool", "sunny", tool_call_id="c0"),
        Message("user", "call a tool"),
    ]
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, max_tokens=33, stop=["END"],
                            presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1)  # fmt: skip
    engine = OpenAIEngine("teacher", {"base_url": scripted.url})
    results = engine.generate([GenerationRequest("t", history, n=2, seed=42, tools=tools)], params)
    body = scripted.bodies[0]
    assert body["model"] == "teacher" and body["n"] == 2 and body["seed"] == 42 and body["tools"] == tools
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"], body["max_tokens"]) == (0.7, 0.9, 40, 0.05, 33)
    assert (body["stop"], body["presence_penalty"], body["frequency_penalty"], body["repetition_penalty"]) == (
        ["END"], 0.1, 0.2, 1.1
    )
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Lyon"}'
    first, second = results[0].completions
    assert first.tool_calls == [ToolCall("c1", "get_weather", {"city": "Paris"})] and first.finish_reason == "tool_calls"
    assert second.text == "echo 1: call a tool"
    assert first.usage.prompt_tokens == 9 and first.usage.completion_tokens + second.usage.completion_tokens == 9


def test_backoff_is_jittered_exponential_and_respects_retry_after():
    for attempt in range(8):
        delays = [backoff_delay(attempt) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= min(30.0, 0.5 * 2**attempt)
        assert len(set(delays)) > 100
    assert all(backoff_delay(0, 2.0) >= 2.0 for _ in range(50))


def test_openai_refuses_unknown_parameters():
    with pytest.raises(EngineError, match="max_concurency"):
        OpenAIEngine("m", {"max_concurency": 2})


def test_greedy_samples_are_asked_once_and_repeated(scripted):
    """Endpoints such as vLLM's refuse n > 1 without sampling: greedy duplications still work."""
    engine = OpenAIEngine("m", {"base_url": scripted.url})
    result = engine.generate([ask("greedy", n=3)], GREEDY)[0]
    assert scripted.bodies[-1]["n"] == 1
    assert result.error is None and len(result.completions) == 3
    assert len({c.text for c in result.completions}) == 1
    sampled = engine.generate([ask("sampled", n=3)], SAMPLED)[0]
    assert scripted.bodies[-1]["n"] == 3 and len(sampled.completions) == 3
    engine.close()
