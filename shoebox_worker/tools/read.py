"""Reading archives: ``cat`` and ``verify``, and what they share.

:func:`find_archives` turns the PATHs of a command line into archives in
reading order: a file is taken as given, a directory is searched
recursively for files whose bytes hold records, sorted into the order they
were written. :func:`render_record` prints a record as one JSON line.
:func:`verify_file` reports on an archive with the one report type,
:class:`~shoebox_worker.archive.ArchiveReport`, whose record versions come
from the records' own headers (so ``--salvage`` writes each good record
back in the version it was found in).

``replay`` (in :mod:`shoebox_worker.tools.publish`) reads archives with
:func:`find_archives`, :func:`read_records` and :func:`matcher` from here.
"""

import argparse
import fnmatch
import logging
import os
import re
import sys

import orjson

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index as archive_index
from shoebox_worker import record
from shoebox_worker import roll_manager
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError

__all__ = [
    "cmd_cat",
    "cmd_verify",
    "damaged",
    "find_archives",
    "is_json",
    "matcher",
    "open_reader",
    "parse_match",
    "payload_json",
    "quiet_reader_logs",
    "read_records",
    "render_record",
    "report_line",
    "verify_file",
]

#: stdout is written in chunks of about this many bytes.
OUTPUT_CHUNK = 1 << 20
#: How much of a file is looked at to decide whether it is an archive.
SNIFF_BYTES = 1 << 16
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

def _looks_like_archive(path):
    """True when the file's (uncompressed) first bytes hold a record
    marker: a damaged first record still counts. An archive's index
    (``x.events.index``, whose filter bytes may hold anything) is not
    one."""
    try:
        with compression.open_read(path) as f:
            head = f.read(SNIFF_BYTES)
    except compression.DECOMPRESS_ERRORS:
        return True  # a damaged compressed archive: let the reader say
    except (OSError, ValueError):
        return False
    if archive_index.looks_like_index(head):
        return False
    return record.find_marker(head, 0) >= 0


def _holds_no_record(path):
    """True when the (uncompressed) file has bytes but not one record
    marker in them: not an archive at all, so ``--salvage`` cannot help.
    Read only after an error at offset 0."""
    tail = b""
    size = 0
    try:
        with compression.open_read(path) as f:
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


def _all_noise(reader, path):
    """After a salvaging read: True when the whole file was one skipped
    range with no record marker in it (not an archive)."""
    skipped = reader.skipped
    return (len(skipped) == 1 and skipped[0].start == 0 and
            skipped[0].end == reader.offset and _holds_no_record(path))


def _not_an_archive(path):
    """The one line for a file that is not an archive at all."""
    return ToolError("%s: not a shoebox archive (no record in it); check "
                     "the path: cat, verify and replay read the worker's "
                     "archives (plain, .gz or .zst)" % path)


def find_archives(paths):
    """The archives named by ``paths``, in reading order.

    A file is taken as given (in the order given); a directory is searched
    recursively for archives, sorted into the order they were written.

    :raises ToolError: a path that does not exist, or a directory that
        holds no archive.
    """
    found = []
    for path in paths:
        if os.path.isdir(path):
            candidates = []
            for folder, dirs, names in os.walk(path, onerror=_walk_error):
                dirs.sort()
                for name in names:
                    full = os.path.join(folder, name)
                    if os.path.isfile(full) and _looks_like_archive(full):
                        candidates.append(full)
            if not candidates:
                raise ToolError("%s: no archives in this directory" % path)
            found.extend(roll_manager.sort_written_order(candidates))
        elif os.path.exists(path):
            found.append(path)
        else:
            raise ToolError("%s: no such file or directory" % path)
    return found


def _walk_error(err):
    raise ToolError("%s: %s" % (err.filename, err.strerror))


def open_reader(path, salvage=False):
    """An :class:`~shoebox_worker.archive.ArchiveReader` of ``path``, or a
    one-line :class:`ToolError` when it cannot be opened."""
    try:
        return archive.ArchiveReader(path, salvage=salvage)
    except (OSError, ValueError) as err:
        raise _unreadable(path, err) from None


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


def parse_match(text):
    """``KEY=GLOB`` -> ``(key, matcher)``; for argparse ``type=``."""
    key, sep, glob = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            "expected KEY=GLOB (e.g. event_type=compute.*), got %r" % text)
    return key, re.compile(fnmatch.translate(glob), re.DOTALL).match


def matcher(matches):
    """One predicate over metadata: every KEY=GLOB of ``matches`` (pairs
    from :func:`parse_match`) must match; None when there are none."""
    if not matches:
        return None

    def match(metadata):
        for key, test in matches:
            value = metadata.get(key)
            if value is None or test(value) is None:
                return False
        return True
    return match


def read_records(path, salvage):
    """Yield the ``(metadata, payload)`` of each record of ``path``.

    :raises ToolError: the file cannot be read, or (unless ``salvage``) is
        damaged.
    """
    reader = open_reader(path, salvage)
    try:
        with reader:
            yield from reader
            if salvage and _all_noise(reader, path):
                raise _not_an_archive(path)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    except exceptions.RecordError as err:
        if err.offset == 0 and _holds_no_record(path):
            raise _not_an_archive(path) from None
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
    """Print records as JSON lines."""
    quiet_reader_logs()
    files = find_archives(args.paths)
    match = matcher(args.match)
    out = sys.stdout.buffer
    try:
        for path in files:
            _cat_file(path, out, match, args.metadata, args.salvage)
        out.flush()
    except BrokenPipeError:
        # the reader went away (| head): stop quietly; point stdout at
        # /dev/null so that the interpreter's last flush does not complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return EXIT_OK


def _cat_file(path, out, match, with_metadata, salvage):
    chunk = []
    size = 0
    loads, JSONDecodeError = orjson.loads, orjson.JSONDecodeError
    reader = open_reader(path, salvage)
    seen_skips = 0
    try:
        with reader:
            for metadata, payload in reader:
                if len(reader.skipped) > seen_skips:
                    _flush(out, chunk)
                    chunk, size = [], 0
                    seen_skips = _report_skips(reader, seen_skips)
                if match is not None and not match(metadata):
                    continue
                # render_record inlined: this is the hot loop
                try:
                    loads(payload)
                    valid = True
                except JSONDecodeError:
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
            if salvage and _all_noise(reader, path):
                raise _not_an_archive(path)
            _report_skips(reader, seen_skips)
    except BrokenPipeError:
        raise  # the reader of stdout went away: cmd_cat says nothing
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    except exceptions.RecordError as err:
        _flush(out, chunk)
        out.flush()
        if err.offset == 0 and _holds_no_record(path):
            raise _not_an_archive(path) from None
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
    """Check every record of one archive.

    :param salvage: write the good records of a damaged archive, each in
        the version it was found in, to ``<path>.salvaged`` (uncompressed).
    :returns: ``(report, salvaged_to)``: an
        :class:`~shoebox_worker.archive.ArchiveReport` and the path of the
        salvaged copy, or None when none was written.
    :raises ToolError: the file cannot be read, or is not an archive.
    """
    kept = []

    def keep(found):
        _, version, _, metadata, payload = found
        kept.append(record.pack(metadata, payload, version))

    try:
        report = archive.inspect_file(path,
                                      on_record=keep if salvage else None)
    except (ValueError,) + _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    except exceptions.RecordError as err:  # salvage cannot go on past it
        raise ToolError(str(err)) from None
    if report.records == 0 and not report.ok and _holds_no_record(path):
        raise _not_an_archive(path)
    salvaged_to = None
    if salvage and not report.ok:
        salvaged_to = _write_salvaged(path, kept)
    return report, salvaged_to


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


def _write_salvaged(path, records):
    """Write ``<path>.salvaged`` through ``<path>.salvaged.tmp``, made
    exclusively and never through a symlink (a stale one, or a link
    planted there, is removed first: the link, not what it names)."""
    target = path + ".salvaged"
    tmp = target + ".tmp"
    try:
        with open(_create_new(tmp), "wb") as f:
            for data in records:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)  # a link at target is replaced, not followed
        files.fsync_directory(target)
    except OSError as err:
        raise ToolError("%s: cannot write: %s" % (
            target, err.strerror or err)) from None
    return target


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
    for path in args.paths:
        try:
            files = find_archives([path])
        except ToolError as err:
            print("shoebox-worker: %s" % err, file=sys.stderr)
            status = EXIT_FAILURE
            continue
        for name in files:
            try:
                report, salvaged_to = verify_file(name, salvage=args.salvage)
            except ToolError as err:
                print("shoebox-worker: %s" % err, file=sys.stderr)
                status = EXIT_FAILURE
                continue
            print(report_line(report, salvaged_to), flush=True)
            if not report.ok:
                status = EXIT_FAILURE
    return status
