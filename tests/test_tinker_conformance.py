"""One conformance suite for the trainer backends: `local` (LocalBackend itself) and `tinker`
(TinkerBackend -> the real tinker SDK -> a fake Tinker service on a local port -> LocalBackend).

Every scenario runs on a fresh backend of each kind and is checked twice: against what the
interface promises (losses are the documented sums of the returned log-probs, samplers read
exactly the weights saved at their path, a state restores weights and optimizer), and against
the same scenario on a reference LocalBackend of its own. For `local` the second check says a
run repeats; for `tinker`, that the whole SDK path (protobuf and JSON on the wire, futures,
chunking, ordering) changes no number.

Tolerance: both sides run the same fp32 CPU code on the same weights, but the SDK cuts a batch
into chunks of CHUNK data (as the service does for large batches), which changes padded batch
shapes and the order in which gradients are summed; every float32 operation rounds at ~6e-8
relative, and the largest difference measured over these scenarios is 5.5e-7 relative. RTOL = 1e-5
is well above that and far below any real difference (a lost input, a wrong clip bound, a skipped
or doubled step each move these numbers by more than 1e-3).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

from spider.engines.base import GenerationRequest, SamplingParams, ScoreRequest
from spider.engines.tinker_engine import TinkerEngine
from spider.errors import EngineError
from spider.train.backend import LOSS_FNS, AdamParams, Datum, LoraSpec, TrainingBackend
from spider.train.local import LocalBackend
from spider.train.tinker_backend import TinkerBackend
from spider.types import Message
from fake_tinker import fake_tinker_server  # tests/ is on sys.path under `pytest` and `python -m pytest` alike

API_KEY = "tml-conformance-key"
SECRETS = {"TINKER_API_KEY": API_KEY}
RANK = 4
SEED = 1234
CHUNK = 2  # the fake service's forward_backward chunk: the 4-datum batches go as two chunks
RTOL = 1e-5
ATOL = 1e-6
KINDS = ("local", "tinker")
PPO_CONFIG = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Tinker trains LoRA adapters on hosted models.",
    "def add(a, b):\n    return a + b\n",
    "Hello there!",
)


def close(actual, expected, rtol: float = RTOL, atol: float = ATOL) -> bool:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return bool(np.allclose(actual, expected, rtol=rtol, atol=atol))


def open_tinker(model, url: str, secrets: dict[str, str] | None = None, **options) -> TinkerBackend:
    """A TinkerBackend on the fake service, of the suite's LoRA rank and seed unless told otherwise."""
    options = {"lora": LoraSpec(rank=RANK), "seed": SEED, **options}
    return TinkerBackend(str(model), SECRETS if secrets is None else secrets, base_url=url, **options)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fake-tinker")
    with fake_tinker_server(api_keys=[API_KEY], workdir=workdir, fwdbwd_max_chunk_len=CHUNK) as server:
        yield server


@pytest.fixture(scope="module")
def make_backend(tiny_model, fake, tmp_path_factory):
    """A fresh backend of a kind, all of one LoRA rank and seed (so the same initial adapter)."""

    def make(kind: str) -> TrainingBackend:
        if kind == "local":
            work_dir = tmp_path_factory.mktemp("local")
            return LocalBackend(str(tiny_model), LoraSpec(rank=RANK), work_dir=work_dir, device="cpu", seed=SEED)
        return open_tinker(tiny_model, fake.url)

    return make


@pytest.fixture(params=KINDS)
def backend(request, make_backend):
    made = make_backend(request.param)
    yield made
    made.close()


@pytest.fixture(scope="module")
def reference(make_backend):
    """`reference(scenario, *args)`: the scenario's numbers on a LocalBackend of its own, once."""
    cache: dict = {}

    def run(scenario, *args):
        key = (scenario.__name__, repr(args))
        if key not in cache:
            own = make_backend("local")
            try:
                cache[key] = scenario(own, *args)
            finally:
                own.close()
        return cache[key]

    return run


@dataclass(frozen=True)
class Batch:
    """Four sequences of the tiny tokenizer and their data for each loss. The sampler log-probs
    are the initial model's own, moved by -0.3, 0 or +0.3 per token, so that PPO clips some
    ratios; advantages and weights are zero on each sequence's first three (prompt) tokens."""

    sequences: tuple[tuple[int, ...], ...]
    data: dict  # loss_fn -> list[Datum]
    initial_logprobs: tuple[tuple[float, ...], ...]


@pytest.fixture(scope="module")
def batch(make_backend) -> Batch:
    base = make_backend("local")
    try:
        tokenizer = base.tokenizer()
        sequences = [tuple(tokenizer(text)["input_ids"]) for text in TEXTS]
        plain = [Datum(list(s[:-1]), list(s[1:])) for s in sequences]
        current = base.forward(plain)
    finally:
        base.close()
    rng = np.random.default_rng(7)
    data: dict = {name: [] for name in LOSS_FNS}
    for datum, logprobs in zip(plain, current):
        n = len(datum.model_input)
        mask = np.array([0.0] * 3 + [1.0] * (n - 3))
        sampler_logprobs = (np.array(logprobs) + rng.choice([-0.3, 0.0, 0.3], size=n)).tolist()
        advantages = (rng.uniform(-1, 1, size=n) * mask).tolist()
        policy = dict(logprobs=sampler_logprobs, advantages=advantages)
        data["importance_sampling"].append(Datum(datum.model_input, datum.target_tokens, **policy))
        data["ppo"].append(Datum(datum.model_input, datum.target_tokens, **policy))
        data["cross_entropy"].append(Datum(datum.model_input, datum.target_tokens, weights=mask.tolist()))
    return Batch(tuple(sequences), data, tuple(tuple(lp) for lp in current))


def expected_loss(loss_fn: str, data: list[Datum], logprobs: list[list[float]], config: dict | None = None) -> float:
    """The module doc of spider.train.backend, in numpy: the loss from the returned log-probs."""
    total = 0.0
    for datum, values in zip(data, logprobs):
        logp = np.asarray(values, dtype=np.float64)
        if loss_fn == "cross_entropy":
            total += -float(np.sum(np.asarray(datum.weights) * logp))
            continue
        ratio = np.exp(logp - np.asarray(datum.logprobs))
        advantages = np.asarray(datum.advantages)
        if loss_fn == "importance_sampling":
            total += -float(np.sum(ratio * advantages))
        else:
            low, high = (config or {}).get("clip_low_threshold", 0.8), (config or {}).get("clip_high_threshold", 1.2)
            total += -float(np.sum(np.minimum(ratio * advantages, np.clip(ratio, low, high) * advantages)))
    return total


# -- scenarios: plain functions of a backend, returning numbers ---------------------------------


def forward_backward_scenario(backend: TrainingBackend, data: tuple[Datum, ...], loss_fn: str) -> dict:
    config = PPO_CONFIG if loss_fn == "ppo" else None
    before = backend.forward(list(data))
    out = backend.forward_backward(list(data), loss_fn, config)
    return {"forward": before, "logprobs": out.logprobs, "loss": out.metrics["loss:sum"]}


def optim_scenario(backend: TrainingBackend, data: tuple[Datum, ...]) -> dict:
    backend.forward_backward(list(data), "cross_entropy")
    out = backend.optim_step(AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=0.05))
    after = backend.forward(list(data))
    return {"grad_norm": out.metrics["grad_norm"], "learning_rate": out.metrics["learning_rate"], "after": after}


def accumulation_scenario(backend: TrainingBackend, data: tuple[Datum, ...]) -> dict:
    """Half the batch, then the other half, then one update: the gradient of the whole batch."""
    backend.forward_backward(list(data[:2]), "cross_entropy")
    backend.forward_backward(list(data[2:]), "cross_entropy")
    out = backend.optim_step(AdamParams(learning_rate=1e-2))
    return {"grad_norm": out.metrics["grad_norm"], "after": backend.forward(list(data))}


def steps_scenario(backend: TrainingBackend, data: tuple[Datum, ...], steps: int = 4) -> dict:
    losses, grad_norms = [], []
    for _ in range(steps):
        out, update = backend.train_step(list(data), "cross_entropy", AdamParams(learning_rate=5e-3))
        losses.append(out.metrics["loss:sum"])
        grad_norms.append(update.metrics["grad_norm"])
    return {"losses": losses, "grad_norms": grad_norms}


def sampler_scenario(backend: TrainingBackend, prompt: tuple[int, ...]) -> dict:
    engine = backend.sampler(backend.save_weights_for_sampler("initial"))
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=True)
    by_ids = GenerationRequest("ids", messages=[], n=2, seed=7, prompt_ids=list(prompt))
    by_messages = GenerationRequest("chat", messages=[Message("user", "Say something.")], seed=3)
    results = engine.generate([by_ids, by_messages], params)
    awaited = asyncio.run(engine.sample(by_ids, params))
    completions = [c for r in results for c in r.completions]
    scores = engine.score([ScoreRequest(f"s{i}", c.prompt_ids + c.token_ids) for i, c in enumerate(completions)])
    return {
        "errors": [r.error for r in results] + [awaited.error],
        "tokens": [c.token_ids for c in completions],
        "awaited_tokens": [c.token_ids for c in awaited.completions],
        "logprobs": [c.logprobs for c in completions],
        "finish": [c.finish_reason for c in completions],
        "text": [c.text for c in completions],
        "prompts": [c.prompt_ids for c in completions],
        "scores": [s.logprobs for s in scores],
    }


def sampler_follows_saves_scenario(backend: TrainingBackend, data: tuple[Datum, ...]) -> dict:
    """Step k's sampler reads the weights saved after step k, and keeps them while training goes on."""
    sequence = list(data[0].model_input) + [data[0].target_tokens[-1]]
    score = ScoreRequest("seq", sequence)
    step0 = backend.sampler(backend.save_weights_for_sampler("step-0"))
    at_step0 = step0.score([score])[0].logprobs
    for _ in range(2):
        backend.train_step(list(data), "cross_entropy", AdamParams(learning_rate=5e-2))
    trained = backend.forward([data[0]])[0]
    step1 = backend.sampler(backend.save_weights_for_sampler("step-1"))
    at_step1 = step1.score([score])[0].logprobs
    backend.train_step(list(data), "cross_entropy", AdamParams(learning_rate=5e-2))
    return {
        "step0": at_step0,
        "step0_later": step0.score([score])[0].logprobs,
        "trained": trained,
        "step1": at_step1,
        "step1_later": step1.score([score])[0].logprobs,
    }


def state_round_trip_scenario(backend: TrainingBackend, data: tuple[Datum, ...]) -> dict:
    adam = AdamParams(learning_rate=2e-2)
    for _ in range(2):
        backend.train_step(list(data), "cross_entropy", adam)
    path = backend.save_state("after-2")
    at_save = backend.forward(list(data))
    later = [backend.train_step(list(data), "cross_entropy", adam)[0].metrics["loss:sum"] for _ in range(2)]
    backend.load_state(path)
    restored = backend.forward(list(data))
    replayed = [backend.train_step(list(data), "cross_entropy", adam)[0].metrics["loss:sum"] for _ in range(2)]
    return {"at_save": at_save, "later": later, "restored": restored, "replayed": replayed}


def export_scenario(backend: TrainingBackend, data: tuple[Datum, ...], scratch) -> dict:
    backend.train_step(list(data), "cross_entropy", AdamParams(learning_rate=1e-2))
    folder = backend.export_weights(backend.save_weights_for_sampler("to-export"), scratch)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {"files": sorted(p.name for p in folder.iterdir()), "tensors": {k: v.tolist() for k, v in tensors.items()}}


# -- the suite ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_forward_backward_logprobs_and_summed_loss(backend, reference, batch, loss_fn):
    data = tuple(batch.data[loss_fn])
    got = forward_backward_scenario(backend, data, loss_fn)
    assert [len(lp) for lp in got["logprobs"]] == [len(d.model_input) for d in data]
    assert close(np.concatenate(got["logprobs"]), np.concatenate(batch.initial_logprobs))
    assert close(np.concatenate(got["forward"]), np.concatenate(got["logprobs"]))
    config = PPO_CONFIG if loss_fn == "ppo" else None
    assert got["loss"] == pytest.approx(expected_loss(loss_fn, list(data), got["logprobs"], config), rel=RTOL, abs=ATOL)
    if loss_fn == "ppo":  # the clip bounds travel: the default bounds give another loss
        assert abs(expected_loss("ppo", list(data), got["logprobs"]) - got["loss"]) > 1e-3
    want = reference(forward_backward_scenario, data, loss_fn)
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL, abs=ATOL)
    assert close(np.concatenate(got["logprobs"]), np.concatenate(want["logprobs"]))


def test_optim_step_reports_grad_norm_and_updates(backend, reference, batch):
    data = tuple(batch.data["cross_entropy"])
    got = optim_scenario(backend, data)
    want = reference(optim_scenario, data)
    assert got["grad_norm"] > 0.05  # reported before clipping to 0.05
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
    assert got["learning_rate"] == pytest.approx(1e-2)
    assert not close(np.concatenate(got["after"]), np.concatenate(batch.initial_logprobs), rtol=0, atol=1e-3)
    assert close(np.concatenate(got["after"]), np.concatenate(want["after"]))


def test_gradients_accumulate_until_optim_step(backend, reference, batch):
    data = tuple(batch.data["cross_entropy"])
    got = accumulation_scenario(backend, data)
    whole = reference(optim_scenario, data)
    halves = reference(accumulation_scenario, data)
    # The weights move by the same Adam step; only the clipping threshold differs, which Adam's
    # normalised first step does not see.
    assert got["grad_norm"] == pytest.approx(whole["grad_norm"], rel=RTOL)
    assert got["grad_norm"] == pytest.approx(halves["grad_norm"], rel=RTOL)
    assert close(np.concatenate(got["after"]), np.concatenate(halves["after"]))


def test_a_few_steps_lower_the_loss_alike(backend, reference, batch):
    data = tuple(batch.data["cross_entropy"])
    got = steps_scenario(backend, data)
    want = reference(steps_scenario, data)
    assert all(b < a for a, b in zip(got["losses"], got["losses"][1:])), got["losses"]
    assert close(got["losses"], want["losses"])
    assert close(got["grad_norms"], want["grad_norms"])


def test_sampler_samples_and_scores_the_saved_weights(backend, reference, batch):
    prompt = batch.sequences[0][:6]
    got = sampler_scenario(backend, prompt)
    want = reference(sampler_scenario, prompt)
    assert got["errors"] == [None, None, None]
    assert len(got["tokens"]) == 3 and all(got["tokens"])
    assert got["awaited_tokens"] == got["tokens"][:2]  # the async path samples what the batch path does
    assert got["prompts"][0] == list(prompt)
    assert got["finish"] == want["finish"] and set(got["finish"]) <= {"stop", "length"}
    assert got["tokens"] == want["tokens"]
    assert got["text"] == want["text"]
    assert got["prompts"] == want["prompts"]
    for logprobs, score, prompt_ids in zip(got["logprobs"], got["scores"], got["prompts"]):
        assert score[0] is None
        # A sampled token's log-prob is the one the model gives it when scoring the sequence.
        assert close(logprobs, score[len(prompt_ids):], rtol=0, atol=1e-4)
    for mine, theirs in zip(got["scores"] + got["logprobs"], want["scores"] + want["logprobs"]):
        assert close([v for v in mine if v is not None], [v for v in theirs if v is not None])


def test_step_k_plus_1_samples_from_step_k_weights(backend, reference, batch):
    data = tuple(batch.data["cross_entropy"])
    got = sampler_follows_saves_scenario(backend, data)
    want = reference(sampler_follows_saves_scenario, data)
    assert close(got["step1"][1:], got["trained"], rtol=0, atol=1e-4)
    assert not close(got["step1"][1:], got["step0"][1:], rtol=0, atol=1e-2)
    assert close(got["step0_later"][1:], got["step0"][1:], rtol=0, atol=1e-6)
    assert close(got["step1_later"][1:], got["step1"][1:], rtol=0, atol=1e-6)
    for key in ("step0", "step1", "trained"):
        assert close([v for v in got[key] if v is not None], [v for v in want[key] if v is not None])


def test_save_state_then_load_state_resumes_exactly(backend, reference, batch):
    data = tuple(batch.data["cross_entropy"])
    got = state_round_trip_scenario(backend, data)
    want = reference(state_round_trip_scenario, data)
    assert close(np.concatenate(got["restored"]), np.concatenate(got["at_save"]), rtol=0, atol=1e-6)
    # Replaying the two steps after the load gives the same losses: the optimizer's moments and
    # step count came back too (a fresh Adam would take a different first step).
    assert close(got["replayed"], got["later"], rtol=0, atol=1e-6)
    assert close(got["later"], want["later"])


def test_export_writes_the_saved_adapter(backend, reference, batch, tmp_path):
    data = tuple(batch.data["cross_entropy"])
    got = export_scenario(backend, data, tmp_path)
    want = reference(export_scenario, data, tmp_path.parent / f"{tmp_path.name}-reference")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(got["files"])
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    for name, values in got["tensors"].items():
        assert close(values, want["tensors"][name]), name


# -- what only the tinker path has --------------------------------------------------------------


def test_the_api_key_travels_and_a_wrong_one_is_refused(tiny_model, fake):
    open_tinker(tiny_model, fake.url).close()
    sent = {key for route, key in fake.requests if route in ("/create_session", "/create_model", "/get_info")}
    assert sent == {API_KEY}
    with pytest.raises(EngineError, match="401"):
        open_tinker(tiny_model, fake.url, {"TINKER_API_KEY": "tml-not-a-key-of-this-service"})
    with pytest.raises(EngineError, match="tml-"):
        open_tinker(tiny_model, fake.url, {"TINKER_API_KEY": "sk-wrong-format"})
    with pytest.raises(EngineError, match="TINKER_API_KEY"):
        open_tinker(tiny_model, fake.url, {})
    # The service itself refuses a key of the wrong format, whatever the client checks.
    refused = httpx.post(f"{fake.url}/api/v1/create_session", json={}, headers={"X-API-Key": "sk-wrong-format"})
    assert refused.status_code == 401 and "tml-" in refused.json()["detail"]


def test_tinker_refuses_lora_settings_it_cannot_train(tiny_model, fake):
    for lora, why in [
        (LoraSpec(rank=None), "LoRA adapters only"),
        (LoraSpec(rank=4, alpha=16), "alpha"),
        (LoraSpec(rank=4, target_modules=["q_proj"]), "target_modules"),
        (LoraSpec(rank=4, dropout=0.1), "dropout"),
    ]:
        with pytest.raises(EngineError, match=why):
            open_tinker(tiny_model, fake.url, lora=lora)


def test_a_batch_larger_than_a_chunk_goes_as_ordered_chunks(tiny_model, fake, batch):
    backend = open_tinker(tiny_model, fake.url)
    try:
        before = sum(1 for route, _ in fake.requests if route == "/forward_backward")
        out = backend.forward_backward(list(batch.data["cross_entropy"]), "cross_entropy")
        sent = sum(1 for route, _ in fake.requests if route == "/forward_backward") - before
    finally:
        backend.close()
    assert sent == len(TEXTS) // CHUNK
    assert [len(lp) for lp in out.logprobs] == [len(d.model_input) for d in batch.data["cross_entropy"]]


def test_train_step_submits_the_update_before_waiting_on_the_gradient(tiny_model, tmp_path):
    """The backend behind this fake service holds forward_backward until the service has received
    the optim_step request: a client that waited for the gradient first would never send it."""
    arrived = threading.Event()
    service = {}

    class HoldingBackend(LocalBackend):
        def forward_backward(self, data, loss_fn, loss_fn_config=None):
            for _ in range(100):
                if any(route == "/optim_step" for route, _ in service["server"].requests):
                    arrived.set()
                    break
                time.sleep(0.05)
            return super().forward_backward(data, loss_fn, loss_fn_config)

    def holding(spec, workdir):
        lora = LoraSpec(rank=spec.rank)
        return HoldingBackend(spec.base_model, lora, work_dir=workdir, device="cpu", seed=spec.seed or 0)

    with fake_tinker_server(api_keys=[API_KEY], make_backend=holding, workdir=tmp_path) as server:
        service["server"] = server
        backend = open_tinker(tiny_model, server.url)
        datum = Datum(list(range(10, 20)), list(range(11, 21)), weights=[1.0] * 10)
        out, update = backend.train_step([datum], "cross_entropy", AdamParams(learning_rate=1e-2))
        backend.close()
    assert arrived.is_set()
    assert out.metrics["loss:sum"] > 0 and update.metrics["grad_norm"] > 0


def test_resume_from_a_student_checkpoint(tiny_model, fake, batch):
    data = list(batch.data["cross_entropy"])
    score = ScoreRequest("seq", list(batch.sequences[1]))
    first = open_tinker(tiny_model, fake.url)
    try:
        first.train_step(data, "cross_entropy", AdamParams(learning_rate=2e-2))
        path = first.save_state("resume-me")
        sampler_path = first.save_weights_for_sampler("resume-me")
        sampled_before = first.sampler(sampler_path).score([score])[0].logprobs
        at_save = first.forward(data)
        next_loss = first.train_step(data, "cross_entropy", AdamParams(learning_rate=2e-2))[0].metrics["loss:sum"]
        run = first.info()["model_id"]
    finally:
        first.close()
    assert path.startswith("tinker://") and "/weights/" in path
    assert run not in fake.models  # the finished session released its run; its checkpoints stay
    resumed = open_tinker(tiny_model, fake.url, seed=None, student_checkpoint=path)
    try:
        assert close(np.concatenate(resumed.forward(data)), np.concatenate(at_save), rtol=0, atol=1e-6)
        again = resumed.train_step(data, "cross_entropy", AdamParams(learning_rate=2e-2))[0].metrics["loss:sum"]
        assert again == pytest.approx(next_loss, abs=1e-6)
        sampled_after = resumed.sampler(sampler_path).score([score])[0].logprobs
        assert close(sampled_after[1:], sampled_before[1:], rtol=0, atol=1e-6)
    finally:
        resumed.close()
    with pytest.raises(EngineError, match="trained from"):
        open_tinker("another/model", fake.url, student_checkpoint=path)
    with pytest.raises(EngineError, match="rank"):
        open_tinker(tiny_model, fake.url, lora=LoraSpec(rank=RANK * 2), student_checkpoint=path)


def test_a_tinker_hosted_teacher_scores_like_the_base_model(tiny_model, fake):
    from spider.engines.hf_engine import HFEngine

    teacher = TinkerEngine.for_base_model(str(tiny_model), SECRETS, base_url=fake.url)
    plain = HFEngine(str(tiny_model), {"dtype": "float32", "device": "cpu"})
    try:
        tokenizer = plain.tokenizer
        ids = tokenizer("The teacher scores the student's tokens.")["input_ids"]
        mine = teacher.score([ScoreRequest("t", ids)])[0]
        theirs = plain.score([ScoreRequest("t", ids)])[0]
        assert mine.error is None and mine.logprobs[0] is None
        assert close(mine.logprobs[1:], theirs.logprobs[1:])
        chat = GenerationRequest("c", messages=[Message("user", "Hello")], seed=5)
        params = SamplingParams(temperature=0.0, max_tokens=10)
        sampled = teacher.generate([chat], params)[0].completions[0]
        expected = plain.generate([chat], params)[0].completions[0]
        assert sampled.token_ids == expected.token_ids and sampled.text == expected.text
    finally:
        teacher.close()
        plain.close()


def test_stop_strings_end_the_text(tiny_model, fake):
    engine = TinkerEngine.for_base_model(str(tiny_model), SECRETS, base_url=fake.url)
    try:
        request = GenerationRequest("s", messages=[Message("user", "Write a story.")], seed=11)
        free = engine.generate([request], SamplingParams(max_tokens=24))[0].completions[0]
        stop = next(ch for ch in free.text[1:] if ch.isascii() and ch.isalpha())
        cut = engine.generate([request], SamplingParams(max_tokens=24, stop=[stop]))[0].completions[0]
        assert cut.finish_reason == "stop"
        assert cut.text == free.text[: free.text.find(stop)]
    finally:
        engine.close()


def test_without_a_local_tokenizer_only_token_ids_are_sampled(fake, tiny_model):
    missing = "org/not-available-offline"
    engine = TinkerEngine.for_base_model(str(tiny_model), SECRETS, base_url=fake.url, tokenizer_name=missing)
    try:
        chat = GenerationRequest("m", messages=[Message("user", "hi")])
        ids = GenerationRequest("i", messages=[], prompt_ids=[5, 6, 7], seed=1)
        by_messages, by_ids = engine.generate([chat, ids], SamplingParams(max_tokens=4, logprobs=True))
        assert by_messages.error is not None
        assert "prompt_ids" in by_messages.error and "not-available-offline" in by_messages.error
        completion = by_ids.completions[0]
        assert by_ids.error is None and len(completion.token_ids) >= 1
        assert completion.text == "" and len(completion.logprobs) == len(completion.token_ids)
    finally:
        engine.close()


def test_tinker_exports_only_the_current_weights(tiny_model, fake, batch, tmp_path):
    data = list(batch.data["cross_entropy"])
    backend = open_tinker(tiny_model, fake.url)
    try:
        path = backend.save_weights_for_sampler("before-the-step")
        backend.train_step(data, "cross_entropy", AdamParams(learning_rate=1e-2))
        with pytest.raises(EngineError, match="updated since it was saved"):
            backend.export_weights(path, tmp_path)
        folder = backend.export_weights(backend.save_weights_for_sampler("after-the-step"), tmp_path)
        assert (folder / "adapter_config.json").is_file()
    finally:
        backend.close()
    # The temporary export was deleted from the service once downloaded.
    assert not [p for p in fake.service.checkpoints if "/external_weights/" in p]
