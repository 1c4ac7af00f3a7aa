"""Every Redis key Spider writes, named in one place (the Celery broker's own keys excepted).

Keys share one prefix (`spider` by default). Only strings in the format of a job id ever become
part of a job's key, so a forged id can never name another key.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

# A job id: 16 lowercase hex digits of a uuid4 (see new_job_id). Anything else never names a key.
JOB_ID = re.compile(r"[0-9a-f]{16}")


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def is_job_id(value: object) -> bool:
    """Whether `value` has the format of a job id; only such strings are ever made into keys or paths."""
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


def checked_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r:.40}")
    return job_id


@dataclass(frozen=True)
class Keys:
    """The names of Spider's Redis keys under `prefix`."""

    prefix: str = "spider"

    def job(self, job_id: str, part: str = "") -> str:
        """The job's record hash, or one of its parts: `secrets`, `progress`, `done`, `finalize`."""
        return f"{self.prefix}:job:{checked_job_id(job_id)}{':' + part if part else ''}"

    def owner_jobs(self, owner: str) -> str:
        """The sorted set of an owner's job ids, by creation time."""
        return f"{self.prefix}:jobs:{owner}"

    def active_jobs(self) -> str:
        """The sorted set of queued and running job ids, by the time each last moved."""
        return f"{self.prefix}:active"

    def reconciler_lock(self) -> str:
        """Held by the one control worker whose reconciler pass is running."""
        return f"{self.prefix}:reconciler"

    def events(self, job_id: str) -> str:
        """The job's event history (a capped stream)."""
        return f"{self.prefix}:events:{checked_job_id(job_id)}"

    def live(self, job_id: str) -> str:
        """The pub/sub channel of the job's live events."""
        return f"{self.prefix}:live:{checked_job_id(job_id)}"

    def score_request(self, request_id: str) -> str:
        """The token sequences a trainer asks the job's teacher (on rollout workers) to score."""
        return f"{self.prefix}:score-request:{request_id}"

    def score_reply(self, request_id: str) -> str:
        """The list the teacher's scores are pushed to."""
        return f"{self.prefix}:score-reply:{request_id}"

    def tool_reply(self, call_id: str) -> str:
        """The list a tool call's answer is pushed to."""
        return f"{self.prefix}:tool-reply:{call_id}"

    def jobs_in(self, status: str) -> str:
        """The set of the ids of every job now in an active status (`queued`, `running`)."""
        return f"{self.prefix}:stats:jobs:{status}"

    def jobs_ended(self) -> str:
        """The hash of how many jobs ever ended, by status (`completed`, `failed`, `cancelled`)."""
        return f"{self.prefix}:stats:ended"

    def work_done(self) -> str:
        """The hash of what every job's finished batches added up to, server-wide (rows, tokens, ...)."""
        return f"{self.prefix}:stats:work"


DEFAULT_KEYS = Keys()
