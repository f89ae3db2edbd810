"""Hostile archives through the real commands, under a 1 GiB address space.

Each file goes to ``shoebox-worker verify``, ``verify --salvage`` and
``cat`` as a subprocess under ``prlimit --as=1073741824``: exit code 1,
one line naming the file (no traceback, no "unexpected error"), within
seconds (the bound asserted is a generous guard against a hang; the real
times are in ``pytest --durations``). The bombs are made by hand, so
building them costs nothing: a zstd frame of RLE blocks (4 bytes per 128
KiB of zeros) and gzip members of zeros.
"""

import gzip
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from shoebox_worker import record

#: The address-space limit of every command here.
ADDRESS_SPACE = 1 << 30
#: Guard against a quadratic reader: the CPU seconds a run may use (a run
#: takes about 2.5 here). CPU time, not wall time: with the suite's other
#: tests on 2 cores a 3 s run took 32 s of wall time (seen in CI). A hang
#: is caught by the wall-clock timeout, four times this.
TIME_LIMIT = 30

PRLIMIT = shutil.which("prlimit")
COMMAND = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
COMMANDS = {"verify": ["verify"], "salvage": ["verify", "--salvage"],
            "cat": ["cat"]}

#: record.MAX_BLOCK, the longest block a writer makes (spelled out, so that
#: this file also runs against the code from before the cap).
MAX_BLOCK = 0x7FFFFFFF - 60

GOOD = record.pack({"event_type": "compute.instance.update"}, b'{"a": 1}')


def v2_header(meta_len, raw_len):
    pre = struct.pack("<ihII", record.MAGIC, 2, meta_len, raw_len)
    return pre + struct.pack("<I", zlib.crc32(pre))


def zstd_rle_frame(blocks):
    out = [b"\x28\xb5\x2f\xfd", b"\x00", bytes([(17 - 10) << 3])]
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        out.append((last | 1 << 1 | (128 << 10) << 3).to_bytes(3, "little"))
        out.append(b"\0")
    return b"".join(out)


def gzip_zeros(mib):
    return gzip.compress(bytes(1 << 20), 9) * mib


def zeroed_metadata():
    data = bytearray(record.pack({"event_type": "x", "k": "v"}, b"{}"))
    data[record.HEADER_SIZE:record.HEADER_SIZE + 20] = bytes(20)
    return GOOD + bytes(data) + GOOD


HOSTILE = {
    # 32 KiB decompressing to 1 GiB of zeros: one call of the old reader
    # asked for all of it
    "zstd-bomb.zst": lambda: zstd_rle_frame(8192),
    "gzip-bomb.gz": lambda: gzip_zeros(128),
    # 8 MiB of v2 headers each claiming a 1 MiB record, bad checksums
    "forged.events": lambda: GOOD + v2_header(4, 1 << 20) * (
        (8 << 20) // 18) + GOOD,
    "zeroed-metadata.events": zeroed_metadata,
    "huge-length.events": lambda: GOOD + v2_header(4, 0xFFFFFFFF - 40)
    + bytes(100),
    # the longest block a writer makes, then 512 MiB of zeros
    "huge-length-bomb.gz": lambda: gzip.compress(
        GOOD + v2_header(4, MAX_BLOCK)) + gzip_zeros(512),
    "zstd-bomb-after-a-record.zst": lambda: (
        zstd_rle_frame(1)[:6]  # reuse the frame header, then raw block
        + (len(GOOD) << 3).to_bytes(3, "little") + GOOD
        + zstd_rle_frame(2048)[6:]),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    if PRLIMIT is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("prlimit (util-linux) is missing")
        pytest.skip("prlimit (util-linux) is missing")
    folder = tmp_path_factory.mktemp("hostile")
    for name, make in HOSTILE.items():
        (folder / name).write_bytes(make())
    return folder


def _children_cpu():
    times = os.times()
    return times.children_user + times.children_system


def run_limited(args):
    """Run the command under the limit: its result and its CPU seconds."""
    start = _children_cpu()
    proc = subprocess.run(
        [PRLIMIT, "--as=%d" % ADDRESS_SPACE, COMMAND] + args,
        capture_output=True, timeout=TIME_LIMIT * 4)
    return proc, _children_cpu() - start


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_archive(hostile_dir, name, command):
    path = str(hostile_dir / name)
    for leftover in (path + ".salvaged", path + ".salvaged.tmp"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    proc, took = run_limited(COMMANDS[command] + [path])
    err = proc.stderr.decode("utf-8", "replace")
    out = proc.stdout.decode("utf-8", "replace")
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert proc.returncode == 1, (out, err)
    if command == "cat":  # the good records, then the one line
        lines = err.splitlines()
    else:
        lines = err.splitlines() + out.splitlines()
    assert len(lines) == 1, (out, err)
    assert path in lines[0]
    if lines[0].startswith("shoebox-worker: "):
        pass  # a ToolError or a RecordError, worded for the shell
    else:
        assert command != "cat" and ": DAMAGED: " in lines[0], lines[0]
    assert took < TIME_LIMIT, "%s %s took %.1f s of CPU" % (command, name,
                                                           took)


def test_skippable_frame_first_reads(hostile_dir):
    """A zstd file that starts with a skippable frame (as pzstd writes)."""
    path = str(hostile_dir / "skippable.zst")
    import zstandard
    with open(path, "wb") as f:
        f.write(b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"\0\0\0\0")
        f.write(zstandard.ZstdCompressor().compress(GOOD * 3))
    proc, _ = run_limited(["verify", path])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith(path + ": OK: 3 records")
    proc, _ = run_limited(["cat", path])
    assert proc.returncode == 0 and proc.stdout == b'{"a": 1}\n' * 3


@pytest.mark.skipif(shutil.which("pzstd") is None, reason="no pzstd")
def test_pzstd_archive_reads(hostile_dir, tmp_path):
    plain = tmp_path / "a.events"
    plain.write_bytes(GOOD * 1000)
    path = str(tmp_path / "a.events.zst")
    subprocess.run(["pzstd", "-q", "-p", "2", str(plain), "-o", path],
                   check=True)
    proc, _ = run_limited(["verify", path])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith(path + ": OK: 1000 records")


def test_max_block_is_the_records():
    assert record.MAX_BLOCK == MAX_BLOCK
