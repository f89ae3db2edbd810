"""Peak memory of a pruned read from Swift beside large index bundles.

Two containers of the Swift in ``ST_AUTH``/``ST_USER``/``ST_KEY``, their
archives written and uploaded as the worker does (``swift_select``'s
``write_archive`` and ``upload``: the real swift step, with each archive's
``<object>.index`` and time metadata), and BUNDLES index bundles of
BUNDLE_MIB MiB each beside them: the first holds the real indexes of every
archive listed, and all of them hold, to fill their size, the indexes of
archives no longer listed (expired ones, as an old bundle keeps them):

1. **small**: one archive of RECORDS records;
2. **many**: ARCHIVES archives of RECORDS records.

Then tampered with, as a user with write access to the container may
(``--hostile-every N``, 0: not at all): the archives holding the id
selected below and every Nth archive get a **hostile index**, one
claiming no values and a time range of 2000, as their ``.index`` object
and in the first bundle; and every Nth archive from N / 2 on has **forged
time metadata** (``Earliest-``/``Latest-Timestamp`` of 2000, POSTed) and
no index. The local archives keep their own indexes, bound to the files
as the shipper leaves them.

For each, ``cat --where payload.instance_id=ID`` (an id of one to three
archives) and, for *many*, ``cat --since`` (the last tenth of the
records) run as ``/usr/bin/time -v shoebox-worker cat ...``; printed: the
peak RSS ("Maximum resident set size") against the goal (GOAL_MB), the
lines, which must be those of the same command over the local archives
(every selected record printed), the warning lines, which must be one
for each hostile index (each would skip its archive, and each is
distrusted), and the requests it sent (from the proxy's access log, as
``swift_select`` counts them). The containers are deleted at the end
(unless ``--keep``). Usage::

    source .swift-saio/saio.env
    nice .venv/bin/python bench/select_memory.py [--archives 1000]
        [--records 20] [--bundles 8] [--bundle-mib 32] [--jobs 4]
        [--hostile-every 10]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import swift_select  # bench/, beside this script
from swiftclient import client as swc

from shoebox_worker import index
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

WORKER = swift_select.WORKER
#: The issue's goal for a pruned read beside 8 bundles of 32 MiB.
GOAL_MB = 100
#: Bytes of one filler entry's index (an archive no longer listed).
FILLER_ENTRY = 64 << 10
#: A hostile index: one record, no values, a time long before any.
HOSTILE = index.build([({"timestamp": "2000-01-01 00:00:00.000000"}, {})])
FORGED_META = {"X-Object-Meta-Earliest-Timestamp":
               "2000-01-01T00:00:00.000000Z",
               "X-Object-Meta-Latest-Timestamp":
               "2000-01-01T00:00:01.000000Z"}


def connection():
    env = os.environ
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2,
                          timeout=60)


def make_container(name, archives, bundles, bundle_mib, threads,
                   hostile=(), forged=()):
    """Upload ``archives`` (``[(path, report)]``) to ``name``, then the
    bundles: the first with the listed archives' indexes as uploaded,
    those of ``hostile`` (object names) replaced by :data:`HOSTILE` there
    and as their ``.index``; ``forged`` get :data:`FORGED_META` and lose
    their index. The local indexes are bound to their files."""
    swift_select.upload(name, archives, threads)
    conn = connection()
    try:
        listed = {e["name"]: e
                  for e in conn.get_container(name, full_listing=True)[1]}
        real = []
        for path, _ in archives:
            obj = os.path.basename(path)
            index.bind_file(path)  # as the shipper leaves it
            entry = listed[obj]
            if obj in forged:
                conn.delete_object(name, obj + index.SUFFIX)
                head = conn.head_object(name, obj)
                meta = {k: v for k, v in head.items()
                        if k.startswith("x-object-meta-")}
                conn.post_object(name, obj, headers=dict(meta,
                                                         **FORGED_META))
                continue
            if obj in hostile:
                data = HOSTILE
                conn.put_object(name, obj + index.SUFFIX, data)
            else:  # the bytes the swift step uploaded
                with open(index.sidecar(path), "rb") as f:
                    data = index.bind(f.read(), sources.bound_etag(entry),
                                      entry["bytes"])
            real.append((obj, entry["hash"], data))
        filler = b"\x5a" * FILLER_ENTRY
        for number in range(bundles):
            entries = list(real) if number == 0 else []
            size = sum(len(d) for _, _, d in entries)
            gone = 0
            while size < bundle_mib << 20:
                entries.append(("expired/%d/%06d.events.gz" % (number, gone),
                                "%032x" % gone, filler))
                size += FILLER_ENTRY
                gone += 1
            conn.put_object(name, "b%d/%s" % (number, index.BUNDLE_SUFFIX),
                            index.build_bundle(entries))
    finally:
        conn.close()


def peak(argv):
    """``(peak RSS in MB, stdout lines, warning lines)`` of
    ``shoebox-worker cat argv``."""
    result = subprocess.run(["/usr/bin/time", "-v", WORKER, "cat"] + argv,
                            capture_output=True, check=False)
    err = result.stderr.decode("utf-8", "replace")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if result.returncode != 0 or not found:
        raise SystemExit("cat %s failed: %s" % (" ".join(argv), err[-2000:]))
    warnings = [line for line in err.splitlines()
                if line.startswith("shoebox-worker: warning: ")]
    return int(found.group(1)) / 1024, result.stdout.splitlines(), warnings


def local_lines(argv, directory):
    result = subprocess.run([WORKER, "cat"] + argv + [directory],
                            capture_output=True, check=True)
    return result.stdout.splitlines()


def measure(label, argv, container, directory, log, hostile=()):
    log.mark()
    mb, lines, warnings = peak(argv + ["swift://" + container])
    counts = log.since_mark({container})
    expected = local_lines(argv, directory)
    if not expected or sorted(lines) != sorted(expected):
        raise SystemExit("%s: %d lines from Swift, %d from the local "
                         "archives" % (label, len(lines), len(expected)))
    warned = sorted(line.split("; reading ")[-1][:-len(" in full")]
                    for line in warnings)
    wanted = sorted("swift://%s/%s" % (container, obj) for obj in hostile)
    if warned != wanted:
        raise SystemExit("%s: %d warning lines, for %d hostile indexes: %s"
                         % (label, len(warnings), len(wanted),
                            "\n".join(warnings[:5])))
    print("   %-36s peak RSS %6.1f MB (goal < %d MB: %s); %d line%s, those "
          "of the local archives; %d warning%s, one per hostile index"
          % (label, mb, GOAL_MB, "met" if mb < GOAL_MB else "NOT met",
             len(lines), "" if len(lines) == 1 else "s", len(warnings),
             "" if len(warnings) == 1 else "s"))
    print("   %-36s requests: %s" % ("", swift_select.describe(counts)))
    return mb


def since_of(paths, fraction=0.9):
    """A ``--since`` keeping about the last ``1 - fraction`` records."""
    stamps = sorted(m["timestamp"] for m, _ in
                    swift_select.local_records(paths))
    return stamps[int(len(stamps) * fraction)].replace(" ", "T")


def bench(args, scratch, containers):
    log = swift_select.ProxyLog(args.proxy_log)
    jobs = ["--jobs", str(args.jobs)]
    for label, count in (("small", 1), ("many", args.archives)):
        directory = tempfile.mkdtemp(prefix=label + "-", dir=scratch)
        notes = simulator.notifications(count * args.records, seed=7,
                                        start=swift_select.DAY0)
        archives = [swift_select.write_archive(
            [next(notes) for _ in range(args.records)], directory,
            "mem_%05d.events" % n) for n in range(count)]
        container = "bench-memory-%s-%s" % (label, uuid.uuid4().hex[:10])
        containers += [container, container + "_segments"]
        paths = [p for p, _ in archives]
        iid, holding = swift_select.pick_instance(paths, (1, 2, 3))
        names = [os.path.basename(p) for p in paths]
        hostile, forged = set(), set()
        every = args.hostile_every
        if every:
            hostile = set(holding) | set(names[::every])
            forged = set(names[every // 2::every]) - hostile
        make_container(container, archives, args.bundles, args.bundle_mib,
                       args.threads, hostile, forged)
        print("%s: %d archive%s of %d records, %d bundles of %d MiB; %d "
              "hostile indexes, %d objects with forged time metadata" % (
                  label, count, "" if count == 1 else "s", args.records,
                  args.bundles, args.bundle_mib, len(hostile), len(forged)))
        measure("cat --where (in %d archive%s)" % (
            len(holding), "" if len(holding) == 1 else "s"),
            jobs + ["--where", "payload.instance_id=" + iid], container,
            directory, log, hostile)
        if count > 1:
            # a hostile index's time range is 2000: each would skip its
            # archive, so each is one warning
            measure("cat --since (the last tenth)",
                    jobs + ["--since", since_of(paths)], container,
                    directory, log, hostile)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=int, default=1000)
    parser.add_argument("--records", type=int, default=20,
                        help="records per archive")
    parser.add_argument("--bundles", type=int, default=8)
    parser.add_argument("--bundle-mib", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4,
                        help="uploads at a time (the setup)")
    parser.add_argument("--hostile-every", type=int, default=10,
                        help="a hostile index on every Nth archive, forged "
                             "time metadata on every Nth from N/2 (0: none)")
    parser.add_argument("--proxy-log", default=swift_select.PROXY_LOG,
                        help="the proxy's access log (requests counted)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the containers (named at the end)")
    args = parser.parse_args(argv)
    swift_select.require_swift_env()
    scratch = tempfile.mkdtemp(prefix="bench-select-memory-")
    containers = []
    try:
        bench(args, scratch, containers)
    finally:
        if args.keep:
            print("kept: %s" % " ".join(containers))
        else:
            swift_select.delete_containers(containers, args.threads)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
