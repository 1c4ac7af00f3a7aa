"""Admission: what a job may ask for, checked at submit against the operator's policy.

`admit` refuses (ConfigError, a 422 at the API) every config field that would let a job reach past
what it carried: engine parameters outside each provider's list, remote code, local model folders
and data files the operator did not open, unsafe dataset options, outbound hosts that are not
public, and `runtime.limits` above the operator's ceilings.
"""

from __future__ import annotations

from spider.config import JobConfig
from spider.policy import Policy


def admit(job: JobConfig, policy: Policy, source_files: list[str] | None = None) -> None:
    """Raise ConfigError naming every field of `job` that `policy` does not allow.

    `source_files` are the names of the files uploaded with the job (its source, when present)."""
