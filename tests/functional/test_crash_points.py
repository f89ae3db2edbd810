"""The real worker killed at every rename, unlink and fsync it makes.

For each chain (``gzip, swift, delete``; ``zstd, move`` to another file
system; ``zstd, sha256, move`` with the example plugin), a first run under
``strace`` counts the calls of each kind, then, for every K such a run
reaches, a run is killed with SIGKILL at its K-th call of that kind
(``strace -f -e inject=SYSCALLS:signal=KILL:when=K``), and the worker is
started again until idle. Then every published message must be in Swift
(or in the move destination), duplicates allowed and counted, and nothing
may be left in the working directory.

strace keeps one counter per thread: "the K-th call" is the K-th of
whichever thread reaches its K-th first. So K runs up to the largest count
of one thread in the counting run, and a run that exits without being
killed (its K-th call came in no thread this time) is counted as not
reached, and checked all the same.

Each chain is a test of its own (``-k zstd-move`` picks one), so that
pytest-xdist runs the three beside each other. Each point has its own
queue, working directory and object prefix, and several points of a chain
run at once (:data:`PARALLEL`).
"""

import collections
import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import kill_points
import pytest
from swiftclient import client as swc

from shoebox_worker import archive

pytestmark = pytest.mark.functional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
EXAMPLE_PLUGIN = os.path.join(ROOT, "examples", "shoebox-example-plugin")
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
#: The kinds of calls killed at, each with the system calls it counts.
KINDS = kill_points.KINDS
#: Messages per point, in archives of ROLL_COUNT (two archives).
MESSAGES = 6
ROLL_COUNT = 3
#: Points run at the same time.
PARALLEL = 4
IDLE_EXIT = 0.3
RUN_TIMEOUT = 120


def _swift(env):
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2,
                          timeout=30)


# -- one point ---------------------------------------------------------------

class Point:
    """One kill point: its queue, folders, config and outcome."""

    def __init__(self, base, chain, kind, k):
        self.chain, self.kind, self.k = chain, kind, k
        self.name = "%s-%s-%d" % (chain.name, kind, k)
        self.dir = os.path.join(base, self.name)
        self.work = os.path.join(self.dir, "work")
        self.dest = os.path.join(chain.dest_root, self.name)
        self.queue = "shoebox-ft-crash-%s-%s" % (self.name,
                                                 uuid.uuid4().hex[:6])
        self.prefix = self.name + "/"
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "worker.conf")
        with open(self.config, "w") as f:
            f.write(chain.config(self))
        self.killed = None
        self.published = []


def _config(point, callbacks, sections):
    text = """\
[broker]
url = amqp://guest:guest@127.0.0.1:5672//
connect_timeout = 5

[consumer:{queue}]
exchange = {queue}
routing_key = {queue}
durable = false

[archive]
working_directory = {work}
roll_checker = count
callbacks = {callbacks}
fsync_every = 1000
fsync_interval = 30
retry_initial = 0.1
retry_max = 0.5

[roll_checker:count]
roll_count = {roll}

[worker]
stats_interval = 0

[logging]
level = INFO
""".format(queue=point.queue, work=point.work, callbacks=callbacks,
           roll=ROLL_COUNT)
    return text + "".join(
        "\n[callback:%s]\n%s" % (name, "".join(
            "%s = %s\n" % item for item in options.items()))
        for name, options in sections.items())


def _run(argv, log_path, env):
    """Run ``argv``; its exit code, or "timed out" (then killed).

    It runs in a session of its own, killed whole on a timeout: killing
    strace alone would leave the worker it traces running, detached (seen
    here: orphaned workers kept uploading and slowed every later test).
    """
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: its group
            proc.wait()
            return "timed out"


def _worker_argv(point):
    return [WORKER, "run", "--config", point.config, "--idle-exit",
            str(IDLE_EXIT)]


def _env(point):
    return dict(point.chain.env, PYTHONDONTWRITEBYTECODE="1")


def count_calls(strace, point, ft):
    """Run the worker once under strace; ``{kind: the largest number of
    calls of that kind one thread made}``."""
    point.published = ft.publish(ft.AMQP_URL, MESSAGES, point.queue,
                                 point.queue, queue=point.queue, seed=1,
                                 durable=False)
    trace = os.path.join(point.dir, "trace")
    code = _run([strace, "-f", "-qq", "-o", trace,
                 "-e", "trace=" + ",".join(KINDS.values()),
                 *_worker_argv(point)], os.path.join(point.dir, "log"),
                _env(point))
    assert code == 0, open(os.path.join(point.dir, "log")).read()[-3000:]
    return kill_points.most_calls_per_thread(trace)


def run_point(strace, point, ft):
    """Publish, run killed at the point, run again until idle."""
    point.published = ft.publish(ft.AMQP_URL, MESSAGES, point.queue,
                                 point.queue, queue=point.queue,
                                 seed=point.k, durable=False)
    log = os.path.join(point.dir, "log")
    names = KINDS[point.kind]
    code = _run([strace, "-f", "-qq", "-o", os.devnull,
                 "-e", "trace=" + names,
                 "-e", "inject=%s:signal=KILL:when=%d" % (names, point.k),
                 *_worker_argv(point)], log, _env(point))
    point.killed = code != 0
    with open(log, "ab") as f:
        f.write(b"\n---- killed: %r (exit %r); restart ----\n"
                % (point.killed, code))
    point.restart = _run(_worker_argv(point), log, _env(point))
    return point


def _records(path):
    with archive.ArchiveReader(path) as reader:
        return [metadata["message_id"] for metadata, _ in reader]


# -- the chains ---------------------------------------------------------------

class SwiftChain:
    name = "gzip-swift-delete"
    env = os.environ

    def __init__(self, env, base):
        self.env = env
        self.container = "shoebox-crash-%s" % uuid.uuid4().hex[:10]
        self.dest_root = base

    def config(self, point):
        return _config(point, "gzip, swift, delete", {"swift": {
            "auth": self.env["ST_AUTH"], "user": self.env["ST_USER"],
            "key": self.env["ST_KEY"], "container": self.container,
            "object_prefix": point.prefix, "retries": 0, "timeout": 20}})

    def shipped(self, point, conn):
        ids = collections.Counter()
        objects = self.ft.swift_archives(conn, self.container,
                                          prefix=point.prefix)
        for obj in objects:
            _, body = conn.get_object(self.container, obj["name"])
            path = os.path.join(point.dir, "download")
            with open(path, "wb") as f:
                f.write(body)
            assert body[:2] == b"\x1f\x8b", obj["name"]
            ids.update(_records(path))
            _, data = conn.get_object(self.container, obj["name"] + ".index")
            with archive.ArchiveReader(path) as reader:
                self.ft.check_index(data, list(reader), obj["name"])
        return ids

    def cleanup(self, conn, ft):
        ft.delete_swift_container(conn, self.container)


class MoveChain:
    """``zstd, move``, to another file system (/dev/shm) when there is
    one: the copy, fsync, rename path of ``move``."""

    name = "zstd-move"
    callbacks = "zstd, move"
    env = os.environ

    def __init__(self, base):
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.stat(shm).st_dev != os.stat(base).st_dev:
            self.dest_root = tempfile.mkdtemp(prefix="shoebox-crash-",
                                              dir=shm)
        else:
            self.dest_root = os.path.join(base, "dest")

    def sections(self, point):
        return {"move": {"destination_folder": point.dest}}

    def config(self, point):
        return _config(point, self.callbacks, self.sections(point))

    def shipped(self, point, conn):
        ids = collections.Counter()
        names = sorted(os.listdir(point.dest)) if os.path.isdir(
            point.dest) else []
        for name in names:
            if name.endswith(".events.zst.index"):  # beside its archive
                with archive.ArchiveReader(os.path.join(
                        point.dest, name[:-len(".index")])) as reader:
                    self.ft.check_index(open(os.path.join(
                        point.dest, name), "rb").read(), list(reader), name)
                continue
            assert name.endswith(".events.zst") or self.sidecar(
                point, name), "%s left in %s" % (name, point.dest)
            if name.endswith(".events.zst"):
                ids.update(_records(os.path.join(point.dest, name)))
        return ids

    def sidecar(self, point, name):
        return False

    def cleanup(self, conn, ft):
        shutil.rmtree(self.dest_root, ignore_errors=True)


class PluginChain(MoveChain):
    """``zstd, sha256, move``: the example plugin writes its sidecar into
    the move destination."""

    name = "zstd-sha256-move"
    callbacks = "zstd, sha256, move"

    def __init__(self, base, env):
        super().__init__(base)
        self.env = env  # where the worker finds the plugin

    def sections(self, point):
        return {"sha256": {"folder": point.dest},
                "move": {"destination_folder": point.dest}}

    def sidecar(self, point, name):
        if not name.endswith(".zst.sha256"):
            return False
        archive_path = os.path.join(point.dest, name[:-len(".sha256")])
        with open(archive_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(point.dest, name)) as f:
            assert f.read() == "%s  %s\n" % (
                digest, os.path.basename(archive_path)), name
        return True


# -- the test -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("chain_name", ["gzip-swift-delete", "zstd-move",
                                        "zstd-sha256-move"])
def test_killed_at_every_rename_unlink_and_fsync(
        chain_name, strace, swift_env, rabbit, ft, tmp_path, request):
    started = time.monotonic()
    base = str(tmp_path)
    if chain_name == SwiftChain.name:
        chain = SwiftChain(swift_env, base)
    elif chain_name == MoveChain.name:
        chain = MoveChain(base)
    else:
        chain = PluginChain(base, request.getfixturevalue("example_plugin"))
    chain.ft = ft  # its index checks
    conn = _swift(swift_env)
    try:
        counting = Point(base, chain, "count", 0)
        rabbit.track_queue(counting.queue)
        rabbit.track_exchange(counting.queue)
        counts = count_calls(strace, counting, ft)
        check_point(chain, counting, conn)
        points = []
        for kind, count in counts.items():
            assert count > 0, (chain.name, kind, counts)
            for k in range(1, count + 1):
                point = Point(base, chain, kind, k)
                rabbit.track_queue(point.queue)
                rabbit.track_exchange(point.queue)
                points.append(point)
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            done = list(pool.map(lambda p: run_point(strace, p, ft), points))
        duplicates = 0
        failed = []
        for point in done:
            try:
                duplicates += check_point(chain, point, conn)
            except AssertionError as exc:
                failed.append("%s: %s" % (point.name, str(exc)[:2000]))
        assert not failed, "%d of %d point(s) failed:\n%s" % (
            len(failed), len(done), "\n\n".join(failed))
        killed = sum(1 for p in done if p.killed)
    finally:
        chain.cleanup(conn, ft)
        conn.close()
    print("\ncrash points of %s in %.0f s: %s calls (largest per thread); "
          "%d of %d points killed; %d duplicate record(s)" % (
              chain.name, time.monotonic() - started,
              ", ".join("%d %s" % (n, kind) for kind, n in counts.items()),
              killed, sum(counts.values()), duplicates))
    # the kills must land: a worker that is never killed proves nothing
    assert killed >= sum(counts.values()) // 2, (chain.name, killed)


def check_point(chain, point, conn):
    """Everything published is shipped, nothing is left behind.

    :returns: how many records were shipped more than once.
    """
    log = open(os.path.join(point.dir, "log"), errors="replace").read()
    where = "%s (log %s):\n%s" % (point.name, point.dir, log[-4000:])
    assert getattr(point, "restart", 0) == 0, "restart exit %r: %s" % (
        point.restart, where)
    left = sorted(os.listdir(point.work)) if os.path.isdir(
        point.work) else []
    assert left == [], "left in the working directory: %s; %s" % (left,
                                                                   where)
    ids = chain.shipped(point, conn)
    lost = set(point.published) - set(ids)
    assert not lost, "%d message(s) lost at %s" % (len(lost), where)
    assert "Traceback" not in log, where
    return sum(n - 1 for n in ids.values() if n > 1)
