"""What ``[integrity]`` costs the worker: its rate with signed digests off
and on, measured in the same run (issue 22: on >= 0.95x of off).

Pre-fills a queue on the local RabbitMQ (``bench/worker.py``'s
``prefill``: the simulator's notifications) and drains it with
``shoebox-worker run --idle-exit 1`` (one process), archives rolling
every ROLL_MB and shipped by ``callbacks = gzip, swift, delete`` to the
local Swift (``bench/ship_consume.py``'s config), in these variants:

- ``off``: no ``[integrity]``;
- ``on, interval N`` for each N of ``--intervals`` (default 2 and 300):
  ``signing_key`` a fresh ``keygen`` key, ``digest_interval = N``. With a
  small N a digest goes out every N seconds while archives ship (each
  signed, put, checked, the key replaced); with 300 only the final one
  at the worker's clean stop. Every archive is recorded either way
  (``chain.json`` written and fsynced each time).

Each variant ships to its own container (made before the first run).
The variants run once per round, rounds interleaved and the order turned
round by round, so drift on a noisy machine falls on all of them. Each
run is timed from outside as the other benches do: the queue depth is
polled and the clock runs from the first message taken to an empty queue
(``drained msg/s``); ``to exit`` adds the time until the worker shipped
everything and exited (the final digest is in it; so is the 1 s of
``--idle-exit``); ``CPU s/100k`` is the worker process's own user +
system time (``wait4``) per 100,000 messages, which other load on the
machine disturbs far less than the wall clock. Prints the median of each
over the rounds, the ratio on/off of the medians (goal 0.95x, PASS/MISS
on ``drained``) and, as ``paired``, the median of the per-round ratios
of ``drained`` (each against the ``off`` run of its own round).

Then, as a check that digests did go out and hold, each ``on`` container
is walked with ``shoebox-worker verify --chain`` (every run's key
pinned): its digests, archives and result are printed. All containers
and the queue are deleted at the end.

Seen on the 2-core dev VM, quiet (broker, worker and Swift on the same
cores), 100,000 messages, medians of 7: off 12,849 msg/s; on, interval
2 s (5 digests a run) 12,547 (0.977x); on, interval 300 s 12,613
(0.982x); worker CPU +2 %. With 2 MB rolls (151 archives a run, medians
of 5): 1.035x and 0.978x, CPU -3 % and +4 %: within the noise. With
other jobs on the machine (load 4-8) runs vary 2-3x and the ratios
swing from 0.80x to 1.09x: run it on a quiet machine.

Needs ST_AUTH, ST_USER and ST_KEY (``eval "$(cat /tmp/saio.env)"`` or
``env="$(scripts/swift-saio start)" && eval "$env"``). Usage::

    .venv/bin/python bench/integrity.py [--count 100000] [--rounds 5]
        [--intervals 2,300] [--roll-mb 10] [--callbacks "gzip, swift,
        delete"]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import kombu
from swiftclient import client as swc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ship_consume  # noqa: E402  (bench/ship_consume.py)
import worker as bench_worker  # noqa: E402  (bench/worker.py)

from shoebox_worker.integrity import keys  # noqa: E402

GOAL = 0.95
URL = bench_worker.URL
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")

INTEGRITY = """
[integrity]
signing_key = {key}
digest_interval = {interval}
"""


class Variant:
    def __init__(self, interval, tag):
        self.interval = interval  # None: integrity off
        self.name = ("off" if interval is None
                     else "on, interval %d s" % interval)
        self.container = "bench-integrity-%s-%s" % (
            tag, "off" if interval is None else "on%d" % interval)
        self.drained, self.to_exit, self.cpu = [], [], []
        self.public_keys = []


def run(conn, queue, count, workdir, variant, args):
    """One worker run; appends its rates to ``variant``."""
    bench_worker.prefill(conn, queue, count)
    directory = tempfile.mkdtemp(dir=workdir)
    path = os.path.join(directory, "bench.conf")
    text = ship_consume.CONFIG.format(
        url=URL, queue=queue.name, exchange=bench_worker.EXCHANGE,
        directory=os.path.join(directory, "archive"), roll_mb=args.roll_mb,
        callbacks=", ".join(args.callbacks))
    text = text.replace("level = WARNING", "level = ERROR")  # a new chain
    if "gzip" in args.callbacks:
        text += ship_consume.GZIP.format(level=6)
    text += ship_consume.SWIFT.format(
        auth=os.environ["ST_AUTH"], user=os.environ["ST_USER"],
        key=os.environ["ST_KEY"], container=variant.container)
    if variant.interval is not None:
        keydir = os.path.join(directory, "keys")
        keys.keygen(keydir)
        # kept: the key file itself is replaced at every digest
        variant.public_keys.append(keys.public_text(keys.load_public(
            os.path.join(keydir, keys.PUBLIC_NAME))))
        text += INTEGRITY.format(
            key=os.path.join(keydir, keys.PRIVATE_NAME),
            interval=variant.interval)
    with open(path, "w") as f:
        f.write(text)
    proc = subprocess.Popen([WORKER, "run", "--config", path,
                             "--idle-exit", "1"])
    seconds = bench_worker.drain_time(conn, queue, count, [proc])
    drained = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)  # its own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = time.perf_counter() - drained
    if proc.returncode != 0:
        raise RuntimeError("worker exited with %s" % proc.returncode)
    left = [n for n in os.listdir(os.path.join(directory, "archive"))
            if n != ".integrity"]  # the chain's state
    if "delete" in args.callbacks and left:
        raise RuntimeError("not shipped: %s" % left)
    subprocess.run(["rm", "-rf", directory], check=False)
    variant.drained.append(count / seconds)
    variant.to_exit.append(count / (seconds + tail))
    variant.cpu.append(usage.ru_utime + usage.ru_stime)


def make_container(name):
    conn = swc.Connection(authurl=os.environ["ST_AUTH"],
                          user=os.environ["ST_USER"],
                          key=os.environ["ST_KEY"], auth_version="1")
    conn.put_container(name)
    conn.put_container(name + "_segments")
    conn.close()


def check_chain(variant, workdir):
    """``verify --chain`` of the variant's container, every key pinned:
    its JSON."""
    cmd = [WORKER, "verify", "--chain", "--json"]
    for number, text in enumerate(variant.public_keys):
        path = os.path.join(workdir, "pinned-%s-%d.pub" % (
            variant.container, number))
        with open(path, "w") as f:
            f.write(text + "\n")
        cmd += ["--public-key", path]
    cmd.append("swift://%s" % variant.container)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError("verify --chain exited %d: %s" % (
            done.returncode, done.stderr.strip()))
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="run every variant this many times, "
                             "interleaved")
    parser.add_argument("--intervals", default="2,300",
                        help="digest_interval of each 'on' variant")
    parser.add_argument("--roll-mb", type=float, default=10)
    parser.add_argument("--callbacks", default="gzip, swift, delete")
    args = parser.parse_args()
    args.callbacks = [c.strip() for c in args.callbacks.split(",")
                      if c.strip()]
    if "swift" not in args.callbacks:
        sys.exit("--callbacks needs swift: digests go where it stores")
    missing = [v for v in ("ST_AUTH", "ST_USER", "ST_KEY")
               if not os.environ.get(v)]
    if missing:
        sys.exit("%s not set: eval \"$(cat /tmp/saio.env)\"" % ", ".join(
            missing))
    tag = uuid.uuid4().hex[:8]
    variants = [Variant(None, tag)] + [
        Variant(int(n), tag) for n in args.intervals.split(",") if n.strip()]
    workdir = tempfile.mkdtemp(prefix="shoebox-bench-integrity-")
    print("%d messages per run, %d round(s), rolls every %g MB, callbacks "
          "%s, broker %s, swift %s" % (
              args.count, args.rounds, args.roll_mb,
              ", ".join(args.callbacks), URL.split("@")[-1],
              os.environ["ST_AUTH"]))
    sys.stdout.flush()
    checks = {}
    with kombu.Connection(URL) as conn:
        exchange = kombu.Exchange(bench_worker.EXCHANGE, type="topic",
                                  durable=False)
        name = "bench-integrity.%d" % os.getpid()
        queue = kombu.Queue(name, exchange, routing_key=name, durable=False)
        try:
            for variant in variants:
                make_container(variant.container)
            for number in range(args.rounds):
                shift = number % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    run(conn, queue, args.count, workdir, variant, args)
                print("round %d: %s" % (number + 1, "   ".join(
                    "%s %.0f" % (v.name, v.drained[-1]) for v in variants)))
                sys.stdout.flush()
            for variant in variants[1:]:
                checks[variant.name] = check_chain(variant, workdir)
            _, objects = ship_consume.swift_objects(variants[0].container)
            shipped = sum(1 for o in objects
                          if not o["name"].endswith(".index"))
        finally:
            for variant in variants:
                ship_consume.delete_container(variant.container)
            with conn.channel() as ch:
                queue(ch).delete()
    subprocess.run(["rm", "-rf", workdir], check=False)
    off = variants[0]
    print("(%d archives per run with integrity off)" % (
        shipped // args.rounds))
    print("%-20s %13s %7s %7s %13s %7s %11s %7s" % (
        "median of %d" % args.rounds, "drained msg/s", "ratio", "paired",
        "to exit msg/s", "ratio", "CPU s/100k", "ratio"))
    base = [statistics.median(x) for x in (off.drained, off.to_exit,
                                           off.cpu)]
    for variant in variants:
        drained, to_exit, cpu = (statistics.median(x) for x in (
            variant.drained, variant.to_exit, variant.cpu))
        paired = statistics.median(on / was for on, was in zip(
            variant.drained, off.drained, strict=True))
        print("%-20s %13.0f %6.3fx %6.3fx %13.0f %6.3fx %11.2f %6.3fx" % (
            variant.name, drained, drained / base[0], paired, to_exit,
            to_exit / base[1], cpu * 100000 / args.count, cpu / base[2]))
    for variant in variants[1:]:
        check = checks[variant.name]
        print("verify --chain of the %s container: %s: %d chain(s), %d "
              "digest(s), %d archive(s), %d finding(s)" % (
                  variant.name, "OK" if check["ok"] else "FAILED",
                  len(check["chains"]), check["digests"], check["archives"],
                  len(check["findings"])))
    worst = min(statistics.median(v.drained) for v in variants[1:])
    ratio = worst / base[0]
    print("goal: on/off >= %.2fx (drained, ratio of medians): worst %.3fx  "
          "%s" % (GOAL, ratio, "PASS" if ratio >= GOAL else "MISS"))

if __name__ == "__main__":
    main()
