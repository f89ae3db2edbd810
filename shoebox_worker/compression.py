"""Compression codecs: a small table, gzip always, zstd when installed.

Readers detect the codec from the file's first bytes, not its name, so a
renamed archive still reads (a zstd file may start with a skippable frame,
as ``pzstd`` writes). They read a path, or a binary file object read from
front to back only (an object streamed from Swift): the bytes looked at to
detect the codec are put back in front of the rest (:class:`_Prefixed`),
so nothing is read twice and nothing needs to seek. Readers are bounded:
each decompression call makes at most one zstd block (128 KiB) or what was
asked for (gzip), so a small file that decompresses to gigabytes costs
time in proportion, not memory.

Compressing writes a temporary file, fsyncs it, renames it into place and
fsyncs the directory: a crash never leaves a truncated archive under the
final name.
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

try:  # the zstd extra of shoebox-worker: pip install zstandard
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

try:  # a dependency; zlib where it cannot be installed
    from isal import isal_zlib as inflate
except ImportError:  # pragma: no cover - depends on the environment
    #: What decompresses gzip: ISA-L's zlib-compatible inflate (the isal
    #: package: about twice as fast), else zlib: the same bytes.
    inflate = zlib

_COPY_CHUNK = 1 << 20
_GZIP_INPUT = 1 << 16
# zstd's frame magic, the skippable frames' (low 4 bits free), and the
# largest block the format allows (RFC 8878: Block_Maximum_Size)
_ZSTD_FRAME = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50
_ZSTD_MAX_BLOCK = 128 << 10


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

    def open_read(self, source):
        """Open ``source`` (a path, or a binary file object, which the
        reader then owns and closes) for reading its uncompressed bytes."""
        reader = _GzipReader if self.name == "gzip" else _ZstdReader
        return io.BufferedReader(reader(source), _COPY_CHUNK)

    def open_write(self, fileobj, level, mtime):
        """Wrap an open binary file for writing compressed bytes."""
        if self.name == "gzip":
            return gzip.GzipFile(filename="", mode="wb", fileobj=fileobj,
                                 compresslevel=level, mtime=mtime)
        return zstandard.ZstdCompressor(level=level).stream_writer(
            fileobj, closefd=False)


class _GzipReader(io.RawIOBase):
    """Decompress a .gz file, member after member, with zlib's API
    directly (:data:`inflate`: ISA-L's when installed, else zlib's):
    each call makes at most what was asked for (zlib's ``max_length``),
    and takes input 64 KiB at a time (zlib copies what a member leaves
    unused; the standard library's reader copies its input again for
    every 8 KiB it gives out: 5 s a GiB of zeros here, 3 s with this).
    Raises EOFError when the file ends inside a member, zlib.error (or
    isal's) or BadGzipFile on damage (all in :data:`DECOMPRESS_ERRORS`)."""

    def __init__(self, source):
        self._file = _binary(source)
        self._zlib = None  # decompressobj of the member being read
        self._input = b""  # compressed bytes not given to zlib yet

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            if self._zlib is None and not self._start_member():
                return 0
            at_end = False
            if not self._input:
                self._input = self._file.read(_GZIP_INPUT)
                at_end = not self._input
            out = self._zlib.decompress(self._input, len(buffer))
            self._input = self._zlib.unconsumed_tail
            if self._zlib.eof:
                self._input, self._zlib = self._zlib.unused_data, None
            if out:
                buffer[:len(out)] = out
                return len(out)
            if at_end:
                raise EOFError("gzip stream ends inside a member")

    def _start_member(self):
        """Set up the next member (zero padding skipped, as gzip does);
        False at the end of the file."""
        data = self._input
        while True:
            data = data.lstrip(b"\0")
            if len(data) >= 2:
                break
            more = self._file.read(_GZIP_INPUT)
            if not more:
                if data:
                    raise EOFError("gzip stream ends inside a member")
                return False
            data += more
        if not data.startswith(b"\x1f\x8b"):
            raise gzip.BadGzipFile("not a gzip member")
        self._input = data
        self._zlib = inflate.decompressobj(16 + zlib.MAX_WBITS)
        return True

    def close(self):
        if not self.closed:
            self._file.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file frame after frame, one block at a time.

    The reader walks the frames itself (RFC 8878) and hands the
    decompressor one block per call, so no call makes more than one
    block's output (128 KiB): a small file that decompresses to
    gigabytes costs time, never memory. Walking the frames also skips
    skippable frames (``pzstd`` starts its files with one) and raises
    EOFError when the file ends inside a frame (zstandard's
    ``stream_reader`` returns a truncated frame's bytes as if the file
    ended cleanly).
    """

    def __init__(self, source):
        self._file = _binary(source)
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read
        self._checksum = False  # the frame ends with a 4-byte checksum
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

    def _take(self, size, what):
        data = self._file.read(size)
        if len(data) != size:
            raise EOFError("zstd stream ends inside %s" % what)
        return data

    def _decode_more(self):
        """Decode blocks until about :data:`_COPY_CHUNK` bytes are out;
        False at the end of the file."""
        out = []
        have = 0
        while have < _COPY_CHUNK:
            if self._frame is None and not self._start_frame():
                break
            header = self._take(3, "a frame")
            value = int.from_bytes(header, "little")
            kind, size = (value >> 1) & 3, value >> 3
            if kind == 3 or size > _ZSTD_MAX_BLOCK:
                raise zstandard.ZstdError("zstd block header is corrupt")
            data = self._frame.decompress(
                header + self._take(1 if kind == 1 else size, "a frame"))
            if value & 1:  # the frame's last block
                if self._checksum:
                    data += self._frame.decompress(self._take(4, "a frame"))
                if not self._frame.eof:
                    raise zstandard.ZstdError(
                        "zstd frame does not end with its last block")
                self._frame = None
            out.append(data)
            have += len(data)
        if not out:
            return False
        self._out, self._pos = b"".join(out), 0
        return True

    def _start_frame(self):
        """Read up to a frame's first block, skipping skippable frames;
        False at the end of the file."""
        while True:
            magic = self._file.read(4)
            if not magic:
                return False
            if len(magic) < 4:
                raise EOFError("zstd stream ends inside a frame header")
            number = int.from_bytes(magic, "little")
            if number & 0xFFFFFFF0 != _ZSTD_SKIPPABLE:
                break
            size = int.from_bytes(self._take(4, "a skippable frame"),
                                  "little")
            if len(self._file.read(size)) != size:
                raise EOFError("zstd stream ends inside a skippable frame")
        if number != _ZSTD_FRAME:
            raise zstandard.ZstdError("not a zstd frame")
        descriptor = self._take(1, "a frame header")
        flags = descriptor[0]
        single = flags >> 5 & 1
        rest = ((0 if single else 1) + (0, 1, 2, 4)[flags & 3]
                + ((single, 2, 4, 8)[flags >> 6]))
        self._checksum = bool(flags >> 2 & 1)
        self._frame = self._dctx.decompressobj()
        self._frame.decompress(magic + descriptor
                               + self._take(rest, "a frame header"))
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
if inflate is not zlib:
    DECOMPRESS_ERRORS += (inflate.error,)
if zstandard is not None:
    DECOMPRESS_ERRORS += (zstandard.ZstdError,)


def get_codec(name):
    """The codec called ``name``.

    :raises ValueError: unknown, or not installed (zstd without zstandard).
    """
    try:
        return CODECS[name]
    except KeyError:
        if name == "zstd":
            raise ValueError("zstd needs the zstandard package (pip "
                             "install zstandard: the zstd extra of "
                             "shoebox-worker)") from None
        raise ValueError("unknown compression %r (known: %s)"
                         % (name, ", ".join(sorted(CODECS)))) from None


def _format_of(head):
    """``"gzip"``, ``"zstd"`` or None (plain) for a file's first bytes. A
    zstd file may start with a skippable frame (``pzstd`` writes one)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd") or (
            len(head) == 4
            and int.from_bytes(head, "little") & 0xFFFFFFF0
            == _ZSTD_SKIPPABLE):
        return "zstd"
    return None


def _is_path(source):
    return isinstance(source, (str, bytes, os.PathLike))


def _binary(source):
    """A binary file object of ``source``: a path opened, a file object
    as it is."""
    return open(source, "rb") if _is_path(source) else source


def _read_exactly(f, size):
    """Up to ``size`` bytes: fewer only at the end of the stream (a
    stream may return less than asked before its end)."""
    parts, have = [], 0
    while have < size:
        data = f.read(size - have)
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were read (to detect its codec), with
    those bytes put back in front of the rest. Closing it closes the
    stream."""

    def __init__(self, head, stream):
        self._head = head
        self._stream = stream
        self._read = getattr(stream, "read1", None) or stream.read
        self.name = getattr(stream, "name", None)

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        if not self.closed:
            self._stream.close()
        super().close()


def open_read(source):
    """Open an archive for reading, decompressing it when needed.

    :param source: a path, or a binary file object (read once, front to
        back; the returned reader owns it and closes it).
    :returns: a binary file object of the uncompressed bytes.
    :raises ValueError: a zstd file without the zstandard package.
    """
    if _is_path(source):
        with open(source, "rb") as f:
            name = _format_of(f.read(4))
        if name is None:
            return open(source, "rb")
        return get_codec(name).open_read(source)  # zstd: or the hint
    try:
        head = _read_exactly(source, 4)
        name = _format_of(head)
        codec = None if name is None else get_codec(name)
    except BaseException:
        source.close()
        raise
    # buffered: a read returns all that was asked for unless the stream
    # ends (the zstd reader counts on it; a network stream gives less)
    stream = io.BufferedReader(_Prefixed(head, source), _COPY_CHUNK)
    if codec is None:
        return stream
    return codec.open_read(stream)


def is_compressed(path):
    """True when ``path`` starts like a gzip or zstd file."""
    with open(path, "rb") as f:
        return _format_of(f.read(4)) is not None


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
