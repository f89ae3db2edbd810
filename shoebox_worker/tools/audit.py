"""``shoebox-worker verify --chain --public-key FILE... STORE``: the
command around :func:`shoebox_worker.integrity.audit.audit`.

STORE is ``swift://CONTAINER[/PREFIX]`` (archives under PREFIX are
checked; every chain under ``--digest-prefix`` is walked). The
container is listed once; each digest is read (at most
:data:`DIGEST_LIMIT` bytes), each archive a digest lists is HEADed
(``--jobs`` at a time) and, with ``--deep``, read and hashed. One line
per finding, then one per chain and a summary; ``--json`` prints one
object instead. Exit 1 on any failure (see the audit module).
"""

import json

from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.integrity import audit as audit_mod
from shoebox_worker.integrity import keys
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import sources

__all__ = ["cmd_verify_chain", "DIGEST_LIMIT"]

#: A digest object longer than this is not read (a hostile one).
DIGEST_LIMIT = 64 << 20
#: Bytes asked at a time when ``--deep`` reads an archive.
DEEP_CHUNK = 1 << 20


def _pinned(paths):
    if not paths:
        raise UsageError("--chain needs --public-key FILE (the signing.pub "
                         "of each worker whose chain you trust)")
    pinned = []
    for path in paths:
        try:
            pinned.append(keys.public_text(keys.load_public(path)))
        except keys.KeyError_ as err:
            raise UsageError(str(err)) from None
    return pinned


def cmd_verify_chain(args):
    """Walk the chains in the store ``args.paths[0]``."""
    if len(args.paths) != 1 or not args.paths[0].startswith(sources.SCHEME):
        raise UsageError("--chain takes one store: swift://CONTAINER"
                         "[/PREFIX]")
    pinned = _pinned(args.public_key)
    container, prefix = sources.parse_spec(args.paths[0])
    with sources.Swift(config_file=args.config) as swift:
        listing = swift.entries(container, "")

        def get(name):
            _, data = sources.get_bounded(swift.connection(), container, name,
                                          lambda head: DIGEST_LIMIT)
            return bytes(data)

        def head(name):
            try:
                return swift.connection().head_object(container, name)
            except Exception as exc:
                if getattr(exc, "http_status", None) == 404:
                    return None
                raise

        def deep(name):
            _, body = swift.connection().get_object(
                container, name, resp_chunk_size=DEEP_CHUNK)
            try:
                return audit_mod.sha256_of_stream(body)
            finally:
                body.close()

        result = audit_mod.audit(
            listing, get, head, pinned, digest_prefix=args.digest_prefix,
            prefix=prefix, deep=deep if args.deep else None,
            since=args.since, until=args.until, jobs=args.jobs,
            is_archive=sources.is_archive_entry, expect=args.expect or ())
    if args.json:
        print(json.dumps(_as_json(result), indent=1, sort_keys=True))
    else:
        for line in _lines(result):
            print(line)
    return EXIT_FAILURE if result.failed else EXIT_OK


def _share(result):
    return (100.0 * result.bytes_read / result.archive_bytes
            if result.archive_bytes else 0.0)


def _lines(result):
    for finding in result.findings:
        yield finding.line()
    for chain in result.chains:
        age = chain["age_seconds"]
        yield ("CHAIN %s: %s:%s, digests %d-%d, %d archive(s), last digest "
               "%s (%s ago)%s%s; head %s" % (
                   chain["chain"], chain["host"], chain["directory"],
                   chain["first_seq"], chain["last_seq"], chain["archives"],
                   chain["last_digest"],
                   "?" if age is None else _age(age),
                   ", ended by a clean stop" if chain["final"] else "",
                   "; started: %s" % chain["start"] if chain["start"] else "",
                   chain["head"]))
    failures = sum(f.failure for f in result.findings)
    yield ("%s: %d chain(s), %d digest(s), %d archive(s) listed; %d "
           "problem(s); read %d bytes (%.2f%% of the archives' %d)" % (
               "FAILED" if failures else "OK", len(result.chains),
               result.digests, result.archives, failures, result.bytes_read,
               _share(result), result.archive_bytes))


def _age(seconds):
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    if seconds < 172800:
        return "%.1f h" % (seconds / 3600)
    return "%.1f days" % (seconds / 86400)


def _as_json(result):
    return {
        "ok": not result.failed,
        "findings": [{"kind": f.kind, "name": f.name, "message": f.message,
                      "failure": f.failure} for f in result.findings],
        "chains": result.chains,
        "digests": result.digests,
        "archives": result.archives,
        "archive_bytes": result.archive_bytes,
        "bytes_read": result.bytes_read,
        "read_percent": round(_share(result), 4),
    }
