"""Hostile ``.index`` objects and bundles on the real Swift, through ``cat``
as a subprocess under ``prlimit --as``.

One container of archives written as the worker writes them
(``ft.write_archive``), every one holding records of the instance
``TARGET``. Each has a hostile ``.index`` object (CASES): one whose
filter claims 4 GiB, one of 100 MB of bytes after a good header (by its
``Content-Length`` far more than its header allows), one cut short, one
with a wrong checksum, one of a huge record count with a filter past its
end. Two more archives have their own, good indexes: one holds
``TARGET`` too, one does not (so pruning is still seen to work). A
pruned ``cat`` must then print every record of ``TARGET``, exit 0 (an
index not used is a warning, not an error: docs/reading.md), say one
warning line per hostile index, GET no archive that the good index rules
out, and stay under an address space that the 100 MB object read whole
(as the reader did before it was capped) would not fit in. A hostile
bundle (more than :data:`index.MAX_BUNDLE_BYTES` by the listing, as the
test sets it low) is one warning line, and the archives' own indexes are
read instead.

Needs ST_AUTH, ST_USER and ST_KEY; skipped without them, or failing when
CI=true.
"""

import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib

import orjson
import pytest
from swiftclient import client as swc

from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

TARGET = "hostile-target-instance"
RECORDS = 30
PRLIMIT = shutil.which("prlimit")
#: The address space of each ``cat``: what it needs here with the capped
#: reads (measured: 110 MiB runs), and less than the reader before the
#: cap needed to hold the 100 MB object whole, and its copies (measured:
#: a MemoryError at 160 and 200 MiB, 250 MiB ran).
ADDRESS_SPACE = 160 << 20
#: The big object.
BIG = 100 * 1000 * 1000
#: Runs ``cli.main(argv)`` with ``index.MAX_BUNDLE_BYTES`` set to
#: ``argv[1]`` (a module constant: the test sets it low).
SCRIPT = ("import sys; from shoebox_worker import index, cli; "
          "index.MAX_BUNDLE_BYTES = int(sys.argv[1]); "
          "sys.exit(cli.main(sys.argv[2:]))")


def _crc(body):
    return body + struct.pack("<I", zlib.crc32(body))


def _one_field(filter_length, filter_bytes, records=1):
    """A version 1 index of one field whose filter says it is
    ``filter_length`` bytes, followed by ``filter_bytes``."""
    body = struct.pack("<4sBBHQ", index.MAGIC, 1, 0, 1, records)
    body += b"\0\0"  # no time range
    path = b"payload.instance_id"
    body += struct.pack("<H", len(path)) + path
    body += struct.pack("<IBI", 1, 3, filter_length) + filter_bytes
    return body


def _huge_bit_count(good):
    # a valid checksum over a filter that claims 4 GiB (32 Gbit)
    return _crc(_one_field(0xFFFFFFFF, b"\xff" * 64))


def _huge_records(good):
    # 2**64 - 1 records claimed, so the header allows the most: a filter
    # past the end all the same
    return _crc(_one_field(1 << 20, b"\xff" * 64, records=(1 << 64) - 1))


def _big(good):
    # a good header (6 fields, RECORDS records), then zeros to BIG
    return good[:index.HEAD_BYTES] + bytes(BIG - index.HEAD_BYTES)


def _truncated(good):
    return good[:len(good) // 2]


def _bad_crc(good):
    return good[:-1] + bytes([good[-1] ^ 0xFF])


CASES = {"huge-bits": _huge_bit_count, "huge-records": _huge_records,
         "big": _big, "truncated": _truncated, "bad-crc": _bad_crc}


def _notes(seed, target):
    notes = list(simulator.notifications(RECORDS, seed=seed))
    if target:
        for note in notes[::7]:
            note["payload"]["instance_id"] = TARGET
    return notes


@pytest.fixture(scope="module")
def hostile(ft, swift_env, tmp_path_factory):
    if PRLIMIT is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("prlimit (util-linux) is missing")
        pytest.skip("prlimit (util-linux) is missing")
    container = "shoebox-hostile-%s" % uuid.uuid4().hex[:12]
    directory = tmp_path_factory.mktemp("hostile")
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=60)
    conn.put_container(container)
    try:
        wanted = 0
        kinds = sorted(CASES) + ["good-with", "good-without"]
        for seed, kind in enumerate(kinds):
            notes = _notes(100 + seed, kind != "good-without")
            wanted += sum(n["payload"].get("instance_id") == TARGET
                          for n in notes)
            path, _ = ft.write_archive(notes, directory, kind + ".events")
            name = os.path.basename(path)
            with open(path, "rb") as f:
                conn.put_object(container, name, f.read())
            with open(index.sidecar(path), "rb") as f:
                # bound to the object, as the swift step uploads it
                good = index.bind(f.read(), index.etag_of_file(path),
                                  os.path.getsize(path))
            data = CASES[kind](good) if kind in CASES else good
            conn.put_object(container, name + index.SUFFIX, data)
        yield {"container": container, "conn": conn, "wanted": wanted,
               "env": swift_env}
    finally:
        ft.delete_swift_container(conn, container)
        conn.close()


def _cat(hostile, *argv, bundle_cap=index.MAX_BUNDLE_BYTES):
    env = dict(os.environ, **hostile["env"])
    return subprocess.run(
        [PRLIMIT, "--as=%d" % ADDRESS_SPACE, sys.executable, "-c", SCRIPT,
         str(bundle_cap), "cat", *argv, "swift://" + hostile["container"]],
        capture_output=True, timeout=120, env=env)


def _targets(out):
    return sum(orjson.loads(line)["payload"].get("instance_id") == TARGET
               for line in out.splitlines())


@pytest.mark.parametrize("selection", [
    ["--where", "payload.instance_id=" + TARGET],
    ["--since", "2000-01-01T00:00:00", "--where",
     "payload.instance_id=" + TARGET]])
def test_hostile_indexes_prune_nothing_and_are_one_warning_each(
        hostile, selection):
    proc = _cat(hostile, *selection)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "MemoryError" not in err, err
    assert _targets(proc.stdout) == hostile["wanted"]
    lines = err.splitlines()
    assert len(lines) == len(CASES), err
    for kind in CASES:
        (line,) = [x for x in lines if "/%s.events.gz.index" % kind in x]
        assert line.startswith("shoebox-worker: warning: "), line
        assert line.endswith("; reading swift://%s/%s.events.gz in full" % (
            hostile["container"], kind)), line
    (big,) = [x for x in lines if "/big." in x]
    assert "%d bytes, more than a reader takes for it" % BIG in big, big


def test_the_good_index_still_prunes(hostile, swift_gets, capsysbinary):
    # in this process, to count the GETs: every archive but the one whose
    # good index rules TARGET out
    capsysbinary.readouterr()
    code = cli.main(["cat", "--where", "payload.instance_id=" + TARGET,
                     "swift://" + hostile["container"]])
    out, err = capsysbinary.readouterr()
    assert code == 0, err
    assert _targets(out) == hostile["wanted"]
    archives = sorted(o for _, o in swift_gets if o.endswith(".gz"))
    assert archives == sorted("%s.events.gz" % kind for kind in
                              sorted(CASES) + ["good-with"])
    assert len(err.decode().splitlines()) == len(CASES)


def test_a_bundle_over_the_cap_is_one_warning(hostile):
    conn, container = hostile["conn"], hostile["container"]
    listing = conn.get_container(container, full_listing=True)[1]
    entries = []
    for entry in listing:
        if entry["name"].endswith(".events.gz"):
            _, data = conn.get_object(container,
                                      entry["name"] + index.SUFFIX)
            entries.append((entry["name"], entry["hash"], data[:1 << 16]))
    bundle = index.build_bundle(entries)
    name = index.BUNDLE_SUFFIX
    conn.put_object(container, name, bundle)
    try:
        proc = _cat(hostile, "--where", "payload.instance_id=" + TARGET,
                    bundle_cap=len(bundle) - 1)
    finally:
        conn.delete_object(container, name)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert _targets(proc.stdout) == hostile["wanted"]
    lines = err.splitlines()
    assert lines[0] == (
        "shoebox-worker: warning: swift://%s/%s: %d bytes, more than a "
        "reader takes for it (%d); reading the indexes of its archives "
        "instead" % (container, name, len(bundle), len(bundle) - 1)), err
    assert len(lines) == 1 + len(CASES), err
