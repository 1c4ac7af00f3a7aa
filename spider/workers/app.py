"""The one Celery app on the Redis from settings: Spider's queues (spider.queues), with the rollout
queue of every model the operator routes, and the message priorities that share the workers
between jobs."""

from __future__ import annotations

import logging
import sys

from celery import Celery, signals
from kombu import Queue

from spider.logs import reset_job, set_job, use_json_logs
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


# The log context of each running task, by task id: while a task whose first argument is a job id
# runs, every log line of its thread carries that job id (spider.logs).
_task_jobs: dict[str, object] = {}


@signals.task_prerun.connect
def _log_the_tasks_job(task_id: str, args: tuple | None = None, **_: object) -> None:
    _task_jobs[task_id] = set_job(args[0] if args else None)


@signals.task_postrun.connect
def _end_the_tasks_job(task_id: str, **_: object) -> None:
    reset_job(_task_jobs.pop(task_id, None))


def log_json(nodename: str) -> None:
    """Make the worker about to start log JSON lines (spider.logs) under its node name instead of
    Celery's own format; what its code prints still becomes log lines, as Celery's default does."""

    use_json_logs(nodename)  # now: the warnings of the worker's start are log records too

    def setup(loglevel: int | str | None = None, **_: object) -> None:
        logging.getLogger().setLevel(loglevel or logging.INFO)
        celery_app.log.redirect_stdouts(celery_app.conf.worker_redirect_stdouts_level)
        # Celery writes its shutdown notice straight to sys.__stdout__, which would be the one line
        # not in JSON: it goes nowhere, and `shutting_down` logs it instead.
        sys.__stdout__ = sys.stdout

    def shutting_down(sig: str = "", how: str = "", **_: object) -> None:
        logging.getLogger("spider.worker").info("%s shutdown (%s)", how, sig)

    signals.setup_logging.connect(setup, weak=False)
    signals.worker_shutting_down.connect(shutting_down, weak=False)
