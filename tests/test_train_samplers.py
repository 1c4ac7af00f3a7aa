"""The local backend's hf sampler decodes LoRA without peft's per-call dispatch: its FrozenLoraLinear
layers give peft's outputs bit for bit (float32, and bfloat16 base weights with a float32 adapter,
as on a GPU), and `merged=True` evaluates the saved weights as one float32 matrix per layer without
touching the trainer's tensors. A tiny real Llama on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spider.engines.base import ScoreRequest
from spider.testing import tiny_corpus
from spider.train.backend import AdamParams, Datum, LoraSpec
from spider.train.local import FrozenLoraLinear, LocalBackend, _load_adapter


@pytest.fixture(scope="module", autouse=True)
def threads():
    torch.set_num_threads(2)


def trained(tiny_model: Path, work: Path, dtype: str, **kwargs) -> tuple[LocalBackend, str, list[int]]:
    """A backend after two SFT steps (the adapter's B no longer zero) and the sampler path of its weights."""
    backend = LocalBackend(tiny_model, LoraSpec(rank=8), work_dir=work, device="cpu", dtype=dtype, **kwargs)
    tokens = backend.tokenizer().encode(" ".join(tiny_corpus(lines=12)[2:5]))
    datum = Datum.from_sequence(tokens, weights=[1.0] * len(tokens))
    for _ in range(2):
        backend.forward_backward([datum], "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=5e-3))
    return backend, backend.save_weights_for_sampler("step-2"), tokens


def scores(engine, tokens: list[int]) -> list[float]:
    return engine.score([ScoreRequest("s", tokens)])[0].logprobs[1:]


def peft_snapshot_model(backend: LocalBackend, path: str):
    """The sampler's snapshot as it would decode through peft's own LoRA layers."""
    shared = {id(t): t for t in list(backend.model.parameters()) + list(backend.model.buffers()) if not t.requires_grad}
    snapshot = copy.deepcopy(backend.peft, memo=shared)
    with torch.no_grad():
        _load_adapter(snapshot, Path(path), backend.lora, backend.lora_alpha)
    return snapshot.get_base_model().eval()


def lora_layers(model) -> list:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_lora_layers_give_peft_outputs_bit_for_bit(tiny_model, tmp_path, dtype):
    backend, path, tokens = trained(tiny_model, tmp_path / "work", dtype)
    sampler = backend.sampler(path)
    assert lora_layers(sampler.model) == []
    frozen = [m for m in sampler.model.modules() if isinstance(m, FrozenLoraLinear)]
    assert len(frozen) == len(lora_layers(backend.model)) > 0
    assert {m.scaling for m in frozen} == {32 / 8}  # the scale is applied, not skipped

    reference = peft_snapshot_model(backend, path)
    peft_layers = {name: m for name, m in reference.named_modules() if m in lora_layers(reference)}
    x = torch.randn(3, 5, backend.model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(backend.dtype)
    for name, layer in sampler.model.named_modules():
        if isinstance(layer, FrozenLoraLinear) and layer.lora_A.in_features == x.shape[-1]:
            with torch.no_grad():
                assert torch.equal(layer(x), peft_layers[name](x)), name

    ids = torch.tensor([tokens])
    with torch.no_grad():
        expected = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), -1)
    expected = expected.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    assert scores(sampler, tokens) == expected


def test_merged_sampler_is_the_saved_weights_in_float32_and_leaves_the_trainer_alone(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend, path, tokens = trained(tiny_model, tmp_path / "work", "bfloat16", sampler_parameters={"merged": True})
    before = {name: (p.dtype, p.data_ptr(), p.detach().clone()) for name, p in backend.model.named_parameters()}
    merged = backend.sampler(path)
    after = {name: (p.dtype, p.data_ptr()) for name, p in backend.model.named_parameters()}
    assert after == {name: value[:2] for name, value in before.items()}
    assert all(torch.equal(p.detach(), before[name][2]) for name, p in backend.model.named_parameters())
    assert lora_layers(merged.model) == []
    assert {p.dtype for p in merged.model.parameters()} == {torch.float32}

    # The reference: the trainer's bf16 base weights in float32 with the saved adapter, through peft.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).float()
    reference = PeftModel.from_pretrained(base, path).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        expected = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
    got = torch.tensor(scores(merged, tokens))
    assert (got - expected).abs().max().item() < 1e-5
    # ... and further from the bf16 LoRA-layer sampler than float32 rounding: it is another evaluation.
    backend.sampler_parameters["merged"] = False
    assert (torch.tensor(scores(backend.sampler(path), tokens)) - expected).abs().max().item() > 1e-4


def test_merged_sampler_of_a_float32_trainer_shares_its_frozen_tensors(tiny_model, tmp_path):
    backend, path, tokens = trained(tiny_model, tmp_path / "work", "float32", sampler_parameters={"merged": True})
    merged = backend.sampler(path)
    embed = merged.model.get_input_embeddings().weight
    assert embed.data_ptr() == backend.model.get_input_embeddings().weight.data_ptr()
    backend.sampler_parameters["merged"] = False
    layered = scores(backend.sampler(path), tokens)
    assert max(abs(a - b) for a, b in zip(scores(merged, tokens), layered)) < 1e-5
    backend.sampler_parameters["unknown"] = 1
    with pytest.raises(Exception, match="batch_size and merged"):
        backend.sampler(path)
