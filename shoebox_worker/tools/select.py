"""What to keep: the selection options of ``cat`` and ``replay``.

A :class:`Selection` is built from the command line (:func:`add_arguments`,
:func:`from_args`) and answers two questions:

* :meth:`Selection.may_hold`: can this archive hold a selected record at
  all? False only when its index, bound to this very archive
  (:func:`shoebox_worker.index.binding_problem`), proves that it cannot;
  anything unknown is True. An index not bound to the archive, and a Swift
  object's ``Earliest-Timestamp``/``Latest-Timestamp`` metadata (which a
  POST changes without changing the object), prove nothing
  (docs/reading.md, "What pruning trusts"). The archive's time range is
  the min and max over *all* its records' times, not its first and last
  record's, so an archive of late records (older than its neighbours) is
  never pruned by mistake (docs/reading.md, "Selecting by time").
* :meth:`Selection.keep`: is this record selected? In this order, cheapest
  first: ``--match`` (metadata globs), ``--since``/``--until`` (the
  record's ``timestamp`` metadata, read by
  :func:`~shoebox_worker.timestamps.record_time`, the same reading as the
  archive's time range), ``--where`` (globs on the notification's own JSON,
  parsed once per record and only when a ``--where`` is given), then
  ``--dedup`` (a record whose ``message_id`` was already kept is dropped).
  A ``--where`` whose glob holds a literal that the payload's bytes lack
  skips the parse (:func:`_needle` says when that is sure).

The window is half-open, ``[since, until)``. A record whose time does not
parse cannot be shown to be in a window: it is left out when one is given,
and counted (:attr:`Selection.untimed`), so that the tools can say so.
"""

import argparse
import datetime
import fnmatch
import re

from shoebox_worker import exceptions
from shoebox_worker import index
from shoebox_worker import timestamps
from shoebox_worker.options import did_you_mean
from shoebox_worker.tools import UsageError

__all__ = [
    "Selection",
    "add_arguments",
    "from_args",
    "matcher",
    "parse_match",
    "parse_when",
    "parse_where",
    "value_text",
]

#: ``--since 2h``: a number and a unit, back from now.
_RELATIVE = re.compile(r"(\d+)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Characters that make a glob more than one exact value.
_GLOB_CHARS = frozenset("*?[")


# -- parsing the options ------------------------------------------------------

def parse_when(text, now=None):
    """``--since``/``--until``: ISO 8601 (naive means UTC) or ``30m``,
    ``2h``, ``7d``, ``2w`` (also ``s``) back from ``now``; an aware UTC
    datetime, or a usage error (argparse ``type=``)."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        now = now or datetime.datetime.now(datetime.UTC)
        try:
            return now - datetime.timedelta(
                seconds=int(relative.group(1)) * _UNITS[relative.group(2)])
        except OverflowError:
            raise argparse.ArgumentTypeError(
                "too far back: %r" % text) from None
    moment = timestamps.parse(text)
    if moment is None:
        raise argparse.ArgumentTypeError(
            "not a time: %r (ISO 8601, naive means UTC, e.g. "
            "2024-03-01T12:00:00 or 2024-03-01T12:00:00+01:00; or back "
            "from now: 30m, 2h, 7d, 2w)" % text)
    return moment


def _glob(glob):
    return re.compile(fnmatch.translate(glob), re.DOTALL).match


def parse_match(text):
    """``--match KEY=GLOB`` -> ``(key, test)``; for argparse ``type=``."""
    key, sep, glob = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            "expected KEY=GLOB (e.g. event_type=compute.*), got %r" % text)
    return key, _glob(glob)


def parse_where(text):
    """``--where PATH=GLOB`` -> ``(path, glob, test)``: a dotted path into
    the notification's JSON; for argparse ``type=``."""
    path, sep, glob = text.partition("=")
    if not sep or not path or "" in path.split("."):
        raise argparse.ArgumentTypeError(
            "expected PATH=GLOB with a dotted PATH into the notification "
            "(e.g. payload.instance_id=2f50*), got %r" % text)
    return path, glob, _glob(glob)


def matcher(matches):
    """One predicate over metadata: every ``(key, test)`` of ``matches``
    (from :func:`parse_match`) must match; None when there are none."""
    if not matches:
        return None
    matches = tuple(matches)

    def match(metadata):
        for key, test in matches:
            value = metadata.get(key)
            if value is None or test(value) is None:
                return False
        return True
    return match


# -- the notification's JSON --------------------------------------------------

#: A JSON value as ``--where`` compares it: a string as it is, anything
#: else (number, boolean, object, array) as its compact JSON text (``42``,
#: ``true``, ``1.5``), as the index stores it. A missing or null value is
#: never compared: it matches no ``--where``, and the index holds none.
value_text = index.value_text
#: The payload's JSON object as ``--where`` reads it, or None: the
#: reading the worker indexes (one parser, one fallback).
_notification = index.notification_of


#: Characters that JSON may write otherwise than as they are (in objects,
#: arrays, escapes), and those of a number's text (which JSON may write in
#: other forms: ``1e3``, ``1000.0``).
_STRUCTURAL = frozenset('{}[],:"\\')
_NUMERIC = frozenset("0123456789.eE+-")
#: Shortest literal worth a search of the payload.
_MIN_NEEDLE = 3


def _needle(glob):
    """Bytes that the payload holds, when it has no backslash, whenever a
    value matching ``glob`` is in it; None when there are none to be sure
    of. The longest literal run of the glob qualifies when it cannot be
    part of a number's text nor be written otherwise in JSON: then a value
    whose text holds it is a string (its bytes as they are, unless
    escaped: hence no backslash), ``true``/``false`` (as they are), or an
    object or array holding such. (``null`` is left out: a value that
    orjson writes back as ``null`` may be ``1e400`` in the payload.)"""
    if "[" in glob:
        return None  # a character class is no literal
    best = max(re.split(r"[*?]", glob), key=len)
    if len(best) < _MIN_NEEDLE or _STRUCTURAL.intersection(best) \
            or set(best) <= _NUMERIC or best in "null":
        return None
    return best.encode("utf-8")


# -- the selection ------------------------------------------------------------

class Selection:
    """What ``cat`` and ``replay`` keep (see the module's docstring).

    :param since: aware datetime or None: records at or after it.
    :param until: aware datetime or None: records before it.
    :param where: ``(path, glob, test)`` triples (:func:`parse_where`),
        all of which must match the notification's JSON.
    :param match: ``(key, test)`` pairs (:func:`parse_match`), all of
        which must match the metadata.
    :param dedup: drop records whose ``message_id`` was already kept.
    :param load_index: ``load_index(data, name)`` turns the bytes of an
        archive's index (named ``name`` in messages) into an object with
        ``fields``, ``may_contain(field, value)``, ``earliest``,
        ``latest`` (``shoebox_worker.index.Index.from_bytes``), raising a
        ShoeboxError for a damaged one; None: indexes are not read. An
        index prunes only when the item finds it bound to the archive
        (:meth:`may_hold`).

    ``keep(metadata, payload)`` is made once, for the options given (a
    plain attribute: the tools' hot loop calls it per record).

    :raises UsageError: ``since`` is not before ``until``.
    """

    def __init__(self, *, since=None, until=None, where=(), match=(),
                 dedup=False, load_index=None):
        if since is not None and until is not None and since >= until:
            raise UsageError(
                "--since (%s) must be before --until (%s)" % (
                    timestamps.to_text(since), timestamps.to_text(until)))
        self.since = since
        self.until = until
        self.where = list(where)
        self.match = list(match)
        self.dedup = dedup
        self.load_index = load_index
        #: Records left out because their time does not parse (a window
        #: was given).
        self.untimed = 0
        #: Records dropped as duplicates (``--dedup``).
        self.duplicates = 0
        self._seen = set()
        #: ``--match`` keys and ``--where`` paths not found in any record
        #: read yet (a misspelled one finds nothing: :meth:`notes` says
        #: so), and how many records were looked at for them
        self.unseen = {("--match", key): None for key, _ in self.match}
        self.unseen.update({("--where", path): path.split(".")
                            for path, _, _ in self.where})
        self.looked_at = 0
        self._metadata_keys = set()
        self.keep = self._make_keep()

    @property
    def active(self):
        """Whether any option selects: False means every record is kept."""
        return bool(self.match or self.where or self.dedup
                    or self.windowed)

    @property
    def windowed(self):
        return self.since is not None or self.until is not None

    @property
    def exact(self):
        """``(path, value)`` of each ``--where`` without glob characters:
        what an index can rule out."""
        return [(path, glob) for path, glob, _ in self.where
                if not _GLOB_CHARS.intersection(glob)]

    def options(self):
        """The options given, for messages (``--match, --since``)."""
        given = [("--match", self.match), ("--since", self.since is not None),
                 ("--until", self.until is not None), ("--where", self.where),
                 ("--dedup", self.dedup)]
        return ", ".join(name for name, on in given if on)

    def notes(self):
        """Lines worth saying on stderr after a read (may be empty)."""
        lines = []
        if self.untimed:
            lines.append("%d record%s without a usable timestamp left out "
                         "by --since/--until" % (
                             self.untimed, "" if self.untimed == 1 else "s"))
        if self.duplicates:
            lines.append("%d duplicate%s dropped by --dedup" % (
                self.duplicates, "" if self.duplicates == 1 else "s"))
        if self.looked_at:
            for (option, key), parts in self.unseen.items():
                where = "metadata" if parts is None else "notification"
                lines.append(
                    "%s %s: no record read has %s in its %s (%d read): a "
                    "misspelled key finds nothing%s" % (
                        option, key, "the key %r" % key if parts is None
                        else "a value at %r" % key, where, self.looked_at,
                        self._suggestion(option, key)))
        return lines

    def _suggestion(self, option, key):
        """`` (did you mean K?)`` among the metadata keys the records read
        had (``--match``)."""
        if option != "--match":
            return ""
        return did_you_mean(key, sorted(self._metadata_keys))

    def _look_for_keys(self, metadata, payload):
        """Strike off the selection keys this record has (only while some
        are not seen yet).

        :returns: the notification, when it had to be parsed (None
            otherwise, or when it is not a JSON object)."""
        self.looked_at += 1
        self._metadata_keys.update(metadata)
        note = None
        for entry, parts in list(self.unseen.items()):
            if parts is None:
                if entry[1] in metadata:
                    del self.unseen[entry]
                continue
            # a key's bytes absent from a payload without escapes: not in
            # it (no parse)
            if b"\\" not in payload and \
                    parts[-1].encode("utf-8") not in payload:
                continue
            if note is None:
                note = _notification(payload) or {}
            if index.lookup(note, parts) is not None:
                del self.unseen[entry]
        return note or None

    # -- pruning archives ----------------------------------------------

    def may_hold(self, item, on_unused=None):
        """False only when ``item`` (an archive: ``index_name``,
        ``index_label``, ``read_index()``, ``binding_problem(index)``, and
        maybe ``summary``, its period bundle entry, used instead of its
        index) provably holds no record this selection keeps: its index
        (or entry) rules it out and is bound to it.

        :param on_unused: called as ``on_unused(item, error)`` when the
            item has an index that cannot be read or used (an OSError, a
            ShoeboxError: damaged, too long, or not bound to the item);
            the item may hold then. Once per item at most.
        """
        summary = getattr(item, "summary", None)
        if self.load_index is None or (
                summary is None and getattr(item, "index_name", None)
                is None) or not (self.exact or self.windowed):
            return True
        try:
            if summary is not None:  # a period bundle's entry: as an index
                index = summary
            else:
                data = item.read_index()
                index = self.load_index(data, item.index_label) \
                    if data is not None else None
            if index is None or not self._rules_out(index):
                return True
            # only an index that would prune is checked: for a file,
            # that hashes it
            problem = item.binding_problem(index)
            if problem is None:
                return False
            raise exceptions.IndexError_("%s: %s" % (item.index_label,
                                                     problem))
        except (exceptions.ShoeboxError, OSError) as err:
            if on_unused is not None:
                on_unused(item, err)
            return True  # an unusable or unbound index proves nothing

    def _rules_out(self, index):
        """Does ``index`` say that its archive holds no record kept?"""
        if getattr(index, "records", None) == 0:
            return True  # no record at all: an index of no record, or a
            # period bundle's entry of an object that holds none
        if self.windowed and self._misses(getattr(index, "earliest", None),
                                          getattr(index, "latest", None)):
            return True
        fields = set(index.fields)
        return not all(index.may_contain(path, value)
                       for path, value in self.exact if path in fields)

    def _misses(self, earliest, latest):
        """True when the time range ``[earliest, latest]`` (texts) is known
        and lies wholly outside ``[since, until)``."""
        first, last = timestamps.parse(earliest), timestamps.parse(latest)
        if first is None or last is None or first > last:
            return False  # unknown, or not a range: prove nothing
        if self.until is not None and first >= self.until:
            return True
        return self.since is not None and last < self.since

    # -- keeping records -----------------------------------------------

    def _make_keep(self):
        match = matcher(self.match)
        since, until = self.since, self.until
        windowed = self.windowed
        where = [(path.split("."), test) for path, _, test in self.where]
        needles = [n for n in (_needle(glob) for _, glob, _ in self.where)
                   if n is not None]
        dedup, seen = self.dedup, self._seen
        record_time = timestamps.record_time
        unseen, look_for_keys = self.unseen, self._look_for_keys

        def keep(metadata, payload):
            parsed = look_for_keys(metadata, payload) if unseen else None
            if match is not None and not match(metadata):
                return False
            if windowed:
                moment = record_time(metadata)
                if moment is None:
                    self.untimed += 1
                    return False
                if (since is not None and moment < since) or (
                        until is not None and moment >= until):
                    return False
            note = parsed
            if where:
                if needles and b"\\" not in payload:
                    for needle in needles:  # cannot match: skip the parse
                        if needle not in payload:
                            return False
                if note is None:
                    note = _notification(payload)
                if note is None:
                    return False
                for parts, test in where:
                    value = index.lookup(note, parts)
                    if value is None or test(value_text(value)) is None:
                        return False
            if dedup:
                message_id = metadata.get("message_id")
                if message_id is None:
                    if note is None:
                        note = _notification(payload)
                    if note is not None:
                        message_id = note.get("message_id")
                    if not isinstance(message_id, str):
                        return True  # no id: cannot be a known duplicate
                if message_id in seen:
                    self.duplicates += 1
                    return False
                seen.add(message_id)
            return True
        return keep


# -- the command line ---------------------------------------------------------

def add_arguments(parser):
    """Add ``--match``, ``--since``, ``--until``, ``--where`` and
    ``--dedup`` to a subcommand's parser."""
    parser.add_argument(
        "--match", action="append", type=parse_match, default=[],
        metavar="KEY=GLOB",
        help="only records whose metadata KEY matches the shell-style "
             "GLOB (e.g. event_type='compute.instance.*'); repeat it: all "
             "must match")
    parser.add_argument(
        "--since", type=parse_when, metavar="TIME",
        help="only records whose timestamp is at or after TIME: ISO 8601 "
             "(naive means UTC), or back from now: 30m, 2h, 7d, 2w. "
             "Records whose timestamp does not parse are left out (and "
             "counted on stderr) when --since or --until is given")
    parser.add_argument(
        "--until", type=parse_when, metavar="TIME",
        help="only records whose timestamp is before TIME (as --since)")
    parser.add_argument(
        "--where", action="append", type=parse_where, default=[],
        metavar="PATH=GLOB",
        help="only records whose notification JSON has a value at the "
             "dotted PATH matching GLOB (e.g. payload.instance_id='2f50*', "
             "_context_project_id=884691); numbers and booleans compare as "
             "their JSON text, a missing or null value never matches; a key "
             "holding dots is found too; repeat it: "
             "all must match")
    parser.add_argument(
        "--dedup", action="store_true",
        help="drop records whose message_id was already output (exact: "
             "every distinct id is kept in memory, about 130 bytes each, "
             "130 MB for a million); records without one are kept")


def from_args(args, load_index=index.Index.from_bytes):
    """The :class:`Selection` of parsed arguments (:func:`add_arguments`);
    archives' indexes are read with ``load_index``.

    :raises UsageError: ``--since`` is not before ``--until``.
    """
    return Selection(since=args.since, until=args.until, where=args.where,
                     match=args.match, dedup=args.dedup,
                     load_index=load_index)
