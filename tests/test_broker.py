"""What the reconciler asks the broker: is a message of this job queued or unacknowledged? Real
messages sent by Celery to a real Redis."""

from __future__ import annotations

import redis
from celery import Celery

from spider.keys import new_job_id
from spider.workers.broker import holds


def test_a_job_holds_its_queued_messages_and_not_those_that_only_mention_it(redis_url):
    app = Celery("probe", broker=redis_url)
    app.conf.broker_transport_options = {"priority_steps": list(range(10)), "sep": "\x06\x16",
                                         "queue_order_strategy": "priority"}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    mine, other, idle = new_job_id(), new_job_id(), new_job_id()
    app.send_task("spider.run_batch", (mine, 3), queue="rollout", priority=5)
    # Another job's tool call whose arguments name `idle`, as a string and as a repr.
    app.send_task("spider.call_tool", (other, "c1", "lookup", {"q": idle, "r": f"('{idle}', 1)"}), queue="sandbox")
    queues = ["control", "rollout", "sandbox", "train"]
    assert holds(client, mine, queues)
    assert holds(client, other, queues)
    assert not holds(client, idle, queues)
    # A message a worker took and has not acknowledged yet still counts.
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get("rollout", no_ack=False)
        assert message is not None
        assert client.hlen("unacked") == 1
        assert not any(client.llen(k) for k in ("rollout", "rollout\x06\x165"))
        assert holds(client, mine, queues)
        message.ack()
    assert not holds(client, mine, queues)
    assert holds(client, other, queues)
