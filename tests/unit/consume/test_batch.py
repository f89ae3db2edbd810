"""Tests for shoebox_worker.consume.batch: the one home for acks."""

import json
import uuid

import kombu
import pytest

from shoebox_worker.consume import batch as batch_mod


class FakeChannel:
    """py-amqp's channel as far as a nack goes: it has no basic_nack, only
    the generic send_method (tests/functional/test_batch_rabbit.py sends
    the real frame)."""

    def __init__(self, log):
        self.log = log

    def send_method(self, sig, format=None, args=None):
        assert sig == (60, 120) and format == "Lbb", (sig, format)
        delivery_tag, multiple, requeue = args
        self.log.append(("nack", delivery_tag, multiple, requeue))


class FakeMessage:
    """Records what is done to it, in one log shared by the test."""

    def __init__(self, tag, log):
        self.delivery_tag = tag
        self.log = log
        self.channel = FakeChannel(log)

    def ack(self, multiple=False):
        self.log.append(("ack", self.delivery_tag, multiple))

    def requeue(self):
        self.log.append(("requeue", self.delivery_tag))


@pytest.fixture
def log():
    return []


def make(log, multiple, fail=False):
    def sync():
        log.append(("sync",))
        if fail:
            raise OSError(28, "No space left on device")

    batch = batch_mod.Batch(sync)
    batch.multiple = multiple
    return batch


def fill(batch, log, count, now=5.0):
    for tag in range(1, count + 1):
        batch.add(FakeMessage(tag, log), now + tag)


class TestCommit:
    def test_amqp_one_multiple_ack_after_the_sync(self, log):
        batch = make(log, multiple=True)
        fill(batch, log, 3)
        assert len(batch) == 3 and batch.since == 6.0
        assert batch.commit() == 3
        assert log == [("sync",), ("ack", 3, True)]
        assert len(batch) == 0 and not batch

    def test_virtual_transports_ack_each_after_the_sync(self, log):
        batch = make(log, multiple=False)
        fill(batch, log, 3)
        assert batch.commit() == 3
        assert log == [("sync",), ("ack", 1, False), ("ack", 2, False),
                       ("ack", 3, False)]

    def test_empty_batch_neither_syncs_nor_acks(self, log):
        batch = make(log, multiple=True)
        assert batch.commit() == 0
        assert log == []

    def test_failed_sync_acks_nothing_and_keeps_the_batch(self, log):
        batch = make(log, multiple=True, fail=True)
        fill(batch, log, 2)
        with pytest.raises(batch_mod.SyncFailed) as caught:
            batch.commit()
        assert caught.value.error.errno == 28
        assert str(caught.value) == "[Errno 28] No space left on device"
        assert log == [("sync",)]
        assert len(batch) == 2

    def test_a_failed_ack_is_not_a_failed_sync(self, log):
        # the connection is gone: kombu must see it, not the disk-full path
        class Gone(FakeMessage):
            def ack(self, multiple=False):
                raise ConnectionResetError(104, "Connection reset by peer")

        batch = make(log, multiple=True)
        batch.add(Gone(1, log), 0.0)
        with pytest.raises(ConnectionResetError):
            batch.commit()

    def test_since_is_the_oldest_message(self, log):
        batch = make(log, multiple=True)
        batch.add(FakeMessage(1, log), 10.0)
        batch.add(FakeMessage(2, log), 11.0)
        assert batch.since == 10.0
        batch.commit()
        batch.add(FakeMessage(3, log), 20.0)
        assert batch.since == 20.0


class TestRequeue:
    def test_amqp_one_multiple_nack(self, log):
        batch = make(log, multiple=True)
        fill(batch, log, 4)
        assert batch.requeue() == 4
        assert log == [("nack", 4, True, True)]
        assert len(batch) == 0

    def test_virtual_transports_requeue_each(self, log):
        batch = make(log, multiple=False)
        fill(batch, log, 2)
        assert batch.requeue() == 2
        assert log == [("requeue", 1), ("requeue", 2)]

    def test_empty(self, log):
        assert make(log, multiple=True).requeue() == 0
        assert log == []

    def test_requeue_one(self, log):
        batch_mod.Batch.requeue_one(FakeMessage(7, log))
        assert log == [("requeue", 7)]

    @pytest.mark.parametrize("multiple", [True, False])
    def test_a_streams_messages_are_acked_not_requeued(self, log, multiple):
        # RabbitMQ closes the connection on a nack of a stream's message
        batch = make(log, multiple=multiple)
        for tag in (1, 2, 3):
            batch.add(FakeMessage(tag, log), 5.0, stream=True)
        assert batch.requeue() == 3
        assert log == [("ack", 1, False), ("ack", 2, False),
                       ("ack", 3, False)]

    def test_amqp_a_batch_with_a_streams_message_is_given_back_one_by_one(
            self, log):
        # one nack up to the last would reach the stream's message too
        batch = make(log, multiple=True)
        batch.add(FakeMessage(1, log), 5.0)
        batch.add(FakeMessage(2, log), 5.0, stream=True)
        batch.add(FakeMessage(3, log), 5.0)
        assert batch.requeue() == 3
        assert log == [("requeue", 1), ("ack", 2, False), ("requeue", 3)]

    def test_requeue_one_of_a_stream_acks_it(self, log):
        batch_mod.Batch.requeue_one(FakeMessage(7, log), stream=True)
        assert log == [("ack", 7, False)]

    def test_a_streams_messages_are_acked_with_the_batch(self, log):
        batch = make(log, multiple=True)
        batch.add(FakeMessage(1, log), 5.0)
        batch.add(FakeMessage(2, log), 5.0, stream=True)
        assert batch.commit() == 2
        assert log == [("sync",), ("ack", 2, True)]


@pytest.mark.parametrize("multiple", [True, False])
def test_take_back_keeps_the_messages_unacked_and_acks_a_streams(log,
                                                                multiple):
    # a full disk: the worker keeps what was not synced, unacked (a
    # return would spend a quorum queue's delivery attempt); a stream's
    # message is acked as credit and read again from the stream
    batch = make(log, multiple)
    first, second, third = (FakeMessage(tag, log) for tag in (1, 2, 3))
    batch.add(first, 1.0, False, "a")
    batch.add(second, 2.0, True, "s")
    batch.add(third, 3.0, False, "b")
    assert batch.take_back() == [("a", first), ("b", third)]
    assert log == [("ack", 2, False)]
    assert len(batch) == 0 and not batch
    assert batch.take_back() == []
    assert batch.commit() == 0 and log == [("ack", 2, False)]


def test_forget_tells_the_broker_nothing(log):
    batch = make(log, multiple=True)
    fill(batch, log, 3)
    assert batch.forget() == 3
    assert log == [] and len(batch) == 0
    assert batch.commit() == 0


def test_over_memory_transport_acked_messages_leave_the_queue():
    uid = uuid.uuid4().hex[:10]
    exchange = kombu.Exchange("ex-" + uid, type="topic", durable=False)
    queue = kombu.Queue("q-" + uid, exchange, routing_key="q-" + uid,
                        durable=False)
    synced = []
    with kombu.Connection("memory://") as conn:
        channel = conn.channel()
        bound = queue(channel)
        bound.declare()
        with conn.Producer(channel) as producer:
            for n in range(5):
                producer.publish({"n": n}, exchange=exchange,
                                 routing_key=queue.routing_key)
        batch = batch_mod.Batch(lambda: synced.append(len(batch)))
        for _ in range(3):
            batch.add(bound.get(no_ack=False), 0.0)
        assert batch.commit() == 3 and synced == [3]
        requeued = bound.get(no_ack=False)
        batch.add(requeued, 0.0)
        assert batch.requeue() == 1
        left = []
        while (message := bound.get(no_ack=False)) is not None:
            left.append(json.loads(message.body)["n"])
            message.ack()
        assert sorted(left) == [3, 4]
        bound.delete()
