"""Streams: a RabbitMQ stream queue archived exactly once, on the real
broker (and the Swift all-in-one for the kill test).

- kill -9 at random moments while consuming and shipping ``gzip, swift,
  delete``, restarts until idle: every published message is in Swift
  exactly once (counted by message_id);
- a second worker with its own working directory gets the whole stream
  too;
- ``stream_offset`` by time starts where asked;
- ``processes = 2`` with a stream is refused in one line.
"""

import collections
import datetime
import gzip
import io
import os
import random
import signal
import threading
import time

import kombu
import swiftclient.client as swc

from shoebox_worker import archive
from shoebox_worker.consume import stream as stream_mod
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import simulator


def declare_stream(rabbit, names):
    """A durable topic exchange and a stream bound to it (both deleted at
    the end); returns ``(queue, exchange)``."""
    queue = rabbit.track_queue(names + "-stream")
    exchange = rabbit.track_exchange(names + "-ex")
    channel = rabbit.channel()
    try:
        kombu.Queue(queue, kombu.Exchange(exchange, type="topic",
                                          durable=True),
                    routing_key="notifications.*", durable=True,
                    queue_arguments={"x-queue-type": "stream",
                                     "x-max-age": "1h"})(channel).declare()
    finally:
        channel.close()
    return queue, exchange


def publish(ft, exchange, count, seed):
    """Publish ``count`` notifications (confirmed); their message_ids."""
    outcome = publish_mod.publish(ft.AMQP_URL, count, exchange=exchange,
                                  routing_key="notifications.info",
                                  durable=True, seed=seed)
    assert outcome.confirmed == count, outcome
    return [n["message_id"] for n in simulator.notifications(count,
                                                             seed=seed)]


def stream_config(ft, tmp_path, queue, exchange, *, name="worker.conf",
                  work="archive", callbacks=None, consumer=None,
                  roll_count=300, worker=None):
    return ft.worker_config(
        tmp_path, queue, exchange, routing_key="notifications.*",
        durable=True, roll_checker="count",
        roll_options={"roll_count": roll_count}, callbacks=callbacks,
        consumer_options={"exchange_durable": True,
                          "queue_arguments": "x-queue-type=stream, "
                                             "x-max-age=1h",
                          **(consumer or {})},
        archive_options={"working_directory": tmp_path / work,
                         "fsync_every": 100},
        broker={"prefetch_count": 400}, worker=worker, name=name)


def local_ids(ft, directory):
    """message_id -> count over the archives in ``directory``; every
    record carries its stream offset."""
    ids = collections.Counter()
    for record in ft.read_archives(directory):
        assert record.metadata[stream_mod.METADATA_KEY].isdigit()
        ids[record.metadata["message_id"]] += 1
    return ids


def saved_offset(directory, queue):
    return stream_mod.read_offset(stream_mod.offset_path(str(directory),
                                                         queue))


def swift_ids(conn, container, scratch):
    """message_id -> count over every (gzipped) archive in ``container``."""
    ids = collections.Counter()
    _, objects = conn.get_container(container, full_listing=True)
    for obj in objects:
        _, body = conn.get_object(container, obj["name"])
        assert body[:2] == b"\x1f\x8b", obj["name"]
        path = os.path.join(scratch, "download.events")
        with open(path, "wb") as f:
            f.write(gzip.GzipFile(fileobj=io.BytesIO(body)).read())
        with archive.ArchiveReader(path) as reader:
            for metadata, _ in reader:
                ids[metadata["message_id"]] += 1
    return ids, len(objects)


def run_until_idle(ft, config):
    """``shoebox-worker run --idle-exit 3``, which must exit 0."""
    proc = ft.run_worker(config, idle_exit=3, timeout=180)
    assert proc.returncode == 0, proc.log_tail()
    return proc


def test_streams_kill_9_mid_run_every_message_once_in_swift(
        rabbit, names, ft, tmp_path, swift_env, worker_procs):
    queue, exchange = declare_stream(rabbit, names)
    container = "shoebox-stream-%s" % names[-8:]
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    config = stream_config(ft, tmp_path, queue, exchange, callbacks={
        "gzip": {},
        "swift": {"auth": swift_env["ST_AUTH"], "user": swift_env["ST_USER"],
                  "key": swift_env["ST_KEY"], "container": container,
                  "retries": 0, "timeout": 20},
        "delete": {}})
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    published = []
    errors = []

    def publisher():  # batches while the worker is killed and restarted
        try:
            for batch in range(6):
                published.extend(publish(ft, exchange, 1000, seed=batch + 1))
                time.sleep(0.5)
        except Exception as exc:  # the test fails on it below
            errors.append(exc)

    thread = threading.Thread(target=publisher)
    thread.start()
    kills = 0
    try:
        while thread.is_alive() or kills < 6:
            proc = worker_procs(config)
            time.sleep(rng.uniform(0.3, 2.5))
            assert proc.alive(), proc.log_tail()
            proc.signal(signal.SIGKILL)
            proc.proc.wait()
            kills += 1
    finally:
        thread.join()
    try:
        assert not errors, errors
        run_until_idle(ft, config)
        ids, objects = swift_ids(conn, container, str(tmp_path))
        lost = set(published) - set(ids)
        twice = {i: n for i, n in ids.items() if n > 1}
        assert len(published) == 6000 == len(set(published))
        assert not lost, "seed %d: %d lost" % (seed, len(lost))
        assert not twice, "seed %d: %d duplicated" % (seed, len(twice))
        assert set(ids) == set(published)
        assert objects > 6 and kills >= 6
        assert saved_offset(tmp_path / "archive", queue) == 5999
        assert not ft.archive_files(tmp_path / "archive")
    finally:
        ft.delete_swift_container(conn, container)
        conn.close()


def test_streams_a_second_worker_gets_the_whole_stream_too(
        rabbit, names, ft, tmp_path, worker_procs):
    queue, exchange = declare_stream(rabbit, names)
    first = publish(ft, exchange, 1500, seed=11)
    configs = [stream_config(ft, tmp_path, queue, exchange, work=work,
                             name=work + ".conf")
               for work in ("one", "two")]
    procs = [worker_procs(config, idle_exit=3) for config in configs]
    second = publish(ft, exchange, 1500, seed=12)  # while both consume
    for proc in procs:
        assert proc.wait(120) == 0, proc.log_tail()
    for work in ("one", "two"):
        ids = local_ids(ft, tmp_path / work)
        assert set(ids) == set(first + second), work
        assert set(ids.values()) == {1}, work
        assert saved_offset(tmp_path / work, queue) == 2999
    # a restart reads nothing again
    again = run_until_idle(ft, configs[0])
    assert "resuming after offset 2999 (saved)" in again.log
    assert sum(local_ids(ft, tmp_path / "one").values()) == 3000


def test_streams_stream_offset_by_time_starts_where_asked(
        rabbit, names, ft, tmp_path):
    queue, exchange = declare_stream(rabbit, names)
    before = publish(ft, exchange, 500, seed=21)
    # a stream's chunks carry the time they were written (ms) and the
    # broker starts at the first chunk at or after the time asked (in
    # seconds): a clear gap on both sides
    time.sleep(2.5)
    start = datetime.datetime.now(datetime.timezone.utc).replace(
        microsecond=0) + datetime.timedelta(seconds=1)
    time.sleep(2.5)
    after = publish(ft, exchange, 500, seed=22)
    config = stream_config(ft, tmp_path, queue, exchange, consumer={
        "stream_offset": start.isoformat().replace("+00:00", "Z")})
    proc = run_until_idle(ft, config)
    ids = local_ids(ft, tmp_path / "archive")
    assert set(ids) == set(after), proc.log_tail()
    assert not set(ids) & set(before)
    assert set(ids.values()) == {1}
    assert saved_offset(tmp_path / "archive", queue) == 999
    assert "first start, reading from %s" % start.isoformat() in proc.log


def test_streams_processes_n_refused_in_one_line(rabbit, names, ft,
                                                 tmp_path):
    queue, exchange = declare_stream(rabbit, names)
    config = stream_config(ft, tmp_path, queue, exchange,
                           worker={"processes": 2})
    proc = ft.run_worker(config, idle_exit=None, timeout=60)
    assert proc.returncode == 2
    lines = proc.log.strip().splitlines()
    assert len(lines) == 1, proc.log
    assert "[worker] processes: expected 1 with the stream queue %r, got 2" \
        % queue in lines[0]
