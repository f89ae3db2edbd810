"""Tests for shoebox_worker.compression: codecs, detection, safe compress."""

import gzip
import os

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
