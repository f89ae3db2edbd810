"""Does shipping slow consumption down? The worker's rate with and without
it, measured in the same run.

Pre-fills a queue on the local RabbitMQ (as ``bench/worker.py`` does) and
drains it with ``shoebox-worker run --idle-exit`` (one process):

(a) no rolls (``size`` checker, 1024 MB) and no callbacks;
(b) rolls every ~10 MB (``size`` checker) and ``callbacks = gzip, swift,
    delete`` to the local Swift, so archives are compressed and uploaded
    while the queue drains.

Both are timed from outside, the same way: the queue depth is polled and
the clock runs from the first message taken to an empty queue. Prints the
two rates, their ratio (goal: 0.85x, PASS/MISS), and for (b) the time from
an empty queue until everything was shipped and the worker exited.

``--callbacks`` changes the chain of (b), to see what each step costs.
Seen on the 2-core dev VM (broker, worker and Swift on the same cores):
rolls alone 1.02x, ``gzip, delete`` 0.91-0.97x, ``swift, delete`` 0.68x,
the whole chain 0.72-0.78x. The same uploads run from another process slow
a worker that ships nothing just as much (~16k -> ~13.5k msg/s), and the
shipper thread holds the GIL in ~8% of py-spy's samples: the loss is CPU
contention on two cores, not the GIL.

Needs ST_AUTH, ST_USER and ST_KEY (``env="$(scripts/swift-saio start)" &&
eval "$env"``). Usage::

    .venv/bin/python bench/ship_consume.py [--count 100000] [--rounds 1]
        [--roll-mb 10] [--level 6] [--callbacks "gzip, swift, delete"]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid

import kombu
from swiftclient import client as swc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker as bench_worker  # noqa: E402  (bench/worker.py)

GOAL = 0.85
URL = bench_worker.URL

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
callbacks = {callbacks}
fsync_every = 1000
fsync_interval = 1
retry_initial = 0.5
retry_max = 5

[roll_checker:size]
roll_size_mb = {roll_mb}

[worker]
stats_interval = 0

[logging]
level = WARNING
"""

GZIP = """
[callback:gzip]
level = {level}
"""

SWIFT = """
[callback:swift]
auth = {auth}
user = {user}
key = {key}
container = {container}
object_prefix = %Y/%m/%d/
"""


def run(conn, queue, count, workdir, shipping, args, container):
    """One worker run; returns (msg/s, seconds from empty queue to exit)."""
    bench_worker.prefill(conn, queue, count)
    directory = tempfile.mkdtemp(dir=workdir)
    path = os.path.join(directory, "bench.conf")
    text = CONFIG.format(
        url=URL, queue=queue.name, exchange=bench_worker.EXCHANGE,
        directory=os.path.join(directory, "archive"),
        roll_mb=args.roll_mb if shipping else 1024,
        callbacks=", ".join(args.callbacks) if shipping else "")
    if shipping and "gzip" in args.callbacks:
        text += GZIP.format(level=args.level)
    if shipping and "swift" in args.callbacks:
        text += SWIFT.format(auth=os.environ["ST_AUTH"],
                             user=os.environ["ST_USER"],
                             key=os.environ["ST_KEY"], container=container)
    with open(path, "w") as f:
        f.write(text)
    exe = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
    proc = subprocess.Popen([exe, "run", "--config", path,
                             "--idle-exit", "1"])
    seconds = bench_worker.drain_time(conn, queue, count, [proc])
    drained = time.perf_counter()
    proc.wait(600)
    tail = time.perf_counter() - drained
    if proc.returncode != 0:
        raise RuntimeError("worker exited with %s" % proc.returncode)
    left = os.listdir(os.path.join(directory, "archive"))
    if shipping and "delete" in args.callbacks and left:
        raise RuntimeError("not shipped: %s" % left)
    subprocess.run(["rm", "-rf", directory], check=False)
    return count / seconds, tail


def swift_objects(container):
    conn = swc.Connection(authurl=os.environ["ST_AUTH"],
                          user=os.environ["ST_USER"],
                          key=os.environ["ST_KEY"], auth_version="1")
    try:
        return conn, conn.get_container(container, full_listing=True)[1]
    except swc.ClientException as exc:
        if exc.http_status == 404:
            return conn, []
        raise


def delete_container(container):
    """The container and its ``_segments`` (the callback makes both)."""
    for name in (container, container + "_segments"):
        conn, objects = swift_objects(name)
        for obj in objects:
            conn.delete_object(name, obj["name"])
        try:
            conn.delete_container(name)
        except swc.ClientException:
            pass
        conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate (a) and (b) this many times")
    parser.add_argument("--roll-mb", type=float, default=10)
    parser.add_argument("--level", type=int, default=6,
                        help="gzip level of the gzip callback")
    parser.add_argument("--callbacks", default="gzip, swift, delete",
                        help="the chain of (b), to see what costs what")
    args = parser.parse_args()
    args.callbacks = [c.strip() for c in args.callbacks.split(",")
                      if c.strip()]
    missing = [v for v in ("ST_AUTH", "ST_USER", "ST_KEY")
               if not os.environ.get(v)]
    if missing:
        sys.exit("%s not set: env=\"$(scripts/swift-saio start)\" && "
                 "eval \"$env\"" % ", ".join(missing))
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-ship-")
    container = "bench-ship-%s" % uuid.uuid4().hex[:8]
    print("%d messages per run, %d round(s), rolls every %g MB, gzip level "
          "%d, broker %s, swift %s, container %s" % (
              args.count, args.rounds, args.roll_mb, args.level,
              URL.split("@")[-1], os.environ["ST_AUTH"], container))
    plain, shipped, tails = [], [], []
    with kombu.Connection(URL) as conn:
        exchange = kombu.Exchange(bench_worker.EXCHANGE, type="topic",
                                  durable=False)
        name = "bench-ship.%d" % os.getpid()
        queue = kombu.Queue(name, exchange, routing_key=name, durable=False)
        try:
            for _ in range(args.rounds):
                rate, _ = run(conn, queue, args.count, workdir, False, args,
                              container)
                plain.append(rate)
                rate, tail = run(conn, queue, args.count, workdir, True,
                                 args, container)
                shipped.append(rate)
                tails.append(tail)
            _, objects = swift_objects(container)
        finally:
            delete_container(container)  # first: the broker may be gone
            with conn.channel() as ch:
                queue(ch).delete()
    subprocess.run(["rm", "-rf", workdir], check=False)
    a, b = max(plain), max(shipped)
    ratio = b / a
    print("%-36s %8.0f msg/s" % ("(a) no rolls, no callbacks:", a))
    print("%-36s %8.0f msg/s   (%d objects uploaded; empty queue to "
          "exit %.1f s)" % ("(b) rolls + %s:" % (", ".join(args.callbacks)
                                                or "no callbacks"),
                            b, len(objects), min(tails)))
    print("ratio %.2fx  (goal %.2fx)  %s" % (ratio, GOAL,
                                            "PASS" if ratio >= GOAL
                                            else "MISS"))


if __name__ == "__main__":
    main()
