"""``shoebox-worker cat --match`` against ``zcat | grep -F``, measured here.

Builds realistic notifications (the project's simulator, seed 1: nova
notifications of about 2.8 KB as JSON) with the metadata the worker writes,
and writes them twice, split into the same files:

* as gzipped v2 archives (``gzip`` at its default level, as the worker's
  gzip step compresses);
* as gzipped JSON lines, one notification per line (what Vector, Fluentd
  or Logstash would leave).

Then, in the same run, times (best of ``--rounds``, interleaved, output
to /dev/null):

* the baseline: ``zcat FILES | grep -F '"event_type": "E"'`` over the JSON
  lines;
* ``shoebox-worker cat --match event_type=E DIR`` over the archives (the
  goal: >= 1.0x of the baseline, that is no slower);
* for information, ``cat`` with no selection, ``--where`` on the same
  field, and ``--since``/``--until`` keeping about half.

The ratio is baseline time / cat time; the counts of lines printed are
checked equal. Reading gzip uses ISA-L's inflate when the ``isal`` package
is installed (a dependency), zlib's otherwise; the first line
says which. Usage::

    .venv/bin/python bench/read.py [--records 100000] [--files 10]
"""

import argparse
import datetime
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time

import orjson

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker.tools import simulator

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
EVENT = "compute.instance.exists"
START = datetime.datetime(2024, 1, 1)
GOAL = 1.0


def build(count):
    """``count`` (metadata, payload) pairs as the worker writes them."""
    out = []
    for note in simulator.notifications(count, seed=1, start=START):
        metadata = {
            "event_type": note["event_type"],
            "message_id": note["message_id"],
            "timestamp": note["timestamp"],
            "publisher_id": note["publisher_id"],
            "priority": note["priority"],
            "request_id": note.get("_context_request_id", ""),
            "queue": "notifications.info",
            "routing_key": "notifications.info",
            "exchange": "nova",
        }
        out.append((metadata, orjson.dumps(note)))
    return out


def write_files(records, files, directory):
    """The records as gzipped archives in ``directory/archives`` and as
    gzipped JSON lines in ``directory/jsonl``; returns both lists."""
    archives, jsonl = [], []
    os.makedirs(os.path.join(directory, "archives"))
    os.makedirs(os.path.join(directory, "jsonl"))
    per = -(-len(records) // files)
    for n in range(files):
        part = records[n * per:(n + 1) * per]
        path = os.path.join(directory, "archives", "a%03d.events" % n)
        with archive.ArchiveWriter(path) as writer:
            for metadata, payload in part:
                writer.write(metadata, payload)
        gz = compression.compress_file(path, compression.CODECS["gzip"])
        os.unlink(path)
        os.utime(gz, ns=(0, (n + 1) * 10**9))
        archives.append(gz)
        lines = os.path.join(directory, "jsonl", "a%03d.jsonl.gz" % n)
        with gzip.open(lines, "wb") as f:
            f.write(b"".join(payload + b"\n" for _, payload in part))
        jsonl.append(lines)
    return archives, jsonl


def timed(argv, shell=False):
    """Seconds to run ``argv`` and the number of lines it printed."""
    start = time.perf_counter()
    proc = subprocess.run(argv, shell=shell, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1) or proc.stderr.strip():
        raise SystemExit("%s failed: %s" % (argv, proc.stderr.decode()))
    return elapsed, proc.stdout.count(b"\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None,
                        help="where the files go (default: a temporary "
                             "directory under the current one)")
    args = parser.parse_args(argv)

    records = build(args.records)
    middle = records[len(records) // 4][0]["timestamp"]
    end = records[3 * len(records) // 4][0]["timestamp"]
    directory = tempfile.mkdtemp(prefix="bench-read-",
                                 dir=args.dir or os.getcwd())
    try:
        archives, jsonl = write_files(records, args.files, directory)
        top = os.path.join(directory, "archives")
        needle = '"event_type":"%s"' % EVENT
        steps = [
            ("zcat | grep -F", "zcat %s | grep -F '%s'" % (
                " ".join(jsonl), needle), True),
            ("cat --match", [WORKER, "cat", "--match", "event_type=" + EVENT,
                             top], False),
            ("cat", [WORKER, "cat", top], False),
            ("cat --where", [WORKER, "cat", "--where",
                             "event_type=" + EVENT, top], False),
            ("cat --since --until", [WORKER, "cat", "--since", middle,
                                     "--until", end, top], False),
        ]
        best, counts = {}, {}
        for _ in range(args.rounds):
            for name, command, shell in steps:
                elapsed, count = timed(command, shell)
                best[name] = min(best.get(name, elapsed), elapsed)
                counts[name] = count
    finally:
        shutil.rmtree(directory)

    size = sum(len(p) for _, p in records)
    print("%d notifications (%.1f MB as JSON) in %d files; best of %d; "
          "gzip read with %s"
          % (len(records), size / 1e6, args.files, args.rounds,
             compression.inflate.__name__))
    baseline = best["zcat | grep -F"]
    if counts["cat --match"] != counts["zcat | grep -F"] or \
            counts["cat --where"] != counts["cat --match"]:
        raise SystemExit("different counts: %r" % counts)
    for name, _, _ in steps:
        ratio = baseline / best[name]
        line = "%-20s %7.3f s %8.0f records/s %7d lines %6.2fx" % (
            name, best[name], len(records) / best[name], counts[name], ratio)
        if name == "cat --match":
            line += "  %s (goal >= %.1fx)" % (
                "PASS" if ratio >= GOAL else "MISS", GOAL)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
