"""How close the worker runs to what the broker can deliver, measured here.

Pre-fills a queue on the local RabbitMQ with realistic notifications (the
project's simulator, oslo.messaging v2 envelope), then in the same run
drains it with:

(a) N plain kombu consumers that ack (one multiple-ack per 1000, prefetch
    2000) and discard: the ceiling this broker and machine allow;
(b) ``shoebox-worker run --idle-exit`` with ``processes = N``, writing v2
    archives with fsync'd batches,

for N = 1 and 2, and prints messages/s of each, their ratio, and the
worker's peak RSS. Both are timed the same way, from outside: the queue's
depth is polled, and the clock runs from the first message taken to an
empty queue. Usage::

    .venv/bin/python bench/worker.py [--count 100000] [--rounds 1]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import kombu

from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
EXCHANGE = "bench"

DISCARD = textwrap.dedent("""
    import sys
    import kombu

    url, name = sys.argv[1], sys.argv[2]
    state = {"n": 0, "last": None}

    def on_message(message):
        state["n"] += 1
        state["last"] = message
        if state["n"] % 1000 == 0:
            message.ack(multiple=True)
            state["last"] = None

    with kombu.Connection(url) as conn:
        queue = kombu.Queue(name, kombu.Exchange("EXCHANGE", type="topic",
                            durable=False), routing_key=name, durable=False)
        with kombu.Consumer(conn, [queue], on_message=on_message,
                            prefetch_count=2000):
            while True:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    if state["last"] is not None:
                        state["last"].ack(multiple=True)
                        state["last"] = None
                    with conn.channel() as ch:
                        ok = queue(ch).queue_declare(passive=True)
                    if ok.message_count == 0:
                        break
""").replace("EXCHANGE", EXCHANGE)

CONFIG = """
[broker]
url = {url}
prefetch_count = 2000

[consumer:{queue}]
exchange = {exchange}
routing_key = {queue}

[archive]
working_directory = {directory}
roll_checker = size
callbacks =
fsync_every = 1000
fsync_interval = 1

[roll_checker:size]
roll_size_mb = 1024

[worker]
processes = {processes}
stats_interval = 0

[logging]
level = WARNING
"""


def queue_depth(conn, queue):
    with conn.channel() as ch:
        return queue(ch).queue_declare(passive=True).message_count


def prefill(conn, queue, count):
    """Publish ``count`` notifications into ``queue`` and wait until the
    broker holds them all."""
    producer = kombu.Producer(conn.channel(), exchange=queue.exchange)
    queue(producer.channel).declare()
    bodies = [envelope.wrap(n) for n in
              simulator.notifications(min(count, 5000), seed=7)]
    for i in range(count):
        producer.publish(bodies[i % len(bodies)], routing_key=queue.name,
                         content_type="application/json",
                         content_encoding="utf-8", delivery_mode=2,
                         declare=[], retry=False)
    for _ in range(600):
        if queue_depth(conn, queue) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError("queue did not fill")


def _hwm_kb(pid):
    """Peak resident set of ``pid`` and its children (VmHWM, in kB)."""
    pids = [pid]
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    peak = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak


def drain_time(conn, queue, count, procs, rss=None):
    """Poll until the queue is empty; seconds from first take to empty.

    :param rss: a list to append each process's peak RSS (kB) to.
    """
    first = None
    while True:
        if rss is not None:
            for p in procs:
                rss.append(_hwm_kb(p.pid))
        depth = queue_depth(conn, queue)
        now = time.perf_counter()
        if first is None and depth < count:
            first = now
        if depth == 0 and first is not None:
            return now - first
        if all(p.poll() is not None for p in procs):
            raise RuntimeError("consumers exited with %d left" % depth)
        time.sleep(0.02)


def run_discard(conn, queue, count, n):
    prefill(conn, queue, count)
    procs = [subprocess.Popen([sys.executable, "-c", DISCARD, URL,
                               queue.name]) for _ in range(n)]
    seconds = drain_time(conn, queue, count, procs)
    for p in procs:
        p.wait(60)
    return count / seconds


def run_worker(conn, queue, count, n, workdir):
    prefill(conn, queue, count)
    directory = tempfile.mkdtemp(dir=workdir)
    path = os.path.join(directory, "bench.conf")
    with open(path, "w") as f:
        f.write(CONFIG.format(url=URL, queue=queue.name, exchange=EXCHANGE,
                              directory=os.path.join(directory, "archive"),
                              processes=n))
    exe = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
    proc = subprocess.Popen([exe, "run", "--config", path,
                             "--idle-exit", "1"])
    peaks = []
    seconds = drain_time(conn, queue, count, [proc], peaks)
    proc.wait(120)
    rss = max(peaks) / 1024.0
    if proc.returncode != 0:
        raise RuntimeError("worker exited with %s" % proc.returncode)
    return count / seconds, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate baseline and worker this many times")
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-")
    print("%d messages per run, %d round(s), broker %s" % (
        args.count, args.rounds, URL.split("@")[-1]))
    with kombu.Connection(URL) as conn:
        exchange = kombu.Exchange(EXCHANGE, type="topic", durable=False)
        queue = kombu.Queue("bench.%d" % os.getpid(), exchange,
                            routing_key="bench.%d" % os.getpid(),
                            durable=False)
        try:
            for n in (int(x) for x in args.processes.split(",")):
                base, work, rss = [], [], []
                for _ in range(args.rounds):
                    base.append(run_discard(conn, queue, args.count, n))
                    rate, peak = run_worker(conn, queue, args.count, n,
                                            workdir)
                    work.append(rate)
                    rss.append(peak)
                b, w = max(base), max(work)
                ratio = w / b
                print("processes=%d  discard consumer(s): %8.0f msg/s   "
                      "shoebox-worker: %8.0f msg/s   ratio %.2fx  %s   "
                      "peak RSS %.0f MB per process" % (n, b, w, ratio,
                                            "PASS" if ratio >= 0.8 else
                                            "MISS", max(rss)))
        finally:
            with conn.channel() as ch:
                queue(ch).delete()
    subprocess.run(["rm", "-rf", workdir], check=False)


if __name__ == "__main__":
    main()
