"""The binary record format: one notification and its metadata per record.

Every record starts with the same 6-byte preamble, so one reader handles
every version::

    int32   magic   0x69867884 (bytes 84 78 86 69)
    int16   version 1 or 2

All integers are little-endian, standard sizes (``struct`` ``<``). On x86
this is byte for byte what StackTach shoebox 0.7 wrote with native order.

**Version 1** (shoebox 0.7, read and written unchanged)::

    int32   M       metadata block length
    int32   R       raw block length
    int32   0       end-of-header marker
    M bytes         metadata block
    R bytes         raw block

**Version 2** (the default) keeps v1's blocks, checks its header before any
length is trusted, and closes every record with a checksum, so torn and
corrupt records are detected::

    uint32  M       metadata block length
    uint32  R       raw block length
    uint32  HCRC    CRC-32 (zlib) of the 14 bytes before it
    M bytes         metadata block
    R bytes         raw block
    uint32  CRC     CRC-32 (zlib) of the whole record before it

The metadata block (both versions)::

    int32           4 x number of key/value pairs (N)
    2N x int32      length of key 1, of value 1, of key 2, ...
    2N strings      key 1, value 1, key 2, ... (UTF-8, no terminator)

The raw block (both versions)::

    int32           L, the payload length (R = 4 + L)
    L bytes         the payload exactly as given

Writers keep M and R at most :data:`MAX_BLOCK` (2^31 - 61, the longest
payload :func:`pack` takes plus its length field); readers refuse longer
blocks as corrupt, in both versions.

``docs/format.md`` draws both with worked examples. :func:`pack` turns a
record into bytes and :func:`unpack_from` parses one out of a buffer, never
trusting a length past the bytes it was given; both are pure.
:func:`walk` is the one reader of record streams: it yields each record
with its offset, version and size, strictly or salvaging past damage.
Salvaging resyncs past a damaged v2 record whose header checksum holds at
the end that header claims (its bytes are that record's, whatever they
look like), so no record is surfaced from inside it and each byte is
checksummed about once: salvage is linear in the file's size. Where a
record was written, a damaged header still tells that end when it is one
bit from intact (v2: :func:`repaired_size`) or when the lengths the
record's bytes claim end where the file does or a header that holds
starts (v1, or more damage, up to 1 MiB).
:class:`~shoebox_worker.archive.ArchiveReader` is built on it, and
``inspect_file``, ``cat`` and ``verify`` on that reader, so that the
layout is known here and nowhere else.
"""

import itertools
import operator
import struct

from shoebox_worker import exceptions

try:  # the same CRC-32, several times faster (isal, a dependency)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

__all__ = [
    "MAGIC",
    "VERSIONS",
    "CURRENT_VERSION",
    "HEADER_SIZE",
    "READ_CHUNK",
    "pack",
    "record_size",
    "unpack_from",
    "is_record_start",
    "repaired_size",
    "find_marker",
    "walk",
]

#: Beginning-of-record marker ("EVNT" in the prior art's comment).
MAGIC = 0x69867884
#: Format versions this module reads and writes.
VERSIONS = (1, 2)
#: The version new archives are written in.
CURRENT_VERSION = 2

_PREAMBLE = struct.Struct("<ih")
_V1_HEAD = struct.Struct("<ihiii")
_V2_HEAD = struct.Struct("<ihIII")
_V2_PRE = struct.Struct("<ihII")  # the 14 bytes the header CRC covers
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_MAGIC_BYTES = _I32.pack(MAGIC)
_MAGIC_FIRST = _MAGIC_BYTES[:1]
# How many lone first bytes find_marker steps over before it searches for
# all four.
_MARKER_FIRST_TRIES = 4

#: Preamble plus header: the same 18 bytes in both versions.
HEADER_SIZE = _V1_HEAD.size
#: v2's trailing checksum.
TRAILER_SIZE = _U32.size
# Longest metadata block or payload a writer packs (int32 lengths in v1's
# layout, with room to spare).
_MAX_LEN = 0x7FFFFFFF - 64
#: Longest block (M or R) a reader accepts: what :func:`pack` writes at
#: most (a payload of ``_MAX_LEN`` bytes and its length field), below 2^31.
MAX_BLOCK = _MAX_LEN + 4
#: How much :func:`walk` reads at a time (more only for a longer record).
READ_CHUNK = 1 << 20
# The most one read asks for, however long a record claims to be.
_MAX_READ = 1 << 24
# Salvage reads a damaged record's own lengths (see _Walk._written_size)
# only for records up to this size, with at most this many lengths in its
# metadata table: a bounded look ahead, a bounded sum at each damage.
_WRITTEN_LOOKAHEAD = READ_CHUNK
_WRITTEN_LENGTHS = 4096


def _encode(text):
    if isinstance(text, str):
        return text.encode("utf-8", "surrogateescape")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError("metadata and payload must be str or bytes, not %s"
                    % type(text).__name__)


_HEADS = {}


def _head_struct(count):
    """The Struct packing the count and ``count`` lengths (cached)."""
    head = _HEADS.get(count)
    if head is None:
        head = _HEADS[count] = struct.Struct("<%di" % (count + 1))
    return head


def _metadata_block(metadata):
    strings = list(itertools.chain.from_iterable(metadata.items()))
    count = len(strings)
    try:
        joined = "".join(strings)
    except TypeError:  # some bytes keys or values
        joined = None
    if joined is not None and joined.isascii():
        # the common case: one encode, and characters are bytes
        head = _head_struct(count).pack(count * 2, *map(len, strings))
        return head + joined.encode("ascii")
    encoded = [_encode(s) for s in strings]
    head = _head_struct(count).pack(count * 2, *map(len, encoded))
    encoded.insert(0, head)
    return b"".join(encoded)


def pack(metadata, payload, version=CURRENT_VERSION):
    """Return one record as bytes.

    :param metadata: a ``str:str`` dict (bytes keys/values are accepted).
    :param payload: the notification, ``str`` (stored as UTF-8) or bytes.
    :param version: 1 (StackTach shoebox 0.7) or 2.
    :raises InvalidVersion: for any other version.
    """
    meta = _metadata_block(metadata)
    body = payload if type(payload) is bytes else _encode(payload)
    if len(meta) > _MAX_LEN or len(body) > _MAX_LEN:
        raise ValueError("record too large for the format (2 GiB)")
    raw_len = _I32.pack(len(body))
    if version == 2:
        head = _V2_PRE.pack(MAGIC, 2, len(meta), len(body) + 4)
        data = b"".join((head, _U32.pack(crc32(head)), meta, raw_len,
                         body))
        return data + _U32.pack(crc32(data))
    if version == 1:
        head = _V1_HEAD.pack(MAGIC, 1, len(meta), len(body) + 4, 0)
        return b"".join((head, meta, raw_len, body))
    raise exceptions.InvalidVersion("cannot write format version %r"
                                    % (version,))


def _header(buf, pos):
    """Check the header at ``pos``: ``(version, meta_len, raw_len, size)``."""
    magic, version, meta_len, raw_len, third = _V2_HEAD.unpack_from(buf, pos)
    if magic != MAGIC:
        raise exceptions.OutOfSync("no record marker", pos)
    if version == 2:
        if crc32(buf[pos:pos + 14]) != third:
            raise exceptions.CorruptRecord("header checksum mismatch", pos)
        size = HEADER_SIZE + meta_len + raw_len + TRAILER_SIZE
    elif version == 1:
        if third != 0:
            raise exceptions.CorruptRecord("end-of-header marker is not 0",
                                           pos)
        if meta_len > 0x7FFFFFFF or raw_len > 0x7FFFFFFF:  # int32 < 0
            raise exceptions.CorruptRecord("negative block length", pos)
        size = HEADER_SIZE + meta_len + raw_len
    else:
        raise exceptions.InvalidVersion("unknown format version %d" % version,
                                        pos)
    if meta_len < 4 or raw_len < 4:
        raise exceptions.CorruptRecord("block shorter than its length field",
                                       pos)
    if meta_len > MAX_BLOCK or raw_len > MAX_BLOCK:
        raise exceptions.CorruptRecord(
            "block longer than any writer makes (%d bytes)"
            % max(meta_len, raw_len), pos)
    return version, meta_len, raw_len, size


def record_size(buf, pos=0):
    """Size of the record whose header starts at ``pos``, header checked.

    Needs :data:`HEADER_SIZE` bytes at ``pos``. Does not look past the
    header, so the size may exceed what the buffer holds (a torn record).

    :returns: the total size in bytes of the record.
    :raises OutOfSync: no record header at ``pos``.
    :raises InvalidVersion: a version this code does not know.
    :raises CorruptRecord: a header that fails its checks.
    """
    return _header(buf, pos)[3]


_LENGTHS = {}
# the length table's bytes -> (sum of the lengths, itemgetter of the
# strings' slices): a record like the one before costs a lookup, not an
# unpack of its lengths
_LAYOUTS = {}
_MAX_LAYOUTS = 4096
# Tables of fewer lengths than this (key and value each count) are cached.
_CACHED_LENGTHS = 256


def _lengths_struct(n):
    lengths = _LENGTHS.get(n)
    if lengths is None:
        lengths = struct.Struct("<%di" % n)
        if n < _CACHED_LENGTHS:
            _LENGTHS[n] = lengths
    return lengths


def _layout(table, lengths, size):
    """Sum and slicer for these string lengths (``table``: their bytes),
    or None unless they are not negative and add up to ``size``; cached
    when there are few (a hostile table of a million lengths is checked,
    not kept)."""
    if min(lengths) < 0 or sum(lengths) != size:
        return None
    slices = []
    off = 0
    for length in lengths:
        slices.append(slice(off, off + length))
        off += length
    layout = off, operator.itemgetter(*slices)
    if len(lengths) < _CACHED_LENGTHS:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[table] = layout
    return layout


def _parse_metadata(buf, start, end, pos):
    (count,) = _I32.unpack_from(buf, start)
    if count < 0 or count % 4:
        raise exceptions.CorruptRecord("bad metadata count %d" % count, pos)
    if not count:
        if end != start + 4:
            raise exceptions.CorruptRecord("metadata lengths do not add up",
                                           pos)
        return {}
    n = count // 2
    off = start + 4 + 4 * n
    if off > end:
        raise exceptions.CorruptRecord("metadata lengths overrun", pos)
    table = bytes(buf[start + 4:off])
    layout = _LAYOUTS.get(table)
    if layout is None:
        layout = _layout(table, _lengths_struct(n).unpack_from(buf, start + 4),
                         end - off)
    if layout is None or off + layout[0] != end:
        raise exceptions.CorruptRecord("metadata lengths do not add up", pos)
    region = bytes(buf[off:end])
    if region.isascii():  # the common case: decode once, then slice
        strings = iter(layout[1](region.decode("ascii")))
    else:
        strings = (s.decode("utf-8", "surrogateescape")
                   for s in layout[1](region))
    return dict(zip(strings, strings, strict=False))  # pairs: even count


def unpack_from(buf, pos=0, end=None):
    """Parse the record at ``pos`` in ``buf``.

    :param buf: bytes-like holding at least the whole record.
    :param pos: offset of the record in ``buf``; also the offset reported
        in errors.
    :param end: where the valid bytes of ``buf`` end (default: its length).
    :returns: ``(metadata, payload, size)``: a ``str:str`` dict, the payload
        bytes, and the record's size in bytes.
    :raises TornRecord: ``buf`` ends inside the record.
    :raises RecordError: any other damage (OutOfSync, CorruptRecord,
        InvalidVersion).
    """
    _, metadata, payload, size = _unpack(
        buf, pos, len(buf) if end is None else end)
    return metadata, bytes(payload), size


def _unpack(buf, pos, end):
    """:func:`unpack_from` with the version: ``(version, metadata, payload,
    size)``; the payload is a slice of ``buf`` (bytes when ``buf`` is)."""
    if end - pos < HEADER_SIZE:
        raise exceptions.TornRecord("archive ends inside a record header",
                                    pos)
    version, meta_len, raw_len, size = _header(buf, pos)
    if pos + size > end:
        raise exceptions.TornRecord(
            "archive ends inside a record (%d of %d bytes)"
            % (end - pos, size), pos)
    raw_start = pos + HEADER_SIZE + meta_len
    raw_end = raw_start + raw_len
    if version == 2:
        (crc,) = _U32.unpack_from(buf, raw_end)
        if crc32(memoryview(buf)[pos:raw_end]) != crc:
            raise exceptions.CorruptRecord("record checksum mismatch", pos)
    metadata = _parse_metadata(buf, pos + HEADER_SIZE, raw_start, pos)
    (length,) = _I32.unpack_from(buf, raw_start)
    if length != raw_len - 4:
        raise exceptions.CorruptRecord("payload length does not match block",
                                       pos)
    return version, metadata, buf[raw_start + 4:raw_end], size


def _check_start(buf, pos, meta_len, raw_len):
    """What the first bytes of a record not yet all read can refute: the
    metadata count (it must fit the block; 0 only in a 4-byte block) and
    the payload length (it must be R - 4), when the buffer holds them.
    The same checks as :func:`_unpack`'s, made early; they never refuse a
    valid record."""
    start = pos + HEADER_SIZE
    if len(buf) - start >= 4:
        (count,) = _I32.unpack_from(buf, start)
        if count < 0 or count % 4 or 4 + 2 * count > meta_len or (
                count == 0 and meta_len != 4):
            raise exceptions.CorruptRecord("metadata lengths do not add up",
                                           pos)
    if len(buf) - start - meta_len >= 4:
        (length,) = _I32.unpack_from(buf, start + meta_len)
        if length != raw_len - 4:
            raise exceptions.CorruptRecord(
                "payload length does not match block", pos)


def _single_bit_syndromes():
    """``{syndrome: bit}`` of every one-bit error in an 18-byte v2 header:
    the syndrome of a header is the CRC-32 of its first 14 bytes XOR its
    HCRC, 0 when intact; CRC-32 being affine, flipping bit ``bit`` (0..143,
    little-endian bit order, byte ``bit // 8``) gives a syndrome that
    depends on the bit alone, and no two bits give the same one (CRC-32's
    Hamming distance over 144 bits is above 3)."""
    zeros = crc32(bytes(14))
    table = {}
    for bit in range(14 * 8):
        error = bytearray(14)
        error[bit // 8] = 1 << (bit % 8)
        table[crc32(bytes(error)) ^ zeros] = bit
    for bit in range(32):  # a bit of the HCRC itself
        table[1 << bit] = 14 * 8 + bit
    return table


_SYNDROMES = _single_bit_syndromes()


def repaired_size(buf, pos=0):
    """Size of the v2 record whose header at ``pos`` is intact or one bit
    away from intact (that bit flipped back, the header passes every
    check), or None. Needs :data:`HEADER_SIZE` bytes at ``pos``."""
    head = bytearray(buf[pos:pos + HEADER_SIZE])
    (hcrc,) = _U32.unpack_from(head, 14)
    syndrome = crc32(bytes(head[:14])) ^ hcrc
    if syndrome:
        bit = _SYNDROMES.get(syndrome)
        if bit is None:
            return None
        head[bit // 8] ^= 1 << (bit % 8)
    try:
        version, _, _, size = _header(head, 0)
    except exceptions.RecordError:
        return None
    return size if version == 2 else None


def is_record_start(buf, pos, end=None):
    """True when a whole, valid record starts at ``pos`` (used to resync)."""
    try:
        unpack_from(buf, pos, end)
    except exceptions.RecordError:
        return False
    return True


def _marker_start_at_end(buf):
    """How many of the last bytes of ``buf`` (3 at most) are the first
    bytes of a record marker: 0 when no marker can straddle its end."""
    for count in (3, 2, 1):
        if buf.endswith(_MAGIC_BYTES[:count]):
            return count
    return 0


def find_marker(buf, start, end=None):
    """Offset of the next record marker at or after ``start``, or -1.

    :param buf: bytes or bytearray.
    """
    if end is None:
        end = len(buf)
    # The marker's first byte first: a one-byte find is a memchr, a
    # hundred times faster than the four-byte search over the zeros that
    # a crash's tail or a decompression bomb is made of. A few first
    # bytes that start no marker, and the four-byte search takes over
    # where they stopped: no input makes this slower than that search.
    for _ in range(_MARKER_FIRST_TRIES):
        found = buf.find(_MAGIC_FIRST, start, end)
        if found < 0 or buf.startswith(_MAGIC_BYTES, found, end):
            return found
        start = found + 1
    return buf.find(_MAGIC_BYTES, start, end)


def walk(stream, *, salvage=False, on_skip=None, stream_errors=(),
         chunk_size=READ_CHUNK):
    """Yield every record of a binary stream, in order.

    Each is a tuple ``(offset, version, size, metadata, payload)``: where
    the record starts in the (uncompressed) stream, its format version from
    its own header, its length in bytes (the next record starts at
    ``offset + size``), its ``str:str`` metadata and its payload bytes.
    (A plain tuple: reading is this format's hot loop.)

    The stream is read in chunks (``read1`` when it has one, so a damaged
    compressed stream gives up every byte decoded before the damage). A
    record's length fields are checked against its header first and never
    trusted past the bytes the stream holds: a hostile length makes the
    walker read on until the stream ends, never allocate what it claims.

    :param stream: a binary file object (plain or decompressing).
    :param salvage: False: raise at the first damage. True: report each
        damaged range to ``on_skip`` and go on at the next offset where a
        whole, valid record starts (or at the end of the stream).
    :param on_skip: in salvage mode, called as ``on_skip(start, end,
        reason)`` for each damaged range, ``end`` being the offset of the
        next valid record or of the end of the stream.
    :param stream_errors: exceptions with which ``stream`` says its own
        bytes are damaged (a broken ``.gz``): the bytes read before count,
        the rest is reported once, as a :class:`CorruptRecord` at the
        offset where the readable bytes stop making records.
    :param chunk_size: bytes per read.
    :raises RecordError: in strict mode, at the first damage, with
        ``offset`` set to where the bad record starts (a
        :class:`TornRecord` when the stream ends inside one).
    """
    return _Walk(stream, salvage, on_skip, stream_errors,
                 chunk_size).records()


class _Unreadable(exceptions.RecordError):
    """A record this process cannot hold: the walk stops even when
    salvaging (what follows is unknown, so it is not a torn tail)."""


class _Walk:
    """The state of one :func:`walk`: a buffer over the stream."""

    def __init__(self, stream, salvage, on_skip, stream_errors, chunk_size):
        self.read = getattr(stream, "read1", None) or stream.read
        self.salvage = salvage
        self.on_skip = on_skip
        self.stream_errors = stream_errors
        self.chunk_size = chunk_size
        self.buf = b""
        self.pos = 0
        self.base = 0  # stream offset of self.buf[0]
        self.eof = False
        self.stream_error = None  # a damaged stream, not yet reported

    def records(self):
        unpack, record_error = _unpack, exceptions.RecordError
        while True:
            buf, pos, base = self.buf, self.pos, self.base
            end = len(buf)
            while True:  # the common case: whole records in the buffer
                try:
                    version, metadata, payload, size = unpack(buf, pos, end)
                except record_error:
                    break
                yield base + pos, version, size, metadata, payload
                pos += size
            self.pos = pos
            found = self._next()  # refill, end or damage
            if found is None:
                return
            yield found

    def _next(self):
        """The next record past a buffer's end or damage, or None at the
        end of the stream."""
        while True:
            try:
                found = self._parse_here()
            except exceptions.RecordError as exc:
                exc.offset = self.base + self.pos
                if not self.salvage or isinstance(exc, _Unreadable):
                    raise
                self._skip(exc)
                continue
            if found is not None:
                self.pos += found[2]
            return found

    def _fill(self, need):
        """Make ``need`` bytes available at the current position if the
        stream has them; returns how many are."""
        have = len(self.buf) - self.pos
        if have >= need or self.eof:
            return have
        # what is left of the buffer, if anything: a lone chunk is taken as
        # it is (join returns it), not copied
        parts = [self.buf[self.pos:]] if have else []
        try:
            while have < need:
                try:
                    chunk = self.read(max(self.chunk_size,
                                          min(need - have, _MAX_READ)))
                except self.stream_errors as exc:
                    # keep what was decoded; _parse_here reports the rest
                    # once it reaches the end of it
                    self.stream_error = ("compressed stream is damaged: %s"
                                         % (exc,))
                    chunk = b""
                if not chunk:
                    self.eof = True
                    break
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
        except MemoryError:
            del parts
            raise _Unreadable(
                "a record of %d bytes starts here: more than this process "
                "can hold in memory; reading stopped" % need,
                self.base + self.pos) from None
        self.base += self.pos
        self.buf = buf
        self.pos = 0
        return have

    def _parse_here(self):
        """The record at the current position (not consumed), None at a
        clean end; raises on damage."""
        have = self._fill(HEADER_SIZE)
        if have == 0:
            self._raise_stream_error()
            return None
        if have >= HEADER_SIZE:
            _, meta_len, raw_len, size = _header(self.buf, self.pos)
            if size > have:  # a long record: its first bytes are checked
                # first, so a forged header before gigabytes of zeros
                # fails here, not once they are all read
                self._fill(HEADER_SIZE + 4)
                _check_start(self.buf, self.pos, meta_len, raw_len)
                if meta_len <= self.chunk_size:
                    self._fill(HEADER_SIZE + meta_len + 4)
                    _check_start(self.buf, self.pos, meta_len, raw_len)
                self._fill(size)
        try:
            version, metadata, payload, size = _unpack(
                self.buf, self.pos, len(self.buf))
        except exceptions.TornRecord:
            self._raise_stream_error()
            raise
        return self.base + self.pos, version, size, metadata, payload

    def _raise_stream_error(self):
        """A damaged stream ends the readable bytes: say so (once) instead
        of reporting a clean end or a torn record."""
        if self.stream_error is not None:
            message, self.stream_error = self.stream_error, None
            raise exceptions.CorruptRecord(message, self.base + self.pos)

    def _skip(self, exc):
        """Salvage: move to the next offset where a valid record starts."""
        start = self.base + self.pos
        self._pass_damaged(written=True)
        while True:
            self._fill(HEADER_SIZE)
            found = find_marker(self.buf, self.pos)
            if found < 0:
                # keep the last bytes where a marker may straddle chunks:
                # those that are a marker's first ones
                self.pos = max(self.pos, len(self.buf) - _marker_start_at_end(
                    self.buf))
                kept = len(self.buf) - self.pos
                # one more read (any chunk size): at the end, all is junk
                if self.eof or self._fill(kept + 1) <= kept:
                    self.pos = len(self.buf)
                    break
                continue
            self.pos = found
            try:
                self._parse_here()
                break
            except _Unreadable:
                raise
            except exceptions.RecordError:
                self._pass_damaged()
        if self.on_skip is not None:
            self.on_skip(start, self.base + self.pos, exc.message)

    def _pass_damaged(self, written=False):
        """Step over the damaged record at the current position.

        A v2 header whose checksum holds gives the writer's own lengths, so
        every byte up to the end it claims belongs to that one record (a
        payload may hold a whole valid record: it is not one). Resync goes
        on at that end (or the end of the stream: a torn tail). Skipping
        the claimed range also checks each byte's checksum once, however
        many forged headers overlap. Where a record was written
        (``written``: the first damage after a record or at the start,
        not a candidate found by the search), a damaged header can still
        tell the record's extent (:meth:`_written_size`). Anything else
        says nothing of its extent: resync goes on at the next byte.
        """
        size = None
        if len(self.buf) - self.pos >= HEADER_SIZE:
            try:
                version, _, _, size = _header(self.buf, self.pos)
            except exceptions.RecordError:
                size = None
            else:
                if version != 2:
                    size = None
        if size is None and written:
            size = self._written_size()
        if size is None:
            self.pos += 1
            return
        while size > len(self.buf) - self.pos and not self.eof:
            size -= len(self.buf) - self.pos
            self.base += len(self.buf)
            self.buf, self.pos = b"", 0
            self._fill(min(size, self.chunk_size))
        self.pos += min(size, len(self.buf) - self.pos)

    def _written_size(self):
        """The size of the damaged record written at the current position,
        when its damaged header still tells it, else None.

        A v2 header one bit from intact is repaired (:func:`repaired_size`:
        the writer's lengths, whatever the record's size). Otherwise, for a
        record of up to :data:`_WRITTEN_LOOKAHEAD` bytes, the sizes its
        bytes claim (its v1 header when that passes its checks; the
        lengths in its metadata table and payload field, as v1 or v2) hold
        when the stream ends right there or a header that passes its
        checks starts there, and the longest that holds is taken: a v1
        record damaged anywhere in its header or its body, or a v2 header
        with more bits damaged, before a record that is whole.
        """
        if self._fill(HEADER_SIZE) < HEADER_SIZE:
            return None
        size = repaired_size(self.buf, self.pos)
        if size is not None:
            return size
        # the longest that holds: a wrong one that ends where the record
        # its payload holds starts would return that record
        return max((size for size in self._claimed_sizes()
                    if self._record_ends_at(size)), default=None)

    def _claimed_sizes(self):
        """The sizes the damaged record at the current position claims: its
        v1 header's (when it passes its checks), then those its metadata
        table and payload length field add up to (v1, then v2 unless the
        header reads as v1)."""
        try:
            version, _, _, size = _header(self.buf, self.pos)
        except exceptions.RecordError:
            version = None
        else:
            if version == 1:
                yield size
        start = HEADER_SIZE + 4
        if self._fill(start) < start:
            return
        (count,) = _I32.unpack_from(self.buf, self.pos + HEADER_SIZE)
        if count < 0 or count % 4 or count // 2 > _WRITTEN_LENGTHS:
            return
        table = start + 2 * count  # count // 2 lengths of 4 bytes
        if self._fill(table) < table:
            return
        lengths = _lengths_struct(count // 2).unpack_from(
            self.buf, self.pos + start)
        if lengths and min(lengths) < 0:
            return
        raw = table + sum(lengths)
        if raw + 4 > _WRITTEN_LOOKAHEAD or self._fill(raw + 4) < raw + 4:
            return
        (length,) = _I32.unpack_from(self.buf, self.pos + raw)
        if length >= 0:
            yield raw + 4 + length
            # a header that reads as v1 is one (one flipped bit cannot make
            # a 2 a 1, and a v2 header's checksum would fail): its record
            # has no trailer, and a size with one could swallow the next
            # record when the stream ends four bytes later
            if version != 1:
                yield raw + 4 + length + TRAILER_SIZE

    def _record_ends_at(self, size):
        """Does the stream end ``size`` bytes from the current position, or
        a header that passes its checks start there (read ahead, at most
        :data:`_WRITTEN_LOOKAHEAD` bytes)?"""
        if size + HEADER_SIZE > _WRITTEN_LOOKAHEAD:
            return False
        have = self._fill(size + HEADER_SIZE)
        if have == size:
            return True  # _fill stops short only at the end
        if have < size + HEADER_SIZE:
            return False
        try:
            _header(self.buf, self.pos + size)
        except exceptions.RecordError:
            return False
        return True
