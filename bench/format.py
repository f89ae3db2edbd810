"""What the record format costs, against plain file I/O of the same bytes.

Builds realistic notifications (the project's simulator, seed 1: nova
notifications of about 2.8 KB as JSON) with the eight metadata keys the
worker writes, then in the same run and on the same disk measures:

* raw write: the payload bytes, one ``f.write`` per record, to a file with
  the writer's buffer size, then flush + fsync (the baseline);
* raw read: the same bytes back, one ``f.read(len)`` per record;
* ArchiveWriter v1 and v2 (``close()`` flushes and fsyncs);
* ArchiveReader v1 and v2.

Each is the best of three rounds, interleaved (the machine is noisy).
MB/s counts payload bytes, so every line moves the same data. Goals: v2
write >= 0.7x raw write, v2 read >= 0.5x raw read. Usage::

    .venv/bin/python bench/format.py [--records N] [--dir DIR]
"""

import argparse
import datetime
import os
import sys
import tempfile
import time

import orjson

from shoebox_worker import archive

ROUNDS = 3
GOALS = {("write", 2): 0.7, ("read", 2): 0.5}


def build(count):
    """``count`` (metadata, payload bytes) pairs like the worker writes."""
    try:
        from shoebox_worker.tools import simulator
        source = simulator.notifications(
            count, seed=1, start=datetime.datetime(2024, 1, 1))
    except ImportError:  # pragma: no cover - simulator not there
        source = _inline(count)
    out = []
    for notification in source:
        metadata = {
            "event_type": notification["event_type"],
            "message_id": notification["message_id"],
            "timestamp": notification["timestamp"],
            "publisher_id": notification["publisher_id"],
            "priority": notification["priority"],
            "request_id": notification.get("_context_request_id", ""),
            "queue": "notifications.info",
            "routing_key": "notifications.info",
        }
        out.append((metadata, orjson.dumps(notification)))
    return out


def _inline(count):
    import random
    import uuid
    rng = random.Random(1)
    for i in range(count):
        yield {
            "event_type": "compute.instance.update",
            "message_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "timestamp": "2024-01-01 00:00:%02d.%06d" % (i % 60, i),
            "publisher_id": "compute.c-%04d" % rng.randrange(1000),
            "priority": "INFO",
            "_context_request_id": "req-%s" % uuid.UUID(
                int=rng.getrandbits(128)),
            "payload": {"pad": "%x" % rng.getrandbits(4096) * 2,
                        "metadata": [{"key": "k%d" % j, "value": "v" * 40}
                                     for j in range(12)]},
        }


class Bench:
    def __init__(self, records, directory):
        self.records = records
        self.payloads = [p for _, p in records]
        self.lengths = [len(p) for p in self.payloads]
        self.directory = directory
        self.serial = 0

    def _new_path(self, tag):
        self.serial += 1
        return os.path.join(self.directory, "%s-%d" % (tag, self.serial))

    def raw_write(self):
        path = self._new_path("raw")
        with open(path, "wb", buffering=archive.WRITE_BUFFER) as f:
            write = f.write
            for payload in self.payloads:
                write(payload)
            f.flush()
            os.fsync(f.fileno())
        self.raw_path = path

    def raw_read(self):
        with open(self.raw_path, "rb", buffering=archive.READ_CHUNK) as f:
            read = f.read
            for length in self.lengths:
                read(length)

    def archive_write(self, version):
        path = self._new_path("v%d" % version)
        with archive.ArchiveWriter(path, version=version) as writer:
            write = writer.write
            for metadata, payload in self.records:
                write(metadata, payload)
        self.paths[version] = path

    def archive_read(self, version):
        count = 0
        with archive.ArchiveReader(self.paths[version]) as reader:
            for _ in reader:
                count += 1
        assert count == len(self.records), count

    def clean(self):
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))

    def run(self, rounds=ROUNDS):
        """Best time of each step over ``rounds`` rounds. The rounds are
        interleaved (every step once, then again), so a burst of noise
        from elsewhere on the machine hits every step alike."""
        self.paths = {}
        steps = [("raw write", None, self.raw_write),
                 ("raw read", None, self.raw_read)]
        for version in (1, 2):
            steps.append(("v%d write" % version, version,
                          lambda v=version: self.archive_write(v)))
            steps.append(("v%d read" % version, version,
                          lambda v=version: self.archive_read(v)))
        best = {}
        for _ in range(rounds):
            for name, _, func in steps:
                start = time.perf_counter()
                func()
                elapsed = time.perf_counter() - start
                best[name] = min(best.get(name, elapsed), elapsed)
            sizes = {v: os.path.getsize(p) for v, p in self.paths.items()}
            self.clean()
        return [(name, v, best[name]) for name, v, _ in steps], sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100000)
    parser.add_argument("--dir", default=None,
                        help="where the files go (default: a temporary "
                             "directory under the current one's disk)")
    args = parser.parse_args(argv)

    records = build(args.records)
    payload_mb = sum(len(p) for _, p in records) / 1e6
    directory = tempfile.mkdtemp(prefix="bench-format-",
                                 dir=args.dir or os.getcwd())
    try:
        results, sizes = Bench(records, directory).run()
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)

    print("%d records, %.1f MB of payload (%.0f bytes each); files: "
          "v1 %.1f MB, v2 %.1f MB; best of %d"
          % (len(records), payload_mb, payload_mb * 1e6 / len(records),
             sizes[1] / 1e6, sizes[2] / 1e6, ROUNDS))
    baseline = {"write": results[0][2], "read": results[1][2]}
    for name, version, seconds in results:
        kind = name.split()[-1]
        ratio = baseline[kind] / seconds
        line = "%-9s %10.0f records/s %8.1f MB/s %6.2fx raw %s" % (
            name, len(records) / seconds, payload_mb / seconds, ratio, kind)
        goal = GOALS.get((kind, version))
        if goal is not None:
            line += "  %s (goal >= %.1fx)" % (
                "PASS" if ratio >= goal else "MISS", goal)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
