"""Period bundles: what the archives of one time period hold, in parts
split by value, so that a reader looking for one value GETs one small
object a period.

``shoebox-worker index-bundle --per month swift://C[/PREFIX]``
(:mod:`shoebox_worker.tools.bundle`) reads each archive under PREFIX once
and files it under the period (year, month or day, UTC) of its earliest
record. The bundle of a period is cut into ``parts`` objects (a power of
two, more as the period holds more values), named by
:func:`shoebox_worker.swift.layout.period_bundle_name`
(``<PREFIX>.shoebox-index-bundles/2026-03/005-of-016``). Every part
lists every archive of the period, each with its name, its ETag and size
as the listing gives them, its record count and its time range (the
least and greatest record ``timestamp``, as the per-archive index has
them), and, for each field, the :func:`fingerprint` of each value of the
field that the archive holds **and that falls in this part**
(``fingerprint % parts == part``). So a reader asking for one value GETs
the one part of each period that may hold it, and learns every archive's
time range from any part.

Why not Bloom filters, as the per-archive index: a year of hourly
archives is 8,760 of them, and a filter's 0.6 % false positives would
read 53 archives for nothing per value looked for. A fingerprint is 32
bits of the value's BLAKE2b: an archive holding ``n`` values of a field
is read for nothing once in ``2**32 / n`` lookups; a value it holds is
never missed (its fingerprint is there).

**Trust.** An entry is used only for the archive whose name, ETag and
size it names, as the reader's listing gives them: the bundler made it
from those very bytes (the GET's ETag checked against the listing), so
it is bound to them as an archive's own index is (docs/reading.md, "What
pruning trusts"). An entry marked *left out* (a damaged archive: its
records are not all readable) prunes nothing. An object with no record
marker in any of its bytes (no archive, even to ``--salvage``) is
summarised as holding no record: readers skip it.

**The bytes** of a part: a zlib stream (RFC 1950) of::

    4 bytes  magic  b"SBXP"
    uint8    version (1)
    uint8    0 (reserved)
    uint16   part, uint16 parts
    uint8    P, then P bytes: the period (ASCII)
    uint16   F, the number of fields; F times:
        uint16   N, then N bytes: the field's dotted path (UTF-8)
    uint32   E, the number of archives; E times:
        uint16   N, then N bytes: the archive object's name (UTF-8)
        uint8    T, then T bytes: its ETag as the listing gives it
                 (``hash``, or a Static Large Object's ``slo_etag``)
        uint64   its size in bytes (the listing's ``bytes``)
        uint8    0: summarised; 1: left out (prunes nothing)
        uint64   records
        uint8    L, then L bytes: earliest timestamp (L = 0: unknown)
        uint8    L, then L bytes: latest timestamp (L = 0: unknown)
        F times:
            uint32   V, then V uint32: the fingerprints of the field's
                     values in this part, ascending
    uint32   CRC-32 (zlib) of every byte before it (uncompressed)

Timestamps are :func:`shoebox_worker.timestamps.normalise`'s shape;
values are as ``--where`` compares them (:func:`shoebox_worker.index.
value_text`), fingerprinted as UTF-8 (``surrogatepass``).
A reader decompresses a part as it comes and takes no more than
:data:`MAX_PART_BYTES` of it, compressed or not (a bomb costs a chunk).
"""

import array
import hashlib
import struct
import sys
import zlib

from shoebox_worker import exceptions
from shoebox_worker import index as archive_index

__all__ = [
    "MAX_PART_BYTES",
    "PERIODS",
    "Entry",
    "Part",
    "Summary",
    "build_parts",
    "choose_cut",
    "fingerprint",
    "part_of",
    "parts_for",
    "period_of",
]

MAGIC = b"SBXP"
VERSION = 1
#: What ``--per`` takes, and how many characters of a normalised
#: timestamp (``2026-03-09T...``) name the period.
PERIODS = {"year": 4, "month": 7, "day": 10}
#: The period of archives with no known time range.
UNTIMED = "untimed"
#: The most bytes a reader takes of one part, compressed or not.
MAX_PART_BYTES = 64 << 20
#: Fingerprint bytes a part aims at (:func:`parts_for`): a month of
#: hourly archives of 100 nova notifications is 16 parts of about 53 KB
#: stored, most of it the archives' names, ETags and time ranges, which
#: every part repeats.
PART_TARGET = 32 << 10
#: The most parts a period is cut into (the names have three digits).
MAX_PARTS = 256
#: Summarised, or left out (an entry that prunes nothing).
SUMMARISED, LEFT_OUT = 0, 1

_HEAD = struct.Struct("<4sBBHH")
_ENTRY = struct.Struct("<QBQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def fingerprint(value):
    """The 32-bit fingerprint of a value's text (as ``--where`` compares
    it)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"),
                             digest_size=4, person=b"shoebox-period").digest()
    return int.from_bytes(digest, "little")


def part_of(value, parts):
    """The part (from 0) of a bundle of ``parts`` parts that holds
    ``value``'s fingerprint."""
    return fingerprint(value) % parts


def period_of(earliest, per):
    """The period (``per``: a key of :data:`PERIODS`) of an archive whose
    earliest record is at ``earliest`` (normalised text, or None)."""
    if not earliest:
        return UNTIMED
    return earliest[:PERIODS[per]]


def parts_for(summaries):
    """How many parts the bundle of ``summaries`` is cut into: a power of
    two, about :data:`PART_TARGET` fingerprint bytes each."""
    total = 4 * sum(len(values) for summary in summaries
                    for values in summary.values)
    parts = 1
    while parts < MAX_PARTS and total > parts * PART_TARGET:
        parts *= 2
    return parts


def choose_cut(cuts):
    """``(parts, {part: x})`` among a period's ``cuts`` (``{parts: {part:
    x}}``, from a listing): the complete cut with the most parts, else the
    cut with the most parts (a run cutting the period anew may have
    written some of its parts yet, or deleted some of the old cut)."""
    complete = [n for n, found in cuts.items() if len(found) == n]
    parts = max(complete or cuts)
    return parts, cuts[parts]


class Summary:
    """What the bundler learnt of one archive (every record read).

    :ivar name: the archive object's name.
    :ivar etag: its ETag as the listing gives it.
    :ivar size: its size in bytes.
    :ivar state: :data:`SUMMARISED` or :data:`LEFT_OUT`.
    :ivar records: records read.
    :ivar earliest: least record timestamp (normalised), None: unknown.
    :ivar latest: greatest, likewise.
    :ivar values: for each field, the set of the fingerprints of its
        values (all of them: every part's); empty: no values at all (an
        object that is no archive, or one left out).
    """

    def __init__(self, name, etag, size, *, state=SUMMARISED, records=0,
                 earliest=None, latest=None, values=()):
        self.name = name
        self.etag = etag
        self.size = size
        self.state = state
        self.records = records
        self.earliest = earliest
        self.latest = latest
        self.values = tuple(values)

    @classmethod
    def of_records(cls, name, etag, size, records, fields):
        """The summary of an archive's ``(metadata, payload)`` records,
        read as the index reads them (:class:`shoebox_worker.index.
        Builder`): the time range over every record, the values as
        ``--where`` reads them."""
        builder = archive_index.Builder(fields)
        compiled = builder.compiled
        for metadata, payload in records:
            builder.add(metadata.get("timestamp"),
                        archive_index.payload_values(payload, compiled))
        earliest, latest = builder.time_range()
        return cls(name, etag, size, records=builder.records,
                   earliest=earliest, latest=latest,
                   values=[{fingerprint(value) for value in found}
                           for found in builder.distinct_values()])

    @classmethod
    def left_out(cls, name, etag, size):
        """A damaged archive: recorded so that it is not read again
        while it is the same, pruning nothing."""
        return cls(name, etag, size, state=LEFT_OUT)

    @property
    def key(self):
        return (self.name, self.etag)


def build_parts(period, fields, summaries, parts=None):
    """The parts of the bundle of ``period``: ``[(part, parts, bytes)]``.

    :param summaries: :class:`Summary` objects (their ``values`` in
        ``fields`` order).
    :param parts: how many (default :func:`parts_for`).
    """
    summaries = sorted(summaries, key=lambda s: s.name)
    parts = parts or parts_for(summaries)
    field_bytes = [_text(field, _U16) for field in fields]
    out = []
    for part in range(parts):
        chunks = [_HEAD.pack(MAGIC, VERSION, 0, part, parts),
                  _text(period, _U8), _U16.pack(len(fields))]
        chunks += field_bytes
        chunks.append(_U32.pack(len(summaries)))
        for summary in summaries:
            chunks += [_text(summary.name, _U16), _text(summary.etag, _U8),
                       _ENTRY.pack(summary.size, summary.state,
                                   summary.records),
                       _text(summary.earliest, _U8),
                       _text(summary.latest, _U8)]
            for index in range(len(fields)):
                found = summary.values[index] if summary.values else ()
                mine = sorted(fp for fp in found if fp % parts == part)
                chunks.append(struct.pack("<I%dI" % len(mine), len(mine),
                                          *mine))
        body = b"".join(chunks)
        out.append((part, parts, zlib.compress(
            body + _U32.pack(zlib.crc32(body)), 6)))
    return out


def _text(value, size_of):
    data = (value or "").encode("utf-8", "surrogatepass")
    return size_of.pack(len(data)) + data


class Entry:
    """One archive's entry in a part, as a reader takes it: it answers as
    an :class:`~shoebox_worker.index.Index` does (``fields``,
    ``may_contain``, ``earliest``, ``latest``, ``etag``,
    ``archive_size``), for :meth:`shoebox_worker.tools.select.Selection.
    may_hold`. It knows the values whose fingerprints fall in its part
    only: for any other value it says "may contain"."""

    #: An entry is bound to its archive (its ETag and size): no older
    #: format to tell apart.
    version = archive_index.VERSION

    def __init__(self, name, etag, size, records, earliest, latest, fields,
                 fingerprints, part, parts, period=None):
        self.name = name
        self.etag = etag
        self.archive_size = size
        self.records = records
        self.earliest = earliest
        self.latest = latest
        self.fields = fields
        #: per field: an ``array("I")`` (4 bytes a value), ascending
        self.fingerprints = fingerprints
        self.part = part
        self.parts = parts
        self.period = period

    def may_contain(self, field, value):
        """False only when the archive certainly holds no ``value`` at
        ``field``: the field is summarised and the value's fingerprint
        falls in this part and is not there."""
        try:
            position = self.fields.index(field)
        except ValueError:
            return True
        found = fingerprint(value)
        if found % self.parts != self.part:
            return True
        return found in self.fingerprints[position]

    def summary(self):
        """As a :class:`Summary` (this part's fingerprints alone)."""
        return Summary(self.name, self.etag, self.archive_size,
                       records=self.records, earliest=self.earliest,
                       latest=self.latest,
                       values=[set(fps) for fps in self.fingerprints])

    def __repr__(self):
        return "<Entry %s %s, part %d of %d>" % (self.name, self.etag,
                                                 self.part, self.parts)


class Part:
    """A parsed part (:meth:`from_chunks`).

    :ivar period: its period's text.
    :ivar part: which part, from 0; :ivar parts: of how many.
    :ivar fields: the fields summarised.
    :ivar entries: ``{(archive name, ETag): Entry}`` of the summarised
        archives kept.
    :ivar left_out: ``{(archive name, ETag): size}`` of the archives
        left out (damaged) kept.
    """

    def __init__(self, period, part, parts, fields, entries, left_out):
        self.period = period
        self.part = part
        self.parts = parts
        self.fields = fields
        self.entries = entries
        self.left_out = left_out

    @classmethod
    def from_bytes(cls, data, name="part"):
        return cls.from_chunks([data], name)

    @classmethod
    def from_chunks(cls, chunks, name="part", keep=None):
        """Parse a part given in compressed pieces (a GET's chunks), as
        they come.

        :param keep: ``keep(archive name, etag, bytes)``: whether to hold
            that entry, left out or not (every entry without it); its
            fingerprints are held as bytes, 4 a value, as counted.
        :raises IndexError_: not a part of a known version, damaged, cut
            short, or longer than :data:`MAX_PART_BYTES`.
        """
        stream = _Reader(_inflated(chunks, name))
        try:
            head = stream.take(_HEAD.size)
        except ValueError:
            head = b""
        if len(head) < _HEAD.size or head[:4] != MAGIC:
            raise exceptions.IndexError_("%s: not a shoebox period bundle "
                                         "(no %r magic)" % (name, MAGIC))
        if head[4] != VERSION:
            raise exceptions.IndexError_(
                "%s: period bundle format version %d; this reader knows %d"
                % (name, head[4], VERSION))
        _, _, _, part, parts = _HEAD.unpack(head)
        period, fields = None, ()
        entries, left_out = {}, {}
        problem = None
        try:
            if not part < parts:
                raise ValueError("part %d of %d" % (part, parts))
            period = stream.text(_U8).decode("ascii")
            (count,) = stream.unpack(_U16)
            fields = tuple(stream.text(_U16).decode("utf-8")
                           for _ in range(count))
            if len(set(fields)) != len(fields):
                raise ValueError("a field named twice")
            (archives,) = stream.unpack(_U32)
            for _ in range(archives):
                archive = stream.text(_U16).decode("utf-8")
                etag = stream.text(_U8).decode("ascii")
                size, state, records = stream.unpack(_ENTRY)
                earliest = stream.text(_U8).decode("ascii") or None
                latest = stream.text(_U8).decode("ascii") or None
                found = [stream.fingerprints() for _ in fields]  # bytes
                if state not in (SUMMARISED, LEFT_OUT):
                    raise ValueError("an entry in state %d" % state)
                # held as they are counted: the bytes (not an object a
                # value), and no entry not kept, left out or not
                length = len(archive) + 64 + (
                    sum(len(raw) + 64 for raw in found)
                    if state == SUMMARISED else 0)
                if keep is not None and not keep(archive, etag, length):
                    continue
                if state == LEFT_OUT:
                    left_out[(archive, etag)] = size
                    continue
                entries[(archive, etag)] = Entry(
                    archive, etag, size, records, earliest, latest, fields,
                    [_uint32s(raw) for raw in found], part, parts, period)
        except (UnicodeDecodeError, ValueError, struct.error) as exc:
            problem = str(exc)
        left = stream.drain()
        if not stream.checksum_ok():
            raise exceptions.IndexError_("%s: damaged period bundle "
                                         "(checksum mismatch)" % (name,))
        if problem is None and left != _U32.size:
            problem = "%d bytes after the last entry" % (left - _U32.size)
        if problem is not None:
            raise exceptions.IndexError_("%s: malformed period bundle (%s)"
                                         % (name, problem))
        return cls(period, part, parts, fields, entries, left_out)


class _Reader:
    """The decompressed bytes of a part, taken front to back as they come
    (one buffer, read with ``unpack_from``), with the CRC-32 of every
    byte but the last four (the checksum's) kept on the way."""

    #: Bytes read past before they are dropped from the buffer.
    _KEEP = 1 << 20

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._pos = 0
        self._crc = 0

    def _need(self, size):
        buf = self._buf
        while len(buf) - self._pos < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ValueError("a length past the end")
            if self._pos > self._KEEP:
                self._crc = zlib.crc32(memoryview(buf)[:self._pos],
                                       self._crc)
                del buf[:self._pos]
                self._pos = 0
            buf += chunk

    def take(self, size):
        self._need(size)
        with memoryview(self._buf) as view:  # one copy, not two
            data = bytes(view[self._pos:self._pos + size])
        self._pos += size
        return data

    def unpack(self, shape):
        self._need(shape.size)
        values = shape.unpack_from(self._buf, self._pos)
        self._pos += shape.size
        return values

    def text(self, size_of):
        (length,) = self.unpack(size_of)
        return self.take(length)

    def fingerprints(self):
        """A count, then that many uint32: their bytes
        (:func:`_uint32s` makes them numbers)."""
        (count,) = self.unpack(_U32)
        return self.take(4 * count)

    def drain(self):
        """Read to the end; how many bytes were left."""
        while (chunk := next(self._chunks, None)) is not None:
            self._buf += chunk
        return len(self._buf) - self._pos

    def checksum_ok(self):
        """After :meth:`drain`: the last four bytes are the CRC-32 of the
        others."""
        buf = self._buf
        if len(buf) < _U32.size:
            return False
        crc = zlib.crc32(memoryview(buf)[:-_U32.size], self._crc)
        return _U32.unpack_from(buf, len(buf) - _U32.size)[0] == crc


def _uint32s(raw):
    """Little-endian uint32 bytes as an ``array("I")``: 4 bytes a value
    (a tuple of ints takes ten times that)."""
    values = array.array("I")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _inflated(chunks, name):
    """The decompressed bytes of a part's compressed ``chunks``, at most
    :data:`MAX_PART_BYTES` of either."""
    inflate = zlib.decompressobj()
    taken = given = 0
    try:
        for chunk in chunks:
            taken += len(chunk)
            if taken > MAX_PART_BYTES:
                raise _too_big(name)
            data = inflate.decompress(chunk, MAX_PART_BYTES + 1 - given)
            while data:
                given += len(data)
                if given > MAX_PART_BYTES:
                    raise _too_big(name)
                yield data
                data = inflate.decompress(inflate.unconsumed_tail,
                                          MAX_PART_BYTES + 1 - given) \
                    if inflate.unconsumed_tail else b""
        data = inflate.flush()
        if data:
            yield data
        if not inflate.eof:
            raise exceptions.IndexError_("%s: period bundle cut short"
                                         % (name,))
    except zlib.error as exc:
        raise exceptions.IndexError_("%s: damaged period bundle (%s)"
                                     % (name, exc)) from None


def _too_big(name):
    return exceptions.IndexError_("%s: more than %d bytes, more than a "
                                  "reader takes for a period bundle"
                                  % (name, MAX_PART_BYTES))
