"""User code under firejail: processors and tools of a job, run on sandbox workers only.

`Sandbox` is a worker's sandbox; `Sandbox.open_job` returns the `JobSandbox` that runs one job's
pre/post processors in batches and its tools one call at a time. Every failure of user code is an
`Outcome` / `ToolOutcome` carrying a `CallError`, never an exception of the caller.
"""

from spider.sandbox.outcomes import CallError, Outcome, ToolOutcome
from spider.sandbox.sandbox import JobSandbox, Sandbox, default_root

__all__ = ["CallError", "JobSandbox", "Outcome", "Sandbox", "ToolOutcome", "default_root"]
