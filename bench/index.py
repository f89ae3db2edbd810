"""What the per-archive index costs: its size, and the worker's throughput.

1. **Size.** Archives of realistic nova notifications (the project's
   simulator, and the sample /work/shared/samples/nova-notifications.jsonl
   when it is there) written with the default ``index_fields``, gzipped
   as the ``gzip`` step does: the index's size against the gzipped
   archive's (the goal: under 2 %), and its bytes per record.
2. **The worker's own work**, in this process: unwrap, write and roll
   each message with and without the index, CPU time per message (the
   broker's and kombu's part, about 48 us a message, left out), best of
   ``--rounds``.
3. **Throughput.** In the same run, on the local RabbitMQ,
   ``shoebox-worker run`` drains a pre-filled queue (as bench/worker.py
   does, rolling every ``--roll-mb`` so that indexes are built while it
   consumes) with ``index_fields =`` (no index: the baseline) and with the
   default, alternating, ``--rounds`` times; prints msg/s of each and
   their ratio (the goal: a drop of a few % at most).

Usage::

    .venv/bin/python bench/index.py [--count 100000] [--rounds 3]
        [--roll-mb 10] [--sizes 1000,10000,100000] [--no-throughput]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import kombu
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker as bench_worker  # noqa: E402  (bench/worker.py)

from shoebox_worker import compression  # noqa: E402
from shoebox_worker import index  # noqa: E402
from shoebox_worker import roll_checker  # noqa: E402
from shoebox_worker import roll_manager  # noqa: E402
from shoebox_worker.consume import envelope  # noqa: E402
from shoebox_worker.tools import simulator  # noqa: E402

SAMPLE = "/work/shared/samples/nova-notifications.jsonl"


def archive_of(notes, directory, name):
    """Write ``notes`` as one archive with its index, as the worker does
    (the envelope's values, the roll manager's index), gzip it.

    :returns: ``(records, gzipped bytes, index bytes)``.
    """
    unwrap = envelope.Unwrapper(index_fields=index.DEFAULT_FIELDS)
    manager = roll_manager.WritingRollManager(
        name + ".events", roll_checker.NeverRollChecker(),
        directory=directory, index_fields=index.DEFAULT_FIELDS)
    count = 0
    for note in notes:
        payload, metadata, values = unwrap(envelope.wrap(note), "q", "rk")
        manager.write(metadata, payload, values)
        count += 1
    report = manager.close()
    gz = compression.compress_file(report.filename,
                                   compression.get_codec("gzip"), None)
    sizes = (os.path.getsize(gz),
             os.path.getsize(index.sidecar(report.filename)))
    for path in (report.filename, gz, index.sidecar(report.filename)):
        os.unlink(path)
    return (count,) + sizes


def sizes(counts, directory):
    print("index size against the gzipped archive (default index_fields):")
    runs = [("simulator, %d records" % n,
             simulator.notifications(n, seed=7)) for n in counts]
    if os.path.exists(SAMPLE):
        with open(SAMPLE, "rb") as f:
            notes = [orjson.loads(line) for line in f if line.strip()]
        runs.append(("sample %s" % os.path.basename(SAMPLE), notes))
    for label, notes in runs:
        records, gz, idx = archive_of(notes, directory, "size")
        ratio = idx / gz
        print("  %-34s gzip %10d B  index %8d B  %.2f %%  (%.1f B/record)"
              "  %s" % (label, gz, idx, 100 * ratio, idx / records,
                        "PASS" if ratio < 0.02 else "MISS"))


def own_work(bodies, fields, roll_mb, directory):
    """The worker's own work on each message, in this process: unwrap it,
    write it (fsync every 1000), roll every ``roll_mb`` (the index made
    then); CPU seconds per message (the broker's part left out)."""
    unwrap = envelope.Unwrapper(index_fields=fields)
    manager = roll_manager.WritingRollManager(
        "own_%Y%m%d_{unique}.events",
        roll_checker.SizeRollChecker(roll_size_mb=int(roll_mb)),
        directory=directory, index_fields=fields, unique_names=True)
    started = time.process_time()
    for n, body in enumerate(bodies):
        payload, metadata, values = unwrap(body, "q", "rk")
        manager.write(metadata, payload, values)
        if n % 1000 == 999:
            manager.sync()
    manager.close()
    seconds = time.process_time() - started
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    return seconds / len(bodies)


def own(count, rounds, roll_mb, workdir):
    print("the worker's own work per message (unwrap, write, roll), in "
          "process, %d messages, rolls every %s MB:" % (count, roll_mb))
    notes = [envelope.wrap(n) for n in simulator.notifications(5000, seed=7)]
    bodies = [notes[i % len(notes)] for i in range(count)]
    directory = tempfile.mkdtemp(dir=workdir)
    base, indexed = [], []
    for _ in range(rounds):
        base.append(own_work(bodies, (), roll_mb, directory))
        indexed.append(own_work(bodies, index.DEFAULT_FIELDS, roll_mb,
                                directory))
    b, w = min(base), min(indexed)
    print("  no index: %.1f us   default index_fields: %.1f us   +%.1f us a "
          "message; as throughput: %.3fx" % (b * 1e6, w * 1e6,
                                             (w - b) * 1e6, b / w))


CONFIG_INDEX = "fsync_interval = 1\nindex_fields = %s\n"


def run_worker(conn, queue, count, workdir, fields, roll_mb):
    """bench/worker.py's worker run, with ``index_fields = fields`` and
    rolls every ``roll_mb``."""
    bench_worker.prefill(conn, queue, count)
    directory = tempfile.mkdtemp(dir=workdir)
    path = os.path.join(directory, "bench.conf")
    text = bench_worker.CONFIG.format(
        url=bench_worker.URL, queue=queue.name,
        exchange=bench_worker.EXCHANGE,
        directory=os.path.join(directory, "archive"), processes=1)
    text = text.replace("fsync_interval = 1\n", CONFIG_INDEX % fields)
    text = text.replace("roll_size_mb = 1024", "roll_size_mb = %s" % roll_mb)
    with open(path, "w") as f:
        f.write(text)
    exe = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
    proc = subprocess.Popen([exe, "run", "--config", path,
                             "--idle-exit", "1"])
    seconds = bench_worker.drain_time(conn, queue, count, [proc])
    proc.wait(120)
    if proc.returncode != 0:
        raise RuntimeError("worker exited with %s" % proc.returncode)
    made = [n for n in os.listdir(os.path.join(directory, "archive"))
            if n.endswith(index.SUFFIX)]
    subprocess.run(["rm", "-rf", directory], check=False)
    return count / seconds, len(made)


def throughput(count, rounds, roll_mb, workdir):
    fields = ", ".join(index.DEFAULT_FIELDS)
    print("worker throughput, %d messages per run, rolls every %s MB, "
          "%d round(s), broker %s:" % (count, roll_mb, rounds,
                                       bench_worker.URL.split("@")[-1]))
    with kombu.Connection(bench_worker.URL) as conn:
        exchange = kombu.Exchange(bench_worker.EXCHANGE, type="topic",
                                  durable=False)
        queue = kombu.Queue("bench-index.%d" % os.getpid(), exchange,
                            routing_key="bench-index.%d" % os.getpid(),
                            durable=False)
        base, indexed = [], []
        try:
            for _ in range(rounds):
                rate, made = run_worker(conn, queue, count, workdir, "",
                                        roll_mb)
                assert made == 0, made
                base.append(rate)
                rate, made = run_worker(conn, queue, count, workdir, fields,
                                        roll_mb)
                assert made > 1, "no index made while consuming"
                indexed.append(rate)
        finally:
            with conn.channel() as ch:
                queue(ch).delete()
    b, w = max(base), max(indexed)
    print("  no index: %8.0f msg/s   default index_fields: %8.0f msg/s   "
          "ratio %.3fx (%d indexes per run)  %s" % (
              b, w, w / b, made, "PASS" if w / b >= 0.95 else "MISS"))
    print("  every round: no index %s; indexed %s" % (
        ", ".join("%.0f" % r for r in base),
        ", ".join("%.0f" % r for r in indexed)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--roll-mb", default="10")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-index-")
    try:
        sizes([int(n) for n in args.sizes.split(",")], workdir)
        own(args.count, args.rounds, args.roll_mb, workdir)
        if not args.no_throughput:
            throughput(args.count, args.rounds, args.roll_mb, workdir)
    finally:
        subprocess.run(["rm", "-rf", workdir], check=False)


if __name__ == "__main__":
    main()
