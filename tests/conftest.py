"""Session fixtures: real pieces started once (a tiny model, the local stack: Redis, API, workers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ROOT / "examples" / "data" / "prompts.jsonl"
API_KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~1M-parameter random Llama with a real BPE tokenizer and a ChatML template."""
    from spider.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The local stack, with API keys configured: the same processes as a deployment."""
    from spider.local import LocalStack

    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "SPIDER_VISIBILITY_TIMEOUT": "20",
    }
    log_dir = tmp_path_factory.mktemp("stack-logs")
    with LocalStack(api_keys=API_KEYS, env=env, log_dir=log_dir) as running:
        yield running
