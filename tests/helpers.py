"""Small helpers shared by the stack tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spider.config import AppConfig, apply_override

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ROOT / "examples" / "data" / "prompts.jsonl"


def make_config(url: str, api_key: str | None, model: str | Path, provider: str = "hf", **overrides: Any) -> AppConfig:
    """A dataset job on the sample prompts; `overrides` are dotted keys under `job`."""
    data: dict[str, Any] = {
        "server": {"base_url": url, "api_key": api_key, "request_timeout": 60},
        "job": {
            "model": {"provider": provider, "name": str(model), "parameters": {}},
            "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:6]", "field": "question"},
            "generation": {"parameters": {"temperature": 0.8, "max_tokens": 16, "seed": 7}, "max_batch_size": 4},
        },
    }
    for key, value in overrides.items():
        apply_override(data["job"], key, value)
    return AppConfig.parse(data)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
