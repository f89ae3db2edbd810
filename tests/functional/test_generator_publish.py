"""Publish synthetic notifications to the real RabbitMQ and read them back.

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Without it the test is
skipped, or fails when CI=true.
"""

import json
import os
import uuid

import pytest
from kombu import Connection
from kombu import Exchange
from kombu import Queue

from shoebox_worker.tools.publish import Outcome
from shoebox_worker.tools.publish import publish
from shoebox_worker.tools.simulator import notifications

pytestmark = pytest.mark.functional

URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def conn():
    connection = Connection(URL, connect_timeout=5)
    try:
        connection.connect()
    except Exception as exc:
        connection.release()
        msg = f"RabbitMQ not reachable at {connection.as_uri()}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    yield connection
    connection.release()


def test_publish_and_read_back(conn):
    name = f"shoebox-test-generator-{uuid.uuid4().hex[:12]}"
    exchange = Exchange(name, type="topic", durable=False)
    queue = Queue(name, exchange=exchange, routing_key="notifications.info",
                  durable=False)
    channel = conn.channel()
    seen = []
    try:
        outcome = publish(URL, 500, exchange=name, declare_queue=name,
                          seed=99, progress=seen.append)
        assert outcome == Outcome(sent=500, confirmed=500)
        assert seen == list(range(1, 501))

        bound = queue(channel)
        received = []
        while (message := bound.get(no_ack=True)) is not None:
            assert message.content_type == "application/json"
            assert message.content_encoding == "utf-8"
            assert message.delivery_info["routing_key"] == (
                "notifications.info")
            assert message.properties["delivery_mode"] == 2
            received.append(message.body)
        assert len(received) == 500

        expected = [n["message_id"] for n in notifications(500, seed=99)]
        got = []
        for body in received:
            outer = json.loads(body)
            assert set(outer) == {"oslo.version", "oslo.message"}
            assert outer["oslo.version"] == "2.0"
            inner = json.loads(outer["oslo.message"])
            assert inner["priority"] == "INFO"
            assert inner["payload"]
            got.append(inner["message_id"])
        # All of them, once each, in the order they were published.
        assert got == expected
    finally:
        queue(channel).delete()
        exchange(channel).delete()
        channel.close()


def test_unroutable_messages_are_counted_as_returned(conn):
    name = f"shoebox-test-generator-{uuid.uuid4().hex[:12]}"
    channel = conn.channel()
    try:
        outcome = publish(URL, 5, exchange=name, routing_key="nobody.listens",
                          seed=1)
        assert outcome == Outcome(sent=5, confirmed=0, returned=5)
    finally:
        Exchange(name)(channel).delete()
        channel.close()


def test_confirms_are_pipelined_and_every_message_counted(conn,
                                                         monkeypatch):
    """Many messages in flight (a window of 50 here), each ends confirmed,
    returned or nacked: a queue that takes 120 and refuses the rest
    (``x-overflow = reject-publish``) nacks 380 of 500, and a second
    binding's unroutable key returns them all."""
    from shoebox_worker.tools import publish as publish_mod
    monkeypatch.setattr(publish_mod, "CONFIRM_WINDOW", 50)
    waits = []
    real_wait = publish_mod._Sender._wait

    def wait(self, timeout):
        waits.append(len(self._pending))
        return real_wait(self, timeout)

    monkeypatch.setattr(publish_mod._Sender, "_wait", wait)
    name = f"shoebox-test-generator-{uuid.uuid4().hex[:12]}"
    exchange = Exchange(name, type="topic", durable=False)
    queue = Queue(name, exchange=exchange, routing_key="notifications.info",
                  durable=True, queue_arguments={
                      "x-max-length": 120, "x-overflow": "reject-publish"})
    channel = conn.channel()
    try:
        queue(channel).declare()
        outcome = publish(URL, 500, exchange=name, seed=3)
        assert outcome == Outcome(sent=500, confirmed=120, nacked=380)
        # the window held: never more than 51 in flight before a wait
        assert waits and max(waits) <= 51
        assert queue(channel).queue_declare(passive=True).message_count \
            == 120
        outcome = publish(URL, 30, exchange=name, seed=4,
                          routing_key="nobody.listens")
        assert outcome == Outcome(sent=30, returned=30)
    finally:
        queue(channel).delete()
        exchange(channel).delete()
        channel.close()
