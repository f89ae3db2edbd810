"""Streams: a RabbitMQ stream queue archived exactly once, on the real
broker (and the Swift all-in-one for the kill test).

- kill -9 at random moments while consuming and shipping ``gzip, swift,
  delete``, restarts until idle: every published message is in Swift
  exactly once (counted by message_id);
- the same, killed at every rename, unlink and fsync the worker makes
  (``strace -e inject``, as tests/functional/test_crash_points.py does for
  classic queues): every window between an archive's fsync, its offset
  file and its shipping;
- a second worker with its own working directory gets the whole stream
  too;
- ``stream_offset`` by time starts where asked;
- ``processes = 2`` with a stream is refused in one line.
"""

import collections
import concurrent.futures
import datetime
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import kill_points
import kombu
import pytest
import swiftclient.client as swc

from shoebox_worker import archive
from shoebox_worker.consume import broker as broker_mod
from shoebox_worker.consume import stream as stream_mod
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import simulator


def declare_stream(rabbit, names, **arguments):
    """A durable topic exchange and a stream bound to it (both deleted at
    the end), with ``x-max-age = 1h`` and ``arguments``; returns
    ``(queue, exchange)``."""
    queue = rabbit.track_queue(names + "-stream")
    exchange = rabbit.track_exchange(names + "-ex")
    channel = rabbit.channel()
    try:
        kombu.Queue(queue, kombu.Exchange(exchange, type="topic",
                                          durable=True),
                    routing_key="notifications.*", durable=True,
                    queue_arguments={"x-queue-type": "stream",
                                     "x-max-age": "1h", **arguments})(
                                         channel).declare()
    finally:
        channel.close()
    return queue, exchange


def stream_arguments(**arguments):
    """``queue_arguments`` as the config says those of :func:`declare_stream`
    (the worker declares the queue too: they must match)."""
    return ", ".join("%s=%s" % item for item in {
        "x-queue-type": "stream", "x-max-age": "1h", **arguments}.items())


def publish(ft, exchange, count, seed, url=None):
    """Publish ``count`` notifications (confirmed, to the machine's
    RabbitMQ unless ``url``); their message_ids."""
    outcome = publish_mod.publish(url or ft.AMQP_URL, count,
                                  exchange=exchange,
                                  routing_key="notifications.info",
                                  durable=True, seed=seed)
    assert outcome.confirmed == count, outcome
    return [n["message_id"] for n in simulator.notifications(count,
                                                             seed=seed)]


def stream_config(ft, tmp_path, queue, exchange, *, name="worker.conf",
                  work="archive", callbacks=None, consumer=None,
                  roll_count=300, worker=None, archive_options=None,
                  url=None):
    return ft.worker_config(
        tmp_path, queue, exchange, url=url or ft.AMQP_URL,
        routing_key="notifications.*",
        durable=True, roll_checker="count",
        roll_options={"roll_count": roll_count}, callbacks=callbacks,
        consumer_options={"exchange_durable": True,
                          "queue_arguments": "x-queue-type=stream, "
                                             "x-max-age=1h",
                          **(consumer or {})},
        archive_options={"working_directory": tmp_path / work,
                         "fsync_every": 100, **(archive_options or {})},
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
    objects = [o for o in conn.get_container(container, full_listing=True)[1]
               if not o["name"].endswith(".index")]
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


@pytest.mark.slow
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


def test_streams_killed_past_a_segment_start_every_message_once(
        strace, rabbit, names, ft, tmp_path):
    """Small segments: the stream's offsets have a gap at each segment's
    start (an entry of the broker's, which no consumer gets). Killed
    (``strace -e inject=rename:signal=KILL``) after an archive's fsync,
    at the offset file's rename: the archive then holds offsets past the
    saved one, across such gaps, and the restart must resume after the
    highest of them, not at the first gap (which archived what followed
    twice)."""
    segments = {"x-stream-max-segment-size-bytes": 100000}
    queue, exchange = declare_stream(rabbit, names, **segments)
    config = stream_config(ft, tmp_path, queue, exchange, consumer={
        "queue_arguments": stream_arguments(**segments)},
        archive_options={"fsync_every": 200, "fsync_interval": 30},
        roll_count=10000)
    published = publish(ft, exchange, 2000, seed=51)
    log = str(tmp_path / "log")
    killed = 0
    for k in (3, 3, 3):  # the start's save, one ack point's, the next's
        code = _run([strace, "-f", "-qq", "-o", os.devnull, "-e",
                     "trace=rename", "-e", "inject=rename:signal=KILL:when=%d"
                     % k, WORKER, "run", "--config", config, "--idle-exit",
                     "3"], log)
        killed += code != 0
    last = run_until_idle(ft, config)
    ids = local_ids(ft, tmp_path / "archive")
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, "%d twice; %s" % (len(twice), last.log_tail())
    assert set(ids) == set(published)
    offsets = sorted(int(r.metadata[stream_mod.METADATA_KEY])
                     for r in ft.read_archives(tmp_path / "archive"))
    assert offsets[-1] - offsets[0] + 1 > len(offsets), \
        "no segment gap: the test shows nothing"
    assert killed == 3, open(log).read()[-3000:]
    assert "lack offset" not in open(log).read() + last.log


@pytest.mark.both_brokers
def test_streams_a_second_worker_gets_the_whole_stream_too(
        rabbit, broker, names, ft, tmp_path, worker_procs):
    queue, exchange = declare_stream(rabbit, names)
    first = publish(ft, exchange, 1500, seed=11, url=broker.url)
    configs = [stream_config(ft, tmp_path, queue, exchange, work=work,
                             name=work + ".conf", url=broker.url)
               for work in ("one", "two")]
    procs = [worker_procs(config, idle_exit=3) for config in configs]
    second = publish(ft, exchange, 1500, seed=12,
                     url=broker.url)  # while both consume
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
    # seconds): the next whole second, which the first batch (confirmed,
    # so written) is before, and the second batch is published after
    start = datetime.datetime.now(datetime.timezone.utc).replace(
        microsecond=0) + datetime.timedelta(seconds=1)
    ft.wait_until(lambda: datetime.datetime.now(datetime.timezone.utc)
                  >= start + datetime.timedelta(milliseconds=50), 5,
                  message="the clock past %s" % start)
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


def test_streams_what_retention_removed_is_a_logged_gap(rabbit, names, ft,
                                                       tmp_path):
    """The stream's retention (small segments, ``x-max-length-bytes``)
    removed the entries after the last one archived: the worker resumes
    at the first entry the stream still holds, says once which offsets it
    never got, and archives the rest once each. Each segment starts with
    an entry of the broker's that no consumer gets: gaps that are no
    loss, and not warned of."""
    retention = {"x-max-length-bytes": 200000,
                 "x-stream-max-segment-size-bytes": 20000}
    queue, exchange = declare_stream(rabbit, names, **retention)
    # in 200 confirmed publishes of 5 (about 25 KB): each its own chunk of
    # the stream's, a segment each, so that several segments are retained
    # (all 1,000 at once made a few big chunks on a loaded machine, one
    # segment retained, no segment start to see: seen in CI)
    published = []
    for batch in range(200):
        published += publish(ft, exchange, 5, seed=41 + batch)
    config = stream_config(ft, tmp_path, queue, exchange, consumer={
        "queue_arguments": stream_arguments(**retention)})
    work = tmp_path / "archive"
    work.mkdir()
    # as if a run had archived offsets 0-5 and shipped them
    stream_mod.write_offset(stream_mod.offset_path(str(work), queue), queue,
                            5)
    proc = run_until_idle(ft, config)
    records = ft.read_archives(work)
    offsets = [int(r.metadata[stream_mod.METADATA_KEY]) for r in records]
    first = offsets[0]
    assert first > 6, "retention removed nothing: %s" % proc.log_tail()
    assert offsets == sorted(set(offsets)), "not once each, in order"
    # the retained entries are the last ones published, each once
    ids = [r.metadata["message_id"] for r in records]
    assert ids == published[-len(ids):], proc.log_tail()
    # one warning, for what was gone; the other gaps (each segment's
    # first entry, the broker's own) are not losses
    gaps = [line for line in proc.log.splitlines() if "never delivered" in
            line]
    assert gaps == [gaps[0]] and "WARNING" in gaps[0], proc.log_tail()
    assert "stream %s: offsets 6-%d were never delivered" % (
        queue, first - 1) in gaps[0], proc.log_tail()
    assert saved_offset(work, queue) == offsets[-1]
    skipped = offsets[-1] - first + 1 - len(offsets)
    assert skipped > 0, "no segment entry seen: the test shows nothing"
    print("\nstream retention: offsets 6-%d gone before they were read, "
          "one warning; %d entries archived once each (offsets %d-%d, %d "
          "of them the segments' own)" % (first - 1, len(offsets), first,
                                          offsets[-1], skipped))


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


# -- killed at every rename, unlink and fsync ---------------------------------

#: The kinds of calls killed at, each with the system calls it counts.
KINDS = kill_points.KINDS
#: Messages per point, in archives of ROLL_COUNT (two archives).
MESSAGES = 6
ROLL_COUNT = 3
PARALLEL = 4
RUN_TIMEOUT = 120
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")


class Point:
    """One kill point: its own stream, folder, config and outcome."""

    def __init__(self, base, rabbit, names, swift, container, kind, k, ft):
        self.kind, self.k = kind, k
        self.name = "%s-%d" % (kind, k)
        self.dir = os.path.join(base, self.name)
        os.makedirs(self.dir)
        self.work = os.path.join(self.dir, "work")
        self.queue, self.exchange = declare_stream(rabbit, "%s-%s" % (
            names, self.name))
        self.prefix = self.name + "/"
        self.config = stream_config(
            ft, pathlib.Path(self.dir), self.queue, self.exchange,
            work="work", roll_count=ROLL_COUNT,
            archive_options={"fsync_interval": 30}, callbacks={
                "gzip": {},
                "swift": {"auth": swift["ST_AUTH"], "user": swift["ST_USER"],
                          "key": swift["ST_KEY"], "container": container,
                          "object_prefix": self.prefix, "retries": 0,
                          "timeout": 20},
                "delete": {}})
        self.log = os.path.join(self.dir, "log")
        self.killed = self.restart = None
        self.published = []


def _run(argv, log_path):
    """Run ``argv`` in a session of its own (killed whole on a timeout:
    killing strace alone would leave the traced worker running)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            return proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timed out"


def _argv(point):
    return [WORKER, "run", "--config", point.config, "--idle-exit", "0.3"]


def count_calls(strace, point, ft):
    """One run under strace: ``{kind: the most calls one thread made}``."""
    point.published = publish(ft, point.exchange, MESSAGES, seed=1000)
    trace = os.path.join(point.dir, "trace")
    code = _run([strace, "-f", "-qq", "-o", trace,
                 "-e", "trace=" + ",".join(KINDS.values()), *_argv(point)],
                point.log)
    assert code == 0, open(point.log).read()[-3000:]
    return kill_points.most_calls_per_thread(trace)


def run_point(strace, point, ft):
    point.published = publish(ft, point.exchange, MESSAGES, seed=point.k)
    names = KINDS[point.kind]
    code = _run([strace, "-f", "-qq", "-o", os.devnull, "-e",
                 "trace=" + names, "-e",
                 "inject=%s:signal=KILL:when=%d" % (names, point.k),
                 *_argv(point)], point.log)
    point.killed = code != 0
    with open(point.log, "ab") as f:
        f.write(b"\n---- killed: %r (exit %r); restart ----\n"
                % (point.killed, code))
    point.restart = _run(_argv(point), point.log)
    return point


def check_point(point, conn, container):
    """Every message of the point's stream once in Swift; nothing but the
    offset file (and its lock) left in the working directory."""
    log = open(point.log, errors="replace").read()
    where = "%s (log %s):\n%s" % (point.name, point.dir, log[-4000:])
    assert point.restart == 0, "restart exit %r: %s" % (point.restart,
                                                         where)
    offset_file = os.path.basename(stream_mod.offset_path(point.work,
                                                          point.queue))
    left = sorted(set(os.listdir(point.work)) - {
        offset_file, offset_file + stream_mod.LOCK_SUFFIX})
    assert left == [], "left in the working directory: %s; %s" % (left,
                                                                   where)
    ids = collections.Counter()
    _, objects = conn.get_container(container, prefix=point.prefix,
                                    full_listing=True)
    for obj in [o for o in objects if not o["name"].endswith(".index")]:
        _, body = conn.get_object(container, obj["name"])
        path = os.path.join(point.dir, "download.events")
        with open(path, "wb") as f:
            f.write(gzip.GzipFile(fileobj=io.BytesIO(body)).read())
        with archive.ArchiveReader(path) as reader:
            ids.update(metadata["message_id"] for metadata, _ in reader)
    lost = set(point.published) - set(ids)
    assert not lost, "%d message(s) lost at %s" % (len(lost), where)
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, "%d message(s) twice at %s" % (len(twice), where)
    assert set(ids) == set(point.published), where
    assert saved_offset(point.work, point.queue) == MESSAGES - 1, where
    assert "Traceback" not in log, where


@pytest.mark.slow
def test_streams_killed_at_every_rename_unlink_and_fsync(
        strace, rabbit, names, ft, tmp_path, swift_env):
    container = "shoebox-stream-crash-%s" % names[-8:]
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    base = str(tmp_path)
    try:
        counting = Point(base, rabbit, names, swift_env, container, "count",
                         0, ft)
        counts = count_calls(strace, counting, ft)
        counting.restart = 0
        check_point(counting, conn, container)
        points = []
        for kind, count in counts.items():
            assert count > 0, (kind, counts)
            points += [Point(base, rabbit, names, swift_env, container, kind,
                             k, ft) for k in range(1, count + 1)]
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            done = list(pool.map(lambda p: run_point(strace, p, ft), points))
        failed = []
        for point in done:
            try:
                check_point(point, conn, container)
            except AssertionError as exc:
                failed.append("%s: %s" % (point.name, str(exc)[:2000]))
        assert not failed, "%d of %d point(s) failed:\n%s" % (
            len(failed), len(done), "\n\n".join(failed))
    finally:
        ft.delete_swift_container(conn, container)
        conn.close()
    killed = sum(1 for p in done if p.killed)
    print("\nstream crash points: %s calls (largest per thread); %d of %d "
          "points killed; every message once" % (
              ", ".join("%d %s" % (n, kind) for kind, n in counts.items()),
              killed, len(done)))
    assert killed >= len(done) // 2, (killed, len(done))


# -- the disk refuses writes -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("call", ["openat", "write", "fsync"])
def test_streams_writes_refused_by_the_disk_lose_and_repeat_nothing(
        strace, rabbit, names, ft, tmp_path, swift_env, call):
    """Every third attempt to write the offset file fails with ENOSPC
    (``strace -P`` on its temporary file): at the ack points (a failed
    sync: the batch is given back and consuming pauses as for a full
    disk) and before an archive is shipped (the archive is kept back until
    the file is saved). ``fsync``: every seventh fsync of each thread
    fails, the archive's, the offset file's and the shipper's. Then a run
    without it: every message once in Swift."""
    queue, exchange = declare_stream(rabbit, names)
    container = "shoebox-stream-enospc-%s" % names[-8:]
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    work = tmp_path / "archive"
    config = stream_config(ft, tmp_path, queue, exchange, callbacks={
        "gzip": {},
        "swift": {"auth": swift_env["ST_AUTH"], "user": swift_env["ST_USER"],
                  "key": swift_env["ST_KEY"], "container": container,
                  "retries": 0, "timeout": 20},
        "delete": {}}, roll_count=250)  # rolls between two ack points
    published = publish(ft, exchange, 3000, seed=31)
    tmp = stream_mod.offset_path(str(work), queue) + ".tmp"
    log = str(tmp_path / "log")
    try:
        only = [] if call == "fsync" else ["-P", tmp]
        # (a failed commit makes three fsyncs: every third would fail the
        # archive's at each commit, and the worker would never get on)
        when = "when=4+7" if call == "fsync" else "when=3+3"
        code = _run([strace, "-f", "-qq", "-o", os.devnull, *only,
                     "-e", "trace=" + call, "-e",
                     "inject=%s:error=ENOSPC:%s" % (call, when),
                     WORKER, "run", "--config", config, "--idle-exit", "3"],
                    log)
        first = open(log, errors="replace").read()
        assert code == 0, first[-4000:]
        assert "cannot write archive" in first, first[-4000:]
        # refused before shipping too (most runs; which attempts land
        # there depends on timing: the unit tests take that path for
        # sure): the archive kept back went in this run
        if "cannot save the stream offsets" in first:
            assert "kept back to the shipper" in first, first[-4000:]
        assert "Traceback" not in first, first[-4000:]
        left = ft.archive_files(work)
        again = run_until_idle(ft, config)
        ids, objects = swift_ids(conn, container, str(tmp_path))
        lost = set(published) - set(ids)
        twice = {i: n for i, n in ids.items() if n > 1}
        assert not lost, "%d lost; log:\n%s" % (len(lost), first[-4000:])
        assert not twice, "%d twice; log:\n%s" % (len(twice), first[-4000:])
        assert set(ids) == set(published)
        assert saved_offset(work, queue) == 2999
        assert not ft.archive_files(work), again.log_tail()
        print("\nwrites refused (%s, %s): %d time(s) at an ack point, %d "
              "before shipping; %d archive(s) left for the next run; %d "
              "objects, every message once" % (
                  call, when, first.count("cannot write archive"),
                  first.count("cannot save the stream offsets"), len(left),
                  objects))
    finally:
        ft.delete_swift_container(conn, container)
        conn.close()


# -- a stream declared again, an offset file from another time ---------------

def delete_queue(rabbit, queue):
    channel = rabbit.channel()
    try:
        channel.queue_delete(queue)
    finally:
        channel.close()


def saved_file(directory, queue):
    """The offset file's JSON."""
    with open(stream_mod.offset_path(str(directory), queue)) as f:
        return json.load(f)


def other_stream_lines(log):
    return [line for line in log.splitlines()
            if "not the stream archived before" in line]


@pytest.mark.both_brokers
@pytest.mark.parametrize("again", [3, 20], ids=["shorter", "longer"])
def test_streams_declared_again_every_message_of_the_new_one_once(
        rabbit, broker, names, ft, tmp_path, again):
    """A stream deleted and declared again between two runs starts again
    at offset 0: the second run must archive all of it, once, and say in
    one line that the offset file named another stream; a new stream
    shorter than the saved offset (3: nothing at offset 4) or longer
    (20: another message at offset 4)."""
    queue, exchange = declare_stream(rabbit, names)
    config = stream_config(ft, tmp_path, queue, exchange, url=broker.url)
    work = tmp_path / "archive"
    old = publish(ft, exchange, 5, seed=61, url=broker.url)
    run_until_idle(ft, config)
    assert set(local_ids(ft, work)) == set(old)
    before = saved_file(work, queue)
    delete_queue(rabbit, queue)
    declare_stream(rabbit, names)
    new = publish(ft, exchange, again, seed=62, url=broker.url)
    proc = run_until_idle(ft, config)
    ids = local_ids(ft, work)
    assert set(ids) == set(old) | set(new), proc.log_tail()
    assert set(ids.values()) == {1}, proc.log_tail()
    lines = other_stream_lines(proc.log)
    assert len(lines) == 1 and "ERROR" in lines[0], proc.log_tail()
    # both identities: the file's (offset 4 and its message's digest), and
    # what the new stream holds there
    assert "sha256 %s" % before["identity"]["sha256"][:16] in lines[0]
    holds = lines[0].split("; the stream holds ")[1].split(":")[0]
    if again < 5:
        assert holds == "nothing at or after offset 4", lines[0]
    else:
        assert holds.startswith("sha256 ") and holds.endswith(
            " at offset 4"), lines[0]
        assert before["identity"]["sha256"][:16] not in holds
    after = saved_file(work, queue)
    assert after["offset"] == again - 1
    assert after["identity"]["offset"] == again - 1
    assert after["identity"]["sha256"] != before["identity"]["sha256"]


@pytest.mark.parametrize("identity", [True, False],
                         ids=["with-identity", "without-identity"])
def test_streams_an_offset_file_past_the_streams_end(rabbit, names, ft,
                                                     tmp_path, identity):
    """A working directory restored from another time (or another
    stream's file): its offset file says 1000 where the stream holds
    0-9. Every message is archived once and one line says so; an old
    file (no identity) is checked the same way, by the offset alone."""
    queue, exchange = declare_stream(rabbit, names)
    published = publish(ft, exchange, 10, seed=63)
    config = stream_config(ft, tmp_path, queue, exchange)
    work = tmp_path / "archive"
    work.mkdir()
    data = {"queue": queue, "offset": 1000}
    if identity:
        data["identity"] = {"offset": 1000, "sha256": "ab" * 32}
    with open(stream_mod.offset_path(str(work), queue), "w") as f:
        json.dump(data, f)
    proc = run_until_idle(ft, config)
    ids = local_ids(ft, work)
    assert set(ids) == set(published), proc.log_tail()
    assert set(ids.values()) == {1}
    lines = other_stream_lines(proc.log)
    assert len(lines) == 1 and "ERROR" in lines[0], proc.log_tail()
    assert ("sha256 abababababababab" if identity else
            "offset 1000 (no sha256 saved)") in lines[0]
    assert "nothing at or after offset 1000" in lines[0]
    assert saved_file(work, queue)["offset"] == 9


def test_streams_an_older_offset_file_archives_again_loses_nothing(
        rabbit, names, ft, tmp_path):
    """An offset file restored from an earlier backup of the same stream:
    its identity holds, the worker resumes after it, and what was archived
    since is archived again (twice, none lost), without a warning."""
    queue, exchange = declare_stream(rabbit, names)
    config = stream_config(ft, tmp_path, queue, exchange)
    work = tmp_path / "archive"
    first = publish(ft, exchange, 5, seed=64)
    run_until_idle(ft, config)
    path = stream_mod.offset_path(str(work), queue)
    backup = open(path).read()
    second = publish(ft, exchange, 5, seed=65)
    run_until_idle(ft, config)
    with open(path, "w") as f:
        f.write(backup)
    proc = run_until_idle(ft, config)
    ids = local_ids(ft, work)
    assert {i: ids[i] for i in first} == dict.fromkeys(first, 1)
    assert {i: ids[i] for i in second} == dict.fromkeys(second, 2)
    assert "resuming after offset 4 (saved)" in proc.log
    assert not other_stream_lines(proc.log)
    assert "WARNING" not in proc.log and "ERROR" not in proc.log
    assert saved_file(work, queue)["offset"] == 9


def test_streams_an_old_offset_file_without_identity_gets_one(
        rabbit, names, ft, tmp_path):
    """An offset file of an earlier version (offset only) is read: the
    stream holds its offset, so the worker resumes after it and records
    the identity at its next save."""
    queue, exchange = declare_stream(rabbit, names)
    published = publish(ft, exchange, 10, seed=66)
    config = stream_config(ft, tmp_path, queue, exchange)
    work = tmp_path / "archive"
    work.mkdir()
    with open(stream_mod.offset_path(str(work), queue), "w") as f:
        json.dump({"queue": queue, "offset": 4}, f)
    proc = run_until_idle(ft, config)
    ids = local_ids(ft, work)
    assert set(ids) == set(published[5:]), proc.log_tail()
    assert not other_stream_lines(proc.log)
    saved = saved_file(work, queue)
    assert saved["offset"] == 9 and saved["identity"]["offset"] == 9
    assert len(saved["identity"]["sha256"]) == 64


@pytest.mark.both_brokers
def test_streams_first_delivery_what_the_check_reads(rabbit, broker, names):
    """The check before a subscription, on the real broker: the message at
    an offset the stream holds (its body's SHA-256), nothing past its end
    (within half the connection's heartbeat: the broker's heartbeats on
    the check's own connection must not keep it reading)."""
    queue = rabbit.track_queue(names + "-probe")
    channel = rabbit.channel()
    try:
        kombu.Queue(queue, durable=True, queue_arguments={
            "x-queue-type": "stream"})(channel).declare()
        producer = kombu.Producer(channel)
        for n in range(5):
            producer.publish(b"body %d" % n, routing_key=queue,
                             serializer=None, delivery_mode=2)
    finally:
        channel.close()
    # the bounds are wide apart (a loaded machine stretches a second):
    # what is told apart is a return at the delivery from one at the end
    # of the full wait (CHECK_WAIT, 5 s), and half the heartbeat from it
    assert stream_mod.CHECK_WAIT == 5
    with broker_mod.Connection(broker.url, heartbeat=60) as conn:
        started = time.monotonic()
        found = stream_mod.first_delivery(conn, queue, 3)
        assert found == stream_mod.Identity(
            3, hashlib.sha256(b"body 3").hexdigest())
        assert time.monotonic() - started < 4
    with broker_mod.Connection(broker.url, heartbeat=2) as conn:
        started = time.monotonic()
        assert stream_mod.first_delivery(conn, queue, 1000) is None
        assert 1 <= time.monotonic() - started < 4


def test_streams_declared_again_while_the_worker_reads_it(
        rabbit, names, ft, tmp_path, worker_procs):
    """Deleted and declared again under a running worker: the broker
    cancels its subscription, the worker subscribes again, and the check
    finds the new stream: every message of both archived once."""
    queue, exchange = declare_stream(rabbit, names)
    config = stream_config(ft, tmp_path, queue, exchange)
    work = tmp_path / "archive"
    old = publish(ft, exchange, 5, seed=67)
    proc = worker_procs(config)
    ft.wait_until(lambda: saved_offset(work, queue) == 4, 30,
                  message="the old stream archived")
    delete_queue(rabbit, queue)
    declare_stream(rabbit, names)
    new = publish(ft, exchange, 8, seed=68)
    ft.wait_until(lambda: set(local_ids(ft, work)) >= set(new), 60,
                  message="the new stream archived")
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.log_tail()
    ids = local_ids(ft, work)
    assert set(ids) == set(old) | set(new), proc.log_tail()
    assert set(ids.values()) == {1}, proc.log_tail()
    assert len(other_stream_lines(proc.log)) == 1, proc.log_tail()
    assert saved_offset(work, queue) == 7
