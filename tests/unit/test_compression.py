"""Tests for shoebox_worker.compression: codecs, detection, safe compress."""

import gzip
import io
import os
import shutil
import subprocess
import tracemalloc
import zlib

import pytest
import zstandard

from shoebox_worker import compression
from shoebox_worker import files

DATA = b"".join(b"record %d " % i for i in range(5000))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "a.events"
    path.write_bytes(DATA)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return str(path)


def test_codecs():
    assert compression.get_codec("gzip").suffix == ".gz"
    assert compression.get_codec("zstd").suffix == ".zst"
    assert compression.get_codec("gzip").magic == b"\x1f\x8b"
    assert compression.get_codec("zstd").magic == b"\x28\xb5\x2f\xfd"
    with pytest.raises(ValueError, match="unknown compression"):
        compression.get_codec("lzma")


def test_zstd_missing_gives_install_hint(monkeypatch):
    monkeypatch.delitem(compression.CODECS, "zstd")
    with pytest.raises(ValueError, match="zstandard"):
        compression.get_codec("zstd")


@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_compress_file(source, name):
    codec = compression.get_codec(name)
    dst = compression.compress_file(source, codec)
    assert dst == source + codec.suffix
    assert os.path.exists(source)  # the caller removes the source
    assert not os.path.exists(dst + ".tmp")
    assert os.stat(dst).st_mtime_ns == os.stat(source).st_mtime_ns
    assert compression.is_compressed(dst)
    assert not compression.is_compressed(source)
    with compression.open_read(dst) as f:
        assert f.read() == DATA
    # same source, same bytes; an existing destination is replaced
    first = open(dst, "rb").read()
    assert compression.compress_file(source, codec) == dst
    assert open(dst, "rb").read() == first


def test_levels(source):
    codec = compression.get_codec("gzip")
    dst = compression.compress_file(source, codec, level="1")
    fast = os.path.getsize(dst)
    compression.compress_file(source, codec, level=9)
    assert os.path.getsize(dst) <= fast


def test_open_read_detects_by_magic(tmp_path, source):
    with compression.open_read(source) as f:
        assert f.read() == DATA
    for name in ("gzip", "zstd"):
        dst = compression.compress_file(source, compression.get_codec(name))
        renamed = str(tmp_path / ("renamed-" + name))
        os.rename(dst, renamed)
        with compression.open_read(renamed) as f:
            assert f.read() == DATA


def test_open_read_plain_gzip_and_empty(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(DATA)
    with compression.open_read(path) as f:
        assert f.read() == DATA
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with compression.open_read(empty) as f:
        assert f.read() == b""
    assert not compression.is_compressed(empty)


def test_zstd_several_frames(tmp_path):
    path = tmp_path / "x.zst"
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(cctx.compress(DATA) + cctx.compress(b"tail"))
    with compression.open_read(path) as f:
        assert f.read() == DATA + b"tail"


@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_truncated_stream_raises(source, name):
    dst = compression.compress_file(source, compression.get_codec(name))
    data = open(dst, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(compression.DECOMPRESS_ERRORS):
        with compression.open_read(dst) as f:
            f.read()


def test_fsync_directory(tmp_path):
    files.fsync_directory(str(tmp_path / "anything"))
    files.fsync_directory("relative-name")


# -- hostile and unusual zstd files -----------------------------------------

def zstd_rle_frame(blocks, byte=b"\0"):
    """A zstd frame of ``blocks`` RLE blocks of 128 KiB each, by hand
    (RFC 8878): 4 input bytes per 128 KiB of output."""
    out = [b"\x28\xb5\x2f\xfd", b"\x00", bytes([(17 - 10) << 3])]
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        out.append((last | 1 << 1 | (128 << 10) << 3).to_bytes(3, "little"))
        out.append(byte)
    return b"".join(out)


def skippable_frame(data, nibble=0):
    return (0x184D2A50 | nibble).to_bytes(4, "little") + \
        len(data).to_bytes(4, "little") + data


def test_zstd_bomb_bounded_per_call(tmp_path):
    """256 MiB from an 8 KiB file: each read costs one block's memory, not
    the whole output of 64 KiB of input (2 GiB for a real bomb)."""
    path = tmp_path / "bomb.zst"
    path.write_bytes(zstd_rle_frame(2048))
    assert path.stat().st_size < 9000
    tracemalloc.start()
    try:
        total = 0
        with compression.open_read(path) as f:
            while block := f.read1(1 << 20):
                assert block.count(0) == len(block)
                total += len(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 2048 << 17
    assert peak < 8 << 20


def test_gzip_bomb_bounded_per_call(tmp_path):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(bytes(1 << 20), 9) * 256)
    tracemalloc.start()
    try:
        total = 0
        with compression.open_read(path) as f:
            while block := f.read1(1 << 20):
                total += len(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 256 << 20
    assert peak < 8 << 20


def test_zstd_skippable_frames_are_skipped(tmp_path):
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    path = tmp_path / "x.zst"
    path.write_bytes(skippable_frame(b"\x01\x02\x03\x04") +
                     cctx.compress(DATA) + skippable_frame(b"", 15) +
                     cctx.compress(b"tail"))
    assert compression.is_compressed(path)
    with compression.open_read(path) as f:
        assert f.read() == DATA + b"tail"


@pytest.mark.skipif(shutil.which("pzstd") is None, reason="no pzstd")
def test_pzstd_file_reads(tmp_path, source):
    dst = str(tmp_path / "p.zst")
    subprocess.run(["pzstd", "-q", "-p", "2", source, "-o", dst],
                   check=True)
    with open(dst, "rb") as f:
        assert f.read(4)[1:] == b"\x2a\x4d\x18"  # a skippable frame first
    with compression.open_read(dst) as f:
        assert f.read() == DATA


@pytest.mark.parametrize("data", [
    skippable_frame(b"1234")[:-1],             # ends in a skippable frame
    skippable_frame(b"")[:6],                  # ... in its size
    zstd_rle_frame(3)[:-1],                    # ... in a block
    zstd_rle_frame(3)[:-4],                    # ... in a block header
    b"\x28\xb5\x2f\xfd",                       # ... in the frame header
    zstandard.ZstdCompressor(write_checksum=True).compress(DATA)[:-2],
    zstd_rle_frame(1) + b"\x28\xb5",           # ... in the next magic
])
def test_zstd_truncated_anywhere_raises(tmp_path, data):
    path = tmp_path / "x.zst"
    path.write_bytes(data)
    with pytest.raises(EOFError):
        with compression.open_read(path) as f:
            f.read()


@pytest.mark.parametrize("data", [
    zstd_rle_frame(1) + b"garbage!",           # not a frame after a frame
    b"\x28\xb5\x2f\xfd\x00\x38" + (1 | 3 << 1 | 5 << 3).to_bytes(3,
                                                            "little"),
    b"\x28\xb5\x2f\xfd\x00\x38" + (1 | (129 << 10) << 3).to_bytes(
        3, "little") + bytes(129 << 10),       # a block over 128 KiB
    b"\x28\xb5\x2f\xfd\x00\xf8" + (1 | 1 << 1 | 5 << 3).to_bytes(
        3, "little") + b"\0",                  # a window over the limit
])
def test_zstd_corrupt_raises(tmp_path, data):
    path = tmp_path / "x.zst"
    path.write_bytes(data)
    with pytest.raises(zstandard.ZstdError):
        with compression.open_read(path) as f:
            f.read()


# -- the gzip reader ---------------------------------------------------------

def test_gzip_members_and_zero_padding(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(DATA) + gzip.compress(b"") +
                     gzip.compress(b"tail") + bytes(100))
    with compression.open_read(path) as f:
        assert f.read() == DATA + b"tail"


def test_gzip_header_fields_are_read(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.GzipFile(path, "wb", mtime=1) as f:  # FNAME set
        f.write(DATA)
    with compression.open_read(path) as f:
        assert f.read() == DATA


#: What the inflate in use raises on damage (zlib's, or isal's).
INFLATE_ERRORS = (zlib.error, compression.inflate.error)


@pytest.mark.parametrize("damage, error", [
    (lambda d: d[:-1], EOFError),                    # in the trailer
    (lambda d: d[:11], EOFError),                    # in the header
    (lambda d: d + b"\x1f", EOFError),               # a second magic, cut
    (lambda d: d + b"garbage", gzip.BadGzipFile),    # not a member after
    (lambda d: d[:-8] + bytes(4) + d[-4:], INFLATE_ERRORS),  # bad CRC
    (lambda d: d[:-4] + b"\x01\x02\x03\x04", INFLATE_ERRORS),  # bad size
])
def test_gzip_damage_raises(tmp_path, damage, error):
    path = tmp_path / "x.gz"
    path.write_bytes(damage(gzip.compress(DATA)))
    with pytest.raises(error):
        with compression.open_read(path) as f:
            f.read()


def test_gzip_reads_are_what_was_asked(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(DATA))
    raw = compression._GzipReader(str(path))
    buffer = bytearray(100)
    got = []
    while n := raw.readinto(buffer):
        assert n <= 100
        got.append(bytes(buffer[:n]))
    raw.close()
    assert b"".join(got) == DATA


def test_gzip_reads_the_same_with_either_inflate(tmp_path, monkeypatch):
    # ISA-L's inflate when installed, zlib's otherwise: the same bytes,
    # member after member
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(DATA) + bytes(10) + gzip.compress(DATA))
    with compression.open_read(path) as f:
        fast = f.read()
    monkeypatch.setattr(compression, "inflate", zlib)
    with compression.open_read(path) as f:
        assert f.read() == fast == DATA * 2


# -- reading a file object (a stream from Swift) ----------------------------

class Trickle(io.RawIOBase):
    """A network-like stream: at most ``step`` bytes a read, no seek."""

    def __init__(self, data, step=7):
        self.data = memoryview(data)
        self.step = step
        self.reads = 0

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, buffer):
        self.reads += 1
        n = min(len(buffer), self.step, len(self.data))
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def _compressed(name, data):
    if name == "gzip":
        return gzip.compress(data)
    if name == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.mark.parametrize("name", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize("step", [1, 3, 7, 1 << 16])
def test_open_read_of_a_stream_with_short_reads(name, step):
    data = DATA[:20000] if step == 1 else DATA
    stream = Trickle(_compressed(name, data), step)
    with compression.open_read(stream) as f:
        assert f.read() == data
    assert stream.closed  # the reader owns the stream


def test_open_read_of_a_pzstd_stream(tmp_path, source):
    frames = skippable_frame(b"\0" * 12) + zstandard.ZstdCompressor(
    ).compress(DATA)
    with compression.open_read(Trickle(frames, 5)) as f:
        assert f.read() == DATA


@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_a_truncated_stream_raises(name):
    blob = _compressed(name, DATA)
    with pytest.raises(compression.DECOMPRESS_ERRORS):
        with compression.open_read(Trickle(blob[:len(blob) // 2], 100)) as f:
            f.read()


def test_short_streams_read_as_plain():
    for data in (b"", b"\x1f", b"abc"):
        with compression.open_read(Trickle(data, 1)) as f:
            assert f.read() == data


def test_a_stream_bomb_is_bounded_per_call():
    stream = Trickle(gzip.compress(bytes(1 << 20), 9) * 64, 1 << 16)
    tracemalloc.start()
    try:
        total = 0
        with compression.open_read(stream) as f:
            while block := f.read1(1 << 20):
                total += len(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert peak < 8 << 20


def test_zstd_without_zstandard_closes_the_stream(monkeypatch):
    monkeypatch.delitem(compression.CODECS, "zstd")
    stream = Trickle(_compressed("zstd", DATA))
    with pytest.raises(ValueError, match="zstandard"):
        compression.open_read(stream)
    assert stream.closed
