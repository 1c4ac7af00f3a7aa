"""The one Celery app on the Redis from settings: Spider's queues (spider.queues), with the rollout
queue of every model the operator routes, and the message priorities that share the workers
between jobs."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from spider.queues import PRIORITY_SEP, PRIORITY_STEPS, QUEUES, model_queue
from spider.settings import Settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("spider", broker=settings.redis_url, include=["spider.workers.tasks"])
    app.conf.update(
        task_queues=[Queue(name) for name in (*QUEUES, *map(model_queue, settings.routed_models))],
        task_default_queue="control",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # With late acks a worker holds no more messages than it runs, so a message with a better
        # priority queued later is the next one any free worker takes.
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A task whose worker died is handed out again after this long; tasks are idempotent, so a
        # slow task outliving it only costs duplicate work, never duplicate rows.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu looks for messages whose worker died every interval x throttle seconds (100 s by
            # default, whatever the visibility timeout): sweep at a quarter of the timeout, at most
            # every 30 s, so a lost task runs again within about 1.25x the visibility timeout.
            "unacked_restore_interval": max(1, min(30, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
        },
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


celery_app = make_celery()
