"""The local trainer backend on a tiny real Llama (CPU, fp32): Tinker's losses against hand values,
gradient accumulation, samplers that read exactly the saved weights, bit-identical resume, and
exported adapters that plain peft loads."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from spider.engines.base import GenerationRequest, SamplingParams, ScoreRequest
from spider.testing import tiny_corpus
from spider.train.backend import AdamParams, Datum, LoraSpec
from spider.train.export import export_adapter, merge_adapter
from spider.train.local import LocalBackend, micro_batches
from spider.train.losses import compute_loss, learning_rate, reverse_kl_advantages

GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=True)


@pytest.fixture(scope="module", autouse=True)
def threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[list[int]]:
    """Three real token sequences of different lengths."""
    lines = tiny_corpus(lines=12)
    return [tokenizer.encode(" ".join(lines[i : i + k])) for i, k in ((0, 1), (2, 3), (6, 2))]


def backend(tiny_model, tmp_path, **kwargs) -> LocalBackend:
    kwargs.setdefault("lora", LoraSpec(rank=8))
    return LocalBackend(tiny_model, work_dir=tmp_path / "work", **kwargs)


def sft(tokens: list[int]) -> Datum:
    return Datum.from_sequence(tokens, weights=[1.0] * len(tokens))


def policy_datum(tokens: list[int], seed: int) -> Datum:
    """A datum with made-up sampler log-probs and advantages of both signs, the first 3 tokens a prompt."""
    g = torch.Generator().manual_seed(seed)
    n = len(tokens)
    logprobs = (-torch.rand(n, generator=g) * 6).tolist()
    advantages = torch.randn(n, generator=g).tolist()
    advantages[:3] = [0.0, 0.0, 0.0]
    logprobs[:3] = [0.0, 0.0, 0.0]
    return Datum.from_sequence(tokens, logprobs=logprobs, advantages=advantages)


def peft_logprobs(base_dir: Path, adapter_dir: str | Path, tokens: list[int]) -> list[float]:
    """Log-probs of tokens[1:] under a fresh base model with the adapter loaded by plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    return model_logprobs(model, tokens)


def model_logprobs(model, tokens: list[int]) -> list[float]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()


def score(engine, tokens: list[int]) -> list[float]:
    result = engine.score([ScoreRequest("s", tokens)])[0]
    assert result.error is None and result.logprobs[0] is None
    return result.logprobs[1:]


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ losses


def test_importance_sampling_value_and_gradient_by_hand():
    target = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    datum = Datum([1, 2, 3], [2, 3, 4], logprobs=[-1.2, -1.5, -0.5], advantages=[1.0, -2.0, 0.0])
    loss, metrics = compute_loss("importance_sampling", [target], [datum])
    ratios = [math.exp(0.2), math.exp(-0.5), 1.0]
    assert loss.item() == pytest.approx(-(ratios[0] * 1.0 + ratios[1] * -2.0), abs=1e-6)
    assert metrics["loss:sum"] == pytest.approx(loss.item())
    loss.backward()
    # d/dlogp of -r*A is -r*A.
    assert target.grad.tolist() == pytest.approx([-ratios[0], 2 * ratios[1], 0.0], abs=1e-6)


def test_ppo_clips_on_both_sides_by_hand():
    # ratio e^0.5 with A>0 and e^-0.5 with A<0: clipped, no gradient. In range: plain ratio * A.
    # e^-0.5 with A>0 and e^0.5 with A<0: the unclipped term is the smaller one and keeps its gradient.
    target = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    sampler = [-0.5, 0.5, 0.1, 0.5, -0.5]
    advantages = [1.0, -1.0, 2.0, 1.0, -1.0]
    datum = Datum([1] * 5, [2] * 5, logprobs=sampler, advantages=advantages)
    loss, metrics = compute_loss("ppo", [target], [datum])
    r_in = math.exp(-0.1)
    expected = -(1.2 * 1.0 + 0.8 * -1.0 + r_in * 2.0 + math.exp(-0.5) * 1.0 + math.exp(0.5) * -1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clipped:sum"] == 2
    loss.backward()
    assert target.grad.tolist() == pytest.approx([0.0, 0.0, -2 * r_in, -math.exp(-0.5), math.exp(0.5)], abs=1e-6)

    narrow, _ = compute_loss(
        "ppo", [target.detach()], [datum], {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}
    )
    expected_narrow = -(1.05 * 1.0 + 0.9 * -1.0 + min(r_in, 1.05) * 2.0 + math.exp(-0.5) - math.exp(0.5))
    assert narrow.item() == pytest.approx(expected_narrow, abs=1e-6)


def test_cross_entropy_value_and_gradient_by_hand():
    first = torch.tensor([-1.0, -3.0], requires_grad=True)
    second = torch.tensor([-0.25], requires_grad=True)
    data = [Datum([5, 6], [6, 7], weights=[1.0, 0.0]), Datum([9], [3], weights=[0.5])]
    loss, _ = compute_loss("cross_entropy", [first, second], data)
    assert loss.item() == pytest.approx(1.0 + 0.125)
    loss.backward()
    assert first.grad.tolist() == [-1.0, 0.0] and second.grad.tolist() == [-0.5]


def test_loss_inputs_are_checked_with_a_message_that_says_what_is_missing():
    target = torch.zeros(2)
    with pytest.raises(ValueError, match="needs Datum.logprobs and Datum.advantages"):
        compute_loss("ppo", [target], [Datum([1, 2], [2, 3], weights=[1.0, 1.0])])
    with pytest.raises(ValueError, match="not used by 'cross_entropy'"):
        compute_loss("cross_entropy", [target], [Datum([1, 2], [2, 3], weights=[1.0, 1.0])], {"clip_low_threshold": 0.5})
    with pytest.raises(ValueError, match="unknown loss_fn"):
        compute_loss("dpo", [target], [Datum([1, 2], [2, 3])])


def test_reverse_kl_advantages_by_hand():
    # A prompt token, two sampled tokens, a tool-output token (masked out), one more sampled token.
    student = [None, -1.0, -2.0, None, -0.5]
    teacher = [None, -1.5, -1.0, -3.0, -0.25]
    mask = [0, 1, 1, 0, 1]
    per_token = [0.0, -1.0, 2.0, 0.0, 0.5]  # -2 * (student - teacher)
    assert reverse_kl_advantages(student, teacher, mask, 2.0, 0.0) == pytest.approx(per_token)
    # gamma 0.5, future KL flowing back through the masked token (which itself stays 0).
    assert reverse_kl_advantages(student, teacher, mask, 2.0, 0.5) == pytest.approx([0.0, 0.0625, 2.125, 0.0, 0.5])

    # On a sequence with every token masked in, the definition sum_{k>=t} gamma^(k-t) a_k.
    s, t = [-1.0, -0.2, -3.0, -0.7], [-0.5, -0.9, -1.0, -0.7]
    a = [-0.3 * (x - y) for x, y in zip(s, t)]
    expected = [sum(0.9 ** (k - i) * a[k] for k in range(i, 4)) for i in range(4)]
    assert reverse_kl_advantages(s, t, [1, 1, 1, 1], 0.3, 0.9) == pytest.approx(expected)
    with pytest.raises(ValueError, match="as long as each other"):
        reverse_kl_advantages([-1.0], [-1.0, -2.0], [1], 1.0)


def test_learning_rate_schedules_by_hand():
    assert learning_rate(7, 10, 1e-3, "constant") == 1e-3
    assert learning_rate(5, 10, 1e-3, "linear") == pytest.approx(5e-4)
    assert learning_rate(0, 10, 1e-3, "cosine") == pytest.approx(1e-3)
    assert learning_rate(2, 10, 1e-3, "cosine") == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.2 * math.pi)))
    assert learning_rate(5, 10, 1e-3, "cosine") == pytest.approx(5e-4)
    # Warmup over 4 steps, then the schedule over the 6 after them.
    assert [learning_rate(s, 10, 1.0, "linear", 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert learning_rate(4, 10, 1.0, "linear", 4) == pytest.approx(1.0)
    assert learning_rate(7, 10, 1.0, "linear", 4) == pytest.approx(0.5)
    assert learning_rate(7, 10, 1.0, "cosine", 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        learning_rate(0, 10, 1.0, "exponential")


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("rank", [None, 4])
def test_micro_batches_accumulate_the_same_gradient_as_one_batch(tiny_model, tmp_path, sequences, rank):
    data = [policy_datum(tokens, seed) for seed, tokens in enumerate(sequences)]
    lengths = [len(d.model_input) for d in data]
    small = max(lengths) + 1
    assert len(micro_batches(lengths, small)) >= 2

    outputs, grads = [], []
    for budget in (10_000, small):
        trainer = backend(tiny_model, tmp_path / str(budget), lora=LoraSpec(rank=rank), micro_batch_tokens=budget)
        if rank is not None:  # LoRA B starts at 0; give the adapter weights so every grad is nonzero
            with torch.no_grad():
                for name, p in trainer.model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        outputs.append(trainer.forward_backward(data, "importance_sampling"))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})

    whole, split = outputs
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], abs=1e-5)
    assert split.metrics["tokens"] == sum(lengths)
    for a, b in zip(whole.logprobs, split.logprobs):
        assert max_diff(a, b) < 1e-6
    assert grads[0].keys() == grads[1].keys()
    assert sum(g.abs().sum().item() for g in grads[0].values()) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_cross_entropy_steps_lower_the_loss(tiny_model, tmp_path, sequences):
    trainer = backend(tiny_model, tmp_path)
    data = [sft(tokens) for tokens in sequences]
    losses, norms = [], []
    for _ in range(6):
        out = trainer.forward_backward(data, "cross_entropy")
        losses.append(out.metrics["loss:sum"])
        norms.append(trainer.optim_step(AdamParams(learning_rate=2e-3)).metrics["grad_norm"])
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0]
    assert all(n > 0 for n in norms)
    # forward (no dropout, no grad) agrees with what forward_backward saw, and no gradient is left.
    after = trainer.forward_backward(data, "cross_entropy")
    assert max_diff(trainer.forward(data)[1], after.logprobs[1]) < 1e-5
    assert after.metrics["loss:sum"] == pytest.approx(-sum(sum(lp) for lp in after.logprobs), rel=1e-5)
    info = trainer.info()
    assert info["steps"] == 6 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert 0 < info["trainable_parameters"] < info["total_parameters"]


def test_adam_settings_and_gradient_clipping_by_hand(tiny_model, tmp_path, sequences):
    """With beta1 = beta2 = 0 an AdamW step moves each weight to p * (1 - lr * wd) - lr * g / (|g| + eps):
    with eps = 1 the step depends on the gradient's scale, so clipping shows in it."""
    data = [sft(sequences[1])]
    for clip, decay in ((0.0, 0.0), (0.5, 0.1)):
        trainer = backend(tiny_model, tmp_path / str(clip), lora=LoraSpec(rank=None))
        for lr in (0.1, 0.02):  # the rate may change from one step to the next
            trainer.forward_backward(data, "cross_entropy")
            grads = [p.grad.clone() for p in trainer.trainable]
            before = [p.detach().clone() for p in trainer.trainable]
            norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
            adam = AdamParams(learning_rate=lr, beta1=0.0, beta2=0.0, eps=1.0, weight_decay=decay, grad_clip_norm=clip)
            metrics = trainer.optim_step(adam).metrics
            assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)  # reported before clipping
            assert metrics["learning_rate"] == lr
            scale = min(1.0, clip / norm) if clip else 1.0
            assert scale < 0.1 or not clip
            for p, b, g in zip(trainer.trainable, before, grads):
                expected = b * (1 - lr * decay) - lr * (g * scale) / ((g * scale).abs() + 1.0)
                torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)
            assert all(p.grad is None for p in trainer.trainable)


# ---------------------------------------------------------------------------------------- sampling


def test_sampler_reads_exactly_the_weights_saved_at_its_path(tiny_model, tmp_path, sequences):
    trainer = backend(tiny_model, tmp_path)
    probe = sequences[2]
    data = [sft(tokens) for tokens in sequences]

    path0 = trainer.save_weights_for_sampler("step-0")
    old = trainer.sampler(path0)
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=5e-3))
    path1 = trainer.save_weights_for_sampler("step-1")
    new = trainer.sampler(path1)

    old_scores, new_scores = score(old, probe), score(new, probe)
    assert max_diff(new_scores, peft_logprobs(tiny_model, path1, probe)) < 1e-5
    assert max_diff(old_scores, peft_logprobs(tiny_model, path0, probe)) < 1e-5
    assert max_diff(old_scores, new_scores) > 1e-2

    # The snapshot shares the frozen base weights with the trainer; only the adapter is its own.
    embed = new.model.get_input_embeddings().weight
    assert embed.data_ptr() == trainer.model.get_input_embeddings().weight.data_ptr()

    # Greedy decoding equals transformers' own on a fresh model from that path, and the sampler's
    # log-probs of its tokens are its scores of them.
    prompt = probe[:6]
    completion = new.generate([GenerationRequest("g", [], prompt_ids=prompt)], GREEDY)[0].completions[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), path1).eval()
    with torch.no_grad():
        reference = fresh.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
            eos_token_id=trainer.tokenizer().eos_token_id, pad_token_id=trainer.tokenizer().pad_token_id,
        )[0, len(prompt):].tolist()
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert completion.prompt_ids == prompt
    assert max_diff(completion.logprobs, score(new, prompt + completion.token_ids)[len(prompt) - 1 :]) < 1e-5

    # Sampled through the async path as the rollout loop does: same tokens.
    sampled = asyncio.run(new.sample(GenerationRequest("a", [], prompt_ids=prompt), GREEDY))
    assert sampled.completions[0].token_ids == completion.token_ids

    # More training changes neither sampler, and a sampler made later for the old path reads it.
    for _ in range(2):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-3))
    assert score(old, probe) == old_scores
    assert score(new, probe) == new_scores
    assert max_diff(score(trainer.sampler(path0), probe), old_scores) < 1e-6
    live = trainer.forward([sft(probe)])[0]
    assert max_diff(live, new_scores) > 1e-2
    old.close()
    new.close()


def test_saving_a_name_again_replaces_it_whole(tiny_model, tmp_path, sequences):
    trainer = backend(tiny_model, tmp_path)
    first = trainer.save_weights_for_sampler("final")
    trainer.forward_backward([sft(sequences[0])], "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=5e-3))
    again = trainer.save_weights_for_sampler("final")
    assert again == first
    assert max_diff(score(trainer.sampler(again), sequences[0]), trainer.forward([sft(sequences[0])])[0]) < 1e-5
    assert sorted(p.name for p in Path(first).parent.iterdir()) == ["final"]
    with pytest.raises(ValueError, match="checkpoint name"):
        trainer.save_weights_for_sampler("../escape")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        trainer.sampler(str(tmp_path))


# ------------------------------------------------------------------------------------------- resume


def test_resume_from_save_state_is_bit_identical(tiny_model, tmp_path, sequences):
    """Dropout on, so the restored random generator matters as much as the optimizer's moments."""
    spec = LoraSpec(rank=8, dropout=0.1)
    data = [policy_datum(tokens, seed) for seed, tokens in enumerate(sequences)]

    def step(trainer: LocalBackend, k: int):
        out = trainer.forward_backward(data, "ppo")
        norm = trainer.optim_step(AdamParams(learning_rate=learning_rate(k, 4, 3e-3, "cosine"))).metrics["grad_norm"]
        return out.logprobs, norm

    first = backend(tiny_model, tmp_path / "a", lora=spec, seed=3)
    for k in range(2):
        step(first, k)
    state = first.save_state("step-2")
    continued = [step(first, k) for k in (2, 3)]

    resumed = backend(tiny_model, tmp_path / "b", lora=spec, seed=11)  # another init, replaced by the state
    resumed.load_state(state)
    assert resumed.steps == 2
    assert [step(resumed, k) for k in (2, 3)] == continued
    for a, b in zip(first.trainable, resumed.trainable):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="trained LoRA"):
        backend(tiny_model, tmp_path / "c", lora=LoraSpec(rank=4)).load_state(state)


# ------------------------------------------------------------------------------------------- export


def test_exported_adapter_loads_with_plain_peft_and_merges(tiny_model, tmp_path, sequences, tokenizer):
    trainer = backend(tiny_model, tmp_path)
    data = [sft(tokens) for tokens in sequences]
    for _ in range(2):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-3))
    out = export_adapter(
        trainer.save_weights_for_sampler("final"),
        tmp_path / "export",
        tokenizer=trainer.tokenizer(),
        model_card="# tiny student\n\nDistilled on-policy from a tiny teacher.",
        base_model="spider/tiny-base",
    )
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "README.md"} <= names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "spider/tiny-base"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and 'base_model: "spider/tiny-base"' in card and "Distilled on-policy" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template
    live = trainer.forward(data)
    for tokens, logprobs in zip(sequences, live):
        assert max_diff(peft_logprobs(tiny_model, out, tokens), logprobs) < 1e-5

    merged_dir = merge_adapter(tiny_model, out, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for tokens, logprobs in zip(sequences, live):
        assert max_diff(model_logprobs(merged, tokens), logprobs) < 1e-5
    assert AutoTokenizer.from_pretrained(str(merged_dir)).chat_template == tokenizer.chat_template


def test_full_fine_tuning_trains_every_weight_and_samples_its_saved_folder(tiny_model, tmp_path, sequences):
    trainer = backend(tiny_model, tmp_path, lora=LoraSpec(rank=None))
    info = trainer.info()
    assert info["trainable_parameters"] == info["total_parameters"] and info["lora_rank"] is None
    data = [sft(tokens) for tokens in sequences]
    losses = []
    for _ in range(4):
        losses.append(trainer.forward_backward(data, "cross_entropy").metrics["loss:sum"])
        trainer.optim_step(AdamParams(learning_rate=1e-3))
    assert losses[-1] < 0.9 * losses[0]

    path = trainer.save_weights_for_sampler("full")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path).eval()
    assert max_diff(score(trainer.sampler(path), sequences[1]), model_logprobs(saved, sequences[1])) < 1e-5
    assert max_diff(model_logprobs(saved, sequences[1]), trainer.forward([sft(sequences[1])])[0]) < 1e-5
    with pytest.raises(ValueError, match="full fine-tune"):
        export_adapter(path, tmp_path / "export", tokenizer=trainer.tokenizer(), model_card="x")


def test_bad_calls_are_refused_with_what_to_change(tiny_model, tmp_path, sequences):
    trainer = backend(tiny_model, tmp_path)
    with pytest.raises(ValueError, match="needs Datum.weights"):
        trainer.forward_backward([Datum.from_sequence(sequences[0])], "cross_entropy")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        trainer.forward([Datum([1, 2], [3, 10**6])])
    with pytest.raises(ValueError, match="beta2 must be in"):
        trainer.optim_step(AdamParams(beta2=1.0))
    with pytest.raises(ValueError, match="sampler_engine"):
        backend(tiny_model, tmp_path, sampler_engine="tinker")
    assert all(p.grad is None for p in trainer.trainable)  # refused calls computed nothing
