"""The job schema: the one source of truth for what a Spider job is.

Users write YAML in the shape of `AppConfig` (`server` + `job`). Unknown keys are errors that name
the key's path and the nearest valid key; every accepted field has an effect.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from spider.errors import ConfigError

SPLIT_PATTERN = re.compile(r"^[\w.\-]+(\[[^\]]*\])?(\+[\w.\-]+(\[[^\]]*\])?)*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(Strict):
    """Where the Spider API is. No `base_url` means: start the local stack on this machine."""

    base_url: str | None = None
    api_key: str | None = None
    request_timeout: float = Field(120.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
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
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    cpu_offload_gb: float = Field(0, ge=0)
    enforce_eager: bool = False
    seed: int | None = None
    max_num_seqs: int | None = Field(None, ge=1, le=100_000)
    max_num_batched_tokens: int | None = Field(None, ge=1)
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
    name: str = Field(min_length=1, max_length=1000)
    parameters: dict[str, Any] = Field(default_factory=dict)

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

    dataset: str = Field(min_length=1)
    config_name: str | None = None
    split: str = "train"
    field: str = "prompt"
    revision: str | None = None
    streaming: bool = False
    max_examples: int | None = Field(None, ge=1)
    shuffle: bool = False
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, value: str) -> str:
        if not SPLIT_PATTERN.match(value.replace(" ", "")):
            raise ValueError(f"{value!r} is not a split; write e.g. 'train', 'train[0:10]' or 'train[:5%]'")
        return value.replace(" ", "")


class GenerationParameters(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = Field(None, gt=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OnPolicyOptions(Strict):
    """On-policy distillation: the student (`job.model`) samples, the teacher scores every token."""

    teacher: str = Field(min_length=1)
    teacher_provider: Literal["tinker", "vllm", "hf"] | None = None
    api_key: str | None = None
    learning_rate: float = Field(5e-5, gt=0)
    groups_per_batch: int = Field(4, ge=1)
    group_size: int = Field(2, ge=1)
    max_tokens: int = Field(1024, ge=1)
    lora_rank: int = Field(16, ge=1)
    num_substeps: int = Field(1, ge=1)
    kl_penalty_coef: float = Field(0.1, ge=0)
    kl_discount_factor: float = Field(0.0, ge=0, le=1)
    loss_fn: Literal["importance_sampling", "ppo", "cross_entropy"] = "importance_sampling"
    compute_post_kl: bool = False
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(0, ge=0)


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
    max_turns: int = Field(1, ge=1, le=100)
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
    command: list[str] | None = Field(None, min_length=1, max_length=64)
    url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2000)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> "MCPServerConfig":
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of `command` (stdio, in the sandbox) or `url`")
        return self


TOOL_CHOICES = ("auto", "required", "none")


class GenerationConfig(Strict):
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    duplications: int = Field(1, ge=1, description="samples per prompt")
    system_prompt: str | list[str] | None = Field(
        None, description="one system prompt, or a list to choose from per row (seeded)"
    )
    max_batch_size: int = Field(32, ge=1, description="rows per rollout task")
    max_row_errors: int | None = Field(
        None,
        ge=0,
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
    max_tool_turns: int = Field(8, ge=1, le=100, description="model turns with tool calls per user turn")
    max_tool_output_chars: int = Field(8192, ge=16, le=1_000_000, description="longer tool answers are truncated")
    tool_timeout_s: float = Field(120.0, gt=0, le=3600, description="wait for one tool answer at most this long")
    user: SimulatedUserConfig | None = None
    mcp_servers: list[MCPServerConfig] = Field(default_factory=list, max_length=16)
    max_concurrent_conversations: int = Field(
        64, ge=1, le=4096, description="conversations of one rollout task in the engine at once"
    )
    return_tokens: bool = Field(False, description="keep token ids and log-probs of every assistant turn")
    on_policy: bool = False
    on_policy_options: OnPolicyOptions | None = None

    @field_validator("system_prompt")
    @classmethod
    def _non_empty_list(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("system_prompt list is empty; give at least one prompt or leave it out")
        return value

    @model_validator(mode="after")
    def _on_policy_needs_options(self) -> "GenerationConfig":
        if self.on_policy and self.on_policy_options is None:
            raise ValueError("on_policy: true needs on_policy_options (at least `teacher`)")
        return self


class HFOutput(Strict):
    repo_id: str = Field(min_length=1)
    repo_type: Literal["dataset", "model"] = "dataset"
    private: bool = False
    config_name: str | None = None
    token_env: str = "HF_TOKEN"


class OutputConfig(Strict):
    """`return`: keep the result for download. `upload_hf`: also push it to the Hugging Face Hub."""

    mode: Literal["return", "upload_hf"] = "return"
    format: Literal["jsonl", "parquet"] = "jsonl"
    hf: HFOutput | None = None

    @model_validator(mode="after")
    def _hf_needed(self) -> "OutputConfig":
        if self.mode == "upload_hf" and self.hf is None:
            raise ValueError("mode 'upload_hf' needs an `hf` section with at least `repo_id`")
        return self


class SandboxLimits(Strict):
    """Per-job limits of user code. The operator sets a ceiling for each (`SPIDER_MAX_<FIELD>`)."""

    memory_mb: int = Field(1024, ge=64, description="address space per process")
    cpu_seconds: int = Field(60, ge=1, description="CPU time per call (a batch of n rows gets n)")
    call_timeout_s: float = Field(30.0, gt=0, description="wall clock per call or row")
    max_processes: int = Field(64, ge=1, description="processes of the job on the host")
    file_size_mb: int = Field(64, ge=1, description="largest file written")
    disk_mb: int = Field(256, ge=1, description="everything the job writes to its scratch dir")
    max_files: int = Field(10_000, ge=16, description="files and directories in its scratch dir")
    output_mb: int = Field(64, ge=1, description="what one call or batch may send back (its decoded cost)")


class RuntimeConfig(Strict):
    """Where user code runs: extra pip packages, non-secret variables, network and limits."""

    packages: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    network: bool = False
    limits: SandboxLimits = Field(default_factory=SandboxLimits)


class ProcessorsConfig(Strict):
    """Keyword arguments passed to the user's pre/post processors."""

    pre_kwargs: dict[str, Any] = Field(default_factory=dict)
    post_kwargs: dict[str, Any] = Field(default_factory=dict)


class JobConfig(Strict):
    model: ModelConfig
    source: SourceConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    processors: ProcessorsConfig = Field(default_factory=ProcessorsConfig)

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
            nested.update({sub: f"{name}.{sub}" for sub in child.model_fields})
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
