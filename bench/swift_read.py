"""Reading archives in Swift: ``cat swift://`` against downloading first.

Uploads ARCHIVES gzipped archives (plus as many zstd ones with ``--zstd``)
of realistic notifications (bench/format.py's ``build``: the simulator's
nova notifications, the worker's eight metadata keys) to a fresh container
of the Swift in ``ST_AUTH``/``ST_USER``/``ST_KEY``, then in the same run
times, best of ROUNDS, interleaved:

(a) the baseline: ``swift download`` of the container into an empty
    directory (the swift CLI's defaults: 10 objects at a time), followed
    by a local ``shoebox-worker cat`` of that directory;
(b) ``shoebox-worker cat --jobs N swift://CONTAINER``: no copy on disk,
    the objects streamed and decompressed as they come.

Both write the records to /dev/null; their line counts are checked once
against each other. Prints the seconds of each and the ratio (a) / (b),
which the issue wants >= 1.0x. The container is deleted at the end.
Usage::

    source .swift-saio/saio.env
    .venv/bin/python bench/swift_read.py [--archives 16] [--records 5000]
        [--jobs 4] [--rounds 3] [--zstd]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from swiftclient import client as swc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import format as format_bench  # noqa: E402  (bench/format.py)

from shoebox_worker import archive  # noqa: E402
from shoebox_worker import compression  # noqa: E402

BIN = os.path.dirname(sys.executable)
WORKER = os.path.join(BIN, "shoebox-worker")
SWIFT = os.path.join(BIN, "swift")


def make_archives(directory, archives, records, codecs):
    """``archives`` archives per codec of ``records`` records each; the
    compressed paths, in the order written."""
    data = format_bench.build(records * archives)
    paths = []
    for codec in codecs:
        for number in range(archives):
            path = os.path.join(directory, "shoebox_%s_%03d.events"
                                % (codec, number))
            with archive.ArchiveWriter(path) as writer:
                for metadata, payload in data[number * records:
                                              (number + 1) * records]:
                    writer.write(metadata, payload)
            paths.append(compression.compress_file(
                path, compression.get_codec(codec)))
            os.unlink(path)
    return paths


def run(argv, stdout=subprocess.DEVNULL):
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit("%s failed: %s" % (argv[:3], result.stderr.decode()
                                            [-2000:]))
    return elapsed, result


def download_then_cat(container, scratch):
    target = tempfile.mkdtemp(prefix="download-", dir=scratch)
    try:
        start = time.perf_counter()
        run([SWIFT, "download", "-q", container, "-D", target])
        run([WORKER, "cat", target])
        return time.perf_counter() - start
    finally:
        shutil.rmtree(target)


def cat_swift(container, jobs):
    return run([WORKER, "cat", "--jobs", str(jobs),
                "swift://" + container])[0]


def count_lines(argv):
    result = subprocess.run(argv, capture_output=True, check=True)
    return result.stdout.count(b"\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=int, default=16)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zstd", action="store_true",
                        help="as many zstd archives again")
    args = parser.parse_args(argv)
    env = os.environ
    missing = [v for v in ("ST_AUTH", "ST_USER", "ST_KEY") if not env.get(v)]
    if missing:
        raise SystemExit("set %s (source .swift-saio/saio.env)"
                         % ", ".join(missing))
    conn = swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1")
    container = "bench-read-%s" % uuid.uuid4().hex[:12]
    scratch = tempfile.mkdtemp(prefix="bench-swift-read-", dir=os.getcwd())
    try:
        codecs = ["gzip"] + (["zstd"] if args.zstd else [])
        paths = make_archives(scratch, args.archives, args.records, codecs)
        stored = sum(os.path.getsize(p) for p in paths)
        conn.put_container(container)
        for path in paths:
            with open(path, "rb") as f:
                conn.put_object(container, os.path.basename(path), f)
        # the same records either way
        local = tempfile.mkdtemp(prefix="check-", dir=scratch)
        subprocess.run([SWIFT, "download", "-q", container, "-D", local],
                       check=True)
        expected = count_lines([WORKER, "cat", local])
        got = count_lines([WORKER, "cat", "swift://" + container])
        shutil.rmtree(local)
        if got != expected:
            raise SystemExit("cat swift:// printed %d lines, cat of the "
                             "download %d" % (got, expected))
        best_a = best_b = float("inf")
        for _ in range(args.rounds):
            best_a = min(best_a, download_then_cat(container, scratch))
            best_b = min(best_b, cat_swift(container, args.jobs))
    finally:
        try:
            for obj in conn.get_container(container, full_listing=True)[1]:
                conn.delete_object(container, obj["name"])
            conn.delete_container(container)
        except swc.ClientException:
            pass
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print("%d objects (%s), %d records, %.1f MB stored; best of %d"
          % (len(paths), ", ".join(codecs), expected, stored / 1e6,
             args.rounds))
    print("swift download + local cat: %.2f s" % best_a)
    print("cat --jobs %d swift://:      %.2f s  (%.2fx)"
          % (args.jobs, best_b, best_a / best_b))


if __name__ == "__main__":
    main()
