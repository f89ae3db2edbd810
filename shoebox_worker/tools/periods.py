"""``index-bundle --per PERIOD``: keep the period bundles of the archives
under a Swift prefix up to date (:mod:`shoebox_worker.period_bundle`),
from a timer, without an operator.

::

    shoebox-worker index-bundle --per month|day|year [--config FILE]
        [--jobs N] [--field PATH]... swift://CONTAINER[/PREFIX]

Each run lists the archives under PREFIX (page by page) and GETs one part
of each period bundle already there (``<PREFIX>.shoebox-index-bundles/
<period>/<part>-of-<parts>``), which names every archive the bundle
covers. Then:

* an archive no bundle covers (new, or replaced: its ETag changed) is
  read once, ``--jobs`` at a time (one GET, decompressed as it comes; its
  ETag must be the listing's), and filed under the period of its earliest
  record: its record count, time range and the fingerprints of its
  values at each field (the worker's ``index_fields``: ``--field``, else
  ``--config``'s ``[archive] index_fields``, else the defaults). An
  object with no record marker in any of its bytes (no archive, even to
  ``--salvage``) is recorded as holding no record (period ``untimed``:
  readers skip it unread), a damaged archive (or one whose first bytes
  hold no record, but later ones do) as left out (it prunes nothing:
  readers read it and report the damage); neither is read again while it
  is the same;
* a period that gained or lost archives is rebuilt: its archives already
  covered are taken from its parts (every part is read: each holds a
  share of the fingerprints), the others from what was just read; its
  parts are PUT (each one replaces its object whole) and the parts of
  the period's earlier cut (another number of parts) deleted after;
* a period nothing changed in costs its one GET, and nothing is written.

So running it every few minutes is cheap, and running it twice (or two
at once) gives bundles right on their own: each part is whole on its
own. An archive the first part of its period lacks is read again; one
that only another part lacks (or that parts disagree on) is read again
when its period is next rewritten (never rebuilt from part of its
values); until then a reader whose part lacks it prunes it by its own
index. Exit 1 when an archive could not be read or was replaced since
the listing (it is left for the next run, one line each) or a part
could not be written.
"""

import collections
import concurrent.futures

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import index as archive_index
from shoebox_worker import options
from shoebox_worker import period_bundle
from shoebox_worker import record
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.swift import layout
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import sources
from shoebox_worker.tools.read import MARKER_OVERLAP

__all__ = ["PART_CONTENT_TYPE", "cmd_period_bundles", "fields_of"]

#: The content type of period bundle parts.
PART_CONTENT_TYPE = "application/vnd.shoebox-period-bundle"


def fields_of(args):
    """The fields to summarise: ``--field``, else ``--config``'s
    ``[archive] index_fields`` (when it names any), else the defaults.

    :raises UsageError: a ``--field`` that ``index_fields`` would refuse
        (not a dotted path, or named twice: readers refuse such parts).
    """
    from shoebox_worker import config as config_mod
    if args.field:
        try:
            return config_mod.ARCHIVE_OPTIONS["index_fields"].parse(
                ", ".join(args.field))
        except options.OptionError as err:
            raise UsageError("--field: %s" % err) from None
    if args.config:
        fields = config_mod.load(args.config).archive.index_fields
        if fields:
            return tuple(fields)
    return archive_index.DEFAULT_FIELDS


class _Scope:
    """What the listing of ``container`` under ``prefix`` holds for the
    bundler: the archives (``{(name, ETag): size}``) and the parts of this
    prefix's period bundles (``{period: {parts: {part: name}}}``)."""

    def __init__(self, swift, container, prefix):
        self.archives = {}
        self.parts = collections.defaultdict(
            lambda: collections.defaultdict(dict))
        for entry in swift.entries(container, prefix):
            name = entry["name"]
            found = layout.period_bundle_of(name)
            if found is not None:
                if found[0] == prefix:
                    _, period, part, parts = found
                    self.parts[period][parts][part] = name
            elif sources.is_archive_entry(entry):
                self.archives[(name, sources.bound_etag(entry))] = \
                    entry.get("bytes")

    def cut(self, period):
        """``(parts, {part: name})`` of the period's bundle
        (:func:`~shoebox_worker.period_bundle.choose_cut`); None when the
        period has none."""
        cuts = self.parts.get(period)
        return period_bundle.choose_cut(cuts) if cuts else None


def _get_part(swift, container, name, keep=None):
    """The :class:`~shoebox_worker.period_bundle.Part` in object ``name``.

    :raises IndexError_: damaged, or not a part.
    :raises Exception: what swiftclient raises for a failed GET.
    """
    _, body = swift.connection().get_object(
        container, name, resp_chunk_size=sources.INDEX_CHUNK)
    try:
        return period_bundle.Part.from_chunks(
            body, sources.SCHEME + container + "/" + name, keep)
    finally:
        body.close()


def _summarise(swift, container, key, size, fields):
    """The :class:`~shoebox_worker.period_bundle.Summary` of one archive,
    from one GET of it; None when it could not be read (it is tried again
    next run)."""
    name, etag = key
    label = "%s%s/%s" % (sources.SCHEME, container, name)
    try:
        headers, body = swift.connection().get_object(
            container, name, resp_chunk_size=sources.GET_CHUNK)
    except Exception as exc:
        sources.warn("%s: cannot read: %s; left for the next run" % (
            label, sources.describe(exc)))
        return None
    try:
        got = headers.get("etag", "").strip('"')
        if got != etag:
            sources.warn("%s: replaced since the listing (ETag %s, not %s); "
                         "left for the next run" % (label, got, etag))
            return None
        stream = _Stream(body, label)
        try:
            with compression.open_read(stream) as raw:
                scanned = _Scanned(raw)
                try:
                    with archive.ArchiveReader(scanned,
                                               name=label) as reader:
                        return period_bundle.Summary.of_records(
                            name, etag, size, reader, fields)
                except exceptions.RecordError as exc:
                    if exc.offset != 0 or scanned.holds_marker():
                        raise
                # no record marker in any of its bytes: no archive, to a
                # read of the listing nor to --salvage; skipped unread
                return period_bundle.Summary(name, etag, size)
        except (exceptions.RecordError, ValueError,
                *compression.DECOMPRESS_ERRORS):
            if stream.broken:
                raise stream.broken from None
            return period_bundle.Summary.left_out(name, etag, size)
    except OSError as exc:
        sources.warn("%s: cannot read: %s; left for the next run" % (
            label, exc.strerror or exc))
        return None
    finally:
        body.close()


class _Scanned:
    """``raw`` (an object's uncompressed bytes) as a binary file object
    read front to back, noting whether a record marker is in the bytes
    read (:meth:`holds_marker`). Only an object with none in any of its
    bytes is no archive: ``--salvage`` reads the records after a first
    one damaged, however long (not only the first
    :data:`~shoebox_worker.tools.sources.SNIFF_BYTES` a listing's reader
    looks at)."""

    def __init__(self, raw):
        self._raw = raw
        self._tail = b""  # the last bytes read, which may start a marker
        self._marker = False

    def readable(self):
        return True

    def read(self, size=-1):
        data = self._raw.read(size)
        if data and not self._marker:
            seen = self._tail + data
            self._marker = record.find_marker(seen, 0) >= 0
            self._tail = seen[-MARKER_OVERLAP:]
        return data

    read1 = read

    def holds_marker(self):
        """Whether any byte holds a record marker (reads to the end)."""
        while not self._marker and self.read(sources.GET_CHUNK):
            pass
        return self._marker

    def close(self):
        pass  # the caller's ``raw``: closed by the caller


class _Stream:
    """A GET's body as a binary file object, read front to back; a
    download that broke off is an ``OSError`` (kept in :attr:`broken`),
    not taken for damage."""

    def __init__(self, body, name):
        self._chunks = iter(body)
        self._pending = memoryview(b"")
        self.name = name
        self.broken = None

    def readable(self):
        return True

    def read(self, size=-1):
        if not self._pending:
            try:
                chunk = next(self._chunks, b"")
            except Exception as exc:
                self.broken = OSError("the download broke off: %s" % (
                    sources.describe(exc),))
                raise self.broken from None
            if not chunk:
                return b""
            self._pending = memoryview(chunk)
        if size is None or size < 0:
            size = len(self._pending)
        data = self._pending[:size]
        self._pending = self._pending[size:]
        return bytes(data)

    read1 = read

    def close(self):
        pass


def cmd_period_bundles(args):
    """Bring the period bundles of ``args.spec`` up to date; print one
    line per period written and a summary line."""
    container, prefix = sources.parse_spec(args.spec)
    fields = fields_of(args)
    with sources.Swift(config_file=args.config) as swift:
        scope = _Scope(swift, container, prefix)
        covered = {}  # (name, etag) -> period, from one part a period
        stale = set()  # periods whose bundle is rebuilt from its archives
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=args.jobs,
                thread_name_prefix="shoebox-bundle") as pool:
            periods = sorted(scope.parts)
            for period, part in zip(periods, pool.map(
                    lambda p: _first_part(swift, container, scope, p),
                    periods), strict=True):
                if part is None or part.fields != fields:
                    stale.add(period)
                    continue
                for key in list(part.entries) + list(part.left_out):
                    covered[key] = period
            new = [key for key in scope.archives if key not in covered]
            summaries = list(pool.map(
                lambda key: _summarise(swift, container, key,
                                       scope.archives[key], fields), new))
        failed = any(s is None for s in summaries)
        by_period = collections.defaultdict(list)
        for summary in summaries:
            if summary is not None:
                by_period[period_bundle.period_of(summary.earliest,
                                                  args.per)].append(summary)
        stale.update(period for key, period in covered.items()
                     if key not in scope.archives)
        written = 0
        for period in sorted(set(by_period) | stale):
            try:
                line = _rebuild(swift, container, prefix, scope, period,
                                by_period[period], fields)
            except ToolError as err:
                sources.warn(str(err))
                failed = True
                continue
            written += 1
            print(line)
    print("%s%s/%s: %d archives, %d read now, %d period%s written, %d "
          "unchanged" % (sources.SCHEME, container,
                         prefix + layout.PERIOD_FOLDER, len(scope.archives),
                         sum(s is not None for s in summaries), written,
                         "" if written == 1 else "s",
                         len(set(scope.parts) - set(by_period) - stale)))
    return EXIT_FAILURE if failed else EXIT_OK


def _first_part(swift, container, scope, period):
    """The first part of ``period``'s bundle (it names every archive the
    bundle covers); None (the period is rebuilt from its archives) when
    it cannot be read."""
    _, names = scope.cut(period)
    name = names[min(names)]
    try:
        return _get_part(swift, container, name)
    except Exception as exc:  # damaged, gone: rebuilt from the archives
        sources.warn("%s%s/%s: %s; its archives are read again" % (
            sources.SCHEME, container, name, exc if isinstance(
                exc, exceptions.IndexError_) else sources.describe(exc)))
        return None


def _rebuild(swift, container, prefix, scope, period, fresh, fields):
    """Write the bundle of ``period``: its covered archives still listed
    (from every part of its cut) and ``fresh`` summaries; delete the parts
    of its other cuts. Returns the line to print.

    :raises ToolError: a part could not be written.
    """
    carried, missing = _carry(swift, container, scope, period, fields)
    fresh_keys = {s.key for s in fresh}
    summaries = [s for key, s in carried.items()
                 if key in scope.archives and key not in fresh_keys]
    summaries += fresh
    if missing:  # read again: never rebuilt from part of their values
        summaries += [s for s in (
            _summarise(swift, container, key, scope.archives[key], fields)
            for key in missing if key not in fresh_keys) if s is not None]
        # (one not read now is covered by no bundle: read by its index)
    old = {name for cut in scope.parts.get(period, {}).values()
           for name in cut.values()}
    made = set()
    if summaries:
        built = period_bundle.build_parts(period, fields, summaries)
        for part, parts, data in built:
            name = layout.period_bundle_name(prefix, period, part, parts)
            try:
                swift.connection().put_object(
                    container, name, data, content_type=PART_CONTENT_TYPE)
            except Exception as exc:
                raise ToolError("%s%s/%s: cannot write: %s" % (
                    sources.SCHEME, container, name,
                    sources.describe(exc))) from None
            made.add(name)
    for name in sorted(old - made):
        try:
            swift.connection().delete_object(container, name)
        except Exception as exc:  # noqa: BLE001 - a reader skips it
            if getattr(exc, "http_status", None) != 404:
                sources.warn("%s%s/%s: cannot delete: %s" % (
                    sources.SCHEME, container, name, sources.describe(exc)))
    left = sum(s.state == period_bundle.LEFT_OUT for s in summaries)
    return "%s%s/%s%s%s/: %d archives (%d read now%s), %d part%s" % (
        sources.SCHEME, container, prefix, layout.PERIOD_FOLDER, period,
        len(summaries), len(fresh), ", %d left out" % left if left else "",
        len(made), "" if len(made) == 1 else "s")


def _carry(swift, container, scope, period, fields):
    """``({key: Summary}, [keys to read again])``: the archives of
    ``period``'s bundle with all their values (the union of every part of
    its cut); an archive some part lacks, or that parts disagree on
    (left out in one, summarised in another: two runs' parts), or every
    archive when a part cannot be read or summarises other fields, is to
    be read again."""
    cut = scope.cut(period)
    if cut is None:
        return {}, []
    parts, names = cut
    found = {}
    seen = collections.Counter()
    mixed = set()  # summarised in a part, left out in another
    readable = len(names) == parts
    for part in range(parts):
        if not readable:
            break
        try:
            got = _get_part(swift, container, names[part])
        except Exception:  # noqa: BLE001 - its archives are read again
            readable = False
            break
        if got.fields != tuple(fields) or got.parts != parts or \
                got.part != part:
            readable = False
            break
        for key, entry in got.entries.items():
            seen[key] += 1
            if key not in found:
                found[key] = entry.summary()
            elif found[key].state == period_bundle.LEFT_OUT:
                mixed.add(key)
            else:
                for values, more in zip(found[key].values,
                                        entry.fingerprints, strict=True):
                    values.update(more)
        for key, size in got.left_out.items():
            seen[key] += 1
            if key in found and found[key].state != period_bundle.LEFT_OUT:
                mixed.add(key)
            found[key] = period_bundle.Summary.left_out(*key, size)
    listed = [key for key in found if key in scope.archives]
    if not readable:
        return {}, listed
    whole = {key: found[key] for key in listed
             if seen[key] == parts and key not in mixed}
    return whole, [key for key in listed if key not in whole]
