"""The whole pipeline with the real worker, RabbitMQ and Swift: consume,
roll, gzip, upload, delete; a Swift outage; a worker killed mid-upload.

Every test runs ``shoebox-worker run`` as a subprocess with
``callbacks = gzip, swift, delete`` and checks, in Swift, that every
published message is in exactly one object, that every object reads back
through :class:`~shoebox_worker.archive.ArchiveReader` and that its
metadata matches its records.

Needs ST_AUTH, ST_USER and ST_KEY (``env="$(scripts/swift-saio start)" &&
eval "$env"``) and RabbitMQ; without them the tests are skipped, or fail
when CI=true. The pipeline test uses that Swift. The outage tests (the
worker's, and one of the ``swift`` callback alone) and the kill test stop
and start Swift with ``scripts/swift-saio``; so that other users of the
shared instance are not cut off, they do it on a private instance of their
own (same script, own ``SAIO_DIR`` and free ports).
"""

import collections
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker.ship import swift

pytestmark = pytest.mark.functional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SAIO = os.path.join(ROOT, "scripts", "swift-saio")
PREFIX = "%Y/%m/%d/"
GZIP_MAGIC = b"\x1f\x8b"
#: Bytes of every object read through a plain (ranged) GET.
HEAD_BYTES = 4096
RETRY_LINE = re.compile(r"upload to \S+ failed: .*\(attempt (\d+); "
                        r"retrying in ")


def _unavailable(message):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


# -- Swift --------------------------------------------------------------------

def _connection(env, retries=2):
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1",
                          retries=retries, timeout=30)


class PrivateSwift:
    """A Swift all-in-one of this module's own, run by scripts/swift-saio
    (its own SAIO_DIR and ports), to stop and start at will."""

    def __init__(self, directory, ports):
        self.saio_env = dict(os.environ, SAIO_DIR=directory, **{
            "SAIO_%s_PORT" % name: str(port) for name, port in zip(
                ("PROXY", "ACCOUNT", "CONTAINER", "OBJECT", "MEMCACHED"),
                ports, strict=True)})
        self.env = None

    def _run(self, command):
        return subprocess.run([SAIO, command], capture_output=True,
                              text=True, timeout=180, env=self.saio_env)

    def start(self):
        result = self._run("start")
        if result.returncode != 0:
            raise RuntimeError("swift-saio start failed:\n%s"
                               % result.stderr[-3000:])
        self.env = dict(re.findall(r"export (ST_\w+)=(\S+)", result.stdout))
        return self.env

    def stop(self):
        result = self._run("stop")
        assert result.returncode == 0, result.stderr
        assert self._run("status").returncode != 0

    def ensure_started(self):
        if self._run("status").returncode != 0:
            self.start()


@pytest.fixture(scope="module")
def private_swift(swift_env, ft):
    directory = tempfile.mkdtemp(prefix="shoebox-saio-")
    swift = PrivateSwift(directory, ft.free_ports(5))
    try:
        try:
            swift.start()
        except Exception as exc:
            _unavailable("cannot start a private Swift: %s" % exc)
        yield swift
    finally:
        try:
            swift.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def container(request, ft):
    """A unique container name; deleted (with its segments) at the end
    from the Swift the test used (``container.swift_env``)."""
    name = "shoebox-pipe-%s" % uuid.uuid4().hex[:12]
    yield name
    env = getattr(request.node, "swift_env_used", None)
    if env is not None:
        conn = _connection(env)
        try:
            ft.delete_swift_container(conn, name)
        finally:
            conn.close()


def _listing(conn, container):
    try:
        return conn.get_container(container, full_listing=True)[1]
    except swc.ClientException as exc:
        if exc.http_status == 404:
            return []
        raise


def _slo_body(conn, container, name):
    """An SLO's content, read segment by segment from its manifest (Swift
    serves a manifest's GET at one segment a second after the tenth).

    :returns: ``(bytes, segment paths)``.
    """
    _, manifest = conn.get_object(container, name,
                                  query_string="multipart-manifest=get")
    parts, paths = [], []
    for segment in json.loads(manifest):
        seg_container, seg_name = segment["name"].lstrip("/").split("/", 1)
        _, data = conn.get_object(seg_container, seg_name)
        assert len(data) == segment["bytes"], segment
        assert hashlib.md5(data).hexdigest() == segment["hash"], segment
        parts.append(data)
        paths.append(segment["name"])
    return b"".join(parts), paths


def check_swift(conn, container, tmp_path, ft):
    """Download and check every object of ``container``.

    Each archive object must be gzip, read strictly through ArchiveReader,
    be named ``<first record's day>/<file name>``, carry metadata matching
    its records and have its index object beside it, which describes its
    records (``ft.check_index``); every segment in ``<container>_segments``
    must belong to a manifest (no orphans).

    :returns: ``(archive object names, Counter of message_ids, SLOs)``.
    """
    objects = [item["name"] for item in ft.swift_archives(conn, container)]
    ids = collections.Counter()
    referenced = set()
    slos = 0
    download = tmp_path / "download"
    download.mkdir(exist_ok=True)
    for name in objects:
        headers, body = conn.get_object(container, name, headers={
            "Range": "bytes=0-%d" % (HEAD_BYTES - 1)})
        if headers.get("x-static-large-object", "").lower() == "true":
            slos += 1
            full, segments = _slo_body(conn, container, name)
            referenced.update(segments)
            assert full[:HEAD_BYTES] == body  # what GET serves
            body = full
        else:
            headers, body = conn.get_object(container, name)
        assert body[:2] == GZIP_MAGIC, name
        path = download / os.path.basename(name)
        path.write_bytes(body)
        with archive.ArchiveReader(str(path)) as reader:
            pairs = list(reader)
        records = [metadata for metadata, _ in pairs]
        assert records, name
        _, data = conn.get_object(container, name + ".index")
        _, indexed = ft.check_index(data, pairs, name + ".index")
        assert indexed >= len(records), name  # request ids at least
        ids.update(m["message_id"] for m in records)
        first = datetime.datetime.fromisoformat(records[0]["timestamp"])
        assert name == first.strftime(PREFIX) + os.path.basename(name)
        assert headers["x-object-meta-records"] == str(len(records)), name
        assert headers["x-object-meta-first-timestamp"] == \
            records[0]["timestamp"], name
        assert headers["x-object-meta-last-timestamp"] == \
            records[-1]["timestamp"], name
        assert headers["x-object-meta-filename"] == os.path.basename(name)
        assert headers["x-object-meta-format-versions"] == "2", name
        assert int(conn.head_object(container, name)["content-length"]) \
            == len(body), name
        path.unlink()
    segments = {"/%s_segments/%s" % (container, item["name"])
                for item in _listing(conn, container + "_segments")}
    assert segments == referenced, "orphaned segments: %s" % sorted(
        segments - referenced)[:5]
    return objects, ids, slos


def assert_exactly_once(ids, published):
    lost = set(published) - set(ids)
    assert not lost, "%d message(s) not in Swift, e.g. %s" % (
        len(lost), sorted(lost)[:3])
    extra = set(ids) - set(published)
    assert not extra, "unexpected message_ids: %s" % sorted(extra)[:3]
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, "%d message(s) in Swift more than once, e.g. %s" % (
        len(twice), twice[:3])


# -- the worker -------------------------------------------------------------

def pipeline_config(ft, tmp_path, queue, env, container, roll_count,
                    **swift_options):
    swift = {"auth": env["ST_AUTH"], "user": env["ST_USER"],
             "key": env["ST_KEY"], "container": container,
             "object_prefix": PREFIX, "retries": 0, "timeout": 20,
             **swift_options}
    return ft.worker_config(
        tmp_path, queue, queue, routing_key=queue, roll_checker="count",
        roll_options={"roll_count": roll_count},
        callbacks={"gzip": {}, "swift": swift, "delete": {}},
        archive_options={"retry_initial": 0.2, "retry_max": 2})


def local_files(tmp_path):
    directory = tmp_path / "archive"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def ship_states(tmp_path):
    """``{state file: its JSON}`` of the working directory."""
    states = {}
    for name in local_files(tmp_path):
        if name.endswith(".ship"):
            try:
                with open(tmp_path / "archive" / name) as f:
                    states[name] = json.load(f)
            except (OSError, ValueError):  # being replaced: look again
                states[name] = {}
    return states


def all_waiting_for_swift(tmp_path, count):
    """``count`` archives, each gzipped and at the swift step (1)."""
    states = ship_states(tmp_path)
    gz = [n for n in local_files(tmp_path) if n.endswith(".events.gz")]
    return (len(states) == count and len(gz) == count and all(
        s.get("step") == 1 and str(s.get("path", "")).endswith(".gz")
        for s in states.values()))


def publish(ft, rabbit, queue, count, seed):
    rabbit.track_queue(queue)
    rabbit.track_exchange(queue)
    return ft.publish(ft.AMQP_URL, count, queue, queue, queue=queue,
                      seed=seed, confirm=True)


# -- the tests ----------------------------------------------------------------

def test_pipeline_to_swift(rabbit, names, ft, swift_env, container, tmp_path,
                           request):
    request.node.swift_env_used = swift_env
    published = publish(ft, rabbit, names, 5000, seed=11)
    config = pipeline_config(ft, tmp_path, names, swift_env, container,
                             roll_count=1000)

    proc = ft.run_worker(config, timeout=90)

    assert proc.returncode == 0, proc.log_tail()
    assert rabbit.depth(names) == 0
    assert local_files(tmp_path) == [], proc.log_tail()
    conn = _connection(swift_env)
    try:
        objects, ids, _ = check_swift(conn, container, tmp_path, ft)
    finally:
        conn.close()
    assert len(objects) >= 5, objects
    assert_exactly_once(ids, published)


@pytest.mark.slow
def test_swift_outage_blocks_nothing_loses_nothing(
        rabbit, names, ft, private_swift, container, tmp_path, worker_procs,
        request):
    env = private_swift.env
    request.node.swift_env_used = env
    published = publish(ft, rabbit, names, 3000, seed=12)
    config = pipeline_config(ft, tmp_path, names, env, container,
                             roll_count=500)
    # a retry after the first failure is logged at DEBUG only
    with open(config) as f:
        text = f.read()
    assert "level = INFO" in text
    with open(config, "w") as f:
        f.write(text.replace("level = INFO", "level = DEBUG"))
    try:
        private_swift.stop()
        worker = worker_procs(config, idle_exit=2)
        # consumption goes on: the queue drains while nothing can go up
        ft.wait_until(lambda: rabbit.depth(names) == 0, 60,
                      message="the queue drained with Swift down")
        assert worker.wait_for_log(r"idle: shipping \d+ archive", 30), \
            worker.log_tail()
        ft.wait_until(lambda: all_waiting_for_swift(tmp_path, 6), 30,
                      interval=0.1, message="6 .gz archives at step swift")
        ft.wait_until(lambda: max([int(n) for n in RETRY_LINE.findall(
            worker.log)] or [0]) >= 2, 30, interval=0.1,
            message="uploads retried")
        assert worker.alive(), worker.log_tail()
        rolled = sorted(n for n in local_files(tmp_path)
                        if n.endswith(".events.gz"))
    finally:
        private_swift.ensure_started()

    assert worker.wait(90) == 0, worker.log_tail()
    assert local_files(tmp_path) == [], worker.log_tail()
    conn = _connection(env)
    try:
        objects, ids, _ = check_swift(conn, container, tmp_path, ft)
    finally:
        conn.close()
    # one object per rolled archive: none twice, none missing
    assert sorted(os.path.basename(o) for o in objects) == rolled
    assert_exactly_once(ids, published)
    assert rabbit.depth(names) == 0


@pytest.mark.slow
def test_killed_during_upload_ships_once(
        rabbit, names, ft, private_swift, container, tmp_path, worker_procs,
        request):
    env = private_swift.env
    request.node.swift_env_used = env
    published = publish(ft, rabbit, names, 6000, seed=13)
    # small segments: every archive is a Static Large Object of ~70
    # segments, an upload long enough to be killed in
    config = pipeline_config(ft, tmp_path, names, env, container,
                             roll_count=2000, segment_size="8K", retries=1)
    conn = _connection(env)
    try:
        # 1. Swift down: all consumed, gzipped, stuck at the swift step
        try:
            private_swift.stop()
            worker = worker_procs(config)
            ft.wait_until(lambda: rabbit.depth(names) == 0, 60,
                          message="the queue drained with Swift down")
            ft.wait_until(lambda: all_waiting_for_swift(tmp_path, 3), 30,
                          interval=0.1, message="3 archives at step swift")
            assert worker.wait_for_log(RETRY_LINE.pattern, 30), \
                worker.log_tail()
            worker.kill()
            rolled = sorted(n for n in local_files(tmp_path)
                            if n.endswith(".events.gz"))
        finally:
            private_swift.ensure_started()

        # 2. Swift back; the restarted worker is killed in an SLO upload
        worker = worker_procs(config)

        def mid_upload():
            """Segments of an object whose manifest is not there yet."""
            segments = _listing(conn, container + "_segments")
            done = {o["name"] for o in _listing(conn, container)}
            return any(s["name"].rsplit("/", 3)[0] not in done
                       for s in segments)

        ft.wait_until(mid_upload, 60, interval=0.01,
                      message="an SLO upload under way")
        worker.kill()
        segments = _listing(conn, container + "_segments")
        done = [o for o in _listing(conn, container)
                if not o["name"].endswith(".index")]
        assert len(done) < len(rolled), "all uploaded before the kill"
        assert worker.wait_for_log(r"resuming shipping of \S+ at step 1",
                                   1), worker.log_tail()

        # 3. a last restart ships everything, exactly once
        last = ft.run_worker(config, timeout=90)
        assert last.returncode == 0, last.log_tail()
        assert local_files(tmp_path) == [], last.log_tail()
        objects, ids, slos = check_swift(conn, container, tmp_path, ft)
    finally:
        conn.close()
    print("\nkilled mid-upload with %d segment(s) and %d of %d object(s) "
          "in Swift" % (len(segments), len(done), len(rolled)))
    assert sorted(os.path.basename(o) for o in objects) == rolled
    assert slos == len(objects)
    assert_exactly_once(ids, published)
    assert rabbit.depth(names) == 0


def test_swift_callback_down_then_up(private_swift, container, tmp_path,
                                     request):
    """One callback instance fails cleanly while Swift is down and uploads
    once it is back (its broken connection is dropped, not reused)."""
    env = private_swift.env
    request.node.swift_env_used = env
    path = str(tmp_path / "outage.events")
    with archive.ArchiveWriter(path) as writer:
        for i in range(50):
            writer.write({"timestamp": "2025-12-31 23:58:%02d.000000" % i},
                         b'{"n": %d}' % i)
    with open(path, "rb") as f:
        before = hashlib.md5(f.read()).hexdigest()
    cb = swift.SwiftUploadCallback(
        auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
        container=container, object_prefix=PREFIX, retries="0",
        timeout="5")
    try:
        private_swift.stop()
        with pytest.raises(exceptions.UploadError) as info:
            cb.on_close(path, report=writer.report())
        assert "ConnectionError" in str(info.value)
        private_swift.ensure_started()
        assert cb.on_close(path, report=writer.report()) == path
    finally:
        cb.close()
        private_swift.ensure_started()
    with open(path, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == before
    conn = _connection(env)
    try:
        head = conn.head_object(container, "2025/12/31/outage.events")
    finally:
        conn.close()
    assert head["etag"] == before
    assert head["x-object-meta-records"] == "50"
