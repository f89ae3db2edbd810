"""One queue bound to several exchanges with several routing keys, on
Redis and RabbitMQ, and the consumer lag metric (``shoebox_queue_messages``)
of a running worker, scraped from its endpoint."""

import re
import signal
import socket
import urllib.request

import pytest
from kombu import Connection
from kombu import Exchange
from prometheus_client.parser import text_string_to_metric_families

from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

BINDING_KEYS = "notifications.*, versioned_notifications.*"
#: (routing key, whether BINDING_KEYS route it)
KEYS = [("notifications.info", True), ("notifications.error", True),
        ("versioned_notifications.info", True),
        ("notifications.info.extra", False), ("other.info", False)]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def by_queue(port, family_name):
    """``{queue: value}`` of one family of the endpoint (by queue); None
    while the endpoint does not answer yet."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                    timeout=5) as response:
            text = response.read().decode()
    except OSError:  # not serving yet
        return None
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                values[sample.labels["queue"]] = sample.value
    return values


def queue_depths(port):
    """``{queue: messages}`` of shoebox_queue_messages."""
    return by_queue(port, "shoebox_queue_messages")


def consumed(port):
    """``{queue: messages}`` archived so far."""
    return by_queue(port, "shoebox_messages_consumed")


def _archived(ft, tmp_path, queue):
    """``{message_id: (exchange, routing key)}`` of the records archived
    in tmp_path/archive, each once and each from ``queue``."""
    archived = {}
    for record in ft.read_archives(tmp_path / "archive"):
        meta = record.metadata
        assert meta["message_id"] not in archived, "archived twice"
        archived[meta["message_id"]] = (meta["exchange"],
                                        meta["routing_key"])
        assert meta["queue"] == queue
    return archived


def publish(url, exchanges, count_per_key, seed):
    """``count_per_key`` notifications to every exchange with every KEYS
    key; returns ``{message_id: (exchange, routing key)}`` of those the
    bindings route. The exchanges are declared, topic, as oslo.messaging's
    notifiers do: kombu's virtual transports keep an exchange's type in the
    declaring process, and route to an exchange they have not declared as
    a direct one."""
    notifications = simulator.notifications(
        len(exchanges) * len(KEYS) * count_per_key, seed=seed)
    routed = {}
    with Connection(url) as conn:
        producer = conn.Producer()
        for exchange in exchanges:
            target = Exchange(exchange, type="topic", durable=False)
            for key, routes in KEYS:
                for _ in range(count_per_key):
                    notification = next(notifications)
                    producer.publish(envelope.wrap(notification),
                                     exchange=target, routing_key=key,
                                     content_type="application/json",
                                     content_encoding="utf-8", retry=False,
                                     declare=[target])
                    if routes:
                        routed[notification["message_id"]] = (exchange, key)
    return routed


def test_redis_several_bindings(redis_names, tmp_path, worker_procs, ft):
    names = redis_names
    exchanges = [names + "-nova", names + "-glance"]
    port = free_port()
    watched = names + "-never-used"
    config = ft.worker_config(
        tmp_path, names, ", ".join(exchanges), url=ft.REDIS_URL,
        routing_key=BINDING_KEYS, roll_checker="count",
        roll_options={"roll_count": 20}, archive_options={"fsync_every": 10},
        broker={"prefetch_count": 50})
    with open(config, "a") as f:
        f.write("[metrics]\nport = %d\nwatch_queues = %s\n" % (port,
                                                              watched))
    # the worker binds first: kombu's virtual exchanges route only to
    # the bindings that exist when a message is published
    worker = worker_procs(config, idle_exit=60)
    assert worker.wait_for_log("consuming from %s on redis://" % names,
                               30), worker.log_tail()
    routed = publish(ft.REDIS_URL, exchanges, 6, seed=21)
    assert len(routed) == 2 * 3 * 6
    ft.wait_until(lambda: consumed(port) == {names: len(routed)}, 60,
                  interval=0.2, message="every routed message archived")
    # the queue drained; an empty redis queue (and one never used) has 0
    ft.wait_until(lambda: queue_depths(port) == {names: 0, watched: 0}, 60,
                  interval=0.2, message="the depths read as 0")
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_tail()
    assert _archived(ft, tmp_path, names) == routed
    import redis
    assert redis.Redis.from_url(ft.REDIS_URL).llen(names) == 0


@pytest.mark.both_brokers
def test_own_quorum_queue_bound_to_several_exchanges(rabbit, broker, names,
                                                     tmp_path, worker_procs,
                                                     ft):
    # the sample config's own queue, in small: durable, quorum, bound with
    # both topics to exchanges that no service has declared yet
    own = rabbit.track_queue(names + "-archiver")
    exchanges = [rabbit.track_exchange("%s-%s" % (names, service))
                 for service in ("nova", "cinder", "glance")]
    port = free_port()
    config = ft.worker_config(
        tmp_path, own, ", ".join(exchanges), url=broker.url,
        routing_key=BINDING_KEYS, durable=True, roll_checker="count",
        roll_options={"roll_count": 25},
        consumer_options={"exchange_durable": False,
                          "queue_arguments": "x-queue-type=quorum"})
    with open(config, "a") as f:
        f.write("[metrics]\nport = %d\n" % port)
    worker = worker_procs(config, idle_exit=60)
    assert worker.wait_for_log("consuming from %s" % own, 30), \
        worker.log_tail()
    routed = publish(broker.url, exchanges, 5, seed=22)
    assert len(routed) == 3 * 3 * 5
    ft.wait_until(lambda: consumed(port) == {own: len(routed)}, 60,
                  interval=0.2, message="every routed message archived")
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_tail()
    assert "Traceback" not in worker.log
    # one warning at most: on 4.0, RabbitMQ's default delivery limit (the
    # sample's queue gets the same line); nothing refused or deprecated
    warnings = [line for line in worker.log.splitlines()
                if " WARNING " in line]
    assert len(warnings) == int(broker.is_4), warnings
    if broker.is_4:
        assert "is DROPPED (x-delivery-limit 20: RabbitMQ 4's default" in \
            warnings[0]
    assert _archived(ft, tmp_path, own) == routed
    assert rabbit.depth(own) == 0


def test_lag_metric_of_consumed_and_watched_queues(rabbit, names, tmp_path,
                                                   worker_procs, ft):
    own = rabbit.track_queue(names + "-archiver")
    exchange = rabbit.track_exchange(names + "-nova")
    # a services' default queue that nobody consumes, and one that does
    # not exist
    watched = names + "-notifications.info"
    missing = rabbit.track_queue(names + "-missing")
    rabbit.declare(watched, exchange, "notifications.info")
    rabbit.publish_raw(exchange, "notifications.info",
                       [(b'{"event_type": "x"}', {})] * 7)
    port = free_port()
    config = ft.worker_config(
        tmp_path, own, exchange, routing_key=BINDING_KEYS, durable=True,
        consumer_options={"exchange_durable": False,
                          "queue_arguments": "x-queue-type=quorum"})
    with open(config, "a") as f:
        f.write("[metrics]\nport = %d\nwatch_queues = %s, %s\n"
                % (port, watched, missing))
    worker = worker_procs(config, idle_exit=120)
    # the seven came before the own queue was bound: only the default
    # queue has them
    ft.wait_until(lambda: worker.alive() and
                  queue_depths(port) == {own: 0, watched: 7}, 60,
                  interval=0.2, message="the depths of both queues")
    # a later read: the count follows the queue, the missing queue is
    # still absent, and was told once
    rabbit.publish_raw(exchange, "notifications.error",
                       [(b'{"event_type": "y"}', {})] * 3)
    rabbit.publish_raw(exchange, "notifications.info",
                       [(b'{"event_type": "z"}', {})])
    ft.wait_until(lambda: queue_depths(port) == {own: 0, watched: 8}, 60,
                  interval=0.2, message="the watched queue read again")
    warnings = re.findall(r"cannot read the depth of queue '%s'"
                          % re.escape(missing), worker.log)
    assert len(warnings) == 1, worker.log_tail()
    # once it exists, it has a sample (and the worker says so)
    rabbit.declare(missing, exchange, "nothing.routes.here")
    ft.wait_until(lambda: queue_depths(port) == {own: 0, watched: 8,
                                                  missing: 0}, 60,
                  interval=0.2, message="the missing queue once declared")
    assert "the depth of queue %r can be read again" % missing in worker.log
    # the 404s never disturbed consuming: the 4 messages routed to the own
    # queue were archived
    ft.wait_until(lambda: consumed(port) == {own: 4}, 30, interval=0.2,
                  message="4 records")
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_tail()
    assert "Traceback" not in worker.log
    records = ft.read_archives(tmp_path / "archive")
    assert sorted(r.metadata["routing_key"] for r in records) == \
        ["notifications.error"] * 3 + ["notifications.info"]
    assert {r.metadata["exchange"] for r in records} == {exchange}
