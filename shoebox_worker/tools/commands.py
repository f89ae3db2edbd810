"""The tools' command line: ``cat``, ``verify``, ``replay``, ``generate``.

They are subcommands of ``shoebox-worker`` (``cli`` calls
:func:`add_commands`)::

    shoebox-worker cat [--metadata] [SELECTION] PATH...
    shoebox-worker verify [--salvage] PATH...
    shoebox-worker verify --chain --public-key FILE... [--deep] [--json]
                          [--since T] [--until T] swift://CONTAINER[/PREFIX]
    shoebox-worker replay [--config FILE] --exchange E --routing-key K
                          [SELECTION] PATH...
    (cat, verify, replay: [--config FILE] [--jobs N]; PATH may be
    swift://CONTAINER[/PREFIX])
    shoebox-worker export --format jsonl|parquet --out DIR [--mode MODE]
                          [SELECTION] PATH...
    shoebox-worker generate [--config FILE] --count N [--seed N [--start T]]
    shoebox-worker index-bundle [--config FILE] [--jobs N]
                                [--per year|month|day [--field PATH]...]
                                swift://CONTAINER[/PREFIX]

``replay`` and ``generate`` take the broker URL from ``--config FILE``'s
``[broker] url``, else from ``$SHOEBOX_BROKER_URL``
(:data:`~shoebox_worker.tools.URL_VARIABLE`); ``--url URL`` is
accepted too, but puts the password where every local user sees it (``ps``,
``/proc/PID/cmdline``).

SELECTION is any of ``--match KEY=GLOB``, ``--since TIME``, ``--until
TIME``, ``--where PATH=GLOB``, ``--dedup``
(:mod:`~shoebox_worker.tools.select`).

A PATH is an archive (plain, ``.gz`` or ``.zst``; format v1 or v2) or a
directory, searched recursively for archives (files whose bytes hold
records), read in the order they were written. Files given by name are
read in the order given. ``swift://CONTAINER[/PREFIX]`` reads the archives
in Swift under the prefix, in the order they were written, ``--jobs`` at a
time (:mod:`~shoebox_worker.tools.sources`), with ``--config FILE``'s
``[callback:swift]`` credentials, else ``ST_*``/``OS_*`` as the swift CLI
reads them.

This module only wires arguments to the commands: ``cat`` and ``verify``
live in :mod:`~shoebox_worker.tools.read`, ``replay`` and ``generate`` in
:mod:`~shoebox_worker.tools.publish` (imported when they run).
"""

import argparse
import datetime

from shoebox_worker import options
from shoebox_worker import tools
from shoebox_worker.period_bundle import PERIODS
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools import sources

__all__ = ["add_commands", "parse_time", "run_export", "run_generate",
           "run_index_bundle", "run_replay", "run_verify"]


# The broker's modules (kombu, amqp) are imported by the commands that
# publish, when they run: ``cat`` and ``verify`` start without them.

#: ``[integrity] digest_prefix``'s default (the integrity modules bring
#: the cryptography package: imported when ``--chain`` runs).
DIGEST_PREFIX = "_digests/"


def run_verify(args):
    """``verify``: :func:`.read.cmd_verify`, or with ``--chain``
    :func:`.audit.cmd_verify_chain`."""
    if not args.chain:
        for given in ("public_key", "deep", "json", "since", "until",
                      "expect"):
            if getattr(args, given):
                raise tools.UsageError("--%s goes with --chain"
                                       % given.replace("_", "-"))
        return read.cmd_verify(args)
    if args.salvage:
        raise tools.UsageError("--salvage does not go with --chain")
    from shoebox_worker.tools import audit
    return audit.cmd_verify_chain(args)


def run_replay(args):
    """``replay``: :func:`shoebox_worker.tools.publish.cmd_replay`."""
    from shoebox_worker.tools import publish
    return publish.cmd_replay(args)


def run_export(args):
    """``export``: :func:`shoebox_worker.tools.export.cmd_export`."""
    from shoebox_worker.tools import export
    return export.cmd_export(args)


def run_index_bundle(args):
    """``index-bundle``: :func:`.bundle.cmd_index_bundle`."""
    from shoebox_worker.tools import bundle
    return bundle.cmd_index_bundle(args)


def run_generate(args):
    """``generate``: :func:`shoebox_worker.tools.publish.cmd_generate`."""
    from shoebox_worker.tools import publish
    return publish.cmd_generate(args)


def parse_time(text):
    """``--start``'s ISO 8601 time (naive means UTC), or a usage error."""
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "not an ISO 8601 time: %r (e.g. 2024-03-01T12:00:00)"
            % text) from None


def _jobs(text):
    """``--jobs``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("expected an integer >= 1, got %r"
                                         % text)
    return value


def _head(text):
    """``--expect``: ``CHAIN:SEQ:SHA256``."""
    from shoebox_worker.integrity import audit  # cryptography: only here
    try:
        return audit.parse_head(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _mode(text):
    """``--mode``: permission bits in octal (:func:`.options.mode`)."""
    try:
        return options.mode()(text)
    except options.OptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_sources(parser, config=True):
    """``--jobs``, and ``--config`` for Swift credentials (replay has its
    own, which gives the broker too)."""
    if config:
        parser.add_argument(
            "--config", metavar="FILE",
            help="the worker's INI file: its [callback:swift] section is "
                 "how swift:// PATHs are reached (default: ST_AUTH, "
                 "ST_USER, ST_KEY or OS_AUTH_URL, OS_USERNAME, ... from the "
                 "environment)")
    parser.add_argument(
        "--jobs", type=_jobs, default=sources.DEFAULT_JOBS, metavar="N",
        help="objects read from Swift at a time (default: %(default)s)")


#: How ``replay`` and ``generate`` are told the broker, in their --help.
URL_EPILOG = (
    "The broker URL comes from --config FILE ([broker] url), else from the "
    "environment variable %s. --url, which wins over both, works too, but "
    "every local user can read it (ps, /proc/PID/cmdline): prefer the "
    "other two for a URL with a password. The password may hold any "
    "character, as it is or percent-encoded (see [broker] url in "
    "etc/shoebox-worker.conf.sample)."
    % tools.URL_VARIABLE)


def _add_url(parser):
    parser.add_argument(
        "--config", metavar="FILE",
        help="the worker's INI file: its [broker] url is the broker (and, "
             "for replay, its [callback:swift] reaches swift:// PATHs)")
    parser.add_argument(
        "--url", help="the broker URL itself, e.g. "
                      "amqp://guest:guest@127.0.0.1:5672// (visible in ps: "
                      "prefer --config or $%s)" % tools.URL_VARIABLE)


def add_commands(subparsers):
    """Add ``cat``, ``verify``, ``replay`` and ``generate`` to the
    ``shoebox-worker`` command's subparsers."""
    paths_help = ("archives (plain, .gz, .zst), directories, searched "
                  "recursively, or swift://CONTAINER[/PREFIX]")

    cat = subparsers.add_parser(
        "cat", help="print records as JSON lines",
        description="Print the records of archives as JSON lines: each "
                    "notification's JSON text as archived (on one line), or "
                    "a JSON string when a payload is not JSON. With "
                    "--metadata: {\"metadata\": {...}, \"payload\": ...}.")
    cat.add_argument("--metadata", action="store_true",
                     help="print each record's metadata with its payload")
    select.add_arguments(cat)
    cat.add_argument("--salvage", action="store_true",
                     help="skip damaged records (reported on stderr) "
                          "instead of stopping at the first")
    _add_sources(cat)
    cat.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    cat.set_defaults(func=read.cmd_cat)

    verify = subparsers.add_parser(
        "verify", help="check every record of archives",
        description="Check every record; print one line per archive (OK or "
                    "DAMAGED with the byte offsets of each damaged range and "
                    "torn tail, offsets in the uncompressed bytes). Exit 1 "
                    "if anything is damaged or unreadable.")
    verify.add_argument("--salvage", action="store_true",
                        help="write the good records of each damaged "
                             "archive to <file>.salvaged (uncompressed, "
                             "each record in the version it was found in; "
                             "for an object in Swift: <its base "
                             "name>.salvaged in the current directory)")
    chain = verify.add_argument_group(
        "the signed chain ([integrity], docs/integrity.md)",
        "With --chain, PATH is one store, swift://CONTAINER[/PREFIX]: walk "
        "every chain of digests in it from the pinned keys and report, one "
        "line each, archives missing, changed or not listed in any digest, "
        "digests missing, altered or signed by a key their place does not "
        "call for, and gaps in archive sequences; then one line per chain "
        "(time since its last digest). Reads the digests and HEADs the "
        "archives (their bytes only with --deep). Exit 1 on any problem.")
    chain.add_argument("--chain", action="store_true",
                       help="verify the signed digest chain(s) of a store")
    chain.add_argument("--public-key", action="append", metavar="FILE",
                       help="a pinned public key (signing.pub); repeat it "
                            "for each worker")
    chain.add_argument("--deep", action="store_true",
                       help="also read every listed archive and check its "
                            "size and SHA-256")
    chain.add_argument("--json", action="store_true",
                       help="print one JSON object instead of lines")
    chain.add_argument("--since", type=select.parse_when, metavar="TIME",
                       help="check only archives (and stored objects) from "
                            "TIME on (ISO 8601 or an age such as 7d); the "
                            "chains are walked whole")
    chain.add_argument("--until", type=select.parse_when, metavar="TIME",
                       help="check only archives before TIME")
    chain.add_argument("--expect", action="append", type=_head,
                       metavar="CHAIN:SEQ:SHA256",
                       help="a head an earlier verify printed (repeat it "
                            "for each chain): it must still be there, "
                            "unchanged; a chain whose newest digests were "
                            "deleted is TRUNCATED")
    chain.add_argument("--digest-prefix", default=DIGEST_PREFIX,
                       metavar="PREFIX",
                       help="where the digests are ([integrity] "
                            "digest_prefix; default: %(default)s)")
    _add_sources(verify)
    verify.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    verify.set_defaults(func=run_verify)

    replay = subparsers.add_parser(
        "replay", help="republish archived notifications",
        description="Republish archived notifications in oslo.messaging's "
                    "v2 envelope to the broker, as mandatory, with "
                    "publisher confirms; print how many the broker "
                    "confirmed. Malformed records are skipped "
                    "and counted. Exit 1 if the broker returned any (no "
                    "queue bound to the routing key), refused any, or "
                    "failed.", epilog=URL_EPILOG)
    _add_url(replay)
    replay.add_argument("--exchange", required=True,
                        help="an existing exchange to publish to")
    replay.add_argument("--routing-key", required=True,
                        help="routing key, e.g. notifications.info")
    replay.add_argument("--rate", type=float, metavar="N",
                        help="at most N messages a second")
    select.add_arguments(replay)
    replay.add_argument("--salvage", action="store_true",
                        help="skip damaged records instead of stopping")
    _add_sources(replay, config=False)
    replay.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    replay.set_defaults(func=run_replay)

    export = subparsers.add_parser(
        "export", help="write records as files for SQL (DuckDB, Spark, "
                       "Athena)",
        description="Write the selected records under --out as one run, one "
                    "folder per day of their timestamp (UTC), Hive style: "
                    "DIR/run=RUN/date=YYYY-MM-DD/part-*.jsonl.gz or "
                    ".parquet (read DIR/run=*/date=*/*.parquet). A row is "
                    "the record's timestamp, each metadata key as a column "
                    "and the notification itself. The run appears whole, "
                    "in one rename, only when the whole export succeeded; "
                    "a failed or interrupted export (Ctrl-C, SIGTERM) "
                    "leaves nothing. Exit 1 if an archive could not be "
                    "read (the others are exported).")
    export.add_argument("--format", choices=("jsonl", "parquet"),
                        default="jsonl",
                        help="JSON lines, or Parquet (needs pyarrow, the "
                             "parquet extra of shoebox-worker: pip install "
                             "pyarrow) (default: %(default)s)")
    export.add_argument("--compression", choices=("gzip", "zstd"),
                        default="gzip",
                        help="of the JSON lines (Parquet files are zstd "
                             "inside) (default: %(default)s)")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write into (made if missing; "
                             "files of earlier exports are kept)")
    export.add_argument("--mode", type=_mode, default="0600",
                        help="the files' permission bits, whatever the "
                             "umask; folders get the same with x where r "
                             "is set (default: %(default)s, folders 0700, "
                             "as archives; 0640 opens them to the group: "
                             "folders 0750)")
    select.add_arguments(export)
    export.add_argument("--salvage", action="store_true",
                        help="skip damaged records instead of stopping at "
                             "the first of an archive")
    _add_sources(export)
    export.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    export.set_defaults(func=run_export)

    bundle = subparsers.add_parser(
        "index-bundle", help="put the indexes of the archives under a Swift "
                             "prefix into one object",
        description="GET the index objects of the archives under PREFIX "
                    "and PUT them as one object, PREFIX.shoebox-index-bundle "
                    "(replacing an older one), so that a read pruned by "
                    "--where or --since/--until makes one GET instead of one "
                    "per archive. Archives replaced or added since are read "
                    "through their own index. Run it again (e.g. daily from "
                    "cron) once a prefix has its archives.")
    _add_sources(bundle)
    bundle.add_argument(
        "--per", choices=sorted(PERIODS, key=PERIODS.get),
        help="keep one bundle a period (UTC, of each archive's earliest "
             "record) under PREFIX.shoebox-index-bundles/, cut into parts "
             "by value: each run reads only the archives no bundle has "
             "yet and rewrites only the periods that changed (safe from a "
             "timer every few minutes: etc/shoebox-index-bundle.timer)")
    bundle.add_argument(
        "--field", action="append", default=[], metavar="PATH",
        help="with --per: a field whose values the bundles hold (repeat "
             "it; default: --config's [archive] index_fields, else the "
             "worker's defaults)")
    bundle.add_argument("spec", metavar="swift://CONTAINER[/PREFIX]")
    bundle.set_defaults(func=run_index_bundle)

    generate = subparsers.add_parser(
        "generate", help="publish synthetic nova notifications",
        description="Publish realistic synthetic nova notifications in the "
                    "oslo.messaging v2 envelope, as mandatory, with "
                    "publisher confirms (for demos, smoke and load tests); "
                    "print how many the broker confirmed. Exit 1 if it "
                    "returned any (no queue bound to the routing key) or "
                    "refused any. The notifications are random unless "
                    "--seed is given; --seed repeats all but their times, "
                    "--seed with --start repeats every byte.",
        epilog=URL_EPILOG)
    _add_url(generate)
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
    generate.add_argument("--seed", type=int, metavar="N",
                          help="seed of the simulator (default: a random "
                               "one, so each run differs); the same seed "
                               "gives the same notifications but for their "
                               "times, which start now unless --start")
    generate.add_argument("--start", type=parse_time, metavar="TIME",
                          help="ISO 8601 time of the first notification "
                               "(default: now; naive means UTC), e.g. "
                               "2024-03-01T12:00:00; with --seed every byte "
                               "repeats")
    generate.add_argument("--queue", metavar="NAME",
                          help="declare this queue and bind it with the "
                               "routing key first, so nothing is dropped "
                               "before a worker declares it")
    generate.set_defaults(func=run_generate)
