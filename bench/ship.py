"""Upload speed: the ``swift`` callback against python-swiftclient's CLI.

Writes archives of 10 MB and 200 MB (synthetic nova notifications from
shoebox_worker.tools.simulator, or inline JSON when it is missing), then
uploads each one, in the same run, (a) with ``swift upload`` (the venv's
CLI, whole process timed) and (b) with ``SwiftUploadCallback.on_close``
given the writer's report, as the shipper calls it (a fresh callback each
time, so authentication is timed too), alternating, best of 3 each. Each
segment size in ``--segment-sizes`` is one round, the same for both, so
both do SLO or neither: the default 1G (the callback's default: a plain
object up to 1 GiB) and 64M (a 200 MB archive as an SLO of 3 segments;
the CLI PUTs its segments in parallel, the callback in order).

Needs ST_AUTH, ST_USER and ST_KEY (``env="$(scripts/swift-saio start)" &&
eval "$env"``). Usage: ``python bench/ship.py [--sizes 10,200]
[--segment-sizes 1G,64M] [--runs 3]``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import options
from shoebox_worker.ship import swift

GOAL = 0.9


def notifications():
    try:
        from shoebox_worker.tools import simulator
    except ImportError:
        simulator = None
    if simulator is not None:
        yield from simulator.notifications(
            seed=42, start=datetime.datetime(2026, 1, 1))
        return
    moment = datetime.datetime(2026, 1, 1)
    for i in range(10 ** 9):
        moment += datetime.timedelta(seconds=0.25)
        yield {"event_type": "compute.instance.update",
               "message_id": str(uuid.UUID(int=i)),
               "timestamp": moment.strftime("%Y-%m-%d %H:%M:%S.%f"),
               "publisher_id": "compute.host%d" % (i % 40),
               "priority": "INFO",
               "_context_request_id": "req-%s" % uuid.UUID(int=i // 7),
               "payload": {"instance_id": str(uuid.UUID(int=i // 30)),
                           "state": "active", "memory_mb": 2048,
                           "image_meta": {"os": "ubuntu", "pad": "x" * 2000}}}


def write_archive(path, megabytes):
    """:returns: the writer's report (what the shipper passes on)."""
    limit = megabytes * 1000 * 1000
    with archive.ArchiveWriter(path) as writer:
        for n in notifications():
            meta = {key: str(n.get(key, "")) for key in (
                "event_type", "message_id", "timestamp", "publisher_id",
                "priority")}
            meta["request_id"] = str(n.get("_context_request_id", ""))
            writer.write(meta, json.dumps(n))
            if writer.tell() >= limit:
                break
    return writer.report()


def cli_upload(env, container, path, segment_size):
    swift_cli = os.path.join(os.path.dirname(sys.executable), "swift")
    started = time.perf_counter()
    subprocess.run([swift_cli, "-A", env["ST_AUTH"], "-U", env["ST_USER"],
                    "-K", env["ST_KEY"], "upload", "--segment-size",
                    str(segment_size), "--object-name",
                    os.path.basename(path), container, path],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def callback_upload(env, container, path, segment_size, report):
    started = time.perf_counter()
    cb = swift.SwiftUploadCallback(
        auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
        container=container, segment_size=str(segment_size))
    try:
        cb.on_close(path, report=report)
    finally:
        cb.close()
    return time.perf_counter() - started


def cleanup(env, containers):
    conn = swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=1)
    for cont in containers:
        try:
            for obj in conn.get_container(cont, full_listing=True)[1]:
                conn.delete_object(cont, obj["name"])
            conn.delete_container(cont)
        except swc.ClientException as exc:
            if exc.http_status != 404:
                raise
    conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,200",
                        help="archive sizes in MB (default 10,200)")
    parser.add_argument("--segment-sizes", default="1G,64M",
                        help="one round per segment size (default 1G,64M)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write them")
    args = parser.parse_args(argv)
    missing = [n for n in ("ST_AUTH", "ST_USER", "ST_KEY")
               if not os.environ.get(n)]
    if missing:
        sys.exit("%s not set; run: env=\"$(scripts/swift-saio start)\" && "
                 "eval \"$env\"" % ", ".join(missing))
    env = {n: os.environ[n] for n in ("ST_AUTH", "ST_USER", "ST_KEY")}
    tag = uuid.uuid4().hex[:8]
    cli_container = "bench-cli-" + tag
    cb_container = "bench-cb-" + tag
    verdicts = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        try:
            for megabytes in (int(s) for s in args.sizes.split(",")):
                path = os.path.join(tmp, "bench-%dmb.events" % megabytes)
                report = write_archive(path, megabytes)
                size = os.path.getsize(path)
                for text in args.segment_sizes.split(","):
                    segment_size = options.size()(text)
                    kind = ("SLO of %d segments"
                            % -(-size // segment_size)
                            if size > segment_size else "plain object")
                    cli, cb = [], []
                    for _ in range(args.runs):
                        cli.append(cli_upload(env, cli_container, path,
                                              segment_size))
                        cb.append(callback_upload(env, cb_container, path,
                                                  segment_size, report))
                    cli_rate = size / min(cli) / 1e6
                    cb_rate = size / min(cb) / 1e6
                    ratio = cb_rate / cli_rate
                    verdict = "PASS" if ratio >= GOAL else "MISS"
                    verdicts.append(verdict)
                    print("%4d MB archive (%d bytes, %d records), segment "
                          "size %s: %s, best of %d:"
                          % (megabytes, size, report.records, text, kind,
                             args.runs))
                    print("  swift upload CLI      %6.3f s  %7.1f MB/s"
                          % (min(cli), cli_rate))
                    print("  SwiftUploadCallback   %6.3f s  %7.1f MB/s"
                          % (min(cb), cb_rate))
                    print("  ratio callback/CLI    %.2fx  goal %.1fx  %s"
                          % (ratio, GOAL, verdict))
                    sys.stdout.flush()
        finally:
            cleanup(env, [cli_container, cli_container + "_segments",
                          cb_container, cb_container + "_segments"])
    return 0 if all(v == "PASS" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
