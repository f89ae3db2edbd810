"""Tests for shoebox_worker.consume.broker: declaring, and the AMQP read
loop. The RabbitMQ tests use the local broker (127.0.0.1:5672) with names
of their own, and are skipped when it does not answer."""

import dataclasses
import functools
import logging
import signal
import socket
import ssl
import textwrap
import threading
import time
import uuid

import kombu
import kombu.exceptions
import pytest
from amqp import exceptions as amqp_exceptions
from kombu.transport import pyamqp

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
            # the option that differs, and the broker's value
            assert message.startswith("%s [consumer:%s] durable: "
                                      % (conf.filename, queue))
            assert "with durable = false" in message
            assert "set durable = false" in message
            # not every flag it might be
            assert "auto_delete" not in message
            assert "queue_arguments" not in message
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                channel.exchange_delete(exchange)

    def test_declare_false_checks_and_declares_nothing(self, tmp_path):
        exchange, queue = names()
        with kombu.Connection("memory://") as conn:
            conn.channel().queue_declare(queue=queue)
            conf = load_config(tmp_path, "memory://", exchange, queue,
                               "declare = false")
            broker.declare(make_worker(conf))
            # the exchange was not declared, nor bound
            assert exchange not in conn.default_channel.state.exchanges
            conn.channel().queue_delete(queue)

    def test_declare_false_queue_missing_is_one_config_error_line(
            self, tmp_path):
        exchange, queue = names()
        conf = load_config(tmp_path, "memory://", exchange, queue,
                           "declare = false")
        with pytest.raises(exceptions.ConfigError) as caught:
            broker.declare(make_worker(conf))
        message = str(caught.value)
        assert message.startswith("%s [consumer:%s] declare: no queue %r"
                                  % (conf.filename, queue, queue))
        assert "set declare = true" in message
        assert "\n" not in message

    @pytest.mark.parametrize("existing, consumer, option, says", [
        ({"exchange_durable": True}, "exchange_durable = false",
         "exchange_durable", "exchange %r exists on the broker with "
         "durable = true, this config says durable = false"),
        ({"exchange_type": "direct"}, "", "exchange_type",
         "with type = direct, this config says type = topic"),
        ({"auto_delete": True}, "", "auto_delete",
         "with auto_delete = true, this config says auto_delete = false"),
        ({"queue_arguments": {"x-max-length": 10}}, "", "queue_arguments",
         "with x-max-length = 10, this config says no x-max-length"),
    ])
    def test_mismatch_names_the_option_and_the_brokers_value(
            self, tmp_path, rabbit, existing, consumer, option, says):
        exchange, queue = names()
        says = says % exchange if "%r" in says else says
        with rabbit.channel() as channel:
            kombu.Queue(queue, kombu.Exchange(
                exchange, type=existing.get("exchange_type", "topic"),
                durable=existing.get("exchange_durable", False)),
                routing_key=queue, durable=False,
                auto_delete=existing.get("auto_delete", False),
                queue_arguments=existing.get("queue_arguments"))(
                    channel).declare()
        conf = load_config(tmp_path, AMQP_URL, exchange, queue, consumer)
        try:
            with pytest.raises(exceptions.ConfigError) as caught:
                broker.declare(make_worker(conf))
            message = str(caught.value)
            assert message.startswith("%s [consumer:%s] %s: "
                                      % (conf.filename, queue, option))
            assert says in message, message
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                channel.exchange_delete(exchange)

    def test_refused_login_is_a_config_error_on_the_url(self, tmp_path,
                                                        rabbit):
        exchange, queue = names()
        conf = load_config(tmp_path,
                           "amqp://guest:wrong@127.0.0.1:5672//",
                           exchange, queue)
        with pytest.raises(exceptions.ConfigError) as caught:
            broker.declare(make_worker(conf))
        message = str(caught.value)
        assert message.startswith("%s [broker] url: " % conf.filename)
        assert "ACCESS_REFUSED" in message
        assert "check the user and password" in message
        assert "wrong" not in message

    def test_unreachable_gives_up_in_one_line(self, tmp_path):
        exchange, queue = names()
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        conf = load_config(tmp_path, "amqp://guest:guest@127.0.0.1:%d//"
                           % port, exchange, queue)
        worker = make_worker(conf)
        worker.connection.ensure_connection = functools.partial(
            worker.connection.ensure_connection, interval_start=0.01,
            interval_step=0.01)
        with pytest.raises(broker.BrokerError) as caught:
            broker.declare(worker)
        message = str(caught.value)
        assert "Connection refused" in message
        assert "gave up after 2 failed attempt(s)" in message
        assert "connect_max_retries = 1" in message
        assert isinstance(caught.value, exceptions.ShoeboxError)
        assert not isinstance(caught.value, exceptions.ConfigError)

    def test_a_refused_transient_queue_is_one_line_naming_durable(
            self, tmp_path, rabbit, monkeypatch):
        # RabbitMQ 4.3 closes the connection (INTERNAL_ERROR) at the
        # declaration of a queue neither durable nor exclusive; no 4.x
        # broker here, so the declaration raises what py-amqp raises then
        exchange, queue = names()
        conf = load_config(tmp_path, AMQP_URL, exchange, queue,
                           "durable = false")
        monkeypatch.setattr(kombu.Queue, "declare", _refuse_transient)
        with pytest.raises(exceptions.ConfigError) as caught:
            broker.declare(make_worker(conf))
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith("%s [consumer:%s] durable: the broker "
                                  "refused the declaration: INTERNAL_ERROR"
                                  " - Feature `transient_nonexcl_queues` is "
                                  "deprecated. Its use is not permitted"
                                  % (conf.filename, queue)), message
        assert message.endswith("set durable = true (RabbitMQ 4.3 and later "
                                "refuse queues that are neither durable nor "
                                "exclusive, unless deprecated_features.permit"
                                ".transient_nonexcl_queues = true), and make "
                                "it a quorum queue on a cluster"), message

    def test_another_connection_error_at_declare_is_not_a_config_error(
            self, tmp_path, rabbit, monkeypatch):
        exchange, queue = names()
        conf = load_config(tmp_path, AMQP_URL, exchange, queue)

        def internal_error(self, nowait=False, channel=None):
            raise amqp_exceptions.error_for_code(
                broker.INTERNAL_ERROR, "INTERNAL_ERROR", (50, 10),
                amqp_exceptions.ConnectionError)
        monkeypatch.setattr(kombu.Queue, "declare", internal_error)
        with pytest.raises(amqp_exceptions.InternalError):
            broker.declare(make_worker(conf))


#: what RabbitMQ 4.0.6 said (rabbitmq-server discussion 12972, hyperion
#: issue 156), the end as 4.3 words it
TRANSIENT_REFUSED = (
    "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\n"
    "Its use is not permitted per the configuration (overriding the "
    "default, which is permitted):\n"
    "    \"deprecated_features.permit.transient_nonexcl_queues = false\"\n"
    "Its use will not be permitted by default in RabbitMQ 4.3.")


def _refuse_transient(self, nowait=False, channel=None):
    raise amqp_exceptions.error_for_code(
        broker.INTERNAL_ERROR, TRANSIENT_REFUSED, (50, 10),
        amqp_exceptions.ConnectionError)


def test_a_deprecated_feature_refused_is_permanent():
    refused = amqp_exceptions.error_for_code(
        broker.INTERNAL_ERROR, TRANSIENT_REFUSED, (50, 10),
        amqp_exceptions.ConnectionError)
    assert broker.deprecated_feature(refused) == "transient_nonexcl_queues"
    assert broker.permanent_advice(refused) == \
        broker.DEPRECATED["transient_nonexcl_queues"][1]
    other = amqp_exceptions.error_for_code(
        broker.INTERNAL_ERROR, "INTERNAL_ERROR - Feature `ram_node_type` is "
        "deprecated.", (50, 10), amqp_exceptions.ConnectionError)
    assert broker.deprecated_feature(other) == "ram_node_type"
    assert "deprecated_features.permit" in broker.permanent_advice(other)
    # the same words under another code, or 541 for another reason: no
    for exc in (amqp_exceptions.error_for_code(
                    broker.NOT_ALLOWED, TRANSIENT_REFUSED, (50, 10),
                    amqp_exceptions.ConnectionError),
                amqp_exceptions.error_for_code(
                    broker.INTERNAL_ERROR, "INTERNAL_ERROR", (50, 10),
                    amqp_exceptions.ConnectionError)):
        assert broker.deprecated_feature(exc) is None
    assert broker.permanent_advice(amqp_exceptions.error_for_code(
        broker.INTERNAL_ERROR, "INTERNAL_ERROR", (50, 10),
        amqp_exceptions.ConnectionError)) is None


def test_no_replica_on_the_node_heals():
    # seen on the tests' cluster: a stream consumed on the node just
    # restarted after its kill, before its replica is back
    exc = amqp_exceptions.error_for_code(
        broker.PRECONDITION_FAILED, "PRECONDITION_FAILED - queue 'queue "
        "'s' in vhost '/'' does not have a replica on the local node",
        (60, 20), amqp_exceptions.ChannelError)
    assert broker.permanent_advice(exc) is None
    mismatch = amqp_exceptions.error_for_code(
        broker.PRECONDITION_FAILED, "PRECONDITION_FAILED - inequivalent arg "
        "'durable' for queue 'q' in vhost '/'", (50, 10),
        amqp_exceptions.ChannelError)
    assert broker.permanent_advice(mismatch) is not None


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


class TestReadDeadline:
    """A blocking read with a kernel receive timeout, interrupted by a
    Python signal handler every 20 ms (SIGUSR1 from another thread; the
    interval timer is pytest-timeout's)."""

    @staticmethod
    def read(sock, deadline, signals_for):
        """Seconds until recv() gave up, and the signals that came; the
        signals stop after ``signals_for`` seconds, so a read they hold
        off fails the test, not hangs."""
        caught = []
        previous = signal.signal(signal.SIGUSR1,
                                 lambda *_: caught.append(1))
        done = threading.Event()
        main = threading.main_thread().ident

        def send():
            until = time.monotonic() + signals_for
            while not done.wait(0.02) and time.monotonic() < until:
                signal.pthread_kill(main, signal.SIGUSR1)

        sender = threading.Thread(target=send, daemon=True)
        try:
            guard = broker._ReadDeadline(sock, 0.3) if deadline else None
            if guard is not None:
                guard.__enter__()
                guard.reading()
            sender.start()
            started = time.monotonic()
            try:
                # the kernel's timeout: EAGAIN (py-amqp makes it a timeout)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            finally:
                elapsed = time.monotonic() - started
                done.set()
                sender.join()
                if guard is not None:
                    guard.done()
                    guard.__exit__(None, None, None)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        return elapsed, len(caught)

    @pytest.fixture
    def sock(self):
        if threading.current_thread() is not threading.main_thread():
            pytest.skip("signal handlers are set from the main thread only")
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        broker._timeval(0.3))
        yield ours
        ours.close()
        theirs.close()

    def test_signals_do_not_make_a_read_wait_its_timeout_again(self, sock):
        elapsed, signals = self.read(sock, True, signals_for=10)
        assert signals >= 5  # the read was interrupted all along
        assert elapsed < 5  # 0.3 s and some (without: the 10 s of signals)

    def test_the_handlers_are_given_back(self, sock):
        handler = signal.getsignal(signal.SIGUSR1)
        self.read(sock, True, signals_for=10)
        assert signal.getsignal(signal.SIGUSR1) is handler

    def test_without_it_the_read_outlives_its_timeout(self, sock):
        """What it mends: each signal starts the kernel's timeout over."""
        elapsed, _ = self.read(sock, False, signals_for=1.5)
        assert elapsed >= 1.5  # the read ended only once the signals did


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class TestOutage:
    URL = "amqp://guest:***@host//"

    def test_once_then_bounded_with_count_and_duration(self, caplog):
        clock = FakeClock()
        events = []
        outage = broker.Outage(clock, listeners=[
            lambda *event: events.append(event)])
        refused = ConnectionRefusedError(111, "Connection refused")
        with caplog.at_level(logging.DEBUG, logger=broker.LOG.name):
            for _ in range(12):  # kombu's backoff: 2, 4, ... 24 s
                outage.failed(self.URL, refused, 2.0 * (outage.attempts + 1))
                clock.now += 2.0 * outage.attempts
        lines = [r.getMessage() for r in caplog.records
                 if r.levelno >= logging.WARNING]
        assert lines[0] == ("broker %s: [Errno 111] Connection refused; "
                            "retrying in 2 s" % self.URL)
        # 156 s of failures: the first line, then one a minute at most
        assert len(lines) == 3, lines
        assert lines[1:] == [
            "broker %s still failing after 9 attempts, 72 s: [Errno 111] "
            "Connection refused" % self.URL,
            "broker %s still failing after 12 attempts, 2 min: [Errno 111] "
            "Connection refused" % self.URL]
        assert not any(r.exc_info for r in caplog.records)
        assert events == [("broker_failed", "transient", None)] * 12
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=broker.LOG.name):
            assert outage.recovered(self.URL)
            assert not outage.recovered(self.URL)
        assert [r.getMessage() for r in caplog.records] == [
            "broker %s back after 12 failed attempt(s), 3 min" % self.URL]

    def test_permanent_is_said_at_once(self, caplog):
        clock = FakeClock()
        outage = broker.Outage(clock)
        refused = amqp_exceptions.AccessRefused(
            "ACCESS_REFUSED - Login was refused using authentication "
            "mechanism PLAIN. For details see the broker logfile.")
        with caplog.at_level(logging.WARNING, logger=broker.LOG.name):
            outage.failed(self.URL, OSError("Connection reset by peer"), 0)
            outage.failed(self.URL, refused, 2)
            outage.failed(self.URL, refused, 4)
        lines = [r.getMessage() for r in caplog.records]
        assert lines[0].endswith("Connection reset by peer; reconnecting")
        assert len(lines) == 2
        assert caplog.records[1].levelno == logging.ERROR
        assert lines[1].startswith(
            "broker %s: ACCESS_REFUSED - Login was refused using "
            "authentication mechanism PLAIN. For details see the broker "
            "logfile; this will not heal by retrying: check the user and "
            "password in [broker] url" % self.URL)
        assert outage.permanent


class Healing(broker.Reconnecting):
    """A consumer on the reconnecting loop, with a fast backoff."""

    retry_step = 0.05
    retry_max = 0.2
    receive_timeout = 0.05

    def __init__(self, connection, queue):
        self.connection = connection
        self.queue = queue
        self.bodies = []
        self.ready = threading.Event()

    def get_consumers(self, Consumer, channel):
        return [Consumer(queues=[self.queue], on_message=self.on_message,
                         accept=["json"])]

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        super().on_consume_ready(connection, channel, consumers, **kwargs)
        self.ready.set()

    def on_message(self, message):
        self.bodies.append(message.payload)
        message.ack()
        self.should_stop = True


def test_a_missing_queue_is_told_once_and_heals_when_declared(rabbit,
                                                              caplog):
    exchange_name, queue_name = names()
    exchange = kombu.Exchange(exchange_name, type="topic", durable=False)
    queue = kombu.Queue(queue_name, exchange, routing_key=queue_name,
                        durable=False, no_declare=True)
    healing = Healing(rabbit.clone(), queue)
    thread = threading.Thread(target=healing.run, daemon=True)
    try:
        with caplog.at_level(logging.INFO):
            thread.start()
            deadline = time.monotonic() + 10
            while healing.outage.attempts < 3:
                assert time.monotonic() < deadline, "no retries"
                time.sleep(0.01)
            assert not healing.ready.is_set()
            # the fix: the queue exists now
            with rabbit.channel() as channel:
                kombu.Queue(queue_name, exchange, routing_key=queue_name,
                            durable=False)(channel).declare()
            assert healing.ready.wait(10), "did not heal"
            with rabbit.Producer() as producer:
                producer.publish({"n": 1}, exchange=exchange,
                                 routing_key=queue_name)
            thread.join(10)
            assert not thread.is_alive()
    finally:
        healing.should_stop = True
        thread.join(10)
        with rabbit.channel() as channel:
            channel.queue_delete(queue_name)
            channel.exchange_delete(exchange_name)
    assert healing.bodies == [{"n": 1}]
    ours = [r for r in caplog.records if r.name == broker.LOG.name]
    errors = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert "NOT_FOUND - no queue %r" % queue_name in errors[0]
    assert "will not heal by retrying" in errors[0]
    assert ours[-1].getMessage().startswith("broker amqp://")
    assert "back after" in ours[-1].getMessage()
    # kombu's "Connection to broker lost" traceback never shows
    assert not any(r.exc_info for r in caplog.records)


# -- several bindings per queue --------------------------------------------

def several_config(tmp_path, url, queue, exchanges, keys="", consumer=""):
    """A config whose queue is bound to ``exchanges`` with ``keys``."""
    path = tmp_path / "several.conf"
    routing = "routing_key = %s" % keys if keys else ""
    path.write_text(textwrap.dedent("""\
        [broker]
        url = {url}
        connect_max_retries = 1

        [consumer:{queue}]
        exchange = {exchanges}
        {routing}
        {consumer}

        [archive]
        working_directory = {work}
        roll_checker = never
        callbacks =
        """).format(url=url, queue=queue, exchanges=", ".join(exchanges),
                    routing=routing, consumer=consumer,
                    work=tmp_path / "work"))
    return config_mod.load(str(path))


def publish_to(conn, exchange, keys):
    """One message to ``exchange`` per routing key (the exchange exists)."""
    with conn.Producer() as producer:
        for key in keys:
            producer.publish({"exchange": exchange, "key": key},
                             exchange=kombu.Exchange(exchange, type="topic",
                                                     no_declare=True),
                             routing_key=key, retry=False)


#: (routing key, whether the sample's bindings route it)
KEYS = [("notifications.info", True), ("notifications.error", True),
        ("versioned_notifications.info", True), ("notifications", False),
        ("notifications.info.extra", False), ("other.info", False)]
BINDING_KEYS = "notifications.*, versioned_notifications.*"


def test_make_queues_binds_every_pair():
    conf = config_mod.ConsumerConfig(
        "q", exchange=("a", "b"), routing_key=("k1", "k2"), durable=True,
        exchange_durable=False, queue_arguments={"x-queue-type": "quorum"})
    queue, = broker.make_queues([conf])
    assert queue.exchange is None
    assert sorted((b.exchange.name, b.routing_key) for b in queue.bindings) \
        == [("a", "k1"), ("a", "k2"), ("b", "k1"), ("b", "k2")]
    for b in queue.bindings:
        assert (b.exchange.type, b.exchange.durable) == ("topic", False)
        assert not b.exchange.no_declare
    assert queue.durable and queue.queue_arguments == {
        "x-queue-type": "quorum"}
    # declare = false: none of them is declared
    conf = dataclasses.replace(conf, declare=False)
    queue, = broker.make_queues([conf])
    assert queue.no_declare
    assert all(b.exchange.no_declare for b in queue.bindings)


class TestSeveralBindings:
    def check_routing(self, conn, queue, exchanges):
        """Publish every KEYS key to every exchange: the queue gets the
        routed ones, each once."""
        for exchange in exchanges:
            publish_to(conn, exchange, [key for key, _ in KEYS])
        got = []
        simple = conn.SimpleQueue(kombu.Queue(queue, no_declare=True),
                                  no_ack=True)
        try:
            while True:
                try:
                    message = simple.get(timeout=0.5)
                except simple.Empty:
                    break
                got.append((message.payload["exchange"],
                            message.payload["key"],
                            message.delivery_info["exchange"]))
        finally:
            simple.consumer.cancel()
        expected = [(exchange, key, exchange) for exchange in exchanges
                    for key, routed in KEYS if routed]
        assert sorted(got) == sorted(expected)

    def test_memory_transport_honours_every_binding(self, tmp_path):
        uid = uuid.uuid4().hex[:8]
        queue = "q-" + uid
        exchanges = ["nova-" + uid, "glance-" + uid, "neutron-" + uid]
        conf = several_config(tmp_path, "memory://", queue, exchanges,
                              BINDING_KEYS)
        broker.declare(make_worker(conf))
        with kombu.Connection("memory://") as conn:
            self.check_routing(conn, queue, exchanges)

    def test_amqp_declares_missing_exchanges_and_binds_every_pair(
            self, tmp_path, rabbit):
        uid = uuid.uuid4().hex[:8]
        queue = "test-broker-several-" + uid
        exchanges = ["test-broker-nova-" + uid, "test-broker-glance-" + uid]
        conf = several_config(tmp_path, AMQP_URL, queue, exchanges,
                              BINDING_KEYS, "durable = true\n"
                              "exchange_durable = false\n"
                              "queue_arguments = x-queue-type=quorum")
        try:
            # neither exchange exists: no service has declared it yet
            for exchange in exchanges:
                with rabbit.channel() as channel, \
                        pytest.raises(amqp_exceptions.NotFound):
                    channel.exchange_declare(exchange, "topic",
                                             passive=True)
            broker.declare(make_worker(conf))
            with rabbit.channel() as channel:
                for exchange in exchanges:
                    # declared as oslo.messaging's listeners would: topic,
                    # non-durable (an equal declaration passes)
                    channel.exchange_declare(exchange, "topic",
                                             durable=False,
                                             auto_delete=False)
                # a durable quorum queue
                channel.queue_declare(
                    queue, durable=True, auto_delete=False,
                    arguments={"x-queue-type": "quorum"})
            self.check_routing(rabbit, queue, exchanges)
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                for exchange in exchanges:
                    channel.exchange_delete(exchange)

    def test_one_mismatching_exchange_is_one_line_naming_it(
            self, tmp_path, rabbit):
        uid = uuid.uuid4().hex[:8]
        queue = "test-broker-several-" + uid
        exchanges = ["test-broker-nova-" + uid, "test-broker-glance-" + uid]
        # glance's service declared its exchange durable
        with rabbit.channel() as channel:
            channel.exchange_declare(exchanges[1], "topic", durable=True,
                                     auto_delete=False)
        conf = several_config(tmp_path, AMQP_URL, queue, exchanges,
                              BINDING_KEYS)
        try:
            with pytest.raises(exceptions.ConfigError) as caught:
                broker.declare(make_worker(conf))
            message = str(caught.value)
            assert "\n" not in message
            assert message.startswith("%s [consumer:%s] exchange_durable: "
                                      "exchange %r exists on the broker "
                                      "with durable = true"
                                      % (conf.filename, queue, exchanges[1]))
            assert "set exchange_durable = true" in message
        finally:
            with rabbit.channel() as channel:
                channel.queue_delete(queue)
                for exchange in exchanges:
                    channel.exchange_delete(exchange)

    def test_no_routing_key_warns_once_at_start(self, tmp_path, caplog):
        uid = uuid.uuid4().hex[:8]
        queue = "q-" + uid
        conf = several_config(tmp_path, "memory://", queue, ["ex-" + uid])
        with caplog.at_level(logging.INFO, logger=broker.LOG.name):
            broker.declare(make_worker(conf))
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING
                    and r.name == broker.LOG.name]
        assert warnings == [broker.W_QUEUE_NAME_KEY % (queue, queue)]
        assert warnings[0].startswith(
            "[consumer:%s] routing_key is not set, so the queue is bound "
            "with its own name %r as routing key" % (queue, queue))
        assert "[consumer:%s] queue %s bound to exchange(s) ex-%s with %s" \
            % (queue, queue, uid, queue) in caplog.text
        # set (even to the queue's name): no warning
        caplog.clear()
        conf = several_config(tmp_path, "memory://", queue, ["ex-" + uid],
                              queue)
        with caplog.at_level(logging.INFO, logger=broker.LOG.name):
            broker.declare(make_worker(conf))
        assert not [r for r in caplog.records
                    if r.levelno >= logging.WARNING
                    and r.name == broker.LOG.name]
        # declare = false binds nothing: nothing to warn about
        caplog.clear()
        conf = several_config(tmp_path, "memory://", queue, ["ex-" + uid],
                              consumer="declare = false")
        with caplog.at_level(logging.INFO, logger=broker.LOG.name):
            broker.declare(make_worker(conf))
        assert not [r for r in caplog.records if r.name == broker.LOG.name]


def test_consumers_never_ask_for_global_qos(tmp_path):
    # RabbitMQ 4.3 refuses basic.qos with global = true: the prefetch is
    # per consumer
    uid = uuid.uuid4().hex[:8]
    conf = several_config(tmp_path, "memory://", "q-" + uid, ["ex-" + uid],
                          "k")
    worker = make_worker(conf)
    calls = []
    with kombu.Connection("memory://") as conn:
        channel = conn.channel()
        real = channel.basic_qos

        def basic_qos(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)
        channel.basic_qos = basic_qos
        for consumer in worker.get_consumers(
                functools.partial(kombu.Consumer, channel), channel):
            consumer.cancel()
    assert calls == [((0, conf.broker.prefetch_count, False), {})]


# -- queue depths -----------------------------------------------------------

class TestQueueDepths:
    def test_memory_reads_every_interval(self):
        uid = uuid.uuid4().hex[:8]
        with kombu.Connection("memory://") as conn:
            simple = conn.SimpleQueue("depth-" + uid)
            for n in range(3):
                simple.put({"n": n})
            depths = broker.QueueDepths(["depth-" + uid, "depth-" + uid,
                                         "never-declared-" + uid])
            assert depths.names == ("depth-" + uid, "never-declared-" + uid)
            # a queue kombu's virtual transports do not know has 0: an
            # empty redis queue does not exist
            assert depths.poll(conn, 100.0) == {"depth-" + uid: 3,
                                                "never-declared-" + uid: 0}
            simple.put({"n": 3})
            # not read again before the interval
            assert depths.poll(conn, 100.0 + depths.interval - 0.1)[
                "depth-" + uid] == 3
            assert depths.poll(conn, 100.0 + depths.interval)[
                "depth-" + uid] == 4
            simple.get(timeout=1).ack()
            depths.reset()  # a new connection: read at once
            assert depths.poll(conn, 100.0 + depths.interval)[
                "depth-" + uid] == 3
            simple.clear()
            simple.close()

    def test_amqp_missing_queue_is_absent_told_once_and_spares_the_rest(
            self, rabbit, caplog):
        uid = uuid.uuid4().hex[:8]
        here, missing = "test-depth-q-" + uid, "test-depth-missing-" + uid
        consuming = rabbit.channel()
        try:
            consuming.queue_declare(here, durable=True, auto_delete=False)
            with rabbit.Producer(consuming) as producer:
                for n in range(5):
                    producer.publish({"n": n}, exchange="", routing_key=here,
                                     retry=False)
            # published without confirms: wait until the broker has all 5
            deadline = time.monotonic() + 30
            while consuming.queue_declare(here, passive=True).message_count \
                    < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            depths = broker.QueueDepths([missing, here])
            with caplog.at_level(logging.INFO, logger=broker.LOG.name):
                first = depths.poll(rabbit, 0.0)
                second = depths.poll(rabbit, depths.interval)
            # absent, not 0: a queue that does not exist has no depth
            assert first == second == {here: 5}
            warnings = [r.getMessage() for r in caplog.records]
            assert len(warnings) == 1, warnings
            assert warnings[0] == (
                "cannot read the depth of queue %r (NOT_FOUND - no queue %r "
                "in vhost '/'): no shoebox_queue_messages for it until it "
                "can be read" % (missing, missing))
            # the 404 closed the reading channel only
            assert consuming.is_open
            consuming.queue_declare(here, passive=True)
            # once it exists, it is read, and said so
            consuming.queue_declare(missing, durable=True,
                                    auto_delete=False)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger=broker.LOG.name):
                third = depths.poll(rabbit, 2 * depths.interval)
            assert third == {missing: 0, here: 5}
            assert [r.getMessage() for r in caplog.records] == [
                broker.I_QUEUE_BACK % missing]
        finally:
            consuming.queue_delete(here)
            consuming.queue_delete(missing)
            consuming.close()


# -- TLS --------------------------------------------------------------------

def _broker(url="amqp://h//", **options):
    return config_mod.BrokerConfig(url=url, **options)


def test_ssl_argument():
    assert broker.ssl_argument(_broker()) is False
    assert broker.ssl_argument(_broker("amqps://h//")) == {
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    assert broker.ssl_argument(_broker(
        ssl=True, ssl_ca_file="/ca.pem", ssl_cert_file="/c.pem",
        ssl_key_file="/c.key")) == {
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None,
        "ca_certs": "/ca.pem", "certfile": "/c.pem", "keyfile": "/c.key"}


def test_make_connection_tls_and_transport_options():
    conn = broker.make_connection(_broker(
        "amqps://h1//;amqps://h2//", connect_max_retries=3),
        transport_options={"confirm_publish": True})
    assert isinstance(conn, broker.Connection)
    assert conn.ssl == {"cert_reqs": ssl.CERT_REQUIRED,
                        "server_hostname": None}
    assert conn.transport_options == {"confirm_publish": True,
                                      "max_retries": 3}


def test_each_failover_host_is_checked_against_its_own_name(monkeypatch):
    """kombu fills server_hostname in the shared ssl dict on the first
    connection; the second host must not be checked against the first
    one's name."""
    seen = []

    def fake_connection(**opts):
        seen.append((opts["host"], dict(opts["ssl"])))
        raise OSError("refused")

    conn = broker.make_connection(_broker("amqps://h1:5671//;"
                                          "amqps://h2:5671//"))
    monkeypatch.setattr(pyamqp.Transport, "Connection",
                        staticmethod(fake_connection))
    with pytest.raises(kombu.exceptions.OperationalError):
        conn.ensure_connection(max_retries=3, interval_start=0,
                               interval_step=0)
    assert [(host, opts["server_hostname"]) for host, opts in seen] == [
        ("h1:5671", "h1"), ("h2:5671", "h2"), ("h1:5671", "h1"),
        ("h2:5671", "h2")]


def _ssl_error(cls, reason, text):
    err = cls(1, text)
    err.reason = reason
    return err


def test_tls_refusals_are_permanent():
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.reason = "CERTIFICATE_VERIFY_FAILED"
    verify.verify_message = "self-signed certificate in certificate chain"
    assert broker.tls_refusal(verify)[0] == "ssl_ca_file"
    assert broker.reason(verify) == ("TLS: certificate verify failed: "
                                     "self-signed certificate in "
                                     "certificate chain")
    unknown = _ssl_error(ssl.SSLError, "TLSV1_ALERT_UNKNOWN_CA", "x")
    assert broker.tls_refusal(unknown)[0] == "ssl_cert_file"
    assert broker.reason(unknown) == "TLS: tlsv1 alert unknown ca"
    closed = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert broker.tls_refusal(closed) is broker.TLS_CLOSED
    plain = _ssl_error(ssl.SSLError, "WRONG_VERSION_NUMBER", "x")
    assert broker.tls_refusal(plain)[0] == "url"
    for err in (verify, unknown, closed, plain):
        assert broker.permanent_advice(err) == broker.tls_refusal(err)[1]
    for transient in (ConnectionRefusedError(111, "refused"),
                      _ssl_error(ssl.SSLError, "SOMETHING_ELSE", "x"),
                      socket.timeout("timed out")):
        assert broker.tls_refusal(transient) is None
        assert broker.permanent_advice(transient) is None


@pytest.fixture
def tls_server():
    """A TLS server on 127.0.0.1 whose certificate a client cannot verify
    (made by a CA of its own); counts the connections it accepted."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            accepted.append(sock)
            try:
                context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()


def _tls_config(tmp_path, urls, retries=""):
    path = tmp_path / "tls.conf"
    path.write_text(textwrap.dedent("""\
        [broker]
        url = {urls}
        connect_max_retries = {retries}
        [consumer:q]
        [archive]
        working_directory = {work}
        roll_checker = never
        """).format(urls=urls, retries=retries, work=tmp_path / "work"))
    return path


@pytest.mark.parametrize("retries", ["", "5"])
def test_an_untrusted_broker_stops_the_start_at_once(tmp_path, tls_server,
                                                     retries, caplog):
    port, accepted = tls_server
    path = _tls_config(tmp_path, "amqps://guest:secret@127.0.0.1:%d//"
                       % port, retries)
    worker = make_worker(config_mod.load(str(path)))
    with pytest.raises(broker.BrokerError) as info:
        broker.declare(worker)
    assert str(info.value) == (
        "%s [broker] ssl_ca_file: TLS to the broker "
        "amqps://guest:***@127.0.0.1:%d// failed: TLS: certificate verify "
        "failed: unable to get local issuer certificate; this will "
        "not heal by retrying: %s" % (path, port,
                                      broker.TLS_PERMANENT[
                                          "CERTIFICATE_VERIFY_FAILED"][1]))
    assert len(accepted) == 1


def test_an_untrusted_failover_host_is_the_one_named(tmp_path, tls_server):
    """The first URL refuses the connection, the second is the TLS server
    the worker cannot verify: the line names the second (kombu has moved
    on to the next URL by the time the retries end)."""
    port, accepted = tls_server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refusing = sock.getsockname()[1]
    path = _tls_config(tmp_path, "amqps://guest:secret@127.0.0.1:%d//;"
                       "amqps://guest:secret@127.0.0.1:%d//"
                       % (refusing, port))
    worker = make_worker(config_mod.load(str(path)))
    with pytest.raises(broker.BrokerError) as info:
        broker.declare(worker)
    assert "TLS to the broker amqps://guest:***@127.0.0.1:%d// failed: " \
        "TLS: certificate verify failed" % port in str(info.value)
    assert len(accepted) == 1
