"""Names that never repeat and records that never stop shipping, with the
real worker, RabbitMQ and the project's Swift all-in-one.

- A wall clock stepped back mid-run (inside the worker's process, see
  ``clockstep.py``: the monotonic clock runs on), and a worker restarted
  with the same host name and PID and its clock behind: every message in
  Swift, no object overwritten (each upload made an object of its own).
- ``If-None-Match: *``: an object of other content under the name is left
  alone and the file goes under a new name, loudly; the same content is
  done.
- Poison values (timestamps out of range, absurd, of the wrong type, huge
  or control-character event types) as the first records of archives
  through ``gzip, swift, delete``: all shipped, ``--idle-exit`` exits 0.

Needs ST_AUTH, ST_USER and ST_KEY and RabbitMQ; without them the tests are
skipped, or fail when CI=true.
"""

import collections
import hashlib
import http.client
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker.consume import envelope
from shoebox_worker.ship import swift
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

CLOCKSTEP = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "clockstep.py")
UPLOADED = re.compile(r"uploaded (\S+) to (\S+?)/(\S+): \d+ bytes")


def _connection(env):
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2,
                          timeout=30)


@pytest.fixture
def container(swift_env, ft):
    name = "shoebox-names-%s" % uuid.uuid4().hex[:12]
    yield name
    conn = _connection(swift_env)
    try:
        ft.delete_swift_container(conn, name)
    finally:
        conn.close()


@pytest.fixture
def queue(rabbit, names):
    rabbit.declare(names, names, names)
    return names


def swift_options(env, container, **more):
    return {"auth": env["ST_AUTH"], "user": env["ST_USER"],
            "key": env["ST_KEY"], "container": container, "retries": 0,
            "timeout": 20, **more}


def swift_records(conn, container, tmp_path):
    """``(object count, Counter of message_ids, records)`` of every object
    in ``container``, each read strictly; every object's Records metadata
    must match its records."""
    objects = [item for item in conn.get_container(
        container, full_listing=True)[1]
        if not item["name"].endswith(".index")]  # the archives' indexes
    ids = collections.Counter()
    total = 0
    for item in objects:
        headers, body = conn.get_object(container, item["name"])
        path = tmp_path / "download.events"
        path.write_bytes(body)
        with archive.ArchiveReader(str(path)) as reader:
            records = [metadata for metadata, _ in reader]
        assert headers["x-object-meta-records"] == str(len(records))
        ids.update(m["message_id"] for m in records)
        total += len(records)
    return len(objects), ids, total


def uploads(log):
    """The object names of every ``uploaded`` line of a worker's log."""
    return [match.group(3) for match in UPLOADED.finditer(log)]


class SteppedWorker:
    """``shoebox-worker run`` through clockstep.py (a stepping wall
    clock, a forced worker id); its log goes to a file."""

    def __init__(self, config, clock="", ident="", idle_exit=3):
        self.log_path = "%s.%s.log" % (config, uuid.uuid4().hex[:6])
        env = dict(os.environ, SHOEBOX_TEST_CLOCK=clock,
                   SHOEBOX_TEST_WORKER_ID=ident, PYTHONDONTWRITEBYTECODE="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, CLOCKSTEP, "run", "--config", str(config),
                 "--idle-exit", str(idle_exit)], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("the worker did not exit within %.0f s; log:\n%s"
                        % (timeout, self.log[-5000:]))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


@pytest.fixture
def stepped():
    started = []

    def start(*args, **kwargs):
        worker = SteppedWorker(*args, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def publish_paced(rabbit, queue, count, seconds, seed):
    """Publish ``count`` notifications evenly over ``seconds``, in a
    thread; returns ``(thread, message_ids)``."""
    notes = list(simulator.notifications(count, seed=seed))
    bodies = [(envelope.wrap(n), {}) for n in notes]
    batch = max(1, count // int(seconds * 10))

    def run():
        for start in range(0, count, batch):
            rabbit.publish_raw(queue, queue, bodies[start:start + batch])
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, [n["message_id"] for n in notes]


def assert_nothing_lost_nothing_overwritten(conn, container, tmp_path,
                                            published, logs):
    names = [name for log in logs for name in uploads(log)]
    assert names, "nothing uploaded"
    twice = [n for n, c in collections.Counter(names).items() if c > 1]
    assert not twice, "uploaded twice under one name: %s" % twice[:3]
    objects, ids, total = swift_records(conn, container, tmp_path)
    # each upload made an object of its own: none replaced another
    assert objects == len(names), (objects, len(names))
    lost = set(published) - set(ids)
    assert not lost, "%d of %d messages not in Swift, e.g. %s" % (
        len(lost), len(published), sorted(lost)[:3])
    assert total == sum(ids.values()) >= len(published)


# -- a wall clock that steps back ---------------------------------------------

@pytest.mark.slow
def test_a_clock_stepped_back_mid_run_overwrites_nothing(
        ft, rabbit, queue, container, swift_env, stepped, tmp_path):
    # archives roll about every second; 6 s in, the wall clock steps back
    # 10 s, so the names of the next 10 s were all made once already
    config = ft.worker_config(
        tmp_path, queue, queue, routing_key=queue, roll_checker="time",
        roll_options={"roll_minutes": 1 / 60},
        callbacks={"gzip": {}, "swift": swift_options(swift_env, container),
                   "delete": {}})
    # --idle-exit 10: the worker must outlast the publisher's pauses (a
    # starved publisher, 12 tests at once on 2 cores, paused 3 s and the
    # worker left 34 messages in the queue)
    worker = stepped(config, clock="6=-10", idle_exit=10)
    thread, published = publish_paced(rabbit, queue, 1200, 12, seed=11)
    thread.join(180)
    assert not thread.is_alive(), "still publishing after 180 s"
    assert worker.wait(90) == 0, worker.log[-3000:]
    log = worker.log
    assert len(uploads(log)) >= 8, log[-3000:]
    conn = _connection(swift_env)
    try:
        assert_nothing_lost_nothing_overwritten(conn, container, tmp_path,
                                                published, [log])
    finally:
        conn.close()
    assert not os.listdir(tmp_path / "archive")


def test_a_restart_with_the_same_host_pid_and_clock_overwrites_nothing(
        ft, rabbit, queue, container, swift_env, stepped, tmp_path):
    # a container restarted: same host name, same PID, and its clock
    # behind, at the very seconds of the first run
    config = ft.worker_config(
        tmp_path, queue, queue, routing_key=queue, roll_checker="count",
        roll_options={"roll_count": 40},
        callbacks={"gzip": {}, "swift": swift_options(swift_env, container),
                   "delete": {}})
    published, logs = [], []
    first_start = None
    for run in range(2):
        published += ft.publish(ft.AMQP_URL, 240, queue, queue,
                                seed=21 + run)
        started = time.time()
        if first_start is None:
            first_start = started
        worker = stepped(config, clock="0=%f" % (first_start - started),
                         ident="shoebox-1", idle_exit=1.5)
        assert worker.wait(60) == 0, worker.log[-3000:]
        logs.append(worker.log)
    # the same host-pid both times, and names of the same seconds
    assert all("_shoebox-1" in name for log in logs
               for name in uploads(log))
    conn = _connection(swift_env)
    try:
        assert_nothing_lost_nothing_overwritten(conn, container, tmp_path,
                                                published, logs)
    finally:
        conn.close()


# -- If-None-Match against the real Swift ------------------------------------

def write_archive(path, count, seed):
    with archive.ArchiveWriter(str(path)) as writer:
        for note in simulator.notifications(count, seed=seed):
            writer.write({"message_id": note["message_id"],
                          "timestamp": note["timestamp"]},
                         json.dumps(note).encode())
    return str(path)


@pytest.mark.parametrize("segment_size", ["1G", "16K"])
def test_other_content_under_the_name_gets_a_new_name_loudly(
        swift_env, container, tmp_path, caplog, segment_size):
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    theirs = write_archive(tmp_path / "a" / "x.events", 60, seed=1)
    mine = write_archive(tmp_path / "b" / "x.events", 70, seed=2)
    data = open(mine, "rb").read()
    callback = swift.SwiftUploadCallback(**swift_options(
        swift_env, container, segment_size=segment_size,
        delete_after="86400"))
    conn = _connection(swift_env)
    try:
        callback.on_close(theirs)
        before = conn.head_object(container, "x.events")
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            assert callback.on_close(mine) == mine
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING]
        other = "x~%s.events" % hashlib.sha256(data).hexdigest()[:16]
        assert len(warnings) == 1, warnings
        assert ("%s/x.events holds other content" % container) in \
            warnings[0] and ("%s/%s instead" % (container, other)) in \
            warnings[0] and mine in warnings[0]
        after = conn.head_object(container, "x.events")
        assert after["etag"] == before["etag"]
        assert after["x-object-meta-sha256"] == hashlib.sha256(
            open(theirs, "rb").read()).hexdigest()
        if segment_size == "1G":
            assert conn.get_object(container, other)[1] == data
        head = conn.head_object(container, other)
        assert head["x-object-meta-sha256"] == hashlib.sha256(
            data).hexdigest()
        assert int(head["content-length"]) == len(data)
        assert "x-delete-at" in head
        # the same content again: done, nothing more in Swift
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            callback.on_close(theirs)
        assert "x.events already holds %s" % theirs in caplog.text
        assert not [r for r in caplog.records
                    if r.levelno >= logging.WARNING]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            callback.on_close(mine)  # a retry: finds its own upload
        assert "%s already holds %s" % (other, mine) in caplog.text
        listing = conn.get_container(container)[1]
        assert sorted(item["name"] for item in listing) == sorted(
            ["x.events", other])
    finally:
        callback.close()
        conn.close()


# -- poison values ---------------------------------------------------------

POISONS = [
    {"timestamp": "0001-01-01T00:00:00+01:00"},
    {"timestamp": "9999-12-31T23:59:59-01:00"},
    {"timestamp": "1900-01-01 00:00:00"},
    {"timestamp": "not a date"},
    {"timestamp": 20240309},
    {"timestamp": None},
    {"timestamp": ["2024-03-09"]},
    {"timestamp": "2024-03-09T10:00:00\r\nX-Evil: 1"},
    {"timestamp": "2" * 100000},
    {"event_type": "x" * 100000},
    {"event_type": "compute.\x00\x01\x1b[31m\n\r.update"},
]


def test_poison_first_records_ship_and_idle_exit_exits(
        ft, rabbit, queue, container, swift_env, tmp_path):
    # each archive of 5 starts with one poisoned notification
    messages, published = [], []
    notes = simulator.notifications(len(POISONS) * 5, seed=5)
    for index, note in enumerate(notes):
        if index % 5 == 0:
            note.update(POISONS[index // 5])
        messages.append((envelope.wrap(note), {}))
        published.append(note["message_id"])
    rabbit.publish_raw(queue, queue, messages)
    config = ft.worker_config(
        tmp_path, queue, queue, routing_key=queue, roll_checker="count",
        roll_options={"roll_count": 5},
        callbacks={"gzip": {}, "swift": swift_options(
            swift_env, container, object_prefix="%Y/"), "delete": {}})
    proc = ft.run_worker(config, timeout=60)
    assert proc.returncode == 0, proc.log[-3000:]
    assert "Traceback" not in proc.log
    assert len(uploads(proc.log)) == len(POISONS)
    conn = _connection(swift_env)
    try:
        objects, ids, _ = swift_records(conn, container, tmp_path)
        assert objects == len(POISONS)
        assert set(ids) == set(published)
        for item in conn.get_container(container)[1]:
            head = conn.head_object(container, item["name"])
            for name, value in head.items():
                if name.startswith("x-object-meta-"):
                    assert len(value) <= 256 and value.isprintable()
    finally:
        conn.close()
    assert not os.listdir(tmp_path / "archive")


# -- a Swift that lies: the callback's own checks --------------------------

class LyingProxy:
    """An HTTP proxy in front of the real Swift that lies as told:
    ``put_etag`` (a wrong ETag in object PUT answers), ``head_etag`` (in
    HEAD answers), ``no_slo`` (HEAD answers without
    X-Static-Large-Object). v1 auth answers point the client at the
    proxy."""

    def __init__(self, auth_url):
        parsed = urllib.parse.urlsplit(auth_url)
        self.upstream = (parsed.hostname, parsed.port)
        self.lie = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                upstream = http.client.HTTPConnection(*proxy.upstream,
                                                      timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    out = response.getheaders()
                finally:
                    upstream.close()
                out = proxy.rewrite(self.command, self.path, out)
                self.send_response(response.status, response.reason)
                length = str(len(data))
                for name, value in out:
                    if name.lower() == "content-length" and \
                            self.command == "HEAD":
                        length = value  # of the object, not of no body
                    elif name.lower() not in ("connection", "content-length",
                                              "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.auth_url = self.url + parsed.path
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def rewrite(self, method, path, headers):
        out = []
        is_object = path.split("?")[0].count("/") >= 4  # /v1/a/c/o
        for name, value in headers:
            lower = name.lower()
            if lower == "x-storage-url":
                value = re.sub(r"^https?://[^/]+", self.url, value)
            elif lower == "etag" and is_object and (
                    (self.lie == "put_etag" and method == "PUT")
                    or (self.lie == "head_etag" and method == "HEAD")):
                value = "0" * 32
            elif (lower == "x-static-large-object" and method == "HEAD"
                  and self.lie == "no_slo"):
                continue
            out.append((name, value))
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lying(swift_env):
    proxy = LyingProxy(swift_env["ST_AUTH"])
    yield proxy
    proxy.close()


@pytest.mark.parametrize("lie, segment_size, error", [
    (None, "1G", None),
    (None, "16K", None),
    ("put_etag", "1G", r"PUT \S+ returned ETag 0{32}; MD5 of the"),
    ("put_etag", "16K", r"PUT \S+ returned ETag 0{32}; MD5 of the"),
    ("head_etag", "1G", r"HEAD \S+: \d+ bytes, ETag 0{32}; expected"),
    ("head_etag", "16K", r"HEAD \S+: \d+ bytes, ETag 0{32}; expected"),
    ("no_slo", "16K", r"HEAD \S+: not a Static Large Object"),
])
def test_a_swift_that_lies_fails_the_upload(swift_env, container, tmp_path,
                                            lying, lie, segment_size, error):
    path = write_archive(tmp_path / "x.events", 60, seed=3)
    lying.lie = lie
    callback = swift.SwiftUploadCallback(**dict(
        swift_options(swift_env, container, segment_size=segment_size),
        auth=lying.auth_url))
    try:
        if error is None:  # the proxy itself is no lie
            assert callback.on_close(path) == path
            return
        with pytest.raises(exceptions.UploadError, match=error):
            callback.on_close(path)
    finally:
        callback.close()
    assert os.path.exists(path)
