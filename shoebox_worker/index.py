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
The notification is the record's payload as :func:`notification_of`
reads it, the one reading ``--where`` uses too (a repeated key's last
value; a body only ``json`` reads, malformed for the worker, as well).

**The bytes** (little-endian, standard sizes, docs/format.md "Index
files")::

    4 bytes  magic  b"SBXI"
    uint8    version (2)
    uint8    0 (reserved)
    uint16   F, the number of fields
    uint64   records indexed
    uint8    E, then E bytes: earliest timestamp (ASCII; E = 0: unknown)
    uint8    L, then L bytes: latest timestamp (ASCII; L = 0: unknown)
    uint8    T, then T bytes: the archive's ETag (ASCII; T = 0: unbound)
    uint64   the archive's size in bytes (0 when unbound)
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
:data:`HASHES` hashes: 0.61 % false positives expected; one whose set
bits make more than :data:`MAX_FALSE_POSITIVES` (a small one, by chance)
is made larger. Readers need none of that: ``M`` is ``8 * B``. Timestamps are
:func:`shoebox_worker.timestamps.normalise`'s shape, the minimum and the
maximum over every record (not the first and last), so text order is
time order.

Version 1 is the same without T, its ETag and the size: it is read, and
is never bound, so it never prunes. Its writers also read records
otherwise than ``--where`` and ``--since`` do (a repeated key's first
value, no values for a body only ``json`` reads, timestamps with an
offset compared as text), which version 2's writers do not. Readers
refuse any other version, magic or checksum
(:class:`~shoebox_worker.exceptions.IndexError_`, one line); a new
version gets a new number, and readers of this one stay.

**Binding.** An index is bound to one archive by the archive's ETag as a
Swift listing gives it (``hash``, the MD5 of its bytes; for a Static
Large Object ``slo_etag``, the MD5 of its segments' MD5s, as a HEAD
gives it) and its size: both checkable from a listing alone, with no
HEAD. The worker writes an index unbound
when it closes the archive; the shipper binds the sidecar to the file
the chain leaves (:func:`bind_file`) and the ``swift`` step binds what it
uploads to the object Swift verified (:func:`bind`). A reader prunes with
an index only when :func:`binding_problem` finds none: an unbound index
(version 1, or not bound yet), or one bound to other bytes (stale,
copied, forged), proves nothing about the archive beside it, which is
then read (docs/reading.md, "What pruning trusts").

**Size.** A reader takes no index longer than :func:`size_limit` says
from its first :data:`HEAD_BYTES` bytes: what F fields of the longest
paths with filters of :data:`MAX_BITS_PER_RECORD` bits per record
indexed may take, and never more than :data:`MAX_BYTES`; nor a bundle
longer than :data:`MAX_BUNDLE_BYTES`. Longer bytes are refused before
they are held (:class:`~shoebox_worker.exceptions.IndexError_`): the
archive is then read, as for a damaged index.

**Bundles.** One object holding the indexes of many archive objects
(``shoebox-worker index-bundle`` writes it, :data:`BUNDLE_SUFFIX`), so
that a reader GETs one object instead of one index per archive
(:class:`Bundle`, :func:`build_bundle`; docs/format.md "Index
bundles")::

    4 bytes  magic  b"SBXB"
    uint8    version (1)
    uint8    0 (reserved)
    uint32   N, the number of entries
    N times:
        uint16   the archive object's name (UTF-8), its length first
        uint8    its ETag as the listing gives it (``hash``, ASCII),
                 its length first
        uint32   its index's bytes as uploaded, their length first
    uint32   CRC-32 (zlib) of every byte before it
"""

import hashlib
import json
import logging
import os
import struct
import zlib

import orjson

from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import timestamps
from shoebox_worker.swift import layout

__all__ = [
    "DEFAULT_FIELDS",
    "SUFFIX",
    "BUNDLE_SUFFIX",
    "Builder",
    "Bundle",
    "Index",
    "build",
    "bind",
    "bind_file",
    "binding_problem",
    "build_bundle",
    "etag_of_file",
    "bundle_size_limit",
    "lookup",
    "looks_like_index",
    "notification_of",
    "payload_values",
    "read_file",
    "sidecar",
    "size_limit",
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
#: The format version written.
VERSION = 2
#: The format versions read (1 has no binding).
VERSIONS = (1, 2)
MAGIC = b"SBXI"
#: A bundle of the archives under ``PREFIX`` is ``PREFIX`` + this.
BUNDLE_SUFFIX = layout.BUNDLE_SUFFIX
BUNDLE_VERSION = 1
BUNDLE_MAGIC = b"SBXB"
#: Filter bits per distinct value, and hash functions: with 15 and 3 a
#: filter answers "may contain" for 0.61 % of absent values (10 and 7 would
#: give 0.82 % in two thirds of the bytes, but cost the worker more than
#: twice the time per value: the index is far under its size goal).
BITS_PER_VALUE = 15
HASHES = 3
#: Records a :class:`Builder` adds to its sets at a time.
BATCH = 1024
#: The smallest filter (bits).
MIN_BITS = 64
#: The false positive rate no filter exceeds (its own, from the share of
#: its bits that are set): a margin under the 1 % promised.
MAX_FALSE_POSITIVES = 0.009

#: The most bytes a reader takes for one index. 64 MiB hold 35 million
#: distinct values at the writer's 15 bits each: an archive of 5.8
#: million records with their own ids in all six default fields, 58 times
#: the default ``roll_count``. A larger index is not read (its archive is).
MAX_BYTES = 64 << 20
#: The most bytes a reader takes for one bundle (held whole while the
#: listing is pruned, ``--jobs`` at a time): the indexes of 3,000
#: archives of 100,000 simulated nova notifications each (75 KB an
#: index, bench/index.py) fit.
MAX_BUNDLE_BYTES = 256 << 20
#: Filter bits per record indexed that a reader accepts: over four times
#: the :data:`BITS_PER_VALUE` the writer spends per distinct value (and
#: a field has no more distinct values than records), so a writer that
#: spends more stays readable without a new version.
MAX_BITS_PER_RECORD = 64

_HEAD = struct.Struct("<4sBBHQ")
_BUNDLE_HEAD = struct.Struct("<4sBBI")
_FIELD = struct.Struct("<IBI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_oslo_form = timestamps.OSLO_FORM.fullmatch
_U64 = struct.Struct("<Q")


#: Bytes of an index that tell how long it may be (:func:`size_limit`).
HEAD_BYTES = _HEAD.size


def size_limit(head):
    """The most bytes an index that starts with ``head`` may have: its
    header, the longest time texts, and for each of its F fields the
    longest path and a filter of :data:`MAX_BITS_PER_RECORD` bits per
    record it counts; :data:`MAX_BYTES` at most (and until ``head`` holds
    :data:`HEAD_BYTES` bytes).

    :raises IndexError_: ``head`` is not the start of an index of this
        version.
    """
    head = bytes(head[:HEAD_BYTES])
    if len(head) < HEAD_BYTES:
        if not MAGIC.startswith(head[:len(MAGIC)]):
            raise exceptions.IndexError_("not a shoebox index (no %r "
                                         "magic)" % (MAGIC,))
        return MAX_BYTES
    magic, version, _, count, records = _HEAD.unpack(head)
    if magic != MAGIC or version not in VERSIONS:
        raise exceptions.IndexError_(
            "not a shoebox index of version %s (%r, version %d)" % (
                " or ".join(map(str, VERSIONS)), magic, version))
    per_field = (_U16.size + 0xFFFF + _FIELD.size + MIN_BITS // 8
                 + (MAX_BITS_PER_RECORD * records + 7) // 8)
    most = _HEAD.size + 3 * (_U8.size + 0xFF) + _U64.size \
        + count * per_field + 4
    return min(most, MAX_BYTES)


def bundle_size_limit(head):
    """The most bytes a bundle that starts with ``head`` may have:
    :data:`MAX_BUNDLE_BYTES` (the entries' sizes say nothing before they
    are read)."""
    return MAX_BUNDLE_BYTES


def looks_like_index(head):
    """Do these first bytes of a file start an index?"""
    return bytes(head[:len(MAGIC)]) == MAGIC


def sidecar(path):
    """Where the index of the archive at ``path`` is."""
    return os.fspath(path) + SUFFIX


# -- values ------------------------------------------------------------------

def _needle(key, whole=False):
    """What a JSON text without ``\\u`` and ``\\/`` escapes holds when it
    has a key that starts with ``key`` (``whole``: that is ``key``), or
    None when ``key`` may be written otherwise. In such a text a key made
    of printable characters other than ``"`` and ``\\`` is written as it
    is, so a text without ``"key`` holds no key that starts with it."""
    if '"' in key or "\\" in key or not key.isprintable():
        return None
    return ('"%s"' % key if whole else '"%s' % key).encode("utf-8")


def _absent(key, raw, whole=False):
    """Is ``key`` certainly no key of the JSON text ``raw``, nor the start
    of one (``whole``: is it certainly no key)? See :func:`_needle`."""
    needle = _needle(key, whole)
    return needle is not None and needle not in raw


def lookup(notification, parts, mappings=(dict,), raw=None):
    """The value at a dotted path in a notification, or None.

    :param parts: the path split at its dots (``("payload",
        "instance_id")``). At each level the shortest run of parts that is
        a key with a value (not null) is taken (``nova_object`` + ``data``
        when the payload has ``nova_object.data`` and no ``nova_object``).
    :param mappings: the types of JSON objects (the worker adds simdjson's
        lazy one); each has ``get``.
    :param raw: the notification's JSON text without ``\\u`` nor ``\\/``
        escapes (see :func:`plain_text`), or None: when given, a level
        whose key the text does not hold is not looked up (a search of
        the bytes costs a fraction of a microsecond; simdjson takes 5 us
        to find that a key is missing).
    """
    value = notification
    i, n = 0, len(parts)
    while i < n:
        if not isinstance(value, mappings):
            return None
        key = parts[i]
        i += 1
        if raw is not None and _absent(key, raw):
            return None
        found = value.get(key)
        while found is None and i < n:  # a key holding dots?
            key = key + "." + parts[i]
            i += 1
            found = value.get(key)
        value = found
    return value


def plain_text(raw):
    """``raw`` (a notification's JSON bytes) when :func:`lookup` may skip
    the keys absent from it (no ``\\u`` nor ``\\/`` escape), else None."""
    if b"\\" in raw and (b"\\u" in raw or b"\\/" in raw):
        return None
    return raw


def notification_of(payload):
    """The one reading of a record's payload as a notification: its JSON
    object, or None when it is not one. The writer indexes what this
    reads (:class:`Reader`, :func:`payload_values`) and ``--where``
    matches it (:mod:`shoebox_worker.tools.select`), so that an index
    never leaves out a record that ``--where`` selects.

    One parser, one fallback: orjson; for what orjson refuses, ``json``
    (a lone surrogate escape, a number past a double's range), without
    ``NaN``/``Infinity``. A key repeated in one object gives its last
    value with both.

    :param payload: bytes (or str).
    """
    try:
        note = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            text = payload if isinstance(payload, str) else \
                bytes(payload).decode("utf-8")
            note = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None
    return note if note.__class__ is dict else None


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def value_text(value):
    """How a JSON value is indexed and matched: a string as it is, None as
    None (nothing indexed, nothing matched), anything else as its compact
    JSON text (orjson's; ``json``'s for what orjson cannot write: an
    integer past 64 bits, a value nested deeper than it goes; None when
    neither can)."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "as_dict"):  # simdjson's lazy object
        value = value.as_dict()
    elif hasattr(value, "as_list"):  # and array
        value = value.as_list()
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is one
        try:
            return json.dumps(value, separators=(",", ":"),
                              ensure_ascii=False)
        except (ValueError, RecursionError):
            return None


def compile_fields(fields):
    """``fields`` (dotted paths) as :func:`lookup` takes them."""
    return tuple(tuple(field.split(".")) for field in fields)


def values_of(notification, compiled, mappings=(dict,)):
    """The indexed text of each field (None where it has none).

    :param compiled: the fields, as :func:`compile_fields` gives them.
    :param mappings: as for :func:`lookup`.
    """
    values = []
    for parts in compiled:
        value = lookup(notification, parts, mappings)
        values.append(value if value is None or value.__class__ is str
                      else value_text(value))
    return tuple(values)


def payload_values(payload, compiled):
    """:func:`values_of` the notification that :func:`notification_of`
    reads in ``payload``: what ``--where`` compares (all None when it
    reads none)."""
    notification = notification_of(payload)
    if notification is None:
        return (None,) * len(compiled)
    return values_of(notification, compiled)


def _below(compiled):
    """The objects a :func:`lookup` of the ``compiled`` fields may enter
    from one it is in: ``{key: the same for that key's object}``, the
    keys being the runs of parts that leave some to look up."""
    below = {}
    for parts in compiled:
        for j in range(1, len(parts)):
            below.setdefault(".".join(parts[:j]), []).append(parts[j:])
    return {key: _below(rest) for key, rest in below.items()}


def _repeats(value, below, mappings):
    """Does ``value`` (a JSON object of a parser that keeps every key:
    simdjson's), or an object a lookup of the fields enters from it
    (``below``, :func:`_below`), hold a key twice? (A dict cannot.)"""
    if value.__class__ is dict:
        return False
    names = set(value.keys())
    if len(names) != len(value):  # len: every key, repeated ones too
        return True
    for key, deeper in below.items():
        if key in names:
            child = value.get(key)
            if isinstance(child, mappings) and _repeats(child, deeper,
                                                        mappings):
                return True
    return False


class _Edge:
    """One key of the fields' tree (:class:`Reader`)."""

    __slots__ = ("key", "leaves", "children", "fields", "missed", "starts",
                 "whole")

    def __init__(self, key):
        self.key = key
        self.starts = _needle(key)            # see _needle
        self.whole = _needle(key, whole=True)
        self.leaves = []     # the fields that end here
        self.children = []   # the edges below
        self.fields = []     # (field, its parts, this level) under here
        self.missed = False  # was the key missing from the last one?


class Reader:
    """:func:`values_of` for a stream of notifications, fast: the fields
    are read in one walk of their tree (``payload`` is looked up once for
    every ``payload.*`` field), and a key missing from the last
    notification is first looked for in the next one's JSON text (see
    :func:`lookup`'s ``raw``), so the notifications of a service that
    never has a field cost a search of the bytes, not a failed lookup
    (5 us on a simdjson object). The values are those of
    :func:`payload_values` (the reading of ``--where``): a parser's
    object (simdjson's) gives the first value of a key repeated in one
    object where that reading gives the last, so a record with an object
    on the fields' paths that holds a key twice is read by
    :func:`payload_values` instead. Telling (:func:`_repeats`: the keys of
    those objects) costs 5 us a simulated nova notification, 40 % of the
    worker's envelope reading (12 -> 17 us).

    Not thread-safe: one per consumer.

    :param fields: dotted paths.
    :param mappings: as for :func:`lookup`.
    """

    def __init__(self, fields, mappings=(dict,)):
        self.fields = tuple(fields)
        self.mappings = mappings
        self._edges = []
        for number, parts in enumerate(compile_fields(self.fields)):
            edges = self._edges
            for level, key in enumerate(parts):
                edge = next((e for e in edges if e.key == key), None)
                if edge is None:
                    edge = _Edge(key)
                    edges.append(edge)
                edge.fields.append((number, parts, level))
                if level == len(parts) - 1:
                    edge.leaves.append(number)
                edges = edge.children
        self.compiled = compile_fields(self.fields)
        self._below = _below(self.compiled)
        self._raw = self._plain = None

    def __call__(self, notification, raw):
        """The values of ``notification``, parsed from ``raw`` (bytes)."""
        if _repeats(notification, self._below, self.mappings):
            return payload_values(raw, self.compiled)
        self._raw, self._plain = raw, False  # False: not looked at yet
        out = [None] * len(self.fields)
        self._walk(notification, self._edges, out)
        for i, value in enumerate(out):
            if value is not None and value.__class__ is not str:
                out[i] = value_text(value)
        return tuple(out)

    def _text(self):
        """The notification's text if :func:`lookup` may search it."""
        if self._plain is False:
            self._plain = plain_text(self._raw)
        return self._plain

    def _walk(self, value, edges, out):
        get = value.get
        for edge in edges:
            if edge.missed:
                plain = self._text()
                if plain is not None and edge.starts is not None:
                    if edge.starts not in plain:
                        continue  # no key starts with it: all of it None
                    found = None if edge.whole not in plain \
                        else get(edge.key)
                else:
                    found = get(edge.key)
                if found is not None:
                    edge.missed = False
            else:
                found = get(edge.key)
            if found is None:
                edge.missed = True
                for number, parts, level in edge.fields:
                    out[number] = self._joined(value, parts, level)
                continue
            for number in edge.leaves:
                out[number] = found
            if edge.children and isinstance(found, self.mappings):
                self._walk(found, edge.children, out)

    def _joined(self, value, parts, level):
        """:func:`lookup` from ``value`` at ``level``, whose own key is
        missing: the keys holding dots that start with it."""
        plain = self._text()
        key, i, n = parts[level], level + 1, len(parts)
        found = None
        while found is None and i < n:
            key = key + "." + parts[i]
            i += 1
            if plain is None or not _absent(key, plain, whole=True):
                found = value.get(key)
        if found is None or i == n:
            return found
        return lookup(found, parts[i:], self.mappings, plain)


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
    their number), so its memory grows with them. Records are added to
    the sets :data:`BATCH` at a time (a few C calls instead of a loop in
    Python per record).

    :param fields: dotted paths (:data:`DEFAULT_FIELDS`).
    """

    def __init__(self, fields=DEFAULT_FIELDS):
        self.fields = tuple(fields)
        self.compiled = compile_fields(self.fields)
        self.records = 0
        self._values = [set() for _ in self.fields]
        self._none = (None,) * len(self.fields)
        self._rows = []     # values of the records not in the sets yet
        self._stamps = []   # and their timestamps
        # oslo's own "YYYY-MM-DD HH:MM:SS.ffffff" (exactly: OSLO_FORM)
        # orders as text: its least and greatest are kept raw and
        # normalised once at the end
        self._low = self._high = None
        self._others = []   # every other timestamp, normalised

    def add(self, timestamp, values):
        """Count one record.

        :param timestamp: its ``timestamp`` metadata (or None).
        :param values: its value text for each field, in :attr:`fields`
            order, None where it has none (:func:`values_of`); empty for
            a malformed record.
        """
        self.records += 1
        self._rows.append(values or self._none)
        self._stamps.append(timestamp)
        if len(self._rows) >= BATCH:
            self._flush()

    def _flush(self):
        rows, self._rows = self._rows, []
        stamps, self._stamps = self._stamps, []
        if not rows:
            return
        columns = zip(*rows, strict=True)  # each row has every field
        for found, column in zip(self._values, columns, strict=True):
            found.update(column)
            found.discard(None)
        oslo = [t for t in stamps if t.__class__ is str and len(t) == 26
                and _oslo_form(t)]
        if oslo:
            low, high = min(oslo), max(oslo)
            if self._low is None or low < self._low:
                self._low = low
            if self._high is None or high > self._high:
                self._high = high
        if len(oslo) < len(stamps):  # other forms: normalised now
            for stamp in stamps:
                if not (stamp.__class__ is str and len(stamp) == 26
                        and _oslo_form(stamp)):
                    normal = timestamps.normalise(stamp)
                    if normal is not None:  # None: no time, left out
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
        self._flush()
        found = list(self._others)
        if self._low is not None:
            found += [timestamps.normalise(self._low),
                      timestamps.normalise(self._high)]
        if not found or None in found:
            return None, None
        return min(found), max(found)

    def distinct_values(self):
        """For each field (in :attr:`fields` order), the set of the value
        texts its records hold (the sets themselves: do not change them).
        """
        self._flush()
        return self._values

    def to_bytes(self):
        """The index, unbound (:func:`bind` binds it)."""
        earliest, latest = self.time_range()  # flushes
        return _pack(self.fields, self.records, earliest, latest,
                     [(len(found),) + _filter(found)
                      for found in self._values])


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


def _pack(fields, records, earliest, latest, filters, binding=None):
    """The bytes of an index of this version; ``filters``: ``(distinct
    values, hashes, filter bytes)`` of each field; ``binding``: ``(ETag,
    size)`` of its archive, or None (unbound)."""
    etag, size = binding if binding is not None else ("", 0)
    parts = [_HEAD.pack(MAGIC, VERSION, 0, len(fields), records),
             _text(earliest), _text(latest), _text(etag), _U64.pack(size)]
    for field, (distinct, hashes, mask) in zip(fields, filters,
                                               strict=True):
        parts += [_text(field, _U16),
                  _FIELD.pack(distinct, hashes, len(mask)), mask]
    data = b"".join(parts)
    return data + _U32.pack(zlib.crc32(data))


# -- binding -----------------------------------------------------------------

def bind(data, etag, size, name="index"):
    """The index ``data`` (any version read) bound to the archive whose
    ETag as a listing gives it (``hash``) is ``etag`` and whose size is
    ``size`` bytes: written in this version.

    :raises IndexError_: ``data`` is no intact index.
    :raises ValueError: ``etag`` is empty, not ASCII or too long.
    """
    if not etag or not etag.isascii() or len(etag) > 0xFF:
        raise ValueError("not an ETag to bind to: %r" % (etag,))
    found = Index.from_bytes(data, name)
    return _pack(found.fields, found.records, found.earliest, found.latest,
                 [found._filters[field] for field in found.fields],
                 (etag, size))


#: Bytes of a file hashed at a time (:func:`etag_of_file`).
_HASH_CHUNK = 1 << 20


def etag_of_file(path):
    """The ETag Swift gives a plain object of the file's bytes: their MD5
    (hex)."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            md5.update(chunk)
    return md5.hexdigest()


def bind_file(archive):
    """Bind the sidecar of the file ``archive`` (:func:`sidecar`) to the
    file as it is now (atomically, the index's permission bits kept);
    nothing when it has none or is bound to it already.

    :returns: whether the sidecar was rewritten.
    :raises IndexError_: the sidecar is no intact index.
    :raises OSError: either file cannot be read, or the index written.
    """
    path = sidecar(archive)
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode & 0o7777
    except FileNotFoundError:
        return False
    found = Index.from_bytes(data, path)
    size = os.stat(archive).st_size
    if binding_problem(found, size, lambda: etag_of_file(archive)) is None:
        return False
    write_file(path, bind(data, etag_of_file(archive), size, path), mode)
    return True


def binding_problem(found, size, etag_of):
    """Why the :class:`Index` ``found`` may not prune the archive of
    ``size`` bytes whose ETag (as a listing gives it) ``etag_of()``
    returns, or None when it is bound to that archive: the one test of
    whether an index is trusted. ``etag_of`` is called only once the
    sizes agree (for a file it hashes every byte).

    :raises OSError: from ``etag_of``.
    """
    if found.etag is None:
        return "index not bound to its archive (%s)" % (
            "format version %d" % found.version if found.version < 2
            else "it names none: not shipped yet, or not the worker's")
    if size is None or found.archive_size != size:
        return "index bound to an archive of %d bytes, not %s" % (
            found.archive_size, "unknown" if size is None else size)
    etag = etag_of()
    if found.etag != etag:
        return "index bound to the archive with ETag %s, not %s" % (
            found.etag, etag)
    return None


def write_file(path, data, mode=None):
    """Write ``data`` to ``path`` durably and atomically (a temporary
    file, fsynced, renamed into place, the directory fsynced:
    :func:`shoebox_worker.files.write_atomic`).

    :param mode: the file's permission bits (default: as umask leaves
        them).
    """
    files.write_atomic(path, data, mode)


# -- reading ----------------------------------------------------------------

class Index:
    """A parsed index (:meth:`from_bytes`, :func:`read_file`).

    :ivar fields: the dotted paths indexed.
    :ivar records: records in the archive.
    :ivar earliest: the least record timestamp (UTC
        ``YYYY-MM-DDTHH:MM:SS.ffffffZ``), None when unknown.
    :ivar latest: the greatest, likewise.
    :ivar distinct: ``{field: distinct values}``.
    :ivar version: the format version it was read in.
    :ivar etag: the ETag of the archive it is bound to, None when unbound
        (:func:`binding_problem`).
    :ivar archive_size: that archive's size in bytes, None when unbound.
    """

    def __init__(self, fields, records, earliest, latest, filters,
                 binding=None, version=VERSION):
        self.fields = tuple(fields)
        self.records = records
        self.earliest = earliest
        self.latest = latest
        self._filters = filters     # field -> (distinct, hashes, bytes)
        self.distinct = {field: filters[field][0] for field in fields}
        self.etag, self.archive_size = binding or (None, None)
        self.version = version

    @classmethod
    def from_bytes(cls, data, name="index"):
        """Parse an index.

        :param name: what the error names (a path, an object name).
        :raises IndexError_: bytes that are not an index of a known
            version, cut short, or damaged.
        """
        data = memoryview(data).cast("B")  # no copy of a big one
        if len(data) < _HEAD.size + 4 or data[:4] != MAGIC:
            raise exceptions.IndexError_("%s: not a shoebox index (no %r "
                                         "magic)" % (name, MAGIC))
        if data[4] not in VERSIONS:
            raise exceptions.IndexError_(
                "%s: index format version %d; this reader knows %s" % (
                    name, data[4], " and ".join(map(str, VERSIONS))))
        body, (crc,) = data[:-4], _U32.unpack_from(data, len(data) - 4)
        if zlib.crc32(body) != crc:
            raise exceptions.IndexError_("%s: damaged index (checksum "
                                         "mismatch)" % (name,))
        try:
            return cls._parse(body, data[4])
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise exceptions.IndexError_("%s: malformed index (%s)" % (
                name, exc)) from None

    @classmethod
    def _parse(cls, body, version):
        _, _, _, count, records = _HEAD.unpack_from(body, 0)
        pos = _HEAD.size

        def text(size_of=_U8):
            nonlocal pos
            (length,) = size_of.unpack_from(body, pos)
            pos += size_of.size
            if pos + length > len(body):
                raise ValueError("a length past the end")
            value = bytes(body[pos:pos + length]).decode("utf-8")
            pos += length
            return value or None

        earliest, latest = text(), text()
        binding = None
        if version >= 2:
            etag = text()
            (size,) = _U64.unpack_from(body, pos)
            pos += _U64.size
            if etag is not None:
                binding = (etag, size)
        fields, filters = [], {}
        for _ in range(count):
            field = text(_U16)
            distinct, hashes, size = _FIELD.unpack_from(body, pos)
            pos += _FIELD.size
            if pos + size > len(body):
                raise ValueError("a filter past the end")
            if field is None or field in filters or (size and not hashes):
                raise ValueError("a bad field entry")
            filters[field] = (distinct, hashes,
                              bytes(body[pos:pos + size]))
            fields.append(field)
            pos += size
        if pos != len(body):
            raise ValueError("%d bytes after the last field" % (
                len(body) - pos))
        return cls(fields, records, earliest, latest, filters, binding,
                   version)

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


# -- bundles ----------------------------------------------------------------

def build_bundle(entries):
    """The bytes of a bundle of ``entries``: ``(archive object name, its
    listing hash, its index bytes)``."""
    entries = list(entries)
    parts = [_BUNDLE_HEAD.pack(BUNDLE_MAGIC, BUNDLE_VERSION, 0,
                               len(entries))]
    for name, etag, data in entries:
        data = bytes(data)
        parts += [_text(name, _U16), _text(etag), _U32.pack(len(data)), data]
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


class Bundle:
    """A parsed bundle (:meth:`from_bytes`).

    :ivar entries: ``{(archive object name, listing hash): index bytes}``.
    """

    def __init__(self, entries):
        self.entries = entries

    def index_of(self, name, etag):
        """The index bytes of the archive object ``name`` when the bundle
        has it with this ``etag`` (else None: not bundled, or the object
        was replaced since)."""
        return self.entries.get((name, etag))

    @classmethod
    def from_bytes(cls, data, name="bundle"):
        """Parse a bundle (:meth:`from_chunks` of one piece).

        :param name: what the error names.
        :raises IndexError_: not a bundle of a known version, cut short,
            or damaged.
        """
        return cls.from_chunks([data], name)

    @classmethod
    def from_chunks(cls, chunks, name="bundle", keep=None):
        """Parse a bundle given in pieces (the chunks of a GET's body, any
        sizes), as they come: what is held is the entries kept, not the
        bundle.

        :param keep: ``keep(archive name, hash, index length)``: whether
            to hold that entry (every entry without it); one not kept is
            read past (and checksummed), never held.
        :raises IndexError_: not a bundle of a known version, cut short,
            or damaged: nothing it held is returned.
        """
        stream = _Pieces(chunks)
        head = stream.take(_BUNDLE_HEAD.size)
        if len(head) < _BUNDLE_HEAD.size or head[:4] != BUNDLE_MAGIC:
            raise exceptions.IndexError_("%s: not a shoebox index bundle "
                                         "(no %r magic)" % (name,
                                                            BUNDLE_MAGIC))
        if head[4] != BUNDLE_VERSION:
            raise exceptions.IndexError_(
                "%s: index bundle format version %d; this reader knows %d"
                % (name, head[4], BUNDLE_VERSION))
        entries, problem = {}, None
        try:
            (_, _, _, count) = _BUNDLE_HEAD.unpack(head)
            for _ in range(count):
                archive = stream.field(_U16).decode("utf-8")
                etag = stream.field(_U8).decode("ascii")
                (length,) = _U32.unpack(stream.exactly(_U32.size))
                if keep is None or keep(archive, etag, length):
                    entries[(archive, etag)] = stream.exactly(length)
                else:
                    stream.skip(length)
        except (UnicodeDecodeError, ValueError) as exc:
            problem = str(exc)
        left = stream.drain()  # what follows: the checksum, if intact
        if not stream.checksum_ok():
            raise exceptions.IndexError_("%s: damaged index bundle "
                                         "(checksum mismatch)" % (name,))
        if problem is None and left != _U32.size:
            problem = "%d bytes after the last entry" % (left - _U32.size)
        if problem is not None:
            raise exceptions.IndexError_("%s: malformed index bundle (%s)"
                                         % (name, problem))
        return cls(entries)

    def __len__(self):
        return len(self.entries)


class _Pieces:
    """The bytes of a bundle given in pieces, taken front to back, with
    the CRC-32 of every byte but the last four (the checksum's) kept on
    the way."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self._tail = b""  # the last bytes come, not yet in the CRC
        self._crc = 0

    def _more(self):
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        chunk = memoryview(chunk).cast("B")
        joined = self._tail + bytes(chunk[:_U32.size])
        rest = chunk[_U32.size:]
        if len(rest) >= _U32.size:
            self._crc = zlib.crc32(joined, self._crc)
            self._crc = zlib.crc32(rest[:-_U32.size], self._crc)
            self._tail = bytes(rest[-_U32.size:])
        else:
            joined += bytes(rest)
            cut = max(0, len(joined) - _U32.size)
            self._crc = zlib.crc32(joined[:cut], self._crc)
            self._tail = joined[cut:]
        self._pending = chunk
        return True

    def _pieces(self, size):
        while size > 0 and (self._pending or self._more()):
            piece = self._pending[:size]
            self._pending = self._pending[len(piece):]
            size -= len(piece)
            yield piece

    def take(self, size):
        """At most ``size`` bytes (fewer at the end)."""
        return b"".join(bytes(piece) for piece in self._pieces(size))

    def exactly(self, size):
        data = self.take(size)
        if len(data) < size:
            raise ValueError("a length past the end")
        return data

    def skip(self, size):
        if sum(len(piece) for piece in self._pieces(size)) < size:
            raise ValueError("a length past the end")

    def field(self, size_of):
        (length,) = size_of.unpack(self.exactly(size_of.size))
        return self.exactly(length)

    def drain(self):
        """Read to the end; how many bytes were left."""
        left = len(self._pending)
        while self._more():
            left += len(self._pending)
        self._pending = memoryview(b"")
        return left

    def checksum_ok(self):
        """After :meth:`drain`: the last four bytes are the CRC-32 of the
        others."""
        return len(self._tail) == _U32.size and \
            _U32.unpack(self._tail)[0] == self._crc
