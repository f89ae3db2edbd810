"""Record timestamps in one shape: UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

The one place that says how a record's ``timestamp`` metadata becomes a
point in time for everything that compares them: the index's earliest and
latest record (:mod:`shoebox_worker.index`) and the object metadata the
``swift`` step writes (``X-Object-Meta-Earliest-Timestamp``). In that
shape, text order is time order, so the earliest of many is their
``min()``.

oslo.messaging writes ``2026-11-26 16:11:12.000000`` (UTC, no zone);
anything :meth:`datetime.datetime.fromisoformat` reads is taken too, a
value without a zone as UTC. What is not a plausible timestamp (not a
string, longer than :data:`MAX_LENGTH`, not ISO 8601, before 1970 or
after 2999 once in UTC) is None, never an error: no record's content can
stop the worker.
"""

import datetime
import re

__all__ = ["normalise", "MAX_LENGTH", "YEARS"]

#: A ``timestamp`` longer than this is not one (ISO 8601 with microseconds
#: and an offset is 32 characters).
MAX_LENGTH = 40
#: Timestamps outside these years (inclusive, in UTC) are taken for garbage.
YEARS = (1970, 2999)

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_OSLO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}"
                   r"\.[0-9]{6}")


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
    """``value`` (a record's ``timestamp``) as UTC
    ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, or None when it is not a plausible
    timestamp. Never raises."""
    if not isinstance(value, str) or len(value) > MAX_LENGTH:
        return None
    fast = _oslo(value)
    if fast is not None:
        return fast
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        moment = moment.astimezone(datetime.UTC)
    except (ValueError, OverflowError):
        return None
    if not YEARS[0] <= moment.year <= YEARS[1]:
        return None
    return moment.strftime(_FORMAT)
