"""The conformance suite's core checks against the hosted Tinker service itself, when a key is
given (TINKER_API_KEY; TINKER_BASE_URL and TINKER_LIVE_MODEL optional). The base model's
tokenizer is not available offline, so the data are token ids: a BOS and ids drawn from the
model's vocabulary, which is enough for log-probs, losses, updates and sampling.

The service computes in its own precision (bf16 weights, other kernels), so the checks here are
of the interface's promises (the summed loss of the returned log-probs, a loss that falls,
samplers that read the saved weights, a state that resumes), not bit agreement with LocalBackend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from spider.engines.base import GenerationRequest, SamplingParams, ScoreRequest
from spider.errors import EngineError
from spider.train.backend import LOSS_FNS, AdamParams, Datum, LoraSpec
from spider.train.tinker_backend import TinkerBackend

API_KEY = os.environ.get("TINKER_API_KEY")
BASE_URL = os.environ.get("TINKER_BASE_URL") or None
MODEL = os.environ.get("TINKER_LIVE_MODEL", "meta-llama/Llama-3.2-1B")
BOS = 128000  # Llama 3's <|begin_of_text|>; ids below are ordinary tokens of its vocabulary
RANK = 8

pytestmark = pytest.mark.skipif(
    not API_KEY, reason="TINKER_API_KEY is not set: the hosted Tinker service is not reached"
)


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    return {"TINKER_API_KEY": API_KEY or ""}


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[BOS] + rng.integers(1000, 30000, size=n).tolist() for n in (12, 16, 20)]


@pytest.fixture
def backend(secrets):
    made = TinkerBackend(MODEL, secrets, base_url=BASE_URL, lora=LoraSpec(rank=RANK), seed=0)
    yield made
    made.close()


def policy_data(sequences: list[list[int]], current: list[list[float]]) -> list[Datum]:
    """Sampler log-probs a little off the model's own (so PPO clips some ratios); advantages of
    both signs after a three-token prompt."""
    rng = np.random.default_rng(1)
    data = []
    for seq, logprobs in zip(sequences, current):
        n = len(seq) - 1
        mask = np.array([0.0] * 3 + [1.0] * (n - 3))
        data.append(
            Datum(
                seq[:-1],
                seq[1:],
                logprobs=(np.array(logprobs) + rng.choice([-0.3, 0.0, 0.3], size=n)).tolist(),
                advantages=(rng.uniform(-1, 1, size=n) * mask).tolist(),
                weights=mask.tolist(),
            )
        )
    return data


def summed_loss(loss_fn: str, data: list[Datum], logprobs: list[list[float]]) -> float:
    total = 0.0
    for datum, values in zip(data, logprobs):
        logp = np.asarray(values, dtype=np.float64)
        if loss_fn == "cross_entropy":
            total -= float(np.sum(np.asarray(datum.weights) * logp))
            continue
        ratio, advantages = np.exp(logp - np.asarray(datum.logprobs)), np.asarray(datum.advantages)
        clipped = np.clip(ratio, 0.8, 1.2) if loss_fn == "ppo" else ratio
        total -= float(np.sum(np.minimum(ratio * advantages, clipped * advantages)))
    return total


def test_live_losses_updates_and_steps(backend, sequences):
    plain = [Datum(s[:-1], s[1:]) for s in sequences]
    current = backend.forward(plain)
    assert [len(lp) for lp in current] == [len(s) - 1 for s in sequences]
    assert all(v < 0 for lp in current for v in lp)
    data = policy_data(sequences, current)
    for loss_fn in LOSS_FNS:
        out = backend.forward_backward(data, loss_fn)
        assert [len(lp) for lp in out.logprobs] == [len(d.model_input) for d in data]
        assert out.metrics["loss:sum"] == pytest.approx(summed_loss(loss_fn, data, out.logprobs), rel=1e-2, abs=1e-2)
    update = backend.optim_step(AdamParams(learning_rate=1e-4))
    assert update.metrics["learning_rate"] == pytest.approx(1e-4)
    if "grad_norm" in update.metrics:
        assert update.metrics["grad_norm"] > 0
    adam = AdamParams(learning_rate=1e-3)
    losses = [backend.train_step(data, "cross_entropy", adam)[0].metrics["loss:sum"] for _ in range(4)]
    assert losses[-1] < losses[0], losses


def test_live_samplers_read_the_saved_weights(backend, sequences):
    prompt = sequences[0][:6]
    target = Datum(sequences[2][:-1], sequences[2][1:], weights=[1.0] * (len(sequences[2]) - 1))
    score = ScoreRequest("seq", sequences[2])
    before = backend.sampler(backend.save_weights_for_sampler("live-step-0"))
    params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=True)
    result = before.generate([GenerationRequest("p", messages=[], n=2, seed=3, prompt_ids=prompt)], params)[0]
    assert result.error is None and len(result.completions) == 2
    for completion in result.completions:
        assert 1 <= len(completion.token_ids) <= 8 and len(completion.logprobs) == len(completion.token_ids)
        scored = before.score([ScoreRequest("c", prompt + completion.token_ids)])[0].logprobs
        assert scored[0] is None
        # The sampler's log-probs of its own tokens are the ones it gives when scoring them.
        assert np.mean(np.abs(np.array(scored[len(prompt):]) - np.array(completion.logprobs))) < 0.1
    at_step0 = before.score([score])[0].logprobs
    for _ in range(3):
        backend.train_step([target], "cross_entropy", AdamParams(learning_rate=1e-3))
    after = backend.sampler(backend.save_weights_for_sampler("live-step-1"))
    at_step1 = after.score([score])[0].logprobs
    # Step k+1's sampler reads the weights step k trained: the trained sequence became likelier,
    # while the older sampler still reads the older weights.
    assert np.mean(at_step1[1:]) > np.mean(at_step0[1:]) + 0.1
    assert np.allclose(before.score([score])[0].logprobs[1:], at_step0[1:], atol=0.05)
    trained = backend.forward([target])[0]
    assert np.mean(np.abs(np.array(at_step1[1:]) - np.array(trained))) < 0.1


def test_live_state_round_trip_and_resume(backend, secrets, sequences):
    data = [Datum(s[:-1], s[1:], weights=[1.0] * (len(s) - 1)) for s in sequences]
    backend.train_step(data, "cross_entropy", AdamParams(learning_rate=1e-3))
    path = backend.save_state("live-state")
    assert path.startswith("tinker://")
    at_save = backend.forward(data)
    backend.train_step(data, "cross_entropy", AdamParams(learning_rate=1e-3))
    assert not np.allclose(np.concatenate(backend.forward(data)), np.concatenate(at_save), atol=1e-3)
    backend.load_state(path)
    assert np.allclose(np.concatenate(backend.forward(data)), np.concatenate(at_save), atol=1e-2)
    resumed = TinkerBackend(MODEL, secrets, base_url=BASE_URL, lora=LoraSpec(rank=RANK), student_checkpoint=path)
    try:
        assert np.allclose(np.concatenate(resumed.forward(data)), np.concatenate(at_save), atol=1e-2)
    finally:
        resumed.close()


def test_live_service_refuses_a_wrong_key():
    with pytest.raises(EngineError, match="401|403|refused|denied"):
        wrong = {"TINKER_API_KEY": "tml-spider-live-test-not-a-real-key"}
        TinkerBackend(MODEL, wrong, base_url=BASE_URL, lora=LoraSpec(rank=RANK))
