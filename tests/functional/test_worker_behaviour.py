"""The worker against the real servers: bad input, a declaration the
broker refuses, the Redis transport, time-based rolls while idle, and the
backlog pause."""

import json
import pickle
import signal
import time

import orjson
import pytest
from kombu import Connection
from kombu import Exchange
from kombu import Queue

from shoebox_worker.consume import envelope
from shoebox_worker.consume import worker as worker_mod
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"


def _good(count, seed):
    return [(envelope.wrap(n), {"content_encoding": "utf-8"},
             n["message_id"]) for n in simulator.notifications(count,
                                                               seed=seed)]


def _nested(depth):
    return b'{"a":' * depth + b"1" + b"}" * depth


# (label, body, AMQP properties, malformed reason)
MALFORMED = [
    ("text", b"this is not json", {"content_encoding": "utf-8"},
     "not JSON"),
    ("latin1-as-utf8", b'{"name": "caf\xe9"}',
     {"content_encoding": "utf-8"}, "not UTF-8"),
    ("binary", b"\xff\xfe\x00\x01binary\x80",
     {"content_type": "application/octet-stream",
      "content_encoding": "binary"}, "not UTF-8"),
    ("empty", b"", {"content_encoding": "utf-8"}, "empty body"),
    ("blank", b" \n\t ", {"content_encoding": "utf-8"}, "empty body"),
    ("array", b'[{"event_type": "a.b"}]', {"content_encoding": "utf-8"},
     "not a JSON object"),
    ("string", b'"just a string"', {"content_encoding": "utf-8"},
     "not a JSON object"),
    ("no-message", b'{"oslo.version": "2.0"}', {"content_encoding": "utf-8"},
     "broken envelope: missing oslo.message"),
    ("no-version", b'{"oslo.message": "{}"}', {"content_encoding": "utf-8"},
     "broken envelope: missing oslo.version"),
    ("bad-version", b'{"oslo.version": "9.1", "oslo.message": "{}"}',
     {"content_encoding": "utf-8"}, "unknown envelope version '9.1'"),
    ("inner-not-json", b'{"oslo.version": "2.0", "oslo.message": "{nope"}',
     {"content_encoding": "utf-8"}, "broken envelope: not JSON"),
    ("inner-not-string", b'{"oslo.version": "2.0", "oslo.message": {}}',
     {"content_encoding": "utf-8"},
     "broken envelope: oslo.message is not a string"),
    ("inner-array", b'{"oslo.version": "2.0", "oslo.message": "[1]"}',
     {"content_encoding": "utf-8"}, "broken envelope: not a JSON object"),
    # orjson refuses lone surrogate escapes anywhere
    ("surrogate",
     b'{"oslo.version": "2.0", "oslo.message": "\\ud800"}',
     {"content_encoding": "utf-8"}, "not JSON"),
    ("deep-object", _nested(5000), {"content_encoding": "utf-8"},
     "JSON nested too deep"),
    ("deep-array", b"[" * 100000 + b"]" * 100000,
     {"content_encoding": "utf-8"}, "JSON nested too deep"),
    ("deep-inner", orjson.dumps({"oslo.version": "2.0",
                                 "oslo.message": _nested(3000).decode()}),
     {"content_encoding": "utf-8"}, "broken envelope: JSON nested too deep"),
    ("pickle", pickle.dumps({"event_type": "compute.instance.create.end"},
                            protocol=4),
     {"content_type": "application/x-python-serialize",
      "content_encoding": "binary"}, "not UTF-8"),
    ("pickle-0", pickle.dumps({"event_type": "x"}, protocol=0),
     {"content_type": "application/x-python-serialize",
      "content_encoding": "binary"}, "not JSON"),
]


@pytest.mark.both_brokers
def test_malformed_input_is_archived_verbatim(rabbit, broker, names,
                                              tmp_path, ft):
    rabbit.declare(names, names, ROUTING_KEY, durable=True)
    good = iter(_good(3 * len(MALFORMED) + 3, seed=6))
    messages, order, expected_good = [], [], {}
    for label, body, properties, _ in MALFORMED:
        for body_, props, message_id in (next(good), next(good)):
            messages.append((body_, props))
            order.append(message_id)
            expected_good[message_id] = body_
        messages.append((body, dict(properties, message_id="bad-" + label)))
        order.append("bad-" + label)
    # a v1 notification without an event_type: kept, flagged
    v1 = b'{"message_id": "bad-no-event-type", "payload": {}}'
    messages.append((v1, {"content_encoding": "utf-8"}))
    order.append("bad-no-event-type")
    for body_, props, message_id in good:
        messages.append((body_, props))
        order.append(message_id)
        expected_good[message_id] = body_
    rabbit.publish_raw(names, ROUTING_KEY, messages)

    config = ft.worker_config(tmp_path, names, names, url=broker.url,
                              routing_key=ROUTING_KEY, durable=True)
    result = ft.run_worker(config, timeout=60)
    assert result.returncode == 0, result.log_tail()
    assert "Traceback" not in result.log
    assert "archived a malformed message" in result.log
    assert rabbit.depth(names) == 0

    records = ft.read_archives(tmp_path / "archive")
    assert len(records) == len(messages)
    by_id = {r.metadata.get("message_id"): r for r in records}
    assert len(by_id) == len(records)
    for label, body, properties, reason in MALFORMED:
        record = by_id["bad-" + label]
        assert record.payload == body, label
        assert record.metadata["malformed"] == reason, label
        assert record.metadata["content_type"] == properties.get(
            "content_type", "application/json")
        assert record.metadata["queue"] == names
        assert record.metadata["routing_key"] == ROUTING_KEY
    flagged = by_id["bad-no-event-type"]
    assert flagged.payload == v1
    assert flagged.metadata["malformed"] == "no event_type"
    for message_id, body in expected_good.items():
        record = by_id[message_id]
        assert "malformed" not in record.metadata
        assert record.payload == json.loads(body)["oslo.message"].encode()
    # one archive, in the order of the queue
    assert [r.metadata.get("message_id") for r in records] == order


def test_durable_mismatch_is_one_line_and_exit_2(rabbit, names, tmp_path,
                                                 ft):
    rabbit.track_exchange(names)
    rabbit.track_queue(names)
    channel = rabbit.channel()
    Exchange(names, type="topic", durable=True)(channel).declare()
    channel.close()

    config = ft.worker_config(tmp_path, names, names, durable=False,
                              routing_key=ROUTING_KEY,
                              broker={"connect_max_retries": 2})
    result = ft.run_worker(config, timeout=30)
    assert result.returncode == 2, result.log
    assert result.elapsed < 10, result.elapsed
    lines = [line for line in result.log.splitlines()
             if "[consumer:%s]" % names in line]
    assert len(lines) == 1, result.log
    assert lines[0].startswith("shoebox-worker: %s [consumer:%s] "
                               "exchange_durable: " % (config, names))
    assert "with durable = true" in lines[0]
    assert "set exchange_durable = true" in lines[0]
    assert "msg/s" not in result.log
    assert "Traceback" not in result.log
    assert "retrying" not in result.log and "consuming" not in result.log

    # exchange_durable matches the exchange alone; the queue stays
    # non-durable, like oslo's default queues on a durable exchange
    config = ft.worker_config(tmp_path, names, names, durable=False,
                              routing_key=ROUTING_KEY, name="ok.conf",
                              consumer_options={"exchange_durable": True})
    result = ft.run_worker(config, timeout=30)
    assert result.returncode == 0, result.log_tail()
    assert "consuming from %s" % names in result.log

    # and durable = true matches both
    rabbit.channel().queue_delete(names)
    config = ft.worker_config(tmp_path, names, names, durable=True,
                              routing_key=ROUTING_KEY, name="durable.conf")
    result = ft.run_worker(config, timeout=30)
    assert result.returncode == 0, result.log_tail()
    # redeclaring it durable passes only if the worker declared it so
    channel = rabbit.channel()
    Queue(names, Exchange(names, type="topic", durable=True),
          routing_key=ROUTING_KEY, durable=True)(channel).declare()
    channel.close()


def test_redis_transport(redis_names, tmp_path, ft):
    names = redis_names
    count = 500
    exchange = Exchange(names, type="topic")
    queue = Queue(names, exchange, routing_key=ROUTING_KEY)
    notifications = list(simulator.notifications(count, seed=8))
    with Connection(ft.REDIS_URL) as conn:
        channel = conn.channel()
        queue(channel).declare()  # the binding must exist to route
        producer = conn.Producer(channel, exchange=exchange)
        for notification in notifications:
            producer.publish(envelope.wrap(notification),
                             routing_key=ROUTING_KEY,
                             content_type="application/json",
                             content_encoding="utf-8", retry=False)
    config = ft.worker_config(
        tmp_path, names, names, url=ft.REDIS_URL, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": 200},
        callbacks={"gzip": {}}, archive_options={"fsync_every": 50},
        broker={"prefetch_count": 100})
    result = ft.run_worker(config, timeout=60)
    assert result.returncode == 0, result.log_tail()
    assert "consuming from %s on redis://" % names in result.log
    records = ft.read_archives(tmp_path / "archive")
    assert len(ft.archive_files(tmp_path / "archive")) == 3
    by_id = {r.metadata["message_id"]: r for r in records}
    assert len(records) == count
    for notification in notifications:
        record = by_id[notification["message_id"]]
        assert "malformed" not in record.metadata
        assert json.loads(record.payload) == notification
        assert record.metadata["event_type"] == notification["event_type"]
    import redis
    client = redis.Redis.from_url(ft.REDIS_URL)
    assert client.llen(names) == 0  # kombu's list for the queue


def test_time_roll_while_idle(rabbit, names, tmp_path, worker_procs, ft):
    rabbit.declare(names, names, ROUTING_KEY)
    published = ft.publish(ft.AMQP_URL, 5, names, ROUTING_KEY, seed=9)
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        roll_checker="time", roll_options={"roll_minutes": 0.02},
        callbacks={"gzip": {}})
    worker = worker_procs(config)
    directory = tmp_path / "archive"
    ft.wait_until(lambda: ft.archive_files(directory), 30,
                  message="an archive")
    opened = time.monotonic()
    ft.wait_until(lambda: rabbit.depth(names) == 0, 30, message="consumed")
    # no new message: the roll must come from the idle loop. The gzip step
    # writes the .gz, then removes the archive: wait for both to be done
    gz = ft.wait_until(
        lambda: _only_gzipped(ft.archive_files(directory)), 10, interval=0.05,
        message="the idle archive rolled, gzipped and removed")
    rolled_after = time.monotonic() - opened
    assert worker.alive()
    assert len(gz) == 1 and ft.archive_files(directory) == gz
    assert [r.metadata["message_id"]
            for r in ft.read_archives(directory)] == published
    print("\nidle time roll: gzipped %.2f s after the archive appeared "
          "(roll_minutes = 0.02 = 1.2 s)" % rolled_after)
    assert 0.5 < rolled_after < 5
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.log_tail()
    assert ft.archive_files(directory) == gz  # nothing new opened


def _only_gzipped(files):
    """``files`` when every one is gzipped, else ``None``."""
    if files and all(f.endswith(".gz") for f in files):
        return files
    return None


def _ready_unacked_consumers(ft, queue):
    """``(ready, unacked, consumers)`` of ``queue``, asked of the broker."""
    out = ft.rabbitmqctl("list_queues", "-q", "--no-table-headers", "name",
                         "messages_ready", "messages_unacknowledged",
                         "consumers")
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return tuple(int(field) for field in fields[1:4])
    return None, None, None


def test_backlog_pause(rabbit, names, tmp_path, worker_procs, ft):
    rabbit.declare(names, names, ROUTING_KEY)
    count = 3000
    ft.publish(ft.AMQP_URL, count, names, ROUTING_KEY, seed=10)
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": 100},
        callbacks={"memory": {"fail_times": 1000000}},
        broker={"prefetch_count": 100},
        archive_options={"fsync_every": 50, "max_backlog_mb": 0.1,
                         "retry_initial": 30, "retry_max": 60})
    worker = worker_procs(config)
    assert worker.wait_for_log(r"PAUSED consuming from %s" % names, 30), \
        worker.log_tail()
    assert "max_backlog_mb" in worker.log
    # paused, as the broker sees it: the consumer stays (a basic.cancel
    # would return what it holds: a delivery attempt each), what came
    # after the pause is kept unacked, at most its prefetch window, and
    # nothing more is delivered
    directory = tmp_path / "archive"

    def state():
        ready, unacked, consumers = _ready_unacked_consumers(ft, names)
        return ready, unacked, consumers, len(ft.read_archives(directory))

    ft.wait_until(lambda: (lambda r, u, c, a: c == 1 and u <= 100
                           and r + u + a == count)(*state()), 10,
                  interval=0.2, message="a full window, nothing more taken")
    ready, held, _, archived = state()
    after = ready + held, archived
    print("\nbacklog pause: %d archived, %d kept unacked, %d left in the "
          "queue" % (archived, held, ready))
    assert ready > 0
    assert worker.alive()
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log_tail()
    # shipping gets SHUTDOWN_SHIP_GRACE (10 s) to finish on SIGTERM, all
    # of it here since the callback keeps failing
    took = time.monotonic() - sent
    print("backlog pause: exit %.1f s after SIGTERM" % took)
    assert took < worker_mod.SHUTDOWN_SHIP_GRACE + 5
    # everything archived was acked, the rest is back in the queue
    ft.wait_until(lambda: rabbit.depth(names) == after[0], 10,
                  message="the queue untouched")
    assert len(ft.read_archives(directory)) == after[1]
