"""consume/batch.py against the real RabbitMQ: the unit tests run on
kombu's memory transport, where ``ack(multiple=True)`` and ``basic_nack``
never run. Here the broker itself says what was acked and what came back
(its queue counts and the ``redelivered`` flag)."""

import json

import pytest
from kombu import Connection
from kombu import Exchange
from kombu import Queue

from shoebox_worker.consume import batch as batch_mod

pytestmark = pytest.mark.functional


def _counts(ft, queue):
    """``(ready, unacked)`` of ``queue``, asked of the broker."""
    out = ft.rabbitmqctl("list_queues", "-q", "--no-table-headers", "name",
                         "messages_ready", "messages_unacknowledged")
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError("queue %s not listed:\n%s" % (queue, out.stdout))


def _get(bound, count):
    messages = []
    for _ in range(count):
        message = bound.get(no_ack=False)
        assert message is not None, "queue empty after %d" % len(messages)
        messages.append(message)
    return messages


def _n(message):
    return json.loads(message.body)["n"]


@pytest.fixture
def queue(rabbit, names, ft):
    rabbit.declare(names, names, names)
    rabbit.publish_raw(names, names, [(json.dumps({"n": n}).encode(), {})
                                      for n in range(10)])
    return names


def _batch(synced):
    batch = batch_mod.Batch(lambda: synced.append(len(batch)))
    batch.multiple = True  # what the worker sets on py-amqp
    return batch


def _bound(channel, name):
    return Queue(name, Exchange(name, type="topic", durable=False),
                 routing_key=name, durable=False)(channel)


def test_one_multiple_ack_acks_exactly_the_batch(queue, ft):
    synced = []
    with Connection(ft.AMQP_URL) as conn:
        channel = conn.channel()
        got = _get(_bound(channel, queue), 8)   # delivery tags 1..8
        batch = _batch(synced)
        for message in got[:5]:
            batch.add(message, 0.0)
        assert batch.commit() == 5
        assert synced == [5]  # synced once, before the ack
        # on the broker: 2 never delivered, 3 delivered and not acked
        assert _counts(ft, queue) == (2, 3)
        channel.close()  # the 3 unacked ones go back to the queue
        channel = conn.channel()
        again = _get(_bound(channel, queue), 5)
        assert sorted(_n(m) for m in again) == [5, 6, 7, 8, 9]
        redelivered = sorted(_n(m) for m in again
                             if m.delivery_info["redelivered"])
        assert redelivered == [5, 6, 7]
        for message in again:
            message.ack()
        assert _counts(ft, queue) == (0, 0)


def test_requeue_gives_the_batch_back(queue, ft):
    synced = []
    with Connection(ft.AMQP_URL) as conn:
        channel = conn.channel()
        bound = _bound(channel, queue)
        first = _get(bound, 2)
        batch = _batch(synced)
        for message in first:
            batch.add(message, 0.0)
        assert batch.commit() == 2
        # the next four cannot be synced: given back, channel still open
        batch.add(_get(bound, 1)[0], 0.0)
        for message in _get(bound, 3):
            batch.add(message, 0.0)
        assert _counts(ft, queue) == (4, 4)
        assert batch.requeue() == 4
        assert len(batch) == 0
        assert _counts(ft, queue) == (8, 0)
        back = _get(bound, 8)
        assert sorted(_n(m) for m in back) == list(range(2, 10))
        assert sorted(_n(m) for m in back
                      if m.delivery_info["redelivered"]) == [2, 3, 4, 5]
        for message in back:
            message.ack()
        assert _counts(ft, queue) == (0, 0)
        assert synced == [2]  # a requeue does not sync
