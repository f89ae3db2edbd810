"""``verify --chain`` over a container of ARCHIVES archives: its wall time
and the share of the archives' bytes it reads (issue 22: under 30 s and
under 2 % for 1,000 archives against the all-in-one).

Setup (timed, printed, not the measure): a fresh container of the Swift
in ``ST_AUTH``/``ST_USER``/``ST_KEY`` gets ARCHIVES real archives
(``ArchiveWriter``, RECORDS of the simulator's nova notifications each
with the worker's metadata keys: a few hundred KB; gzipped as the
``gzip`` step would with ``--gzip``), named as the worker names them
(``_<run token>-<sequence>``), each uploaded by
``SwiftUploadCallback.on_close(path, report=...)`` (``--upload-jobs`` at a
time, one callback per thread). The ``Stored`` each returns is recorded,
in order, by a :class:`shoebox_worker.integrity.chain.Chain` whose store
is such a callback and whose key is a fresh ``keygen``; its clock is
moved on by ``digest_interval`` every PER_DIGEST archives and ticked,
so a digest lists every PER_DIGEST archives, and ``close()`` puts the
final one, as a worker's clean stop does. The mean time of ``record()``
and of a tick that makes a digest are printed with the setup.

Measured: ``shoebox-worker verify --chain --json --public-key
KEYDIR/signing.pub swift://CONTAINER`` (the console script, ST_* in its
environment), whole process, wall clock; then the same with ``--deep``
(every archive read and hashed) for comparison; ROUNDS of each,
interleaved, medians printed with the bytes it read (``bytes_read``,
``read_percent`` of its JSON) and whether it said OK. The container (and
its ``_segments``) is deleted at the end unless ``--keep``.

Seen on the 2-core dev VM (Swift all-in-one on the same cores), 1,000
archives, 21 digests: 324 KB archives, ``verify --chain`` 2.18 s reading
0.106 %, ``--deep`` 5.19 s; gzipped (30 KB each), 2.54 s reading 1.139 %.
The digests hold ~350 bytes per archive listed, so the share read is
about 350 bytes / the archives' mean size: over 2 % for archives under
~18 KB. The plain walk's time is its one HEAD per archive (``--jobs`` at
a time: 3.45 s of a 3.9 s profile under load); ``Chain.record()`` costs
~0.6 ms alone and ~5-7 ms here, with four uploads writing the same disk
(its two fsyncs and a rename).

Needs ST_AUTH, ST_USER and ST_KEY (``eval "$(cat /tmp/saio.env)"`` or
``env="$(scripts/swift-saio start)" && eval "$env"``). Usage::

    .venv/bin/python bench/verify_chain.py [--archives 1000]
        [--records 100] [--per-digest 50] [--rounds 3] [--gzip]
        [--upload-jobs 4] [--verify-jobs N] [--keep]
"""

import argparse
import collections
import concurrent.futures
import datetime
import json
import logging
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker.integrity import chain as chain_mod
from shoebox_worker.integrity import keys
from shoebox_worker.ship import swift
from shoebox_worker.tools import simulator

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
GOAL_SECONDS = 30.0
GOAL_PERCENT = 2.0
#: The chain's digest_interval; the bench's clock moves by it.
INTERVAL = 300
ENV = ("ST_AUTH", "ST_USER", "ST_KEY")


class FakeClock:
    """The chain's monotonic clock: moved on by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def callback_factory(env, container):
    local = threading.local()
    made = []

    def callback():
        cb = getattr(local, "cb", None)
        if cb is None:
            cb = local.cb = swift.SwiftUploadCallback(
                auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
                container=container, object_prefix="%Y/%m/%d/")
            made.append(cb)
        return cb
    return callback, made


def records(count, per_archive):
    """Lists of ``per_archive`` (metadata, payload) pairs, ``count`` of
    them, the simulator's stream cut in pieces."""
    source = simulator.notifications(
        count * per_archive, seed=22, start=datetime.datetime(2026, 1, 1))
    batch = []
    for n in source:
        metadata = {
            "event_type": n["event_type"], "message_id": n["message_id"],
            "timestamp": n["timestamp"], "publisher_id": n["publisher_id"],
            "priority": n["priority"],
            "request_id": n.get("_context_request_id", ""),
            "queue": "notifications.info",
            "routing_key": "notifications.info"}
        batch.append((metadata, json.dumps(n)))
        if len(batch) == per_archive:
            yield batch
            batch = []


def make_and_upload(callback, directory, token, number, batch, gzip):
    """Write archive ``number``, upload it; ``(Stored, report, origin,
    seconds of the upload)``."""
    origin = os.path.join(directory, "shoebox_20260101T000000_bench_%s-%d"
                          ".events" % (token, number))
    with archive.ArchiveWriter(origin) as writer:
        for metadata, payload in batch:
            writer.write(metadata, payload)
    report = writer.report()
    path = origin
    if gzip:
        path = compression.compress_file(origin,
                                         compression.get_codec("gzip"))
        os.unlink(origin)
    started = time.perf_counter()
    stored = callback().on_close(path, report=report)
    seconds = time.perf_counter() - started
    os.unlink(path)
    return stored, report, origin, seconds


def fill(args, env, container, workdir, keydir):
    """The container's archives and digests; prints the setup's times."""
    callback, made = callback_factory(env, container)
    clock = FakeClock()
    store = swift.SwiftUploadCallback(
        auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
        container=container)
    made.append(store)
    chain = chain_mod.Chain(
        directory=os.path.join(workdir, "worker"),
        signing_key=os.path.join(keydir, keys.PRIVATE_NAME), store=store,
        interval=INTERVAL, host="bench-host", monotonic=clock)
    os.makedirs(chain.directory)
    chain.open()
    spool = os.path.join(workdir, "spool")
    os.makedirs(spool)
    token = secrets.token_hex(6)
    started = time.perf_counter()
    recording, ticking, uploads, size = [], [], [], 0
    with concurrent.futures.ThreadPoolExecutor(args.upload_jobs) as pool:
        batches = enumerate(records(args.archives, args.records))
        waiting = collections.deque()
        for number in range(1, args.archives + 1):
            # a few archives ahead of the one recorded, not all of them
            while len(waiting) < 2 * args.upload_jobs:
                nxt = next(batches, None)
                if nxt is None:
                    break
                waiting.append(pool.submit(make_and_upload, callback, spool,
                                           token, nxt[0], nxt[1], args.gzip))
            stored, report, origin, seconds = waiting.popleft().result()
            uploads.append(seconds)
            size += stored.size
            t = time.perf_counter()
            chain.record(stored, report, origin)
            recording.append(time.perf_counter() - t)
            if number % args.per_digest == 0:
                clock.now += INTERVAL
                t = time.perf_counter()
                chain.tick()
                ticking.append(time.perf_counter() - t)
    chain.close()  # the final digest, when archives are pending
    elapsed = time.perf_counter() - started
    for cb in made:
        cb.close()
    print("setup: %d archives, %d bytes (%.0f KB each%s), uploaded in "
          "%.1f s (%d at a time; on_close median %.0f ms)"
          % (args.archives, size, size / args.archives / 1024,
             ", gzipped" if args.gzip else "", elapsed, args.upload_jobs,
             1000 * statistics.median(uploads)))
    print("       Chain.record(): mean %.1f ms, max %.1f ms;  a digest "
          "(a tick that signs and puts one): mean %.1f ms"
          % (1000 * statistics.mean(recording), 1000 * max(recording),
             1000 * statistics.mean(ticking) if ticking else 0.0))
    return size


def verify(env, keydir, container, deep, jobs):
    """``(wall seconds, its JSON)``."""
    cmd = [WORKER, "verify", "--chain", "--json", "--public-key",
           os.path.join(keydir, keys.PUBLIC_NAME)]
    if deep:
        cmd.append("--deep")
    if jobs:
        cmd += ["--jobs", str(jobs)]
    cmd.append("swift://%s" % container)
    environ = dict(os.environ, **env)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError("%s exited %d: %s" % (" ".join(cmd),
                                                 done.returncode,
                                                 done.stderr.strip()))
    return seconds, json.loads(done.stdout)


def delete_container(env, container):
    conn = swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2)
    local = threading.local()

    def connection():
        if getattr(local, "conn", None) is None:
            local.conn = swc.Connection(
                authurl=env["ST_AUTH"], user=env["ST_USER"],
                key=env["ST_KEY"], auth_version="1", retries=2)
        return local.conn

    for name in (container, container + "_segments"):
        try:
            objects = conn.get_container(name, full_listing=True)[1]
        except swc.ClientException as exc:
            if exc.http_status == 404:
                continue
            raise
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda o, n=name: connection().delete_object(
                n, o["name"]), objects))
        conn.delete_container(name)
    conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=int, default=1000)
    parser.add_argument("--records", type=int, default=100,
                        help="notifications per archive (100: ~300 KB)")
    parser.add_argument("--per-digest", type=int, default=50,
                        help="archives listed per digest")
    parser.add_argument("--gzip", action="store_true",
                        help="upload them gzipped (as gzip, swift, delete)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each verify, interleaved")
    parser.add_argument("--upload-jobs", type=int, default=4)
    parser.add_argument("--verify-jobs", type=int, default=0,
                        help="verify's --jobs (default: its own)")
    parser.add_argument("--no-deep", action="store_true",
                        help="skip the --deep comparison")
    parser.add_argument("--keep", action="store_true",
                        help="keep the container (its name is printed)")
    args = parser.parse_args(argv)
    missing = [n for n in ENV if not os.environ.get(n)]
    if missing:
        sys.exit("%s not set: eval \"$(cat /tmp/saio.env)\"" % ", ".join(
            missing))
    env = {n: os.environ[n] for n in ENV}
    logging.basicConfig(level=logging.ERROR)  # not "a new chain starts"
    container = "bench-chain-%s" % uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-chain-")
    keydir = os.path.join(workdir, "keys")
    keys.keygen(keydir)
    print("%d archives of %d records, a digest every %d, container %s, "
          "swift %s" % (args.archives, args.records, args.per_digest,
                        container, env["ST_AUTH"]))
    sys.stdout.flush()
    kinds = ["verify --chain"] + ([] if args.no_deep else
                                  ["verify --chain --deep"])
    times = {kind: [] for kind in kinds}
    results = {}
    try:
        fill(args, env, container, workdir, keydir)
        sys.stdout.flush()
        for _ in range(args.rounds):
            for kind in kinds:
                seconds, result = verify(env, keydir, container,
                                         "--deep" in kind, args.verify_jobs)
                times[kind].append(seconds)
                results[kind] = result
    finally:
        if args.keep:
            print("kept: container %s, public key %s" % (
                container, os.path.join(keydir, keys.PUBLIC_NAME)))
        else:
            delete_container(env, container)
            shutil.rmtree(workdir, ignore_errors=True)
    print("%-24s %9s %9s %14s %9s  %s" % ("", "median s", "min s",
                                         "bytes read", "% read", "result"))
    for kind in kinds:
        r = results[kind]
        print("%-24s %9.2f %9.2f %14d %8.3f%%  %s (%d chain(s), %d digests,"
              " %d archives, %d finding(s))" % (
                  kind, statistics.median(times[kind]), min(times[kind]),
                  r["bytes_read"], r["read_percent"],
                  "OK" if r["ok"] else "FAILED", len(r["chains"]),
                  r["digests"], r["archives"], len(r["findings"])))
    plain = statistics.median(times["verify --chain"])
    share = results["verify --chain"]["read_percent"]
    if "verify --chain --deep" in times:
        print("--deep / plain: %.1fx the time" % (
            statistics.median(times["verify --chain --deep"]) / plain))
    met = plain < GOAL_SECONDS and share < GOAL_PERCENT and \
        results["verify --chain"]["ok"]
    print("goal (%d archives): < %.0f s and < %.0f %% read: %.2f s, %.3f %%"
          "  %s" % (args.archives, GOAL_SECONDS, GOAL_PERCENT, plain, share,
                    "PASS" if met else "MISS"))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
