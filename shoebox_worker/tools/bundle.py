"""``index-bundle``: one object holding the indexes of the archives under a
prefix in Swift, so that a pruned read makes one GET instead of one per
archive (:func:`shoebox_worker.tools.sources.load_bundles` reads it).

::

    shoebox-worker index-bundle [--config FILE] [--jobs N]
        [--per year|month|day [--field PATH]...] swift://CONTAINER[/PREFIX]

It lists the archives under PREFIX, GETs their ``.index`` objects
``--jobs`` at a time and PUTs the bundle (:func:`shoebox_worker.index.
build_bundle`) as ``PREFIX.shoebox-index-bundle``: one PUT, which
replaces the whole object, so a reader sees the old bundle or the new
one. Run it again (from cron, once a prefix is complete, e.g. daily for
the day before's prefix) and the bundle is rebuilt from what is there.

With ``--per year|month|day`` it keeps one bundle a period instead
(:mod:`shoebox_worker.tools.periods`), from a timer.

An archive is left out (and read through its own index) when it has no
index object, when its index is older than it (the swift step uploads the
index after the archive: the new index may not be there yet), or when
the GET of its index fails or returns another ETag than the listing, or
when its index is not one or longer than a reader takes
(:func:`shoebox_worker.index.size_limit`).
"""

import concurrent.futures

from shoebox_worker import index as archive_index
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import sources

__all__ = ["BUNDLE_CONTENT_TYPE", "bundle_name", "cmd_index_bundle"]

#: The content type of bundle objects.
BUNDLE_CONTENT_TYPE = "application/vnd.shoebox-index-bundle"


def bundle_name(prefix):
    """The bundle object of the archives under ``prefix``."""
    return prefix + archive_index.BUNDLE_SUFFIX


def _fetch(swift, container, archive, index_entry):
    """``(name, hash, index bytes)`` of one archive, or None (an index
    longer than a reader takes is left out: its archive is read)."""
    try:
        headers, data = sources.get_bounded(
            swift.connection(), container, index_entry["name"],
            archive_index.size_limit, listed=index_entry.get("bytes"))
    except Exception:  # gone since the listing: its reader GETs it
        return None
    if headers.get("etag", "").strip('"') != index_entry.get("hash"):
        return None  # replaced since the listing
    return archive["name"], archive.get("hash"), data


def cmd_index_bundle(args):
    """Write the bundle (or, with ``--per``, the period bundles); print
    what it covers."""
    spec = args.spec
    if not spec.startswith(sources.SCHEME):
        raise UsageError("%s: expected swift://CONTAINER[/PREFIX]" % spec)
    if getattr(args, "per", None):
        from shoebox_worker.tools import periods
        return periods.cmd_period_bundles(args)
    if getattr(args, "field", None):
        raise UsageError("--field goes with --per")
    container, prefix = sources.parse_spec(spec)
    with sources.Swift(config_file=args.config) as swift:
        listing = swift.list(container, prefix)
        by_name = {entry["name"]: entry for entry in listing}
        archives = [e for e in listing if sources.is_archive_entry(e)]
        todo = []
        for entry in archives:
            own = by_name.get(entry["name"] + archive_index.SUFFIX)
            if own is not None and own.get("last_modified", "") >= \
                    entry.get("last_modified", ""):
                todo.append((entry, own))
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=args.jobs,
                thread_name_prefix="shoebox-bundle") as pool:
            found = [e for e in pool.map(
                lambda pair: _fetch(swift, container, *pair), todo) if e]
        name = bundle_name(prefix)
        try:
            swift.connection().put_object(
                container, name, archive_index.build_bundle(found),
                content_type=BUNDLE_CONTENT_TYPE)
        except Exception as exc:
            raise ToolError("%s%s/%s: cannot write: %s" % (
                sources.SCHEME, container, name,
                sources.describe(exc))) from None
    print("%s%s/%s: the indexes of %d of %d archives" % (
        sources.SCHEME, container, name, len(found), len(archives)))
    return EXIT_OK
