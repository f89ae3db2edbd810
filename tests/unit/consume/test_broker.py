"""Tests for shoebox_worker.consume.broker: declaring, and the AMQP read
loop. The RabbitMQ tests use the local broker (127.0.0.1:5672) with names
of their own, and are skipped when it does not answer."""

import socket
import textwrap
import time
import uuid

import kombu
import pytest

from shoebox_worker import config as config_mod
from shoebox_worker import exceptions
from shoebox_worker import plugins
from shoebox_worker.consume import broker
from shoebox_worker.consume import worker as worker_mod

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def rabbit():
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    with kombu.Connection(AMQP_URL) as conn:
        yield conn


def names():
    uid = uuid.uuid4().hex[:10]
    return "test-broker-ex-" + uid, "test-broker-q-" + uid


def load_config(tmp_path, url, exchange, queue, consumer=""):
    path = tmp_path / "broker.conf"
    path.write_text(textwrap.dedent("""\
        [broker]
        url = {url}
        connect_max_retries = 1

        [consumer:{queue}]
        exchange = {exchange}
        routing_key = {queue}
        {consumer}

        [archive]
        working_directory = {work}
        roll_checker = never
        callbacks =
        """).format(url=url, queue=queue, exchange=exchange,
                    consumer=consumer, work=tmp_path / "work"))
    return config_mod.load(str(path))


def make_worker(conf):
    checker, chain = plugins.build(conf)
    return worker_mod.Worker(conf, roll_checker=checker, callbacks=chain)


def test_is_amqp():
    assert broker.is_amqp(kombu.Connection(AMQP_URL))
    assert not broker.is_amqp(kombu.Connection("memory://"))
    assert not broker.is_amqp(kombu.Connection("redis://127.0.0.1:1/0"))


class TestDeclare:
    def test_declares_the_queue(self, tmp_path, rabbit):
        exchange, queue = names()
        conf = load_config(tmp_path, AMQP_URL, exchange, queue,
                           "durable = false\nexchange_durable = false")
        worker = make_worker(conf)
        try:
            broker.declare(worker)
            with rabbit.channel() as channel:
                ok = kombu.Queue(queue, channel=channel).queue_declare(
                    passive=True)
                assert ok.message_count == 0
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                channel.exchange_delete(exchange)

    def test_precondition_failed_is_one_config_error_line(self, tmp_path,
                                                          rabbit):
        exchange, queue = names()
        # the services declared it non-durable (oslo.messaging's default)
        with rabbit.channel() as channel:
            kombu.Queue(queue, kombu.Exchange(exchange, type="topic",
                                              durable=False),
                        routing_key=queue, durable=False)(channel).declare()
        conf = load_config(tmp_path, AMQP_URL, exchange, queue,
                           "durable = true\nexchange_durable = false")
        worker = make_worker(conf)
        try:
            with pytest.raises(exceptions.ConfigError) as caught:
                broker.declare(worker)
            message = str(caught.value)
            assert "\n" not in message
            assert "[consumer:%s]" % queue in message
            assert "PRECONDITION_FAILED" in message
            assert "durable" in message
            assert conf.filename in message
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                channel.exchange_delete(exchange)

    def test_declare_false_declares_nothing(self, tmp_path):
        exchange, queue = names()
        conf = load_config(tmp_path, "memory://", exchange, queue,
                           "declare = false")
        worker = make_worker(conf)
        broker.declare(worker)
        with kombu.Connection("memory://") as conn:
            with pytest.raises(conn.channel_errors):
                kombu.Queue(queue, channel=conn.channel()).queue_declare(
                    passive=True)


class Counter(broker.BlockingReads):
    """A minimal consumer on the read loop: counts messages and ticks."""

    receive_timeout = 0.05

    def __init__(self, connection, queue, stop_after):
        self.connection = connection
        self.queue = queue
        self.stop_after = stop_after
        self.bodies = []
        self.ticks = 0
        self.idle_ticks = 0

    def get_consumers(self, Consumer, channel):
        return [Consumer(queues=[self.queue], on_message=self.on_message,
                         accept=["json"], prefetch_count=10)]

    def on_message(self, message):
        self.bodies.append(message.payload)
        message.ack()

    def on_iteration(self):
        self.ticks += 1
        if len(self.bodies) >= self.stop_after:
            self.idle_ticks += 1
            self.should_stop = self.idle_ticks >= 3


class TestBlockingReads:
    def run(self, url, count):
        exchange_name, queue_name = names()
        exchange = kombu.Exchange(exchange_name, type="topic",
                                  durable=False)
        queue = kombu.Queue(queue_name, exchange, routing_key=queue_name,
                            durable=False)
        with kombu.Connection(url) as conn:
            queue(conn.default_channel).declare()
            with conn.Producer() as producer:
                for n in range(count):
                    producer.publish({"n": n}, exchange=exchange,
                                     routing_key=queue_name)
            counter = Counter(conn.clone(), queue, count)
            started = time.monotonic()
            for _ in counter.consume(safety_interval=0.05):
                pass
            elapsed = time.monotonic() - started
            queue(conn.default_channel).delete()
            try:
                exchange(conn.default_channel).delete()
            except conn.channel_errors:
                pass
        return counter, elapsed

    def test_amqp_consumes_and_ticks_while_idle(self, rabbit):
        counter, elapsed = self.run(AMQP_URL, 25)
        assert [b["n"] for b in counter.bodies] == list(range(25))
        # once the queue is empty, the kernel receive timeout wakes the
        # loop: three idle ticks end it, well before any hang
        assert counter.idle_ticks == 3
        assert elapsed < 5

    def test_other_transports_use_kombus_loop(self):
        counter, _ = self.run("memory://", 5)
        assert [b["n"] for b in counter.bodies] == list(range(5))
        assert counter.idle_ticks == 3
