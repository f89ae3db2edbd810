"""When consumption pauses, and when it resumes.

A worker stops taking messages off its queues in two cases: the disk
refused a write for lack of space (:data:`PAUSE_DISK_FULL`), or the
archives waiting to be shipped exceed ``max_backlog_mb``
(:data:`PAUSE_BACKLOG`). A full disk outranks the backlog: once paused for
it, only free space resumes consumption.

:class:`Backpressure` only decides. It is told the backlog and how to
measure free space, and returns a :class:`Change` (pause or resume, and
why) or None; the worker logs it and cancels or resumes its consumers.
"""

import collections

__all__ = ["Backpressure", "Change", "PAUSE", "RESUME", "PAUSE_DISK_FULL",
           "PAUSE_BACKLOG", "RESUME_FREE_BYTES", "BACKLOG_RESUME_RATIO"]

#: Free space needed on the archive's filesystem before a paused worker
#: (disk full) takes messages again.
RESUME_FREE_BYTES = 64 * 1024 * 1024
#: Resume after a backlog pause once the backlog is under this share of
#: ``max_backlog_mb``.
BACKLOG_RESUME_RATIO = 0.9

#: Why consumption is paused (:attr:`Backpressure.paused`).
PAUSE_DISK_FULL = "disk full"
PAUSE_BACKLOG = "backlog"

#: What a :class:`Change` asks for.
PAUSE = "pause"
RESUME = "resume"

#: ``action`` is :data:`PAUSE` or :data:`RESUME`, ``reason`` the line to
#: log; ``was_paused`` is true when a pause only changes its cause (the
#: consumers are cancelled already).
Change = collections.namedtuple("Change", "action reason was_paused")


class Backpressure:
    """The pause decision of one worker.

    :param max_backlog: bytes of unshipped archives over which consumption
        pauses (``max_backlog_mb``, in bytes).
    :param resume_free: free bytes needed to resume after a full disk
        (default :data:`RESUME_FREE_BYTES`).
    """

    def __init__(self, max_backlog, resume_free=None):
        self.max_backlog = max_backlog
        self.resume_free = RESUME_FREE_BYTES if resume_free is None \
            else resume_free
        #: Why consumption is paused (``PAUSE_*``), None while it runs.
        self.paused = None

    def disk_full(self, why):
        """A write failed for lack of space.

        :returns: a :data:`PAUSE` :class:`Change`, or None when already
            paused for it.
        """
        return self._pause(PAUSE_DISK_FULL, why)

    def check(self, backlog, free_space):
        """Decide from the backlog, once a tick.

        :param backlog: ``(files, bytes, oldest_age)`` waiting to be shipped.
        :param free_space: a callable returning the archive filesystem's
            free bytes; called only while paused for a full disk.
        :returns: a :class:`Change`, or None when nothing changes.
        """
        if self.paused == PAUSE_DISK_FULL:
            free = free_space()
            if free >= self.resume_free:
                return self._resume("disk has %d MB free" % (free >> 20))
            return None
        files, size = backlog[0], backlog[1]
        if not self.paused and size > self.max_backlog:
            return self._pause(
                PAUSE_BACKLOG,
                "%d archive(s), %.1f MB waiting to be shipped, over "
                "max_backlog_mb = %g" % (files, size / 1048576.0,
                                         self.max_backlog / 1048576.0))
        if self.paused and size <= self.max_backlog * BACKLOG_RESUME_RATIO:
            return self._resume("backlog down to %.1f MB"
                                % (size / 1048576.0))
        return None

    def _pause(self, cause, why):
        if self.paused in (cause, PAUSE_DISK_FULL):
            return None
        was_paused, self.paused = self.paused is not None, cause
        return Change(PAUSE, why, was_paused)

    def _resume(self, why):
        self.paused = None
        return Change(RESUME, why, True)
