"""Roll managers: a series of archive files behind one write() or read().

"Roll" comes from "roll over": a :class:`WritingRollManager` writes to one
archive until its roll checker says to move on, then closes it, runs the
archive callback on it and opens the next file on the next write. A roll is
returned, not looked for: :meth:`~WritingRollManager.write`,
:meth:`~WritingRollManager.maybe_roll` and :meth:`~RollManager.close`
return the closed archive's
:class:`~shoebox_worker.archive.ArchiveReport` when they closed one, else
None. A :class:`ReadingRollManager` reads a set of files matching a glob,
in the order they were written::

    checker = roll_checker.SizeRollChecker(roll_size_mb=100)
    with roll_manager.WritingRollManager("test_%c.events", checker) as x:
        for index in range(10):
            x.write({"index": str(index)}, "payload_%d" % index)

    manager = roll_manager.ReadingRollManager("test_*.events")
    while True:
        try:
            metadata, payload = manager.read()
        except roll_manager.NoMoreFiles:
            break

File names come from a strftime template (UTC). A roll never overwrites
an existing file: when a name is taken, ``~1``, ``~2``... is inserted before
the extension (``test_X.events``, ``test_X~1.events``). Readers order files
by modification time, then by that counter, which is the order a manager
wrote them, whatever the template.

**Names that never repeat.** The folder check cannot see a name used
before by a file a callback has since moved or deleted (uploaded to
Swift, say), and the wall clock can step back, so with
``unique_names=True`` (the worker's) every name also carries
``_<token>-<sequence>``: 48 random bits drawn when the manager is made
(:func:`process_token`: a new value at every process start, whatever the
host name, the PID or the clock) and the number of archives it opened
before. It goes where the template says :data:`UNIQUE_FIELD` (the worker
puts it right after its worker id:
``shoebox_20261127T212329_vm-29740_3f9a2c7b10de-0.events``), else before
the extension (:func:`with_unique`). No state is kept on disk: a folder
restored from a backup, or another host of the same name writing to the
same container, cannot hand a sequence out twice.

**Indexes.** With ``index_fields``, a writing manager collects the values
of those fields as records are written (``write(..., values)``) and, when
it closes an archive, writes its index (:mod:`shoebox_worker.index`)
beside it as ``<archive>.index``, with the archive's permission bits,
fsynced, before the archive's report is returned (so before the worker
hands it to the shipper). The index is best effort: one that cannot be
written is a WARNING and the archive goes on without it, as does an
archive cut back after a failed write (:meth:`~WritingRollManager.
cut_unsynced`).
"""

import dataclasses
import datetime
import fnmatch
import logging
import os
import re
import secrets
import stat as stat_mod

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index
from shoebox_worker import record
from shoebox_worker.exceptions import NoMoreFiles

__all__ = [
    "RollManager",
    "WritingRollManager",
    "ReadingRollManager",
    "NoMoreFiles",
    "render_template",
    "with_unique",
    "UNIQUE_FIELD",
    "process_token",
    "unique_path",
    "sort_written_order",
    "name_counter",
]

LOG = logging.getLogger(__name__)

#: Where in a template the unique part of a name goes (``unique_names``);
#: removed from the names of a manager without it.
UNIQUE_FIELD = "{unique}"

#: An index that could not be written.
W_NO_INDEX = "%s: cannot write its index (%s); it is shipped without one"

_COUNTER = re.compile(r"~(\d+)(?=(?:\.[^.~]*)*$)")


def utcnow():
    """The clock file names are made from (patched in tests)."""
    return datetime.datetime.now(datetime.timezone.utc)


def render_template(template, when=None):
    """A file name from a strftime template, made safe as the seed did.

    Spaces, slashes and colons become underscores (``%c`` has all three).
    """
    name = (when or utcnow()).strftime(template)
    for char in (" ", "/", ":"):
        name = name.replace(char, "_")
    return name


def process_token():
    """48 random bits, as 12 hex digits: a new value for every manager, so
    for every process start."""
    return secrets.token_hex(6)


def _insert_before_extension(path, text):
    head, tail = os.path.split(path)
    stem, dot, ext = tail.rpartition(".")
    if not dot or not stem:
        return os.path.join(head, tail + text)
    return os.path.join(head, "%s%s.%s" % (stem, text, ext))


def with_unique(name, unique):
    """``name`` with ``_<unique>`` in place of :data:`UNIQUE_FIELD`, or
    before its extension when it has none (at its end when it has no
    extension): ``x.events`` -> ``x_<unique>.events``. The one place
    that says where the unique part goes."""
    if UNIQUE_FIELD in name:
        return name.replace(UNIQUE_FIELD, "_" + unique)
    return _insert_before_extension(name, "_" + unique)


def _with_counter(path, counter):
    if not counter:
        return path
    return _insert_before_extension(path, "~%d" % counter)


def unique_path(path, start=0):
    """Create ``path`` (or the first free ``~N`` variant), locked, and
    return it.

    Free means: no such file and no file that starts with its name plus a
    dot (``x.events.gz`` left by a callback). The file is created with
    O_EXCL, so two writers can never get the same name, and locked from
    its creation on (:class:`~shoebox_worker.files.FileLock` with
    ``exclusive``): an empty archive nobody holds is a dead worker's,
    which recovery may remove whatever its age.

    :param start: the first counter to try (0 is ``path`` itself).
    :returns: ``(path, counter, lock)``; the caller releases the lock.
    """
    directory = os.path.dirname(path) or "."
    counter = start
    while True:
        candidate = _with_counter(path, counter)
        counter += 1
        base = os.path.basename(candidate) + "."
        if any(name.startswith(base) for name in os.listdir(directory)):
            continue
        try:
            lock = files.FileLock(candidate, exclusive=True)
        except FileExistsError:
            continue
        return candidate, counter - 1, lock


def name_counter(name):
    """The ``~N`` a roll put in a file name when the name was taken (0
    when there is none): after the time, what orders names as written."""
    match = _COUNTER.search(name)
    return int(match.group(1)) if match else 0


def _written_order_key(path):
    return (os.stat(path).st_mtime_ns, name_counter(os.path.basename(path)),
            path)


def sort_written_order(paths):
    """Sort archive paths into the order they were written."""
    return sorted(paths, key=_written_order_key)


class RollManager:
    """What both managers share: the template, directory and callback."""

    def __init__(self, filename_template, directory=".",
                 archive_callback=None):
        self.filename_template = filename_template
        self.directory = directory
        self.archive_callback = archive_callback
        self.active_archive = None
        self.active_filename = None

    def _roll_archive(self):
        return self.close()

    def close(self):
        """Close the active archive and run the callback's ``on_close``.

        :returns: what the archive tells of itself when closed (a
            :class:`~shoebox_worker.archive.ArchiveReport` for a written
            one), or None when none was open.
        """
        if self.active_archive is None:
            return None
        filename = self.active_filename
        report = self._closing_report()
        self.active_archive.close()
        self.active_archive = None
        self.active_filename = None
        if self.archive_callback is not None:
            self.archive_callback.on_close(filename)
        return report

    def _closing_report(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class WritingRollManager(RollManager):
    """Write records into a series of archives, rolling as told.

    :param filename_template: strftime template (UTC) for new files.
    :param roll_checker: decides when to roll (see
        :mod:`shoebox_worker.contract`).
    :param directory: where files are created (made if missing).
    :param archive_callback: ``on_open(filename)`` / ``on_close(filename)``
        on each file; a chain runs them in order.
    :param version: record format version of new files.
    :param keep_locks: each archive is locked from its creation (see
        :func:`unique_path`); by default the lock is released when it is
        closed. With ``keep_locks`` it is kept until :meth:`take_lock`
        hands it on (the worker hands it to the shipper, which releases it
        once the archive's state file exists).
    :param unique_names: put ``_<process token>-<sequence>`` into every
        name (see the module documentation), so that no name is ever made
        twice, whatever the clock; off by default (the names the template
        alone gives).
    :param index_fields: dotted paths to index (see the module
        documentation); empty (default): no index.
    """

    def __init__(self, filename_template, roll_checker, directory=".",
                 archive_callback=None, version=record.CURRENT_VERSION,
                 keep_locks=False, unique_names=False, index_fields=()):
        super().__init__(filename_template, directory, archive_callback)
        self.index_fields = tuple(index_fields)
        # the index of the active archive, as its records are written
        self._index = None
        self.keep_locks = keep_locks
        # the lock of the active archive, and of closed ones not yet taken
        self._active_lock = None
        self._closed_locks = {}
        if version not in record.VERSIONS:
            raise exceptions.InvalidVersion(
                "cannot write format version %r" % (version,))
        self.roll_checker = roll_checker
        self.version = version
        #: The random part of this manager's names (None: not unique).
        self.token = process_token() if unique_names else None
        #: Archives opened so far (the sequence of unique names).
        self.opened = 0
        # the last name rendered from the template and the counter used
        # with it: a name is never reused in this process, even after its
        # file was moved or deleted by a callback
        self._last_base = None
        self._last_counter = -1
        # mtime of the last archive closed: the next one is stamped later
        self._last_mtime_ns = None
        #: Record bytes written so far, over every archive.
        self.bytes_written = 0
        # (records, last metadata) of the active archive at its last sync:
        # what is left of it after cut_unsynced()
        self._synced = (0, None)

    def _make_filename(self):
        name = render_template(self.filename_template)
        if self.token is not None:
            name = with_unique(name, "%s-%d" % (self.token, self.opened))
        else:
            name = name.replace(UNIQUE_FIELD, "")
        return os.path.join(self.directory, name)

    def get_active_archive(self):
        """The archive being written, opening a new file when none is."""
        if self.active_archive is None:
            os.makedirs(self.directory, exist_ok=True)
            base = self._make_filename()
            start = (self._last_counter + 1 if base == self._last_base
                     else 0)
            path, counter, lock = unique_path(base, start)
            try:
                self.active_archive = archive.ArchiveWriter(
                    path, version=self.version, exclusive=False)
            except BaseException:
                os.unlink(path)
                lock.release()
                raise
            self._active_lock = lock
            files.fsync_directory(path)
            self._last_base, self._last_counter = base, counter
            self._synced = (0, None)
            if self.index_fields:
                self._index = index.Builder(self.index_fields)
            self.active_filename = path
            self.opened += 1
            LOG.debug("opened archive %s", path)
            if self.archive_callback is not None and hasattr(
                    self.archive_callback, "on_open"):
                self.archive_callback.on_open(path)
            self.roll_checker.start(self.active_archive)
        return self.active_archive

    def write(self, metadata, payload, values=()):
        """Append one record, rolling afterwards if the checker says so.

        :param metadata: ``str:str`` dict.
        :param payload: str or bytes, most likely JSON.
        :param values: the record's text for each of ``index_fields``, in
            order (None where it has none), as
            :func:`shoebox_worker.index.values_of` gives them.
        :returns: the closed archive's
            :class:`~shoebox_worker.archive.ArchiveReport` when this write
            rolled it, else None.
        """
        self.bytes_written += self.get_active_archive().write(metadata,
                                                              payload)
        if self._index is not None:
            self._index.add(metadata.get("timestamp"), values)
        if self.roll_checker.check(self.active_archive):
            return self._roll_archive()
        return None

    def maybe_roll(self):
        """Roll if the checker says so, without writing (for idle queues).

        :returns: the closed archive's report when it rolled, else None.
        """
        if self.active_archive is not None and self.roll_checker.check(
                self.active_archive):
            return self._roll_archive()
        return None

    def sync(self):
        """Flush and fsync the active archive, if any."""
        writer = self.active_archive
        if writer is not None:
            writer.sync()
            self._synced = (writer.records, writer.last_metadata)

    def cut_unsynced(self):
        """After a failed write or sync: cut the active archive back to its
        last sync, close it and run the callback's ``on_close``.

        What was never synced is dropped (its messages were never acked).
        An archive left with no record is removed instead, and the
        callback's ``on_close`` is not run for it.

        :returns: the closed archive's report (its synced records only), or
            None when there was no archive or nothing of it was synced.
        """
        writer, filename = self.active_archive, self.active_filename
        if writer is None:
            return None
        self._index = None  # it counts records that are cut: none is made
        self.active_archive = None
        self.active_filename = None
        report = writer.report()
        kept = writer.abandon()
        if kept == 0:
            try:
                os.unlink(filename)
            except OSError:
                pass
            self._release_active_lock(None)
            return None
        self._release_active_lock(filename)
        records, last = self._synced
        earliest, latest = writer.span.texts()  # the synced records'
        report = dataclasses.replace(report, size=kept, records=records,
                                     last_metadata=last, earliest=earliest,
                                     latest=latest)
        if self.archive_callback is not None:
            self.archive_callback.on_close(filename)
        return report

    def close(self):
        """Close the active archive and run the callback's ``on_close``.

        :returns: the closed archive's report
            (:meth:`~shoebox_worker.archive.ArchiveWriter.report`), or None
            when none was open.

        Readers order files by mtime, and a coarse file system clock can
        stamp two archives alike (their names may then sort either way, at
        a second boundary): each archive closed is stamped strictly later
        than the one before.
        """
        if self.active_archive is not None:
            self.active_archive.close()
            stat = os.stat(self.active_filename)
            mtime = stat.st_mtime_ns
            if (self._last_mtime_ns is not None
                    and mtime <= self._last_mtime_ns):
                mtime = self._last_mtime_ns + 1
                os.utime(self.active_filename, ns=(stat.st_atime_ns, mtime))
            self._last_mtime_ns = mtime
            self._write_index(self.active_filename, stat.st_mode)
            self._release_active_lock(self.active_filename)
        return super().close()

    def _write_index(self, filename, mode):
        """Write the closed archive's index beside it (best effort)."""
        builder, self._index = self._index, None
        if builder is None:
            return
        path = index.sidecar(filename)
        try:
            index.write_file(path, builder.to_bytes(),
                             mode=stat_mod.S_IMODE(mode))
        except OSError as exc:
            LOG.warning(W_NO_INDEX, filename, exc)

    def _release_active_lock(self, closed):
        """The active archive is closed (``closed``: its path) or removed
        (None): keep its lock for :meth:`take_lock`, or release it."""
        lock, self._active_lock = self._active_lock, None
        if lock is None:
            return
        if self.keep_locks and closed is not None:
            self._closed_locks[closed] = lock
        else:
            lock.release()

    def take_lock(self, filename):
        """The lock of the closed archive ``filename`` (with
        ``keep_locks``), now the caller's to release; None if not held."""
        return self._closed_locks.pop(filename, None)

    def _closing_report(self):
        return self.active_archive.report()


class ReadingRollManager(RollManager):
    """Read every record of the files matching a glob, in written order.

    :param filename_template: a glob (``test_*.events``), relative to
        ``directory``.
    :param salvage: read damaged files in salvage mode (see
        :class:`~shoebox_worker.archive.ArchiveReader`).
    """

    def __init__(self, filename_template, directory=".",
                 archive_callback=None, salvage=False):
        super().__init__(filename_template, directory, archive_callback)
        self.salvage = salvage
        pattern = os.path.join(directory, filename_template)
        folder = os.path.dirname(pattern) or "."
        files = [os.path.join(os.path.dirname(pattern), name)
                 for name in os.listdir(folder)]
        self.files_to_read = sort_written_order(
            f for f in fnmatch.filter(files, pattern) if os.path.isfile(f))

    def get_active_archive(self):
        """The archive being read; opens the next file when needed."""
        if self.active_archive is None:
            if not self.files_to_read:
                raise NoMoreFiles("no more files to read")
            self.active_filename = self.files_to_read.pop(0)
            self.active_archive = archive.ArchiveReader(
                self.active_filename, salvage=self.salvage)
            if self.archive_callback is not None and hasattr(
                    self.archive_callback, "on_open"):
                self.archive_callback.on_open(self.active_filename)
        return self.active_archive

    def read(self):
        """The next ``(metadata, payload)`` across all files.

        :raises NoMoreFiles: after the last record of the last file.
        :raises RecordError: a damaged record (unless salvaging).
        """
        while True:
            try:
                return self.get_active_archive().read()
            except exceptions.EndOfFile:
                self._roll_archive()

    def __iter__(self):
        while True:
            try:
                yield self.read()
            except NoMoreFiles:
                return
