"""Admission: what a job may ask for, checked at submit against the operator's policy.

`admit` refuses (ConfigError, a 422 at the API) every config field that would let a job reach past
what it carried: engine parameters outside each provider's list, remote code, local model folders
and data files the operator did not open, unsafe dataset options, outbound hosts that are not
public, and `runtime.limits`, rows, samples, tokens, batch sizes and turns above the operator's
ceilings. An on-policy job's teacher passes the same model checks as its student, and a
checkpoint it resumes from is a folder the operator opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spider.config import TINKER_KEY_SECRET, JobConfig, ModelConfig
from spider.data.sources import source_problems
from spider.errors import ConfigError, SandboxError
from spider.models import ModelAccess, looks_local
from spider.netpolicy import EgressDenied, UnresolvableHost, check_url
from spider.policy import Policy, ceiling_env
from spider.sandbox.venvs import check_sources, normalize_requirements


def admit(
    job: JobConfig, policy: Policy, source_files: list[str] | None = None, secret_names: list[str] | None = None
) -> None:
    """Raise ConfigError naming every field of `job` that `policy` does not allow.

    `source_files` are the names of the files uploaded with the job (its source, when present);
    `secret_names` the names of the secrets sent with it (keys an engine needs must be among them)."""
    problems = (
        model_problems(job.model, policy, "job.model", secret_names)
        + source_problems(job.source, policy, uploaded=bool(source_files))
        + runtime_problems(job, policy)
        + ceiling_problems(job, policy)
        + conversation_problems(job, policy, secret_names)
        + on_policy_problems(job, policy, secret_names)
    )
    if problems:
        raise ConfigError("this server does not accept the job:\n  " + "\n  ".join(problems))


def model_problems(model: ModelConfig, policy: Policy, path: str, secret_names: list[str] | None = None) -> list[str]:
    """Local model folders, remote code and outbound hosts that `policy` does not allow, and an
    endpoint key the job did not send (workers never lend their own)."""
    problems = []
    access = ModelAccess(policy.model_dirs)
    params = model.parameters
    if model.provider in ("vllm", "hf"):
        names = [("name", model.name)] + ([("parameters.tokenizer", params["tokenizer"])] if params.get("tokenizer") else [])
        for key, name in names:
            if looks_local(name) and not access.allows(Path(name)):
                problems.append(f"{path}.{key}: {access.refusal(name)}")
    if params.get("trust_remote_code") and not policy.allow_remote_code:
        problems.append(
            f"{path}.parameters.trust_remote_code: this server does not run code from model repositories "
            "(the operator allows it with SPIDER_ALLOW_REMOTE_CODE=1)"
        )
    if model.provider == "tinker" and looks_local(model.name):
        problems.append(f"{path}.name: Tinker serves models by their hub id ('org/name'), not local folders")
    if model.provider == "openai":
        from spider.engines.openai_engine import DEFAULT_BASE_URL

        try:
            check_url(params.get("base_url") or DEFAULT_BASE_URL, policy.allowed_hosts)
        except UnresolvableHost:
            pass  # the workers' resolver may know it; they check every connection again
        except EgressDenied as exc:
            problems.append(f"{path}.parameters.base_url: {exc}")
        key_env = params.get("api_key_env")
        if key_env and secret_names is not None and key_env not in secret_names:
            problems.append(
                f"{path}.parameters.api_key_env: names {key_env!r}, which the job was not sent; pass it in the "
                "client's env (workers never lend their own keys)"
            )
    return problems


def conversation_problems(job: JobConfig, policy: Policy, secret_names: list[str] | None) -> list[str]:
    """The simulated user's model, and MCP servers: a remote one needs the job's network opt-in
    and a public address (or a host the operator allows)."""
    generation = job.generation
    problems = []
    if generation.user is not None:
        problems += model_problems(generation.user.model, policy, "job.generation.user.model", secret_names)
        if generation.user.model.provider == "tinker":
            problems.append("job.generation.user.model.provider: a simulated user runs on vllm, hf or openai")
    for i, server in enumerate(generation.mcp_servers):
        where = f"job.generation.mcp_servers[{i}]"
        if server.url is not None:
            if not job.runtime.network:
                problems.append(f"{where}.url: a remote MCP server needs the job's network opt-in (runtime.network: true)")
            elif not policy.sandbox_network:
                problems.append(f"{where}.url: this server gives jobs no network (SPIDER_SANDBOX_NETWORK=0)")
            try:
                check_url(server.url, policy.allowed_hosts)
            except UnresolvableHost:
                pass
            except EgressDenied as exc:
                problems.append(f"{where}.url: {exc}")
    return problems


def on_policy_problems(job: JobConfig, policy: Policy, secret_names: list[str] | None) -> list[str]:
    """The teacher passes the same checks as any model; Tinker needs the job's own key; a local
    student checkpoint is an adapter folder the operator opened, of the rank being trained."""
    options = job.generation.on_policy_options
    if options is None:
        return []
    where = "job.generation.on_policy_options"
    problems = model_problems(options.teacher, policy, f"{where}.teacher", secret_names)
    if options.uses_tinker and secret_names is not None and TINKER_KEY_SECRET not in secret_names:
        problems.append(
            f"{where}: the job trains or scores on Tinker and was not sent the secret {TINKER_KEY_SECRET}; set "
            f"on_policy_options.api_key or pass {TINKER_KEY_SECRET} in the client's env (workers never lend their own)"
        )
    if options.student_checkpoint is not None and options.backend == "local":
        problems += adapter_problems(options.student_checkpoint, options.lora_rank, policy, f"{where}.student_checkpoint")
    return problems


def adapter_problems(folder: str, rank: int, policy: Policy, path: str) -> list[str]:
    """A PEFT adapter folder to resume from: absolute, inside SPIDER_MODEL_DIRS (never the data
    dir), holding an adapter_config.json of rank `rank`."""
    access = ModelAccess(policy.model_dirs, _data_dirs())
    where = Path(folder)
    if not where.is_absolute():
        return [f"{path}: {folder[:200]!r} must be an absolute path to a PEFT adapter folder"]
    if not access.allows(where):
        return [f"{path}: {access.refusal(folder[:200])}"]
    config = where / "adapter_config.json"
    if not config.is_file():
        return [f"{path}: {folder[:200]!r} is not a PEFT adapter folder (it has no adapter_config.json)"]
    try:
        adapter_rank = json.loads(config.read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return [f"{path}: {folder[:200]!r} has an unreadable adapter_config.json"]
    if adapter_rank != rank:
        return [f"{path}: the adapter has rank {adapter_rank!r} and lora_rank is {rank}; set lora_rank: {adapter_rank}"]
    return []


def _data_dirs() -> tuple[Path, ...]:
    from spider.settings import Settings

    return (Path(Settings.from_env().data_dir).resolve(),)


def ceiling_problems(job: JobConfig, policy: Policy) -> list[str]:
    """Counts and sizes above the operator's ceilings (JobCeilings): samples, rows, tokens, batch
    size, concurrent conversations, turns."""
    problems = []
    ceilings = policy.job_ceilings
    for name, paths in ceilings.paths.items():
        ceiling = getattr(ceilings, name)
        for path in paths:
            asked = _value_at(job, path)
            if ceiling is not None and asked is not None and asked > ceiling:
                problems.append(f"job.{path}: {asked} is above this server's ceiling of {ceiling} ({ceiling_env(name)})")
    return problems


def _value_at(job: JobConfig, path: str) -> Any:
    """The value of a dotted field of `job`, or None where a part of the path is not set."""
    value: Any = job
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def runtime_problems(job: JobConfig, policy: Policy) -> list[str]:
    """`runtime.limits` above the operator's ceilings, and network the operator turned off."""
    problems = []
    for name in type(job.runtime.limits).model_fields:
        asked, ceiling = getattr(job.runtime.limits, name), getattr(policy.ceilings, name)
        if asked > ceiling:
            problems.append(
                f"job.runtime.limits.{name}: {asked} is above this server's ceiling of {ceiling} ({ceiling_env(name)})"
            )
    if job.runtime.network and not policy.sandbox_network:
        problems.append("job.runtime.network: this server gives user code no network (SPIDER_SANDBOX_NETWORK=0)")
    try:
        check_sources(normalize_requirements(job.runtime.packages), policy.allow_direct_url_packages)
    except SandboxError as exc:
        problems.append(f"job.runtime.packages: {exc}")
    return problems
