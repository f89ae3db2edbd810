"""A year of hourly archives in Swift: one id, and one hour, with period
bundles against the per-archive indexes and the single bundle.

ARCHIVES archives (default 8,760: a year of hourly rolls) of RECORDS
simulated nova notifications each (``tools.simulator``, one stream, each
archive's timestamps spread over its hour) are written as the worker
writes them (``bench/swift_select.write_archive``: its envelope, the
default ``index_fields``, gzip, the index carried beside the ``.gz``) and
uploaded with the real swift step (``SwiftUploadCallback.on_close``, with
``object_prefix = %Y/%m/%d/%H/``) to a fresh container of the Swift in
``ST_AUTH``/``ST_USER``/``ST_KEY``, ``--threads`` at a time. ``--keep``
keeps the container (its name is printed) and ``--container NAME`` uses a
kept one again, which is not rewritten when it holds ARCHIVES archives.

Then, in the same run, two reads are timed as a user runs them (a cold
``shoebox-worker cat`` process, start to exit) and counted in the proxy's
access log (``--proxy-log``: listings, GETs of archives, indexes and
bundles, their body bytes):

* ``cat --where payload.instance_id=ID swift://C`` of an id found in a few
  archives (the goal: <= 2 s, <= 50 GETs, <= 0.5 % of the archives'
  bytes), and
* ``cat --since H --until H+1h swift://C`` of one hour in the middle of
  the year (the goal: <= 2 s),

three ways: with the per-archive indexes alone (no bundle), with the
single bundle of ``index-bundle swift://C`` (made, timed, then deleted),
and with the period bundles of ``index-bundle --per month swift://C``
(made from nothing, timed, then run again to show that an unchanged
container costs a listing and a GET a period). Each read's output must
equal the others' (the same lines): pruning never changes the answer.
The bundles are deleted at the end (the archives too, unless ``--keep``).
Usage::

    source .swift-saio/saio.env
    nice .venv/bin/python bench/swift_year.py [--archives 8760]
        [--records 100] [--rounds 3] [--jobs 4] [--threads 6] [--keep]
        [--container NAME]
"""

import argparse
import collections
import concurrent.futures
import datetime
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from swiftclient import client as swc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import swift_select  # noqa: E402  (the archive writer, the proxy log)

from shoebox_worker.ship import swift as swift_step  # noqa: E402
from shoebox_worker.swift import layout  # noqa: E402
from shoebox_worker.tools import simulator  # noqa: E402

WORKER = swift_select.WORKER
#: The first hour of the archives (UTC).
HOUR0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
OBJECT_PREFIX = "%Y/%m/%d/%H/"
GOAL_SECONDS = 2.0
GOAL_GETS = 50
GOAL_BYTES = 0.005
#: Object metadata on the container saying how many archives of how many
#: records a run wrote (a kept container is used again when they match).
MARK = "x-container-meta-shoebox-bench-year"


def connect():
    env = os.environ
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1")


# -- writing the year ----------------------------------------------------

def hourly(args):
    """``(hour, notes)`` for each archive: one simulator stream cut into
    RECORDS notifications an hour, their timestamps spread over the hour
    (in order), and the ids they hold (``{instance id: {hours}}``)."""
    stream = simulator.notifications(args.archives * args.records, seed=23,
                                     start=HOUR0)
    rng = random.Random(23)
    step = 3600.0 / args.records
    for hour in range(args.archives):
        start = HOUR0 + datetime.timedelta(hours=hour)
        notes = []
        for i in range(args.records):
            note = next(stream)
            moment = start + datetime.timedelta(
                seconds=i * step + rng.random() * step * 0.9)
            note["timestamp"] = moment.strftime("%Y-%m-%d %H:%M:%S.%f")
            notes.append(note)
        yield hour, notes


def write_year(args, container, scratch):
    """Write and upload the archives; ``{instance id: hours holding it}``.
    """
    where = collections.defaultdict(set)
    todo = queue.Queue(maxsize=4 * args.threads)
    errors = []

    def upload():
        callback = swift_step.SwiftUploadCallback(
            auth=os.environ["ST_AUTH"], user=os.environ["ST_USER"],
            key=os.environ["ST_KEY"], container=container,
            object_prefix=OBJECT_PREFIX)
        try:
            while (job := todo.get()) is not None:
                path, report = job
                try:
                    callback.on_close(path, report=report)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                os.unlink(path)
                os.unlink(path + ".index")
        finally:
            callback.close()

    threads = [threading.Thread(target=upload, daemon=True)
               for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        for hour, notes in hourly(args):
            for note in notes:
                body = note.get("payload") or {}
                iid = body.get("instance_id") if isinstance(body, dict) \
                    else None
                if iid:
                    where[iid].add(hour)
            todo.put(swift_select.write_archive(
                notes, scratch, "shoebox_%05d.events" % hour))
            if errors:
                raise SystemExit("upload failed: %s" % errors[0])
            if hour % 500 == 499:
                print("  %d archives written (%.0f s)" % (
                    hour + 1, time.monotonic() - started), flush=True)
    finally:
        for _ in threads:
            todo.put(None)
        for thread in threads:
            thread.join()
    if errors:
        raise SystemExit("upload failed: %s" % errors[0])
    return where


def ids_of(args):
    """``{instance id: hours holding it}`` without writing (a kept
    container)."""
    where = collections.defaultdict(set)
    for hour, notes in hourly(args):
        for note in notes:
            body = note.get("payload") or {}
            iid = body.get("instance_id") if isinstance(body, dict) else None
            if iid:
                where[iid].add(hour)
    return where


def pick(where, wanted=(3, 2, 4, 5)):
    for count in wanted:
        found = sorted(i for i, hours in where.items() if len(hours) == count)
        if found:
            iid = found[len(found) // 2]
            return iid, sorted(where[iid])
    raise SystemExit("no instance id in %s archives" % (wanted,))


def prepared(args, conn, scratch):
    """The container to read (written unless a kept one fits), and
    ``{instance id: hours}``."""
    mark = "%d x %d" % (args.archives, args.records)
    if args.container:
        try:
            headers = conn.head_container(args.container)
        except swc.ClientException:
            headers = {}
        if headers.get(MARK) == mark:
            print("container %s: %s archives already there" % (
                args.container, mark))
            return args.container, ids_of(args)
    container = args.container or "bench-year-%s" % uuid.uuid4().hex[:10]
    print("writing %d archives of %d records into %s (%d threads)" % (
        args.archives, args.records, container, args.threads), flush=True)
    started = time.monotonic()
    where = write_year(args, container, scratch)
    conn.post_container(container, {MARK: mark})
    print("  written in %.0f s" % (time.monotonic() - started), flush=True)
    return container, where


# -- reading it back ------------------------------------------------------

def run(argv, capture=True):
    start = time.perf_counter()
    result = subprocess.run([WORKER] + argv, stdin=subprocess.DEVNULL,
                            capture_output=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("%s failed: %s" % (" ".join(argv),
                                            result.stderr.decode()[-2000:]))
    return elapsed, result.stdout, result.stderr


def measured(argv, log, container, rounds):
    """``(best seconds, first run's stdout, first run's counts)``."""
    log.mark()
    first, out, _ = run(argv)
    counts = log.since_mark({container})
    times = [first] + [run(argv)[0] for _ in range(rounds - 1)]
    return min(times), out, counts


def gets(counts):
    """Every GET: listings, archives, indexes, bundles."""
    return sum(n for kind, (n, _) in counts.items()
               if kind in ("get", "index", "bundle", "listing"))


def object_bytes(counts):
    """Body bytes of the objects GET (archives, indexes, bundles; not the
    listings, which are reported apart)."""
    return sum(size for kind, (_, size) in counts.items()
               if kind in ("get", "index", "bundle"))


def archives_bytes(conn, container):
    """Stored bytes of the archives (not indexes, not bundles)."""
    total = count = 0
    for entry in conn.get_container(container, full_listing=True)[1]:
        name = entry["name"]
        if name.endswith(".events.gz"):
            total += entry["bytes"]
            count += 1
    return total, count


def bundle_objects(conn, container):
    return [entry["name"] for entry in
            conn.get_container(container, full_listing=True)[1]
            if layout.is_bundle(entry["name"])]


def delete(conn, container, names, threads):
    local = threading.local()

    def one(name):
        c = getattr(local, "conn", None)
        if c is None:
            c = local.conn = connect()
        try:
            c.delete_object(container, name)
        except swc.ClientException:
            pass

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, names))


def report(label, seconds, counts, stored, goal=None):
    """One line; with ``goal`` (``where`` or ``hour``), the verdict."""
    line = "   %-24s %6.2f s, %5d GETs (%s), %9d B of objects = %.3f %%" % (
        label, seconds, gets(counts), swift_select.describe(counts),
        object_bytes(counts), 100 * object_bytes(counts) / stored)
    if goal == "where":
        ok = (seconds <= GOAL_SECONDS and gets(counts) <= GOAL_GETS
              and object_bytes(counts) <= GOAL_BYTES * stored)
        line += "  %s (<= %.0f s, <= %d GETs, <= %.1f %%)" % (
            "PASS" if ok else "MISS", GOAL_SECONDS, GOAL_GETS,
            100 * GOAL_BYTES)
    elif goal == "hour":
        line += "  %s (<= %.0f s)" % (
            "PASS" if seconds <= GOAL_SECONDS else "MISS", GOAL_SECONDS)
    print(line, flush=True)


def bench(args, log, conn, container, where):
    stored, count = archives_bytes(conn, container)
    iid, hours = pick(where)
    middle = HOUR0 + datetime.timedelta(hours=args.archives // 2)
    since = middle.strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (middle + datetime.timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    url = "swift://" + container
    jobs = ["--jobs", str(args.jobs)]
    queries = {
        "where": ["cat"] + jobs + ["--where", "payload.instance_id=" + iid,
                                   url],
        "hour": ["cat"] + jobs + ["--since", since, "--until", until,
                                  "--metadata", url],
    }
    print("%d archives of %d records, %.1f MB stored; --where "
          "payload.instance_id=%s (in the archives of hours %s); one hour: "
          "--since %s --until %s; best of %d, --jobs %d" % (
              count, args.records, stored / 1e6, iid,
              ", ".join(map(str, hours)), since, until, args.rounds,
              args.jobs), flush=True)
    leftovers = bundle_objects(conn, container)
    if leftovers:
        delete(conn, container, leftovers, args.threads)
    outputs = collections.defaultdict(dict)
    results = {}

    def read(way, rounds):
        for name, argv in queries.items():
            seconds, out, counts = measured(argv, log, container, rounds)
            outputs[name][way] = sorted(out.splitlines())
            results[(way, name)] = (seconds, counts)
            report("%s, %s:" % (way, name), seconds, counts, stored,
                   goal=name if way == "period bundles" else None)

    if not args.skip_baselines:
        print("1. the per-archive indexes alone (no bundle)", flush=True)
        read("indexes", 1 if args.archives > 2000 else args.rounds)

        print("2. the single bundle (index-bundle swift://C)", flush=True)
        made, out, _ = run(["index-bundle", "--jobs", str(args.jobs), url])
        print("   made in %.1f s: %s" % (made, out.decode().strip()),
              flush=True)
        read("single bundle", args.rounds)
        delete(conn, container, bundle_objects(conn, container),
               args.threads)

    print("3. period bundles (index-bundle --per month swift://C)",
          flush=True)
    log.mark()
    made, out, _ = run(["index-bundle", "--per", "month", "--jobs",
                        str(args.jobs), url])
    making = log.since_mark({container})
    print("   made from nothing in %.1f s (%s):\n     %s" % (
        made, swift_select.describe(making),
        out.decode().strip().replace("\n", "\n     ")), flush=True)
    log.mark()
    again, out, _ = run(["index-bundle", "--per", "month", "--jobs",
                         str(args.jobs), url])
    print("   run again, nothing changed: %.1f s (%s)" % (
        again, swift_select.describe(log.since_mark({container}))),
        flush=True)
    read("period bundles", args.rounds)

    if args.skip_baselines:
        return
    for name, by_way in outputs.items():
        first = by_way["indexes"]
        if not first:
            raise SystemExit("%s: no output at all" % name)
        for way, lines in by_way.items():
            if lines != first:
                raise SystemExit("%s: %d lines with %s, %d with the indexes "
                                 "alone" % (name, len(lines), way,
                                            len(first)))
        print("   %s: %d lines, the same each way" % (name, len(first)))
    for name in queries:
        base = results[("indexes", name)][0]
        single = results[("single bundle", name)][0]
        period = results[("period bundles", name)][0]
        print("   %s: period bundles %.1fx faster than the indexes alone, "
              "%.1fx than the single bundle" % (name, base / period,
                                                 single / period))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=int, default=8760)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=6,
                        help="uploads at a time (setup)")
    parser.add_argument("--proxy-log", default=swift_select.PROXY_LOG)
    parser.add_argument("--container",
                        help="a container kept by an earlier run (--keep)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the archives (the bundles are deleted)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="measure the period bundles alone")
    parser.add_argument("--write-only", action="store_true",
                        help="write the archives (with --keep) and stop")
    args = parser.parse_args(argv)
    swift_select.require_swift_env()
    log = swift_select.ProxyLog(args.proxy_log)
    scratch = tempfile.mkdtemp(prefix="bench-swift-year-")
    conn = connect()
    container = None
    try:
        container, where = prepared(args, conn, scratch)
        if not args.write_only:
            bench(args, log, conn, container, where)
    finally:
        if container is not None:
            if args.keep:
                delete(conn, container, bundle_objects(conn, container),
                       args.threads)
                print("kept: %s (--container %s)" % (container, container))
            else:
                swift_select.delete_containers(
                    [container, container + "_segments"], args.threads)
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
