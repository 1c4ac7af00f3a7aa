"""The job schema: the shapes users write load, bad ones fail naming the key and a fix."""

from __future__ import annotations

import textwrap

import pytest

from spider.config import AppConfig, JobConfig
from spider.errors import ConfigError

OFF_POLICY = """
server:
  base_url:
  api_key:
  request_timeout: 120
job:
  model:
    provider: vllm
    name: "Qwen/Qwen2.5-7B-Instruct"
    parameters:
      tensor_parallel_size: 4
  source:
    dataset: "RiddleHe/OpenCodeReasoning-2-questions-dedup-34k-sample-1024"
    split: "train[0:10]"
    field: "question"
  generation:
    parameters:
      temperature: 0.7
      top_p: 0.9
      max_tokens: 8196
  output:
    mode: "upload_hf"
    hf:
      repo_id: collinear-ai/spider-rollouts-qwen2.5-7b-instruct-ocr2-ast-filter
      repo_type: "dataset"
      private: false
"""

ON_POLICY = """
server:
  base_url:
  api_key:
  request_timeout: 180
job:
  model:
    provider: tinker
    name: "Qwen/Qwen3-8B"
  source:
    dataset: "RiddleHe/OpenCodeReasoning-2-questions-dedup-34k-sample-1024"
    split: "train[0:8]"
    field: "question"
  generation:
    on_policy: true
    on_policy_options:
      teacher: "Qwen/Qwen3-30B-A3B"
      api_key:
      learning_rate: 5e-5
      groups_per_batch: 4
      group_size: 2
      max_tokens: 1024
      lora_rank: 16
      num_substeps: 1
      kl_penalty_coef: 0.1
      kl_discount_factor: 0.0
      loss_fn: "importance_sampling"
      compute_post_kl: true
      eval_every: 5
      save_every: 20
  output:
    mode: "upload_hf"
    hf:
      repo_id: RiddleHe/qwen3-8B-on-policy-distill-teacher-qwen3-30B-A3B-OCR2-8-examples
      repo_type: "model"
      private: false
"""


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_brief_configs_load(tmp_path):
    off = AppConfig.load(write(tmp_path, OFF_POLICY))
    assert off.job.model.parameters == {"tensor_parallel_size": 4}
    assert off.job.generation.parameters.max_tokens == 8196
    assert off.job.output.hf.repo_type == "dataset"
    assert off.server.base_url is None
    on = AppConfig.load(write(tmp_path, ON_POLICY))
    assert on.job.generation.on_policy_options.learning_rate == 5e-5
    assert on.job.generation.on_policy_options.loss_fn == "importance_sampling"


# The configs the repository ships, and what each must say.
SHIPPED_CONFIGS = {
    name: {"provider": "vllm", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": "examples/data/prompts.jsonl"}
    for name in ("quickstart.yaml", "tool_calling.yaml", "simulated_user.yaml", "prompt_variations.yaml")
}
SHIPPED_CONFIGS["on_policy.yaml"] = {"provider": "hf", "model": "spider/tiny-random-chat",
                                     "dataset": "examples/data/prompts.jsonl"}


def test_the_shipped_configs_exist_and_load():
    from pathlib import Path

    folder = Path(__file__).parent.parent / "configs"
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(SHIPPED_CONFIGS)
    for name, expected in SHIPPED_CONFIGS.items():
        config = AppConfig.load(folder / name)
        assert config.job.model.provider == expected["provider"]
        assert config.job.model.name == expected["model"]
        assert config.job.source.dataset == expected["dataset"]
        assert (folder.parent / config.job.source.dataset).exists()


@pytest.mark.parametrize(
    "path, bad_key, hint",
    [
        ("job.generation", "temprature", "parameters.temperature"),
        ("job.generation", "xyzzy", None),
        ("job.generation.parameters", "temprature", "temperature"),
        ("job.source", "feild", "field"),
        ("job.generation.on_policy_options", "lora_rnak", "lora_rank"),
        ("job", "sourse", "source"),
        ("server", "base_ulr", "base_url"),
    ],
)
def test_unknown_keys_name_the_path_and_suggest(tmp_path, path, bad_key, hint):
    config = AppConfig.load(write(tmp_path, ON_POLICY)).model_dump(mode="json")
    target = config
    for part in path.split("."):
        target = target[part]
    target[bad_key] = 1
    with pytest.raises(ConfigError) as info:
        AppConfig.parse(config)
    message = str(info.value)
    assert f"{path}.{bad_key}: unknown key" in message
    if hint:
        assert f"did you mean {hint!r}" in message
    else:
        assert "valid keys here" in message


def test_invalid_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"job.generation.parameters.top_p"):
        JobConfig.parse({"model": {"name": "m"}, "source": {"dataset": "d"}, "generation": {"parameters": {"top_p": 2}}})
    with pytest.raises(ConfigError, match=r"job.source.split: .*not a split"):
        JobConfig.parse({"model": {"name": "m"}, "source": {"dataset": "d", "split": "train[0:10"}})
    with pytest.raises(ConfigError, match=r"job.model: Field required"):
        JobConfig.parse({"source": {"dataset": "d"}})
    with pytest.raises(ConfigError, match=r"upload_hf' needs an `hf` section"):
        JobConfig.parse({"model": {"name": "m"}, "source": {"dataset": "d"}, "output": {"mode": "upload_hf"}})
    with pytest.raises(ConfigError, match=r"job.generation.duplications"):
        JobConfig.parse({"model": {"name": "m"}, "source": {"dataset": "d"}, "generation": {"duplications": 0}})


def test_overrides_merge_dotted_keys(tmp_path):
    config = AppConfig.load(
        write(tmp_path, OFF_POLICY),
        overrides={"job.source.split": "train[0:3]", "job.generation": {"duplications": 4}, "server.base_url": "http://x"},
    )
    assert config.job.source.split == "train[0:3]"
    assert config.job.generation.duplications == 4
    assert config.job.generation.parameters.temperature == 0.7  # merged, not replaced
    assert config.server.base_url == "http://x"


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        AppConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        AppConfig.load(write(tmp_path, "job: [unclosed"))
