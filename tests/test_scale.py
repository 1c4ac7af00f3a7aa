"""Scale and routing: several rollout workers share a queue, a routed model's jobs run only on the
workers that serve it, and a short job is not starved by a long one queued before it.

The routing and priority rules are checked where the messages land (real Redis, real kombu); the
rest on real worker processes, whose own task events (what Flower shows) say which worker took
which task."""

from __future__ import annotations

import ast
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings as hsettings, strategies as st

from spider.client import SpiderClient
from spider.config import AppConfig, JobConfig
from spider.errors import SpiderError
from spider.jobs.store import JobStore
from spider.local import LocalStack, WorkerSpec, scaled_workers, worker_names
from spider.settings import Settings, routed_models
from spider.queues import PRIORITY_STEPS, ROLLOUT, batch_priority, model_queue, queue_keys, worker_queues
from spider.workers.app import make_celery
from spider.workers.tasks import CeleryDispatcher
from tests.conftest import API_KEYS
from tests.helpers import read_jsonl

ALICE = API_KEYS[0]


# -- queue names, worker queues, priorities -------------------------------------------------------


@given(st.text(max_size=300))
@hsettings(max_examples=300, deadline=None)
def test_model_queue_names_are_safe_short_and_stable(name):
    queue = model_queue(name)
    prefix, _, rest = queue.partition(".")
    assert prefix == ROLLOUT and len(queue) <= len("rollout.") + 40 + 1 + 12
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in rest), queue
    assert model_queue(name) == queue


def test_model_queue_names_keep_different_models_apart():
    # Same slug, different names: the hash tells them apart.
    names = ["Org/Model", "org/model", "org model", "org//model", "a" * 100 + "org/model", "/models/org/model"]
    assert len({model_queue(n) for n in names}) == len(names)
    assert model_queue("HuggingFaceTB/SmolLM2-135M-Instruct").startswith("rollout.huggingfacetb-smollm2-135m-instruct-")


def test_routed_models_setting_is_a_list_of_exact_names():
    env = {"SPIDER_ROUTED_MODELS": " org/big , org/small,,org/big "}
    assert routed_models(env) == ("org/big", "org/small")
    assert routed_models({}) == ()


def test_a_worker_serves_the_queues_of_its_models_only():
    routed = ("org/big", "org/small")
    assert worker_queues(["rollout"]) == ["rollout"]
    assert worker_queues(["rollout", "sandbox"], ["org/big"], routed) == ["sandbox", model_queue("org/big")]
    assert worker_queues(["rollout"], ["org/big", "org/small"], routed) == [model_queue("org/big"), model_queue("org/small")]
    with pytest.raises(SpiderError, match="SPIDER_ROUTED_MODELS"):
        worker_queues(["rollout"], ["org/other"], routed)  # its jobs would never reach it
    with pytest.raises(SpiderError, match="add rollout to --queues"):
        worker_queues(["sandbox"], ["org/big"], routed)
    with pytest.raises(SpiderError, match="unknown queues"):
        worker_queues(["rollout", "gpu"])


def test_spider_up_takes_its_rollout_workers_from_its_flags(capsys):
    from spider.cli import build_parser, main

    args = build_parser().parse_args(["up", "--rollout-workers", "2", "--model-worker", "org/big"])
    specs = scaled_workers(args.rollout_workers, tuple(args.model_worker))
    assert [(s.queues, s.models) for s in specs if "rollout" in s.queues] == [
        ("rollout", ()), ("rollout", ()), ("rollout", ("org/big",))]
    assert main(["up", "--rollout-workers", "-1"]) == 2
    assert "0 or more" in capsys.readouterr().err


def test_the_cli_refuses_a_worker_for_a_model_nobody_routes(monkeypatch, capsys):
    from spider.cli import main

    monkeypatch.setenv("SPIDER_ROUTED_MODELS", "org/small")
    assert main(["worker", "--queues", "rollout", "--models", "org/big"]) == 2
    assert "not in SPIDER_ROUTED_MODELS" in capsys.readouterr().err


def test_batch_priorities_keep_a_jobs_order_and_let_a_new_job_ahead():
    levels = [batch_priority(i) for i in range(100_000)]
    assert levels == sorted(levels)  # a job's own batches keep their order
    assert levels[0] == 1 and levels[-1] == PRIORITY_STEPS[-1] and set(levels) <= set(PRIORITY_STEPS)
    # A job planned behind a long one runs its first batch ahead of all but the long job's first,
    # and its first 8 batches ahead of all but the long job's first 8.
    assert all(levels[0] < level for level in levels[1:])
    assert all(levels[7] < level for level in levels[15:])


def test_local_stack_names_several_workers_of_one_queue():
    specs = scaled_workers(3, ("org/big",))
    names = worker_names(specs)
    assert names[:4] == ["worker-control", "worker-rollout", "worker-rollout-2", "worker-rollout-3"]
    assert names[-1] == f"worker-rollout-{model_queue('org/big').removeprefix('rollout.')}"
    assert len(set(names)) == len(names)
    assert worker_names((WorkerSpec("rollout", name="gpu-0"), WorkerSpec("rollout"))) == ["gpu-0", "worker-rollout"]
    with pytest.raises(SpiderError, match="named 'gpu-0'"):
        LocalStack(workers=(WorkerSpec("rollout", name="gpu-0"), WorkerSpec("sandbox", name="gpu-0")))


# -- where the dispatcher puts messages (real Redis) ---------------------------------------------


def dataset_job(model: str, user_model: str | None = None, rows: int = 4) -> dict[str, Any]:
    generation: dict[str, Any] = {"max_batch_size": 1}
    if user_model is not None:
        generation["user"] = {"model": {"provider": "hf", "name": user_model}}
    return {
        "model": {"provider": "hf", "name": model},
        "source": {"dataset": "prompts.jsonl", "field": "question"},
        "generation": generation,
    }


def on_policy_job(student: str, teacher: str) -> dict[str, Any]:
    return {
        "model": {"provider": "hf", "name": student},
        "source": {"dataset": "prompts.jsonl", "field": "question"},
        "generation": {"on_policy": True, "on_policy_options": {"teacher": {"provider": "hf", "name": teacher}}},
    }


@pytest.fixture
def broker(redis_url):
    """A Redis database of its own (queues are global names), emptied after the test."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()


def depth(client: redis.Redis, queue: str) -> dict[int, int]:
    """How many messages `queue` holds at each priority step (those that hold any)."""
    return {step: n for step, key in zip(PRIORITY_STEPS, queue_keys(queue)) if (n := client.llen(key))}


def test_dispatch_routes_each_rollout_stage_by_its_jobs_models(broker, tmp_path):
    url, client = broker
    routed = ("org/big", "org/user-sim", "org/teacher")
    store = JobStore(client)
    dispatcher = CeleryDispatcher(store, routed, make_celery(Settings(redis_url=url, data_dir=tmp_path)))

    def job(config: dict[str, Any]) -> str:
        return store.create("owner", JobConfig.parse(config).model_dump(mode="json", exclude_none=True), {}, False).id

    big = job(dataset_job("org/big"))
    plain = job(dataset_job("org/plain"))
    both = job(dataset_job("org/big", user_model="org/user-sim"))
    user_only = job(dataset_job("org/plain", user_model="org/user-sim"))
    student = job(on_policy_job("org/big", "org/teacher"))
    unrouted_teacher = job(on_policy_job("org/big", "org/other-teacher"))
    for job_id in (big, plain, both, user_only):
        dispatcher.dispatch("dataset.rollout", job_id, 0)
    dispatcher.dispatch("on_policy.score", student, "request-1")
    dispatcher.dispatch("on_policy.score", unrouted_teacher, "request-2")
    dispatcher.dispatch("dataset.plan", big)

    def jobs_in(queue: str) -> list[str]:
        return [json.loads(m)["headers"]["argsrepr"] for key in queue_keys(queue) for m in client.lrange(key, 0, -1)]

    assert sorted(jobs_in(model_queue("org/big"))) == sorted([f"('{big}', 0)", f"('{both}', 0)"])
    assert jobs_in(model_queue("org/user-sim")) == [f"('{user_only}', 0)"]  # only its user model is routed
    assert jobs_in(model_queue("org/teacher")) == [f"('{student}', 'request-1')"]  # scoring follows the teacher
    assert sorted(jobs_in(ROLLOUT)) == sorted([f"('{plain}', 0)", f"('{unrouted_teacher}', 'request-2')"])
    assert jobs_in("control") == [f"('{big}',)"]  # control stages are never routed by model


def test_nothing_is_routed_without_the_setting_and_a_vanished_job_takes_the_default_queue(broker, tmp_path):
    url, client = broker
    store = JobStore(client)
    config = JobConfig.parse(dataset_job("org/big")).model_dump(mode="json", exclude_none=True)
    job_id = store.create("owner", config, {}, False).id
    app = make_celery(Settings(redis_url=url, data_dir=tmp_path))
    CeleryDispatcher(store, (), app).dispatch("dataset.rollout", job_id, 0)
    store.delete(job_id, "owner")
    CeleryDispatcher(store, ("org/big",), app).dispatch("dataset.rollout", job_id, 1)
    assert depth(client, ROLLOUT) == {1: 1, 2: 1}
    assert depth(client, model_queue("org/big")) == {}


def test_batches_are_queued_at_their_priority_and_waited_on_tasks_first(broker, tmp_path):
    url, client = broker
    settings = Settings(redis_url=url, data_dir=tmp_path)
    store = JobStore(client)
    job_id = store.create("owner", JobConfig.parse(dataset_job("org/plain")).model_dump(mode="json"), {}, False).id
    dispatcher = CeleryDispatcher(store, (), make_celery(settings))
    for batch in range(300):
        dispatcher.dispatch("dataset.rollout", job_id, batch)
        dispatcher.dispatch("dataset.preprocess", job_id, batch)
    dispatcher.dispatch("on_policy.score", job_id, "request")
    dispatcher.dispatch("tools.call", job_id, "call", "add", {"a": 1})
    expected = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 32, 7: 64, 8: 128, 9: 45}
    assert depth(client, ROLLOUT) == {0: 1, **expected}
    assert depth(client, "sandbox") == {0: 1, **expected}
    # kombu hands out the lowest step first: the waited-on task, then batch 0, then 1-2, ...
    app = make_celery(settings)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(ROLLOUT)
        taken = []
        for _ in range(4):
            message = queue.get(timeout=5)
            taken.append(ast.literal_eval(message.headers["argsrepr"])[1])
            message.ack()
        queue.close()
    assert taken == ["request", 0, 1, 2]


# -- on worker processes --------------------------------------------------------------------------


@dataclass
class TaskEvent:
    """A task sent to a queue (`task-sent`, from the process that dispatched it) or taken by a
    worker (`task-received`, from that worker)."""

    kind: str
    host: str  # the worker's Celery name, without `@host`
    task: str
    args: tuple[Any, ...]
    queue: str | None


class TaskEvents:
    """Every task the stack dispatches and its workers take while it listens, read from their task
    events, as Flower reads them."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.changed = threading.Condition()

    def add(self, kind: str, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append(TaskEvent(kind, event["hostname"].split("@")[0], event["name"],
                                         ast.literal_eval(event["args"]), event.get("queue")))
            self.changed.notify_all()

    def batches(self, job_id: str, kind: str = "task-received") -> list[TaskEvent]:
        with self.changed:
            return [e for e in self.events if e.kind == kind and e.task == "spider.run_batch" and e.args[0] == job_id]

    def taken_by(self, job_id: str) -> dict[str, list[int]]:
        """The batches of `job_id` each worker took."""
        taken: dict[str, list[int]] = {}
        for event in self.batches(job_id):
            taken.setdefault(event.host, []).append(event.args[1])
        return taken

    def wait_sent(self, job_id: str, count: int, timeout: float = 120) -> None:
        """Until `count` batches of `job_id` are on their queue."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.batches(job_id, "task-sent")) >= count, timeout), \
                f"only {len(self.batches(job_id, 'task-sent'))} of {count} batches of {job_id} were queued"


@contextlib.contextmanager
def task_events(redis_url: str) -> Iterator[TaskEvents]:
    """Listens to the stack's task events while within; yields once the workers' heartbeats
    arrive, so that no event is missed."""
    from celery import Celery

    app = Celery(broker=redis_url)
    seen = TaskEvents()
    listening = threading.Event()
    handlers = {
        "task-sent": lambda event: seen.add("task-sent", event),
        "task-received": lambda event: seen.add("task-received", event),
        "worker-heartbeat": lambda _: listening.set(),
    }
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers=handlers)
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": True},
                                  daemon=True)
        thread.start()
        assert listening.wait(60), "no worker heartbeat reached the event receiver"
        try:
            yield seen
        finally:
            receiver.should_stop = True
            thread.join(15)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Two models: `shared` on the default rollout queue, `routed` with a worker of its own."""
    from spider.testing import build_tiny_model

    return {"shared": tiny_model, "routed": build_tiny_model(tmp_path_factory.mktemp("routed-model") / "tiny", seed=1)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(64)))
    return path


ROLLOUT_SHARED = ("worker-rollout", "worker-rollout-2")


@pytest.fixture(scope="module")
def scale_stack(tmp_path_factory, models):
    """Two workers on the default rollout queue and one for the routed model, one batch at a time each."""
    workers = (
        WorkerSpec("control", "threads", 4),
        WorkerSpec("rollout", "threads", 1),
        WorkerSpec("rollout", "threads", 1),
        WorkerSpec("rollout", "threads", 1, models=(str(models["routed"]),), name="worker-routed"),
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with LocalStack(api_keys=API_KEYS, workers=workers, env=env, log_dir=tmp_path_factory.mktemp("scale-logs")) as stack:
        yield stack


def job_config(stack: LocalStack, model: Path, prompts: Path, rows: int, batch: int, max_tokens: int = 8) -> AppConfig:
    return AppConfig.parse({
        "server": {"base_url": stack.url, "api_key": ALICE, "request_timeout": 60},
        "job": {
            "model": {"provider": "hf", "name": str(model)},
            "source": {"dataset": str(prompts), "split": f"train[0:{rows}]", "field": "question"},
            "generation": {"parameters": {"temperature": 0.8, "max_tokens": max_tokens, "seed": 7},
                           "max_batch_size": batch},
        },
    })


def hostnames(stack: LocalStack, *names: str) -> set[str]:
    return {f"{name}-{stack.port}" for name in names}


@pytest.mark.slow
def test_two_workers_share_one_jobs_batches_and_every_row_is_written_once(scale_stack, models, prompts, tmp_path):
    config = job_config(scale_stack, models["shared"], prompts, rows=24, batch=2)
    with task_events(scale_stack.redis_url) as seen, SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, on_event=lambda e: None)
        assert status["status"] == "completed", status
        records = read_jsonl(client.download_result(job_id, tmp_path / "result.jsonl"))
    taken = seen.taken_by(job_id)
    assert set(taken) == hostnames(scale_stack, *ROLLOUT_SHARED), taken  # both took batches, the routed one none
    assert sorted(b for batches in taken.values() for b in batches) == list(range(12))
    assert [(r["row_index"], r["sample_index"]) for r in records] == [(i, 0) for i in range(24)]
    assert len({r["id"] for r in records}) == 24 and all(r["completion"] for r in records)


@pytest.mark.slow
def test_a_routed_models_job_runs_only_on_the_worker_that_serves_it(scale_stack, models, prompts, tmp_path):
    # The stack routes the model its worker serves, for every process that dispatches.
    assert routed_models(scale_stack.environment("api")) == (str(models["routed"]),)
    assert routed_models(scale_stack.environment("worker-control")) == (str(models["routed"]),)
    routed = job_config(scale_stack, models["routed"], prompts, rows=8, batch=2)
    shared = job_config(scale_stack, models["shared"], prompts, rows=8, batch=2)
    with task_events(scale_stack.redis_url) as seen:
        with SpiderClient(config=routed) as client:
            routed_id = client.submit_job()["job_id"]
        with SpiderClient(config=shared) as client:
            shared_id = client.submit_job()["job_id"]
            assert client.poll_job(shared_id, on_event=lambda e: None)["status"] == "completed"
        with SpiderClient(config=routed) as client:
            assert client.poll_job(routed_id, on_event=lambda e: None)["status"] == "completed"
            records = read_jsonl(client.download_result(routed_id, tmp_path / "routed.jsonl"))
    routed_worker = f"worker-routed-{scale_stack.port}"
    assert {e.queue for e in seen.batches(routed_id, "task-sent")} == {model_queue(str(models["routed"]))}
    assert seen.taken_by(routed_id).keys() == {routed_worker}
    assert sorted(seen.taken_by(routed_id)[routed_worker]) == [0, 1, 2, 3]
    assert {e.queue for e in seen.batches(shared_id, "task-sent")} == {ROLLOUT}
    assert seen.taken_by(shared_id).keys() <= hostnames(scale_stack, *ROLLOUT_SHARED)
    assert not [e for e in seen.events if e.host == routed_worker and e.args[0] != routed_id]
    assert [r["row_index"] for r in records] == list(range(8))


@pytest.mark.slow
def test_a_short_job_is_not_starved_by_a_long_one_queued_before_it(scale_stack, models, prompts):
    long_config = job_config(scale_stack, models["shared"], prompts, rows=64, batch=1, max_tokens=32)
    short_config = job_config(scale_stack, models["shared"], prompts, rows=1, batch=1)
    with task_events(scale_stack.redis_url) as seen, SpiderClient(config=long_config) as client:
        long_id = client.submit_job()["job_id"]
        seen.wait_sent(long_id, 64)  # every batch of the long job is queued
        with SpiderClient(config=short_config) as short_client:
            short_id = short_client.submit_job()["job_id"]
            assert short_client.poll_job(short_id, on_event=lambda e: None)["status"] == "completed"
        # Read after the short job completed: at most what the long job had done by then.
        done = client.get_job_status(long_id)["progress"]["batches_done"]
        client.cancel_job(long_id)
    # Queued in order, the short job's one batch would have waited for all 64.
    assert done <= 32, f"the long job had done {done} of its 64 batches before the short one's single batch"


def test_the_compose_files_model_specific_rollout_service_runs_a_valid_command():
    """docker-compose.yml shows a rollout service for one model's jobs, commented out: its command
    is one `spider worker` accepts."""
    import yaml

    from spider.cli import build_parser
    from tests.helpers import ROOT

    lines = (ROOT / "docker-compose.yml").read_text().split("\n")
    command = next(line for line in lines if line.strip().startswith("#") and '"--models"' in line)
    argv = yaml.safe_load(command.strip().lstrip("#").strip().removeprefix("command:").strip())
    args = build_parser().parse_args(argv[1:])
    model = args.models
    assert worker_queues(args.queues.split(","), [model], [model]) == [model_queue(model)]


@pytest.mark.slow
def test_a_routed_models_job_waits_for_a_worker_that_serves_it(scale_stack, models, prompts, tmp_path):
    """No worker of the model runs: its batches stay queued, idle workers of other models never
    take them, and they run once a worker of the model starts."""
    import signal

    routed = job_config(scale_stack, models["routed"], prompts, rows=4, batch=2)
    shared = job_config(scale_stack, models["shared"], prompts, rows=4, batch=2)
    scale_stack.kill("worker-routed", signal.SIGTERM)
    try:
        with task_events(scale_stack.redis_url) as seen:
            with SpiderClient(config=routed) as client:
                routed_id = client.submit_job()["job_id"]
                seen.wait_sent(routed_id, 2)
            # Meanwhile a job of the other model runs to its end on the idle default workers.
            with SpiderClient(config=shared) as client:
                shared_id = client.submit_job()["job_id"]
                assert client.poll_job(shared_id, on_event=lambda e: None)["status"] == "completed"
                assert client.get_job_status(routed_id)["progress"]["batches_done"] == 0
            assert seen.taken_by(routed_id) == {}
            scale_stack.restart("worker-routed")
            with SpiderClient(config=routed) as client:
                assert client.poll_job(routed_id, on_event=lambda e: None)["status"] == "completed"
                records = read_jsonl(client.download_result(routed_id, tmp_path / "routed.jsonl"))
        assert seen.taken_by(routed_id).keys() == {f"worker-routed-{scale_stack.port}"}
        assert [r["row_index"] for r in records] == list(range(4))
    finally:
        if scale_stack.procs["worker-routed"].poll() is not None:
            scale_stack.restart("worker-routed")
