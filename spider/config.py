"""The job schema: the one source of truth for what a Spider job is.

Users write YAML in the shape of `AppConfig` (`server` + `job`). Unknown keys are errors that name
the key's path and the nearest valid key; every accepted field has an effect.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spider.errors import ConfigError

SPLIT_PATTERN = re.compile(r"^[\w.\-]+(\[[^\]]*\])?(\+[\w.\-]+(\[[^\]]*\])?)*$")


class Strict(BaseModel):
    # NaN and infinity are no one's setting, and would pass every one-sided bound.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Bounds on what a job may write. Every count, length and size in the schema has an upper bound, so
# that nothing a submitter sends can make a worker allocate, loop or store without limit; the
# operator's own ceilings (runtime.limits, SPIDER_MAX_*) are checked at admission.
INT64_MAX = 2**63 - 1
MAX_NAME_CHARS = 1000  # model names, dataset ids, paths
MAX_TEXT_CHARS = 1_000_000  # one system prompt, one simulated user's prompt
MAX_ENV_VALUE_CHARS = 64 * 1024
MAX_ENV_VARS = 256
MAX_LIST_ITEMS = 1024
# Free-form values (engine parameters, source options, processor kwargs): how deep and how big.
MAX_FREE_FORM_DEPTH = 32
MAX_FREE_FORM_ITEMS = 10_000
MAX_FREE_FORM_STRING = 1_000_000
# The hard limits of the bounds that are the operator's policy (spider.policy.JobCeilings,
# SPIDER_MAX_*: by default lower, and never above these, whatever the operator sets).
HARD_MAX_DUPLICATIONS = 100_000
HARD_MAX_TOKENS = 10_000_000
HARD_MAX_BATCH_SIZE = 1_000_000
HARD_MAX_CONCURRENT_CONVERSATIONS = 65_536
HARD_MAX_TURNS = 10_000

Seed = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE_CHARS)]


def bounded_free_form(value: dict[str, Any]) -> dict[str, Any]:
    """A free-form mapping of JSON values, refused when it nests deeper than MAX_FREE_FORM_DEPTH,
    holds more than MAX_FREE_FORM_ITEMS values or a string longer than MAX_FREE_FORM_STRING; the
    error names the path inside the mapping. Walked without recursion, whatever its depth."""
    pending: list[tuple[Any, str, int]] = [(value, "", 1)]
    items = 0
    while pending:
        node, where, depth = pending.pop()
        items += 1
        if items > MAX_FREE_FORM_ITEMS:
            raise ValueError(f"more than {MAX_FREE_FORM_ITEMS} values")
        if depth > MAX_FREE_FORM_DEPTH:
            raise ValueError(f"{where.lstrip('.')}: nested deeper than {MAX_FREE_FORM_DEPTH} levels")
        if isinstance(node, str) and len(node) > MAX_FREE_FORM_STRING:
            raise ValueError(f"{where.lstrip('.')}: a string longer than {MAX_FREE_FORM_STRING} characters")
        if isinstance(node, dict):
            pending.extend((child, f"{where}.{key}", depth + 1) for key, child in node.items())
        elif isinstance(node, (list, tuple)):
            pending.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(node))
    return value


FreeForm = Annotated[dict[str, Any], AfterValidator(bounded_free_form)]


class ServerConfig(Strict):
    """Where the Spider API is. No `base_url` means: start the local stack on this machine."""

    base_url: str | None = Field(None, max_length=2000)
    api_key: str | None = Field(None, max_length=MAX_ENV_VALUE_CHARS)
    request_timeout: float = Field(120.0, gt=0, le=7 * 24 * 3600)
    headers: dict[Annotated[str, Field(max_length=256)], EnvValue] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    verify_tls: bool = True


HUB_ID_PATTERN = r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$"
REVISION_PATTERN = r"^[\w.\-/]{1,200}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
Dtype = Literal["auto", "half", "float16", "fp16", "bfloat16", "bf16", "float", "float32", "fp32"]


class VLLMParameters(Strict):
    """What a job may pass to `vllm.LLM(...)`: sizing, precision and scheduling knobs.

    Options that load code or read and write server paths (`download_dir`, `load_format`,
    `worker_cls`, `hf_overrides`, `allowed_local_media_path`, ...) are not on the list. A local
    `tokenizer` folder and `trust_remote_code` need the operator's permission (SECURITY.md)."""

    tensor_parallel_size: int = Field(1, ge=1, le=256)
    pipeline_parallel_size: int = Field(1, ge=1, le=256)
    data_parallel_size: int = Field(1, ge=1, le=256)
    dtype: Dtype = "auto"
    kv_cache_dtype: str = Field("auto", pattern=r"^[a-z0-9_]{1,32}$")
    quantization: str | None = Field(None, pattern=r"^[a-z0-9_\-]{1,32}$")
    max_model_len: int | None = Field(None, ge=16, le=10_000_000)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1, le=2**50)
    cpu_offload_gb: float = Field(0, ge=0, le=1_000_000)
    enforce_eager: bool = False
    seed: Seed | None = None
    max_num_seqs: int | None = Field(None, ge=1, le=100_000)
    max_num_batched_tokens: int | None = Field(None, ge=1, le=100_000_000)
    block_size: int | None = Field(None, ge=1, le=1024)
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    disable_sliding_window: bool = False
    disable_custom_all_reduce: bool = False
    max_logprobs: int = Field(20, ge=-1, le=100_000)
    revision: str | None = Field(None, pattern=REVISION_PATTERN)
    tokenizer: str | None = Field(None, min_length=1, max_length=1000)
    tokenizer_revision: str | None = Field(None, pattern=REVISION_PATTERN)
    tokenizer_mode: Literal["auto", "slow", "hf", "mistral"] = "auto"
    generation_config: Literal["auto", "vllm"] = "auto"
    trust_remote_code: bool = False
    enable_lora: bool = False
    max_loras: int = Field(1, ge=1, le=64)
    max_lora_rank: int = Field(16, ge=1, le=1024)


class HFParameters(Strict):
    """transformers engine: `dtype`, `device` (cpu, cuda, cuda:N, mps, auto), `batch_size`."""

    dtype: Dtype = "auto"
    device: str | None = Field(None, pattern=r"^(cpu|cuda|cuda:\d{1,3}|mps|auto)$")
    batch_size: int = Field(16, ge=1, le=4096)


class OpenAIParameters(Strict):
    """OpenAI-compatible endpoint. The key comes from the job's own secrets (`api_key_env` names
    it, default OPENAI_API_KEY); `base_url` must be a public address unless the operator allows
    its host (SPIDER_ALLOWED_HOSTS)."""

    base_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2000)
    api_key_env: str | None = Field(None, pattern=ENV_NAME_PATTERN)
    max_concurrency: int = Field(16, ge=1, le=1024)
    timeout: float = Field(600.0, gt=0, le=24 * 3600)
    max_retries: int = Field(5, ge=0, le=50)


ENGINE_PARAMETERS: dict[str, type[Strict]] = {
    "vllm": VLLMParameters,
    "hf": HFParameters,
    "openai": OpenAIParameters,
}


class ModelConfig(Strict):
    """The generating model (the teacher for datasets, the student for on-policy jobs).

    `name` is a hub id (`org/name`), or a local folder inside a directory the operator allows
    (SPIDER_MODEL_DIRS). `parameters` are checked against the provider's list: `VLLMParameters`
    (they go to `LLM(**parameters)`), `HFParameters`, `OpenAIParameters`. Only the keys given are
    passed on; the others keep the engine's own defaults.
    """

    provider: Literal["vllm", "openai", "hf", "tinker"] = "vllm"
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    parameters: FreeForm = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _known_parameters(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        schema = ENGINE_PARAMETERS.get(info.data.get("provider", ""))
        if schema is None:
            return value
        try:
            schema.model_validate(value)
        except ValidationError as exc:
            problems = format_errors(exc, schema).split("\n", 1)[1].strip().replace("\n  ", "; ")
            raise ValueError(f"not accepted by provider {info.data['provider']!r}: {problems}") from None
        return value


class SourceConfig(Strict):
    """Where prompts come from: a hub dataset id, a builder such as `json` with `options.data_files`,
    or a path to a local json/jsonl/parquet/csv file or directory."""

    dataset: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    config_name: str | None = Field(None, max_length=200)
    split: str = Field("train", max_length=MAX_NAME_CHARS)
    field: str = Field("prompt", max_length=MAX_NAME_CHARS)
    revision: str | None = Field(None, max_length=200)
    streaming: bool = False
    max_examples: int | None = Field(None, ge=1, le=INT64_MAX)
    shuffle: bool = False
    seed: Seed | None = None
    options: FreeForm = Field(default_factory=dict)

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, value: str) -> str:
        if not SPLIT_PATTERN.match(value.replace(" ", "")):
            raise ValueError(f"{value!r} is not a split; write e.g. 'train', 'train[0:10]' or 'train[:5%]'")
        return value.replace(" ", "")


class GenerationParameters(Strict):
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=10_000_000)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int = Field(512, ge=1, le=HARD_MAX_TOKENS)
    seed: Seed | None = None
    stop: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=64)
    presence_penalty: float = Field(0.0, ge=-100, le=100)
    frequency_penalty: float = Field(0.0, ge=-100, le=100)
    repetition_penalty: float | None = Field(None, gt=0, le=100)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


TRAINER_BACKENDS = ("local", "tinker")
# The secret that carries a job's Tinker API key (the client moves `on_policy_options.api_key` there).
TINKER_KEY_SECRET = "TINKER_API_KEY"
# The LoRA scale Tinker uses for every adapter; `lora_alpha` cannot change it there.
TINKER_LORA_ALPHA = 32
# Held-out prompts when `eval_every` is set and `eval_rows` is not: one batch of them, at most this many.
DEFAULT_EVAL_ROWS = 32
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,200}$"


class OnPolicyOptions(Strict):
    """On-policy distillation: the student (`job.model`) samples, the teacher scores every token it
    sampled, and the student is trained on the per-token reverse KL.

    Defaults follow tinker-cookbook's on-policy distillation recipe
    (recipes/distillation/on_policy_distillation.py, distillation/train_on_policy.py) and Tinker's
    own optimizer defaults; a field's description says where Spider's default differs and why.
    Fields whose default is None are resolved when the job is parsed (`JobConfig`): `backend`,
    `teacher.provider`, `teacher_in_process` and `eval_rows` are never None in a parsed job.
    """

    teacher: ModelConfig = Field(
        description="the teacher model; a bare string is its name. `provider` left out: tinker when the student "
        "trains on tinker, else the student's own provider (vllm, hf or openai). An openai teacher must return "
        "prompt log-probs (vLLM's /completions with prompt_logprobs)",
    )
    backend: Literal["local", "tinker"] | None = Field(
        None,
        description="where the student trains: local (torch + peft on the train worker, sampling with "
        "job.model.provider hf or vllm) or tinker (the hosted service; job.model.provider must be tinker). "
        "None: tinker when job.model.provider is tinker, else local",
    )
    student_checkpoint: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="start from these weights instead of the base model: on the local backend a PEFT adapter folder "
        "inside SPIDER_MODEL_DIRS (its rank must be lora_rank); on tinker a tinker:// path",
    )
    api_key: SecretStr | None = Field(
        None,
        description="the Tinker API key (never shown in a repr or dump). SpiderClient moves it into the job's secrets as TINKER_API_KEY before "
        "submitting (empty: TINKER_API_KEY from the client's env or environment); the server refuses a config "
        "that still carries it",
    )
    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="peak learning rate (the recipe's 1e-4 for LoRA; it uses 5e-5 for full fine-tuning)"
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warmup: constant (as the recipe), or a linear / cosine decay to 0 at the last step"
    )
    warmup_steps: int = Field(0, ge=0, le=INT64_MAX, description="steps of linear warmup from 0 to learning_rate")
    groups_per_batch: int = Field(
        64,
        ge=1,
        le=100_000,
        description="prompts per step. The recipe uses 1024; Spider's sources are often a few hundred rows, where "
        "1024 would leave a single step",
    )
    group_size: int = Field(4, ge=1, le=1024, description="student samples per prompt (the recipe's 4)")
    max_tokens: int = Field(4096, ge=1, le=HARD_MAX_TOKENS, description="tokens per student answer (the recipe's 4096)")
    temperature: float = Field(
        1.0,
        gt=0,
        le=10,
        description="the student's sampling temperature. 1 (the recipe's) samples the distribution the loss "
        "trains; other values make the importance weights biased",
    )
    lora_rank: int = Field(
        32,
        ge=0,
        le=4096,
        description="LoRA rank; 0 trains every weight (local backend only). 32 is Tinker's and train_on_policy's "
        "default (the recipe's command line uses 128)",
    )
    lora_alpha: float | None = Field(
        None, gt=0, le=100_000, description=f"LoRA scale (None: {TINKER_LORA_ALPHA}, Tinker's fixed value); local backend only"
    )
    lora_target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="module names the adapter wraps (None: every linear layer); local backend only, Tinker chooses its own",
    )
    num_substeps: int = Field(
        1, ge=1, le=1024, description="optimizer steps per batch: the batch's groups split into this many chunks"
    )
    kl_penalty_coef: float = Field(
        1.0, gt=0, le=1000, description="weight of the per-token reverse KL in the advantage (the recipe's 1.0)"
    )
    kl_discount_factor: float = Field(
        0.0, ge=0, le=1, description="each token's advantage also sums the KL of the tokens after it, discounted by this"
    )
    loss_fn: Literal["importance_sampling", "ppo"] = Field(
        "importance_sampling", description="importance_sampling (the recipe's) or ppo (clipped ratios)"
    )
    ppo_clip_low: float = Field(0.8, gt=0, lt=1, description="lower bound of the probability ratio (ppo only)")
    ppo_clip_high: float = Field(1.2, gt=1, le=100, description="upper bound of the probability ratio (ppo only)")
    max_grad_norm: float = Field(0.0, ge=0, le=1e9, description="clip the gradient's global norm to this (0: off, as Tinker's default)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam's beta1 (Tinker's 0.9)")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="Adam's beta2 (Tinker's 0.95)")
    adam_eps: float = Field(1e-12, gt=0, le=1, description="Adam's epsilon (Tinker's 1e-12)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="decoupled weight decay (Tinker's 0)")
    compute_post_kl: bool = Field(
        False, description="after each update, the teacher KL of the same samples under the new weights (one more forward)"
    )
    eval_every: int = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="steps between evaluations of the teacher KL on held-out prompts, also at the start and the "
        "end (0: off). The recipe uses 20 with a dataset's own test split; Spider's source is one slice, and "
        "holding rows out of it is the job's choice",
    )
    eval_rows: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="held-out prompts, taken from the end of the source slice and never trained on. None: "
        f"min(groups_per_batch, {DEFAULT_EVAL_ROWS}) when eval_every is set, else 0",
    )
    save_every: int = Field(20, ge=0, le=INT64_MAX, description="steps between kept checkpoints (0: only the last; the recipe's 20)")
    max_steps: int | None = Field(
        None, ge=1, le=INT64_MAX, description="steps to train (None: one pass over the training prompts, ceil(rows / groups_per_batch))"
    )
    max_train_tokens: int | None = Field(
        None, ge=1, le=INT64_MAX, description="stop after the step in which this many sampled tokens have been trained (None: no budget)"
    )
    steps_per_task: int = Field(
        4,
        ge=1,
        le=64,
        description="steps per training task; each task checkpoints and hands on, so none outlives the broker's "
        "visibility timeout",
    )
    teacher_in_process: bool | None = Field(
        None,
        description="score in the train worker (true) or as tasks on rollout workers (false). None: on rollout "
        "workers for an hf or vllm teacher of a tinker job (its train worker needs no accelerator), else in the "
        "train worker",
    )
    merge_weights: bool = Field(False, description="also export the base weights with the adapter merged in")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds the prompt order, the adapter's init and every sample")

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("lora_target_modules")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not re.match(MODULE_NAME_PATTERN, name):
                raise ValueError(f"{name[:60]!r} is not a module name (letters, digits, '_', '.', '-')")
        return value

    @property
    def resolved_backend(self) -> str:
        """`backend`, which a parsed job always has (left out, it says local)."""
        return self.backend or "local"

    @property
    def uses_tinker(self) -> bool:
        """Whether the job talks to Tinker (student or teacher) and so needs TINKER_KEY_SECRET."""
        return self.backend == "tinker" or self.teacher.provider == "tinker"

    @property
    def tinker_key(self) -> str:
        """The key written in `api_key` ('' when there is none)."""
        return self.api_key.get_secret_value() if self.api_key is not None else ""

    def loss_fn_config(self) -> dict[str, float] | None:
        """What the trainer's `forward_backward` takes beside `loss_fn` (the ppo ratio bounds)."""
        if self.loss_fn != "ppo":
            return None
        return {"clip_low_threshold": self.ppo_clip_low, "clip_high_threshold": self.ppo_clip_high}

    @model_validator(mode="after")
    def _consistent(self) -> "OnPolicyOptions":
        problems = []
        if self.num_substeps > self.groups_per_batch:
            problems.append(
                f"num_substeps ({self.num_substeps}) is more than groups_per_batch ({self.groups_per_batch}): "
                "each substep needs at least one group"
            )
        if self.loss_fn != "ppo":
            for name in ("ppo_clip_low", "ppo_clip_high"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    problems.append(f"{name} bounds the ratio of loss_fn 'ppo'; loss_fn is {self.loss_fn!r}")
        if self.lora_rank == 0:
            for name in ("lora_alpha", "lora_target_modules"):
                if getattr(self, name) is not None:
                    problems.append(f"{name} shapes a LoRA adapter; lora_rank 0 trains every weight")
            if self.merge_weights:
                problems.append("merge_weights merges an adapter; lora_rank 0 trains (and exports) every weight")
            if self.student_checkpoint is not None and self.backend != "tinker":
                problems.append("student_checkpoint is a LoRA adapter, and lora_rank 0 trains the model itself: merge "
                                "the adapter into a model folder and name that as job.model.name")
        if self.eval_every == 0 and self.eval_rows:
            problems.append("eval_rows holds prompts out of training for evaluations, which eval_every: 0 turns off")
        if self.backend == "tinker":
            if self.lora_rank == 0:
                problems.append("lora_rank 0 (full fine-tuning) runs on the local backend only; Tinker trains LoRA adapters")
            if self.lora_alpha is not None:
                problems.append(f"lora_alpha: Tinker scales every adapter by {TINKER_LORA_ALPHA}; leave it out")
            if self.lora_target_modules is not None:
                problems.append("lora_target_modules: Tinker chooses the adapter's modules itself; leave it out")
            if self.student_checkpoint is not None and not self.student_checkpoint.startswith("tinker://"):
                problems.append("student_checkpoint: on the tinker backend, a tinker:// path of saved weights or state")
        elif self.student_checkpoint is not None and self.student_checkpoint.startswith("tinker://"):
            problems.append("student_checkpoint: a tinker:// path needs backend tinker; the local backend starts from a "
                            "PEFT adapter folder")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SimulatedUserConfig(Strict):
    """A model that plays the user: it sees the conversation with roles flipped and its own
    `prompt` as system prompt, and writes up to `max_turns` follow-up messages; a message with
    `stop_phrase` in it ends the conversation."""

    model: ModelConfig
    prompt: str = Field(
        "You are a user talking to an AI assistant. Reply as the user would: ask a natural follow-up question, "
        "or say what you still need. Write only the user's next message.",
        min_length=1,
        max_length=100_000,
    )
    max_turns: int = Field(1, ge=1, le=HARD_MAX_TURNS)
    stop_phrase: str | None = Field(None, min_length=1, max_length=200)
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)

    @field_validator("model", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class MCPServerConfig(Strict):
    """An MCP server whose tools are offered to the model: a stdio `command` (run inside the job's
    sandbox, from its `runtime.packages`) or a remote `url` (needs `runtime.network: true`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    command: list[Annotated[str, Field(max_length=MAX_ENV_VALUE_CHARS)]] | None = Field(None, min_length=1, max_length=64)
    url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2000)
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], EnvValue] = Field(
        default_factory=dict, max_length=MAX_ENV_VARS
    )
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> "MCPServerConfig":
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of `command` (stdio, in the sandbox) or `url`")
        return self


TOOL_CHOICES = ("auto", "required", "none")


class GenerationConfig(Strict):
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    duplications: int = Field(1, ge=1, le=HARD_MAX_DUPLICATIONS, description="samples per prompt")
    system_prompt: str | list[str] | None = Field(
        None,
        description=f"one system prompt, or a list to choose from per row (seeded); at most {MAX_LIST_ITEMS} prompts "
        f"of at most {MAX_TEXT_CHARS} characters each",
    )
    max_batch_size: int = Field(32, ge=1, le=HARD_MAX_BATCH_SIZE, description="rows per rollout task")
    max_row_errors: int | None = Field(
        None,
        ge=0,
        le=INT64_MAX,
        description="the job fails when more rows than this fail; None: fail only if every row fails",
    )
    tool_choice: str = Field(
        "auto",
        min_length=1,
        max_length=64,
        description="auto | required | none | a tool's name: what the model's first turn after each user message "
        "must do (required and named tools are enforced by constrained decoding on vllm)",
    )
    tool_parser: str | None = Field(
        None, pattern=r"^[a-z0-9_\-]{1,40}$", description="the tool-call format of the model's family (default: from its template)"
    )
    reasoning_parser: str | None = Field(
        None, pattern=r"^[a-z0-9_\-]{1,40}$", description="split <think> reasoning into reasoning_content (e.g. qwen3, deepseek_r1)"
    )
    max_tool_turns: int = Field(8, ge=1, le=HARD_MAX_TURNS, description="model turns with tool calls per user turn")
    max_tool_output_chars: int = Field(8192, ge=16, le=1_000_000, description="longer tool answers are truncated")
    tool_timeout_s: float = Field(120.0, gt=0, le=3600, description="wait for one tool answer at most this long")
    user: SimulatedUserConfig | None = None
    mcp_servers: list[MCPServerConfig] = Field(default_factory=list, max_length=16)
    max_concurrent_conversations: int = Field(
        64, ge=1, le=HARD_MAX_CONCURRENT_CONVERSATIONS, description="conversations of one rollout task generating at once (one waiting on a tool holds no slot)"
    )
    return_tokens: bool = Field(False, description="keep token ids and log-probs of every assistant turn")
    on_policy: bool = False
    on_policy_options: OnPolicyOptions | None = None

    @field_validator("system_prompt")
    @classmethod
    def _non_empty_list(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("system_prompt list is empty; give at least one prompt or leave it out")
        if isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{len(value)} system prompts, more than the limit of {MAX_LIST_ITEMS}")
        for index, prompt in enumerate([value] if isinstance(value, str) else value or []):
            if len(prompt) > MAX_TEXT_CHARS:
                where = f"prompt {index}" if isinstance(value, list) else "the system prompt"
                raise ValueError(f"{where} has {len(prompt)} characters, more than the limit of {MAX_TEXT_CHARS}")
        return value

    @model_validator(mode="after")
    def _on_policy_fields(self) -> "GenerationConfig":
        """An on-policy job samples with on_policy_options; the dataset knobs it would ignore are refused."""
        if not self.on_policy:
            if self.on_policy_options is not None:
                raise ValueError("on_policy_options is given but on_policy is false: set on_policy: true to train, "
                                 "or leave the options out")
            return self
        if self.on_policy_options is None:
            raise ValueError("on_policy: true needs on_policy_options (at least `teacher`)")
        problems = []
        if self.duplications != 1:
            problems.append("duplications must be 1 for on-policy training: on_policy_options.group_size is the "
                            "number of samples per prompt")
        moved = {"temperature": "temperature", "max_tokens": "max_tokens", "seed": "seed"}
        defaults = GenerationParameters()
        for name in GenerationParameters.model_fields:
            if getattr(self.parameters, name) != getattr(defaults, name):
                instead = f"on_policy_options.{moved[name]}" if name in moved else None
                problems.append(
                    f"parameters.{name}: on-policy students sample with on_policy_options"
                    + (f"; use {instead}" if instead else f", which has no {name} (it would bias the loss)")
                )
        if self.return_tokens:
            problems.append("return_tokens keeps tokens in dataset records; an on-policy job writes no records")
        if self.max_batch_size != type(self).model_fields["max_batch_size"].default:
            problems.append("max_batch_size sizes a dataset's rollout tasks; on-policy steps take "
                            "on_policy_options.groups_per_batch prompts")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class HFOutput(Strict):
    """Where on the Hugging Face Hub a job's output goes: a dataset job's records into a dataset
    repo (as the subset `config_name` when given), an on-policy job's adapter into a model repo."""

    repo_id: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    repo_type: Literal["dataset", "model"] = "dataset"
    private: bool = Field(False, description="create the repo private; an existing public repo is refused")
    config_name: str | None = Field(
        None, max_length=200, description="the dataset subset (`load_dataset(repo_id, config_name)`); its files go under `<config_name>/`"
    )
    token_env: str = Field("HF_TOKEN", max_length=256)
    upload_every: int | None = Field(
        None, ge=1, le=INT64_MAX, description="upload the new shards every N completed batches instead of the whole result at the end"
    )

    @field_validator("config_name")
    @classmethod
    def _config_name_is_a_folder(cls, value: str | None) -> str | None:
        # The name becomes a folder and a glob in the dataset card: plain characters only.
        if value is None:
            return None
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"config_name {value!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        if value == "data":
            raise ValueError("config_name 'data' is the folder of the default config: choose another name, or none")
        return value


class OutputConfig(Strict):
    """`return`: keep the result for download. `upload_hf`: also push it to the Hugging Face Hub."""

    mode: Literal["return", "upload_hf"] = "return"
    format: Literal["jsonl", "parquet"] = "jsonl"
    hf: HFOutput | None = None
    keep_intermediate: bool = Field(
        False,
        description="keep the job's intermediate files once it completes (batches, shards, the source "
        "copy; a training job's trainer states and earlier checkpoints), e.g. to inspect them",
    )

    @model_validator(mode="after")
    def _hf_needed(self) -> "OutputConfig":
        if self.mode == "upload_hf" and self.hf is None:
            raise ValueError("mode 'upload_hf' needs an `hf` section with at least `repo_id`")
        return self


class SandboxLimits(Strict):
    """Per-job limits of user code. The operator sets a ceiling for each (`SPIDER_MAX_<FIELD>`)."""

    memory_mb: int = Field(1024, ge=64, le=INT64_MAX, description="address space per process")
    cpu_seconds: int = Field(60, ge=1, le=INT64_MAX, description="CPU time per call (a batch of n rows gets n)")
    call_timeout_s: float = Field(30.0, gt=0, le=1e9, description="wall clock per call or row")
    max_processes: int = Field(64, ge=1, le=INT64_MAX, description="processes of the job on the host")
    file_size_mb: int = Field(64, ge=1, le=INT64_MAX, description="largest file written")
    disk_mb: int = Field(256, ge=1, le=INT64_MAX, description="everything the job writes to its scratch dir")
    max_files: int = Field(10_000, ge=16, le=INT64_MAX, description="files and directories in its scratch dir")
    output_mb: int = Field(64, ge=1, le=INT64_MAX, description="what one call or batch may send back (its decoded cost)")


class RuntimeConfig(Strict):
    """Where user code runs: extra pip packages, non-secret variables, network and limits."""

    packages: list[Annotated[str, Field(max_length=MAX_NAME_CHARS)]] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    env: dict[Annotated[str, Field(max_length=256)], EnvValue] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    network: bool = False
    limits: SandboxLimits = Field(default_factory=SandboxLimits)


class ProcessorsConfig(Strict):
    """Keyword arguments passed to the user's pre/post processors."""

    pre_kwargs: FreeForm = Field(default_factory=dict)
    post_kwargs: FreeForm = Field(default_factory=dict)


class JobConfig(Strict):
    model: ModelConfig
    source: SourceConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    processors: ProcessorsConfig = Field(default_factory=ProcessorsConfig)

    @model_validator(mode="before")
    @classmethod
    def _on_policy_defaults(cls, data: Any) -> Any:
        return resolve_on_policy_defaults(data)

    @model_validator(mode="after")
    def _on_policy_fits_the_job(self) -> "JobConfig":
        options = self.generation.on_policy_options
        if options is None:
            if self.output.hf is not None and self.output.hf.repo_type != "dataset":
                raise ValueError("output.hf.repo_type must be 'dataset': a dataset job uploads records")
            return self
        student, teacher = self.model, options.teacher
        where = "generation.on_policy_options"
        problems = []
        if options.backend == "tinker" and student.provider != "tinker":
            problems.append(f"{where}.backend 'tinker' trains and samples the student on Tinker: set model.provider: tinker")
        if options.backend == "local" and student.provider not in ("hf", "vllm"):
            problems.append(
                f"{where}.backend 'local' trains the student on the train worker, which samples it with model.provider "
                f"hf or vllm (not {student.provider!r})"
            )
        for path, model in (("model", student), (f"{where}.teacher", teacher)):
            context = model.parameters.get("max_model_len") if model.provider == "vllm" else None
            if isinstance(context, int) and options.max_tokens >= context:
                problems.append(
                    f"{where}.max_tokens ({options.max_tokens}) leaves no room for a prompt in "
                    f"{path}.parameters.max_model_len ({context})"
                )
        if self.output.format != type(self.output).model_fields["format"].default:
            problems.append("output.format is a dataset's; an on-policy job's result is an archive (adapter, metrics)")
        if self.output.hf is not None:
            if self.output.hf.repo_type != "model":
                problems.append("output.hf.repo_type must be 'model': an on-policy job uploads the trained adapter")
            if self.output.hf.config_name is not None:
                problems.append("output.hf.config_name names a dataset configuration; an adapter upload has none")
            if self.output.hf.upload_every is not None:
                problems.append("output.hf.upload_every uploads a dataset's shards as they come; an adapter is uploaded once")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def parse(cls, data: Any) -> "JobConfig":
        """Validate a job mapping; raise ConfigError with key paths and hints."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, cls, prefix="job")) from None


class AppConfig(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    job: JobConfig

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "AppConfig":
        """Read a YAML config. `overrides` maps dotted paths (`job.source.split`) or nested dicts onto it."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with `job` (and optionally `server`)")
        for key, value in (overrides or {}).items():
            apply_override(data, key, value)
        return cls.parse(data)

    @classmethod
    def parse(cls, data: Any) -> "AppConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, cls)) from None


def default_teacher_provider(backend: str, student_provider: str) -> str:
    """The teacher's provider when the config leaves it out: tinker for a student on Tinker, else
    the student's own provider (a teacher served the way the student is)."""
    if backend == "tinker":
        return "tinker"
    return student_provider if student_provider in ("vllm", "hf", "openai") else "vllm"


def resolve_on_policy_defaults(data: Any) -> Any:
    """A job mapping with the on-policy fields that default from the rest of the job filled in:
    `backend` (from `model.provider`), `teacher.provider`, `teacher_in_process` and `eval_rows`.
    Anything not shaped like a job is returned as it is, for validation to report."""
    if not isinstance(data, dict):
        return data
    generation = _as_written(data.get("generation"))
    options = _as_written(generation.get("on_policy_options")) if isinstance(generation, dict) else None
    if not isinstance(options, dict):
        return data
    model = _as_written(data.get("model"))
    student = model.get("provider", "vllm") if isinstance(model, dict) else "vllm"
    options = dict(options)
    if options.get("backend") is None:
        options["backend"] = "tinker" if student == "tinker" else "local"
    teacher = options.get("teacher")
    teacher = {"name": teacher} if isinstance(teacher, str) else _as_written(teacher)
    if isinstance(teacher, dict):
        if teacher.get("provider") is None:
            teacher = {**teacher, "provider": default_teacher_provider(str(options["backend"]), str(student))}
        options["teacher"] = teacher
        if options.get("teacher_in_process") is None:
            options["teacher_in_process"] = not (options["backend"] == "tinker" and teacher["provider"] in ("hf", "vllm"))
    if options.get("eval_rows") is None:
        every = options.get("eval_every", OnPolicyOptions.model_fields["eval_every"].default)
        groups = options.get("groups_per_batch", OnPolicyOptions.model_fields["groups_per_batch"].default)
        if isinstance(every, int) and isinstance(groups, int):
            options["eval_rows"] = min(groups, DEFAULT_EVAL_ROWS) if every > 0 else 0
    return {**data, "generation": {**generation, "on_policy_options": options}}


def _as_written(value: Any) -> Any:
    """A sub-config as the mapping it was written as (a model instance: only the fields it was given)."""
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` = value in nested mappings, merging dict values instead of replacing them."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for key, sub in value.items():
            apply_override(node[last], key, sub)
    else:
        node[last] = value


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (None if it is a free-form dict)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _nested_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _nested_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _suggest(key: str, owner: type[BaseModel]) -> str | None:
    """The nearest valid key: a sibling, or a key one level down (`parameters.temperature`)."""
    siblings = difflib.get_close_matches(key, list(owner.model_fields), n=1, cutoff=0.75)
    if siblings:
        return siblings[0]
    nested = {}
    for name, field in owner.model_fields.items():
        child = _nested_model(field.annotation)
        if child is not None:
            for sub in child.model_fields:
                nested.setdefault(sub, f"{name}.{sub}")  # the first field declared wins a shared name
    found = difflib.get_close_matches(key, list(nested), n=1, cutoff=0.8)
    return nested[found[0]] if found else None


def format_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: `path.to.key: what is wrong` plus a "did you mean" for unknown keys."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            valid = sorted(owner.model_fields) if owner else []
            hint = _suggest(str(loc[-1]), owner) if owner else None
            message = f"{path}: unknown key"
            if hint:
                message += f"; did you mean {hint!r}?"
            elif valid:
                message += f"; valid keys here: {', '.join(valid)}"
        else:
            message = f"{path}: {err['msg']}"
        lines.append(message)
    return "invalid config:\n  " + "\n  ".join(lines)
