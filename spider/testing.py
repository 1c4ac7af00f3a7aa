"""Builders of tiny, real models for tests: a random Llama-style causal LM with a trained BPE tokenizer.

The folder `build_tiny_model` writes is an ordinary Hugging Face model folder (config, safetensors,
tokenizer with a ChatML chat template, generation config) that transformers, vLLM's `LLM` and vLLM's
OpenAI server all load. It builds in about a second, so every test can own a fast engine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TINY_CHAT_TEMPLATE = (
    # ChatML with Hermes-style tool calls: tools are listed in the system turn, calls are
    # `<tool_call>{json}</tool_call>` in assistant turns, results come back as `tool` turns.
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "You may call these tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if not loop.first %}<|im_start|>system\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "<tool_call>{\"name\": {{ fn.name | tojson }}, \"arguments\": "
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>tool\n{{ message.content }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CONTEXT = 1024

_SUBJECTS = ["the teacher", "a student", "the model", "my friend", "the river", "a small cat", "the city",
             "our team", "the engine", "a spider", "the old library", "every worker"]
_VERBS = ["writes", "reads", "builds", "answers", "finds", "moves", "watches", "counts", "sends", "learns"]
_OBJECTS = ["a long letter", "the answer", "three questions", "the capital of France", "a quiet song",
            "twenty-one tokens", "the last batch", "a web of threads", "the weather report", "some code"]
_TAILS = ["today.", "before noon.", "with care.", "again and again.", "in Paris.", "on Monday.",
          "for the job.", "without a sound.", "at 10:45 pm.", "— quickly!", "(see page 42).", "?"]
_EXTRA = [
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "Café, naïve, façade, Zürich, São Paulo, 東京, Привет мир, 😀 emojis too.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2**10 = 1024",
    "<tool_call> </tool_call> user assistant system tool",
]


_SYLLABLES = ["ka", "lo", "min", "tra", "vel", "so", "ne", "ri", "dun", "pha", "qui", "ex", "zo", "bel",
              "mor", "ta", "gri", "on", "us", "ly", "ste", "wa", "ch", "pe"]


def tiny_corpus(lines: int = 3000) -> list[str]:
    """A fixed corpus (the same on every machine) to train the tiny tokenizer on: English-like
    sentences, made-up words (so BPE finds enough merges), code, JSON and non-ASCII text."""
    rng = random.Random(1234)
    text = []
    for _ in range(lines):
        made_up = " ".join("".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(3))
        text.append(
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_TAILS)} {made_up.capitalize()}."
        )
    return text + _EXTRA * 20


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `tiny_corpus()` and save it (ChatML template) under `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=TINY_CONTEXT,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(path))
    return fast


def build_tiny_model(path: str | Path, vocab_size: int = 1024, seed: int = 0, tokenizer: Any = None) -> Path:
    """Write a tiny random Llama-style causal LM (~0.75 M parameters, 2 layers) to `path`.

    Same `seed`, same files. The model's vocabulary is the tokenizer's actual size (at most
    `vocab_size`), so every id the model can sample decodes. Weights are float32, so greedy outputs
    agree across transformers and vLLM. eos is `<|im_end|>`, pad is `<|endoftext|>`.

    `tokenizer` (a tokenizer object or folder, e.g. a real model's) replaces the trained BPE: the
    model then has that tokenizer's vocabulary, chat template, eos and pad tokens.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(path, vocab_size=vocab_size)
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    else:
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(str(path))
        eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=TINY_CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(str(path))
    (path / "spider_tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab_size}) + "\n")
    return path


def build_truncated_model(source: str | Path, path: str | Path, layers: int) -> Path:
    """Write the first `layers` decoder layers of the model at `source` (with its embeddings, final
    norm, head and tokenizer) to `path`: a smaller student of the same family and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype="float32")
    if not 1 <= layers <= model.config.num_hidden_layers:
        raise ValueError(f"layers must be between 1 and {model.config.num_hidden_layers}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(path))
    return path
