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
  cancelled subscription may still come), only acked as credit.

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

import datetime
import hashlib
import json
import logging
import os
import urllib.parse

from shoebox_worker import exceptions
from shoebox_worker import files

__all__ = ["Streams", "Stream", "StreamError", "offset_path",
           "read_offset", "write_offset", "resume_point", "METADATA_KEY"]

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

I_RESUME = "stream %s: resuming after offset %d (%s)"
I_FIRST = "stream %s: first start, reading from %s"
W_GAP = ("stream %s: offsets %d-%d were never delivered (the stream's "
         "retention removed them before they were read)")
W_ARCHIVED_GAP = ("stream %s: the archives recovery read lack offset %d "
                  "but hold later ones: resuming at %d (the records after "
                  "the gap will be archived twice, none lost)")
E_NO_OFFSET = ("stream %s: a delivery without an %s header: archived "
               "without %s (exactly once cannot hold for it)")


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


def read_offset(path):
    """The offset saved in ``path``, or None when there is no such file.

    :raises StreamError: the file does not hold an offset.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StreamError("%s: cannot read the stream offset: %s; remove it "
                          "to start again from stream_offset" % (path, exc)
                          ) from None
    offset = data.get("offset") if isinstance(data, dict) else None
    if type(offset) is not int or offset < 0:
        raise StreamError("%s: no stream offset in it (%r); remove it to "
                          "start again from stream_offset" % (path, data))
    return offset


def write_offset(path, queue, offset):
    """Replace ``path`` atomically with ``offset`` (tmp, fsync, rename,
    directory fsync)."""
    files.write_json_atomic(path, {"queue": queue,
                                   "offset": offset}).release()


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
        self._lock = None
        self._warned_header = False

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

    def written(self, offset):
        """A record of ``offset`` was written (not yet synced). The first
        one of a subscription far past the offset asked for says what the
        stream no longer held (a warning); other gaps are the stream's own
        entries (a segment's first one), logged at debug."""
        if offset is None:
            return
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
        self.saved = read_offset(self.path)
        last, gap = resume_point(self.saved, self.archived, self.damaged)
        self.archived = []
        if gap is not None:
            LOG.warning(W_ARCHIVED_GAP, self.queue, gap, gap)
        self.last = self.durable = last
        if last is None:
            LOG.info(I_FIRST, self.queue, _describe(self.start))
        else:
            LOG.info(I_RESUME, self.queue, last,
                     "saved" if last == self.saved else
                     "found in the archives a previous run left")

    def save(self):
        """Save the durable offset if the file is behind it."""
        if self.durable is not None and self.durable != self.saved:
            write_offset(self.path, self.queue, self.durable)
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

    def __init__(self, directory, consumers):
        self._streams = {
            c.queue: Stream(c.queue, offset_path(directory, c.queue),
                            c.stream_offset)
            for c in consumers if c.is_stream}

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
        before it (re)subscribes."""
        for queue in consumer.queues:
            stream = self._streams.get(queue.name)
            if stream is not None:
                queue.consumer_arguments = {OFFSET_ARG: stream.argument()}
                stream.subscribed = True

    def synced(self):
        """Every record written so far is fsynced."""
        for stream in self._streams.values():
            stream.durable = stream.last

    def cut(self):
        """What was not synced was cut off the archive."""
        for stream in self._streams.values():
            stream.last = stream.durable

    def save(self):
        """Save each offset file that is behind (:meth:`synced` first).

        :raises OSError: one could not be written.
        """
        for stream in self._streams.values():
            stream.save()

    def release(self):
        for stream in self._streams.values():
            stream.release()
