"""What the broker holds of a job: its messages waiting in a queue, or handed to a worker and not
yet acknowledged (kombu's Redis transport keeps those in the `unacked` hash until the task ends,
and puts them back in their queue if their worker dies)."""

from __future__ import annotations

from typing import Iterable, Iterator

import redis

from spider.queues import UNACKED, queue_keys

CHUNK = 500


def holds(client: redis.Redis, job_id: str, queues: Iterable[str]) -> bool:
    """Whether a message of the job is queued or delivered and unacknowledged. A message names its
    job in plain text (Celery's `argsrepr` header), so this reads messages, never decodes them:
    the unacknowledged ones first (few: one per running task), then the queues."""
    for raw in _unacked(client):
        if job_id in raw:
            return True
    for key in (key for queue in queues for key in queue_keys(queue)):
        for chunk in _chunks(client, key):
            if any(job_id in raw for raw in chunk):
                return True
    return False


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
