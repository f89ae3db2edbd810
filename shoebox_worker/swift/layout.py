"""Where a shipped archive lies in Swift: the names the swift step gives
and the readers look for, in one place.

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
    "is_segment",
    "segment_container",
    "segment_name",
    "segment_pattern",
]

#: What the segments' container adds to the archive container's name.
SEGMENT_CONTAINER_SUFFIX = "_segments"
# ``/<size>/<segment size>/<index>`` at the end of a segment's name
_SEGMENT_TAIL = r"/[0-9]+/[0-9]+/[0-9]{8}\Z"
_ANY_SEGMENT = re.compile(_SEGMENT_TAIL)


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
