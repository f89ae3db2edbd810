"""Selecting in Swift: what ``--since/--until`` and an indexed ``--where``
download, against reading every archive.

Archives of the project's simulator's nova notifications are written as
the worker writes them (its envelope, ``roll_manager`` with the default
``index_fields``, the index beside the archive), gzipped, the index moved
beside the ``.gz`` as the shipper carries it, and uploaded with the real
swift step (``SwiftUploadCallback.on_close(path, report=...)``: the same
object metadata, ``Earliest-``/``Latest-Timestamp``, and ``<object>.index``
as the worker's) to fresh containers of the Swift in ``ST_AUTH``/
``ST_USER``/``ST_KEY``. The requests and bytes are counted from the
proxy's access log (``--proxy-log``): object GETs (their body bytes),
index GETs, HEADs and listings apart. Two measurements, best of ROUNDS:

1. **One day out of DAYS days**: PER_DAY archives a day of RECORDS
   records, plus three archives of late records uploaded among those of
   later days (one within the day, one of the day before, one across the
   day's start). ``cat --since DAY --until DAY+1 swift://C`` against
   ``cat swift://C``: the bytes of the objects it GETs against all
   archives' bytes (the goal: <= 5 %) and the time ratio; its records
   (message ids) must be those of a local read of every archive filtered
   by the same window, the late ones among them.
2. **One instance id out of ARCHIVES archives**: one stream of
   ARCHIVES * RECORDS2 notifications cut into ARCHIVES archives, uploaded
   (``--threads`` at a time) to a container with their indexes and, the
   baseline, to one without (the same objects, every one read).
   ``cat --where payload.instance_id=ID`` of an id found in only a few
   archives: bytes against the baseline's (<= 5 %), and time (>= 10x
   faster); the two outputs must hold the same lines. Then the index
   GETs alone are timed (``--jobs`` at a time, as ``cat`` prunes): the
   floor of a read pruned by per-archive indexes. Last, ``index-bundle``
   puts the indexes into one object (timed apart: a cron job's work, not
   the reader's) and the same ``--where`` is measured again, against
   reading every archive: one bundle GET instead of ARCHIVES index GETs.

The containers are deleted at the end. Usage::

    source .swift-saio/saio.env
    nice .venv/bin/python bench/swift_select.py [--days 30] [--per-day 4]
        [--records 300] [--archives 1000] [--records2 80] [--rounds 3]
        [--jobs 4] [--threads 4] [--skip-day] [--skip-where]
"""

import argparse
import collections
import concurrent.futures
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import orjson
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import index
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker import timestamps
from shoebox_worker.consume import envelope
from shoebox_worker.ship import swift as swift_step
from shoebox_worker.swift import layout
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

BIN = os.path.dirname(sys.executable)
WORKER = os.path.join(BIN, "shoebox-worker")
PROXY_LOG = "/work/main/.swift-saio/log/proxy.log"
#: The first day of the archives (UTC).
DAY0 = datetime.datetime(2026, 10, 1, tzinfo=datetime.UTC)
GOAL_BYTES = 0.05
GOAL_SPEEDUP = 10.0


# -- making archives as the worker does ---------------------------------------

def write_archive(notes, directory, name):
    """``notes`` as one gzipped archive with its index, as the worker and
    its ``gzip`` step leave it: ``(path of the .gz, report)``."""
    unwrap = envelope.Unwrapper(index_fields=index.DEFAULT_FIELDS)
    manager = roll_manager.WritingRollManager(
        name, roll_checker.NeverRollChecker(), directory=directory,
        index_fields=index.DEFAULT_FIELDS)
    for note in notes:
        payload, metadata, values = unwrap(envelope.wrap(note), "q", "rk")
        manager.write(metadata, payload, values)
    report = manager.close()
    gz = compression.compress_file(report.filename,
                                   compression.get_codec("gzip"))
    os.unlink(report.filename)
    # the shipper carries the index to the step's output
    os.replace(index.sidecar(report.filename), index.sidecar(gz))
    return gz, report


def step(container):
    env = os.environ
    return swift_step.SwiftUploadCallback(
        auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
        container=container)


def upload(container, archives, threads=1):
    """Upload ``[(path, report)]`` with the swift step, in their order
    (``threads`` at a time: the listing's order then is nearly theirs)."""
    local = threading.local()
    steps = []
    lock = threading.Lock()

    def one(job):
        callback = getattr(local, "step", None)
        if callback is None:
            callback = local.step = step(container)
            with lock:
                steps.append(callback)
        path, report = job
        callback.on_close(path, report=report)

    try:
        if threads <= 1:
            for job in archives:
                one(job)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, archives))
    finally:
        for callback in steps:
            callback.close()


def local_records(paths):
    """``(metadata, payload)`` of every record of the local archives."""
    for path in paths:
        with archive.ArchiveReader(open(path, "rb"), name=path) as reader:
            yield from reader


# -- counting requests in the proxy's log -------------------------------------

class ProxyLog:
    """The requests the proxy logged for some containers since
    :meth:`mark`: ``{kind: [requests, bytes sent]}``, kinds ``get``
    (archives), ``index`` (``.index`` GETs), ``bundle`` (index bundle
    GETs, period bundle parts too), ``head``, ``listing``."""

    def __init__(self, path):
        self.path = path
        self.offset = 0

    def mark(self):
        self.offset = os.path.getsize(self.path)

    def _read(self, containers):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        counts = collections.defaultdict(lambda: [0, 0])
        for line in data.decode("utf-8", "replace").splitlines():
            fields = line.split()
            if len(fields) < 13 or fields[0] != "proxy-server:":
                continue
            if fields[1] == "-":
                continue  # the proxy's own subrequest (container info...)
            method, path = fields[4], urllib.parse.unquote(fields[5])
            parts = path.split("?")[0].split("/", 4)  # '', v1, acct, c, o
            if len(parts) < 4 or parts[3] not in containers:
                continue
            sent = int(fields[12]) if fields[12].isdigit() else 0
            if method == "HEAD":
                kind = "head"
            elif method != "GET":
                kind = method.lower()
            elif len(parts) == 4:
                kind = "listing"
            elif parts[4].endswith(index.SUFFIX):
                kind = "index"
            elif layout.is_bundle(parts[4]):
                kind = "bundle"  # a single bundle, or a period's part
            else:
                kind = "get"
            counts[kind][0] += 1
            counts[kind][1] += sent
        return counts

    def since_mark(self, containers, settle=0.3, wait=5.0):
        """The counts since :meth:`mark`, once the log stopped growing."""
        deadline = time.monotonic() + wait
        last = None
        while True:
            time.sleep(settle)
            counts = self._read(containers)
            frozen = {k: tuple(v) for k, v in counts.items()}
            if frozen == last or time.monotonic() > deadline:
                return counts
            last = frozen


def describe(counts):
    return ", ".join("%s %d (%d B)" % (kind, n, size) for kind, (n, size)
                     in sorted(counts.items()))


# -- running cat --------------------------------------------------------------

def cat(argv, capture=False):
    start = time.perf_counter()
    result = subprocess.run(
        [WORKER, "cat"] + argv, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("cat %s failed: %s" % (
            " ".join(argv), result.stderr.decode()[-2000:]))
    return elapsed, result.stdout


def measured(argv, log, containers):
    """One run of ``cat argv``: ``(seconds, stdout, request counts)``."""
    log.mark()
    seconds, out = cat(argv, capture=True)
    return seconds, out, log.since_mark(containers)


def best(argv, rounds):
    return min(cat(argv)[0] for _ in range(rounds))


# -- 1. one day out of many ---------------------------------------------------

def late_day(args):
    """The day among whose archives the late ones are uploaded."""
    return min(args.days - 1, args.days // 2 + 5)


def day_archives(args, directory):
    """The archives in write order: PER_DAY a day, and three late ones
    uploaded among later days' archives. ``(archives, target day)``."""
    target = DAY0 + datetime.timedelta(days=args.days // 2)
    slot = datetime.timedelta(hours=24 / args.per_day)
    late_at = late_day(args)
    late = [  # (start, records): within the day, the day before, across
        (target + datetime.timedelta(hours=3), args.records // 3),
        (target - datetime.timedelta(hours=12), args.records // 3),
        (target - datetime.timedelta(seconds=1), args.records // 3)]
    archives = []
    seed = 0
    for day in range(args.days):
        for k in range(args.per_day):
            start = DAY0 + datetime.timedelta(days=day) + k * slot + \
                datetime.timedelta(minutes=30)
            seed += 1
            notes = simulator.notifications(args.records, seed=seed,
                                            start=start)
            archives.append(write_archive(
                notes, directory, "day_%03d_%d.events" % (day, k)))
        if day == late_at:
            for n, (start, count) in enumerate(late):
                seed += 1
                notes = simulator.notifications(count, seed=seed,
                                                start=start)
                archives.append(write_archive(
                    notes, directory, "late_%03d_%d.events" % (day, n)))
    return archives, target


def bench_day(args, log, scratch, containers):
    directory = tempfile.mkdtemp(prefix="day-", dir=scratch)
    archives, target = day_archives(args, directory)
    container = "bench-select-day-%s" % uuid.uuid4().hex[:10]
    containers += [container, container + "_segments"]
    upload(container, archives)  # one at a time: write order is upload's
    paths = [path for path, _ in archives]
    stored = sum(os.path.getsize(p) for p in paths)
    indexes = sum(os.path.getsize(index.sidecar(p)) for p in paths)
    since = target.strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (target + datetime.timedelta(days=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")

    # the records a local read keeps, and the archives that hold them
    expected, holding = collections.Counter(), set()
    for path in paths:
        for metadata, _ in local_records([path]):
            when = timestamps.parse(metadata.get("timestamp"))
            if target <= when < target + datetime.timedelta(days=1):
                expected[metadata["message_id"]] += 1
                holding.add(os.path.basename(path))
    url = "swift://" + container
    window = ["--since", since, "--until", until]
    jobs = ["--jobs", str(args.jobs)]
    t_sel, out, sel = measured(jobs + window + ["--metadata", url], log,
                               {container})
    got = collections.Counter(orjson.loads(line)["metadata"]["message_id"]
                              for line in out.splitlines())
    if got != expected:
        raise SystemExit("cat --since/--until printed %d records, a local "
                         "read of the window holds %d" % (
                             sum(got.values()), sum(expected.values())))
    late_in = sorted(n for n in holding if n.startswith("late_"))
    if not any(n.startswith("late_%03d_0." % late_day(args)) for n in late_in):
        raise SystemExit("the late archive within the day holds no record "
                         "of it: %s" % late_in)
    _, _, full = measured(jobs + [url], log, {container})
    if full["get"][1] < stored:
        raise SystemExit("cat swift:// GET %d B of %d stored" % (
            full["get"][1], stored))
    b_full = best(jobs + [url], args.rounds)
    b_sel = best(jobs + window + [url], args.rounds)
    ratio = sel["get"][1] / stored
    print("1. one day out of %d: %d archives (%d late), %d records, "
          "%.2f MB stored, indexes %.1f KB; best of %d, --jobs %d" % (
              args.days, len(paths), 3, sum(r.records for _, r in archives),
              stored / 1e6, indexes / 1e3, args.rounds, args.jobs))
    print("   cat --since %s --until %s: %d records (= a local read of the "
          "window; late archives %s found)" % (
              since, until, sum(got.values()), ", ".join(late_in)))
    print("   requests, window: %s" % describe(sel))
    print("   requests, all:    %s" % describe(full))
    print("   archive bytes GET: %d of %d = %.2f %%  %s; with index GETs "
          "and HEADs: %.2f %%" % (
              sel["get"][1], stored, 100 * ratio,
              "PASS" if ratio <= GOAL_BYTES else "MISS",
              100 * (sel["get"][1] + sel["index"][1] + sel["head"][1])
              / stored))
    print("   time: all %.2f s, window %.2f s: %.1fx faster (first runs: "
          "window %.2f s)" % (b_full, b_sel, b_full / b_sel, t_sel))


# -- 2. one instance out of many ----------------------------------------------

def where_archives(args, directory):
    notes = simulator.notifications(args.archives * args.records2, seed=11,
                                    start=DAY0)
    archives = []
    for n in range(args.archives):
        chunk = [next(notes) for _ in range(args.records2)]
        archives.append(write_archive(chunk, directory,
                                      "where_%05d.events" % n))
    return archives


def pick_instance(paths, wanted=(2, 3, 4)):
    """An instance id found in few archives (the most common such count
    first), and the archives holding it."""
    where = collections.defaultdict(set)
    for path in paths:
        for _, payload in local_records([path]):
            note = orjson.loads(payload)
            body = note.get("payload") or {}
            iid = body.get("instance_id") if isinstance(body, dict) else None
            if iid:
                where[iid].add(os.path.basename(path))
    for count in wanted:
        found = sorted(i for i, names in where.items() if len(names) == count)
        if found:
            pick = found[len(found) // 2]
            return pick, sorted(where[pick])
    raise SystemExit("no instance id in %s archives" % (wanted,))


def bench_where(args, log, scratch, containers):
    directory = tempfile.mkdtemp(prefix="where-", dir=scratch)
    bare = tempfile.mkdtemp(prefix="bare-", dir=scratch)
    made = time.perf_counter()
    archives = where_archives(args, directory)
    paths = [path for path, _ in archives]
    # the baseline's objects: the same files, without their indexes
    plain = []
    for path, report in archives:
        link = os.path.join(bare, os.path.basename(path))
        os.link(path, link)
        plain.append((link, report))
    made = time.perf_counter() - made
    indexed = "bench-select-idx-%s" % uuid.uuid4().hex[:10]
    baseline = "bench-select-all-%s" % uuid.uuid4().hex[:10]
    containers += [indexed, indexed + "_segments", baseline,
                   baseline + "_segments"]
    up = time.perf_counter()
    upload(indexed, archives, args.threads)
    upload(baseline, plain, args.threads)
    up = time.perf_counter() - up
    stored = sum(os.path.getsize(p) for p in paths)
    indexes = sum(os.path.getsize(index.sidecar(p)) for p in paths)
    iid, holding = pick_instance(paths)
    where = ["--jobs", str(args.jobs), "--where",
             "payload.instance_id=" + iid]
    t_idx, out_idx, idx = measured(where + ["swift://" + indexed], log,
                                   {indexed})
    t_all, out_all, full = measured(where + ["swift://" + baseline], log,
                                    {baseline})
    lines_idx, lines_all = out_idx.splitlines(), out_all.splitlines()
    if not lines_all or sorted(lines_idx) != sorted(lines_all):
        raise SystemExit("cat --where printed %d lines with the index, %d "
                         "reading every archive" % (len(lines_idx),
                                                    len(lines_all)))
    b_all = best(where + ["swift://" + baseline], args.rounds)
    b_idx = best(where + ["swift://" + indexed], args.rounds)
    floor = min(index_gets(indexed, args.jobs) for _ in range(args.rounds))
    ratio = idx["get"][1] / full["get"][1]
    speedup = b_all / b_idx
    print("2. one instance id out of %d archives of %d records: %.2f MB "
          "stored, indexes %.1f KB (made in %.0f s, uploaded twice in "
          "%.0f s); best of %d, --jobs %d" % (
              args.archives, args.records2, stored / 1e6, indexes / 1e3,
              made, up, args.rounds, args.jobs))
    print("   --where payload.instance_id=%s: %d lines, in %d archives "
          "(%s); the same lines%s reading every archive" % (
              iid, len(lines_idx), len(holding), ", ".join(holding),
              "" if lines_idx == lines_all else " (order apart)"))
    print("   requests, index:      %s" % describe(idx))
    print("   requests, every one:  %s" % describe(full))
    print("   archive bytes GET: %d of %d = %.2f %%  %s; with index GETs: "
          "%.2f %%" % (
              idx["get"][1], full["get"][1], 100 * ratio,
              "PASS" if ratio <= GOAL_BYTES else "MISS",
              100 * (idx["get"][1] + idx["index"][1]) / full["get"][1]))
    print("   time: every archive %.2f s, with the index %.2f s: %.1fx "
          "faster  %s  (first runs %.2f s, %.2f s)" % (
              b_all, b_idx, speedup,
              "PASS" if speedup >= GOAL_SPEEDUP else "MISS", t_all, t_idx))
    print("   of which the %d index GETs alone (in this process, --jobs %d "
          "at a time): %.2f s, %.1f ms each" % (
              args.archives, args.jobs, floor, 1e3 * floor / args.archives))
    bundled = time.perf_counter()
    made = subprocess.run(
        [WORKER, "index-bundle", "--jobs", str(args.jobs),
         "swift://" + indexed], stdin=subprocess.DEVNULL,
        capture_output=True, text=True)
    bundled = time.perf_counter() - bundled
    if made.returncode != 0:
        raise SystemExit("index-bundle failed: %s" % made.stderr[-2000:])
    t_bun, out_bun, bun = measured(where + ["swift://" + indexed], log,
                                   {indexed})
    if sorted(out_bun.splitlines()) != sorted(lines_all):
        raise SystemExit("cat --where printed %d lines with the bundle, %d "
                         "reading every archive" % (
                             len(out_bun.splitlines()), len(lines_all)))
    b_bun = best(where + ["swift://" + indexed], args.rounds)
    speedup = b_all / b_bun
    print("   index-bundle (setup, once): %.2f s: %s" % (
        bundled, made.stdout.strip()))
    print("   requests, bundle:     %s" % describe(bun))
    print("   time: every archive %.2f s, with the bundle %.2f s: %.1fx "
          "faster  %s  (per-archive indexes: %.1fx; first run %.2f s)" % (
              b_all, b_bun, speedup,
              "PASS" if speedup >= GOAL_SPEEDUP else "MISS",
              b_all / b_idx, t_bun))


def index_gets(container, jobs):
    """Seconds to GET every archive's index, ``jobs`` at a time, as
    ``cat`` prunes (the listing left out)."""
    swift = sources.Swift()
    try:
        items = sources.find([sources.SCHEME + container], swift=swift)
        start = time.perf_counter()
        sources.keep_where(items, lambda item: item.read_index() is not None,
                           jobs)
        return time.perf_counter() - start
    finally:
        swift.close()


# -- cleaning up --------------------------------------------------------------

def delete_containers(containers, threads):
    env = os.environ

    def connect():
        return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                              key=env["ST_KEY"], auth_version="1")

    local = threading.local()

    def delete(pair):
        c = getattr(local, "conn", None)
        if c is None:
            c = local.conn = connect()
        try:
            c.delete_object(*pair)
        except swc.ClientException:
            pass

    conn = connect()
    try:
        for container in containers:
            try:
                listing = conn.get_container(container, full_listing=True)[1]
            except swc.ClientException:
                continue
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(delete, [(container, o["name"])
                                       for o in listing]))
            try:
                conn.delete_container(container)
            except swc.ClientException:
                pass
    finally:
        conn.close()


def require_swift_env():
    """Exit with one line unless ST_AUTH, ST_USER and ST_KEY are set."""
    missing = [v for v in ("ST_AUTH", "ST_USER", "ST_KEY")
               if not os.environ.get(v)]
    if missing:
        raise SystemExit("set %s (source .swift-saio/saio.env)"
                         % ", ".join(missing))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=4)
    parser.add_argument("--records", type=int, default=300,
                        help="records per archive of measurement 1")
    parser.add_argument("--archives", type=int, default=1000,
                        help="archives of measurement 2")
    parser.add_argument("--records2", type=int, default=80,
                        help="records per archive of measurement 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4,
                        help="uploads at a time (measurement 2's setup)")
    parser.add_argument("--proxy-log", default=PROXY_LOG)
    parser.add_argument("--skip-day", action="store_true")
    parser.add_argument("--skip-where", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the containers (named at the end)")
    args = parser.parse_args(argv)
    require_swift_env()
    log = ProxyLog(args.proxy_log)
    scratch = tempfile.mkdtemp(prefix="bench-swift-select-")
    containers = []
    try:
        if not args.skip_day:
            bench_day(args, log, scratch, containers)
        if not args.skip_where:
            bench_where(args, log, scratch, containers)
    finally:
        if args.keep:
            print("kept: %s" % " ".join(containers))
        else:
            delete_containers(containers, args.threads)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
