"""Progress events: published by whoever makes progress, stored durably per job and fanned out live.

Each event is appended to a capped Redis stream (`spider:events:<job>`: the history, whose entry id
is the event id) and published on a pub/sub channel (`spider:live:<job>`) for live followers. A
follower subscribes first, then replays the stream, then drops live duplicates by id: nothing is
missed between replay and live.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

import redis
import redis.asyncio as aioredis

from spider.types import Event

log = logging.getLogger(__name__)

TERMINAL_KINDS = ("job.completed", "job.failed", "job.cancelled")


def stream_key(job_id: str) -> str:
    return f"spider:events:{job_id}"


def channel(job_id: str) -> str:
    return f"spider:live:{job_id}"


def _id_tuple(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class EventBus:
    """Publishes and reads a job's events. `history` caps the stored events per job."""

    def __init__(self, client: redis.Redis, history: int = 10_000):
        self.r = client
        self.history = history

    def publish(
        self,
        job_id: str,
        kind: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> Event:
        body = {"ts": time.time(), "kind": kind, "level": level, "message": message, "data": data or {}}
        event_id = self.r.xadd(stream_key(job_id), {"e": json.dumps(body)}, maxlen=self.history, approximate=True)
        if isinstance(event_id, bytes):
            event_id = event_id.decode()
        event = Event(id=event_id, job_id=job_id, **body)
        self.r.publish(channel(job_id), json.dumps(event.to_dict()))
        log.log(logging.getLevelName(level.upper()), "[%s] %s %s", job_id, kind, message)
        return event

    def replay(self, job_id: str, after: str | None = None) -> list[Event]:
        start = f"({after}" if after else "-"
        return [_decode(job_id, eid, fields) for eid, fields in self.r.xrange(stream_key(job_id), min=start)]

    def delete(self, job_id: str) -> None:
        self.r.delete(stream_key(job_id))


def _decode(job_id: str, event_id: Any, fields: dict[Any, Any]) -> Event:
    if isinstance(event_id, bytes):
        event_id = event_id.decode()
    raw = fields.get("e") or fields.get(b"e")
    return Event(id=event_id, job_id=job_id, **json.loads(raw))


async def follow(
    client: aioredis.Redis,
    job_id: str,
    after: str | None = None,
    is_finished: Any = None,
    keepalive: float = 15.0,
) -> AsyncIterator[Event | None]:
    """Yield the job's events after `after`: the stored history, then live ones, until a terminal
    event. Yields None every `keepalive` seconds of silence (so servers can send a heartbeat).
    `is_finished` is an async callable checked on silence, to stop following a job that ended
    without a terminal event in the stream (e.g. its history was trimmed)."""
    pubsub = client.pubsub()
    await pubsub.subscribe(channel(job_id))
    try:
        last = after
        start = f"({after}" if after else "-"
        for eid, fields in await client.xrange(stream_key(job_id), min=start):
            event = _decode(job_id, eid, fields)
            last = event.id
            yield event
            if event.kind in TERMINAL_KINDS:
                return
        if is_finished is not None and await is_finished():
            # Ended, and its terminal event is not after `after`: nothing more will come.
            for eid, fields in await client.xrange(stream_key(job_id), min=f"({last}" if last else "-"):
                yield _decode(job_id, eid, fields)
            return
        quiet_since = time.monotonic()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=keepalive)
            if message is None:
                # None also comes back at once for a swallowed subscribe confirmation: only a real
                # silence counts.
                if time.monotonic() - quiet_since < keepalive:
                    continue
                quiet_since = time.monotonic()
                if is_finished is not None and await is_finished():
                    # Events published between the last live one and now are in the stream.
                    start = f"({last}" if last else "-"
                    for eid, fields in await client.xrange(stream_key(job_id), min=start):
                        yield _decode(job_id, eid, fields)
                    return
                yield None
                continue
            quiet_since = time.monotonic()
            data = json.loads(message["data"])
            event = Event(**data)
            if last is not None and _id_tuple(event.id) <= _id_tuple(last):
                continue
            last = event.id
            yield event
            if event.kind in TERMINAL_KINDS:
                return
    finally:
        await pubsub.unsubscribe(channel(job_id))
        await pubsub.aclose()
