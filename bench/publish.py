"""How fast ``replay`` and ``generate`` publish, every message confirmed,
against a publisher that waits for each confirm, measured in the same run.

On the local RabbitMQ (or ``BENCH_AMQP_URL``), each run to a queue of its
own (declared, bound, deleted after):

(a) the baseline: a kombu Producer on a connection with
    ``confirm_publish`` (kombu waits for each message's confirm), the
    simulator's notifications built beforehand, timed around the loop;
(b) ``shoebox-worker generate --count N``, the whole process timed (start
    to exit), its summary line checked for ``N confirmed``;
(c) ``shoebox-worker replay`` of N archived notifications (v2 archives of
    10,000 records written by this script first), the whole process timed,
    its summary checked the same way;
(d) with ``--rate R``: ``generate --rate R`` for ``--rate-seconds`` (60),
    the whole process timed: how far the rate held is printed.

Each prints messages/s and the ratio to (a). Usage::

    .venv/bin/python bench/publish.py [--count 100000] [--rounds 1]
        [--rate 2000]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import kombu
import orjson

from shoebox_worker import archive
from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
#: Messages the one-at-a-time baseline sends (its rate is steady).
BASELINE_COUNT = 10000
PER_ARCHIVE = 10000


def _queue(conn, name):
    """A queue bound to an exchange of its own name, declared."""
    exchange = kombu.Exchange(name, type="topic", durable=False)
    queue = kombu.Queue(name, exchange, routing_key="notifications.info",
                        durable=False)
    with conn.channel() as ch:
        queue(ch).declare()
    return queue


def _drop(conn, queue):
    with conn.channel() as ch:
        queue(ch).delete()
        queue.exchange(ch).delete()


def one_at_a_time(count):
    """msg/s of a publisher that waits for each confirm."""
    bodies = [envelope.wrap(n) for n in
              simulator.notifications(count, seed=11)]
    name = "bench-publish-base-%d" % os.getpid()
    with kombu.Connection(URL, transport_options={
            "confirm_publish": True}) as conn:
        queue = _queue(conn, name)
        try:
            producer = kombu.Producer(conn.channel(), exchange=queue.exchange)
            started = time.perf_counter()
            for body in bodies:
                producer.publish(body, routing_key="notifications.info",
                                 content_type="application/json",
                                 content_encoding="utf-8", delivery_mode=2,
                                 mandatory=True, declare=[], retry=False)
            seconds = time.perf_counter() - started
        finally:
            _drop(conn, queue)
    return count / seconds


def _timed(argv, count):
    """Seconds the command took, start to exit; checks its summary."""
    env = dict(os.environ, SHOEBOX_BROKER_URL=URL)
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, check=False)
    seconds = time.perf_counter() - started
    confirmed = re.search(r"(\d+) confirmed", result.stdout)
    if result.returncode != 0 or confirmed is None or \
            int(confirmed.group(1)) != count:
        raise RuntimeError("%s: exit %d\n%s%s" % (
            argv[1], result.returncode, result.stdout[-2000:],
            result.stderr[-2000:]))
    return seconds


def generate(count, rate=None):
    name = "bench-publish-gen-%d" % os.getpid()
    with kombu.Connection(URL) as conn:
        queue = _queue(conn, name)
        try:
            argv = [WORKER, "generate", "--count", str(count),
                    "--exchange", name, "--seed", "5"]
            if rate is not None:
                argv += ["--rate", str(rate)]
            return count / _timed(argv, count)
        finally:
            _drop(conn, queue)


def write_archives(directory, count):
    """``count`` simulator notifications in v2 archives; their paths."""
    paths = []
    writer = None
    for i, notification in enumerate(simulator.notifications(count,
                                                             seed=13)):
        if i % PER_ARCHIVE == 0:
            if writer is not None:
                writer.close()
            paths.append(os.path.join(directory, "bench-%06d.arc" % i))
            writer = archive.ArchiveWriter(paths[-1])
        writer.write({"event_type": notification["event_type"]},
                     orjson.dumps(notification))
    if writer is not None:
        writer.close()
    return paths


def replay(paths, count):
    name = "bench-publish-replay-%d" % os.getpid()
    with kombu.Connection(URL) as conn:
        queue = _queue(conn, name)
        try:
            return count / _timed([WORKER, "replay", "--exchange", name,
                                   "--routing-key", "notifications.info",
                                   *paths], count)
        finally:
            _drop(conn, queue)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the baseline and the commands this "
                             "many times; the best of each is printed")
    parser.add_argument("--rate", type=float, default=None,
                        help="also check that generate --rate RATE holds")
    parser.add_argument("--rate-seconds", type=float, default=60.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-publish-")
    try:
        paths = write_archives(workdir, args.count)
        print("%d messages per command run (the baseline sends %d), "
              "%d round(s), broker %s" % (
                  args.count, min(args.count, BASELINE_COUNT), args.rounds,
                  URL.split("@")[-1]), flush=True)
        base, gen, rep = [], [], []
        for _ in range(args.rounds):
            base.append(one_at_a_time(min(args.count, BASELINE_COUNT)))
            gen.append(generate(args.count))
            rep.append(replay(paths, args.count))
        b = max(base)
        print("one confirm at a time (kombu confirm_publish): %8.0f msg/s"
              % b)
        for label, rates in (("generate", gen), ("replay", rep)):
            best = max(rates)
            print("%-8s (whole process):  %8.0f msg/s  %.2fx  "
                  "(rounds: %s)" % (label, best, best / b, ", ".join(
                      "%.0f" % r for r in rates)), flush=True)
        if args.rate is not None:
            count = int(args.rate * args.rate_seconds)
            held = generate(count, rate=args.rate)
            print("generate --rate %g for %d messages: %.0f msg/s "
                  "(%+.1f %%, whole process)" % (
                      args.rate, count, held,
                      100.0 * (held - args.rate) / args.rate))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
