"""A record's ``timestamp`` metadata as a moment, one way for every reader.

The worker copies each notification's ``timestamp`` into the record's
metadata as the publisher wrote it (oslo.messaging writes
``2024-03-09 10:00:00.123456``, naive UTC; others add an offset). What
reads it as a time (object metadata and names, ``--since``/``--until``,
``export``'s day partitions, the index's time range) reads it here, so
they all agree on which records are in a window.
"""

import datetime
import re

__all__ = ["record_time", "utc_text"]

#: A record ``timestamp`` longer than this is not one (ISO 8601 with
#: microseconds and an offset is 32 characters).
MAX_LENGTH = 40
#: Record timestamps outside these years are taken for garbage.
YEARS = (1970, 2999)

_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")


def record_time(metadata):
    """The ``timestamp`` of a record as an aware UTC datetime, or None for
    anything that is not a plausible one (missing, not a string, too long,
    not printable ASCII, not ISO 8601, out of range once in UTC, before
    1970 or after 2999; naive means UTC). Never raises: a record's content
    never stops anything."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get("timestamp")
    if not isinstance(value, str) or len(value) > MAX_LENGTH \
            or not _PRINTABLE.match(value):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        moment = moment.astimezone(datetime.UTC)
    except (ValueError, OverflowError):
        return None
    if not YEARS[0] <= moment.year <= YEARS[1]:
        return None
    return moment


def utc_text(moment):
    """An aware datetime as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC): the
    form that sorts as the moments do."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
