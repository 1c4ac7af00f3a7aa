"""Progress events: published by whoever makes progress, stored durably per job and fanned out live.

Each event is appended to a capped Redis stream (`Keys.events`: the history, whose entry id is the
event id) and published on a pub/sub channel (`Keys.live`) for live followers. A follower
subscribes first, then replays the stream, then drops live duplicates by id: nothing is missed
between replay and live. The event that ends a job also gives its history a time to live.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

import redis
import redis.asyncio as aioredis

from spider.keys import DEFAULT_KEYS, Keys
from spider.types import ENDING_KINDS, Event

log = logging.getLogger(__name__)


class EventBus:
    """Publishes and reads a job's events. `history` caps the stored events per job; `ended_ttl`
    (seconds, None or 0 for never) is how long the history of an ended job is kept: JobStore gives
    the stream its job's own time to live when the job ends, and this one when the ending event
    is published (Settings.event_ttl_s, never longer than the job's)."""

    def __init__(
        self, client: redis.Redis, history: int = 10_000, ended_ttl: int | None = None, keys: Keys = DEFAULT_KEYS
    ):
        self.r = client
        self.history = history
        self.ended_ttl = ended_ttl
        self.keys = keys

    def publish(
        self,
        job_id: str,
        kind: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> Event:
        body = {"ts": time.time(), "kind": str(kind), "level": level, "message": message, "data": data or {}}
        stream = self.keys.events(job_id)
        pipe = self.r.pipeline()
        pipe.xadd(stream, {"e": json.dumps(body)}, maxlen=self.history, approximate=True)
        if kind in ENDING_KINDS and self.ended_ttl:
            pipe.expire(stream, self.ended_ttl)  # the history of an ended job is kept this long
        event_id = pipe.execute()[0]
        if isinstance(event_id, bytes):
            event_id = event_id.decode()
        event = Event(id=event_id, job_id=job_id, **body)
        self.r.publish(self.keys.live(job_id), json.dumps(event.to_dict()))
        log.log(logging.getLevelName(level.upper()), "[%s] %s %s", job_id, kind, message)
        return event

    def replay(self, job_id: str, after: str | None = None) -> list[Event]:
        return [_decode(job_id, eid, fields) for eid, fields in self.r.xrange(self.keys.events(job_id), min=_bound(after))]

    def last(self, job_id: str) -> Event | None:
        """The job's newest stored event, if any."""
        newest = self.r.xrevrange(self.keys.events(job_id), count=1)
        return _decode(job_id, *newest[0]) if newest else None

    def delete(self, job_id: str) -> None:
        self.r.delete(self.keys.events(job_id))


def _bound(after: str | None) -> str:
    """The XRANGE lower bound for events strictly after `after` (all events when None)."""
    return f"({after}" if after else "-"


def _decode(job_id: str, event_id: Any, fields: dict[Any, Any]) -> Event:
    if isinstance(event_id, bytes):
        event_id = event_id.decode()
    raw = fields.get("e") or fields.get(b"e")
    return Event(id=event_id, job_id=job_id, **json.loads(raw))


async def _history(client: aioredis.Redis, stream: str, job_id: str, after: str | None) -> list[Event]:
    return [_decode(job_id, eid, fields) for eid, fields in await client.xrange(stream, min=_bound(after))]


async def _next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    """The next pub/sub message, or None after `timeout` seconds of silence. (`get_message` also
    returns None at once when it swallows a subscribe confirmation: that is not silence.)"""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            return message
    return None


async def follow(
    client: aioredis.Redis,
    job_id: str,
    after: str | None = None,
    is_finished: Any = None,
    keepalive: float = 15.0,
    keys: Keys = DEFAULT_KEYS,
) -> AsyncIterator[Event | None]:
    """Yield the job's events after `after`: the stored history, then live ones, until a terminal
    event. Yields None every `keepalive` seconds of silence (so servers can send a heartbeat).
    `is_finished` is an async callable checked on silence, to stop following a job that ended
    without a terminal event in the stream (e.g. its history was trimmed)."""
    stream, live = keys.events(job_id), keys.live(job_id)
    pubsub = client.pubsub()
    await pubsub.subscribe(live)
    try:
        last = after
        for event in await _history(client, stream, job_id, after):
            last = event.id
            yield event
            if event.kind in ENDING_KINDS:
                return

        async def ended() -> bool:
            return is_finished is not None and await is_finished()

        # Checked before listening (an ended job whose terminal event is not after `after`) and
        # after each silence; then whatever was published since the last event is in the stream.
        finished = await ended()
        while not finished:
            message = await _next_message(pubsub, keepalive)
            if message is None:
                finished = await ended()
                if not finished:
                    yield None
                continue
            # A live message only says that something was published: what it was, and in which
            # order, is read from the stream, so a follower sees exactly the history's order even
            # when several processes publish at once.
            for event in await _history(client, stream, job_id, last):
                last = event.id
                yield event
                if event.kind in ENDING_KINDS:
                    return
        for event in await _history(client, stream, job_id, last):
            yield event
    finally:
        await pubsub.unsubscribe(live)
        await pubsub.aclose()
