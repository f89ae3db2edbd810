"""From an AMQP message body to one record: the payload and its metadata.

oslo.messaging publishes notifications in one of two shapes:

* **v2** (driver ``messagingv2``, the default everywhere now): an envelope
  ``{"oslo.version": "2.0", "oslo.message": "<the notification as a JSON
  string>"}``. The record's payload is the ``oslo.message`` string exactly
  as received (UTF-8), not re-serialised.
* **v1** (driver ``messaging``): the notification object itself. The
  payload is the body exactly as received.

Metadata, all strings: ``event_type``, ``message_id``, ``timestamp``,
``publisher_id``, ``priority``, ``request_id`` (from
``_context_request_id``), ``queue``, ``routing_key``, ``exchange`` (the
one the message was published to: the service's ``control_exchange``,
which tells the services apart when one queue is bound to all of them),
plus configured dotted paths (``payload.instance_id``) and static pairs.

Anything else is **malformed** and still kept: the body is archived
verbatim with ``malformed=<reason>`` (and ``content_type``) in its
metadata. :func:`parse` never raises for bad input.

What a message puts into metadata, and through it into logs, is bounded:
a reason shows an offending value as its ``repr`` (control characters
escaped) cut to :data:`MAX_SHOWN` characters, and every metadata value is
cut to :data:`MAX_VALUE` characters; a cut one ends with
:data:`ELLIPSIS`. (A 1 MB ``oslo.version`` gives a reason of 200
characters, not of 1 MB.)

:func:`wrap` is the other way, for the tools that publish (``replay``,
``generate``): a notification into the v2 envelope, as oslo.messaging's
notifier sends it.
"""

import dataclasses

import orjson

from shoebox_worker import index

try:  # the fast path; everything works without it, slower
    import simdjson
except ImportError:  # pragma: no cover - a dependency, normally present
    simdjson = None

__all__ = ["Parsed", "MetadataExtractor", "Unwrapper", "parse", "to_bytes",
           "wrap"]

_VERSION_KEY = "oslo.version"
_MESSAGE_KEY = "oslo.message"

#: Longest text of an offending value shown in a ``malformed`` reason.
MAX_SHOWN = 200
#: Longest metadata value taken from a message (characters).
MAX_VALUE = 1024
#: What ends a value or a shown text that was cut.
ELLIPSIS = "\u2026"
# A UTF-8 byte order mark: simdjson skips it, orjson refuses it
_BOM = b"\xef\xbb\xbf"
# A value orjson cannot write back (nested deeper than it goes)
_TOO_DEEP = "(a JSON value nested too deep to show)"

#: Top-level notification keys copied into metadata: (metadata key, key).
STANDARD_FIELDS = (
    ("event_type", "event_type"),
    ("message_id", "message_id"),
    ("timestamp", "timestamp"),
    ("publisher_id", "publisher_id"),
    ("priority", "priority"),
    ("request_id", "_context_request_id"),
)


@dataclasses.dataclass
class Parsed:
    """One message, ready to write.

    :ivar payload: the bytes to store.
    :ivar notification: the decoded notification, or None when malformed.
    :ivar malformed: why the body is not a notification, or None.
    """

    payload: bytes
    notification: dict | None
    malformed: str | None = None


def to_bytes(body, encoding=None):
    """The body as bytes, however the transport handed it over."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode(encoding or "utf-8", "surrogateescape")
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    # kombu's memory/redis transports may hand over decoded JSON
    return orjson.dumps(body)


def wrap(notification):
    """Wrap a notification in oslo.messaging's v2 envelope.

    :param notification: the notification: a dict (serialised here), or
        its JSON text (str or UTF-8 bytes, used exactly as given).
    :returns: JSON bytes ``{"oslo.version": "2.0", "oslo.message": "..."}``
        whose ``oslo.message`` is the notification's JSON text as a string.
    """
    if isinstance(notification, dict):
        notification = orjson.dumps(notification)
    if isinstance(notification, bytes):
        notification = notification.decode("utf-8")
    return orjson.dumps({_VERSION_KEY: "2.0", _MESSAGE_KEY: notification})


def _cut(text, limit):
    """``text``, or its first ``limit - 1`` characters and
    :data:`ELLIPSIS`."""
    if len(text) <= limit:
        return text
    return text[:limit - 1] + ELLIPSIS


def _shown(value):
    """An offending value as a reason shows it: its ``repr`` (control
    characters escaped), at most :data:`MAX_SHOWN` characters; a JSON
    object or array by its kind only (its repr may be huge or too deep)."""
    if isinstance(value, dict):
        return "(a JSON object)"
    if isinstance(value, list):
        return "(a JSON array)"
    if isinstance(value, str):
        text = repr(value[:MAX_SHOWN])  # never the whole of a huge one
        if len(value) > MAX_SHOWN:
            text += ELLIPSIS
        return _cut(text, MAX_SHOWN)
    return _cut(repr(value), MAX_SHOWN)


def _why_not_json(body, exc):
    if not body.strip():
        return "empty body"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    reason = str(exc).lower()  # orjson 3.13: "depth limit exceeded"
    if "recursion" in reason or "depth limit" in reason:
        return "JSON nested too deep"
    return "not JSON"


def parse(body):
    """Unwrap one message body (bytes).

    :returns: a :class:`Parsed`; ``malformed`` says what was wrong.
    """
    try:
        outer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Parsed(body, None, _why_not_json(body, exc))
    if not isinstance(outer, dict):
        return Parsed(body, None, "not a JSON object")
    has_version = _VERSION_KEY in outer
    has_message = _MESSAGE_KEY in outer
    if not (has_version or has_message):
        return Parsed(body, outer)  # v1: the notification itself
    if not (has_version and has_message):
        return Parsed(body, None, "broken envelope: missing %s"
                      % (_MESSAGE_KEY if has_version else _VERSION_KEY))
    version = outer[_VERSION_KEY]
    if not isinstance(version, str) or version.split(".")[0] != "2":
        return Parsed(body, None, "unknown envelope version %s"
                      % _shown(version))
    inner = outer[_MESSAGE_KEY]
    if not isinstance(inner, str):
        return Parsed(body, None, "broken envelope: %s is not a string"
                      % _MESSAGE_KEY)
    # orjson refuses lone surrogate escapes, so this always encodes
    payload = inner.encode("utf-8")
    try:
        notification = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Parsed(body, None, "broken envelope: %s"
                      % _why_not_json(payload, exc))
    if not isinstance(notification, dict):
        return Parsed(body, None, "broken envelope: not a JSON object")
    return Parsed(payload, notification)


if simdjson is not None:
    _MAPPINGS = (dict, simdjson.Object)
    _LAZY = (simdjson.Object, simdjson.Array)
else:  # pragma: no cover
    _MAPPINGS, _LAZY = (dict,), ()


def _as_text(value):
    """A JSON value as a metadata string, at most :data:`MAX_VALUE`
    characters: a string as it is, anything else as JSON text."""
    if not isinstance(value, str):
        if isinstance(value, _LAZY):  # simdjson's lazy containers
            value = value.as_dict() if isinstance(value, _MAPPINGS) else \
                value.as_list()
        try:
            value = orjson.dumps(value).decode("utf-8")
        except orjson.JSONEncodeError:  # deeper than orjson writes
            return _TOO_DEEP
    return _cut(value, MAX_VALUE)


class MetadataExtractor:
    """Builds the ``str:str`` metadata of each record.

    Compiled once from config, called once per message.

    :param fields: dotted paths into the notification to add, e.g.
        ``payload.instance_id``; the key is the path.
    :param static: pairs added to every record (``region=dfw``).
    """

    def __init__(self, fields=(), static=None):
        self.fields = [(path, path.split(".")) for path in fields]
        self.static = dict(static or {})

    def __call__(self, parsed, queue, routing_key, properties=None, *,
                 exchange=None):
        """Metadata for one parsed message.

        :param parsed: a :class:`Parsed`.
        :param queue: the queue it came from.
        :param routing_key: its routing key.
        :param properties: AMQP properties (for malformed bodies: the
            message id and content type when the publisher set them).
        :param exchange: the exchange it was published to (None or ``""``:
            the default exchange, or a transport that does not tell).
        """
        metadata = {}
        notification = parsed.notification
        if notification is not None:
            for key, source in STANDARD_FIELDS:
                value = notification.get(source)
                if value is not None:
                    metadata[key] = _as_text(value)
            for path, parts in self.fields:
                value = notification
                for part in parts:
                    if not isinstance(value, _MAPPINGS):
                        value = None
                        break
                    value = value.get(part)
                if value is not None:
                    metadata[path] = _as_text(value)
            if "event_type" not in metadata:
                metadata["malformed"] = "no event_type"
        else:
            metadata["malformed"] = parsed.malformed
            properties = properties or {}
            for key in ("message_id", "content_type", "content_encoding"):
                if properties.get(key):
                    metadata[key] = _as_text(properties[key])
        metadata["queue"] = queue
        metadata["routing_key"] = routing_key or ""
        metadata["exchange"] = exchange or ""
        metadata.update(self.static)
        return metadata


class Unwrapper:
    """:func:`parse` and :class:`MetadataExtractor` in one call, fast.

    A well-formed notification is read with simdjson's validating, lazy
    parser: only the keys the metadata needs become Python objects, where
    orjson would build the whole notification (most of the per-message
    cost). Anything the fast path does not take as it is (malformed input,
    integers beyond 64 bits, an envelope of another shape) goes through
    :func:`parse`, which decides what is malformed and why; the two paths
    give the same payload and metadata (tested), except that a key
    repeated in one object (which JSON leaves undefined) gives its first
    value here and its last there. The index values are the same on both
    paths, those ``--where`` reads (:class:`shoebox_worker.index.Reader`
    reads a record that may repeat a key of theirs as ``--where`` does).
    A body (or ``oslo.message``) that starts with a UTF-8 byte order mark,
    which simdjson takes and orjson refuses, is left to :func:`parse`.

    Not thread-safe (simdjson parsers are reused): one per consumer.

    :param fields: dotted paths, as for :class:`MetadataExtractor`.
    :param static: pairs added to every record.
    :param index_fields: dotted paths whose values the archive's index
        holds (:mod:`shoebox_worker.index`), read in the same pass.
    """

    def __init__(self, fields=(), static=None, index_fields=()):
        self.extract = MetadataExtractor(fields, static)
        self.index_fields = index.compile_fields(index_fields)
        self._values = index.Reader(index_fields, _MAPPINGS) \
            if index_fields else None
        self._outer = self._inner = None
        if simdjson is not None:
            self._outer = simdjson.Parser()
            self._inner = simdjson.Parser()

    def __call__(self, body, queue, routing_key, properties=None, *,
                 exchange=None):
        """The record for one body (bytes).

        :param properties: AMQP properties, or a function returning them
            (called for malformed bodies only).
        :param exchange: the exchange it was published to.
        :returns: ``(payload, metadata, values)``; ``values``: the text of
            each index field as ``--where`` reads it in the payload
            (:func:`shoebox_worker.index.payload_values`; a malformed
            body's too: ``--where`` reads what it can), empty when no
            field is indexed.
        """
        if self._outer is not None:
            try:
                result = self._fast(body, queue, routing_key, exchange)
            except Exception:  # noqa: BLE001 - the reference path decides
                result = None
            if result is not None:
                return result
        parsed = parse(body)
        if callable(properties):
            properties = properties() if parsed.malformed else None
        if not self.index_fields:
            values = ()
        elif parsed.notification is not None:  # read as notification_of
            values = index.values_of(parsed.notification, self.index_fields)
        else:  # malformed: what --where reads in its payload
            values = index.payload_values(parsed.payload, self.index_fields)
        return parsed.payload, self.extract(parsed, queue, routing_key,
                                            properties,
                                            exchange=exchange), values

    def _fast(self, body, queue, routing_key, exchange):
        """``(payload, metadata, values)``, or None to leave it to
        :func:`parse`."""
        if body.startswith(_BOM):
            return None
        outer = self._outer.parse(body)
        try:
            if not isinstance(outer, simdjson.Object):
                return None
            has_version = _VERSION_KEY in outer
            has_message = _MESSAGE_KEY in outer
            if not (has_version or has_message):  # v1: the notification
                return (body,) + self._metadata(outer, queue, routing_key,
                                                exchange, body)
            if not (has_version and has_message):
                return None
            version = outer[_VERSION_KEY]
            message = outer[_MESSAGE_KEY]
        finally:
            del outer  # the parser is reused: drop its lazy proxies
        if not (isinstance(version, str) and isinstance(message, str)
                and version.split(".")[0] == "2"):
            return None
        payload = message.encode("utf-8")
        if payload.startswith(_BOM):
            return None
        notification = self._inner.parse(payload)
        try:
            if not isinstance(notification, simdjson.Object):
                return None
            return (payload,) + self._metadata(notification, queue,
                                               routing_key, exchange, payload)
        finally:
            del notification

    def _metadata(self, notification, queue, routing_key, exchange, raw):
        """``(metadata, values)`` of a notification (a simdjson object
        parsed from ``raw``)."""
        values = self._values(notification, raw) \
            if self._values is not None else ()
        return self.extract(Parsed(b"", notification), queue, routing_key,
                            exchange=exchange), values
