"""Record times: the one reading of a record's ``timestamp`` metadata.

The worker copies the notification's own ``timestamp`` into each record's
metadata (oslo.messaging writes ``2024-03-01 12:00:00.123456``, naive UTC).
Everything that orders records in time reads it here, the same way: the
archive's time range (:class:`Span`, kept by the writer and by
:func:`~shoebox_worker.archive.inspect_file`), the Swift object's name and
metadata, and the tools' ``--since``/``--until``. A record that one of them
takes for "no time" is "no time" for all of them, so a time range computed
at roll time can never leave out a record that a window later selects.

:func:`record_time` is best effort and never raises: a value that is not a
plausible time (not a string, longer than :data:`MAX_LENGTH`, not printable
ASCII, not ISO 8601, out of range once in UTC, before 1970 or after 2999)
is None. Naive times are UTC.

:func:`to_text` writes a time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: fixed
width, so these strings sort as the times they name.
"""

import datetime
import re

__all__ = ["MAX_LENGTH", "OSLO_FORM", "YEARS", "Span", "normalise", "parse",
           "record_time", "to_text"]

#: A ``timestamp`` longer than this is not one (ISO 8601 with microseconds
#: and an offset is 32 characters).
MAX_LENGTH = 40
#: Times outside these years are taken for garbage.
YEARS = (1970, 2999)

_UTC = datetime.UTC
_fromisoformat = datetime.datetime.fromisoformat


def parse(value):
    """A timestamp string as an aware UTC datetime, or None when it is not
    a plausible one (see the module's docstring). Never raises."""
    if not isinstance(value, str) or len(value) > MAX_LENGTH \
            or not value.isascii() or not value.isprintable():
        return None
    text = value.strip()
    try:
        moment = _fromisoformat(text)
        if moment.tzinfo is None:
            try:  # ten times faster than .replace(tzinfo=...)
                aware = _fromisoformat(text + "+00:00")
            except ValueError:
                aware = moment
            # a date alone takes no offset (or drops it)
            moment = aware if aware.tzinfo is not None else \
                moment.replace(tzinfo=_UTC)
        elif moment.utcoffset():
            moment = moment.astimezone(_UTC)
    except (ValueError, OverflowError):
        return None
    if not YEARS[0] <= moment.year <= YEARS[1]:
        return None
    return moment


_OSLO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}"
                   r"\.[0-9]{6}")
#: oslo's own form exactly, ``YYYY-MM-DD HH:MM:SS.ffffff`` (a space, six
#: digits, no offset): texts of this form order as the times they name
#: (those that are times: :func:`normalise` says), so a writer may keep
#: their least and greatest as text. Its ``fullmatch`` tells; a text of
#: the same length may be another form (``2024-03-01 12:00:00.1-1200``).
OSLO_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:"
                       r"[0-9]{2}\.[0-9]{6}")


def _oslo(value):
    """The normalised form of oslo's own ``YYYY-MM-DD HH:MM:SS.ffffff``
    (or with a ``T``), cheaply (text comparisons; a calendar only for days
    past the 28th), or None when ``value`` is not exactly that or not a
    real time (the general path then decides)."""
    if not (len(value) == 26 and value[10] in " T"
            and _OSLO.fullmatch(value)
            and "1970" <= value[:4] <= "2999"
            and "01" <= value[5:7] <= "12" and "01" <= value[8:10] <= "31"
            and value[11:13] <= "23" and value[14:16] <= "59"
            and value[17:19] <= "59"):
        return None
    if value[8:10] > "28":
        try:  # February 30th, April 31st...
            datetime.date(int(value[:4]), int(value[5:7]), int(value[8:10]))
        except ValueError:
            return None
    return "%sT%sZ" % (value[:10], value[11:])


def normalise(value):
    """``to_text(parse(value))``, quicker for oslo's own form: a record's
    ``timestamp`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, or None. Never
    raises."""
    if isinstance(value, str):
        fast = _oslo(value)
        if fast is not None:
            return fast
    return to_text(parse(value))


def record_time(metadata):
    """The ``timestamp`` of a record's metadata as an aware UTC datetime,
    or None (no metadata dict, no timestamp, or not a plausible one)."""
    if not isinstance(metadata, dict):
        return None
    return parse(metadata.get("timestamp"))


def to_text(moment):
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` of an aware datetime (None: None)."""
    if moment is None:
        return None
    return moment.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Span:
    """The earliest and latest record time seen (:meth:`add`), over every
    record whose time parses; both None until one does."""

    __slots__ = ("earliest", "latest")

    def __init__(self, earliest=None, latest=None):
        self.earliest = earliest
        self.latest = latest

    def add(self, metadata):
        """Take one record's metadata into account."""
        moment = record_time(metadata)
        if moment is None:
            return
        if self.earliest is None:
            self.earliest = self.latest = moment
        elif moment < self.earliest:
            self.earliest = moment
        elif moment > self.latest:
            self.latest = moment

    def copy(self):
        return Span(self.earliest, self.latest)

    def texts(self):
        """``(earliest, latest)`` as :func:`to_text` writes them."""
        return to_text(self.earliest), to_text(self.latest)
