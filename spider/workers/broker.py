"""What the broker holds of a job: its messages waiting in a queue, or handed to a worker and not
yet acknowledged (kombu's Redis transport keeps those in the `unacked` hash until the task ends,
and puts them back in their queue if their worker dies)."""

from __future__ import annotations

from typing import Iterable, Iterator

import redis

from spider.queues import UNACKED, queue_keys

CHUNK = 500


def holds(client: redis.Redis, job_id: str, queues: Iterable[str]) -> bool:
    """Whether a message of the job is queued or delivered and unacknowledged. Every task of a job
    takes the job id as its first argument, which Celery's `argsrepr` header starts with, in plain
    text: so this reads messages, never decodes them (the unacknowledged ones first: few, one per
    running task; then the queues). Only the start of the header counts, so a job id that another
    job put in its own arguments (a tool call's, say) does not count."""
    needle = owned_by(job_id)
    for raw in _unacked(client):
        if needle in raw:
            return True
    for key in (key for queue in queues for key in queue_keys(queue)):
        for chunk in _chunks(client, key):
            if any(needle in raw for raw in chunk):
                return True
    return False


def owned_by(job_id: str) -> str:
    """What the raw text (kombu's JSON) of a message of the job holds: its `argsrepr` header,
    `('<job id>', ...)`, from its start."""
    return '"argsrepr": "(' + repr(job_id)


def _unacked(client: redis.Redis) -> Iterator[str]:
    for _, raw in client.hscan_iter(UNACKED, count=CHUNK):
        yield raw if isinstance(raw, str) else raw.decode(errors="replace")


def _chunks(client: redis.Redis, key: str) -> Iterator[list[str]]:
    start = 0
    while True:
        chunk = client.lrange(key, start, start + CHUNK - 1)
        if not chunk:
            return
        yield [raw if isinstance(raw, str) else raw.decode(errors="replace") for raw in chunk]
        start += CHUNK
