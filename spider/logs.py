"""The logs of Spider's processes (API, workers, Flower): plain text by default, or one JSON object
per line with `SPIDER_LOG_FORMAT=json` (or `--log-format json`), each line carrying the job it is
about (`job_id`) whenever it is about one.

The job comes from a context variable: a worker sets it for the duration of a task whose first
argument is a job id (spider.workers.app connects the Celery signals), the API for a request to
`/v1/jobs/{job_id}...`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import Any

from spider.errors import SpiderError
from spider.keys import is_job_id

LOG_FORMAT_ENV = "SPIDER_LOG_FORMAT"
LOG_FORMATS = ("text", "json")

# The job the code running now works for (None outside any job).
current_job: ContextVar[str | None] = ContextVar("spider_job_id", default=None)

_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)")


def log_format(given: str | None = None) -> str:
    """The log format asked for: `given` (a command's --log-format), else $SPIDER_LOG_FORMAT, else text."""
    chosen = (given or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if chosen not in LOG_FORMATS:
        raise SpiderError(f"unknown log format {chosen!r} ({LOG_FORMAT_ENV} or --log-format): "
                          f"choose {' or '.join(LOG_FORMATS)}")
    return chosen


def set_job(job_id: object) -> Token | None:
    """Make `job_id` the current job, if it is one; returns what `reset_job` needs to undo it."""
    return current_job.set(job_id) if is_job_id(job_id) else None


def reset_job(token: Token | None) -> None:
    if token is not None:
        current_job.reset(token)


@contextmanager
def about_job(job_id: object) -> Iterator[None]:
    """Within, every log line carries `job_id` (when it is a job id)."""
    token = set_job(job_id)
    try:
        yield
    finally:
        reset_job(token)


def job_of_path(path: str) -> str | None:
    """The job id a request path is about (`/v1/jobs/<id>...`), if it names one."""
    match = _JOB_PATH.match(path)
    return match[1] if match and is_job_id(match[1]) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, process (the
    Spider process: `api`, a worker's node name, `flower`), pid, and job_id when there is one;
    `exception` holds a traceback. ASCII only, so that no reader splits a line inside a message."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        job_id = getattr(record, "job_id", None) or current_job.get()
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def use_json_logs(process: str, level: int | str = logging.INFO) -> None:
    """Send every log record of this process, one JSON line each, to its standard error.

    Libraries that would print their own way are asked to log instead: vLLM through the root
    logger (VLLM_CONFIGURE_LOGGING=0), Python's warnings as log records."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ[LOG_FORMAT_ENV] = "json"  # for the processes this one starts


class JobLogContext:
    """ASGI middleware: while the API answers a request about a job (`/v1/jobs/{job_id}...`),
    every log line carries that job id, the access log's included."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with about_job(job_of_path(scope.get("path", ""))):
            await self.app(scope, receive, send)
