"""/metrics on the real API: scraped before and after what it counts, parsed with
prometheus_client's own text parser, each number moved by exactly what happened.

Two setups: an API with no workers (jobs stay queued, tasks stay in their queues), and a stack
with control and rollout workers that runs a real job on the tiny model."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spider.api.metrics import PRIORITY_SEP
from spider.client import SpiderClient
from spider.local import LocalStack, WorkerSpec, start_redis
from tests.helpers import api_process, make_config, read_jsonl

KEY = "key-metrics"
TOKEN = "metrics-token-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPIDER_QUEUES = {"control", "rollout", "sandbox", "train"}


def scrape(url: str, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def jobs(samples, status: str) -> float:
    return samples[("spider_jobs", (("status", status),))]


def ended(samples, status: str) -> float:
    return samples[("spider_jobs_ended_total", (("status", status),))]


def depth(samples, queue: str) -> float:
    return samples[("spider_queue_depth", (("queue", queue),))]


def moved(before, after) -> dict[tuple[str, tuple], float]:
    """The samples whose value changed, by how much."""
    return {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of this module's own: no other test's jobs or tasks are in its numbers."""
    proc, url = start_redis(tmp_path_factory.mktemp("metrics-redis"))
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def api(own_redis, tmp_path_factory):
    """The real API (`spider serve`) on that Redis with SPIDER_METRICS_TOKEN set, and no workers."""
    root = tmp_path_factory.mktemp("metrics-api")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPIDER_METRICS_TOKEN", TOKEN)
        with api_process(own_redis, root / "data", root, KEY) as (url, _log):
            yield url


def test_metrics_want_the_token_when_one_is_set(api):
    assert httpx.get(f"{api}/metrics").status_code == 401
    assert httpx.get(f"{api}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{api}/metrics", headers=AUTH).status_code == 401  # an API key is not the metrics token
    assert scrape(api)  # the token opens it


def test_metrics_answer_without_a_token_when_none_is_set(own_redis, tmp_path, monkeypatch):
    monkeypatch.delenv("SPIDER_METRICS_TOKEN")
    with api_process(own_redis, tmp_path / "data", tmp_path, KEY) as (url, _log):
        samples = scrape(url, token=None)
    assert ("spider_jobs", (("status", "queued"),)) in samples


def test_metrics_name_no_job_owner_or_config(api, tiny_model):
    job_id = submit(api, tiny_model)
    text = httpx.get(f"{api}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert job_id not in text and str(tiny_model) not in text and KEY not in text
    labels = {name for family in text_string_to_metric_families(text) for s in family.samples for name in s.labels}
    assert labels <= {"status", "queue"}
    cancel(api, job_id)


def submit(api: str, model) -> str:
    config = make_config(api, KEY, model)
    with SpiderClient(config=config) as client:
        return client.submit_job()["job_id"]


def cancel(api: str, job_id: str) -> None:
    assert httpx.post(f"{api}/v1/jobs/{job_id}/cancel", headers=AUTH).json()["status"] == "cancelled"


def test_queued_cancelled_and_deleted_jobs_move_the_job_gauges_and_counters(api, tiny_model):
    before = scrape(api)
    first, second = submit(api, tiny_model), submit(api, tiny_model)
    queued = scrape(api)
    # Nothing plans them (no workers): two more queued jobs, two plan tasks waiting on `control`.
    assert moved(before, queued) == {
        ("spider_jobs", (("status", "queued"),)): 2,
        ("spider_queue_depth", (("queue", "control"),)): 2,
    }
    cancel(api, first)
    assert httpx.delete(f"{api}/v1/jobs/{second}", headers=AUTH).json()["deleted"] is True
    after = scrape(api)
    # Both left the queued jobs; the cancelled one and the deleted one (cancelled first) ended as
    # cancelled. Their plan tasks still wait in the queue, to be dropped by a worker, and so does
    # the cancelled job's partial finalize (the deleted one has nothing left to assemble).
    assert moved(queued, after) == {
        ("spider_jobs", (("status", "queued"),)): -2,
        ("spider_jobs_ended_total", (("status", "cancelled"),)): 2,
        ("spider_queue_depth", (("queue", "control"),)): 1,
    }
    # Deleting an ended job changes no count: the counters count what ended, not what is kept.
    assert httpx.delete(f"{api}/v1/jobs/{first}", headers=AUTH).json()["deleted"] is True
    assert moved(after, scrape(api)) == {}


def test_queue_depth_counts_every_priority_and_queues_named_for_rollout(api, own_redis):
    """Tasks sent through Celery as Spider's dispatcher sends them, with priorities, and to a
    queue of its own for one pool of rollout workers: each is counted, in its queue."""
    from celery import Celery
    from kombu import Queue

    before = scrape(api)
    producer = Celery("spider", broker=own_redis)
    producer.conf.update(task_default_queue="control", task_queues=[Queue("rollout"), Queue("rollout.big-model")],
                         broker_transport_options={"priority_steps": list(range(10))})
    with producer.connection_for_write() as connection:
        for priority in (0, 3, 9):
            producer.send_task("spider.run_batch", args=["0123456789abcdef", priority], queue="rollout",
                               priority=priority, connection=connection)
        producer.send_task("spider.run_batch", args=["0123456789abcdef", 0], queue="rollout.big-model",
                           connection=connection)
    import redis

    client = redis.Redis.from_url(own_redis)
    assert client.llen(f"rollout{PRIORITY_SEP}9") == 1  # the priority lists are really in use
    after = scrape(api)
    assert moved(before, after) == {
        ("spider_queue_depth", (("queue", "rollout"),)): 3,
        ("spider_queue_depth", (("queue", "rollout.big-model"),)): 1,
    }
    assert {queue for (name, labels) in after if name == "spider_queue_depth" for _, queue in labels} >= SPIDER_QUEUES


# -- a real job on workers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis, the API (with the metrics token) and one control and one rollout worker."""
    env = {"SPIDER_METRICS_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    workers = (WorkerSpec("control", "threads", 2), WorkerSpec("rollout", "threads", 2))
    with LocalStack(api_keys=(KEY,), env=env, workers=workers, log_dir=tmp_path_factory.mktemp("metrics-stack")) as running:
        yield running


@pytest.mark.slow
def test_a_completed_job_moves_the_counters_by_its_rows_records_and_tokens(stack, tiny_model, tmp_path):
    before = scrape(stack.url)
    config = make_config(stack.url, KEY, tiny_model, **{"generation.duplications": 2})
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=0.5)
        assert status["status"] == "completed", status
        records = read_jsonl(client.download_result(job_id, tmp_path / "result.jsonl"))
    after = scrape(stack.url)

    # 6 rows in batches of 4 (2 batches), 2 samples each; the tokens are the records' own.
    assert len(records) == 12
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in records)
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in records)
    assert prompt_tokens > 0 and completion_tokens > 0
    changes = moved(before, after)
    changes.pop(("spider_tasks_unacked", ()), None)  # the finalize task may be acknowledged just after
    seconds = changes.pop(("spider_generation_seconds_total", ()))
    assert 0 < seconds < 600
    assert changes == {
        ("spider_jobs_ended_total", (("status", "completed"),)): 1,
        ("spider_batches_done_total", ()): 2,
        ("spider_rows_done_total", ()): 6,
        ("spider_records_total", ()): 12,
        ("spider_prompt_tokens_total", ()): prompt_tokens,
        ("spider_completion_tokens_total", ()): completion_tokens,
    }
    # It went through queued and running and left both; nothing waits in any queue.
    assert jobs(after, "queued") == jobs(after, "running") == 0
    assert all(depth(after, queue) == 0 for queue in SPIDER_QUEUES)


def test_a_jobs_moves_count_once_each_in_the_stores_own_numbers(own_redis):
    """The counts behind the job gauges and counters, kept by JobStore in the same Redis step as
    each status change: a transition that does not happen (repeated, or from the wrong status)
    counts nothing."""
    import redis

    from spider.jobs.store import JobStore
    from spider.types import JobStatus

    store = JobStore(redis.Redis.from_url(own_redis, decode_responses=True))
    keys, r = store.keys, store.r
    ended_before = r.hgetall(keys.jobs_ended())
    job_id = store.create("owner", {"x": 1}, {}, has_bundle=False).id
    assert r.sismember(keys.jobs_in("queued"), job_id) and not r.sismember(keys.jobs_in("running"), job_id)
    assert store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED])
    assert not store.transition(job_id, JobStatus.RUNNING, [JobStatus.QUEUED])
    assert not r.sismember(keys.jobs_in("queued"), job_id) and r.sismember(keys.jobs_in("running"), job_id)
    assert store.fail(job_id, "broken") and not store.fail(job_id, "broken again")
    assert not r.sismember(keys.jobs_in("running"), job_id)
    ended = r.hgetall(keys.jobs_ended())
    assert int(ended["failed"]) == int(ended_before.get("failed", 0)) + 1
    store.delete(job_id, "owner")
    assert r.hgetall(keys.jobs_ended()) == ended
    # A transition of a job that is gone changes nothing either.
    assert not store.transition(job_id, JobStatus.CANCELLED, [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
    assert r.hgetall(keys.jobs_ended()) == ended
