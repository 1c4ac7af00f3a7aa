"""The on-policy job's config: the brief's YAML and what it means, every option's bounds, the
cross-field refusals, the submit-time checks of the teacher, the Tinker key and checkpoints, and
the key's way from the client's config into the job's secrets (never stored in the config, never
shown back) through a real API server."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from fastapi import HTTPException

from spider.api.submission import parse_submission
from spider.client.client import SpiderClient, job_and_secrets
from spider.config import TINKER_KEY_SECRET, AppConfig, JobConfig, OnPolicyOptions, apply_override
from spider.errors import ConfigError, SpiderError
from spider.jobs.admission import admit
from spider.policy import Policy
from spider.settings import Settings
from tests.conftest import API_KEYS
from tests.helpers import SAMPLE_PROMPTS, api_process
from tests.test_config import ON_POLICY

OPTIONS = "job.generation.on_policy_options"
TINKER_KEY = "tml-test-key-4b1d9e0c7a"


def brief_job() -> dict[str, Any]:
    """The brief's on-policy job, as the mapping its YAML reads to."""
    return yaml.safe_load(ON_POLICY)["job"]


def local_job(**overrides: Any) -> dict[str, Any]:
    """An on-policy job on the local backend: an hf student on the sample prompts, an hf teacher."""
    job = {
        "model": {"provider": "hf", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:6]", "field": "question"},
        "generation": {"on_policy": True, "on_policy_options": {"teacher": "HuggingFaceTB/SmolLM2-360M-Instruct"}},
    }
    for key, value in overrides.items():
        apply_override(job, key, value)
    return job


def options_of(job: dict[str, Any]) -> OnPolicyOptions:
    return JobConfig.parse(job).generation.on_policy_options


def refused(job: dict[str, Any], *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        JobConfig.parse(job)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# -- what the brief's config means ------------------------------------------------------------------


def test_the_brief_config_means_a_tinker_student_and_a_tinker_teacher(tmp_path):
    path = tmp_path / "on-policy.yaml"
    path.write_text(ON_POLICY)
    config = AppConfig.load(path)
    options = config.job.generation.on_policy_options
    assert options.backend == options.resolved_backend == "tinker"
    assert options.teacher.provider == "tinker" and options.teacher.name == "Qwen/Qwen3-30B-A3B"
    assert options.teacher_in_process is True  # scoring on Tinker needs no rollout worker
    assert options.uses_tinker
    assert options.api_key is None  # `api_key:` left empty in the YAML
    written = {
        "learning_rate": 5e-5, "groups_per_batch": 4, "group_size": 2, "max_tokens": 1024, "lora_rank": 16,
        "num_substeps": 1, "kl_penalty_coef": 0.1, "kl_discount_factor": 0.0, "loss_fn": "importance_sampling",
        "compute_post_kl": True, "eval_every": 5, "save_every": 20,
    }
    assert {name: getattr(options, name) for name in written} == written
    assert options.eval_rows == 4  # eval_every asks for held-out prompts: one batch of them
    assert options.loss_fn_config() is None
    assert config.job.output.hf.repo_type == "model"
    # What the client sends parses to the same job on the server.
    assert JobConfig.parse(config.job.model_dump(mode="json")) == config.job


@pytest.mark.parametrize(
    "student, written, expected",
    [
        ("hf", {"teacher": "org/teacher"}, ("local", "hf", True)),
        ("vllm", {"teacher": "org/teacher"}, ("local", "vllm", True)),
        ("vllm", {"teacher": {"name": "org/teacher", "provider": "openai",
                              "parameters": {"base_url": "https://api.example.com/v1"}}}, ("local", "openai", True)),
        ("vllm", {"teacher": "org/teacher", "teacher_in_process": False}, ("local", "vllm", False)),
        ("tinker", {"teacher": "org/teacher"}, ("tinker", "tinker", True)),
        ("tinker", {"teacher": {"name": "org/teacher", "provider": "vllm"}}, ("tinker", "vllm", False)),
        ("tinker", {"teacher": {"name": "org/teacher", "provider": "hf"}, "teacher_in_process": True},
         ("tinker", "hf", True)),
        ("hf", {"teacher": {"name": "org/teacher", "provider": "tinker"}}, ("local", "tinker", True)),
    ],
)
def test_backend_teacher_provider_and_scoring_place_default_from_the_student(student, written, expected):
    job = local_job(**{"model.provider": student, "model.name": "org/student"})
    job["generation"]["on_policy_options"] = written
    options = options_of(job)
    assert (options.backend, options.teacher.provider, options.teacher_in_process) == expected


def test_teacher_parameters_are_checked_against_its_resolved_provider():
    job = local_job(**{f"generation.on_policy_options.teacher": {"name": "org/teacher", "parameters": {"device": "cpu"}}})
    assert options_of(job).teacher.parameters == {"device": "cpu"}  # hf parameters for the hf student's teacher
    job = local_job(**{"generation.on_policy_options.teacher": {"name": "org/t", "parameters": {"tensor_parallel_size": 2}}})
    refused(job, f"{OPTIONS}.teacher.parameters", "not accepted by provider 'hf'")
    job = local_job(**{"generation.on_policy_options.teacher": {"name": "org/t", "provider": "tgi"}})
    refused(job, f"{OPTIONS}.teacher.provider")


def test_a_parsed_option_set_built_in_python_resolves_like_yaml():
    student = {"provider": "tinker", "name": "Qwen/Qwen3-8B"}
    options = OnPolicyOptions(teacher="Qwen/Qwen3-32B")
    job = JobConfig(model=student, source={"dataset": "d"}, generation={"on_policy": True, "on_policy_options": options})
    assert job.generation.on_policy_options.teacher.provider == "tinker"
    assert job.generation.on_policy_options.backend == "tinker"


# -- every option has bounds, and every valid value is kept -----------------------------------------

BAD_VALUES = [
    ("teacher", ""), ("teacher", {"provider": "hf"}), ("backend", "gpu"), ("student_checkpoint", ""),
    ("learning_rate", 0), ("learning_rate", 2), ("lr_schedule", "exponential"), ("warmup_steps", -1),
    ("groups_per_batch", 0), ("group_size", 0), ("max_tokens", 0), ("temperature", 0), ("lora_rank", -1),
    ("lora_alpha", 0), ("lora_target_modules", []), ("lora_target_modules", ["q_proj", "a b"]), ("num_substeps", 0),
    ("kl_penalty_coef", 0), ("kl_discount_factor", 1.5), ("loss_fn", "cross_entropy"), ("ppo_clip_low", 1.0),
    ("ppo_clip_high", 1.0), ("max_grad_norm", -1), ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_eps", 0),
    ("weight_decay", -0.1), ("eval_every", -1), ("eval_rows", -1), ("save_every", -1), ("max_steps", 0),
    ("max_train_tokens", 0), ("steps_per_task", 0), ("steps_per_task", 65), ("teacher_in_process", "maybe"),
    ("merge_weights", "yes please"), ("seed", -1), ("compute_post_kl", "sometimes"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_a_bad_value_of_any_option_names_it(field, value):
    refused(local_job(**{f"generation.on_policy_options.{field}": value}), f"{OPTIONS}.{field}")


def test_every_option_keeps_the_value_it_was_given(tmp_path):
    given = {
        "teacher": {"name": "org/teacher", "provider": "vllm", "parameters": {"max_model_len": 4096}},
        "backend": "local", "student_checkpoint": str(tmp_path / "adapter"), "api_key": None,
        "learning_rate": 3e-4, "lr_schedule": "cosine", "warmup_steps": 5, "groups_per_batch": 8, "group_size": 3,
        "max_tokens": 256, "temperature": 0.9, "lora_rank": 8, "lora_alpha": 16.0,
        "lora_target_modules": ["q_proj", "v_proj"], "num_substeps": 2, "kl_penalty_coef": 0.5,
        "kl_discount_factor": 0.9, "loss_fn": "ppo", "ppo_clip_low": 0.7, "ppo_clip_high": 1.3, "max_grad_norm": 1.0,
        "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_eps": 1e-8, "weight_decay": 0.01, "compute_post_kl": True,
        "eval_every": 3, "eval_rows": 2, "save_every": 0, "max_steps": 7, "max_train_tokens": 100_000,
        "steps_per_task": 2, "teacher_in_process": False, "merge_weights": True, "seed": 42,
    }
    assert set(given) == set(OnPolicyOptions.model_fields)  # every option is exercised here
    options = options_of(local_job(**{"generation.on_policy_options": given}))
    dumped = options.model_dump(mode="json")
    assert dumped == given
    assert options.loss_fn_config() == {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}


def test_left_out_options_take_the_recipes_defaults():
    options = options_of(local_job())
    assert (options.learning_rate, options.group_size, options.max_tokens, options.temperature) == (1e-4, 4, 4096, 1.0)
    assert (options.kl_penalty_coef, options.kl_discount_factor, options.loss_fn) == (1.0, 0.0, "importance_sampling")
    assert (options.lora_rank, options.num_substeps, options.save_every, options.eval_every) == (32, 1, 20, 0)
    assert (options.adam_beta1, options.adam_beta2, options.adam_eps, options.max_grad_norm) == (0.9, 0.95, 1e-12, 0.0)
    assert options.eval_rows == 0 and options.max_steps is None and options.max_train_tokens is None
    assert options.steps_per_task == 4 and options.seed == 0


@pytest.mark.parametrize(
    "overrides, rows",
    [({"eval_every": 5}, 32), ({"eval_every": 5, "groups_per_batch": 6}, 6), ({"eval_every": 5, "eval_rows": 9}, 9),
     ({"eval_every": 0}, 0)],
)
def test_held_out_rows_follow_the_evaluation_setting(overrides, rows):
    job = local_job(**{f"generation.on_policy_options.{k}": v for k, v in overrides.items()})
    assert options_of(job).eval_rows == rows


def test_the_did_you_mean_hint_reaches_the_options():
    refused(local_job(**{"generation.on_policy_options.kl_penalty": 1.0}),
            f"{OPTIONS}.kl_penalty: unknown key", "did you mean 'kl_penalty_coef'")


# -- cross-field refusals ------------------------------------------------------------------------

CROSS_FIELD = {
    "more substeps than groups": ({"generation.on_policy_options.groups_per_batch": 2,
                                   "generation.on_policy_options.num_substeps": 3}, "each substep needs at least one group"),
    "clip bounds without ppo": ({"generation.on_policy_options.ppo_clip_high": 1.5}, "ppo_clip_high bounds the ratio"),
    "lora_alpha with full fine-tuning": ({"generation.on_policy_options.lora_rank": 0,
                                          "generation.on_policy_options.lora_alpha": 16}, "lora_rank 0 trains every weight"),
    "target modules with full fine-tuning": ({"generation.on_policy_options.lora_rank": 0,
                                              "generation.on_policy_options.lora_target_modules": ["q_proj"]},
                                             "lora_target_modules shapes a LoRA adapter"),
    "merging full fine-tuning": ({"generation.on_policy_options.lora_rank": 0,
                                  "generation.on_policy_options.merge_weights": True}, "merge_weights merges an adapter"),
    "an adapter checkpoint with full fine-tuning": ({"generation.on_policy_options.lora_rank": 0,
                                                     "generation.on_policy_options.student_checkpoint": "/models/a"},
                                                    "merge the adapter into a model folder"),
    "held-out rows without evaluation": ({"generation.on_policy_options.eval_rows": 4}, "eval_every: 0 turns off"),
    "a tinker path on the local backend": ({"generation.on_policy_options.student_checkpoint": "tinker://run/weights/1"},
                                           "needs backend tinker"),
    "local backend, tinker student": ({"model.provider": "tinker", "generation.on_policy_options.backend": "local"},
                                      "hf or vllm (not 'tinker')"),
    "local backend, endpoint student": ({"model.provider": "openai"}, "hf or vllm (not 'openai')"),
    "tinker backend, hf student": ({"generation.on_policy_options.backend": "tinker"}, "set model.provider: tinker"),
    "answers longer than the student's context": ({"model.provider": "vllm", "model.parameters": {"max_model_len": 2048}},
                                                  "model.parameters.max_model_len (2048)"),
    "answers longer than the teacher's context": (
        {"generation.on_policy_options.max_tokens": 1024,
         "generation.on_policy_options.teacher": {"name": "org/t", "provider": "vllm", "parameters": {"max_model_len": 1024}}},
        "teacher.parameters.max_model_len (1024)"),
    "duplications": ({"generation.duplications": 2}, "group_size is the number of samples per prompt"),
    "dataset sampling temperature": ({"generation.parameters.temperature": 0.7}, "use on_policy_options.temperature"),
    "dataset top_p": ({"generation.parameters.top_p": 0.9}, "which has no top_p"),
    "return_tokens": ({"generation.return_tokens": True}, "an on-policy job writes no records"),
    "max_batch_size": ({"generation.max_batch_size": 8}, "on_policy_options.groups_per_batch prompts"),
    "a dataset upload": ({"output": {"mode": "upload_hf", "hf": {"repo_id": "me/x", "repo_type": "dataset"}}},
                         "output.hf.repo_type must be 'model'"),
    "an upload's dataset config": ({"output": {"mode": "upload_hf", "hf": {"repo_id": "me/x", "repo_type": "model",
                                                                           "config_name": "c"}}}, "output.hf.config_name"),
    "a dataset format": ({"output.format": "parquet"}, "output.format is a dataset's"),
    "options without on_policy": ({"generation.on_policy": False}, "on_policy is false"),
}


@pytest.mark.parametrize("case", list(CROSS_FIELD))
def test_fields_that_contradict_each_other_are_refused(case):
    overrides, needle = CROSS_FIELD[case]
    refused(local_job(**overrides), needle)


TINKER_CROSS_FIELD = {
    "full fine-tuning": ({"lora_rank": 0}, "runs on the local backend only"),
    "lora_alpha": ({"lora_alpha": 64}, "Tinker scales every adapter by 32"),
    "target modules": ({"lora_target_modules": ["q_proj"]}, "Tinker chooses the adapter's modules itself"),
    "a local checkpoint": ({"student_checkpoint": "/models/adapter"}, "a tinker:// path"),
}


@pytest.mark.parametrize("case", list(TINKER_CROSS_FIELD))
def test_local_only_options_are_refused_on_tinker(case):
    changes, needle = TINKER_CROSS_FIELD[case]
    job = brief_job()
    job["generation"]["on_policy_options"].update(changes)
    refused(job, needle)


def test_valid_combinations_are_accepted():
    options = options_of(local_job(**{"generation.on_policy_options.loss_fn": "ppo",
                                      "generation.on_policy_options.ppo_clip_low": 0.9}))
    assert options.loss_fn_config() == {"clip_low_threshold": 0.9, "clip_high_threshold": 1.2}
    assert options_of(local_job(**{"generation.on_policy_options.lora_rank": 0})).lora_rank == 0
    job = brief_job()
    job["generation"]["on_policy_options"]["student_checkpoint"] = "tinker://run-1:train:0/weights/final"
    assert options_of(job).student_checkpoint.startswith("tinker://")
    assert JobConfig.parse(local_job(**{"generation.on_policy_options.num_substeps": 4,
                                        "generation.on_policy_options.groups_per_batch": 4}))
    with pytest.raises(ConfigError, match="on_policy: true needs on_policy_options"):
        JobConfig.parse(local_job(**{"generation": {"on_policy": True, "on_policy_options": None}}))


# -- admission: the teacher is a model like any other ----------------------------------------------


def admitted(job: dict[str, Any], policy: Policy, secrets: list[str] | None = None) -> str | None:
    """None when the policy admits the job, else the refusal."""
    try:
        admit(JobConfig.parse(job), policy, source_files=["prompts.jsonl"], secret_names=secrets or [])
    except ConfigError as exc:
        return str(exc)
    return None


def test_a_local_teacher_folder_must_be_inside_the_operators_model_dirs(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    job = local_job(**{"generation.on_policy_options.teacher": str(folder)})
    refusal = admitted(job, Policy(model_dirs=(tmp_path / "elsewhere",)))
    assert f"{OPTIONS}.teacher.name" in refusal and "SPIDER_MODEL_DIRS" in refusal
    assert admitted(job, Policy(model_dirs=(tmp_path.resolve(),))) is None


def test_the_teachers_remote_code_endpoint_host_and_key_are_checked():
    remote_code = local_job(**{"generation.on_policy_options.teacher": {
        "name": "org/t", "provider": "vllm", "parameters": {"trust_remote_code": True}}})
    assert "teacher.parameters.trust_remote_code" in admitted(remote_code, Policy())
    assert admitted(remote_code, Policy(allow_remote_code=True)) is None

    endpoint = local_job(**{"generation.on_policy_options.teacher": {
        "name": "org/t", "provider": "openai", "parameters": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "TEACHER_KEY"}}})
    refusal = admitted(endpoint, Policy(), ["TEACHER_KEY"])
    assert "teacher.parameters.base_url" in refusal
    refusal = admitted(endpoint, Policy(allowed_hosts=("127.0.0.1",)))
    assert "teacher.parameters.api_key_env" in refusal and "base_url" not in refusal
    assert admitted(endpoint, Policy(allowed_hosts=("127.0.0.1",)), ["TEACHER_KEY"]) is None


def test_a_job_on_tinker_needs_the_tinker_key_among_its_secrets():
    refusal = admitted(brief_job(), Policy())
    assert TINKER_KEY_SECRET in refusal and "on_policy_options.api_key" in refusal
    assert admitted(brief_job(), Policy(), [TINKER_KEY_SECRET]) is None
    tinker_teacher = local_job(**{"generation.on_policy_options.teacher": {"name": "Qwen/Qwen3-32B", "provider": "tinker"}})
    assert TINKER_KEY_SECRET in admitted(tinker_teacher, Policy())
    assert admitted(local_job(), Policy()) is None  # no Tinker, no key needed


def test_tinker_models_are_hub_ids(tmp_path):
    job = brief_job()
    job["model"]["name"] = str(tmp_path)
    assert "Tinker serves models by their hub id" in admitted(job, Policy(model_dirs=(tmp_path,)), [TINKER_KEY_SECRET])


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A real PEFT adapter (rank 8) of the tiny model, in the tests' model directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    folder = tmp_path_factory.mktemp("adapters") / "tiny-r8"
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(folder))
    return folder


def test_a_local_checkpoint_is_an_allowed_adapter_of_the_trained_rank(adapter, tiny_model, model_dirs, tmp_path):
    policy = Policy(model_dirs=(model_dirs,))

    def checkpoint(path: str, rank: int = 8) -> dict[str, Any]:
        return local_job(**{"model.name": str(tiny_model), "generation.on_policy_options.student_checkpoint": path,
                            "generation.on_policy_options.lora_rank": rank})

    where = f"{OPTIONS}.student_checkpoint"
    assert admitted(checkpoint(str(adapter)), policy) is None
    assert "set lora_rank: 8" in admitted(checkpoint(str(adapter), rank=16), policy)
    assert "SPIDER_MODEL_DIRS" in admitted(checkpoint(str(adapter)), Policy(model_dirs=(tmp_path / "other",)))
    assert "absolute path" in admitted(checkpoint("adapters/tiny-r8"), policy)
    assert "no adapter_config.json" in admitted(checkpoint(str(tiny_model)), policy)
    assert where in admitted(checkpoint(str(adapter.parent / "missing")), policy)


# -- the Tinker key: moved by the client, refused in a config, never shown --------------------------


def test_the_client_moves_the_key_from_the_config_into_the_secrets(monkeypatch):
    monkeypatch.delenv(TINKER_KEY_SECRET, raising=False)
    job = brief_job()
    job["generation"]["on_policy_options"]["api_key"] = TINKER_KEY
    body, secrets = job_and_secrets(JobConfig.parse(job), {"HF_TOKEN": "hf-x"})
    assert body["generation"]["on_policy_options"]["api_key"] is None
    assert TINKER_KEY not in json.dumps(body)
    assert secrets == {"HF_TOKEN": "hf-x", TINKER_KEY_SECRET: TINKER_KEY}
    _, secrets = job_and_secrets(JobConfig.parse(job), {TINKER_KEY_SECRET: TINKER_KEY})
    assert secrets == {TINKER_KEY_SECRET: TINKER_KEY}
    with pytest.raises(SpiderError, match="two different Tinker keys"):
        job_and_secrets(JobConfig.parse(job), {TINKER_KEY_SECRET: "tml-another"})


def test_the_key_in_a_config_is_never_shown_by_its_repr_or_dump():
    job = brief_job()
    job["generation"]["on_policy_options"]["api_key"] = TINKER_KEY
    config = JobConfig.parse(job)
    assert config.generation.on_policy_options.tinker_key == TINKER_KEY
    for shown in (repr(config), str(config), json.dumps(config.model_dump(mode="json")), config.model_dump_json()):
        assert TINKER_KEY not in shown


def test_an_empty_key_is_read_from_the_env_only_for_jobs_on_tinker(monkeypatch):
    monkeypatch.setenv(TINKER_KEY_SECRET, "tml-from-environment")
    job = brief_job()
    job["generation"]["on_policy_options"]["api_key"] = ""
    assert job_and_secrets(JobConfig.parse(job), {})[1] == {TINKER_KEY_SECRET: "tml-from-environment"}
    assert job_and_secrets(JobConfig.parse(job), {TINKER_KEY_SECRET: "tml-given"})[1] == {TINKER_KEY_SECRET: "tml-given"}
    assert job_and_secrets(JobConfig.parse(local_job()), {})[1] == {}  # no Tinker: the key stays home


def body_of(job: dict[str, Any], env: dict[str, str] | None = None) -> bytes:
    uploaded = {SAMPLE_PROMPTS.name: base64.b64encode(SAMPLE_PROMPTS.read_bytes()).decode()}
    job = copy.deepcopy(job)
    job["source"]["dataset"] = SAMPLE_PROMPTS.name
    return json.dumps({"job": job, "env": env or {}, "source_files": uploaded}).encode()


def test_the_server_refuses_a_key_in_the_config_and_starts_on_policy_jobs_with_their_stage(tmp_path):
    settings = Settings(data_dir=tmp_path, policy=Policy())
    job = brief_job()
    job["generation"]["on_policy_options"]["api_key"] = TINKER_KEY
    with pytest.raises(HTTPException) as info:
        parse_submission(body_of(job, {TINKER_KEY_SECRET: TINKER_KEY}), settings)
    assert info.value.status_code == 422
    assert "secrets are never part of a job's config" in info.value.detail and TINKER_KEY_SECRET in info.value.detail
    assert TINKER_KEY not in info.value.detail

    job["generation"]["on_policy_options"]["api_key"] = None
    with pytest.raises(HTTPException, match=TINKER_KEY_SECRET):
        parse_submission(body_of(job), settings)
    submission = parse_submission(body_of(job, {TINKER_KEY_SECRET: TINKER_KEY}), settings)
    assert submission.first_stage == "on_policy.start"
    assert submission.env == {TINKER_KEY_SECRET: TINKER_KEY}

    dataset = {"model": {"provider": "hf", "name": "org/m"}, "source": {"dataset": "x", "field": "question"}}
    assert parse_submission(body_of(dataset), settings).first_stage == "dataset.plan"
    dataset["model"]["provider"] = "tinker"
    with pytest.raises(HTTPException, match="serves on-policy jobs only"):
        parse_submission(body_of(dataset), settings)


def test_the_key_reaches_the_jobs_secrets_and_is_never_shown(redis_url, tmp_path, monkeypatch):
    monkeypatch.delenv(TINKER_KEY_SECRET, raising=False)
    with api_process(redis_url, tmp_path / "data", tmp_path, ",".join(API_KEYS)) as (url, _log):
        headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
        data = yaml.safe_load(ON_POLICY)
        data["server"].update(base_url=url, api_key=API_KEYS[0])
        data["job"]["source"] = {"dataset": str(SAMPLE_PROMPTS), "split": "train[0:8]", "field": "question"}
        data["job"]["generation"]["on_policy_options"]["api_key"] = TINKER_KEY
        config = AppConfig.parse(data)

        # Written into the job's JSON by hand, the key is refused and nothing is kept.
        by_hand = config.job.model_dump(mode="json")
        by_hand["generation"]["on_policy_options"]["api_key"] = TINKER_KEY
        raw = body_of(by_hand)
        answer = httpx.post(f"{url}/v1/jobs", content=raw, headers={**headers, "Content-Type": "application/json"})
        assert answer.status_code == 422 and "secrets are never part" in answer.json()["detail"], answer.text
        assert TINKER_KEY not in answer.text
        assert httpx.get(f"{url}/v1/jobs", headers=headers).json()["jobs"] == []

        r = redis.Redis.from_url(redis_url, decode_responses=True)
        with SpiderClient(config=config) as client:
            job_id = client.submit_job()["job_id"]
            secrets = r.hgetall(f"spider:job:{job_id}:secrets")
            status = client.get_job_status(job_id)
            shown = [client.http.get(f"/v1/jobs/{job_id}").text, client.http.get("/v1/jobs").text,
                     client.http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"}).text]
            stored_config = r.hget(f"spider:job:{job_id}", "config")
            client.cancel_job(job_id)
    assert secrets == {TINKER_KEY_SECRET: TINKER_KEY}  # the job's secrets, the one place the key is kept
    assert status["secret_names"] == [TINKER_KEY_SECRET]
    assert status["config"]["generation"]["on_policy_options"]["api_key"] is None
    assert status["config"]["generation"]["on_policy_options"]["teacher"]["provider"] == "tinker"
    for text in shown + [stored_config]:
        assert TINKER_KEY not in text
    assert r.hgetall(f"spider:job:{job_id}:secrets") == {}  # cancelled: its secrets are gone


def keep(record):
    return record


def test_an_on_policy_job_with_a_post_processor_is_refused(tmp_path):
    from spider.bundle import build_bundle

    settings = Settings(data_dir=tmp_path, policy=Policy())
    body = json.loads(body_of(brief_job(), {TINKER_KEY_SECRET: TINKER_KEY}))
    body["bundle"] = base64.b64encode(build_bundle(post_processor=keep)).decode()
    with pytest.raises(HTTPException) as info:
        parse_submission(json.dumps(body).encode(), settings)
    assert info.value.status_code == 422 and "post_processor" in info.value.detail
    body["bundle"] = base64.b64encode(build_bundle(pre_processor=keep)).decode()
    assert parse_submission(json.dumps(body).encode(), settings).bundle is not None
