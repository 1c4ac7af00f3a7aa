"""The one chat renderer: engines sample from the very ids the aligner scores, with one BOS rule."""

from __future__ import annotations

import copy

import pytest

import tokenizers_offline as offline
from spider.align import render_prompt, teacher_inputs_for_completion
from spider.chat import Renderer, TemplateError
from spider.engines import SamplingParams
from spider.types import Message

CONVERSATION = [Message("system", "Be brief."), Message("user", "Name a city in France.")]
NO_BOS_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """A tiny random Llama whose tokenizer adds BOS (the SentencePiece Llama tokenizer from
    mistral_common, 32000 pieces) and whose template does not write one."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = copy.deepcopy(offline.llama_sp())
    tokenizer.chat_template = NO_BOS_TEMPLATE
    path = tmp_path_factory.mktemp("bos-model") / "llama-sp-tiny"
    tokenizer.save_pretrained(str(path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(path))
    return path, tokenizer


def test_a_bos_tokenizer_samples_and_scores_on_the_same_ids(bos_model):
    from spider.engines.hf_engine import HFEngine

    path, tokenizer = bos_model
    renderer = Renderer(tokenizer)
    assert renderer.adds_bos and "<s>" not in renderer.render_text(CONVERSATION)
    assert offline.llama_sp()("x", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
    engine = HFEngine(str(path), {"dtype": "float32"})
    try:
        result = engine.generate([_request()], SamplingParams(temperature=1.0, max_tokens=6))[0]
    finally:
        engine.close()
    completion = result.completions[0]
    scored = render_prompt(tokenizer, CONVERSATION).ids
    assert completion.prompt_ids == scored
    assert scored[0] == tokenizer.bos_token_id and scored[1] != tokenizer.bos_token_id
    teacher = teacher_inputs_for_completion(CONVERSATION, completion.token_ids, tokenizer, tokenizer)
    assert teacher.input_ids[: teacher.completion_start] == completion.prompt_ids


def test_bos_is_never_doubled_when_the_template_writes_it(bos_model):
    _, tokenizer = bos_model
    writes_bos = "{{ bos_token }}" + "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    ids = Renderer(tokenizer, chat_template=writes_bos).render(CONVERSATION).ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_stop_tokens_and_prefix_preservation(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    renderer = Renderer(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer.end_of_turn_id == end and end in renderer.stop_token_ids
    assert renderer.is_prefix_preserving()
    # A template that drops the text of earlier assistant turns (as reasoning templates drop past
    # thinking) is detected, not silently trusted.
    forgetful = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|im_start|>assistant\n<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert not Renderer(tokenizer, chat_template=forgetful).is_prefix_preserving()
    with pytest.raises(TemplateError, match="no chat template"):
        bare = AutoTokenizer.from_pretrained(str(tiny_model))
        bare.chat_template = None
        Renderer(bare).render(CONVERSATION)


def _request():
    from spider.engines import GenerationRequest

    return GenerationRequest("q", list(CONVERSATION), seed=3)
