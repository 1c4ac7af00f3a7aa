"""What a training run hands over: a PEFT adapter folder that `peft.PeftModel.from_pretrained`
loads on the base model (with the student's tokenizer, chat template and a model card), or the
adapter merged into the base weights as an ordinary model folder.

Both start from an adapter folder: what `save_weights_for_sampler` returns on the local backend
(or `save_state`'s, whose `weights/` holds one), or a PEFT adapter downloaded from elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any,
    model_card: str,
    base_model: str | None = None,
) -> Path:
    """Write `out_dir`: the adapter's `adapter_config.json` and `adapter_model.safetensors`, the
    tokenizer's files with its chat template, and `README.md` holding `model_card` (under a
    Hub metadata header naming the base model, unless the card brings its own).

    `tokenizer` is a tokenizer object or a folder to load one from. `base_model` is recorded as
    the adapter's `base_model_name_or_path` (e.g. the hub id, where training ran on a local copy);
    without it the adapter keeps the one it was saved with.
    """
    source = _adapter_folder(adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / ADAPTER_CONFIG).read_text())
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(source / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)

    tokenizer = _tokenizer(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: export the student's own tokenizer, which carries it")
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(_card(model_card, config.get("base_model_name_or_path"), config))
    return out


def merge_adapter(
    base_model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: Any = None
) -> Path:
    """Write `out_dir`: the base model with the adapter folded into its weights (safetensors,
    config, generation config) and the tokenizer, from the adapter folder when it has one, else
    from the base. `dtype` (default: the base model's own) is the merged weights' precision."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _adapter_folder(adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=dtype if dtype is not None else "auto")
    # Folding in fp32 and casting once keeps a bf16 base from rounding twice.
    target_dtype = base.dtype
    merged = PeftModel.from_pretrained(base.to(torch.float32), str(source)).merge_and_unload()
    merged.to(target_dtype).save_pretrained(str(out))
    tokenizer_dir = source if (source / "tokenizer_config.json").is_file() else Path(base_model_dir)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def _adapter_folder(path: str | Path) -> Path:
    folder = Path(path)
    if (folder / "weights" / ADAPTER_CONFIG).is_file():  # a save_state folder
        folder = folder / "weights"
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        if (folder / "config.json").is_file():
            raise ValueError(
                f"{str(folder)!r} holds whole model weights (a full fine-tune), not a LoRA adapter: "
                "it is already a model folder to publish as it is"
            )
        raise ValueError(f"{str(folder)!r} is not a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    return folder


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _card(text: str, base_model: str | None, config: dict[str, Any]) -> str:
    if text.lstrip().startswith("---"):
        return text if text.endswith("\n") else text + "\n"
    header = ["---", "library_name: peft", "pipeline_tag: text-generation", "tags:", "- lora", "- distillation"]
    if base_model:
        header.insert(1, f"base_model: {json.dumps(base_model)}")
    header.append("---")
    facts = f"LoRA rank {config.get('r')}, alpha {config.get('lora_alpha')}."
    return "\n".join(header) + "\n\n" + text.rstrip() + "\n\n" + facts + "\n"
