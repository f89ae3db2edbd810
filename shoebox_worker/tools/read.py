"""Reading archives: ``cat`` and ``verify``, and what they share.

:func:`~shoebox_worker.tools.sources.find` turns the PATHs of a command
line (files, directories, ``swift://CONTAINER[/PREFIX]``) into archives
(:class:`~shoebox_worker.tools.sources.Item`) in the order they were
written, and :class:`~shoebox_worker.tools.sources.read_ahead` reads the
next ``--jobs`` of them from Swift at a time. An archive that cannot be
read, or is damaged, is one line on stderr; the others are still read,
and the command exits 1. :func:`render_record` prints a record as one
JSON line.
:func:`verify_file` reports on an archive with the one report type,
:class:`~shoebox_worker.archive.ArchiveReport`, whose record versions come
from the records' own headers (so ``--salvage`` writes each good record
back in the version it was found in).

``cat`` keeps what the selection options say
(:mod:`shoebox_worker.tools.select`), and reads only the archives that may
hold such records (:func:`find_items`); ``replay`` (in
:mod:`shoebox_worker.tools.publish`) and ``export`` read archives with
:func:`find_items` and :func:`read_all` from here, and select the same
way. Each command opens its Swift with :func:`swift_of` around all of its
work, so that its connections are closed however it ends (an error, a
closed pipe).
"""

import functools
import logging
import os
import re
import sys
import traceback

import orjson

try:  # the worker's own fast parser (a dependency): validates 6x faster
    import simdjson
except ImportError:  # pragma: no cover - normally installed
    simdjson = None

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import record
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import progress
from shoebox_worker.tools import select
from shoebox_worker.tools import sources

__all__ = [
    "cmd_cat",
    "cmd_verify",
    "damaged",
    "find_archives",
    "find_items",
    "is_json",
    "open_reader",
    "payload_json",
    "quiet_reader_logs",
    "read_all",
    "read_records",
    "render_record",
    "say",
    "report_line",
    "swift_of",
    "verify_file",
]

#: stdout is written in chunks of about this many bytes.
OUTPUT_CHUNK = 1 << 20
#: Bytes kept from one block to the next when looking for a record
#: marker (a marker is 4 bytes).
MARKER_OVERLAP = 3
#: Exit code after a closed pipe (``| head``), as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13

# What reading may raise that is not about the archive's bytes: an I/O
# error, or a record too big for memory (a RecordError says that when the
# reader sees it coming).
_READ_ERRORS = (OSError, MemoryError)

_PAYLOAD_WS = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t\r\n]+', re.DOTALL)


# -- finding and reading archives -------------------------------------------

def _holds_no_record(item):
    """True when the (uncompressed) archive has bytes but not one record
    marker in them: not an archive at all, so ``--salvage`` cannot help.
    Read only after an error at offset 0 (an object found by a listing:
    only its first bytes, as a directory walk looks at a file's)."""
    if item.listed:
        return not sources.looks_like_archive(item)
    tail = b""
    size = 0
    try:
        with compression.open_read(item.open()) as f:
            while block := f.read(OUTPUT_CHUNK):
                size += len(block)
                buf = tail + block
                if record.find_marker(buf, 0) >= 0:
                    return False
                tail = buf[-MARKER_OVERLAP:]
    except compression.DECOMPRESS_ERRORS:
        return False  # a damaged compressed archive: say it is damaged
    except (OSError, ValueError):
        return False  # unreadable: the reader's error says why
    return size > 0


def _all_noise(reader, item):
    """After a salvaging read: True when the whole file was one skipped
    range with no record marker in it (not an archive)."""
    skipped = reader.skipped
    return (len(skipped) == 1 and skipped[0].start == 0 and
            skipped[0].end == reader.offset and _holds_no_record(item))


class NotAnArchive(ToolError):
    """An archive to read holds no record at all; one a listing or a
    directory walk found is skipped, without a word."""


def _not_an_archive(item):
    """The one line for a file that is not an archive at all."""
    return NotAnArchive("%s: not a shoebox archive (no record in it); "
                        "check the path: cat, verify and replay read the "
                        "worker's archives (plain, .gz or .zst)" % item.name)


#: The PATHs of a command line as files (kept for callers of read.py).
find_archives = sources.find_archives


def swift_of(args):
    """The command's :class:`~shoebox_worker.tools.sources.Swift`, from
    ``--config`` or the environment; a context manager that closes its
    connections::

        with read.swift_of(args) as swift:
            items = read.find_items(args, swift, selection)
    """
    return sources.Swift(config_file=getattr(args, "config", None))


def find_items(args, swift, selection=None):
    """The archives a command's PATHs name, in write order: files,
    directories and ``swift://`` specs.

    :param swift: the command's Swift (:func:`swift_of`), which it closes.
    :param selection: a :class:`~shoebox_worker.tools.select.Selection`:
        only the archives that may hold a record it keeps (their time
        range and index, read ``--jobs`` at a time: see docs/reading.md).
    """
    pruned = selection is not None and bool(selection.windowed
                                            or selection.exact)
    items = sources.find(args.paths, swift=swift, jobs=args.jobs,
                         indexes=pruned and selection.load_index is not None,
                         probes=selection.exact if pruned else ())
    if not pruned:
        return items
    return sources.keep_where(
        items, functools.partial(_may_hold, selection), args.jobs)


def _may_hold(selection, item):
    """:meth:`Selection.may_hold`, with one warning line per index not
    used."""
    return selection.may_hold(item, on_unused=_index_unused)


def _index_unused(item, err):
    """The one warning line for an index that cannot be used (unreadable,
    damaged, longer than an index may be, or not bound to its archive):
    its archive is read."""
    if isinstance(err, OSError):
        text = "%s: cannot read: %s" % (item.index_label,
                                        err.strerror or err)
    else:
        text = str(err)
    sources.warn("%s; reading %s in full" % (text, item.name))


def read_all(items, salvage, jobs, on_error, shown=False):
    """Yield the ``(metadata, payload)`` of every record of ``items``, the
    next ``jobs`` read ahead from Swift; an archive that cannot be read or
    is damaged goes to ``on_error`` (a :class:`ToolError`, after its good
    records) and the next one is read.

    :param shown: show a progress bar (:func:`.progress.wanted`).
    """
    with sources.read_ahead(items, jobs) as ahead:
        for item in progress.Reading(items, shown).track(ahead):
            try:
                yield from read_records(item, salvage)
            except NotAnArchive as err:
                if not item.listed:
                    on_error(err)
            except ToolError as err:
                on_error(err)


def open_reader(path, salvage=False):
    """An :class:`~shoebox_worker.archive.ArchiveReader` of ``path`` (or
    of a :class:`~shoebox_worker.tools.sources.Item`), or a one-line
    :class:`ToolError` when it cannot be opened."""
    item = sources.item_of(path)
    try:
        return archive.ArchiveReader(item.open(), salvage=salvage,
                                     name=item.name)
    except (OSError, ValueError) as err:
        raise _unreadable(item.name, err) from None


def _unreadable(path, err):
    """The one line for an archive that cannot be opened or read."""
    if isinstance(err, MemoryError):
        return ToolError("%s: cannot read: not enough memory" % path)
    if isinstance(err, IsADirectoryError):
        return ToolError("%s: is a directory" % path)
    if isinstance(err, OSError):
        return ToolError("%s: cannot read: %s" % (path, err.strerror or err))
    return ToolError("%s: %s" % (path, err))  # zstd without zstandard


def damaged(err, hint):
    """A :class:`ToolError` for a damaged archive, with what to do."""
    return ToolError("%s (%s)" % (err, hint))


def quiet_reader_logs():
    """Silence the readers' warnings: salvaging readers log every skipped
    range, and the tools report them in their own words."""
    logging.getLogger(archive.__name__).setLevel(logging.ERROR)


def read_records(path, salvage):
    """Yield the ``(metadata, payload)`` of each record of ``path`` (or of
    a :class:`~shoebox_worker.tools.sources.Item`).

    :raises ToolError: the file cannot be read, or (unless ``salvage``) is
        damaged.
    """
    item = sources.item_of(path)
    reader = open_reader(item, salvage)
    try:
        with reader:
            yield from reader
            if salvage and _all_noise(reader, item):
                raise _not_an_archive(item)
    except _READ_ERRORS as err:
        raise _unreadable(item.name, err) from None
    except exceptions.RecordError as err:
        if err.offset == 0 and _holds_no_record(item):
            raise _not_an_archive(item) from None
        raise damaged(err, "use --salvage to skip damaged records") \
            from None


# -- rendering records as JSON lines ----------------------------------------

def is_json(payload):
    """True when ``payload`` (bytes) is UTF-8 JSON."""
    try:
        orjson.loads(payload)
        return True
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers past 64 bits, which are valid JSON
    import json
    try:
        json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return False
    return True


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _compact(payload):
    """Drop the whitespace outside strings: the same JSON on one line."""
    return _PAYLOAD_WS.sub(
        lambda m: m.group() if m.group()[:1] == b'"' else b"", payload)


def _text_of(data):
    """Bytes as text for JSON: UTF-8, undecodable bytes as ``\\xNN``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "backslashreplace")


def payload_json(payload):
    """The payload as one line of JSON: the notification's own JSON text
    when it is UTF-8 JSON (compacted only if it has newlines), else a JSON
    string of it."""
    if is_json(payload):
        if b"\n" in payload:
            return _compact(payload)
        return payload
    return orjson.dumps(_text_of(payload))


def _metadata_json(metadata):
    try:
        return orjson.dumps(metadata)
    except TypeError:  # undecodable bytes kept as surrogates
        return orjson.dumps({
            _text_of(k.encode("utf-8", "surrogateescape")):
            _text_of(v.encode("utf-8", "surrogateescape"))
            for k, v in metadata.items()})


def render_record(metadata, payload, with_metadata=False):
    """One record as a JSON line (bytes ending in a newline)."""
    body = payload_json(payload)
    if with_metadata:
        return b"".join((b'{"metadata":', _metadata_json(metadata),
                         b',"payload":', body, b"}\n"))
    return body + b"\n"


# -- cat --------------------------------------------------------------------

def cmd_cat(args):
    """Print records as JSON lines; exit 1 if an archive could not be read
    or is damaged (the others are printed all the same)."""
    quiet_reader_logs()
    selection = select.from_args(args)
    with swift_of(args) as swift:
        items = find_items(args, swift, selection)
        status = _cat_items(args, items, selection)
    if status == EXIT_BROKEN_PIPE:
        return status
    for line in selection.notes():
        print("shoebox-worker: %s" % line, file=sys.stderr)
    return status


def _cat_items(args, items, selection):
    keep = selection.keep if selection.active else None
    out = sys.stdout.buffer
    status = EXIT_OK
    try:
        with sources.read_ahead(items, args.jobs) as ahead:
            reading = progress.Reading(items, progress.wanted(True))
            for item in reading.track(ahead):
                try:
                    _cat_file(item, out, keep, args.metadata, args.salvage)
                except ToolError as err:
                    if say(err, item, getattr(args, "debug", False)):
                        status = EXIT_FAILURE
        out.flush()
    except BrokenPipeError:
        # the reader went away (| head): stop quietly; point stdout at
        # /dev/null so that the interpreter's last flush does not complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return status


def say(err, item=None, debug=False):
    """Print an archive's one error line (none for an object a listing
    found that is not an archive), after its traceback with ``--debug``;
    True when it was printed."""
    if isinstance(err, NotAnArchive) and item is not None and item.listed:
        return False
    sys.stdout.flush()
    if debug:
        traceback.print_exception(err)
    print("shoebox-worker: %s" % err, file=sys.stderr, flush=True)
    return True


def _validator():
    """A function that raises ValueError (or RuntimeError) for a payload
    that may not be JSON, for the hot loop: simdjson's validating parse
    (its result unused), else orjson's. Either only says "maybe not":
    :func:`is_json` decides then, so the output is the same with either."""
    if simdjson is not None:
        return simdjson.Parser().parse  # one per file: not thread-safe
    return orjson.loads


def _cat_file(path, out, keep, with_metadata, salvage):
    chunk = []
    size = 0
    validate = _validator()
    item = sources.item_of(path)
    reader = open_reader(item, salvage)
    seen_skips = 0
    try:
        with reader:
            for metadata, payload in reader:
                if len(reader.skipped) > seen_skips:
                    _flush(out, chunk)
                    chunk, size = [], 0
                    seen_skips = _report_skips(reader, seen_skips)
                if keep is not None and not keep(metadata, payload):
                    continue
                # render_record inlined: this is the hot loop
                try:
                    validate(payload)
                    valid = True
                except (ValueError, RuntimeError):  # simdjson: big ints
                    valid = is_json(payload)
                if not valid:
                    payload = orjson.dumps(_text_of(payload))
                elif b"\n" in payload:
                    payload = _compact(payload)
                if with_metadata:
                    line = b"".join((b'{"metadata":',
                                     _metadata_json(metadata),
                                     b',"payload":', payload, b"}\n"))
                else:
                    line = payload + b"\n"
                chunk.append(line)
                size += len(line)
                if size >= OUTPUT_CHUNK:
                    out.write(b"".join(chunk))
                    chunk, size = [], 0
            _flush(out, chunk)
            if salvage and _all_noise(reader, item):
                raise _not_an_archive(item)
            _report_skips(reader, seen_skips)
    except BrokenPipeError:
        raise  # the reader of stdout went away: cmd_cat says nothing
    except _READ_ERRORS as err:
        _flush(out, chunk)
        out.flush()
        raise _unreadable(item.name, err) from None
    except exceptions.RecordError as err:
        _flush(out, chunk)
        out.flush()
        if err.offset == 0 and _holds_no_record(item):
            raise _not_an_archive(item) from None
        raise damaged(err, "use --salvage to skip damaged records, or "
                            "run verify") from None


def _flush(out, chunk):
    if chunk:
        out.write(b"".join(chunk))


def _report_skips(reader, seen):
    for skipped in reader.skipped[seen:]:
        sys.stdout.flush()
        print("shoebox-worker: %s: skipped damaged bytes %d-%d (%s)" % (
            skipped.filename, skipped.start, skipped.end, skipped.reason),
            file=sys.stderr)
    return len(reader.skipped)


# -- verify -----------------------------------------------------------------

def verify_file(path, salvage=False):
    """Check every record of one archive (a path, or a
    :class:`~shoebox_worker.tools.sources.Item`).

    :param salvage: write the good records of a damaged archive, each in
        the version it was found in, to ``<path>.salvaged`` (uncompressed;
        for an object in Swift, ``<its base name>.salvaged`` here), each
        as it is found (:class:`_SalvagedCopy`): nothing is kept until the
        end.
    :returns: ``(report, salvaged_to)``: an
        :class:`~shoebox_worker.archive.ArchiveReport` and the path of the
        salvaged copy, or None when none was written.
    :raises ToolError: the file cannot be read, or is not an archive, or
        its salvaged copy cannot be written.
    """
    item = sources.item_of(path)
    copy = _SalvagedCopy(item.salvage_to) if salvage else None
    try:
        try:
            report = archive.inspect_file(
                item.open(), name=item.name,
                on_record=copy.write if copy is not None else None)
        except (ValueError,) + _READ_ERRORS as err:
            raise _unreadable(item.name, err) from None
        except exceptions.RecordError as err:  # salvage cannot go past it
            raise ToolError(str(err)) from None
        if report.records == 0 and not report.ok and _holds_no_record(item):
            raise _not_an_archive(item)
        salvaged_to = None
        if copy is not None and not report.ok:
            salvaged_to = copy.commit()
        return report, salvaged_to
    finally:
        if copy is not None:
            copy.discard()  # unless committed: an OK archive, an error


def report_line(report, salvaged_to=None):
    """The line ``verify`` prints for one archive."""
    parts = ["%d record%s" % (report.records,
                              "" if report.records == 1 else "s"),
             "%d bytes" % report.size]
    if report.versions:
        parts.append("version%s %s" % (
            "s" if len(report.versions) > 1 else "",
            ", ".join(str(v) for v in sorted(report.versions))))
    text = "%s: %s: %s" % (report.filename,
                           "OK" if report.ok else "DAMAGED",
                           ", ".join(parts))
    damage = []
    last = len(report.skipped) - 1
    for index, skipped in enumerate(report.skipped):
        if index == last and report.torn_offset is not None:
            damage.append("torn tail at offset %d (%d bytes: %s)" % (
                skipped.start, skipped.end - skipped.start,
                skipped.reason))
        else:
            damage.append("bad bytes %d-%d (%s)" % (
                skipped.start, skipped.end, skipped.reason))
    if damage:
        text += "; " + "; ".join(damage)
    if salvaged_to:
        text += "; %d good records written to %s" % (
            report.records, salvaged_to)
    return text


class _SalvagedCopy:
    """``verify --salvage``'s copy of an archive's good records, written
    as they are found to ``<target>.tmp`` (made exclusively, 0600, never
    through a symlink: :func:`_create_new`), which :meth:`commit` makes
    ``target`` (fsynced, then renamed: a crash leaves no half copy under
    that name) and :meth:`discard` removes. A temporary that cannot be
    made or written (a name holding NUL, no room) is said only when the
    copy is wanted: by :meth:`commit`, as a :class:`ToolError`."""

    def __init__(self, target):
        self.target = target
        self.tmp = target + ".tmp"
        self._file = None
        self._error = None
        self._made = False  # the temporary is there, and this one's
        try:
            self._file = open(_create_new(self.tmp), "wb")
            self._made = True
        except (OSError, ValueError) as err:  # ValueError: NUL in the name
            self._error = err

    def write(self, found):
        """``archive.inspect_file``'s ``on_record``: one good record."""
        if self._file is None:
            return
        _, version, _, metadata, payload = found
        try:
            self._file.write(record.pack(metadata, payload, version))
        except OSError as err:
            self._error = err
            self.discard()

    def commit(self):
        """Make the copy ``target``; its path.

        :raises ToolError: the copy could not be made or written.
        """
        try:
            if self._error is not None:
                raise self._error
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp, self.target)  # a link there is replaced
            self._made = False
            files.fsync_directory(self.target)
        except (OSError, ValueError) as err:
            raise ToolError("%s: cannot write: %s" % (
                _printable(self.target),
                getattr(err, "strerror", None) or err)) from None
        return self.target

    def discard(self):
        """Close and remove the temporary, unless committed."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # its last bytes not written: it goes all the same
        if self._made:
            self._made = False
            try:
                os.unlink(self.tmp)
            except OSError:
                pass  # gone already: nothing to remove


def _printable(name):
    """``name`` for a one-line message: characters that are not printable
    (NUL, a newline) as Python escapes them."""
    return "".join(c if c.isprintable() else c.encode(
        "unicode_escape").decode("ascii") for c in name)


#: How many times a leftover temporary file is removed before giving up
#: (someone keeps making it again).
CREATE_ATTEMPTS = 3


def _create_new(path):
    """A new file at ``path`` (0600), opened for writing: O_EXCL and
    O_NOFOLLOW, so neither a file nor a symlink already there is written
    through; what is there is removed and the create tried again."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | \
        os.O_CLOEXEC
    for _ in range(CREATE_ATTEMPTS - 1):
        try:
            return os.open(path, flags, 0o600)
        except FileExistsError:
            os.unlink(path)
    return os.open(path, flags, 0o600)


def cmd_verify(args):
    """Check archives; exit 1 if any is damaged or unreadable."""
    quiet_reader_logs()
    status = EXIT_OK
    with swift_of(args) as swift:
        for path in sources.without_sidecars(args.paths):
            try:
                items = sources.find([path], swift=swift, jobs=args.jobs)
            except ToolError as err:
                print("shoebox-worker: %s" % err, file=sys.stderr)
                status = EXIT_FAILURE
                continue
            with sources.read_ahead(items, args.jobs) as ahead:
                reading = progress.Reading(items, progress.wanted(True))
                for item in reading.track(ahead):
                    try:
                        report, salvaged_to = verify_file(
                            item, salvage=args.salvage)
                    except ToolError as err:
                        if say(err, item, getattr(args, "debug", False)):
                            status = EXIT_FAILURE
                        continue
                    print(report_line(report, salvaged_to), flush=True)
                    if not report.ok:
                        status = EXIT_FAILURE
    return status
