"""Operator tools: ``cat``, ``verify``, ``replay`` and ``generate``.

They are subcommands of ``shoebox-worker`` (see :func:`add_commands`)::

    shoebox-worker cat [--metadata] [--match KEY=GLOB ...] PATH...
    shoebox-worker verify [--salvage] PATH...
    shoebox-worker replay --config FILE --exchange E --routing-key K PATH...
    shoebox-worker generate --url URL --count N

A PATH is an archive (plain, ``.gz`` or ``.zst``; format v1 or v2) or a
directory, searched recursively for archives (files whose bytes hold
records), read in the order they were written. Files given by name are
read in the order given.

Errors (a missing file, a damaged archive, a broker that is down or
refuses) are one line on stderr and a non-zero exit code, never a
traceback: they are raised as :class:`ToolError`, a
:class:`~shoebox_worker.exceptions.ShoeboxError` that ``cli.main`` prints.
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
from shoebox_worker import record
from shoebox_worker import roll_manager
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK

__all__ = [
    "ToolError",
    "add_commands",
    "find_archives",
    "parse_match",
    "render_record",
    "record_version",
]

LOG = logging.getLogger(__name__)

#: stdout is written in chunks of about this many bytes.
OUTPUT_CHUNK = 1 << 20
#: How much of a file is looked at to decide whether it is an archive.
SNIFF_BYTES = 1 << 16
#: Exit code after a closed pipe (``| head``), as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13
#: Longest wait for the broker to accept a connection, seconds.
BROKER_CONNECT_TIMEOUT = 5.0
#: Connection attempts before replay/generate give up (per failover URL).
BROKER_CONNECT_RETRIES = 1

_PAYLOAD_WS = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t\r\n]+', re.DOTALL)


class ToolError(exceptions.ShoeboxError):
    """A tool cannot go on; ``str()`` is the one line shown."""


# -- finding and reading archives -------------------------------------------

def _looks_like_archive(path):
    """True when the file's (uncompressed) first bytes hold a record
    marker: a damaged first record still counts."""
    try:
        with compression.open_read(path) as f:
            head = f.read(SNIFF_BYTES)
    except compression.DECOMPRESS_ERRORS:
        return True  # a damaged compressed archive: let the reader say
    except (OSError, ValueError):
        return False
    return record.find_marker(head, 0) >= 0


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


def _open_reader(path, salvage=False):
    try:
        return archive.ArchiveReader(path, salvage=salvage)
    except IsADirectoryError:
        raise ToolError("%s: is a directory" % path) from None
    except ValueError as err:  # zstd without zstandard
        raise ToolError("%s: %s" % (path, err)) from None
    except OSError as err:
        raise ToolError("%s: cannot read: %s" % (
            path, err.strerror or err)) from None


def _damaged(err, hint):
    return ToolError("%s (%s)" % (err, hint))


def _quiet_reader_logs():
    # salvaging readers log every skipped range; the tools report them
    # in their own words
    logging.getLogger(archive.__name__).setLevel(logging.ERROR)


def parse_match(text):
    """``KEY=GLOB`` -> ``(key, matcher)``; for argparse ``type=``."""
    key, sep, glob = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            "expected KEY=GLOB (e.g. event_type=compute.*), got %r" % text)
    return key, re.compile(fnmatch.translate(glob), re.DOTALL).match


def _matcher(matches):
    """One predicate over metadata: every KEY=GLOB must match."""
    if not matches:
        return None

    def match(metadata):
        for key, test in matches:
            value = metadata.get(key)
            if value is None or test(value) is None:
                return False
        return True
    return match


# -- rendering records as JSON lines ----------------------------------------

def _is_json(payload):
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
    if _is_json(payload):
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
    _quiet_reader_logs()
    files = find_archives(args.paths)
    match = _matcher(args.match)
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
    reader = _open_reader(path, salvage)
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
                    valid = _is_json(payload)
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
            _report_skips(reader, seen_skips)
    except exceptions.RecordError as err:
        _flush(out, chunk)
        out.flush()
        raise _damaged(err, "use --salvage to skip damaged records, or "
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

def _encoded_len(text):
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogateescape"))


def record_version(metadata, payload, size):
    """The format version of a record read back, from its size on disk.

    v2 is v1's layout plus a 4-byte checksum, so the size tells them apart
    without looking at the bytes again.

    :returns: 1, 2, or None when the size fits neither.
    """
    v1 = (record.HEADER_SIZE + 4 + 4 + len(payload)
          + sum(8 + _encoded_len(k) + _encoded_len(v)
                for k, v in metadata.items()))
    if size == v1:
        return 1
    if size == v1 + record.TRAILER_SIZE:
        return 2
    return None


class _Report:
    """What verify found in one file."""

    def __init__(self, path):
        self.path = path
        self.records = 0
        self.size = 0
        self.versions = set()
        self.skipped = []
        self.torn = None
        self.salvaged_to = None

    @property
    def ok(self):
        return not self.skipped

    def line(self):
        parts = ["%d record%s" % (self.records,
                                  "" if self.records == 1 else "s"),
                 "%d bytes" % self.size]
        if self.versions:
            parts.append("version%s %s" % (
                "s" if len(self.versions) > 1 else "",
                ", ".join(str(v) for v in sorted(self.versions))))
        text = "%s: %s: %s" % (self.path, "OK" if self.ok else "DAMAGED",
                               ", ".join(parts))
        damage = []
        for skipped in self.skipped:
            if skipped is self.torn:
                damage.append("torn tail at offset %d (%d bytes: %s)" % (
                    skipped.start, skipped.end - skipped.start,
                    skipped.reason))
            else:
                damage.append("bad bytes %d-%d (%s)" % (
                    skipped.start, skipped.end, skipped.reason))
        if damage:
            text += "; " + "; ".join(damage)
        if self.salvaged_to:
            text += "; %d good records written to %s" % (
                self.records, self.salvaged_to)
        return text


def verify_file(path, salvage=False):
    """Check every record of one archive.

    :param salvage: write the good records of a damaged archive, each in
        the version it was found in, to ``<path>.salvaged`` (uncompressed).
    :returns: a report with ``ok``, ``records``, ``skipped``, ``torn``,
        ``salvaged_to`` and ``line()``.
    """
    report = _Report(path)
    records = [] if salvage else None
    reader = _open_reader(path, salvage=True)
    with reader:
        start = 0
        seen = 0
        for metadata, payload in reader:
            if len(reader.skipped) > seen:
                seen = len(reader.skipped)
                start = reader.skipped[-1].end
            end = reader.good_offset
            version = record_version(metadata, payload, end - start)
            report.versions.add(version or "?")
            report.records += 1
            if records is not None:
                records.append(record.pack(metadata, payload, version or 2))
            start = end
        report.skipped = list(reader.skipped)
        report.size = reader.offset
    if report.skipped and report.skipped[-1].end == report.size:
        report.torn = report.skipped[-1]
    if salvage and not report.ok:
        report.salvaged_to = _write_salvaged(path, records)
    return report


def _write_salvaged(path, records):
    target = path + ".salvaged"
    tmp = target + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for data in records:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        raise ToolError("%s: cannot write: %s" % (
            target, err.strerror or err)) from None
    return target


def cmd_verify(args):
    """Check archives; exit 1 if any is damaged or unreadable."""
    _quiet_reader_logs()
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
                report = verify_file(name, salvage=args.salvage)
            except ToolError as err:
                print("shoebox-worker: %s" % err, file=sys.stderr)
                status = EXIT_FAILURE
                continue
            print(report.line(), flush=True)
            if not report.ok:
                status = EXIT_FAILURE
    return status


# -- the broker: replay and generate ----------------------------------------

def _broker_errors(conn=None):
    """What a broker that is down, refuses or goes away raises."""
    import amqp.exceptions
    import kombu.exceptions
    errors = (OSError, kombu.exceptions.KombuError, amqp.exceptions.AMQPError,
              amqp.exceptions.MessageNacked)
    if conn is not None:
        errors += tuple(conn.connection_errors) + tuple(conn.channel_errors)
    return errors


def _broker_error(url, err):
    from shoebox_worker.config import redact_url
    text = " ".join(str(err).split()) or type(err).__name__
    return ToolError("broker %s: %s" % (redact_url(url), text))


def _progress(total=None, unit="msg"):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _connect(url):
    """A connected kombu Connection with publisher confirms, or a
    ToolError within a few seconds."""
    import kombu
    conn = kombu.Connection(url, connect_timeout=BROKER_CONNECT_TIMEOUT,
                            transport_options={"confirm_publish": True})
    try:
        conn.ensure_connection(
            max_retries=BROKER_CONNECT_RETRIES * max(1, url.count(";") + 1),
            interval_start=0.5, interval_step=0.5, interval_max=1.0)
    except _broker_errors(conn) as err:
        conn.release()
        raise _broker_error(url, err) from None
    return conn


class _Returned:
    """Collects basic.return (mandatory message that no queue took)."""

    def __init__(self):
        self.error = None

    def __call__(self, exc, exchange, routing_key, message):
        self.error = exc


def cmd_replay(args):
    """Republish archived notifications in the oslo.messaging v2 envelope."""
    from kombu import Exchange
    from kombu import Producer

    from shoebox_worker import config as config_mod
    from shoebox_worker.tools import generator

    if args.rate is not None and args.rate <= 0:
        raise ToolError("--rate must be > 0, got %g" % args.rate)
    _quiet_reader_logs()
    conf = config_mod.load(args.config)
    files = find_archives(args.paths)
    match = _matcher(args.match)
    url = conf.broker.url
    total = None
    if sys.stderr.isatty():  # the bar needs a total: count first
        total = sum(1 for path in files
                    for _ in _records(path, args.salvage))
    published = failed = malformed = filtered = unroutable = 0
    conn = _connect(url)
    errors = _broker_errors(conn)
    error = None
    started = False
    bar = _progress(total)
    try:
        channel = conn.channel()
        exchange = Exchange(args.exchange, type="topic", passive=True)
        if getattr(conn.transport, "driver_type", "") == "amqp":
            # an exchange that does not exist would drop everything
            exchange(channel).declare()
        returned = _Returned()
        producer = Producer(channel, exchange=exchange, auto_declare=False,
                            on_return=returned)
        started = True
        pacer = generator._Pacer(args.rate)
        attempts = 0
        for path in files:
            for metadata, payload in _records(path, args.salvage):
                bar.update(1)
                if match is not None and not match(metadata):
                    filtered += 1
                    continue
                body = _envelope(metadata, payload)
                if body is None:
                    malformed += 1
                    continue
                pacer.wait(attempts)
                attempts += 1
                returned.error = None
                try:
                    producer.publish(
                        body, routing_key=args.routing_key,
                        content_type="application/json",
                        content_encoding="utf-8", delivery_mode=2,
                        mandatory=True, declare=[], retry=False)
                except errors as err:
                    failed += 1
                    if _is_nack(err):
                        continue
                    raise
                if returned.error is not None:
                    failed += 1
                    unroutable += 1
                    continue
                published += 1
    except errors as err:
        error = _broker_error(url, err)
    except ToolError as err:  # a damaged or unreadable archive
        error = err
    finally:
        bar.close()
        conn.release()
    if not started:
        raise error
    print("replayed to exchange %s with routing key %s: %d published, %d "
          "failed, %d skipped (malformed)%s" % (
              args.exchange, args.routing_key, published, failed, malformed,
              ", %d not matching --match" % filtered if args.match else ""),
          flush=True)
    if error is not None:
        raise error
    if unroutable:
        raise ToolError("%d message%s returned unroutable: no queue is bound "
                        "to exchange %s with routing key %s" % (
                            unroutable, "s were" if unroutable > 1 else
                            " was", args.exchange, args.routing_key))
    return EXIT_FAILURE if failed else EXIT_OK


def _is_nack(err):
    import amqp.exceptions
    return isinstance(err, amqp.exceptions.MessageNacked)


def _records(path, salvage):
    reader = _open_reader(path, salvage)
    try:
        with reader:
            yield from reader
    except exceptions.RecordError as err:
        raise _damaged(err, "use --salvage to skip damaged records") \
            from None


def _envelope(metadata, payload):
    """The v2 envelope of an archived notification, or None when the
    record is not one (malformed, not UTF-8 JSON)."""
    if "malformed" in metadata:
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not _is_json(payload):
        return None
    return orjson.dumps({"oslo.version": "2.0", "oslo.message": text})


def cmd_generate(args):
    """Publish synthetic nova notifications."""
    from shoebox_worker.tools import generator

    if args.count < 0:
        raise ToolError("--count must be >= 0, got %d" % args.count)
    if args.rate is not None and args.rate <= 0:
        raise ToolError("--rate must be > 0, got %g" % args.rate)
    conn = _connect(args.url)  # fail fast with one line when it is down
    conn.release()
    bar = _progress(args.count)
    try:
        sent = generator.publish(
            args.url, args.count, exchange=args.exchange,
            routing_key=args.routing_key, durable=args.durable,
            rate=args.rate, seed=args.seed, declare_queue=args.queue,
            progress=None if bar.disable else lambda n: bar.update(1))
    except _broker_errors() as err:
        raise _broker_error(args.url, err) from None
    finally:
        bar.close()
    from shoebox_worker.config import redact_url
    print("published %d notification%s to exchange %s with routing key %s "
          "on %s" % (sent, "" if sent == 1 else "s", args.exchange,
                     args.routing_key, redact_url(args.url)), flush=True)
    return EXIT_OK


# -- the command line -------------------------------------------------------

def _add_match(parser):
    parser.add_argument(
        "--match", action="append", type=parse_match, default=[],
        metavar="KEY=GLOB",
        help="only records whose metadata KEY matches the shell-style "
             "GLOB (e.g. event_type='compute.instance.*'); repeat it: all "
             "must match")


def add_commands(subparsers):
    """Add ``cat``, ``verify``, ``replay`` and ``generate`` to the
    ``shoebox-worker`` command's subparsers."""
    paths_help = ("archives (plain, .gz, .zst) or directories, searched "
                  "recursively")

    cat = subparsers.add_parser(
        "cat", help="print records as JSON lines",
        description="Print the records of archives as JSON lines: each "
                    "notification's JSON text as archived (on one line), or "
                    "a JSON string when a payload is not JSON. With "
                    "--metadata: {\"metadata\": {...}, \"payload\": ...}.")
    cat.add_argument("--metadata", action="store_true",
                     help="print each record's metadata with its payload")
    _add_match(cat)
    cat.add_argument("--salvage", action="store_true",
                     help="skip damaged records (reported on stderr) "
                          "instead of stopping at the first")
    cat.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    cat.set_defaults(func=cmd_cat)

    verify = subparsers.add_parser(
        "verify", help="check every record of archives",
        description="Check every record; print one line per archive (OK or "
                    "DAMAGED with the byte offsets of each damaged range and "
                    "torn tail, offsets in the uncompressed bytes). Exit 1 "
                    "if anything is damaged or unreadable.")
    verify.add_argument("--salvage", action="store_true",
                        help="write the good records of each damaged "
                             "archive to <file>.salvaged (uncompressed, "
                             "each record in the version it was found in)")
    verify.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    verify.set_defaults(func=cmd_verify)

    replay = subparsers.add_parser(
        "replay", help="republish archived notifications",
        description="Republish archived notifications in oslo.messaging's "
                    "v2 envelope to the broker of the config's [broker] url, "
                    "with publisher confirms. Malformed records are skipped "
                    "and counted. Exit 1 if any publish failed.")
    replay.add_argument("--config", required=True,
                        help="the worker's INI file (for [broker] url)")
    replay.add_argument("--exchange", required=True,
                        help="an existing exchange to publish to")
    replay.add_argument("--routing-key", required=True,
                        help="routing key, e.g. notifications.info")
    replay.add_argument("--rate", type=float, metavar="N",
                        help="at most N messages a second")
    _add_match(replay)
    replay.add_argument("--salvage", action="store_true",
                        help="skip damaged records instead of stopping")
    replay.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    replay.set_defaults(func=cmd_replay)

    generate = subparsers.add_parser(
        "generate", help="publish synthetic nova notifications",
        description="Publish realistic synthetic nova notifications in the "
                    "oslo.messaging v2 envelope, with publisher confirms "
                    "(for demos, smoke and load tests).")
    generate.add_argument("--url", required=True,
                          help="kombu broker URL, e.g. "
                               "amqp://guest:guest@127.0.0.1:5672//")
    generate.add_argument("--count", type=int, required=True,
                          help="how many to publish")
    generate.add_argument("--exchange", default="nova",
                          help="topic exchange (default: %(default)s)")
    generate.add_argument("--routing-key", default="notifications.info",
                          help="routing key (default: %(default)s)")
    generate.add_argument("--durable", action="store_true",
                          help="declare the exchange (and --queue) durable, "
                               "to match an existing durable one")
    generate.add_argument("--rate", type=float, metavar="N",
                          help="at most N messages a second")
    generate.add_argument("--seed", type=int,
                          help="the same seed gives the same notifications")
    generate.add_argument("--queue", metavar="NAME",
                          help="declare this queue and bind it with the "
                               "routing key first, so nothing is dropped "
                               "before a worker declares it")
    generate.set_defaults(func=cmd_generate)
