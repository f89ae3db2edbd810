"""Stream queues: every message of a RabbitMQ stream archived exactly once.

Guarantee
---------
A ``[consumer:QUEUE]`` whose ``queue_arguments`` say ``x-queue-type =
stream`` reads a RabbitMQ stream: a replayable log that every consumer reads
whole, from an offset it names (``x-stream-offset``), where an ack is
credit, not deletion. The worker remembers how far it has archived, and so
**archives each message of the stream exactly once**, across ``kill -9``,
restarts, broker reconnects, and the shipping and deletion of its archives:

- each record carries its stream offset in its metadata
  (:data:`METADATA_KEY`, ``stream_offset``);
- at each ack point (the batch's fsync, and before a closed archive goes to
  the shipper) the highest offset written and fsynced is saved in a small
  file per queue in the working directory (:func:`offset_path`:
  ``<queue>.stream-offset``), replaced atomically (a temporary file, fsync,
  rename, directory fsync);
- at start, after crash recovery has read the archives a killed run left,
  the worker resumes right after the highest of the saved offset and the
  offsets recovery found in those archives (:func:`resume_point`), saves
  that before a recovered archive gets its state file (one with a state
  file is not read again) or anything is shipped, and every
  (re)subscription asks the
  broker for the offset after the last one written (:meth:`Stream.argument`);
- a delivery at or below the last offset written is not written again
  (the broker starts at the chunk holding a timestamp, and deliveries of a
  cancelled subscription may still come), only acked as credit; the first
  one of a subscription is warned of (:data:`W_BEHIND`).

The offset file also names its stream (:class:`Identity`: the SHA-256 of
the message at the last offset synced), since a stream deleted and
declared again, or an offset file restored from another time, has offsets
of its own: before each subscription the worker reads that offset on a
connection of its own (:func:`first_delivery`); a stream that holds
another message there, or ends before it, is another stream: one line
(:data:`E_OTHER_STREAM`) names both, and it is read from its first offset,
so that none of it is skipped. An offset file without an identity (an
earlier version's) is checked by its offset alone.

Where a kill may land: records written but not fsynced are cut off by
recovery (a torn tail) or were never on disk, and neither the offset file
nor recovery goes past them: they are read again. Records fsynced but not
yet in the offset file are found by recovery in the archive, which is not
shipped before the resume point is saved. An archive is handed to the
shipper only once the offset file covers it, so one shipped and deleted
never leaves the offset file behind it. A stream's offsets have gaps of
their own (each segment's first entry is the broker's), so a gap recovery
finds is no hole, unless it passed over damaged records with valid ones
after them (a power cut can lose unsynced pages in the middle of the
tail): then the gap stops the resume point before it, and the records
after it are archived twice, never lost.

The first start of a queue (no offset file, no archived offset) reads from
``stream_offset``: ``first`` by default (everything the stream retains:
an archiver loses nothing; on a stream declared by the archiver itself it
is the same as ``next``), ``last``, ``next``, an offset, a time (the broker
starts at the chunk holding it: a chunk's messages before that time come
too) or an age such as ``1h``.

Every consumer of a stream reads all of it, so two workers with their own
working directories each archive the whole stream, and ``[worker]
processes = N`` is refused (each process would archive everything). Two
workers sharing one working directory cannot both read one stream: the
offset file is locked (:data:`LOCK_SUFFIX`) for as long as a worker runs.
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.parse

from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.consume import broker

__all__ = ["Streams", "Stream", "StreamError", "Identity", "offset_path",
           "read_saved", "read_offset", "write_offset", "resume_point",
           "first_delivery", "METADATA_KEY"]

LOG = logging.getLogger(__name__)

#: The consumer argument naming where to start, and the header of each
#: delivery giving its offset.
OFFSET_ARG = "x-stream-offset"
#: The record metadata key holding a record's stream offset.
METADATA_KEY = "stream_offset"
#: The offset file of a queue: its name (percent-encoded) and this.
OFFSET_SUFFIX = ".stream-offset"
#: Held (flock) by the worker reading a stream into this directory.
LOCK_SUFFIX = ".lock"
#: The longest encoded queue name in a file name (255 bytes, less the
#: suffixes and a temporary file's ``.tmp``).
_MAX_NAME = 200
#: Seconds the check before a subscription waits for the message at the
#: identity's offset. The stream archived before still holds it (or, once
#: its retention removed it, later ones) and delivers it at once (2-5 ms
#: measured on RabbitMQ 3.10 and 4.0); a stream that ends before that
#: offset delivers nothing, not even what is published meanwhile, until
#: it reaches the offset.
CHECK_WAIT = 5.0
#: :func:`first_delivery` on a transport that is no RabbitMQ (kombu's
#: ``memory://``): there is nothing to check.
UNKNOWN = "unknown"
#: Where a stream found to be another one is read from: all of it.
FROM_START = "first"
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")

I_RESUME = "stream %s: resuming after offset %d (%s)"
I_FIRST = "stream %s: first start, reading from %s"
W_GAP = ("stream %s: offsets %d-%d were never delivered (the stream's "
         "retention removed them before they were read)")
W_ARCHIVED_GAP = ("stream %s: the archives recovery read lack offset %d "
                  "but hold later ones: resuming at %d (the records after "
                  "the gap will be archived twice, none lost)")
E_NO_OFFSET = ("stream %s: a delivery without an %s header: archived "
               "without %s (exactly once cannot hold for it)")
E_OTHER_STREAM = ("stream %s: %s names %s; the stream holds %s: not the "
                  "stream archived before (deleted and declared again, or a "
                  "working directory restored from another time): reading "
                  "it from its first offset, so that none of it is skipped")
W_BEHIND = ("stream %s: asked for offset %s, the broker delivered offset %d, "
            "at or below the last one archived (%d): taken as archived "
            "already (acked as credit, not written), and so every delivery "
            "up to offset %d")
I_NO_IDENTITY = ("stream %s: %s names no stream identity (an earlier "
                 "version's): checking only that the stream holds offset %d; "
                 "the identity is saved with the next offset")


class StreamError(exceptions.ShoeboxError):
    """An offset file that cannot be read, or a stream read by another
    worker in this working directory."""


def offset_path(directory, queue):
    """The offset file of ``queue`` in ``directory``: the name
    percent-encoded, or for a name too long for a file name (a queue name
    may have 255 bytes) its start and a hash of it."""
    name = urllib.parse.quote(queue, safe="")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(queue.encode("utf-8")).hexdigest()[:16]
        name = "%s-%s" % (name[:_MAX_NAME - 17], digest)
    return os.path.join(directory, name + OFFSET_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Which stream an offset file is about: what the stream held at one
    offset, the SHA-256 of that message's body as delivered.

    A stream deleted and declared again starts at offset 0 with other
    messages: at that offset it holds another message, or none yet. Over
    AMQP 0-9-1 a delivery carries no other mark of its stream (RabbitMQ
    3.10 and 4.0 add only ``x-stream-offset``; a stream's declare-ok says
    0 messages), so the message itself is the mark.

    :ivar offset: the offset.
    :ivar sha256: the body's SHA-256 (hex), or None when only the offset
        is known (an offset file of an earlier version).
    """

    offset: int
    sha256: str | None = None

    def __str__(self):
        if self.sha256 is None:
            return "offset %d (no sha256 saved)" % self.offset
        return "sha256 %s at offset %d" % (self.sha256[:16], self.offset)


def digest(body):
    """The SHA-256 (hex) of a delivery's body (bytes)."""
    return hashlib.sha256(body).hexdigest()


def _identity_in(path, data):
    """The :class:`Identity` an offset file's JSON names, or None.

    :raises StreamError: it names one, not in this shape.
    """
    identity = data.get("identity")
    if identity is None:
        return None
    offset = identity.get("offset") if isinstance(identity, dict) else None
    sha256 = identity.get("sha256") if isinstance(identity, dict) else None
    if type(offset) is not int or offset < 0 or not isinstance(
            sha256, str) or not _SHA256.match(sha256):
        raise StreamError("%s: a stream identity that is none (%r); remove "
                          "it to start again from stream_offset"
                          % (path, identity))
    return Identity(offset, sha256)


def read_saved(path):
    """``(offset, identity)`` saved in ``path``: ``(None, None)`` when
    there is no such file; the identity is None in an offset file of an
    earlier version (offset only).

    :raises StreamError: the file does not hold an offset.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        raise StreamError("%s: cannot read the stream offset: %s; remove it "
                          "to start again from stream_offset" % (path, exc)
                          ) from None
    offset = data.get("offset") if isinstance(data, dict) else None
    if type(offset) is not int or offset < 0:
        raise StreamError("%s: no stream offset in it (%r); remove it to "
                          "start again from stream_offset" % (path, data))
    return offset, _identity_in(path, data)


def read_offset(path):
    """The offset saved in ``path``, or None when there is no such file
    (:func:`read_saved`)."""
    return read_saved(path)[0]


def write_offset(path, queue, offset, identity=None):
    """Replace ``path`` atomically with ``offset`` and the stream's
    ``identity`` when its SHA-256 is known (tmp, fsync, rename, directory
    fsync)."""
    data = {"queue": queue, "offset": offset}
    if identity is not None and identity.sha256 is not None:
        data["identity"] = {"offset": identity.offset,
                            "sha256": identity.sha256}
    files.write_json_atomic(path, data).release()


def first_delivery(connection, queue, offset):
    """What the stream ``queue`` delivers first to a subscription at
    ``offset``, on a connection of its own (cloned from ``connection``,
    closed before returning: nothing it was sent stays with the caller).

    It waits :data:`CHECK_WAIT` seconds at most, and at most half the
    heartbeat of ``connection``, which is not read meanwhile. The probe's
    own connection has no heartbeat: py-amqp starts a read's timeout
    again at each frame, and the broker's heartbeats would make it
    endless.

    :returns: the :class:`Identity` of that delivery (an offset, the
        message's SHA-256); None when nothing came within that wait (the
        stream ends before ``offset``); :data:`UNKNOWN` on a transport
        that is no RabbitMQ.
    :raises: kombu's connection and channel errors.
    """
    if not broker.is_amqp(connection):
        return UNKNOWN
    wait = min(CHECK_WAIT, (connection.heartbeat or 2 * CHECK_WAIT) / 2)
    found = []
    with connection.clone(heartbeat=0) as probe:
        probe.connect()
        channel = probe.channel()
        channel.auto_decode = False  # the body's bytes, as the worker's
        channel.basic_qos(0, 1, False)
        channel.basic_consume(queue, callback=found.append,
                              arguments={OFFSET_ARG: offset})
        deadline = time.monotonic() + wait
        while not found:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                probe.drain_events(timeout=left)
            except socket.timeout:
                pass
    message = found[0]
    delivered = (message.headers or {}).get(OFFSET_ARG)
    if type(delivered) is not int:
        return UNKNOWN
    return Identity(delivered, digest(message.body))


def _holds(found, offset):
    """What a stream delivered from ``offset`` (:func:`first_delivery`),
    as :data:`E_OTHER_STREAM` says it."""
    if found is None:
        return "nothing at or after offset %d" % offset
    if found.offset < offset:
        return "offset %d first when asked for %d" % (found.offset, offset)
    return str(found)


def resume_point(saved, archived, damaged=False):
    """The last offset archived: the saved one, or the highest found in the
    archives recovery read.

    A stream's offsets have gaps of their own (each segment starts with an
    entry of the broker's, which no consumer gets), so a gap in what was
    archived is no hole, unless recovery passed over damaged records that
    had valid ones after them (a power cut's unsynced pages, written back
    out of order): then only the contiguous run past the saved offset
    counts, and what follows the first gap is read again (archived twice
    rather than lost).

    :param saved: the offset file's offset, or None.
    :param archived: offsets found in recovered archives (any order).
    :param damaged: recovery passed over such damage.
    :returns: ``(last, gap)``: the last offset archived (None: nothing
        was), and the first offset missing before later ones were found
        (None when there is no gap, or no damage).
    """
    if not damaged:
        known = [o for o in (saved, *archived) if o is not None]
        return (max(known) if known else None), None
    last = saved
    for offset in sorted(set(archived)):
        if last is not None and offset <= last:
            continue
        if last is None or offset == last + 1:
            last = offset
            continue
        return last, last + 1
    return last, None


def _describe(start):
    if isinstance(start, datetime.datetime):
        return start.isoformat()
    return str(start)


class Stream:
    """How far one stream queue has been archived by this worker.

    :param queue: the queue's name.
    :param path: its offset file.
    :param start: ``stream_offset``, for a first start.
    """

    def __init__(self, queue, path, start):
        self.queue = queue
        self.path = path
        self.start = start
        #: The highest offset written to an archive (None: none yet).
        self.last = None
        #: The highest offset known fsynced, and the one saved.
        self.durable = None
        self.saved = None
        #: Offsets found in the archives crash recovery read, and whether
        #: it passed over damage with valid records after it.
        self.archived = []
        self.damaged = False
        #: Subscribed, nothing written since (a gap then is the stream's
        #: retention at work).
        self.subscribed = False
        #: Which stream the durable offset is of (:class:`Identity`):
        #: saved with it, checked before each subscription (None:
        #: nothing archived, or nothing known to check).
        self.identity = None
        # (offset, body) of the last record written: the identity once
        # it is synced
        self._pending = None
        self._lock = None
        self._warned_header = False
        self._warned_behind = False

    def argument(self):
        """``x-stream-offset`` for a subscription: right after the last
        offset written, or ``stream_offset`` the first time."""
        return self.start if self.last is None else self.last + 1

    def offset_of(self, message):
        """A delivery's offset (an int), or None when it has none."""
        offset = (message.headers or {}).get(OFFSET_ARG)
        if type(offset) is not int:
            if not self._warned_header:
                self._warned_header = True
                LOG.error(E_NO_OFFSET, self.queue, OFFSET_ARG, METADATA_KEY)
            return None
        return offset

    def is_new(self, offset):
        """Is ``offset`` past the last one written (or unknown)?"""
        return offset is None or self.last is None or offset > self.last

    def credit(self, offset):
        """A delivery at or below the last offset written, acked as credit
        and not written. The first one of a subscription that has
        written nothing is warned of (once per subscription): the stream
        delivers from the offset asked for, so it means the deliveries are
        not what the offset file says was archived."""
        if self.subscribed and not self._warned_behind and \
                offset is not None:
            self._warned_behind = True
            LOG.warning(W_BEHIND, self.queue, self.argument(), offset,
                        self.last, self.last)

    def written(self, offset, body=None):
        """A record of ``offset`` was written (not yet synced), from a
        delivery of ``body`` (its bytes: the stream's identity once
        synced). The first one of a subscription far past the offset
        asked for says what the stream no longer held (a warning); other
        gaps are the stream's own entries (a segment's first one), logged
        at debug."""
        if offset is None:
            return
        if body is not None:
            self._pending = (offset, body)
        if self.last is not None and offset > self.last + 1:
            # retention removes whole segments, each two entries or more
            removed = self.subscribed and offset > self.last + 2
            LOG.log(logging.WARNING if removed else logging.DEBUG, W_GAP,
                    self.queue, self.last + 1, offset - 1)
        self.subscribed = False
        self.last = offset

    def resume(self):
        """Lock the offset file, and take the resume point from it and
        what recovery found (logged)."""
        lock_path = self.path + LOCK_SUFFIX
        try:
            self._lock = files.FileLock(lock_path)
        except BlockingIOError:
            raise StreamError(
                "%s is locked: another worker reads stream %r into this "
                "working directory; give each worker of a stream its own "
                "[archive] working_directory" % (lock_path, self.queue)
            ) from None
        self.saved, self.identity = read_saved(self.path)
        last, gap = resume_point(self.saved, self.archived, self.damaged)
        self.archived = []
        if gap is not None:
            LOG.warning(W_ARCHIVED_GAP, self.queue, gap, gap)
        self.last = self.durable = last
        if last is None:
            LOG.info(I_FIRST, self.queue, _describe(self.start))
            return
        LOG.info(I_RESUME, self.queue, last,
                 "saved" if last == self.saved else
                 "found in the archives a previous run left")
        if self.identity is None:  # the stream must at least hold it
            self.identity = Identity(last)
            if self.saved is not None:
                LOG.info(I_NO_IDENTITY, self.queue, self.path, last)

    def check(self, probe, connection):
        """Before a subscription: is the stream the one archived before?
        It must hold the identity's message at its offset (or, once its
        retention removed that, later ones). If not, say so in one line
        naming both, and read it from its first offset.

        :param probe: :func:`first_delivery`, or what stands for it.
        :param connection: the worker's kombu connection.
        """
        if self.identity is None:
            return
        offset = self.identity.offset
        found = probe(connection, self.queue, offset)
        if found is UNKNOWN or (found is not None and found.offset > offset):
            return  # nothing to check; or retention at work (written says)
        if found is not None and found.offset == offset and \
                self.identity.sha256 in (None, found.sha256):
            self.identity = found
            return
        LOG.error(E_OTHER_STREAM, self.queue, self.path, self.identity,
                  _holds(found, offset))
        self.last = self.durable = self.saved = None
        self.identity = self._pending = None
        self.start = FROM_START

    def subscribe(self, probe, connection):
        """A subscription is made: checked first (:meth:`check`).

        :returns: its ``x-stream-offset`` (:meth:`argument`).
        """
        self.check(probe, connection)
        self.subscribed = True
        self._warned_behind = False
        return self.argument()

    def synced(self):
        """Every record written so far is fsynced: the last one's offset
        is durable, and names the stream."""
        self.durable = self.last
        if self._pending is not None and self._pending[0] == self.last:
            self.identity = Identity(self.last, digest(self._pending[1]))
        self._pending = None

    def cut(self):
        """What was not synced was cut off the archive."""
        self.last = self.durable
        self._pending = None

    def save(self):
        """Save the durable offset (and the identity) if the file is
        behind it."""
        if self.durable is not None and self.durable != self.saved:
            write_offset(self.path, self.queue, self.durable, self.identity)
            self.saved = self.durable

    def release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class Streams:
    """The stream queues of one worker, by queue name.

    :param directory: the working directory (offset files go there).
    :param consumers: the ``[consumer:QUEUE]`` sections; those reading a
        stream (:attr:`~shoebox_worker.config.ConsumerConfig.is_stream`)
        are kept.
    """

    def __init__(self, directory, consumers, probe=first_delivery):
        self._streams = {
            c.queue: Stream(c.queue, offset_path(directory, c.queue),
                            c.stream_offset)
            for c in consumers if c.is_stream}
        #: What a subscription would deliver first (:func:`first_delivery`).
        self.probe = probe

    def __bool__(self):
        return bool(self._streams)

    def get(self, queue):
        """The :class:`Stream` of ``queue``, or None for another queue."""
        return self._streams.get(queue)

    def recovered(self, found):
        """Crash recovery's ``on_record``: note a record's offset, if it
        is one of a stream of ours."""
        metadata = found[3]
        stream = self._streams.get(metadata.get("queue"))
        offset = metadata.get(METADATA_KEY)
        if stream is not None and offset is not None and offset.isdigit():
            stream.archived.append(int(offset))

    def damaged(self, path, skipped):
        """Crash recovery's ``on_damage``: ``path`` had damaged records
        before valid ones (which stream's, nobody knows)."""
        for stream in self._streams.values():
            stream.damaged = True

    def resume(self):
        """After recovery, before shipping starts: lock, compute and save
        each stream's resume point.

        :raises StreamError: an offset file is unreadable, or locked.
        """
        for stream in self._streams.values():
            stream.resume()
            stream.save()

    def position(self, consumer):
        """Set ``x-stream-offset`` on a kombu Consumer's stream queues,
        before it (re)subscribes, once each stream is checked to be the
        one archived before (:meth:`Stream.check`).

        :raises: kombu's connection and channel errors (the check's).
        """
        for queue in consumer.queues:
            stream = self._streams.get(queue.name)
            if stream is not None:
                queue.consumer_arguments = {OFFSET_ARG: stream.subscribe(
                    self.probe, consumer.connection)}

    def synced(self):
        """Every record written so far is fsynced."""
        for stream in self._streams.values():
            stream.synced()

    def cut(self):
        """What was not synced was cut off the archive."""
        for stream in self._streams.values():
            stream.cut()

    def save(self):
        """Save each offset file that is behind (:meth:`synced` first).

        :raises OSError: one could not be written.
        """
        for stream in self._streams.values():
            stream.save()

    def release(self):
        for stream in self._streams.values():
            stream.release()
