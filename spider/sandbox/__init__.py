"""User code under firejail: processors and tools of a job, run on sandbox workers only.

`Sandbox` is a worker's sandbox; `Sandbox.open_job` returns the `JobSandbox` that runs one job's
pre/post processors in batches and its tools one call at a time. Every failure of user code is an
`Outcome` / `ToolOutcome` carrying a `CallError`, never an exception of the caller.

What a job's `runtime` section controls: `packages` (pip requirements, installed once per distinct
set into a cached venv), `env` (variables for its code, beside the secrets it was sent with),
`network` (off by default: jails get an empty network namespace and unix sockets only; `network:
true` still keeps them in a namespace of their own, with egress through the worker's proxy
(spider.sandbox.egress) to public addresses only, for tools that call remote services),
and `limits`: `memory_mb` (address space per process), `cpu_seconds` (CPU time per call; a batch
of n rows gets n budgets), `call_timeout_s` (wall clock per call or row), `max_processes` (for
all of the job's processes on the host), `file_size_mb` (largest file written), `disk_mb` and
`max_files` (a tmpfs quota on the job's scratch dir) and `output_mb` (what one call or batch may
send back, counted as its decoded cost: see spider.sandbox.jailed.answer_cost). The operator caps
each with a ceiling (spider.policy).
"""

from spider.sandbox.outcomes import CallError, Outcome, ToolOutcome
from spider.sandbox.pool import JobSandbox
from spider.sandbox.sandbox import Sandbox, default_root

__all__ = ["CallError", "JobSandbox", "Outcome", "Sandbox", "ToolOutcome", "default_root"]
