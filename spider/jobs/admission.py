"""Admission: what a job may ask for, checked at submit against the operator's policy.

`admit` refuses (ConfigError, a 422 at the API) every config field that would let a job reach past
what it carried: engine parameters outside each provider's list, remote code, local model folders
and data files the operator did not open, unsafe dataset options, outbound hosts that are not
public, and `runtime.limits` above the operator's ceilings.
"""

from __future__ import annotations

from pathlib import Path

from spider.config import JobConfig, ModelConfig
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
        + conversation_problems(job, policy, secret_names)
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
