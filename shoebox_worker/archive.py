"""ArchiveWriter and ArchiveReader: one archive file each.

An archive is nothing but records (see :mod:`shoebox_worker.record`) one
after another; there is no file header, so a v1 archive written by
StackTach shoebox 0.7 and a v2 archive written here read the same way.

Durability is the caller's choice: :meth:`ArchiveWriter.write` buffers,
:meth:`ArchiveWriter.sync` flushes and fsyncs. The worker acks messages only
after ``sync()`` returns.
"""

import dataclasses
import logging
import os

from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import record
from shoebox_worker import timestamps

__all__ = [
    "ArchiveWriter",
    "ArchiveReader",
    "Skipped",
    "ArchiveReport",
    "inspect_file",
    "cut_torn_tail",
]

LOG = logging.getLogger(__name__)

#: How much is read from disk at a time.
READ_CHUNK = record.READ_CHUNK
#: The writer's buffer; records are appended to it and flushed by sync().
WRITE_BUFFER = 1 << 20


class Archive:
    """What both sides share: a filename and context management."""

    def __init__(self, filename):
        self.filename = os.fspath(filename)
        self._handle = None

    def get_file_handle(self):
        """The open file object (the seed's API; roll checkers used it)."""
        return self._handle

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @property
    def closed(self):
        return self._handle is None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class ArchiveWriter(Archive):
    """Append records to an archive file.

    A writer never truncates or overwrites: by default the file must not
    exist yet; with ``exclusive=False`` records are appended to it.
    Records are buffered in memory (up to :data:`WRITE_BUFFER` bytes) and
    written with one system call per :meth:`flush`.

    :param filename: path of the file.
    :param version: record format version (1 for StackTach compatibility).
    :param exclusive: refuse an existing file (default) or append to it.
    :raises FileExistsError: the file exists and ``exclusive`` is true.
    :raises InvalidVersion: an unknown version.
    """

    def __init__(self, filename, version=record.CURRENT_VERSION,
                 exclusive=True):
        super().__init__(filename)
        if version not in record.VERSIONS:
            raise exceptions.InvalidVersion(
                "cannot write format version %r" % (version,))
        self.version = version
        #: Records written by this writer (buffered ones included).
        self.records = 0
        #: Metadata of the first and the last record written.
        self.first_metadata = None
        self.last_metadata = None
        #: Earliest and latest record ``timestamp`` written
        #: (:class:`~shoebox_worker.timestamps.Span`), and as of the last
        #: sync (what :meth:`abandon` goes back to).
        self.span = timestamps.Span()
        self._synced_span = timestamps.Span()
        self._handle = open(self.filename, "xb" if exclusive else "ab",
                            buffering=0)
        #: Bytes in the archive, buffered ones included.
        self.size = os.fstat(self._handle.fileno()).st_size
        #: Bytes known to be on disk (fsynced).
        self.synced_size = self.size
        self._buffer = []
        self._buffered = 0

    def write(self, metadata, payload):
        """Append one record (buffered until :meth:`flush` or :meth:`sync`).

        :param metadata: ``str:str`` dict.
        :param payload: str (stored as UTF-8) or bytes.
        :returns: the record's size in bytes.
        """
        data = record.pack(metadata, payload, self.version)
        self._buffer.append(data)
        self._buffered += len(data)
        if not self.records:
            self.first_metadata = metadata
        self.last_metadata = metadata
        self.span.add(metadata)
        self.records += 1
        self.size += len(data)
        if self._buffered >= WRITE_BUFFER:
            self.flush()
        return len(data)

    def tell(self):
        """Bytes in the archive so far, buffered ones included."""
        return self.size

    def flush(self):
        """Hand buffered records to the operating system."""
        if self._buffer:
            data = b"".join(self._buffer)
            view = memoryview(data)
            while view:  # a short write only happens near a full disk
                written = self._handle.write(view)
                view = view[written:]
            self._buffer = []
            self._buffered = 0

    def sync(self):
        """Flush and fsync: once this returns, the records survive a crash."""
        self.flush()
        os.fsync(self._handle.fileno())
        self.synced_size = self.size
        self._synced_span = self.span.copy()

    def abandon(self):
        """Give up on what is not synced after a failed write: drop the
        buffer, cut the file back to the last sync, close it. The time
        range (:attr:`span`) goes back to the last sync's too.

        :returns: the size kept (bytes).
        """
        handle, self._handle = self._handle, None
        self._buffer = []
        self._buffered = 0
        self.span = self._synced_span.copy()
        if handle is not None:
            try:
                os.ftruncate(handle.fileno(), self.synced_size)
                os.fsync(handle.fileno())
            finally:
                handle.close()
        self.size = self.synced_size
        return self.size

    def close(self):
        """Flush, fsync and close (idempotent)."""
        if self._handle is not None:
            self.sync()
            super().close()

    def report(self):
        """An :class:`ArchiveReport` of what this writer wrote, from its own
        counts (the file is not read again).

        Records the file held before an appending writer opened it are not
        counted (nor in the time range): use :func:`inspect_file` for
        those.
        """
        earliest, latest = self.span.texts()
        return ArchiveReport(
            self.filename, records=self.records, size=self.size,
            versions={self.version} if self.records else set(),
            first_metadata=self.first_metadata,
            last_metadata=self.last_metadata,
            earliest=earliest, latest=latest)


def _is_path(source):
    return isinstance(source, (str, bytes, os.PathLike))


def _name_of(source, name):
    """What messages call an archive: a path is its own name; a file
    object is ``name``, else its own ``name``, else ``<stream>``."""
    if _is_path(source):
        return os.fspath(source)
    return name or getattr(source, "name", None) or "<stream>"


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A range of bytes a salvaging reader passed over.

    ``end`` is the offset of the next valid record, or of the end of file.
    """

    filename: str
    start: int
    end: int
    reason: str


class ArchiveReader(Archive):
    """Read the records of one archive, plain or compressed.

    Iterating yields ``(metadata, payload)`` pairs; :meth:`read` returns the
    next one and raises :class:`EndOfFile` after the last; :meth:`records`
    yields each with its offset, version and size. All three share one
    :func:`record.walk` over the file, so they can be mixed.

    :param filename: the archive (``.gz``/``.zst`` read transparently): a
        path, or a binary file object read front to back (an object
        streamed from Swift), which the reader then owns and closes.
    :param salvage: False (default): raise a :class:`RecordError` carrying
        the byte offset at the first damage. True: skip to the next valid
        record, record the skipped range in :attr:`skipped` and call
        ``on_skip``.
    :param on_skip: called with a :class:`Skipped` in salvage mode.
    :param quiet: do not log a warning for each skipped range (the caller
        reports them).
    :param name: what messages call a file object (default: its ``name``,
        else ``<stream>``); a path is its own name.
    """

    def __init__(self, filename, salvage=False, on_skip=None, quiet=False,
                 *, name=None):
        source = filename
        filename = _name_of(source, name)
        super().__init__(filename)
        self.salvage = salvage
        self.on_skip = on_skip
        self.quiet = quiet
        #: Ranges passed over in salvage mode.
        self.skipped = []
        #: Offset just past the last good record returned.
        self.good_offset = 0
        self._handle = compression.open_read(
            self.filename if _is_path(source) else source)
        self._walk = None  # made on the first read: salvage may change
        self._damage = None  # the error that stopped a strict walk

    def _walker(self):
        if self._damage is not None:  # stopped there: say so again
            raise self._damage
        if self._walk is None:
            self._walk = record.walk(
                self._handle, salvage=self.salvage, on_skip=self._skipped,
                stream_errors=compression.DECOMPRESS_ERRORS,
                chunk_size=READ_CHUNK)
        return self._walk

    def records(self):
        """Yield each remaining record as ``(offset, version, size,
        metadata, payload)`` (see :func:`record.walk`).

        :raises RecordError: damage, in strict mode.
        """
        try:
            for found in self._walker():
                self.good_offset = found[0] + found[2]
                yield found
        except exceptions.RecordError as exc:
            self._failed(exc)
            raise

    def __iter__(self):
        try:
            for offset, _, size, metadata, payload in self._walker():
                self.good_offset = offset + size
                yield metadata, payload
        except exceptions.RecordError as exc:
            self._failed(exc)
            raise

    @property
    def offset(self):
        """Offset of the next byte to parse in the uncompressed archive."""
        if self.skipped and self.skipped[-1].end > self.good_offset:
            return self.skipped[-1].end
        return self.good_offset

    def read(self):
        """The next ``(metadata, payload)``; payload is bytes.

        :raises EndOfFile: after the last record.
        :raises RecordError: damage, in strict mode (again on every later
            read: the walk stops there).
        """
        try:
            offset, _, size, metadata, payload = next(self._walker())
        except StopIteration:
            raise exceptions.EndOfFile("end of archive", self.offset,
                                       self.filename) from None
        except exceptions.RecordError as exc:
            self._failed(exc)
            raise
        self.good_offset = offset + size
        return metadata, payload

    def _failed(self, exc):
        exc.filename = self.filename
        self._damage = exc

    def _skipped(self, start, end, reason):
        skipped = Skipped(self.filename, start, end, reason)
        self.skipped.append(skipped)
        if not self.quiet:
            LOG.warning("%s: skipped bytes %d-%d: %s", self.filename,
                        skipped.start, skipped.end, skipped.reason)
        if self.on_skip is not None:
            self.on_skip(skipped)


@dataclasses.dataclass
class ArchiveReport:
    """What is known about one archive's records: the one report type.

    The writer makes one when it closes an archive
    (:meth:`ArchiveWriter.report`, from what it wrote: no re-read);
    :func:`inspect_file` makes one by reading a file (verify, crash
    recovery).

    :ivar filename: the archive.
    :ivar records: valid records.
    :ivar size: bytes in the (uncompressed) archive.
    :ivar versions: record format versions seen.
    :ivar skipped: damaged ranges (:class:`Skipped`), in order.
    :ivar torn_offset: where damage runs to the end of the file with no
        valid record after it (a torn tail), else None.
    :ivar first_metadata: metadata of the first valid record.
    :ivar last_metadata: metadata of the last valid record.
    :ivar earliest: the earliest ``timestamp`` of all valid records (not
        the first record's: late records come in any order), as
        :func:`~shoebox_worker.timestamps.to_text` writes it; None when
        none parses (:func:`~shoebox_worker.timestamps.record_time`).
    :ivar latest: the latest, likewise.
    """

    filename: str
    records: int = 0
    size: int = 0
    versions: set = dataclasses.field(default_factory=set)
    skipped: list = dataclasses.field(default_factory=list)
    torn_offset: int | None = None
    first_metadata: dict | None = None
    last_metadata: dict | None = None
    earliest: str | None = None
    latest: str | None = None

    @property
    def ok(self):
        return not self.skipped


def inspect_file(filename, on_record=None, quiet=False, *, name=None):
    """Check every record of an archive in salvage mode.

    :param filename: a path, or a binary file object (see
        :class:`ArchiveReader`, as ``name``).
    :param on_record: called with each valid record, in order, as
        ``(offset, version, size, metadata, payload)`` (verify's salvage
        keeps them).
    :param quiet: log nothing about damaged ranges: the caller reports
        them (from ``skipped``).
    :returns: an :class:`ArchiveReport`, ``versions`` from each record's
        own header.
    """
    report = ArchiveReport(_name_of(filename, name))
    versions = report.versions
    span = timestamps.Span()
    with ArchiveReader(filename, salvage=True, quiet=quiet,
                       name=name) as reader:
        for found in reader.records():
            metadata = found[3]
            report.records += 1
            versions.add(found[1])
            span.add(metadata)
            if report.first_metadata is None:
                report.first_metadata = metadata
            report.last_metadata = metadata
            if on_record is not None:
                on_record(found)
        report.skipped = list(reader.skipped)
        report.size = reader.offset
    report.earliest, report.latest = span.texts()
    if report.skipped and report.skipped[-1].end == report.size:
        # no valid record after the last damage: a torn tail
        report.torn_offset = report.skipped[-1].start
    return report


def cut_torn_tail(filename, report=None):
    """Cut a torn tail (a crash mid-write) off an uncompressed archive.

    Everything before the damage is kept; nothing after it is a valid
    record, so nothing readable is lost. Nothing is logged: the caller
    reports the cut, once.

    :param report: the file's :class:`ArchiveReport`, just made by
        :func:`inspect_file` (the file is then not read again); None: read
        it (quietly).
    :returns: ``(offset, bytes_cut)`` when a tail was cut, else None.
    """
    if compression.is_compressed(filename):
        raise ValueError("%s is compressed: offsets are in its uncompressed "
                         "bytes, so it cannot be cut in place" % (filename,))
    if report is None:
        report = inspect_file(filename, quiet=True)
    if report.torn_offset is None:
        return None
    cut = report.size - report.torn_offset
    with open(filename, "r+b") as f:
        f.truncate(report.torn_offset)
        f.flush()
        os.fsync(f.fileno())
    return report.torn_offset, cut
