"""Spider's queue names and message priorities: the fixed queues, one rollout queue per model the
operator routes, and the priority of each message. Plain names, no Celery: the dispatcher, the
workers and the local stack all read them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from spider.errors import SpiderError

QUEUES = ("control", "rollout", "sandbox", "train")
ROLLOUT = "rollout"

# Message priorities. kombu's Redis transport keeps one list per step and a worker takes its next
# message from the lowest step that holds one: 0 first, 9 last. (Its `queue_order_strategy` is
# another thing: the order of a worker's queues within one step; round robin is kept.)
PRIORITY_STEPS = tuple(range(10))
# The separator kombu puts between a queue's name and its step in the names of its Redis lists.
PRIORITY_SEP = "\x06\x16"
# kombu's Redis transport keeps messages handed to a worker and not yet acknowledged in this hash.
UNACKED = "unacked"
WAITED_ON = 0  # a task another task waits for (a tool call, teacher scoring), and control stages


def batch_priority(batch_index: int) -> int:
    """The priority of a job's batch `batch_index`: 1 for its first batch, one step later per
    doubling after it (2 for batches 1-2, 3 for 3-6, ..., 9 from batch 255 on).

    All of a job's batches are queued at once, when it is planned. Were they all equal, a job
    planned after a 100k-row one would wait for every one of its batches; this way its first
    batches go ahead of the long job's later ones, and each job's batches still run in order."""
    return min(PRIORITY_STEPS[-1], 1 + (batch_index + 1).bit_length() - 1)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s messages, one per priority step: a queue's depth is the
    sum of their lengths."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def model_queue(model_name: str) -> str:
    """The rollout queue of the workers that serve `model_name`: `rollout.<slug>-<hash>`.

    Model names are user input; the queue name is safe as a Redis key and a Celery queue whatever
    the name holds. The slug is the name's last 40 characters, lowercased, each run of anything
    but letters, digits and `_` made one `-` (readable in Flower and redis-cli); a hash of the
    whole name keeps two names with the same slug apart."""
    digest = hashlib.sha256(model_name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9_]+", "-", model_name.lower())[-40:].strip("-_")
    return f"{ROLLOUT}.{slug}-{digest}" if slug else f"{ROLLOUT}.{digest}"


def worker_queues(queues: Iterable[str], models: Iterable[str] = (), routed: Iterable[str] = ()) -> list[str]:
    """The Celery queues a worker started for `queues` (and `models`) consumes.

    With `models`, the worker's `rollout` is the queues of those models instead of the default
    one: it runs their jobs' batches and teacher scoring, and nothing else. Each model must be one
    the dispatchers route (`routed`, from SPIDER_ROUTED_MODELS), or no task would ever reach it."""
    queues = list(dict.fromkeys(q.strip() for q in queues if q.strip()))
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise SpiderError(f"unknown queues {unknown}; choose from {', '.join(QUEUES)}")
    if not models:
        return queues
    if ROLLOUT not in queues:
        raise SpiderError("--models chooses the models a rollout worker serves: add rollout to --queues")
    unrouted = [m for m in models if m not in set(routed)]
    if unrouted:
        raise SpiderError(
            f"models {unrouted} are not in SPIDER_ROUTED_MODELS, so their jobs go to the default rollout "
            "queue and never to this worker: add them to SPIDER_ROUTED_MODELS, the same on every Spider "
            "process (API and workers)"
        )
    return [q for q in queues if q != ROLLOUT] + [model_queue(m) for m in models]


def worker_label(queues: Iterable[str], models: Iterable[str] = ()) -> str:
    """A worker's queues and models in a few readable characters (`rollout`, `control-sandbox`,
    `rollout-tiny-1a2b3c4d5e6f`), for its process and Celery names."""
    parts = [q.strip() for q in queues if q.strip()]
    return "-".join(parts + [model_queue(m).removeprefix(f"{ROLLOUT}.") for m in models if m.strip()])
