"""Where a shipped archive lies in Swift: the names the swift step gives
and the readers look for, in one place (and the names of the index
bundles beside the archives).

An archive over the segment size is a Static Large Object: its manifest
is ``<container>/<object>``, its segments are
``<container>_segments/<object>/<size>/<segment size>/<index>`` (the index
in 8 digits, from 0). The names follow from the file and the settings
alone, so that a retry of the same file writes the same names and finds
what an interrupted one left. A reader that lists the container skips
names of that shape (segments put there by hand or by an older
``segment_container``).

Nothing heavy is imported here: the readers use it without loading
swiftclient.
"""

import re

__all__ = [
    "BUNDLE_SUFFIX",
    "PERIOD_FOLDER",
    "is_bundle",
    "is_segment",
    "period_bundle_name",
    "period_bundle_of",
    "segment_container",
    "segment_name",
    "segment_pattern",
]

#: What the segments' container adds to the archive container's name.
SEGMENT_CONTAINER_SUFFIX = "_segments"
# ``/<size>/<segment size>/<index>`` at the end of a segment's name
_SEGMENT_TAIL = r"/[0-9]+/[0-9]+/[0-9]{8}\Z"
_ANY_SEGMENT = re.compile(_SEGMENT_TAIL)


#: The single bundle of the archives under ``PREFIX`` (``shoebox-worker
#: index-bundle``) is ``PREFIX`` + this.
BUNDLE_SUFFIX = ".shoebox-index-bundle"
#: The period bundles of the archives under ``PREFIX`` (``index-bundle
#: --per``) are under ``PREFIX`` + this:
#: ``<PREFIX>.shoebox-index-bundles/<period>/<part>-of-<parts>``, a
#: period ``2026``, ``2026-03``, ``2026-03-09`` or ``untimed``.
PERIOD_FOLDER = ".shoebox-index-bundles/"
_PERIOD_BUNDLE = re.compile(
    r"(.*)" + re.escape(PERIOD_FOLDER)
    + r"([0-9]{4}(?:-[0-9]{2}){0,2}|untimed)/([0-9]{3})-of-([0-9]{3})\Z",
    re.DOTALL)


def period_bundle_name(prefix, period, part, parts):
    """The object holding part ``part`` (from 0) of the ``parts`` parts of
    the bundle of ``period`` of the archives under ``prefix``."""
    return "%s%s%s/%03d-of-%03d" % (prefix, PERIOD_FOLDER, period, part,
                                    parts)


def period_bundle_of(name):
    """``(prefix, period, part, parts)`` of a period bundle's name, or None
    when ``name`` is not one."""
    match = _PERIOD_BUNDLE.match(name)
    if match is None:
        return None
    prefix, period, part, parts = match.groups()
    if not 0 <= int(part) < int(parts):
        return None
    return prefix, period, int(part), int(parts)


def is_bundle(name):
    """Whether ``name`` is an index bundle's: the single bundle of a
    prefix or a part of a period bundle (never an archive)."""
    return name.endswith(BUNDLE_SUFFIX) or \
        period_bundle_of(name) is not None


def segment_container(container):
    """The container of ``container``'s SLO segments."""
    return container + SEGMENT_CONTAINER_SUFFIX


def segment_name(obj, size, segment_size, index):
    """Segment ``index`` (from 0) of object ``obj``, a file of ``size``
    bytes cut into segments of ``segment_size``."""
    return "%s/%d/%d/%08d" % (obj, size, segment_size, index)


def segment_pattern(obj):
    """A compiled pattern matching the names of every segment of ``obj``,
    whatever the size and segment size."""
    return re.compile(re.escape(obj) + _SEGMENT_TAIL)


def is_segment(name):
    """Whether ``name`` has the shape of a segment's name."""
    return _ANY_SEGMENT.search(name) is not None
