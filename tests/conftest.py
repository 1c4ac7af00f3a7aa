"""Session fixtures: real pieces started once (a tiny model, the local stack: Redis, API, workers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ROOT / "examples" / "data" / "prompts.jsonl"
API_KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="session", autouse=True)
def model_dirs(tmp_path_factory) -> Path:
    """The tests' own model folders live under pytest's temporary root: the operator setting that
    lets jobs load local model folders (SPIDER_MODEL_DIRS) names it, for this process and the
    stack it starts."""
    root = tmp_path_factory.getbasetemp().resolve()
    os.environ["SPIDER_MODEL_DIRS"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~1M-parameter random Llama with a real BPE tokenizer and a ChatML template."""
    from spider.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny model, served as `spider-tiny`; yields its /v1
    base URL. Started once per session, for the engine and the stack tests."""
    from tests.helpers import vllm_server_process

    with vllm_server_process(tiny_model, tmp_path_factory.mktemp("vllm-server"), dtype="float32", max_model_len=512) as url:
        yield url


@dataclass
class FakeTinkerService:
    """The fake Tinker service (tests/fake_tinker.py; the hosted one cannot be reached from here)
    and the hub ids of the two small models it serves, with the key it accepts."""

    server: Any
    key: str
    student: str
    teacher: str


@pytest.fixture(scope="session")
def fake_tinker(tmp_path_factory):
    """Started once; the stack's workers reach it through the operator setting SPIDER_TINKER_BASE_URL.
    Its models answer to hub ids (Spider's model cache), as a Tinker job's model names must."""
    import shutil

    from spider.models import models_dir
    from spider.testing import build_tiny_model
    from tests.fake_tinker import fake_tinker_server

    names = {"student": "spider-tests/tiny-student", "teacher": "spider-tests/tiny-teacher"}
    for seed, name in enumerate(names.values()):
        folder = models_dir() / name
        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_model(folder, seed=seed)
    key = "tml-spider-tests"
    with fake_tinker_server(api_keys=[key], workdir=tmp_path_factory.mktemp("fake-tinker")) as server:
        yield FakeTinkerService(server, key, names["student"], names["teacher"])


@pytest.fixture(scope="session")
def stack(tmp_path_factory, fake_tinker):
    """The local stack, with API keys configured: the same processes as a deployment."""
    from spider.local import LocalStack

    env = {
        "SPIDER_TINKER_BASE_URL": fake_tinker.server.url,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "SPIDER_VISIBILITY_TIMEOUT": "20",
        # The tests' OpenAI-compatible vLLM server listens on loopback: the operator allows that host.
        "SPIDER_ALLOWED_HOSTS": "127.0.0.1",
    }
    log_dir = tmp_path_factory.mktemp("stack-logs")
    with LocalStack(api_keys=API_KEYS, env=env, log_dir=log_dir) as running:
        yield running


@pytest.fixture(scope="session")
def firejail() -> str:
    """The firejail executable; every test that runs user code in a jail requests it (see
    tests.helpers.require_firejail: skipped without firejail, failed when it is required)."""
    from tests.helpers import require_firejail

    return require_firejail()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private Redis server for tests that use Redis without the whole stack."""
    from spider.local import start_redis

    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait()
