"""The per-archive field index: which values an archive may hold.

The worker writes one for each archive it closes, ``<archive>.index``
beside it (:data:`SUFFIX`), and the chain ships it with the archive (the
``swift`` step uploads it as ``<object>.index``). A reader asks it, without
opening the archive, whether the archive may hold a record whose field has
a value (:meth:`Index.may_contain`: a Bloom filter, at most 1 % false
positives, never a false negative) and when its records were written
(:attr:`Index.earliest`, :attr:`Index.latest`).

**Values.** A field is a dotted path into the notification
(``payload.instance_id``, ``_context_project_id``); a key that itself
holds dots is found too (``payload.nova_object.data.uuid`` reads the
``uuid`` of nova's versioned ``payload["nova_object.data"]``; see
:func:`lookup`). Its value is indexed as text (:func:`value_text`): a
string as it is, any other JSON value (number, true/false, object, array)
as its JSON text, so ``_context_project_id=884691`` finds both
``"884691"`` and ``884691``. A missing path or ``null`` indexes nothing.

**The bytes** (little-endian, standard sizes, docs/format.md "Index
files")::

    4 bytes  magic  b"SBXI"
    uint8    version (1)
    uint8    0 (reserved)
    uint16   F, the number of fields
    uint64   records indexed
    uint8    E, then E bytes: earliest timestamp (ASCII; E = 0: unknown)
    uint8    L, then L bytes: latest timestamp (ASCII; L = 0: unknown)
    F times:
        uint16   N, then N bytes: the field's dotted path (UTF-8)
        uint32   distinct values added
        uint8    K, hash functions
        uint32   B, then B bytes: the filter, M = 8 * B bits; bit j is
                 bit (j % 8) of byte j // 8 (least significant first)
    uint32   CRC-32 (zlib) of every byte before it

A value's bits: ``h = blake2b(value as UTF-8, digest_size=16)``, ``h1`` =
its first 8 bytes and ``h2`` = its last 8 (both unsigned little-endian),
``h2 |= 1``; bits ``(h1 + i * h2) mod M`` for ``i`` in ``0..K-1``
(Kirsch-Mitzenmacher double hashing). A filter holds
:data:`BITS_PER_VALUE` bits per distinct value (at least 64) and
:data:`HASHES` hashes: 0.82 % false positives expected; one whose set
bits make more than :data:`MAX_FALSE_POSITIVES` (a small one, by chance)
is made larger. Readers need none of that: ``M`` is ``8 * B``. Timestamps are
:func:`shoebox_worker.timestamps.normalise`'s shape, the minimum and the
maximum over every record (not the first and last), so text order is
time order.

Readers refuse any other version, magic or checksum
(:class:`~shoebox_worker.exceptions.IndexError_`, one line); a new
version gets a new number, and readers of this one stay.
"""

import hashlib
import logging
import os
import struct
import zlib

import orjson

from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import timestamps

__all__ = [
    "DEFAULT_FIELDS",
    "SUFFIX",
    "Builder",
    "Index",
    "build",
    "lookup",
    "read_file",
    "sidecar",
    "value_text",
    "write_file",
]

LOG = logging.getLogger(__name__)

#: The ids an OpenStack operator searches by: the instance (legacy
#: notifications' ``payload.instance_id``, versioned ones'
#: ``payload.nova_object.data.uuid``), the project (``_context_project_id``
#: of every notification, the payload's ``tenant_id``), the user and the
#: request.
DEFAULT_FIELDS = (
    "payload.instance_id",
    "payload.nova_object.data.uuid",
    "_context_project_id",
    "payload.tenant_id",
    "_context_user_id",
    "_context_request_id",
)
#: An archive's index is ``<archive>`` + this, beside it.
SUFFIX = ".index"
#: The format version written (and the only one read).
VERSION = 1
MAGIC = b"SBXI"
#: Filter bits per distinct value, and hash functions: with 10 and 7 a
#: filter answers "may contain" for 0.82 % of absent values.
BITS_PER_VALUE = 10
HASHES = 7
#: The smallest filter (bits).
MIN_BITS = 64
#: The false positive rate no filter exceeds (its own, from the share of
#: its bits that are set): a margin under the 1 % promised.
MAX_FALSE_POSITIVES = 0.009

_HEAD = struct.Struct("<4sBBHQ")
_FIELD = struct.Struct("<IBI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def sidecar(path):
    """Where the index of the archive at ``path`` is."""
    return os.fspath(path) + SUFFIX


# -- values ------------------------------------------------------------------

def lookup(notification, parts):
    """The value at a dotted path in a notification, or None.

    :param parts: the path split at its dots (``("payload",
        "instance_id")``). At each level the shortest run of parts that is
        a key is taken (``nova_object`` + ``data`` when the payload has
        ``nova_object.data`` and no ``nova_object``).
    :param notification: a dict, or anything with ``in`` and ``[]`` (a
        simdjson object).
    """
    value = notification
    i, n = 0, len(parts)
    while i < n:
        if not hasattr(value, "keys"):
            return None
        key = parts[i]
        i += 1
        while key not in value:
            if i == n:
                return None
            key = key + "." + parts[i]
            i += 1
        value = value[key]
    return value


def value_text(value):
    """How a JSON value is indexed and looked up: a string as it is, None
    as None (nothing indexed), anything else as its JSON text."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "as_dict"):  # simdjson's lazy object
        value = value.as_dict()
    elif hasattr(value, "as_list"):  # and array
        value = value.as_list()
    try:
        return orjson.dumps(value).decode("utf-8")
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return None


def compile_fields(fields):
    """``fields`` (dotted paths) as :func:`lookup` takes them."""
    return tuple(tuple(field.split(".")) for field in fields)


def values_of(notification, compiled):
    """The indexed text of each field (None where it has none)."""
    return tuple(value_text(lookup(notification, parts))
                 for parts in compiled)


# -- the filter ---------------------------------------------------------------

def _positions(value, bits, hashes=HASHES):
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"),
                             digest_size=16).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little") | 1
    return [(h1 + i * h2) % bits for i in range(hashes)]


def _filter(values):
    """``(hashes, filter bytes)`` holding ``values`` (a set of str).

    Sized from their number; then, since a small filter's share of set
    bits varies widely, grown by a quarter until its own false positive
    rate, ``(set bits / bits) ** hashes``, is at most
    :data:`MAX_FALSE_POSITIVES`.
    """
    if not values:
        return HASHES, b""
    hashed = []
    for value in values:
        digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"),
                                 digest_size=16).digest()
        hashed.append((int.from_bytes(digest[:8], "little"),
                       int.from_bytes(digest[8:], "little") | 1))
    size = (max(MIN_BITS, BITS_PER_VALUE * len(values)) + 7) // 8
    while True:
        bits = size * 8
        mask = bytearray(size)
        for h1, h2 in hashed:
            for i in range(HASHES):
                j = (h1 + i * h2) % bits
                mask[j >> 3] |= 1 << (j & 7)
        fill = int.from_bytes(mask, "little").bit_count() / bits
        if fill ** HASHES <= MAX_FALSE_POSITIVES:
            return HASHES, bytes(mask)
        size += (size + 3) // 4


# -- writing ----------------------------------------------------------------

class Builder:
    """Collects an archive's values as its records are written;
    :meth:`to_bytes` makes the index.

    Holds each field's distinct values until then (a filter is sized from
    their number), so its memory grows with them.

    :param fields: dotted paths (:data:`DEFAULT_FIELDS`).
    """

    def __init__(self, fields=DEFAULT_FIELDS):
        self.fields = tuple(fields)
        self.compiled = compile_fields(self.fields)
        self.records = 0
        self._values = [set() for _ in self.fields]
        # oslo's own "YYYY-MM-DD HH:MM:SS.ffffff" orders as text: its
        # least and greatest are kept raw and normalised once at the end
        self._low = self._high = None
        self._others = []   # every other timestamp, normalised

    def add(self, timestamp, values):
        """Count one record.

        :param timestamp: its ``timestamp`` metadata (or None).
        :param values: its value text for each field, in :attr:`fields`
            order, None where it has none (:func:`values_of`).
        """
        self.records += 1
        # values is empty for a malformed record: nothing to add
        for found, value in zip(self._values, values, strict=False):
            if value is not None:
                found.add(value)
        if isinstance(timestamp, str) and len(timestamp) == 26 \
                and timestamp[10] == " ":
            if self._low is None:
                self._low = self._high = timestamp
            elif timestamp < self._low:
                self._low = timestamp
            elif timestamp > self._high:
                self._high = timestamp
        else:  # another shape: normalised now (None: no time, left out)
            normal = timestamps.normalise(timestamp)
            if normal is not None:
                self._others.append(normal)

    def add_notification(self, timestamp, notification):
        """:meth:`add` from a decoded notification (None: malformed)."""
        if notification is None:
            self.add(timestamp, ())
        else:
            self.add(timestamp, values_of(notification, self.compiled))

    def time_range(self):
        """``(earliest, latest)`` of the records that have a plausible
        ``timestamp`` (:func:`shoebox_worker.timestamps.normalise`);
        records without one (malformed ones) have no time and no time
        window selects them. ``(None, None)``: unknown (no such record,
        or a timestamp of oslo's shape that is no real time: then no range
        is claimed, so that no reader prunes on it)."""
        found = list(self._others)
        if self._low is not None:
            found += [timestamps.normalise(self._low),
                      timestamps.normalise(self._high)]
        if not found or None in found:
            return None, None
        return min(found), max(found)

    def to_bytes(self):
        earliest, latest = self.time_range()
        return _pack(self.fields, self.records, earliest, latest,
                     self._values)


def build(records, fields=DEFAULT_FIELDS):
    """The index of ``records``: ``(metadata, notification)`` pairs (the
    notification decoded, or None when malformed)."""
    builder = Builder(fields)
    for metadata, notification in records:
        builder.add_notification(metadata.get("timestamp"), notification)
    return builder.to_bytes()


def _text(value, size_of=_U8):
    data = (value or "").encode("utf-8")
    return size_of.pack(len(data)) + data


def _pack(fields, records, earliest, latest, values):
    parts = [_HEAD.pack(MAGIC, VERSION, 0, len(fields), records),
             _text(earliest), _text(latest)]
    for field, found in zip(fields, values, strict=True):
        hashes, mask = _filter(found)
        parts += [_text(field, _U16),
                  _FIELD.pack(len(found), hashes, len(mask)), mask]
    data = b"".join(parts)
    return data + _U32.pack(zlib.crc32(data))


def write_file(path, data, mode=None):
    """Write ``data`` to ``path`` durably and atomically (a temporary
    file, fsynced, renamed into place, the directory fsynced).

    :param mode: the file's permission bits (default: as umask leaves
        them).
    """
    tmp = path + ".tmp"
    lock = files.create_temporary(tmp)
    try:
        if mode is not None:
            os.fchmod(lock.fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(lock.fd, view):]
        os.fsync(lock.fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        lock.release()
    files.fsync_directory(path)


# -- reading ----------------------------------------------------------------

class Index:
    """A parsed index (:meth:`from_bytes`, :func:`read_file`).

    :ivar fields: the dotted paths indexed.
    :ivar records: records in the archive.
    :ivar earliest: the least record timestamp (UTC
        ``YYYY-MM-DDTHH:MM:SS.ffffffZ``), None when unknown.
    :ivar latest: the greatest, likewise.
    :ivar distinct: ``{field: distinct values}``.
    """

    def __init__(self, fields, records, earliest, latest, filters):
        self.fields = tuple(fields)
        self.records = records
        self.earliest = earliest
        self.latest = latest
        self._filters = filters     # field -> (distinct, hashes, bytes)
        self.distinct = {field: filters[field][0] for field in fields}

    @classmethod
    def from_bytes(cls, data, name="index"):
        """Parse an index.

        :param name: what the error names (a path, an object name).
        :raises IndexError_: bytes that are not an index of a known
            version, cut short, or damaged.
        """
        data = bytes(data)
        if len(data) < _HEAD.size + 4 or data[:4] != MAGIC:
            raise exceptions.IndexError_("%s: not a shoebox index (no %r "
                                         "magic)" % (name, MAGIC))
        if data[4] != VERSION:
            raise exceptions.IndexError_("%s: index format version %d; "
                                         "this reader knows %d" % (
                                             name, data[4], VERSION))
        body, (crc,) = data[:-4], _U32.unpack_from(data, len(data) - 4)
        if zlib.crc32(body) != crc:
            raise exceptions.IndexError_("%s: damaged index (checksum "
                                         "mismatch)" % (name,))
        try:
            return cls._parse(body)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise exceptions.IndexError_("%s: malformed index (%s)" % (
                name, exc)) from None

    @classmethod
    def _parse(cls, body):
        _, _, _, count, records = _HEAD.unpack_from(body, 0)
        pos = _HEAD.size

        def text(size_of=_U8):
            nonlocal pos
            (length,) = size_of.unpack_from(body, pos)
            pos += size_of.size
            if pos + length > len(body):
                raise ValueError("a length past the end")
            value = body[pos:pos + length].decode("utf-8")
            pos += length
            return value or None

        earliest, latest = text(), text()
        fields, filters = [], {}
        for _ in range(count):
            field = text(_U16)
            distinct, hashes, size = _FIELD.unpack_from(body, pos)
            pos += _FIELD.size
            if pos + size > len(body):
                raise ValueError("a filter past the end")
            if field is None or field in filters or (size and not hashes):
                raise ValueError("a bad field entry")
            filters[field] = (distinct, hashes, body[pos:pos + size])
            fields.append(field)
            pos += size
        if pos != len(body):
            raise ValueError("%d bytes after the last field" % (
                len(body) - pos))
        return cls(fields, records, earliest, latest, filters)

    def may_contain(self, field, value):
        """May a record of the archive have ``value`` at ``field``?

        False only when it certainly has none; True for a field that is
        not indexed (nothing is known).

        :param value: the text to find, as :func:`value_text` gives it (a
            string as it is; a number or ``true`` as its JSON text).
        """
        entry = self._filters.get(field)
        if entry is None:
            return True
        _, hashes, mask = entry
        if not mask:
            return False
        bits = len(mask) * 8
        return all(mask[j >> 3] & (1 << (j & 7))
                   for j in _positions(value, bits, hashes))

    def __repr__(self):
        return "<Index %d records, %s .. %s, fields %s>" % (
            self.records, self.earliest, self.latest, ", ".join(self.fields))


def read_file(path):
    """The :class:`Index` in the file ``path``.

    :raises IndexError_: not an index, or damaged.
    :raises OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        return Index.from_bytes(f.read(), os.fspath(path))
