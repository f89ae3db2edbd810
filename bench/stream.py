"""The same worker on a RabbitMQ stream and on a classic queue, same run.

Pre-fills a durable classic queue and a stream (``x-queue-type=stream``)
on the local RabbitMQ with the same realistic notifications (the project's
simulator, oslo.messaging v2 envelope, persistent), then drains each with
``shoebox-worker run --idle-exit 1`` (one process, v2 archives, fsync and
ack per 1000, prefetch 2000; on the stream also its offset in each record
and the offset file replaced at each ack point), alternating the two for
``--rounds`` rounds, and prints messages/s of each, and the ratio of the
medians (goal: the stream at >= 0.8x the classic queue).

Both are timed the same way, from the worker's own log: from its
"consuming from" line to its "no message for 1 s: stopping" line, less
the idle second. Usage::

    .venv/bin/python bench/stream.py [--count 100000] [--rounds 3]
"""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile

import kombu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker as bench_worker  # noqa: E402  (bench/worker.py)

URL = bench_worker.URL
IDLE_EXIT = 1.0

CONFIG = """
[broker]
url = {url}
prefetch_count = 2000

[consumer:{queue}]
exchange = {exchange}
routing_key = {queue}
durable = true
queue_arguments = {arguments}

[archive]
working_directory = {directory}
roll_checker = size
callbacks =
fsync_every = 1000
fsync_interval = 1

[roll_checker:size]
roll_size_mb = 1024

[worker]
stats_interval = 0

[logging]
level = INFO
file = {log}
"""

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _time_of(log, text):
    for line in log.splitlines():
        if text in line:
            stamp = _STAMP.match(line).group(1)
            return datetime.datetime.strptime(
                stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError("no %r line in the worker's log:\n%s" % (text, log))


def run(conn, queue, count, workdir):
    """Prefill, drain with the worker; messages/s."""
    bench_worker.prefill(conn, queue, count)
    directory = tempfile.mkdtemp(dir=workdir)
    path = os.path.join(directory, "bench.conf")
    log = os.path.join(directory, "worker.log")
    arguments = ", ".join("%s=%s" % item
                          for item in queue.queue_arguments.items())
    with open(path, "w") as f:
        f.write(CONFIG.format(url=URL, queue=queue.name,
                              exchange=queue.exchange.name,
                              arguments=arguments,
                              directory=os.path.join(directory, "archive"),
                              log=log))
    exe = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
    proc = subprocess.run([exe, "run", "--config", path, "--idle-exit",
                           str(IDLE_EXIT)], timeout=600)
    with open(log) as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError("worker exited with %s:\n%s" % (proc.returncode,
                                                           text))
    consumed = re.search(r"consumed (\d+), acked (\d+)", text)
    if consumed is None or int(consumed.group(2)) != count:
        raise RuntimeError("the worker did not ack %d:\n%s" % (count, text))
    seconds = (_time_of(text, "no message for") -
               _time_of(text, "consuming from") - IDLE_EXIT)
    return count / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate classic and stream this many times")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-stream-")
    print("%d messages per run, %d round(s), broker %s" % (
        args.count, args.rounds, URL.split("@")[-1]))
    tag = os.getpid()
    exchange = kombu.Exchange("bench-stream.%d" % tag, type="topic",
                              durable=True)
    kinds = {
        "classic": {"x-queue-type": "classic"},
        "stream": {"x-queue-type": "stream", "x-max-age": "1h"},
    }
    rates = {kind: [] for kind in kinds}
    with kombu.Connection(URL) as conn:
        try:
            for round_ in range(args.rounds):
                for kind, arguments in kinds.items():
                    queue = kombu.Queue(
                        "bench-%s.%d.%d" % (kind, tag, round_), exchange,
                        routing_key="bench-%s.%d.%d" % (kind, tag, round_),
                        durable=True, queue_arguments=arguments)
                    try:
                        rate = run(conn, queue, args.count, workdir)
                    finally:
                        with conn.channel() as ch:
                            queue(ch).delete()
                    rates[kind].append(rate)
                    print("round %d  %-7s %8.0f msg/s" % (round_ + 1, kind,
                                                          rate))
        finally:
            with conn.channel() as ch:
                exchange(ch).delete()
    classic = statistics.median(rates["classic"])
    stream = statistics.median(rates["stream"])
    ratio = stream / classic
    print("median  classic queue: %8.0f msg/s   stream: %8.0f msg/s   "
          "ratio %.2fx  %s" % (classic, stream, ratio,
                               "PASS" if ratio >= 0.8 else "MISS"))
    subprocess.run(["rm", "-rf", workdir], check=False)


if __name__ == "__main__":
    main()
