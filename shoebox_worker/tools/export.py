"""``export``: records as files an SQL engine reads, partitioned by day.

    shoebox-worker export --format jsonl|parquet --out DIR [selection] PATH...

Each record becomes one row: ``timestamp`` (the record's ``timestamp``
metadata in UTC: :func:`~shoebox_worker.timestamps.record_time`), every
other metadata key as a column of its own, and ``notification``, the
notification itself. Rows go to ``DIR/date=YYYY-MM-DD/`` by the day of
their timestamp (UTC), Hive style, so DuckDB, Spark or Athena read only the
days a query asks for; a record whose timestamp is missing or does not
parse goes to ``date=unknown/`` (never dropped).

- ``jsonl``: JSON lines, gzip (default) or zstd; ``notification`` is the
  notification's JSON object (a JSON string when the payload is not JSON).
- ``parquet`` (the ``parquet`` extra: pyarrow): ``timestamp`` is a real
  timestamp column (microseconds, UTC), metadata keys are string columns,
  ``notification`` is the JSON text. A file holds at most
  :data:`PARQUET_ROWS` rows; files of one export may have different
  metadata columns (read them with ``union_by_name``).

A metadata key that would clash with ``timestamp``, ``notification`` or
the partition column ``date`` is written as ``metadata_<key>``.

Files are written under temporary names (``.<name>.tmp``) and renamed to
``part-<run>-<n>.<ext>`` only when the whole export succeeded: a failed or
interrupted export leaves no file a query would read, and the temporary
ones are removed. ``<run>`` (UTC time and random bits) keeps the files of
two exports into one folder apart, so exporting month by month into one
tree works; exporting the same records twice gives them twice.
"""

import datetime
import io
import os
import secrets
import sys

import orjson

from shoebox_worker import compression
from shoebox_worker import files
from shoebox_worker import timestamps
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import progress
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools.read import payload_json as _notification

__all__ = ["FORMATS", "Exporter", "cmd_export"]

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
#: Column names of the exporter's own.
RESERVED = frozenset(("timestamp", "notification", "date"))


def _column(key):
    return "metadata_" + key if key in RESERVED else key


class _JsonlPart:
    """One jsonl file of one day, open for appending."""

    def __init__(self, tmp, final, codec):
        self.tmp, self.final = tmp, final
        self._lock = files.create_temporary(tmp)
        self._raw = os.fdopen(os.dup(self._lock.fd), "wb")
        self._out = codec.open_write(self._raw, codec.default_level, mtime=0)

    def write(self, line):
        self._out.write(line)

    def close(self):
        self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._lock.release()


class Exporter:
    """Writes rows into ``out`` (see the module documentation).

    :param out: the folder (created when missing).
    :param fmt: ``"jsonl"`` or ``"parquet"``.
    :param codec: for jsonl, ``"gzip"`` or ``"zstd"``.
    :raises ToolError: parquet without pyarrow, zstd without zstandard, or
        a folder that cannot be made.
    """

    def __init__(self, out, fmt="jsonl", codec="gzip"):
        if fmt not in FORMATS:
            raise ToolError("unknown export format %r (known: %s)"
                            % (fmt, ", ".join(FORMATS)))
        self.out = out
        self.fmt = fmt
        self.rows = 0
        self.days = set()
        self._run = "%s-%s" % (
            datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
            secrets.token_hex(4))
        self._parts = 0
        self._written = []        # (tmp, final) of finished files
        self._open = {}           # day -> _JsonlPart, least recent first
        self._buffers = {}        # day -> [rows] (parquet)
        self._sizes = {}          # day -> about how many bytes its rows hold
        self._buffered = 0        # the sum of self._sizes
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ToolError("--format parquet needs pyarrow (pip "
                                "install shoebox-worker[parquet])") from None
            self._suffix = ".parquet"
        else:
            try:
                self._codec = compression.get_codec(codec)
            except ValueError as err:
                raise ToolError(str(err)) from None
            self._suffix = ".jsonl" + self._codec.suffix
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:
            raise ToolError("%s: cannot create: %s"
                            % (out, err.strerror or err)) from None

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

    def _paths(self, day):
        folder = os.path.join(self.out, "date=" + day)
        os.makedirs(folder, exist_ok=True)
        self._parts += 1
        name = "part-%s-%05d%s" % (self._run, self._parts, self._suffix)
        return (os.path.join(folder, "." + name + ".tmp"),
                os.path.join(folder, name))

    def _add_jsonl(self, day, moment, metadata, payload):
        part = self._open.pop(day, None)
        if part is None:
            if len(self._open) >= OPEN_FILES:
                oldest = next(iter(self._open))
                self._finish(self._open.pop(oldest))
            part = _JsonlPart(*self._paths(day), self._codec)
        self._open[day] = part    # now the most recent
        row = {"timestamp": None if moment is None
               else timestamps.to_text(moment)}
        for key, value in metadata.items():
            if key != "timestamp":
                row[_column(key)] = value
        line = orjson.dumps(row)
        part.write(b"".join((line[:-1], b',"notification":',
                             _notification(payload), b"}\n")))

    def _finish(self, part):
        part.close()
        self._written.append((part.tmp, part.final))

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
        tmp, final = self._paths(day)
        lock = files.create_temporary(tmp)
        try:
            with os.fdopen(os.dup(lock.fd), "wb") as f:
                sink = io.BufferedWriter(f, 1 << 20)
                pq.write_table(table, sink, compression="zstd")
                sink.flush()
                os.fsync(f.fileno())
        finally:
            lock.release()
        self._written.append((tmp, final))

    # -- the end ------------------------------------------------------

    def close(self):
        """Finish every file and give each its final name (durably).

        :returns: the number of files written.
        """
        for part in list(self._open.values()):
            self._finish(part)
        self._open.clear()
        for day in list(self._buffers):
            self._write_parquet(day)
        folders = set()
        for tmp, final in self._written:
            os.replace(tmp, final)
            folders.add(os.path.dirname(final))
        for folder in folders:
            files.fsync_directory(os.path.join(folder, "x"))
        if folders:
            files.fsync_directory(os.path.join(self.out, "x"))
        return len(self._written)

    def abort(self):
        """Remove what was written: nothing of a failed export is left for
        a query to read."""
        for part in self._open.values():
            try:
                part.close()
            except OSError:
                pass
            self._written.append((part.tmp, part.final))
        self._open.clear()
        self._buffers.clear()
        self._sizes.clear()
        self._buffered = 0
        for tmp, _ in self._written:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._written.clear()


def cmd_export(args):
    """``export``: the selected records of PATHs into ``--out``; exit 1 if
    an archive could not be read (the others are exported all the same)."""
    read.quiet_reader_logs()
    selection = select.from_args(args)
    with read.swift_of(args) as swift:
        items = read.find_items(args, swift, selection)
        return _export(args, items, selection)


def _export(args, items, selection):
    exporter = Exporter(args.out, args.format, args.compression)
    keep = selection.keep if selection.active else None
    unreadable = []
    try:
        for metadata, payload in read.read_all(
                items, args.salvage, args.jobs, unreadable.append,
                shown=progress.wanted(False)):
            if keep is None or keep(metadata, payload):
                exporter.add(metadata, payload)
        written = exporter.close()
    except BaseException:
        exporter.abort()
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
