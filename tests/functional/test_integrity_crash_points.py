"""The digest chain killed at every rename, unlink and fsync of its key and
digest path, and at every one of the recovery that follows (issue 22).

A crash at any point must leave a chain that still verifies and goes on,
or a clearly reported, signed restart: a new chain whose first digest
says why, signed with a key the old chain announced.

integrity_driver.py drives :class:`~shoebox_worker.integrity.chain.Chain`
as the shipper does, against the Swift all-in-one, the digests stored by
the real ``swift`` step (``put_digest``): a first run records two
archives (stored in the point's container beforehand) with a digest
between them and a final one at the close. A counting run under ``strace
-f -o TRACE`` gives the calls of each kind (:mod:`kill_points`); then, for
every K of every kind, the first run is killed with SIGKILL at its K-th
call of that kind (``strace -f -e inject=SYSCALLS:signal=KILL:when=K``),
and a restart opens the chain, records what the crash cut short, goes on
with one more archive and closes.

**A crash during recovery.** After each point killed at a rename (every
step of a digest ends with one, so these are the states between steps),
what the crash left is copied aside, and the recovery alone
(``Chain.open()``) is run on it under strace, counting its calls. Then,
for every K of every kind, the copy is put back, the recovery is killed
at its K-th call, and run again to its end: it must reach exactly the
state the uncut recovery reached (``chain.json``, the key, the files
left). The restart then goes on from the last of them.

Then :func:`~shoebox_worker.integrity.audit.audit` walks the container
with only keygen's public key pinned: no finding at all (no failure, no
archive pending or inserted), the three archives listed, the last chain
ended by the clean stop, and a signed restart only as an exception
(counted). Nothing may be left behind: no ``<key>.next`` or
``<key>.old``, nothing in ``.integrity/outgoing/``; the key on disk is the
one the chain announced last, and keygen's key (the test keeps another
name for it) is written over with zeros.

The driver runs in children of long-lived ``integrity_driver.py serve``
processes, one per thread, that strace attaches to (``-p``): an
interpreter and its imports at every run took most of the time. Each
point has its own container (deleted once checked), working directory
and key pair; :data:`PARALLEL` points run at a time.
"""

import concurrent.futures
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

import integrity_driver as driver
import kill_points
import pytest
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker.integrity import audit as audit_mod
from shoebox_worker.integrity import chain as chain_mod
from shoebox_worker.integrity import keys
from shoebox_worker.tools import sources

pytestmark = pytest.mark.functional

DRIVER = os.path.abspath(driver.__file__)
KINDS = kill_points.KINDS
#: The first run's kind whose points also crash the recovery after them.
NESTED_AFTER = "rename"
#: Points run at the same time.
PARALLEL = 4
RUN_TIMEOUT = 60


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """The archives every point stores: ``{name: what the swift step's
    Stored says of it}``, also written as JSON to ``["-"]["file"]`` for
    the driver."""
    folder = str(tmp_path_factory.mktemp("integrity-archives"))
    stored = {}
    for n, name in enumerate(driver.FIRST + driver.SECOND):
        path = os.path.join(folder, name)
        writer = archive.ArchiveWriter(path)
        for i in range(3):
            writer.write({"timestamp": "2026-01-0%d 00:00:0%d.000000"
                          % (n + 1, i), "event_type": "crash.test"},
                         b'{"n": %d, "i": %d}' % (n, i))
        writer.close()
        with open(path, "rb") as f:
            data = f.read()
        stored[name] = {"path": path, "name": name, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "etag": hashlib.md5(data).hexdigest()}
    manifest = os.path.join(folder, "stored.json")
    with open(manifest, "w") as f:
        json.dump(stored, f)
    return dict(stored, **{"-": {"file": manifest}})


def _swift(env):
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2,
                          timeout=30)


def _store_archives(conn, point, archives):
    """Put the archives in the point's container as the swift step leaves
    them (with their SHA-256 in the metadata)."""
    conn.put_container(point.container)
    for name in driver.FIRST + driver.SECOND:
        item = archives[name]
        with open(item["path"], "rb") as f:
            etag = conn.put_object(point.container, name, f.read(), headers={
                "X-Object-Meta-Sha256": item["sha256"]})
        assert etag == item["etag"], name


def _delete_container(conn, container, ft):
    """Delete the container's objects (one bulk delete), then the
    container; missing: fine."""
    try:
        listing = conn.get_container(container, full_listing=True)[1]
    except swc.ClientException as exc:
        if exc.http_status == 404:
            return
        raise
    if listing:
        body = "\n".join(urllib.parse.quote("/%s/%s" % (container, e["name"]))
                         for e in listing)
        _, answer = conn.post_account(
            headers={"Accept": "application/json",
                     "Content-Type": "text/plain"},
            data=body, query_string="bulk-delete")
        answer = json.loads(answer)
        if answer.get("Errors") or not answer.get(
                "Response Status", "").startswith("200"):
            ft.delete_swift_container(conn, container)  # one by one
            return
    try:
        conn.delete_container(container)
    except swc.ClientException as exc:
        if exc.http_status != 404:
            raise


class Point:
    """One kill point: its folders, key pair, container and outcome."""

    def __init__(self, base, kind, k):
        self.kind, self.k = kind, k
        self.name = "%s-%d" % (kind, k)
        self.dir = os.path.join(base, self.name)
        self.work = os.path.join(self.dir, "work")
        self.progress = os.path.join(self.dir, "progress")
        self.log = os.path.join(self.dir, "log")
        self.container = "shoebox-integrity-crash-%s" % uuid.uuid4().hex[:12]
        self.key, self.pub = keys.keygen(os.path.join(self.dir, "key"))
        self.pinned = keys.public_text(keys.load_public(self.pub))
        #: another name for keygen's key file, to see its bytes after
        #: the chain replaced it (None: not followed)
        self.original = os.path.join(self.dir, "original.key")
        os.link(self.key, self.original)
        self.killed = None
        self.again = None
        self.failure = None
        self.recovery = {}    # {kind: calls of the recovery after it}
        self.nested = 0       # recoveries killed
        self.restarts = 0     # chains after the first
        self.digests = 0

    def args(self, phase, archives):
        return [phase, self.work, self.key, self.container,
                archives["-"]["file"], self.progress]


class Server:
    """An ``integrity_driver.py serve``: runs the driver in a child it
    forks, that strace can attach to (no interpreter start, no imports
    at every run: most of a run's time, and most of the CPU, otherwise)."""

    def __init__(self, env, log):
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, DRIVER, "serve"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=out, env=env, text=True,
                start_new_session=True)
        self.log = log

    def run(self, point, args, strace=None):
        """Run the driver with ``args`` (its output to the point's log),
        under ``strace`` (argv, attached with ``-p``) if given; its exit
        code (negative: killed by that signal), or "timed out"."""
        with open(point.log, "a") as log:
            log.write("\n---- %s%s ----\n" % (args[0], "".join(
                " " + a for a in strace or () if a.startswith("inject="))))
        self.proc.stdin.write(json.dumps({
            "args": args, "log": point.log,
            "traced": strace is not None}) + "\n")
        self.proc.stdin.flush()
        pid = self._answer()
        tracer = None
        if strace is not None:
            tracer = subprocess.Popen(
                [*strace, "-p", str(pid)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        fired = []

        def kill():
            fired.append(True)
            for target in (pid, tracer and tracer.pid):
                if target:
                    try:
                        os.kill(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        timer = threading.Timer(RUN_TIMEOUT, kill)
        timer.start()
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            code = self._answer()
            if tracer is not None:
                tracer.wait()  # the trace is whole
        finally:
            timer.cancel()
        return "timed out" if fired else code

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            with open(self.log, errors="replace") as f:
                raise AssertionError("the driver server died:\n"
                                     + f.read()[-3000:])
        return int(line)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _strace(strace, kind=None, k=None, trace=os.devnull):
    """strace's argv (but ``-p``): counting every kind into ``trace``,
    or killing at the ``k``-th call of ``kind``; and ``getppid()``
    answering :data:`integrity_driver.TRACED_PPID`, which the child waits
    for (strace intercepts its calls from then on)."""
    names = ",".join(KINDS.values()) if kind is None else KINDS[kind]
    argv = [strace, "-f", "-qq", "-o", trace,
            "-e", "trace=%s,getppid" % names,
            "-e", "inject=getppid:retval=%d" % driver.TRACED_PPID]
    if kind is not None:
        argv += ["-e", "inject=%s:signal=KILL:when=%d" % (names, k)]
    return argv


def _counted(server, strace, point, args, name):
    """Run the driver under strace; ``{kind: calls of one thread}``."""
    trace = os.path.join(point.dir, name)
    code = server.run(point, args, _strace(strace, trace=trace))
    assert code == 0, "counting run: exit %r; %s" % (code, _tail(point))
    return kill_points.most_calls_per_thread(trace)


def run_point(servers, strace, point, archives, env, ft):
    """Killed at the point, (the recovery killed at each of its calls,)
    then the restart that goes on; checked, and its container deleted.

    :returns: the point, with ``failure`` None or what went wrong.
    """
    server = servers.get()
    conn = _swift(env)
    try:
        _store_archives(conn, point, archives)
        code = server.run(point, point.args("first", archives),
                          _strace(strace, point.kind, point.k))
        point.killed = code != 0
        if point.killed and point.kind == NESTED_AFTER:
            _crash_recovery(server, strace, point, archives)
        point.again = server.run(point, point.args("again", archives))
        check_point(point, conn)
    except Exception as exc:  # the point failed; the others go on
        point.failure = "".join(traceback.format_exception_only(exc))[:3000]
    finally:
        servers.put(server)
        _delete_container(conn, point.container, ft)
        conn.close()
    return point


def _local(point):
    """What the chain keeps on disk: its state, the public key of the key
    file, and the names of the files of ``.integrity/`` and the key's
    folder."""
    root = os.path.join(point.work, chain_mod.STATE_DIR)
    try:
        with open(os.path.join(root, chain_mod.STATE_FILE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = None
    found = []
    for folder in (root, os.path.dirname(point.key)):
        for top, _, names in os.walk(folder):
            found.extend(os.path.relpath(os.path.join(top, name), point.dir)
                         for name in names)
    return {"state": state, "key": keys.public_text(keys.load_private(
        point.key)), "files": sorted(found)}


def _crash_recovery(server, strace, point, archives):
    """The recovery of what the crash left, killed at each of its calls
    in turn (from a copy of what the crash left each time), then run to
    its end: the same state as the recovery never killed."""
    if os.path.samefile(point.original, point.key):
        point.original = None  # from here on, the key files are copies
    saved = {path: os.path.join(point.dir, "crashed", name)
             for name, path in (("work", point.work),
                                ("key", os.path.dirname(point.key)))}
    for path, copy in saved.items():
        shutil.copytree(path, copy, symlinks=True)
    crashed = _local(point)["state"]
    open_args = point.args("open", archives)
    point.recovery = _counted(server, strace, point, open_args, "trace-open")
    reference = _local(point)
    for kind, count in point.recovery.items():
        for k in range(1, count + 1):
            for path, copy in saved.items():
                shutil.rmtree(path)
                shutil.copytree(copy, path, symlinks=True)
            code = server.run(point, open_args, _strace(strace, kind, k))
            point.nested += code != 0
            code = server.run(point, open_args)
            assert code == 0, "recovery after a recovery killed at %s %d: " \
                "exit %r; %s" % (kind, k, code, _tail(point))
            got = _local(point)
            if crashed is None:  # each started a chain of its own
                for state in (got["state"], reference["state"]):
                    for field in ("chain", "created"):
                        state.pop(field, None)
            assert got == reference, "recovery killed at %s %d, then run " \
                "again: %s; never killed: %s; %s" % (
                    kind, k, got, reference, _tail(point))


def _tail(point, chars=4000):
    with open(point.log, errors="replace") as f:
        return "%s (%s):\n%s" % (point.name, point.dir, f.read()[-chars:])


def check_point(point, conn):
    """The chain verifies and went on; nothing is left behind."""
    assert point.again == 0, "restart: %r; %s" % (point.again, _tail(point))
    listing = conn.get_container(point.container, full_listing=True)[1]

    def get(name):
        return conn.get_object(point.container, name)[1]

    def head(name):
        try:
            return conn.head_object(point.container, name)
        except swc.ClientException as exc:
            if exc.http_status == 404:
                return None
            raise

    # jobs=1: one swiftclient connection serves one request at a time
    result = audit_mod.audit(listing, get, head, [point.pinned], jobs=1,
                             is_archive=sources.is_archive_entry)
    where = "\n".join([f.line() for f in result.findings]
                      + [json.dumps(c, sort_keys=True)
                         for c in result.chains]) + "\n" + _tail(point)
    assert not result.findings, where
    names = driver.FIRST + driver.SECOND
    stored = sorted(e["name"] for e in listing
                    if sources.is_archive_entry(e)
                    and not e["name"].startswith("_digests/"))
    assert stored == sorted(names), where
    assert result.archives == len(names), where
    chains = result.chains
    assert chains and all(c["first_seq"] == 0 for c in chains), where
    assert all(c["start"] for c in chains), where  # each says why
    last = max(chains, key=lambda c: c["last_digest"])
    assert last["final"], where  # the restart's clean stop ended it
    point.restarts = len(chains) - 1
    point.digests = result.digests
    # nothing left behind, and the key on disk is the one announced last
    for suffix in (keys.NEXT_SUFFIX, keys.OLD_SUFFIX):
        assert not os.path.lexists(point.key + suffix), where
    outgoing = os.path.join(point.work, chain_mod.STATE_DIR,
                            chain_mod.OUTGOING)
    assert os.listdir(outgoing) == [], where
    local = _local(point)
    assert local["state"]["pending"] == [], where
    assert local["key"] == local["state"]["key"], where
    assert local["state"]["chain"] == last["chain"], where
    # keygen's key was replaced, and its bytes written over
    if point.original is not None:
        with open(point.original, "rb") as f:
            left = f.read()
        assert left and not left.strip(b"\0"), \
            "keygen's key, replaced, still holds its bytes: %s" % where


@pytest.mark.slow
def test_chain_killed_at_every_rename_unlink_and_fsync(
        strace, swift_env, archives, ft, tmp_path):
    started = time.monotonic()
    base = str(tmp_path)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **swift_env)
    conn = _swift(swift_env)
    try:  # one login for every run
        env["SHOEBOX_TEST_STORAGE_URL"], env["SHOEBOX_TEST_AUTH_TOKEN"] = \
            conn.get_auth()
    finally:
        conn.close()
    counting = Point(base, "count", 0)
    servers = queue.Queue()
    for n in range(PARALLEL):
        servers.put(Server(env, os.path.join(base, "server-%d.log" % n)))
    try:
        server = servers.get()
        servers.put(server)
        conn = _swift(swift_env)
        try:
            _store_archives(conn, counting, archives)
            counts = _counted(server, strace, counting,
                              counting.args("first", archives), "trace")
            counting.again = server.run(counting,
                                        counting.args("again", archives))
            check_point(counting, conn)
            assert counting.restarts == 0, _tail(counting)
        finally:
            _delete_container(conn, counting.container, ft)
            conn.close()
        for kind, count in counts.items():
            assert count > 0, (kind, counts)
        points = [Point(base, kind, k) for kind, count in counts.items()
                  for k in range(1, count + 1)]
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            done = list(pool.map(lambda p: run_point(
                servers, strace, p, archives, swift_env, ft), points))
    finally:
        while not servers.empty():
            servers.get().close()
    failed = ["%s: %s" % (p.name, p.failure) for p in done if p.failure]
    assert not failed, "%d of %d point(s) failed:\n%s" % (
        len(failed), len(done), "\n\n".join(failed))
    killed = {kind: sum(1 for p in done if p.kind == kind and p.killed)
              for kind in KINDS}
    recovery = {kind: sum(p.recovery.get(kind, 0) for p in done)
                for kind in KINDS}
    restarts = [p.name for p in done if p.restarts]
    print("\nintegrity crash points in %.0f s: %s (largest per thread); "
          "killed: %s; the recoveries after the %d %s points: %s calls, "
          "killed at %d; signed restarts: %d %s" % (
              time.monotonic() - started,
              ", ".join("%d %s" % (n, kind) for kind, n in counts.items()),
              ", ".join("%d %s" % (n, kind) for kind, n in killed.items()),
              killed[NESTED_AFTER], NESTED_AFTER,
              ", ".join("%d %s" % (n, kind) for kind, n in recovery.items()),
              sum(p.nested for p in done), len(restarts), restarts))
    # the kills must land: a run that is never killed proves nothing (the
    # runs make the same calls, but for a request Swift fails: one spared)
    for kind, count in counts.items():
        assert killed[kind] >= count - 1, (kind, killed, counts)
    assert recovery["fsync"] and recovery["rename"], recovery
    assert sum(p.nested for p in done) >= sum(recovery.values()) * 0.9, \
        [(p.name, p.recovery, p.nested) for p in done]
    # a restart is the exception, never the rule
    assert len(restarts) <= len(done) // 10, restarts
