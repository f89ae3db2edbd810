"""Counters of what the worker did, and the periodic stats line.

One :class:`Stats` per worker process; the consumer thread and the
shipping thread update it, and nothing in it reads back from the worker:
the consumer thread counts each message as it goes and, once a tick,
passes down what it alone knows (:meth:`Stats.update`: the unacked batch,
the bytes written, the unshipped backlog); the shipping thread passes the
archives failing now (:meth:`Stats.failing`).
:mod:`shoebox_worker.consume.metrics` exports the same numbers to
Prometheus, and :meth:`Stats.health` says whether the worker does its job
(``/healthz``): it consumes, and shipping works.
"""

import collections
import logging
import threading
import time

__all__ = ["Stats", "TRANSIENT_GRACE"]

LOG = logging.getLogger(__name__)

#: A shipping step failing in a way that may pass (Swift down, a network
#: error) makes the worker unhealthy once the oldest such failure has
#: lasted this long (seconds; a permanent failure does at once).
TRANSIENT_GRACE = 300.0


class Stats:
    """What happened since start, and the data at risk now."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.consumed_by_queue = collections.Counter()
        self.malformed_by_queue = collections.Counter()
        #: messages that came with an ``x-delivery-count`` (returned to the
        #: broker before: a quorum queue counts), by queue
        self.redelivered_by_queue = collections.Counter()
        self.bytes_written = 0
        self.acked_total = 0
        self.rolls = 0
        self.callback_successes = collections.Counter()
        self.callback_failures = collections.Counter()
        #: the failures among them that retrying will not fix
        self.callback_permanent_failures = collections.Counter()
        #: signed digests stored (``[integrity]``), and attempts that failed
        self.digests_stored = 0
        self.digest_failures = 0
        #: ``{"transient" | "permanent": (archives, since)}``: the archives
        #: whose current step fails now, by the kind of its last failure,
        #: and when the oldest of them started failing, on this object's
        #: clock (monotonic: a wall clock stepped back or forward changes
        #: no age), None when none fails.
        self.failing_now = {"transient": (0, None),
                            "permanent": (0, None)}
        #: why the archives failing now fail: the last failure of the one
        #: failing longest, by kind (``failing(by_kind, reasons)``)
        self.failing_reasons = {}
        self.paused = False
        #: True while the worker consumes (from its first ``consume ready``
        #: until the broker fails, and again once it consumes again)
        self.consuming = False
        #: when the broker started failing (this object's clock), and
        #: whether retrying cannot fix it; None while it works
        self.broker_failing_since = None
        self.broker_failure_kind = None
        #: True once the worker is stopping
        self.stopping = False
        #: Data at risk, as of the worker's last tick: messages written but
        #: not acked yet...
        self.unacked = 0
        #: ...and ``(files, bytes, oldest_age_seconds)`` of the archives not
        #: yet through the callback chain, the active one included.
        self.backlog = (0, 0, 0.0)
        #: ``{queue: messages ready}``, the consumed and watched queues
        #: that could be read (replaced whole every few seconds by the
        #: consumer thread: see :class:`~shoebox_worker.consume.broker.
        #: QueueDepths`)
        self.queue_depths = {}
        #: callables notified of events (metrics exporters); the first one
        #: is this object's own, for the broker's failures
        self.listeners = [self._heard]
        self._last_time = clock()
        self._last_consumed = 0
        self._last_bytes = 0

    # -- consumer thread --------------------------------------------------

    def consumed(self, queue):
        self.consumed_by_queue[queue] += 1

    def redelivered(self, queue):
        self.redelivered_by_queue[queue] += 1

    def update(self, unacked, bytes_written, backlog):
        """What the consumer thread knows now (called once a tick).

        :param unacked: messages written but not acked yet.
        :param bytes_written: record bytes written since start.
        :param backlog: ``(files, bytes, oldest_age_seconds)`` not yet
            through the callback chain, the active archive included.
        """
        self.unacked = unacked
        self.bytes_written = bytes_written
        self.backlog = backlog

    def consuming_now(self):
        """The worker consumes (again): the broker works."""
        self.consuming = True
        self.broker_failing_since = self.broker_failure_kind = None

    def _heard(self, event, name, seconds):
        if event == "broker_failed":  # name: transient or permanent
            self.consuming = False
            if self.broker_failing_since is None:
                self.broker_failing_since = self._clock()
            self.broker_failure_kind = name

    def acked(self, count):
        self.acked_total += count

    def malformed(self, queue):
        self.malformed_by_queue[queue] += 1
        return sum(self.malformed_by_queue.values())

    def rolled(self):
        self.rolls += 1

    # -- shipping thread ----------------------------------------------------

    def callback_done(self, name, seconds):
        with self._lock:
            self.callback_successes[name] += 1
        for listener in self.listeners:
            listener("callback_done", name, seconds)

    def callback_failed(self, name, permanent=False):
        """A step failed; ``permanent``: retrying will not fix it."""
        with self._lock:
            self.callback_failures[name] += 1
            if permanent:
                self.callback_permanent_failures[name] += 1
        for listener in self.listeners:
            listener("callback_failed", name, None)

    def digest_stored(self):
        with self._lock:
            self.digests_stored += 1

    def digest_failed(self):
        with self._lock:
            self.digest_failures += 1

    def failing(self, by_kind, reasons=None):
        """The archives failing now (see :attr:`failing_now`), and, by
        kind, the last failure of the one failing longest (a line)."""
        self.failing_now = dict(by_kind)
        self.failing_reasons = dict(reasons or {})

    def failing_age(self, now=None):
        """How long the oldest failing archive has been failing (seconds;
        0 when none fails)."""
        since = [s for _, s in self.failing_now.values() if s is not None]
        if not since:
            return 0.0
        return max(0.0, (self._clock() if now is None else now)
                   - min(since))

    # -- reading ------------------------------------------------------------

    def health(self, now=None):
        """Whether the worker does its job: it consumes, and shipping
        works (no archive fails in a way retrying will not fix, none has
        failed for :data:`TRANSIENT_GRACE` seconds or more).

        :returns: ``(healthy, reason)``; the reason is one line, said in
            both cases.
        """
        now = self._clock() if now is None else now
        if self.stopping:
            return False, "stopping"
        if self.broker_failing_since is not None:
            return False, ("not consuming: the broker has been failing for "
                           "%.0f s%s (see the log)" % (
                               now - self.broker_failing_since,
                               ", in a way retrying will not fix"
                               if self.broker_failure_kind == "permanent"
                               else ""))
        if not self.consuming:
            return False, "not consuming yet: connecting to the broker"
        if self.paused:
            return False, ("consumption paused: disk full, or the archives "
                           "to ship over max_backlog_mb (see the log)")
        count, since = self.failing_now.get("permanent", (0, None))
        if count:
            return False, ("shipping fails in a way retrying will not fix, "
                           "on %d archive(s) for %.0f s: %s" % (
                               count, now - since,
                               self.failing_reasons.get("permanent")
                               or "see the log"))
        count, since = self.failing_now.get("transient", (0, None))
        if count and now - since >= TRANSIENT_GRACE:
            return False, ("shipping has been failing on %d archive(s) for "
                           "%.0f s: %s" % (count, now - since,
                                           self.failing_reasons.get(
                                               "transient") or "see the log"))
        return True, "consuming; shipping works"

    @property
    def consumed_total(self):
        return sum(self.consumed_by_queue.values())

    def log_line(self, force=False):
        """Log rates since the last line, totals and the data at risk."""
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        consumed = self.consumed_total
        rate = (consumed - self._last_consumed) / elapsed
        byte_rate = (self.bytes_written - self._last_bytes) / elapsed
        self._last_time = now
        self._last_consumed = consumed
        self._last_bytes = self.bytes_written
        files, size, age = self.backlog
        LOG.info("%.0f msg/s, %.2f MB/s; consumed %d, acked %d, malformed "
                 "%d, rolls %d; unshipped %d file(s), %.1f MB, oldest "
                 "%.0f s%s", rate, byte_rate / 1048576.0, consumed,
                 self.acked_total, sum(self.malformed_by_queue.values()),
                 self.rolls, files, size / 1048576.0, age,
                 "; PAUSED" if self.paused else "")
