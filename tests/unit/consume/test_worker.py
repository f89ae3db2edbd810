"""Tests for shoebox_worker.consume.worker over kombu's memory://
transport (and
Redis through fakeredis): what is acked is on disk, nothing is lost."""

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import textwrap
import threading
import time
import types
import uuid

import kombu
import kombu.message
import pytest

from shoebox_worker import archive
from shoebox_worker import callbacks as callbacks_mod
from shoebox_worker import config as config_mod
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index
from shoebox_worker import plugins
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker.consume import backpressure
from shoebox_worker.consume import batch as batch_mod
from shoebox_worker.consume import broker as broker_mod
from shoebox_worker.consume import stream as stream_mod
from shoebox_worker.consume import worker as worker_mod
from shoebox_worker.consume.broker import reason as broker_reason
from shoebox_worker.ship import shipper as shipper_mod
from shoebox_worker.ship import steps

#: How long a kombu drain waits while idle: keeps the loop (and the tests)
#: quick.
SAFETY = 0.01
WAIT = 10.0


def notification(n, **extra):
    body = {"message_id": "m-%d" % n, "event_type": "compute.instance.update",
            "priority": "INFO", "publisher_id": "compute.host1",
            "timestamp": "2026-01-01 00:00:%02d" % (n % 60),
            "_context_request_id": "req-%d" % n,
            "payload": {"instance_id": "i-%d" % n, "n": n}}
    body.update(extra)
    return body


def v2_body(n, **extra):
    # the inner string keeps odd spacing: it must be stored as received
    inner = json.dumps(notification(n, **extra), separators=(", ", ":  "))
    return json.dumps({"oslo.version": "2.0", "oslo.message": inner}).encode()


def inner_of(body):
    return json.loads(body)["oslo.message"].encode()


def wait_for(condition, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.005)


def count_ticks(worker):
    """Count the worker's ticks (each one runs the backpressure check, after
    the fsync interval and the idle roll): a positive sync point, so that
    a test can show that something did not happen during a few ticks
    without sleeping.

    :returns: ``wait(n)``, which waits until ``n`` more ticks ran.
    """
    count = [0]
    check = worker.backpressure.check

    def counted(*args, **kwargs):
        count[0] += 1
        return check(*args, **kwargs)

    worker.backpressure.check = counted

    def wait(n=3):
        target = count[0] + n
        wait_for(lambda: count[0] >= target, what="%d worker ticks" % n)
    return wait


class Broker:
    """One test's exchange and queue on a kombu transport."""

    def __init__(self, url, transport_options=None):
        self.url = url
        self.transport_options = transport_options or {}
        uid = uuid.uuid4().hex[:10]
        self.exchange_name = "ex-" + uid
        self.queue_name = "q-" + uid
        self.exchange = kombu.Exchange(self.exchange_name, type="topic",
                                       durable=False)
        self.queue = kombu.Queue(self.queue_name, self.exchange,
                                 routing_key=self.queue_name, durable=False)
        self.conn = self.connection()
        self.queue(self.conn.default_channel).declare()

    def connection(self):
        return kombu.Connection(self.url,
                                transport_options=self.transport_options)

    def publish(self, bodies, **properties):
        with self.conn.Producer() as producer:
            for body in bodies:
                producer.publish(
                    body, exchange=self.exchange,
                    routing_key=self.queue_name, serializer=None,
                    content_type="application/json",
                    content_encoding="utf-8", **properties)

    def depth(self):
        """Messages waiting in the queue (unacked ones come back to it
        when the worker's channel closes)."""
        return self.conn.default_channel._size(self.queue_name)

    def close(self):
        # memory:// is process-global, and queue_delete() leaves the queue
        # in the exchange's table: unbind first
        channel = self.conn.default_channel
        bound = self.queue(channel)
        try:
            bound.unbind_from(self.exchange, routing_key=self.queue_name)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        bound.delete()
        self.conn.release()


@pytest.fixture
def broker():
    b = Broker("memory://")
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _clean_memory_events():
    steps.MemoryCallback.all_events.clear()
    yield
    steps.MemoryCallback.all_events.clear()


def write_config(tmp_path, broker, archive_options=None, sections="",
                 broker_options="", consumer_options=""):
    archive = {"working_directory": str(tmp_path / "work"),
               "roll_checker": "count", "callbacks": "memory",
               "fsync_every": "5", "fsync_interval": "0.05",
               "retry_initial": "0.01", "retry_max": "0.05"}
    archive.update(archive_options or {})
    text = textwrap.dedent("""\
        [broker]
        url = {url}
        prefetch_count = 100
        {broker_options}

        [consumer:{queue}]
        exchange = {exchange}
        routing_key = {queue}
        {consumer_options}

        [archive]
        {archive}

        [worker]
        stats_interval = 0
        """).format(url=broker.url, queue=broker.queue_name,
                    exchange=broker.exchange_name,
                    broker_options=broker_options,
                    consumer_options=consumer_options,
                    archive="\n".join("%s = %s" % item
                                      for item in archive.items()))
    if "[roll_checker:" not in sections and \
            archive["roll_checker"] == "count":
        sections += "\n[roll_checker:count]\nroll_count = 1000\n"
    path = tmp_path / ("worker-%s.conf" % uuid.uuid4().hex[:6])
    path.write_text(text + textwrap.dedent(sections))
    return config_mod.load(str(path))


def fail_writes(monkeypatch, failure):
    """Make each archive write ask ``failure(n)`` (n: 1 for the first
    write): an errno is raised as that OSError, None writes. Returns the
    count of writes tried (``[n]``)."""
    write = archive.ArchiveWriter.write
    calls = [0]

    def failing_write(self, metadata, payload):
        calls[0] += 1
        code = failure(calls[0])
        if code is not None:
            raise OSError(code, os.strerror(code))
        return write(self, metadata, payload)

    monkeypatch.setattr(archive.ArchiveWriter, "write", failing_write)
    return calls


class Running:
    """A worker consuming in a thread until the test stops it."""

    def __init__(self, worker, start=True):
        self.worker = worker
        self.error = None
        if start:
            worker.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.worker.run(safety_interval=SAFETY)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def wait_consumed(self, count, timeout=WAIT):
        wait_for(lambda: self.worker.stats.consumed_total >= count or
                 not self.thread.is_alive(), timeout,
                 "%d messages consumed" % count)
        assert self.error is None, self.error

    def wait_acked(self, count, timeout=WAIT):
        wait_for(lambda: self.worker.stats.acked_total >= count or
                 not self.thread.is_alive(), timeout,
                 "%d messages acked" % count)
        assert self.error is None, self.error

    def stop(self, timeout=WAIT):
        self.worker.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        self.worker.shutdown(ship_timeout=5)
        if self.error is not None:
            raise self.error


def make_worker(conf, broker=None, **kwargs):
    conn = broker.connection() if broker is not None else None
    checker, chain = plugins.build(conf)
    return worker_mod.Worker(conf, roll_checker=checker, callbacks=chain,
                             connection=conn, **kwargs)


def archives(worker_or_dir, pattern=None):
    """Every (metadata, payload) in the archives, in written order."""
    if isinstance(worker_or_dir, worker_mod.Worker):
        directory, pattern = worker_or_dir.directory, worker_or_dir.pattern
    else:
        directory = worker_or_dir
    records = []
    for suffix in ("", ".gz"):
        manager = roll_manager.ReadingRollManager(pattern + suffix,
                                                  directory=directory)
        records.extend(manager)
    return records


def archive_files(worker):
    """The archives in the working directory (not their state files nor
    their indexes)."""
    return sorted(name for name in os.listdir(worker.directory)
                  if not name.endswith((shipper_mod.STATE_SUFFIX,
                                        index.SUFFIX)))


def memory_of(worker):
    (step,) = [cb for _, cb in worker.chain.steps
               if isinstance(cb, steps.MemoryCallback)]
    return step


# -- end to end ---------------------------------------------------------------

class TestConsume:
    def test_every_message_archived_exactly(self, tmp_path, broker):
        conf = write_config(tmp_path, broker, {
            "metadata_fields": "payload.instance_id, payload.n",
            "static_metadata": "region=dfw, cell=c1"},
            "[roll_checker:count]\nroll_count = 7\n")
        bodies = [v2_body(n) for n in range(30)]
        broker.publish(bodies)
        worker = make_worker(conf, broker, ident="w1")
        running = Running(worker)
        running.wait_acked(30)
        running.stop()
        records = archives(worker)
        assert [payload for _, payload in records] == \
            [inner_of(body) for body in bodies]
        metadata = records[3][0]
        assert metadata == {
            "event_type": "compute.instance.update", "message_id": "m-3",
            "timestamp": "2026-01-01 00:00:03",
            "publisher_id": "compute.host1", "priority": "INFO",
            "request_id": "req-3", "queue": broker.queue_name,
            "routing_key": broker.queue_name,
            "exchange": broker.exchange_name,
            "payload.instance_id": "i-3", "payload.n": "3",
            "region": "dfw", "cell": "c1"}
        # 30 records, 7 per archive: 5 files, all shipped
        files = archive_files(worker)
        assert len(files) == 5
        assert all("w1" in name for name in files)
        closed = [os.path.basename(f) for event, f in memory_of(worker).events
                  if event == "close"]
        assert sorted(closed) == files
        assert broker.depth() == 0
        assert worker.stats.acked_total == 30

    def test_each_archive_has_its_index(self, tmp_path, broker):
        conf = write_config(tmp_path, broker, {
            "index_fields": "payload.instance_id, _context_request_id"},
            "[roll_checker:count]\nroll_count = 7\n")
        bodies = [v2_body(n) for n in range(10)] + [b"not json"] + \
            [json.dumps(notification(n)).encode() for n in range(10, 14)]
        broker.publish(bodies)
        worker = make_worker(conf, broker, ident="w1")
        running = Running(worker)
        running.wait_acked(15)
        running.stop()
        files = archive_files(worker)
        assert len(files) == 3  # 7, 7 and 1 records
        found = {}
        for name in files:
            path = os.path.join(worker.directory, name)
            got = index.read_file(path + index.SUFFIX)
            assert got.fields == ("payload.instance_id",
                                  "_context_request_id")
            with archive.ArchiveReader(path) as reader:
                records = list(reader)
            assert got.records == len(records)
            stamps = [m["timestamp"] for m, _ in records if "timestamp" in m]
            assert got.earliest == min(stamps).replace(" ", "T") + \
                ".000000Z"
            for metadata, _ in records:
                if "message_id" in metadata:
                    n = int(metadata["message_id"][2:])
                    assert got.may_contain("payload.instance_id", "i-%d" % n)
                    assert got.may_contain("_context_request_id",
                                           "req-%d" % n)
                    found[n] = name
        assert sorted(found) == list(range(14))

    def test_no_index_when_index_fields_is_empty(self, tmp_path, broker):
        conf = write_config(tmp_path, broker, {"index_fields": ""})
        broker.publish([v2_body(0)])
        worker = make_worker(conf, broker, ident="w1")
        running = Running(worker)
        running.wait_acked(1)
        running.stop()
        assert len(archive_files(worker)) == 1
        assert not [n for n in os.listdir(worker.directory)
                    if n.endswith(index.SUFFIX)]

    def test_v1_bodies_stored_as_is(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        bodies = [json.dumps(notification(n), indent=2).encode()
                  for n in range(3)]
        broker.publish(bodies)
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(3)
        running.stop()
        assert [p for _, p in archives(worker)] == bodies

    def test_consume_generator(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        broker.publish([v2_body(n) for n in range(12)])
        worker = make_worker(conf, broker)
        worker.start()
        seen = 0
        for _ in worker.consume(safety_interval=SAFETY):
            seen += 1
            if seen == 12:
                worker.stop()
        worker.shutdown()
        assert worker.stats.acked_total == 12
        assert len(archives(worker)) == 12
        assert broker.depth() == 0


class TestMalformed:
    BAD = [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"", "empty body"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"oslo.version": "2.0"}', "broken envelope: missing oslo.message"),
        (b'{"oslo.version": "3.0", "oslo.message": "{}"}',
         "unknown envelope version '3.0'"),
        (b'{"oslo.version": "2.0", "oslo.message": "nope"}',
         "broken envelope: not JSON"),
        (b"[" * 3000, "JSON nested too deep"),
        (b'{"payload": {}}', "no event_type"),
    ]

    def test_archived_verbatim_acked_and_not_requeued(self, tmp_path,
                                                      broker, caplog):
        caplog.set_level(logging.WARNING, logger=worker_mod.__name__)
        conf = write_config(tmp_path, broker)
        good = [v2_body(n) for n in range(3)]
        bodies = [good[0]] + [b for b, _ in self.BAD] + good[1:]
        with broker.conn.Producer() as producer:
            for n, body in enumerate(bodies):
                producer.publish(
                    body, exchange=broker.exchange,
                    routing_key=broker.queue_name, serializer=None,
                    content_type="application/json",
                    content_encoding="utf-8", message_id="amqp-%d" % n)
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(len(bodies))
        # a requeue loop would show up as more consumed: a last message,
        # published once all are acked, comes after any requeued one
        broker.publish([v2_body(99)])
        running.wait_acked(len(bodies) + 1)
        running.stop()
        assert worker.stats.consumed_total == len(bodies) + 1
        records = archives(worker)[:-1]
        assert [p for _, p in records] == \
            [inner_of(good[0])] + [b for b, _ in self.BAD] + \
            [inner_of(b) for b in good[1:]]
        for (metadata, _), (_, reason) in zip(records[1:-2], self.BAD,
                                              strict=True):
            assert metadata["malformed"] == reason
            assert metadata["queue"] == broker.queue_name
        assert records[1][0]["message_id"] == "amqp-1"
        assert records[1][0]["content_type"] == "application/json"
        assert records[1][0]["content_encoding"] == "utf-8"
        assert "malformed" not in records[0][0]
        assert sum(worker.stats.malformed_by_queue.values()) == len(self.BAD)
        # rate-limited: the first one is logged, with its queue and reason
        lines = [r.getMessage() for r in caplog.records
                 if r.name == worker_mod.__name__]
        assert lines[0] == worker_mod.W_MALFORMED % (
            broker.queue_name, self.BAD[0][1], 1)
        assert broker.depth() == 0


class TestAcks:
    @pytest.fixture
    def log(self, monkeypatch):
        """Records writes, syncs and acks in the order they happen."""
        events = []
        write, sync = archive.ArchiveWriter.write, archive.ArchiveWriter.sync
        ack = kombu.message.Message.ack

        def logged_write(self, metadata, payload):
            events.append(("write", metadata.get("message_id")))
            return write(self, metadata, payload)

        def logged_sync(self):
            sync(self)
            events.append(("sync", None))

        def logged_ack(self, *args, **kwargs):
            events.append(("ack", json.loads(json.loads(
                self.body)["oslo.message"])["message_id"]))
            return ack(self, *args, **kwargs)

        monkeypatch.setattr(archive.ArchiveWriter, "write", logged_write)
        monkeypatch.setattr(archive.ArchiveWriter, "sync", logged_sync)
        monkeypatch.setattr(kombu.message.Message, "ack", logged_ack)
        return events

    def test_acked_only_after_sync(self, tmp_path, broker, log):
        conf = write_config(tmp_path, broker, {"fsync_every": "4"},
                            "[roll_checker:count]\nroll_count = 6\n")
        broker.publish([v2_body(n) for n in range(23)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(23)
        running.stop()
        written, synced = set(), set()
        for event, message_id in log:
            if event == "write":
                written.add(message_id)
            elif event == "sync":
                synced |= written
            else:
                assert message_id in synced, log
        assert sum(1 for e, _ in log if e == "ack") == 23

    def test_one_commit_per_fsync_every(self, tmp_path, broker, log):
        conf = write_config(tmp_path, broker, {"fsync_every": "5",
                                               "fsync_interval": "60"})
        broker.publish([v2_body(n) for n in range(20)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(20)
        running.stop()
        batches, current = [], 0
        for event, _ in log:
            if event == "sync":
                if current:
                    batches.append(current)
                current = 0
            elif event == "ack":
                current += 1
        batches.append(current)
        assert [b for b in batches if b] == [5, 5, 5, 5]

    def test_fsync_interval_commits_while_idle(self, tmp_path, broker, log):
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "0.1"})
        broker.publish([v2_body(n) for n in range(3)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_consumed(3)
        running.wait_acked(3, timeout=2)  # fsync_every is far away
        events = [e for e, _ in log]
        assert events.count("ack") == 3
        assert events.index("sync") < events.index("ack")
        running.stop()


    def test_a_roll_commits_at_once(self, tmp_path, broker, log):
        # fsync_every and fsync_interval are far away: only the roll acks
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "60"},
                            "[roll_checker:count]\nroll_count = 4\n")
        broker.publish([v2_body(n) for n in range(6)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_consumed(6)
        running.wait_acked(4)
        events = [e for e, _ in log]
        # the four records written, synced (the archive closed), acked
        assert events[:9] == ["write"] * 4 + ["sync"] + ["ack"] * 4, events
        assert worker.stats.acked_total == 4  # the next two wait
        running.stop()
        assert worker.stats.acked_total == 6


class TestRolls:
    def test_an_idle_roll_commits_at_once(self, tmp_path, broker,
                                          monkeypatch):
        now = [1000.0]
        monkeypatch.setattr(roll_checker, "clock", lambda: now[0])
        conf = write_config(tmp_path, broker, {"roll_checker": "time",
                                               "fsync_every": "50",
                                               "fsync_interval": "60"},
                            "[roll_checker:time]\nroll_minutes = 1\n")
        broker.publish([v2_body(n) for n in range(2)])
        worker = make_worker(conf, broker)
        ticks = count_ticks(worker)
        running = Running(worker)
        running.wait_consumed(2)
        ticks(2)
        assert worker.stats.acked_total == 0  # nothing due yet
        now[0] += 61
        running.wait_acked(2)  # at the roll, not 60 s later
        assert worker.stats.rolls == 1
        wait_for(lambda: memory_of(worker).events, what="the shipping")
        assert [e for e, _ in memory_of(worker).events] == ["close"]
        running.stop()

    def test_time_roll_fires_while_idle(self, tmp_path, broker,
                                        monkeypatch):
        now = [1000.0]
        monkeypatch.setattr(roll_checker, "clock", lambda: now[0])
        conf = write_config(tmp_path, broker, {"roll_checker": "time"},
                            "[roll_checker:time]\nroll_minutes = 1\n")
        broker.publish([v2_body(n) for n in range(2)])
        worker = make_worker(conf, broker)
        ticks = count_ticks(worker)
        running = Running(worker)
        running.wait_acked(2)
        memory = memory_of(worker)
        ticks(3)  # the clock stands still: no roll, however many ticks
        assert memory.events == []
        active = worker.manager.active_filename
        now[0] += 61  # a minute later, and no new message
        wait_for(lambda: any(e == "close" for e, _ in memory.events),
                 what="an idle roll")
        assert memory.events == [("close", active)]
        with archive.ArchiveReader(active) as reader:
            assert len(list(reader)) == 2
        assert worker.stats.consumed_total == 2
        running.stop()


class TestIdleExit:
    @staticmethod
    def quiet_worker(tmp_path, broker, monkeypatch):
        """A worker with --idle-exit 0.01, consuming, quiet for a second,
        while its queue holds one message; the depths read at every
        tick."""
        monkeypatch.setattr(worker_mod, "IDLE_DEPTH_INTERVAL", 0.0)
        worker = make_worker(write_config(tmp_path, broker), broker,
                             idle_exit=0.01)
        worker._consuming_on = broker.conn  # as on_consume_ready sets it
        broker.publish([v2_body(1)])
        worker._last_message = time.monotonic() - 1
        return worker

    @staticmethod
    def tick(worker):
        """One on_iteration, due now."""
        worker._next_tick = 0.0
        worker.on_iteration()

    def test_stops_when_idle_and_ships_everything(self, tmp_path, broker):
        conf = write_config(tmp_path, broker, {},
                            "[roll_checker:count]\nroll_count = 3\n")
        bodies = [v2_body(n) for n in range(7)]
        broker.publish(bodies)
        worker = make_worker(conf, broker, idle_exit=0.3)
        running = Running(worker)
        running.thread.join(WAIT)
        assert not running.thread.is_alive(), "idle exit did not stop"
        worker.shutdown()
        assert running.error is None
        assert worker.exit_code == 0
        assert worker.shipper.pending() == 0
        files = archive_files(worker)
        assert len(files) == 3  # 3 + 3 + 1, the last closed by shutdown
        closed = sorted(os.path.basename(f)
                        for e, f in memory_of(worker).events
                        if e == "close")
        assert closed == files
        assert [p for _, p in archives(worker)] == \
            [inner_of(b) for b in bodies]
        assert broker.depth() == 0

    def test_quiet_is_not_idle_while_the_queue_holds_messages(
            self, tmp_path, broker, monkeypatch):
        # no message for longer than --idle-exit, but the broker still
        # has some ready (slow to deliver them): the worker goes on
        worker = self.quiet_worker(tmp_path, broker, monkeypatch)
        self.tick(worker)
        assert worker.stopping is None
        assert broker.depth() == 1
        broker.conn.default_channel.queue_purge(broker.queue_name)
        self.tick(worker)
        assert worker.stopping == worker_mod.STOP_IDLE
        worker.shutdown()

    def test_a_reconnect_reads_the_depths_on_the_new_connection(
            self, tmp_path, broker, monkeypatch):
        # the idle depths' channel belonged to the lost connection: used
        # again, py-amqp raises a connection error from on_iteration, and
        # the worker reconnected every idle_exit seconds, never exiting
        monkeypatch.setattr(worker_mod, "IDLE_DEPTH_INTERVAL", 0.0)
        worker = make_worker(write_config(tmp_path, broker), broker,
                             idle_exit=0.01)
        channel = broker.conn.default_channel
        worker.on_consume_ready(broker.conn, channel, [])
        assert worker._drained(time.monotonic())

        class LostChannel:
            def queue_declare(self, **kwargs):
                raise ConnectionError("the connection is gone")

        worker._idle_depths._channel = LostChannel()
        worker.on_consume_ready(broker.conn, channel, [])  # reconnected
        assert worker._drained(time.monotonic())
        worker.shutdown()

    def test_only_archives_failing_for_good_left_exits_1(
            self, tmp_path, broker, caplog):
        # a refused key: --idle-exit does not wait for an operator: it
        # stops, and the exit code says so
        conf = write_config(
            tmp_path, broker, {"max_backlog_mb": "0.0005"},  # 524 bytes
            "[roll_checker:count]\nroll_count = 2\n")
        broker.publish([v2_body(n) for n in range(12)])

        class Refused(callbacks_mod.ArchiveCallback):
            def on_close(self, filename):
                raise exceptions.PermanentError("key refused",
                                                hint="check the key")

        checker, _ = plugins.build(conf)
        worker = worker_mod.Worker(conf, roll_checker=checker,
                                   callbacks=[("up", Refused())],
                                   connection=broker.connection(),
                                   idle_exit=0.3)
        running = Running(worker)
        running.thread.join(WAIT)
        assert not running.thread.is_alive(), "idle exit did not stop"
        with caplog.at_level(logging.ERROR, logger=worker_mod.__name__):
            worker.shutdown(ship_timeout=5)
        assert running.error is None
        assert worker.shipper.stuck()
        assert worker.exit_code == 1
        assert worker.stats.stopping is True  # /healthz: "stopping"
        assert worker_mod.E_STUCK % worker.shipper.pending() in [
            r.getMessage() for r in caplog.records]
        # nothing acked is lost: every consumed message is in an archive
        assert len(archives(worker)) == worker.stats.consumed_total

    def test_a_pause_only_an_operator_can_lift_ends_it_too(
            self, tmp_path, broker, monkeypatch):
        # the backlog of archives failing for good paused consumption: the
        # queue never empties, yet --idle-exit stops
        worker = self.quiet_worker(tmp_path, broker, monkeypatch)
        worker.backpressure.paused = backpressure.PAUSE_BACKLOG
        monkeypatch.setattr(worker.backpressure, "check", lambda *a: None)
        stuck = [False]
        monkeypatch.setattr(worker.shipper, "stuck", lambda: stuck[0])

        self.tick(worker)
        assert worker.stopping is None  # paused, but it may still ship
        stuck[0] = True
        # paused time is not idle time: --idle-exit counts from when it
        # became stuck (here: a second ago)
        worker._last_message = time.monotonic() - 1
        self.tick(worker)
        assert worker.stopping == worker_mod.STOP_IDLE
        assert broker.depth() == 1
        worker.shutdown(ship_timeout=5)

    def test_idle_exit_with_nothing_to_do(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        worker = make_worker(conf, broker, idle_exit=0.05)
        running = Running(worker)
        running.thread.join(WAIT)
        assert not running.thread.is_alive()
        worker.shutdown()
        assert archive_files(worker) == []


class TestDeliveryLimit:
    """What the worker reads of the broker's version, and counts of the
    returns (the real servers: test_worker_delivery_limit)."""

    @staticmethod
    def quorum_worker(tmp_path, broker):
        return make_worker(write_config(
            tmp_path, broker,
            consumer_options="queue_arguments = x-queue-type=quorum"),
            broker)

    @staticmethod
    def connected_to(version):
        return types.SimpleNamespace(connection=types.SimpleNamespace(
            server_properties={"version": version}))

    def test_the_limit_is_said_once_per_version(self, tmp_path, broker,
                                                caplog):
        worker = self.quorum_worker(tmp_path, broker)
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            for version in ("3.10.8", "4.0.5", "4.0.5", "3.10.8"):
                worker._read_limits(self.connected_to(version))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "RabbitMQ 4.0.5" in lines[0], lines
        assert worker._limits == {}  # 3.10 again: no limit
        worker._read_limits(self.connected_to("4.0.5"))
        assert worker._limits == {broker.queue_name: 20}
        worker.shipper.stop(1)

    def test_returns_are_counted_and_said_near_the_limit(
            self, tmp_path, broker, caplog):
        worker = self.quorum_worker(tmp_path, broker)
        worker._read_limits(self.connected_to("4.0.5"))

        class Message:
            delivery_tag = 7
            properties = {"message_id": "m-1"}

            def __init__(self, count):
                self.headers = {"x-delivery-count": count} if count else {}

        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            for count, now in ((0, 100.0), (3, 101.0), (10, 102.0),
                               (11, 103.0), (12, 200.0)):
                worker._count_returns(broker.queue_name, Message(count),
                                      now)
        assert worker.stats.redelivered_by_queue == {broker.queue_name: 4}
        # from half the limit on, once a minute at most
        assert [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("message ")] == [
            worker_mod.W_RETURNS % ("m-1", broker.queue_name, count, 20)
            for count in (10, 12)]
        worker.shipper.stop(1)

    def test_paused_is_not_idle(self, tmp_path, broker):
        # --idle-exit counts only time in which a message could come
        worker = make_worker(write_config(tmp_path, broker), broker,
                             idle_exit=0.01)
        worker.backpressure.disk_full("full")
        worker.backpressure.resume_free = float("inf")  # it stays full
        worker._last_message = time.monotonic() - 60
        worker._next_tick = 0.0
        worker.on_iteration()
        assert worker.stopping is None
        worker.shipper.stop(1)


class TestMalformedLogRate:
    def test_one_line_per_interval(self, tmp_path, broker, caplog):
        worker = make_worker(write_config(tmp_path, broker), broker)
        start = 1000.0
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            for offset in (0.0, 0.5, 9.9, 10.0, 19.9, 20.0, 25.0):
                worker._malformed("q", "not JSON", start + offset)
        lines = [r.getMessage() for r in caplog.records
                 if r.name == worker_mod.__name__]
        # at 0, 10 and 20 s: each line counts those not logged
        assert lines == [worker_mod.W_MALFORMED % ("q", "not JSON", count)
                         for count in (1, 4, 6)]
        assert worker.stats.malformed_by_queue == {"q": 7}
        worker.shipper.stop(1)


def test_the_worker_shadows_no_helper_of_reconnecting():
    # Worker._wait(messages) once hid Reconnecting._wait(seconds): a broker
    # error that retrying cannot fix, met after consuming began, became
    # "TypeError: 'float' object is not iterable" and exit 1 (seen on
    # the tests' cluster)
    helpers = {name for name in vars(broker_mod.Reconnecting)
               if name.startswith("_") and not name.startswith("__")}
    assert not helpers & set(vars(worker_mod.Worker))


class TestDiskFull:
    def test_enospc_keeps_cuts_pauses_and_resumes(self, tmp_path, broker,
                                                  monkeypatch):
        conf = write_config(tmp_path, broker, {"fsync_every": "4",
                                               "fsync_interval": "0.3"},
                            "[roll_checker:count]\nroll_count = 100\n")
        flush = archive.ArchiveWriter.flush
        full = threading.Event()

        def flaky_flush(self):
            if full.is_set() and self._buffer:
                raise OSError(errno.ENOSPC, "No space left on device")
            return flush(self)

        monkeypatch.setattr(archive.ArchiveWriter, "flush", flaky_flush)
        free = [10 << 30]
        usage = shutil.disk_usage

        def disk_usage(path):
            real = usage(path)
            return type(real)(real.total, real.used, free[0])

        monkeypatch.setattr(worker_mod.shutil, "disk_usage", disk_usage)
        # nothing goes back to the broker: each return would spend one of
        # a quorum queue's delivery attempts
        returned = []
        for verb in ("requeue", "reject"):
            monkeypatch.setattr(kombu.message.Message, verb,
                                lambda self, *a, verb=verb, **k:
                                returned.append(verb))
        monkeypatch.setattr(batch_mod, "_nack_up_to",
                            lambda message: returned.append("nack"))
        bodies = [v2_body(n) for n in range(30)]
        broker.publish(bodies[:8])
        worker = make_worker(conf, broker)
        ticks = count_ticks(worker)
        running = Running(worker)
        running.wait_acked(8)
        # the disk fills up: the next batch cannot be synced
        free[0] = 0
        full.set()
        broker.publish(bodies[8:])
        wait_for(lambda: worker.paused is not None, what="a pause")
        assert worker.stats.acked_total == 8
        consumed = worker.stats.consumed_total
        ticks(3)  # paused: a few ticks go by, and nothing is taken
        # nothing taken meanwhile
        assert worker.stats.consumed_total == consumed
        assert worker.stats.acked_total == 8
        assert worker.paused == backpressure.PAUSE_DISK_FULL
        assert worker.stats.paused
        # the unsynced records were cut off the archive
        assert len(archives(worker)) == 8
        # the disk clears
        full.clear()
        free[0] = 10 << 30
        running.wait_acked(30)
        running.stop()
        payloads = [p for _, p in archives(worker)]
        assert sorted(payloads) == sorted(inner_of(b) for b in bodies)
        assert len(payloads) == len(set(payloads)) == 30
        assert broker.depth() == 0
        assert returned == []
        # each counted once, also those cut off and written again
        assert worker.stats.consumed_total == 30

    def test_enospc_on_write(self, tmp_path, broker, monkeypatch, caplog):
        conf = write_config(tmp_path, broker, {"fsync_every": "3",
                                               "fsync_interval": "0.2"})
        fail_writes(monkeypatch, lambda n: errno.ENOSPC if n == 5 else None)
        monkeypatch.setattr(backpressure, "RESUME_FREE_BYTES", 0)
        bodies = [v2_body(n) for n in range(10)]
        broker.publish(bodies)
        worker = make_worker(conf, broker)
        submitted = []
        submit = worker.shipper.submit

        def spy(path, lock=None, since=None, report=None):
            # the cut archive too is handed over locked
            assert lock is not None and lock.fd is not None
            assert files.FileLock.try_acquire(path, create=False) is None
            submitted.append(path)
            return submit(path, lock, since=since, report=report)

        monkeypatch.setattr(worker.shipper, "submit", spy)
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            running = Running(worker)
            running.wait_acked(10)
            # the archive cut at the failure is shipped in this run
            first = submitted[0]
            running.stop()
        payloads = [p for _, p in archives(worker)]
        assert sorted(payloads) == sorted(inner_of(b) for b in bodies)
        assert len(payloads) == 10
        assert broker.depth() == 0
        assert worker.stats.consumed_total == 10
        with archive.ArchiveReader(first) as reader:
            synced = len(list(reader))
        # the synced ones (3, or 4 when fsync_interval came first); the
        # rest of the batch and the failed one were kept, unacked, and
        # written again after the pause
        assert synced in (3, 4)
        closed = sorted(f for e, f in memory_of(worker).events
                        if e == "close")
        assert closed == sorted(submitted) == [
            os.path.join(worker.directory, name)
            for name in archive_files(worker)]
        lines = [r.getMessage() for r in caplog.records
                 if r.name == worker_mod.__name__]
        assert lines[:3] == [
            worker_mod.E_DISK % (first, OSError(
                errno.ENOSPC, "No space left on device")),
            "kept %d unsynced message(s) to write again once there is "
            "room (unacked: not returned to the broker)" % (5 - synced),
            worker_mod.W_PAUSED % (broker.queue_name, "disk full under %s"
                                   % worker.directory)]

    def test_counted_once_through_two_refusals(self, tmp_path, broker,
                                               monkeypatch):
        # the disk refuses the 5th write, and again the first rewrite
        # after the resume: the kept messages are kept again while paused,
        # and each message, returned to the broker before (it carries an
        # x-delivery-count), is counted once: consumed and redelivered
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "1"})
        calls = fail_writes(monkeypatch,
                            lambda n: errno.ENOSPC if n in (5, 6) else None)
        monkeypatch.setattr(backpressure, "RESUME_FREE_BYTES", 0)
        bodies = [v2_body(n) for n in range(10)]
        broker.publish(bodies, headers={"x-delivery-count": 2})
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(10)
        running.stop()
        assert calls[0] > 6
        assert sorted(p for _, p in archives(worker)) == \
            sorted(inner_of(b) for b in bodies)
        assert worker.stats.consumed_total == 10
        assert worker.stats.redelivered_by_queue == {broker.queue_name: 10}

    def test_a_disk_failing_for_good_on_resuming_stops_the_rewrites(
            self, tmp_path, broker, monkeypatch, caplog):
        # full at the 5th write, then broken: the first kept message
        # rewritten stops the worker, the others stay unacked (one line
        # each of the two failures, not one per kept message)
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "30"})
        calls = fail_writes(monkeypatch, lambda n: errno.ENOSPC if n == 5
                            else errno.EIO if n > 5 else None)
        monkeypatch.setattr(backpressure, "RESUME_FREE_BYTES", 0)
        broker.publish([v2_body(n) for n in range(10)])
        worker = make_worker(conf, broker)
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            running = Running(worker)
            running.thread.join(WAIT)
        assert not running.thread.is_alive()
        worker.shutdown()
        assert worker.exit_code == 1
        assert calls[0] == 6
        errors = [r.getMessage() for r in caplog.records
                  if r.name == worker_mod.__name__ and
                  r.levelno >= logging.ERROR]
        assert len(errors) == 4, errors  # ENOSPC, paused; EIO, stopping
        assert errors[-1] == ("stopping: the archive directory is not "
                              "writable ([Errno 5] Input/output error)")
        # nothing acked (the broker has them all), nothing in an archive,
        # each counted once
        assert worker.stats.acked_total == 0
        assert archives(worker) == []
        assert worker.stats.consumed_total == 5

    def test_other_write_errors_stop_the_worker(self, tmp_path, broker,
                                                monkeypatch, caplog):
        conf = write_config(tmp_path, broker)

        fail_writes(monkeypatch, lambda n: errno.EROFS)
        broker.publish([v2_body(0)])
        worker = make_worker(conf, broker)
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            running = Running(worker)
            running.thread.join(WAIT)
        assert not running.thread.is_alive()
        # the empty archive was removed, and its lock released with it
        assert worker.manager._active_lock is None
        assert worker.manager._closed_locks == {}
        worker.shutdown()
        assert worker.exit_code == 1
        assert archive_files(worker) == []
        assert broker.depth() == 1  # requeued, not lost
        assert [r.getMessage() for r in caplog.records
                if r.levelno == logging.CRITICAL] == [
            "stopping: the archive directory is not writable ([Errno 30] "
            "Read-only file system)"]
        assert "requeued 1 unsynced message(s)" in [
            r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING]
        # the removed empty archive's opening time went with it
        assert worker._archive_lock.opened_at is None


class TestStopDuringRetries:
    def test_a_signal_does_not_wait_out_retry_delays(self, tmp_path, broker,
                                                     monkeypatch):
        # an archive fails to ship and waits a minute for its retry; a
        # signal ships what runs or is due (nothing) and leaves it to its
        # state file: settle returns because nothing is due, not because
        # the grace ran out, and no retry runs after the signal
        conf = write_config(
            tmp_path, broker, {"retry_initial": "60", "retry_max": "60"},
            "[roll_checker:count]\nroll_count = 2\n"
            "[callback:memory]\nfail_times = 1000000\n")
        broker.publish([v2_body(n) for n in range(2)])
        worker = make_worker(conf, broker)
        memory = memory_of(worker)
        settled = []
        settle = worker.shipper.settle

        def spy(timeout):
            settled.append((timeout, settle(timeout)))
            return settled[-1][1]

        monkeypatch.setattr(worker.shipper, "settle", spy)
        running = Running(worker)
        running.wait_acked(2)
        ship = worker.shipper
        with ship._cond:  # failed once, now waiting for its retry
            assert ship._cond.wait_for(
                lambda: ship._busy is None and len(ship._heap) == 1 and
                ship._heap[0][0] > time.monotonic() + 30, timeout=WAIT)
        attempts = list(memory.events)
        assert [e for e, _ in attempts] == ["fail"]
        running.stop()  # as SIGTERM does, then shutdown
        assert settled == [(worker_mod.SHUTDOWN_SHIP_GRACE, True)]
        assert memory.events == attempts
        (name,) = archive_files(worker)
        assert os.path.exists(os.path.join(
            worker.directory, name + shipper_mod.STATE_SUFFIX))


class TestBacklog:
    def test_pauses_over_max_backlog_and_resumes_when_shipped(
            self, tmp_path, broker):
        conf = write_config(
            tmp_path, broker, {"max_backlog_mb": "0.0005"},  # 524 bytes
            "[roll_checker:count]\nroll_count = 2\n"
            "[callback:memory]\nfail_times = 1000000\n")
        bodies = [v2_body(n) for n in range(12)]
        broker.publish(bodies[:4])
        worker = make_worker(conf, broker)
        ticks = count_ticks(worker)
        memory = memory_of(worker)
        running = Running(worker)
        # checked on the worker's tick: two archives wait, over the limit;
        # the stats say so once the consumers are cancelled
        wait_for(lambda: worker.stats.paused, what="a pause")
        assert worker.paused == backpressure.PAUSE_BACKLOG
        assert worker.shipper.backlog[0] >= 1
        consumed = worker.stats.consumed_total
        broker.publish(bodies[4:])
        ticks(3)  # paused: a few ticks go by, and nothing is written
        assert worker.stats.consumed_total == consumed
        # what was delivered meanwhile is kept unacked (up to the
        # prefetch window), not written, not returned
        assert broker.depth() + len(worker._waiting) == 12 - consumed
        memory.fail_times = 0  # the upload works again
        running.wait_acked(12)
        # the last archives may pause it once more: it resumes once they
        # are shipped
        wait_for(lambda: not worker.stats.paused, what="the resume")
        running.stop()
        assert not worker.stats.paused
        assert sorted(p for _, p in archives(worker)) == \
            sorted(inner_of(b) for b in bodies)


class TestHandoff:
    def test_report_and_lock_go_to_the_shipper(self, tmp_path, broker,
                                               monkeypatch):
        conf = write_config(tmp_path, broker, {},
                            "[roll_checker:count]\nroll_count = 4\n")
        broker.publish([v2_body(n) for n in range(8)])
        worker = make_worker(conf, broker)
        submitted = []
        submit = worker.shipper.submit

        def spy(path, lock=None, since=None, report=None):
            # still locked here: no other worker can take it over
            assert files.FileLock.try_acquire(path, create=False) is None
            submitted.append((path, lock, since, report))
            return submit(path, lock, since=since, report=report)

        monkeypatch.setattr(worker.shipper, "submit", spy)
        running = Running(worker)
        running.wait_acked(8)
        running.stop()
        assert len(submitted) == 2
        for path, lock, since, report in submitted:
            assert lock is not None and lock.fd is None  # released after
            assert since is not None
            assert report.filename == path and report.records == 4
            assert report.size == os.path.getsize(path)
            assert report.first_metadata["message_id"] in ("m-0", "m-4")
        assert worker.stats.rolls == 2
        assert worker.stats.bytes_written == sum(
            r.size for _, _, _, r in submitted)

    def test_data_at_risk_passed_down_to_stats(self, tmp_path, broker):
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "60"})
        broker.publish([v2_body(n) for n in range(3)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_consumed(3)
        wait_for(lambda: worker.stats.unacked == 3, what="unacked counted")
        files_, size, age = worker.stats.backlog
        assert files_ == 1  # the active archive
        assert size == worker.manager.active_archive.size > 0
        assert age >= 0
        running.stop()
        assert worker.stats.unacked == 0
        assert worker.stats.acked_total == 3


class TestNames:
    def test_names_carry_the_worker_id(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        worker = make_worker(conf, broker, ident="host-a-42")
        assert worker.template.count("host-a-42") == 1
        assert worker_mod.worker_id().endswith("-%d" % os.getpid())
        # and a part that never repeats, which the recovery scan matches
        name = os.path.basename(worker.manager._make_filename())
        assert name.endswith("_%s-0.events" % worker.manager.token)
        assert fnmatch.fnmatch(name, worker.pattern)

    @pytest.mark.parametrize("template", [
        "shoebox_%Y%m%dT%H%M%S_{worker_id}.events",
        "%Y_{worker_id}_archive.events", "{worker_id}_%Y%m%d",
        "a.%Y.%m_{worker_id}.dat"])
    def test_the_recovery_glob_matches_every_name(self, tmp_path, broker,
                                                   template):
        conf = write_config(tmp_path, broker,
                            {"filename_template": template})
        worker = make_worker(conf, broker, ident="h-1")
        for _ in range(2):
            worker.manager.opened += 9
            name = os.path.basename(worker.manager._make_filename())
            assert fnmatch.fnmatch(name, worker.pattern), (name,
                                                           worker.pattern)
            assert name.count(worker.manager.token) == 1

    @pytest.mark.parametrize("idents", [("w1", "w2"), ("same", "same")])
    def test_two_workers_in_one_directory_never_collide(
            self, tmp_path, broker, idents):
        conf = write_config(tmp_path, broker, {"fsync_every": "2"},
                            "[roll_checker:count]\nroll_count = 3\n")
        bodies = [v2_body(n) for n in range(40)]
        broker.publish(bodies)
        workers = [make_worker(conf, broker, ident=i) for i in idents]
        running = [Running(w) for w in workers]
        wait_for(lambda: sum(w.stats.acked_total for w in workers) >= 40,
                 what="all messages acked")
        for r in running:
            r.stop()
        for w, ident in zip(workers, idents, strict=True):
            assert all(ident in os.path.basename(f)
                       for e, f in memory_of(w).events)
        closed = [f for w in workers for e, f in memory_of(w).events]
        assert len(closed) == len(set(closed)) >= 40 // 3
        payloads = [p for _, p in archives(workers[0])]
        assert sorted(payloads) == sorted(inner_of(b) for b in bodies)

    def test_a_second_worker_does_not_take_the_active_archive(
            self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        broker.publish([v2_body(n) for n in range(3)])
        first = make_worker(conf, broker, ident="first")
        running = Running(first)
        running.wait_acked(3)
        active = first.manager.active_filename
        assert active is not None
        second = make_worker(conf, broker, ident="second")
        second.start()
        assert memory_of(second).events == []
        assert second.shipper.pending() == 0
        second.shipper.stop(1)
        running.stop()
        assert memory_of(first).events == [("close", active)]


class TestRecovery:
    def test_leftover_archive_of_a_killed_run(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        os.makedirs(conf.archive.working_directory)
        leftover = os.path.join(conf.archive.working_directory,
                                "shoebox_20260101T000000_dead-1.events")
        with archive.ArchiveWriter(leftover) as writer:
            for n in range(3):
                writer.write({"message_id": "old-%d" % n}, b"{}")
        whole = os.path.getsize(leftover)
        with open(leftover, "ab") as f:
            f.write(b"\x84\x78\x86\x69\x02\x00torn")
        broker.publish([v2_body(n) for n in range(2)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        wait_for(lambda: ("close", leftover) in memory_of(worker).events,
                 what="the leftover shipped")
        running.wait_acked(2)
        running.stop()
        assert os.path.getsize(leftover) == whole
        ids = [m["message_id"] for m, _ in archives(worker)]
        assert ids == ["old-0", "old-1", "old-2", "m-0", "m-1"]


# -- over Redis, through fakeredis ------------------------------------------
# kombu's redis transport registers each client's socket with epoll, so an
# in-process fakeredis client (no file descriptor) cannot be consumed from;
# fakeredis' TcpFakeServer answers on a loopback port instead: still no
# Redis server, and kombu's transport runs unchanged.

@pytest.fixture(scope="module")
def fake_redis_url():
    fakeredis = pytest.importorskip("fakeredis")
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "redis://127.0.0.1:%d/15" % server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def redis_broker(fake_redis_url, monkeypatch):
    # kombu re-delivers messages unacked for visibility_timeout (an hour)
    # under a redis lock whose release is a Lua script, which fakeredis
    # runs only with the optional lupa package: skip that scan
    from kombu.transport import redis as kombu_redis
    monkeypatch.setattr(kombu_redis.QoS, "restore_visible",
                        lambda self, *args, **kwargs: None)
    b = Broker(fake_redis_url)
    yield b
    b.close()


class TestRedis:
    def test_end_to_end(self, tmp_path, redis_broker):
        broker = redis_broker
        conf = write_config(tmp_path, broker, {
            "metadata_fields": "payload.instance_id"},
            "[roll_checker:count]\nroll_count = 6\n")
        good = [v2_body(n) for n in range(20)]
        bad = [b"\xff not utf-8", b'{"oslo.version": "2.0"}']
        with broker.conn.Producer() as producer:
            for n, body in enumerate(good[:10] + bad + good[10:]):
                producer.publish(
                    body, exchange=broker.exchange,
                    routing_key=broker.queue_name, serializer=None,
                    content_type="application/json",
                    content_encoding="utf-8", message_id="amqp-%d" % n)
        assert broker.depth() == 22
        worker = make_worker(conf, ident="redis-1")
        assert worker.connection.transport.driver_type == "redis"
        running = Running(worker)
        running.wait_acked(22)
        running.stop()
        records = archives(worker)
        assert [p for _, p in records] == \
            [inner_of(b) for b in good[:10]] + bad + \
            [inner_of(b) for b in good[10:]]
        assert records[0][0]["payload.instance_id"] == "i-0"
        assert records[0][0]["queue"] == broker.queue_name
        assert [m["malformed"] for m, _ in records[10:12]] == \
            ["not UTF-8", "broken envelope: missing oslo.message"]
        assert records[10][0]["message_id"] == "amqp-10"
        assert records[10][0]["content_type"] == "application/json"
        files = archive_files(worker)
        assert len(files) == 4 and all("redis-1" in f for f in files)
        assert sorted(os.path.basename(f)
                      for e, f in memory_of(worker).events) == files
        assert broker.depth() == 0
        assert worker.stats.consumed_total == 22

    def test_stop_acks_the_pending_batch(self, tmp_path, redis_broker):
        broker = redis_broker
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "60"})
        bodies = [v2_body(n) for n in range(5)]
        broker.publish(bodies)
        worker = make_worker(conf)
        running = Running(worker)
        running.wait_consumed(5)
        assert worker.stats.acked_total == 0
        # no commit yet; a stop commits the batch before closing
        running.stop()
        assert worker.stats.acked_total == 5
        assert broker.depth() == 0
        assert [p for _, p in archives(worker)] == \
            [inner_of(b) for b in bodies]

    def test_unacked_come_back_when_killed_before_commit(
            self, tmp_path, redis_broker, monkeypatch):
        # (memory:// drops unacked messages when a channel closes: it
        # cannot show this)
        broker = redis_broker
        conf = write_config(tmp_path, broker, {"fsync_every": "50",
                                               "fsync_interval": "60"})
        bodies = [v2_body(n) for n in range(5)]
        broker.publish(bodies)
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_consumed(5)
        # dies before the batch is synced and acked: the broker keeps them
        monkeypatch.setattr(worker.batch, "commit", lambda: 0)
        worker.stop()
        running.thread.join(WAIT)
        worker.shipper.stop(1)
        assert worker.stats.acked_total == 0
        assert broker.depth() == 5


def test_worker_id_keeps_the_whole_host_name(monkeypatch):
    # two hosts that share a short name must not share file names
    monkeypatch.setattr(worker_mod.socket, "gethostname", lambda: "a.dc1")
    first = worker_mod.worker_id()
    monkeypatch.setattr(worker_mod.socket, "gethostname", lambda: "a.dc2")
    assert first != worker_mod.worker_id()
    assert first == "a-dc1-%d" % os.getpid()


class TestStatsLineAtShutdown:
    def stats_lines(self, caplog):
        return [r for r in caplog.records if "msg/s" in r.getMessage()]

    def test_none_when_the_worker_never_consumed(self, tmp_path, broker,
                                                 caplog):
        # e.g. the broker refused a declaration: the error is the last
        # word, not "0 msg/s ... consumed 0"
        worker = make_worker(write_config(tmp_path, broker), broker)
        worker.start()
        with caplog.at_level(logging.INFO):
            worker.shutdown()
        assert self.stats_lines(caplog) == []

    def test_one_after_consuming(self, tmp_path, broker, caplog):
        broker.publish([v2_body(0)])
        worker = make_worker(write_config(tmp_path, broker), broker)
        running = Running(worker)
        running.wait_acked(1)
        with caplog.at_level(logging.INFO):
            running.stop()
        assert len(self.stats_lines(caplog)) == 1


class TestRecoveryMatchesTheWriter:
    """Recovery takes exactly the names the writer makes: never a step's
    output (compressed, renamed), whatever the template."""

    TEMPLATES = ["shoebox_%Y%m%dT%H%M%S_{worker_id}",
                 "shoebox_%Y%m%dT%H%M%S_{worker_id}.events",
                 "%c {worker_id} x.events.dat",
                 "%-d%Ey_%%_{worker_id}.events"]

    @pytest.mark.parametrize("template", TEMPLATES)
    def test_names_of_the_writer_and_no_other(self, tmp_path, template):
        filled = template.replace("{worker_id}", "host-1-42")
        manager = roll_manager.WritingRollManager(
            filled, roll_checker.NeverRollChecker(), directory=str(tmp_path))
        names = []
        for _ in range(3):  # the same second: ~1, ~2 are inserted
            manager.write({"k": "v"}, b"x")
            names.append(os.path.basename(manager.active_filename))
            manager.close()
        assert len(set(names)) == 3, names
        matcher = worker_mod.archive_matcher(template)
        for name in names:
            assert matcher.fullmatch(name), (matcher.pattern, name)
            for suffix in (".gz", ".zst", ".done", ".gz.tmp", ".ship",
                           ".ship.tmp", ".sha256"):
                assert not matcher.fullmatch(name + suffix), name + suffix

    def test_template_without_extension_skips_compressed_archives(
            self, tmp_path, broker, caplog):
        # a gzip-only chain leaves x.gz; the next start must neither take
        # it for an archive of a killed run nor fail on it
        template = "shoebox_%Y%m%dT%H%M%S_{worker_id}"
        conf = write_config(tmp_path, broker, {
            "filename_template": template, "callbacks": "gzip"})
        work = tmp_path / "work"
        work.mkdir()
        left = str(work / "shoebox_20260101T000000_host-1-42")
        with archive.ArchiveWriter(left) as writer:
            writer.write({"k": "v"}, b"x")
        done = steps.GzipCallback().on_close(left)
        worker = make_worker(conf, broker)
        with caplog.at_level(logging.WARNING):
            worker.start()
        worker.shipper.stop(1)
        assert worker.shipper.pending() == 0
        assert os.listdir(work) == [os.path.basename(done)]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class FakeMessage:
    """What the worker's ack path uses of a kombu message."""

    def __init__(self, log):
        self.log = log
        self.delivery_tag = 1

    def requeue(self):
        self.log.append("requeue")

    def ack(self, multiple=False):
        self.log.append("ack")


class TestAckPath:
    """The worker's side of the batch, one hook at a time (the mutation
    check found these unobserved: docs/mutation.md)."""

    def test_a_message_while_the_disk_is_full_is_kept_unacked(
            self, tmp_path, broker):
        # not returned to the broker (a return spends a delivery attempt),
        # kept to be written once there is room
        worker = make_worker(write_config(tmp_path, broker), broker)
        worker.backpressure.disk_full("full")
        log = []
        message = FakeMessage(log)
        worker.on_message(broker.queue_name, message)
        assert log == []
        assert worker._waiting == [(broker.queue_name, message, False)]
        assert len(worker.batch) == 0
        assert worker.stats.consumed_total == 0
        worker.shipper.stop(1)

    def test_kept_messages_go_back_once_after_hold_max(
            self, tmp_path, broker, monkeypatch):
        # before the broker's consumer timeout closes the channel
        worker = make_worker(write_config(tmp_path, broker), broker)
        worker.backpressure.disk_full("full")
        worker.backpressure.resume_free = float("inf")  # it stays full
        log = []
        for _ in range(3):
            worker.on_message(broker.queue_name, FakeMessage(log))
        worker._next_tick = 0.0
        worker.on_iteration()
        assert log == []
        monkeypatch.setattr(worker_mod, "HOLD_MAX", 0.0)
        worker._next_tick = 0.0
        worker.on_iteration()
        assert log == ["requeue"] * 3
        assert worker._waiting == []
        worker.shipper.stop(1)

    def test_a_revived_connection_drops_the_kept_messages(
            self, tmp_path, broker, caplog):
        worker = make_worker(write_config(tmp_path, broker), broker)
        worker.backpressure.disk_full("full")
        log = []
        for _ in range(2):
            worker.on_message(broker.queue_name, FakeMessage(log))
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            worker.on_connection_revived()
        assert worker._waiting == [] and log == []  # the broker has them
        assert [r.getMessage() for r in caplog.records
                if r.name == worker_mod.__name__] == [
            "connection lost with 2 message(s) kept for the full disk; "
            "they will be delivered again"]
        worker.shipper.stop(1)

    def test_a_revived_connection_forgets_the_batch(self, tmp_path, broker,
                                                    caplog):
        worker = make_worker(write_config(tmp_path, broker), broker)
        log = []
        for _ in range(3):
            worker.batch.add(FakeMessage(log), 1.0)
        with caplog.at_level(logging.INFO, logger=worker_mod.__name__):
            worker.on_connection_revived()
        assert len(worker.batch) == 0 and log == []  # nothing sent
        assert [r.getMessage() for r in caplog.records
                if r.name == worker_mod.__name__] == [
            "connection lost with 3 written but unacked message(s); they "
            "will be delivered again",
            "connected to %s" % worker.connection.as_uri()]
        worker.shipper.stop(1)

    def test_a_failed_last_ack_is_one_warning(self, tmp_path, broker,
                                              caplog):
        worker = make_worker(write_config(tmp_path, broker), broker)
        worker.start()

        class Gone(FakeMessage):
            def ack(self, multiple=False):
                raise ConnectionResetError(104, "Connection reset by peer")

        worker.batch.add(Gone([]), 1.0)
        with caplog.at_level(logging.WARNING, logger=worker_mod.__name__):
            worker.shutdown(ship_timeout=5)
        assert [r.getMessage() for r in caplog.records
                if r.name == worker_mod.__name__] == [
            "could not ack the last batch (%s); the broker will deliver it "
            "again" % broker_reason(ConnectionResetError(
                104, "Connection reset by peer"))]
        assert len(worker.batch) == 0

    def test_consumed_counted_per_queue(self, tmp_path, broker):
        conf = write_config(tmp_path, broker)
        broker.publish([v2_body(n) for n in range(4)])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(4)
        running.stop()
        assert worker.stats.consumed_by_queue == {broker.queue_name: 4}

    def test_idle_shipping_stops_at_a_second_signal(self, tmp_path, broker,
                                                    caplog):
        # --idle-exit ships everything, unless told to stop again
        conf = write_config(
            tmp_path, broker, {"retry_initial": "60", "retry_max": "60"},
            "[roll_checker:count]\nroll_count = 2\n"
            "[callback:memory]\nfail_times = 1000000\n")
        broker.publish([v2_body(n) for n in range(2)])
        worker = make_worker(conf, broker, idle_exit=0.2)
        waiting = threading.Event()
        wait_idle = worker.shipper.wait_idle

        def spy(timeout=None, should_stop=None):
            waiting.set()
            return wait_idle(timeout, should_stop)

        worker.shipper.wait_idle = spy
        running = Running(worker)
        running.thread.join(WAIT)
        assert worker.stopping == worker_mod.STOP_IDLE
        with caplog.at_level(logging.INFO, logger=worker_mod.__name__):
            shutdown = threading.Thread(target=worker.shutdown,
                                        kwargs={"ship_timeout": 5},
                                        daemon=True)
            shutdown.start()
            assert waiting.wait(WAIT)
            worker.stop()  # the second signal
            shutdown.join(WAIT)
        assert not shutdown.is_alive(), "still waiting for shipping"
        assert worker.stopping == worker_mod.STOP_INTERRUPTED
        assert "idle: shipping 1 archive(s) before exiting" in [
            r.getMessage() for r in caplog.records]

    def test_a_stuck_step_is_left_after_ship_timeout(self, tmp_path, broker,
                                                     monkeypatch):
        # a step that never returns: the grace, then ship_timeout, and the
        # state file resumes it at the next start
        monkeypatch.setattr(worker_mod, "SHUTDOWN_SHIP_GRACE", 0.05)
        release = threading.Event()
        entered = threading.Event()

        class Stuck(steps.MemoryCallback):
            def on_close(self, filename):
                entered.set()
                release.wait(60)
                return filename

        conf = write_config(tmp_path, broker, {},
                            "[roll_checker:count]\nroll_count = 1\n")
        checker, _ = plugins.build(conf)
        worker = worker_mod.Worker(conf, roll_checker=checker,
                                   callbacks=[("stuck", Stuck())],
                                   connection=broker.connection())
        broker.publish([v2_body(0)])
        running = Running(worker)
        running.wait_acked(1)
        assert entered.wait(WAIT)
        worker.stop()
        running.thread.join(WAIT)
        shutdown = threading.Thread(target=worker.shutdown,
                                    kwargs={"ship_timeout": 0.2},
                                    daemon=True)
        shutdown.start()
        shutdown.join(WAIT)
        try:
            assert not shutdown.is_alive(), "waited for the stuck step"
        finally:
            release.set()


# -- stream queues ------------------------------------------------------------

STREAM_CONSUMER = ("durable = true\nexchange_durable = false\n"
                   "queue_arguments = x-queue-type=stream")


def stream_config(tmp_path, broker, roll_count=1000, archive_options=None):
    return write_config(
        tmp_path, broker, archive_options,
        "[roll_checker:count]\nroll_count = %d\n" % roll_count,
        consumer_options=STREAM_CONSUMER)


def publish_offsets(broker, offsets):
    """What a stream delivers: each message with its x-stream-offset
    header (memory:// carries headers as RabbitMQ does)."""
    for offset in offsets:
        broker.publish([v2_body(offset)],
                       headers={stream_mod.OFFSET_ARG: offset})


def saved(worker, queue):
    return stream_mod.read_offset(stream_mod.offset_path(worker.directory,
                                                         queue))


def watch_submits(worker, queue):
    """``[(last offset in the archive, offset saved), ...]`` at each
    archive the worker hands to its shipper."""
    seen = []
    submit = worker.shipper.submit

    def checked(path, lock=None, since=None, report=None):
        seen.append((int(report.last_metadata[stream_mod.METADATA_KEY]),
                     saved(worker, queue)))
        return submit(path, lock, since=since, report=report)
    worker.shipper.submit = checked
    return seen


class TestStream:
    """The worker's side of :mod:`shoebox_worker.consume.stream`: offsets
    in the records, saved at the ack point and before shipping, resumed
    from the offset file and from what recovery finds."""

    def test_records_carry_their_offset_and_it_is_saved(self, tmp_path,
                                                        broker):
        conf = stream_config(tmp_path, broker)
        publish_offsets(broker, range(12))
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(12)
        assert saved(worker, broker.queue_name) == 11
        running.stop()
        assert [m[stream_mod.METADATA_KEY] for m, _ in archives(worker)] == \
            [str(n) for n in range(12)]

    def test_a_delivery_already_archived_is_acked_not_written(
            self, tmp_path, broker):
        # a subscription at a time starts at the chunk holding it; a
        # cancelled one may still deliver: only credit
        conf = stream_config(tmp_path, broker)
        publish_offsets(broker, [0, 1, 2, 3, 1, 2, 3, 4, 0])
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(9)
        running.stop()
        assert [m[stream_mod.METADATA_KEY] for m, _ in archives(worker)] == \
            ["0", "1", "2", "3", "4"]
        assert broker.depth() == 0
        assert saved(worker, broker.queue_name) == 4

    def test_the_offset_file_covers_an_archive_before_it_is_shipped(
            self, tmp_path, broker):
        conf = stream_config(tmp_path, broker, roll_count=4)
        publish_offsets(broker, range(10))
        worker = make_worker(conf, broker)
        seen = watch_submits(worker, broker.queue_name)
        running = Running(worker)
        running.wait_acked(10)
        running.stop()
        assert [last for last, _ in seen] == [3, 7, 9]
        assert all(offset >= last for last, offset in seen), seen

    def test_an_archive_kept_back_is_shipped_once_the_offsets_are_saved(
            self, tmp_path, broker, monkeypatch, caplog):
        # the disk refuses the offset file at the roll (after the ack
        # point before it was saved): the archive waits, and goes to the
        # shipper at a tick once the file is saved, never before
        monkeypatch.setattr(worker_mod, "HELD_RETRY", 0.05)
        conf = stream_config(tmp_path, broker, roll_count=4,
                             archive_options={"fsync_every": 3})
        worker = make_worker(conf, broker)
        refusing = threading.Event()
        refused = []
        write = stream_mod.write_offset

        def offset_file(path, queue, offset, identity=None):
            if refusing.is_set():
                refused.append(offset)
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(path, queue, offset, identity)
        monkeypatch.setattr(stream_mod, "write_offset", offset_file)
        seen = watch_submits(worker, broker.queue_name)
        publish_offsets(broker, range(3))
        running = Running(worker)
        with caplog.at_level(logging.INFO, logger=worker_mod.LOG.name):
            running.wait_acked(3)  # offset 2 saved at the ack point
            refusing.set()
            publish_offsets(broker, [3])  # the roll: 3 not saved
            deadline = time.monotonic() + 5
            while len(refused) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(refused) >= 3, refused  # the roll's, then retries
            assert seen == []  # kept back
            refusing.clear()
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)
            running.stop()
        assert seen == [(3, 3)], seen
        lines = [r.getMessage() for r in caplog.records
                 if "stream offsets" in r.getMessage()]
        assert len(lines) == 2, lines
        assert lines[0].startswith("cannot save the stream offsets ([Errno "
                                   "28] No space left on device): ")
        assert lines[0].endswith(" kept from the shipper until they are "
                                 "saved (tried again every 0 s; a stop "
                                 "leaves it to the next start)")
        assert lines[1] == ("stream offsets saved: handing the 1 archive(s) "
                            "kept back to the shipper")

    def test_the_last_synced_body_names_the_stream(self, tmp_path, broker):
        conf = stream_config(tmp_path, broker)
        publish_offsets(broker, range(12))
        worker = make_worker(conf, broker)
        running = Running(worker)
        running.wait_acked(12)
        running.stop()
        assert stream_mod.read_saved(stream_mod.offset_path(
            worker.directory, broker.queue_name)) == (11, stream_mod.Identity(
                11, hashlib.sha256(v2_body(11)).hexdigest()))

    def test_a_subscription_behind_the_saved_offset_is_warned(
            self, tmp_path, broker, caplog):
        # the offset file says 1000, the stream delivers 0-4: taken as
        # archived already, and said
        conf = stream_config(tmp_path, broker)
        path = stream_mod.offset_path(str(tmp_path / "work"),
                                      broker.queue_name)
        os.makedirs(os.path.dirname(path))
        stream_mod.write_offset(path, broker.queue_name, 1000)
        publish_offsets(broker, range(5))
        worker = make_worker(conf, broker)
        with caplog.at_level(logging.WARNING, logger=stream_mod.LOG.name):
            running = Running(worker)
            running.wait_acked(5)
            running.stop()
        assert archives(worker) == []
        lines = [r for r in caplog.records if "at or below" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert lines[0].getMessage().startswith(
            "stream %s: asked for offset 1001, the broker delivered offset "
            "0," % broker.queue_name)

    def test_another_stream_is_archived_from_its_first_offset(
            self, tmp_path, broker, caplog):
        # the check before subscribing found another stream (memory://
        # has none to check: a probe stands for RabbitMQ's answer)
        conf = stream_config(tmp_path, broker)
        path = stream_mod.offset_path(str(tmp_path / "work"),
                                      broker.queue_name)
        os.makedirs(os.path.dirname(path))
        stream_mod.write_offset(path, broker.queue_name, 1000,
                                stream_mod.Identity(1000, "ab" * 32))
        publish_offsets(broker, range(5))
        worker = make_worker(conf, broker)
        asked = []

        def probe(connection, queue, offset):
            asked.append((queue, offset))
            return None  # nothing at or after it
        worker.streams.probe = probe
        with caplog.at_level(logging.ERROR, logger=stream_mod.LOG.name):
            running = Running(worker)
            running.wait_acked(5)
            running.stop()
        assert asked == [(broker.queue_name, 1000)]
        assert [m[stream_mod.METADATA_KEY] for m, _ in archives(worker)] == \
            ["0", "1", "2", "3", "4"]
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert "not the stream archived before" in caplog.text
        assert saved(worker, broker.queue_name) == 4

    def test_resumes_after_the_saved_offset(self, tmp_path, broker):
        conf = stream_config(tmp_path, broker)
        path = stream_mod.offset_path(str(tmp_path / "work"),
                                      broker.queue_name)
        os.makedirs(os.path.dirname(path))
        stream_mod.write_offset(path, broker.queue_name, 41)
        worker = make_worker(conf, broker)
        worker.start()
        stream = worker.streams.get(broker.queue_name)
        assert stream.argument() == 42
        consumer = kombu.Consumer(broker.connection().channel(),
                                  queues=[worker.queues[0]])
        worker.streams.position(consumer)
        assert consumer.queues[0].consumer_arguments == {
            stream_mod.OFFSET_ARG: 42}
        worker.shutdown(ship_timeout=1)

    def test_resumes_after_what_recovery_finds_and_saves_it_first(
            self, tmp_path, broker):
        # fsynced, but killed before the offset file was written: the
        # archive a killed run left holds offsets 10-14, the file says 9
        conf = stream_config(tmp_path, broker)
        work = tmp_path / "work"
        work.mkdir()
        stream_mod.write_offset(stream_mod.offset_path(
            str(work), broker.queue_name), broker.queue_name, 9)
        left = str(work / "shoebox_20260101T000000_dead-1_0123456789ab-0."
                   "events")
        with archive.ArchiveWriter(left) as writer:
            for n in range(5, 15):
                writer.write({"queue": broker.queue_name,
                              stream_mod.METADATA_KEY: str(n)}, b"{}")
            writer.write({"queue": "other", stream_mod.METADATA_KEY: "99"},
                         b"{}")
        worker = make_worker(conf, broker)
        at_shipping = []
        start = worker.shipper.start

        def checked():
            at_shipping.append(saved(worker, broker.queue_name))
            start()

        worker.shipper.start = checked
        worker.start()
        assert at_shipping == [14]
        assert worker.streams.get(broker.queue_name).argument() == 15
        publish_offsets(broker, [13, 14, 15])
        running = Running(worker, start=False)
        running.wait_acked(3)
        running.stop()
        mine = [m[stream_mod.METADATA_KEY] for m, _ in archives(worker)
                if m["queue"] == broker.queue_name]
        assert mine == [str(n) for n in range(5, 16)]  # 15 once, new
        assert saved(worker, broker.queue_name) == 15

    @pytest.mark.parametrize("damage", [False, True])
    def test_a_gap_in_the_offsets_a_killed_run_left(self, tmp_path, broker,
                                                    damage):
        # offsets 10-12 and 14-16: 13 was the first entry of a segment
        # (no consumer gets it): resume after 16. Unless recovery passed
        # over damaged records with valid ones after them: then after 12,
        # the records after the gap archived twice rather than lost
        conf = stream_config(tmp_path, broker)
        work = tmp_path / "work"
        work.mkdir()
        left = str(work / "shoebox_20260101T000000_dead-1_0123456789ab-0."
                   "events")
        with archive.ArchiveWriter(left) as writer:
            for n in (10, 11, 12, 14, 15, 16):
                writer.write({"queue": broker.queue_name,
                              stream_mod.METADATA_KEY: str(n)}, b"{}")
        if damage:  # a record's bytes in the middle, overwritten
            with open(left, "r+b") as f:
                data = f.read()
                middle = len(data) // 2
                f.seek(middle)
                f.write(b"\xff" * 8)
        worker = make_worker(conf, broker)
        worker.start()
        try:
            assert worker.streams.get(broker.queue_name).argument() == (
                13 if damage else 17)
        finally:
            worker.shutdown(ship_timeout=1)

    def test_a_second_worker_on_the_directory_is_refused(self, tmp_path,
                                                         broker):
        conf = stream_config(tmp_path, broker)
        first = make_worker(conf, broker)
        first.start()
        try:
            second = make_worker(conf, broker)
            with pytest.raises(stream_mod.StreamError,
                               match="another worker reads stream"):
                second.start()
            second.shipper.stop(1)
        finally:
            first.shutdown(ship_timeout=1)
        again = make_worker(conf, broker)  # the lock went with shutdown
        again.start()
        again.shutdown(ship_timeout=1)


# -- consumer lag -----------------------------------------------------------

class TestQueueDepths:
    def test_consumed_and_watched_depths(self, tmp_path, broker,
                                         monkeypatch):
        monkeypatch.setattr(broker_mod.QueueDepths, "interval", 0.05)
        watched = "watched-" + uuid.uuid4().hex[:8]
        with broker.conn.SimpleQueue(watched) as other:
            for n in range(4):
                other.put({"n": n})
            conf = write_config(
                tmp_path, broker,
                sections="[metrics]\nport = 9\nwatch_queues = %s\n"
                % watched)
            worker = make_worker(conf, broker)
            assert worker.depths.names == (broker.queue_name, watched)
            broker.publish([v2_body(n) for n in range(12)])
            running = Running(worker)
            try:
                wait_for(lambda: worker.stats.queue_depths.get(
                    broker.queue_name) == 0, what="the queue drained")
                # nothing consumes the watched queue
                assert worker.stats.queue_depths == {broker.queue_name: 0,
                                                     watched: 4}
                other.get(timeout=1).ack()
                wait_for(lambda: worker.stats.queue_depths.get(watched) == 3,
                         what="the watched queue read again")
            finally:
                running.stop()
            other.clear()

    def test_no_reads_without_a_metrics_port(self, tmp_path, broker):
        worker = make_worker(write_config(tmp_path, broker), broker)
        assert worker.depths is None
        broker.publish([v2_body(0)])
        running = Running(worker)
        running.wait_acked(1)
        running.stop()
        assert worker.stats.queue_depths == {}
