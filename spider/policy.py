"""What the operator allows a job to reach: the one place every allow-setting is read.

Whoever holds an API key is untrusted; the operator who starts the server and the workers is
trusted. A job reads only what its own submission carried, public hub data, and what the settings
below open. Every setting is off (or at its tightest) by default; SECURITY.md says what each opens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from spider.errors import ConfigError

TRUE = ("1", "true", "yes", "on")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def _paths(name: str) -> tuple[Path, ...]:
    raw = os.environ.get(name, "")
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())


def _words(name: str) -> tuple[str, ...]:
    return tuple(w.strip().lower() for w in os.environ.get(name, "").split(",") if w.strip())


def ceiling_env(limit: str) -> str:
    """The variable that sets the ceiling of `runtime.limits.<limit>` (SPIDER_MAX_MEMORY_MB, SPIDER_MAX_PROCESSES)."""
    return "SPIDER_MAX_" + limit.upper().removeprefix("MAX_")


@dataclass(frozen=True)
class LimitCeilings:
    """The most a job may ask for in `runtime.limits` (`ceiling_env(field)`, e.g. SPIDER_MAX_MEMORY_MB).

    A job that asks for more is refused at submit with a 422 naming the ceiling."""

    memory_mb: int = 4096
    cpu_seconds: int = 600
    call_timeout_s: float = 600.0
    max_processes: int = 256
    file_size_mb: int = 1024
    disk_mb: int = 4096
    max_files: int = 100_000
    output_mb: int = 512

    @classmethod
    def from_env(cls) -> "LimitCeilings":
        values = {}
        for f in fields(cls):
            raw = os.environ.get(ceiling_env(f.name))
            if raw:
                values[f.name] = type(f.default)(float(raw))
        return cls(**values)


def _ceiling(name: str, default: int | None, hard: int) -> int | None:
    """The ceiling `name` as the operator set it (`ceiling_env(name)`), else `default`; refused
    unless it is a whole number from 1 to `hard`."""
    variable = ceiling_env(name)
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw[:40]!r} is not a whole number") from None
    if not 1 <= value <= hard:
        raise ConfigError(f"{variable}={value}: a ceiling runs from 1 to its hard limit of {hard}")
    return value


@dataclass(frozen=True)
class JobCeilings:
    """The most a job may ask for where the bound is the operator's policy, not a sanity limit.

    Each has a default (today's bound; `rows`: none) that the operator lowers or raises, up to its
    hard limit (`hard_limit`, the schema's own bound), with `ceiling_env(field)`: SPIDER_MAX_ROWS,
    SPIDER_MAX_DUPLICATIONS, SPIDER_MAX_TOKENS, SPIDER_MAX_BATCH_SIZE,
    SPIDER_MAX_CONCURRENT_CONVERSATIONS, SPIDER_MAX_TOOL_TURNS, SPIDER_MAX_USER_TURNS. A job that
    asks for more is refused at submit with a 422 naming the field and the ceiling (`paths` says
    which fields each bounds); a source with more rows than `rows` fails the job when it is loaded."""

    rows: int | None = None
    duplications: int = 1024
    tokens: int = 1_000_000
    batch_size: int = 100_000
    concurrent_conversations: int = 4096
    tool_turns: int = 100
    user_turns: int = 100

    # The config fields (dotted, under `job`) each ceiling bounds.
    paths: ClassVar[dict[str, tuple[str, ...]]] = {
        "rows": ("source.max_examples",),
        "duplications": ("generation.duplications",),
        "tokens": ("generation.parameters.max_tokens", "generation.user.parameters.max_tokens",
                   "generation.on_policy_options.max_tokens"),
        "batch_size": ("generation.max_batch_size",),
        "concurrent_conversations": ("generation.max_concurrent_conversations",),
        "tool_turns": ("generation.max_tool_turns",),
        "user_turns": ("generation.user.max_turns",),
    }

    @staticmethod
    def hard_limit(name: str) -> int:
        from spider import config

        return {
            "rows": config.INT64_MAX,
            "duplications": config.HARD_MAX_DUPLICATIONS,
            "tokens": config.HARD_MAX_TOKENS,
            "batch_size": config.HARD_MAX_BATCH_SIZE,
            "concurrent_conversations": config.HARD_MAX_CONCURRENT_CONVERSATIONS,
            "tool_turns": config.HARD_MAX_TURNS,
            "user_turns": config.HARD_MAX_TURNS,
        }[name]

    @classmethod
    def from_env(cls) -> "JobCeilings":
        return cls(**{f.name: _ceiling(f.name, f.default, cls.hard_limit(f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class Policy:
    """The operator's allow-settings, read from the environment of the API and of every worker.

    * `allow_remote_code` (`SPIDER_ALLOW_REMOTE_CODE=1`): `trust_remote_code` in model parameters.
    * `model_dirs` (`SPIDER_MODEL_DIRS`, `:`-separated): local folders a job may name as a model.
    * `data_roots` (`SPIDER_DATA_ROOTS`): server folders a job may read as a source.
    * `allow_remote_data` (`SPIDER_ALLOW_REMOTE_DATA=1`): http(s) URLs in a source's `data_files`.
    * `allowed_hosts` (`SPIDER_ALLOWED_HOSTS`, comma-separated host names or IPs): hosts that outbound
      calls (openai engine `base_url`, jailed code with `runtime.network`) may reach even though
      they resolve to loopback, private or link-local addresses.
    * `sandbox_network` (`SPIDER_SANDBOX_NETWORK`, default on): whether `runtime.network: true` is
      honoured at all (egress to public addresses only, through the sandbox's egress proxy).
    * `allow_direct_url_packages` (`SPIDER_ALLOW_DIRECT_URL_PACKAGES=1`): `pkg @ URL` and VCS
      requirements in `runtime.packages`.
    * `package_index_hosts` (`SPIDER_PACKAGE_INDEX_HOSTS`): hosts dependency builds may reach
      (default: the hosts of PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, else pypi.org and
      files.pythonhosted.org).
    * `ceilings`: the most a job may ask for in `runtime.limits`.
    * `job_ceilings`: the most a job may ask for in rows, samples, tokens, batch size, concurrent
      conversations and turns.
    """

    allow_remote_code: bool = False
    model_dirs: tuple[Path, ...] = ()
    data_roots: tuple[Path, ...] = ()
    allow_remote_data: bool = False
    allowed_hosts: tuple[str, ...] = ()
    sandbox_network: bool = True
    allow_direct_url_packages: bool = False
    package_index_hosts: tuple[str, ...] = field(default_factory=lambda: default_index_hosts())
    ceilings: LimitCeilings = field(default_factory=LimitCeilings)
    job_ceilings: JobCeilings = field(default_factory=JobCeilings)

    @classmethod
    def from_env(cls) -> "Policy":
        network = os.environ.get("SPIDER_SANDBOX_NETWORK", "1").strip().lower() in TRUE
        return cls(
            allow_remote_code=_flag("SPIDER_ALLOW_REMOTE_CODE"),
            model_dirs=_paths("SPIDER_MODEL_DIRS"),
            data_roots=_paths("SPIDER_DATA_ROOTS"),
            allow_remote_data=_flag("SPIDER_ALLOW_REMOTE_DATA"),
            allowed_hosts=_words("SPIDER_ALLOWED_HOSTS"),
            sandbox_network=network,
            allow_direct_url_packages=_flag("SPIDER_ALLOW_DIRECT_URL_PACKAGES"),
            package_index_hosts=_words("SPIDER_PACKAGE_INDEX_HOSTS") or default_index_hosts(),
            ceilings=LimitCeilings.from_env(),
            job_ceilings=JobCeilings.from_env(),
        )


def default_index_hosts() -> tuple[str, ...]:
    """The hosts pip is configured to use on this worker (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL), else PyPI's."""
    from urllib.parse import urlsplit

    hosts = []
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        for url in os.environ.get(name, "").split():
            host = urlsplit(url).hostname
            if host:
                hosts.append(host.lower())
    return tuple(hosts) or ("pypi.org", "files.pythonhosted.org")


def within(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path` (resolved, links followed) lies inside one of `roots`."""
    resolved = Path(path).expanduser().resolve()
    return any(resolved == root or root in resolved.parents for root in roots)
