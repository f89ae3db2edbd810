"""Compression codecs: a small table, gzip always, zstd when installed.

Readers detect the codec from the file's first bytes, not its name, so a
renamed archive still reads. Compressing writes a temporary file, fsyncs
it, renames it into place and fsyncs the directory: a crash never leaves a
truncated archive under the final name.
"""

import dataclasses
import gzip
import io
import logging
import os
import shutil
import zlib

from shoebox_worker import files

__all__ = [
    "Codec",
    "CODECS",
    "get_codec",
    "open_read",
    "is_compressed",
    "DECOMPRESS_ERRORS",
    "compress_file",
]

LOG = logging.getLogger(__name__)

try:  # optional extra: pip install shoebox-worker[zstd]
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

_COPY_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Codec:
    """One compression format.

    :param name: the name used in config and plugin names.
    :param suffix: appended to a compressed file's name.
    :param magic: the first bytes of every file in this format.
    :param default_level: the level used when none is given.
    """

    name: str
    suffix: str
    magic: bytes
    default_level: int

    def open_read(self, path):
        """Open ``path`` for reading its uncompressed bytes."""
        if self.name == "gzip":
            return gzip.open(path, "rb")
        return io.BufferedReader(_ZstdReader(path), _COPY_CHUNK)

    def open_write(self, fileobj, level, mtime):
        """Wrap an open binary file for writing compressed bytes."""
        if self.name == "gzip":
            return gzip.GzipFile(filename="", mode="wb", fileobj=fileobj,
                                 compresslevel=level, mtime=mtime)
        return zstandard.ZstdCompressor(level=level).stream_writer(
            fileobj, closefd=False)


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file, frame after frame, and raise EOFError when
    it ends inside a frame. (zstandard's ``stream_reader`` returns a
    truncated frame's bytes as if the file ended cleanly.)"""

    def __init__(self, path):
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read
        self._out = b""
        self._pos = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        while self._pos == len(self._out):
            if not self._decode_more():
                return 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decode_more(self):
        data = self._file.read(1 << 16)
        if not data:
            if self._frame is not None:
                raise EOFError("zstd stream ends inside a frame")
            return False
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:
                data, self._frame = self._frame.unused_data, None
        self._out, self._pos = b"".join(out), 0
        return True

    def close(self):
        if not self.closed:
            self._file.close()
        super().close()


CODECS = {"gzip": Codec("gzip", ".gz", b"\x1f\x8b", 6)}
if zstandard is not None:
    CODECS["zstd"] = Codec("zstd", ".zst", b"\x28\xb5\x2f\xfd", 3)

#: What reading a damaged or truncated compressed stream raises.
DECOMPRESS_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
if zstandard is not None:
    DECOMPRESS_ERRORS += (zstandard.ZstdError,)
_MAGICS = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd")


def get_codec(name):
    """The codec called ``name``.

    :raises ValueError: unknown, or not installed (zstd without zstandard).
    """
    try:
        return CODECS[name]
    except KeyError:
        if name == "zstd":
            raise ValueError("zstd needs the zstandard package "
                             "(pip install shoebox-worker[zstd])") from None
        raise ValueError("unknown compression %r (known: %s)"
                         % (name, ", ".join(sorted(CODECS)))) from None


def open_read(path):
    """Open an archive for reading, decompressing it when needed.

    :returns: a binary file object of the uncompressed bytes.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    for codec in CODECS.values():
        if head.startswith(codec.magic):
            return codec.open_read(path)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        get_codec("zstd")  # raises the install hint
    return open(path, "rb")


def is_compressed(path):
    """True when ``path`` starts with a gzip or zstd magic number."""
    with open(path, "rb") as f:
        return f.read(4).startswith(_MAGICS)


def compress_file(src, codec, level=None):
    """Compress ``src`` to ``src + codec.suffix``; the source is kept.

    Writes ``<dst>.tmp`` (created exclusively and locked, never through a
    symlink; a crash's leftover is replaced:
    :func:`~shoebox_worker.files.create_temporary`), fsyncs, renames,
    fsyncs the directory. An existing destination (left by a crash after
    the rename) is replaced: compressing the same source gives the same
    bytes. The result keeps the source's modification time, so readers
    still order files as written.

    :returns: the compressed file's path.
    :raises BlockingIOError: another process is compressing ``src`` now.
    """
    dst = src + codec.suffix
    tmp = dst + ".tmp"
    level = codec.default_level if level is None else int(level)
    stat = os.stat(src)
    lock = files.create_temporary(tmp)
    try:
        with open(src, "rb") as fin, os.fdopen(os.dup(lock.fd), "wb") as raw:
            out = codec.open_write(raw, level, mtime=int(stat.st_mtime))
            shutil.copyfileobj(fin, out, _COPY_CHUNK)
            out.close()
            raw.flush()
            os.fsync(raw.fileno())
            os.utime(raw.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        lock.release()
    files.fsync_directory(dst)
    LOG.debug("compressed %s to %s (%d -> %d bytes)", src, dst,
              stat.st_size, os.path.getsize(dst))
    return dst
