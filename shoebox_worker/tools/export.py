"""``export``: records as files an SQL engine reads, partitioned by day,
a whole run or nothing.

    shoebox-worker export --format jsonl|parquet --out DIR [--mode MODE]
                          [selection] PATH...

Each record becomes one row: ``timestamp`` (the record's ``timestamp``
metadata in UTC: :func:`~shoebox_worker.timestamps.record_time`), every
other metadata key as a column of its own, and ``notification``, the
notification itself. An export is one run, and its rows go to
``DIR/run=<run>/date=YYYY-MM-DD/part-<n>.<ext>`` by the day of their
timestamp (UTC), Hive style, so DuckDB, Spark or Athena read only the days
a query asks for (``DIR/run=*/date=*/*.parquet``); a record whose
timestamp is missing or does not parse goes to ``date=unknown/`` (never
dropped). ``<run>`` (UTC time and random bits) keeps the runs of one
folder apart, so exporting month by month into one tree works; exporting
the same records twice gives them twice, in two runs.

- ``jsonl``: JSON lines, gzip (default) or zstd; ``notification`` is the
  notification's JSON object (a JSON string when the payload is not JSON).
- ``parquet`` (the ``parquet`` extra: pyarrow): ``timestamp`` is a real
  timestamp column (microseconds, UTC), metadata keys are string columns,
  ``notification`` is the JSON text. A file holds at most
  :data:`PARQUET_ROWS` rows; files of one export may have different
  metadata columns (read them with ``union_by_name``).

A metadata key that would clash with ``timestamp``, ``notification`` or
the partition columns ``date`` and ``run`` is written as
``metadata_<key>``.

All or nothing (:class:`Run`): a run is written inside a hidden folder,
``DIR/.export-<run>.tmp/``, held by the lock ``DIR/.export-<run>.lock``,
and its ``run=<run>`` folder is renamed into ``DIR`` in one step once
every file is written and fsynced. A reader of ``DIR/run=*/...`` sees a
run whole or not at all (the names of a run being written start with a
dot). A failed export (any exception; Ctrl-C or SIGTERM while the command
runs) removes its hidden folder and lock; a killed one (SIGKILL, a crash)
leaves them, and the next export into ``DIR`` removes them, as their lock
is free.

Files are created 0600 and folders 0700, as archives, whatever the umask;
``mode`` (``--mode``) gives the files other bits, and the folders the same
with x wherever r is set (0640: folders 0750). ``DIR`` gets the folders'
mode when the export creates it; an existing ``DIR`` is left as it is.
"""

import contextlib
import datetime
import io
import logging
import os
import secrets
import shutil
import signal
import sys

import orjson

from shoebox_worker import compression
from shoebox_worker import files
from shoebox_worker import timestamps
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import progress
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools.read import payload_json as _notification

__all__ = ["FILE_MODE", "FORMATS", "Exporter", "Run", "cmd_export",
           "folder_mode", "remove_stale_runs"]

LOG = logging.getLogger(__name__)

#: ``--format`` choices.
FORMATS = ("jsonl", "parquet")
#: ``--compression`` choices for jsonl (parquet compresses itself: zstd).
JSONL_COMPRESSION = ("gzip", "zstd")
#: A parquet file is written once this many rows of a day are buffered.
PARQUET_ROWS = 50_000
#: At most this many bytes of rows buffered for parquet, all days
#: together; past it the biggest day's buffer is written out.
PARQUET_BUFFER = 64 << 20
#: At most this many jsonl files open at once (one per day); the least
#: recently used is finished and a new part opened when its day returns.
OPEN_FILES = 32
#: The partition of records without a usable timestamp.
UNKNOWN_DAY = "unknown"
#: Column names of the exporter's own (the partition columns included).
RESERVED = frozenset(("timestamp", "notification", "date", "run"))
#: The mode of the exported files unless ``--mode`` says otherwise: that
#: of archives (``[archive] file_mode``'s default).
FILE_MODE = 0o600
#: Names in ``DIR`` of a run being written: ``<STAGING><run>.tmp`` (the
#: hidden folder) and ``<STAGING><run>.lock`` (its lock).
STAGING = ".export-"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | \
    os.O_CLOEXEC


def _column(key):
    return "metadata_" + key if key in RESERVED else key


def folder_mode(mode):
    """The mode of the folders holding files of ``mode``: the same bits,
    with x wherever r is set (0600: 0700, 0640: 0750).

    :raises UsageError: a mode without 0600 (the export writes its files
        and makes folders of its own inside its folders).
    """
    if mode & 0o600 != 0o600 or mode & ~0o777:
        raise UsageError("--mode: expected file permission bits with 0600 "
                         "(the owner reads and writes), got %04o" % mode)
    return mode | (mode & 0o444) >> 2


def _make_folder(path, mode):
    """A new folder at ``path`` with exactly ``mode`` (not the umask's)."""
    os.mkdir(path, 0o700)
    os.chmod(path, mode)


def _fsync_folder(path):
    files.fsync_directory(os.path.join(path, "x"))


def remove_stale_runs(out):
    """Remove what killed exports left in ``out``: each hidden run folder
    whose lock no live process holds, and that lock.

    :returns: the runs removed.
    """
    removed = []
    for name in sorted(os.listdir(out)):
        if not (name.startswith(STAGING) and name.endswith(".lock")):
            continue
        lock_path = os.path.join(out, name)
        try:
            lock = files.FileLock.try_acquire(lock_path, create=False)
        except OSError:  # a symlink or worse: not ours, left alone
            continue
        if lock is None:  # a live export's, or gone meanwhile
            continue
        try:
            folder = lock_path[:-len(".lock")] + ".tmp"
            if os.path.lexists(folder):
                shutil.rmtree(folder)  # a symlink is refused, not followed
            os.unlink(lock_path)
        except OSError as err:
            LOG.warning("%s: cannot remove: %s", err.filename or folder,
                        err.strerror or err)
            continue
        finally:
            lock.release()
        LOG.warning("%s: removed the hidden files of an export that was "
                    "killed (%s)", out, name[:-len(".lock")])
        removed.append(name[len(STAGING):-len(".lock")])
    return removed


class Run:
    """The files of one export, hidden until :meth:`commit` (see the
    module documentation).

    :param out: the folder (created, with :func:`folder_mode`, when
        missing).
    :param mode: the files' permission bits.
    :raises ToolError: the folder or the hidden run cannot be made.
    """

    def __init__(self, out, mode=FILE_MODE):
        self.mode = mode
        self.folder_mode = folder_mode(mode)
        self.id = "%s-%s" % (
            datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
            secrets.token_hex(4))
        self.out = out
        #: Where the run is once committed.
        self.final = os.path.join(out, "run=" + self.id)
        self.files = 0
        self.committed = False
        self._hidden = os.path.join(out, STAGING + self.id + ".tmp")
        self._staged = os.path.join(self._hidden, "run=" + self.id)
        self._days = set()
        self._lock = None
        try:
            self._make_out()
            remove_stale_runs(out)
            self._lock = files.FileLock(
                os.path.join(out, STAGING + self.id + ".lock"),
                exclusive=True)
            os.fchmod(self._lock.fd, FILE_MODE)
            _make_folder(self._hidden, 0o700)
            _make_folder(self._staged, self.folder_mode)
        except BaseException as exc:
            self.remove()
            if isinstance(exc, OSError):
                raise ToolError("%s: cannot create: %s" % (
                    exc.filename or out, exc.strerror or exc)) from None
            raise

    def _make_out(self):
        if os.path.isdir(self.out):
            return
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        _make_folder(self.out, self.folder_mode)

    def create(self, day, suffix):
        """A new file of ``day`` (its folder made the first time),
        created with :attr:`mode`.

        :returns: its descriptor, open for writing.
        """
        folder = os.path.join(self._staged, "date=" + day)
        if day not in self._days:
            _make_folder(folder, self.folder_mode)
            self._days.add(day)
        self.files += 1
        path = os.path.join(folder, "part-%05d%s" % (self.files, suffix))
        fd = os.open(path, _NEW_FILE, self.mode)
        os.fchmod(fd, self.mode)
        return fd

    def commit(self):
        """Make the run's folders durable and rename the run into ``out``
        in one step (none when it holds no file), then remove what is
        hidden."""
        if self.files:
            for day in self._days:
                _fsync_folder(os.path.join(self._staged, "date=" + day))
            _fsync_folder(self._staged)
            os.rename(self._staged, self.final)
            self.committed = True
            _fsync_folder(self.out)
        self.remove()

    def remove(self):
        """Remove the hidden folder and the lock (the committed run stays);
        what cannot be removed is left for the next export to."""
        try:
            shutil.rmtree(self._hidden)
        except FileNotFoundError:
            pass
        except OSError as err:
            LOG.warning("%s: cannot remove: %s", self._hidden,
                        err.strerror or err)
            self._unlock(unlink=False)
            return
        self._unlock(unlink=True)

    def _unlock(self, unlink):
        if self._lock is None:
            return
        try:
            if unlink:
                os.unlink(self._lock.path)
        except FileNotFoundError:
            pass
        finally:
            self._lock.release()
            self._lock = None


def _column(key):
    return "metadata_" + key if key in RESERVED else key


class _JsonlPart:
    """One jsonl file of one day, open for appending."""

    def __init__(self, fd, codec):
        self._raw = os.fdopen(fd, "wb")
        try:
            self._out = codec.open_write(self._raw, codec.default_level,
                                         mtime=0)
        except BaseException:
            self._raw.close()
            raise

    def write(self, line):
        self._out.write(line)

    def close(self):
        self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def discard(self):
        """Close without finishing (the file is removed with its run)."""
        try:
            self._raw.close()
        except OSError:
            pass


class Exporter:
    """Writes rows into a new :class:`Run` of ``out`` (see the module
    documentation).

    :param out: the folder (created when missing).
    :param fmt: ``"jsonl"`` or ``"parquet"``.
    :param codec: for jsonl, ``"gzip"`` or ``"zstd"``.
    :param mode: the files' permission bits (folders: :func:`folder_mode`).
    :raises ToolError: parquet without pyarrow, zstd without zstandard, or
        a folder that cannot be made; :class:`UsageError` for a mode
        without 0600.
    """

    def __init__(self, out, fmt="jsonl", codec="gzip", mode=FILE_MODE):
        if fmt not in FORMATS:
            raise ToolError("unknown export format %r (known: %s)"
                            % (fmt, ", ".join(FORMATS)))
        folder_mode(mode)  # refused before anything is made
        self.out = out
        self.fmt = fmt
        self.rows = 0
        self.days = set()
        self._open = {}           # day -> _JsonlPart, least recent first
        self._buffers = {}        # day -> [rows] (parquet)
        self._sizes = {}          # day -> about how many bytes its rows hold
        self._buffered = 0        # the sum of self._sizes
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ToolError("--format parquet needs pyarrow (pip "
                                "install pyarrow: the parquet extra of "
                                "shoebox-worker)") from None
            self._suffix = ".parquet"
        else:
            try:
                self._codec = compression.get_codec(codec)
            except ValueError as err:
                raise ToolError(str(err)) from None
            self._suffix = ".jsonl" + self._codec.suffix
        self.run = Run(out, mode)

    # -- rows ---------------------------------------------------------

    def add(self, metadata, payload):
        """Add one record."""
        moment = timestamps.record_time(metadata)
        day = UNKNOWN_DAY if moment is None else moment.strftime("%Y-%m-%d")
        self.days.add(day)
        self.rows += 1
        if self.fmt == "jsonl":
            self._add_jsonl(day, moment, metadata, payload)
        else:
            self._add_parquet(day, moment, metadata, payload)

    def _add_jsonl(self, day, moment, metadata, payload):
        part = self._open.pop(day, None)
        if part is None:
            if len(self._open) >= OPEN_FILES:
                self._finish(next(iter(self._open)))
            part = _JsonlPart(self.run.create(day, self._suffix),
                              self._codec)
        self._open[day] = part    # now the most recent
        row = {"timestamp": None if moment is None
               else timestamps.to_text(moment)}
        for key, value in metadata.items():
            if key != "timestamp":
                row[_column(key)] = value
        line = orjson.dumps(row)
        part.write(b"".join((line[:-1], b',"notification":',
                             _notification(payload), b"}\n")))

    def _finish(self, day):
        self._open[day].close()
        del self._open[day]  # kept open until closed, for abort()

    def _add_parquet(self, day, moment, metadata, payload):
        row = {_column(key): value for key, value in metadata.items()
               if key != "timestamp"}
        row["timestamp"] = moment
        text = _notification(payload)
        row["notification"] = text.decode("utf-8", "backslashreplace")
        rows = self._buffers.setdefault(day, [])
        rows.append(row)
        size = len(text) + 64 * len(row)
        self._sizes[day] = self._sizes.get(day, 0) + size
        self._buffered += size
        if len(rows) >= PARQUET_ROWS:
            self._write_parquet(day)
        elif self._buffered > PARQUET_BUFFER:
            self._write_parquet(max(self._sizes, key=self._sizes.get))

    def _write_parquet(self, day):
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = self._buffers.pop(day)
        self._buffered -= self._sizes.pop(day)
        keys = sorted({key for row in rows for key in row}
                      - {"timestamp", "notification"})
        fields = [pa.field("timestamp", pa.timestamp("us", tz="UTC"))]
        fields += [pa.field(key, pa.string()) for key in keys]
        fields.append(pa.field("notification", pa.large_string()))
        schema = pa.schema(fields)
        columns = {name: [row.get(name) for row in rows]
                   for name in schema.names}
        table = pa.table(columns, schema=schema)
        with os.fdopen(self.run.create(day, self._suffix), "wb") as f:
            sink = io.BufferedWriter(f, 1 << 20)
            pq.write_table(table, sink, compression="zstd")
            sink.flush()
            os.fsync(f.fileno())

    # -- the end ------------------------------------------------------

    def close(self):
        """Finish every file and rename the run into ``out`` (durably).

        :returns: the number of files written.
        """
        while self._open:
            self._finish(next(iter(self._open)))
        for day in list(self._buffers):
            self._write_parquet(day)
        self.run.commit()
        return self.run.files

    def abort(self):
        """Remove what was written: nothing of a failed export is left for
        a query to read, nor hidden (a committed run stays whole)."""
        for part in self._open.values():
            part.discard()
        self._open.clear()
        self._buffers.clear()
        self._sizes.clear()
        self._buffered = 0
        self.run.remove()


def cmd_export(args):
    """``export``: the selected records of PATHs into ``--out``; exit 1 if
    an archive could not be read (the others are exported all the same)."""
    read.quiet_reader_logs()
    folder_mode(args.mode)  # a mode refused before anything is read
    selection = select.from_args(args)
    with read.swift_of(args) as swift:
        items = read.find_items(args, swift, selection)
        return _export(args, items, selection)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops the export as Ctrl-C does (``KeyboardInterrupt``), so
    that its files are removed too."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stop_signals_held():
    """SIGINT and SIGTERM wait until the block is done (a second Ctrl-C
    does not cut the removal of a run short)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _export(args, items, selection):
    keep = selection.keep if selection.active else None
    unreadable = []
    with _sigterm_interrupts():
        exporter = Exporter(args.out, args.format, args.compression,
                            args.mode)
        try:
            for metadata, payload in read.read_all(
                    items, args.salvage, args.jobs, unreadable.append,
                    shown=progress.wanted(False)):
                if keep is None or keep(metadata, payload):
                    exporter.add(metadata, payload)
            written = exporter.close()
        except BaseException as exc:
            with _stop_signals_held():
                exporter.abort()
                if isinstance(exc, KeyboardInterrupt) and \
                        not exporter.run.committed:  # said nowhere else
                    print("shoebox-worker: export stopped: nothing was "
                          "added to %s" % args.out, file=sys.stderr)
            raise
    print("exported %d record%s of %d archive%s to %s: %d file%s, %d "
          "day%s" % (exporter.rows, "" if exporter.rows == 1 else "s",
                     len(items), "" if len(items) == 1 else "s", args.out,
                     written, "" if written == 1 else "s", len(exporter.days),
                     "" if len(exporter.days) == 1 else "s"), flush=True)
    for line in selection.notes():
        print("shoebox-worker: %s" % line, file=sys.stderr)
    for err in unreadable:  # one line each; the others were exported
        read.say(err, debug=getattr(args, "debug", False))
    return EXIT_FAILURE if unreadable else EXIT_OK
