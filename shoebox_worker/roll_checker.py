"""Roll checkers: when the active archive rolls over to a new file.

Loaded by name from ``shoebox.roll_checkers`` (``never``, ``size``,
``time``, ``count``); the contract is in :mod:`shoebox_worker.contract`.
Constructors take keyword arguments only, as strings from the config, and
coerce them with :mod:`shoebox_worker.options`.

``[archive] roll_checker = size, time`` names several: the archive rolls
on whichever fires first (256 MiB or an hour, as every log shipper
rolls), each checker with its own ``[roll_checker:NAME]`` section.
:class:`FirstOfRollChecker` is that combination, and works with anything
that has ``start(archive)`` and ``check(archive)`` (StackTach shoebox's
roll checker API, and third-party checkers)::

    checker = FirstOfRollChecker([SizeRollChecker(roll_size_mb=256),
                                  TimeRollChecker(roll_minutes=60)])
    manager = roll_manager.WritingRollManager("x_%c.events", checker)
"""

import time

from shoebox_worker import options

__all__ = [
    "RollChecker",
    "NeverRollChecker",
    "SizeRollChecker",
    "TimeRollChecker",
    "CountRollChecker",
    "FirstOfRollChecker",
]

#: The clock time-based checkers read (monotonic: immune to clock steps).
clock = time.monotonic

_POSITIVE = options.number(minimum=0, exclusive=True)
_POSITIVE_WHOLE = options.number(minimum=0, exclusive=True, whole=True)


class RollChecker:
    """Convenience base: ``start`` does nothing, ``check`` never rolls."""

    def start(self, archive):
        """Called when a new archive is opened."""

    def check(self, archive):
        """Should the current archive roll?"""
        return False


class NeverRollChecker(RollChecker):
    """Never roll: one archive until the manager is closed."""


class SizeRollChecker(RollChecker):
    """Roll once the archive reaches ``roll_size_mb`` megabytes.

    :param roll_size_mb: size in MiB (fractions allowed), default 100.
    """

    def __init__(self, *, roll_size_mb=100):
        self.roll_size_mb = options.coerce("roll_size_mb", roll_size_mb,
                                           _POSITIVE)
        self.roll_size = int(self.roll_size_mb * 1024 * 1024)

    def check(self, archive):
        return archive.tell() >= self.roll_size


class TimeRollChecker(RollChecker):
    """Roll ``roll_minutes`` after the archive was opened, even when idle.

    :param roll_minutes: minutes (fractions allowed), default 60.
    """

    def __init__(self, *, roll_minutes=60):
        self.roll_minutes = options.coerce("roll_minutes", roll_minutes,
                                           _POSITIVE)
        self.end_time = None

    def start(self, archive):
        self.end_time = clock() + self.roll_minutes * 60

    def check(self, archive):
        return self.end_time is not None and clock() >= self.end_time


class CountRollChecker(RollChecker):
    """Roll after ``roll_count`` records (handy for tests and small batches).

    :param roll_count: records per archive, default 100000.
    """

    def __init__(self, *, roll_count=100000):
        self.roll_count = options.coerce("roll_count", roll_count,
                                         _POSITIVE_WHOLE)

    def check(self, archive):
        return archive.records >= self.roll_count


class FirstOfRollChecker(RollChecker):
    """Roll when the first of several checkers says so.

    ``start`` starts every one of them (each new archive restarts a time
    checker's clock, as it would alone); ``check`` asks them in order and
    stops at the first that fires.

    :param checkers: roll checkers (objects with ``start(archive)`` and
        ``check(archive)``), at least one.
    """

    def __init__(self, checkers):
        self.checkers = tuple(checkers)
        if not self.checkers:
            raise ValueError("FirstOfRollChecker needs at least one checker")

    def start(self, archive):
        for checker in self.checkers:
            checker.start(archive)

    def check(self, archive):
        return any(checker.check(archive) for checker in self.checkers)

    def __repr__(self):
        return "FirstOfRollChecker(%r)" % (list(self.checkers),)
