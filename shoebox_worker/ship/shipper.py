"""Shipping: run every closed archive through the callback chain, beside
consumption, until it is done, across failures and restarts.

The consumer hands a closed (fsynced) archive to :meth:`Shipper.submit`,
with the :class:`~shoebox_worker.archive.ArchiveReport` its writer made
(record count, first and last metadata, format versions), and goes on. A
background thread runs the chain one step at a time, passing the report to
the steps that take it (see :mod:`shoebox_worker.callbacks`), so no step
reads the archive to learn what is in it. After each step the progress is
saved in a small state file next to where the archive was written
(``x.events.ship``: the file's current path, the next step and the
report), written atomically, so a crash at any point resumes at the step
that was running, with the same report. A failed step is retried with
capped exponential backoff (with jitter); other archives keep moving
meanwhile. Steps must be idempotent (see :mod:`shoebox_worker.contract`):
a step may run again after a crash, never a step after it before it
succeeded, so nothing is deleted before the upload before it was verified.

Every state file is held under an exclusive ``flock`` while its archive is
being shipped, and every active archive while it is being written, so
several workers sharing a working directory never ship the same file twice
nor take over each other's active archive. Locks die with their process,
so a killed worker's files are taken over at the next start.

:meth:`Shipper.recover` runs at start: it resumes every unlocked state
file, and treats every unlocked archive that has none as left by a killed
run: it is read once (:func:`~shoebox_worker.archive.inspect_file`) for its
report, a torn tail is cut off (and reported), then it is shipped. An
archive whose report is not known (a state file written without one, or
one handed over without) gets it from the same function, in the shipping
thread, just before the first step that takes it.
"""

import dataclasses
import heapq
import json
import logging
import os
import random
import threading
import time

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.files import FileLock

__all__ = ["Shipper", "STATE_SUFFIX"]

LOG = logging.getLogger(__name__)

#: Suffix of the state file kept beside each archive until it is shipped.
STATE_SUFFIX = ".ship"
#: recover() leaves an empty archive younger than this (seconds) alone: a
#: live worker may have just created it and not locked it yet.
EMPTY_ARCHIVE_GRACE = 60.0


class _Job:
    """One archive on its way through the chain."""

    def __init__(self, origin, path, step, lock, since=None, report=None):
        self.origin = origin        # where the archive was written
        self.path = path            # where it is now
        self.step = step            # next step to run
        self.lock = lock            # FileLock on the state file
        self.report = report        # ArchiveReport of its records, or None
        self.attempts = 0           # failures of the current step
        self.size = _size(path)
        # when its oldest record was written (at worst: its last write)
        self.since = since if since is not None else _mtime(path)
        self.failing_since = None

    @property
    def state_path(self):
        return self.origin + STATE_SUFFIX


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except (OSError, TypeError):
        return time.time()


def _size(path):
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0


def _report_to_state(report):
    """An :class:`~shoebox_worker.archive.ArchiveReport` as JSON values."""
    return {
        "records": report.records,
        "size": report.size,
        "versions": sorted(report.versions),
        "skipped": [[s.start, s.end, s.reason] for s in report.skipped],
        "torn_offset": report.torn_offset,
        "first_metadata": report.first_metadata,
        "last_metadata": report.last_metadata,
    }


def _report_from_state(origin, data):
    """The report a state file saved, or None when it has none (or one
    that does not parse)."""
    if data is None:
        return None
    try:
        return archive.ArchiveReport(
            origin, records=int(data["records"]), size=int(data["size"]),
            versions={int(v) for v in data["versions"]},
            skipped=[archive.Skipped(origin, int(start), int(end),
                                     str(reason))
                     for start, end, reason in data["skipped"]],
            torn_offset=data["torn_offset"],
            first_metadata=data["first_metadata"],
            last_metadata=data["last_metadata"])
    except (KeyError, TypeError, ValueError):
        LOG.warning("%s%s: the saved archive report does not parse; it is "
                    "read again from the archive", origin, STATE_SUFFIX)
        return None


def _inspect(path):
    """Read an archive for its report; None when it cannot be read (the
    steps that take a report then do without)."""
    try:
        return archive.inspect_file(path)
    except Exception as exc:  # unreadable: the steps decide what to do
        LOG.warning("%s: cannot read its records for a report: %s", path,
                    exc)
        return None


class Shipper:
    """Runs the callback chain on closed archives in a background thread.

    :param chain: a :class:`~shoebox_worker.callbacks.CallbackChain`.
    :param retry_initial: first retry delay, seconds.
    :param retry_max: longest retry delay, seconds.
    :param stats: optional object with ``callback_done(name, seconds)``,
        ``callback_failed(name)`` methods.
    """

    def __init__(self, chain, retry_initial=1.0, retry_max=300.0,
                 stats=None):
        self.chain = chain
        self.chain_names = [name for name, _ in chain.steps]
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)
        self.stats = stats
        self._heap = []             # (due, seq, job)
        self._seq = 0
        self._jobs = {}             # origin -> job
        self._cond = threading.Condition()
        self._thread = None
        self._stopping = False
        self._busy = None           # the job whose step is running

    # -- what the consumer sees ---------------------------------------

    def submit(self, path, lock=None, since=None, report=None):
        """Hand over a closed archive; returns at once.

        Writes its state file (durably) before returning, so the archive is
        shipped even if the process dies right after.

        :param lock: the archive's :class:`FileLock`, released once the
            state file holds the archive.
        :param since: when its first record was written (default: the
            file's modification time).
        :param report: the :class:`~shoebox_worker.archive.ArchiveReport`
            of the whole file (``ArchiveWriter.report()`` at roll time);
            kept in the state file and passed to the steps that take it.
            Without one it is read from the file when a step needs it.
        """
        state = FileLock(path + STATE_SUFFIX)
        job = _Job(path, path, 0, state, since, report)
        self._save(job)
        if lock is not None:
            lock.release()
        self._enqueue(job, time.monotonic())

    @property
    def backlog(self):
        """``(files, bytes, oldest_age_seconds)`` not yet through the chain."""
        with self._cond:
            jobs = list(self._jobs.values())
        if not jobs:
            return 0, 0, 0.0
        now = time.time()
        return (len(jobs), sum(j.size for j in jobs),
                max(now - j.since for j in jobs))

    def pending(self):
        with self._cond:
            return len(self._jobs)

    def wait_idle(self, timeout=None, should_stop=None):
        """Block until every archive went through the chain.

        :returns: True when idle, False on timeout or when ``should_stop()``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._jobs:
                if should_stop is not None and should_stop():
                    return False
                left = None if deadline is None else deadline - \
                    time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.2 if left is None else min(left, 0.2))
            return True

    def settle(self, timeout):
        """Block while a step runs or an archive is due now, up to
        ``timeout`` seconds; archives waiting out a retry delay are left
        to their state files (used on SIGTERM).

        :returns: True when nothing is running or due.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                due = self._heap and self._heap[0][0] <= now
                if self._busy is None and not due:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(deadline - now, 0.2))

    # -- start-up ------------------------------------------------------

    def recover(self, directory, pattern_match):
        """Find what a previous run left in ``directory`` and queue it.

        :param pattern_match: ``f(name) -> bool``: is this file name one of
            our archives (as the writer names them)?
        :returns: the number of archives queued.
        """
        if not os.path.isdir(directory):
            return 0
        names = sorted(os.listdir(directory))
        count = 0
        for name in names:  # a crash mid-rename leaves *.tmp behind
            if name.endswith(STATE_SUFFIX + ".tmp"):
                path = os.path.join(directory, name)
                lock = FileLock.try_acquire(path, create=False)
                if lock is not None:  # else a live worker is writing it
                    os.unlink(path)
                    lock.release()
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(STATE_SUFFIX):
                count += self._resume(path)
        names = sorted(os.listdir(directory))
        for name in names:
            path = os.path.join(directory, name)
            if not pattern_match(name) or os.path.exists(path +
                                                         STATE_SUFFIX):
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            if stat.st_size == 0 and \
                    time.time() - stat.st_mtime < EMPTY_ARCHIVE_GRACE:
                # a live worker creates its archive, then locks it: not
                # ours to remove (nor to lock, which would make it fail)
                continue
            lock = FileLock.try_acquire(path, create=False)
            if lock is None:
                continue  # being written by a live worker
            if os.path.exists(path + STATE_SUFFIX):
                lock.release()
                continue  # handed over between our two looks
            if os.path.getsize(path) == 0:
                LOG.warning("removing empty archive %s left by a killed run",
                            path)
                os.unlink(path)
                lock.release()
                continue
            report = self._recovered_report(path)
            LOG.info("shipping %s, left by a previous run", path)
            self.submit(path, lock, report=report)
            count += 1
        return count

    @staticmethod
    def _recovered_report(path):
        """Read an archive left by a killed run for its report, and cut off
        a torn tail (the record being written when that run died; it was
        never acked).

        :returns: the report of what is left.
        """
        report = archive.inspect_file(path)
        if report.torn_offset is None:
            return report
        # the cut reads the file again; only after a crash mid-write
        cut = archive.cut_torn_tail(path)
        if cut is None:  # not torn on this second look: read it afresh
            return archive.inspect_file(path)
        LOG.warning("%s: cut a torn tail of %d bytes at offset %d (a record "
                    "being written when the last run died; it was never "
                    "acked)", path, cut[1], cut[0])
        # no valid record was in the tail: only its damaged range goes
        return dataclasses.replace(report, skipped=report.skipped[:-1],
                                   size=cut[0], torn_offset=None)

    def _resume(self, state_path):
        lock = FileLock.try_acquire(state_path, create=False)
        if lock is None:
            return 0
        origin = state_path[:-len(STATE_SUFFIX)]
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = {}
        if state.get("done"):
            lock.release()
            return 0
        path = state.get("path", origin)
        step = int(state.get("step", 0))
        if state.get("chain") != self.chain_names:
            LOG.warning("%s: the callback chain changed since it was "
                        "started (%s, now %s); running the new chain from "
                        "its first step", origin, state.get("chain"),
                        self.chain_names)
            step = 0
        if path is None or not os.path.exists(path):
            if os.path.exists(origin):
                path, step = origin, 0
            else:
                LOG.error("%s: state says %s, which is gone; nothing to "
                          "ship", state_path, path)
                self._finish(_Job(origin, None, step, lock))
                return 0
        report = _report_from_state(origin, state.get("report"))
        job = _Job(origin, path, step, lock, report=report)
        LOG.info("resuming shipping of %s at step %d of %d", path, step,
                 len(self.chain_names))
        self._enqueue(job, time.monotonic())
        return 1

    # -- the thread ----------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run,
                                        name="shoebox-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout=30.0):
        """Stop after the step that is running (or ``timeout``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("shipping step still running after %.0f s; "
                            "its state file resumes it next start", timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close_callbacks()
        with self._cond:
            left = len(self._jobs)
        if left:
            LOG.info("%d archive(s) not shipped yet; the next start "
                     "resumes them", left)

    def _close_callbacks(self):
        """Let callbacks release what they hold (connections, pools)."""
        for name, callback in self.chain.steps:
            close = getattr(callback, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    LOG.warning("closing callback %s failed", name,
                                exc_info=True)

    def _enqueue(self, job, due):
        with self._cond:
            self._jobs[job.origin] = job
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, job))
            self._cond.notify_all()

    def _next(self):
        with self._cond:
            while not self._stopping:
                if self._heap:
                    due = self._heap[0][0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        job = heapq.heappop(self._heap)[2]
                        self._busy = job
                        return job
                    self._cond.wait(min(wait, 1.0))
                else:
                    self._cond.wait(1.0)
            return None

    def _run(self):
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._ship(job)
            except Exception:  # never let the thread die
                LOG.exception("unexpected error shipping %s", job.path)
                self._retry(job)
            finally:
                with self._cond:
                    self._busy = None

    def _ship(self, job):
        while job.step < len(self.chain_names) and job.path is not None:
            if self._stopping:
                self._enqueue(job, time.monotonic())
                return
            name = self.chain_names[job.step]
            if job.report is None and self.chain.wants_report(job.step):
                job.report = _inspect(job.path)
                if job.report is not None:
                    self._save(job)  # read once, even across a restart
            started = time.monotonic()
            try:
                new_path = self.chain.run_step(job.step, job.path,
                                               job.report)
            except exceptions.CallbackError as exc:
                job.attempts += 1
                if job.failing_since is None:
                    job.failing_since = time.time()
                if self.stats is not None:
                    self.stats.callback_failed(name)
                delay = self._delay(job.attempts)
                LOG.error("%s (attempt %d; retrying in %.1f s)", exc,
                          job.attempts, delay)
                self._retry(job, delay)
                return
            if self.stats is not None:
                self.stats.callback_done(name, time.monotonic() - started)
            job.attempts = 0
            job.failing_since = None
            job.path = new_path
            job.step += 1
            job.size = _size(new_path)
            if job.step < len(self.chain_names) and new_path is not None:
                self._save(job)
        self._finish(job)

    def _delay(self, attempts):
        base = min(self.retry_max, self.retry_initial * 2 ** (attempts - 1))
        return base * random.uniform(0.75, 1.0)

    def _retry(self, job, delay=None):
        if delay is None:
            delay = self._delay(max(job.attempts, 1))
        self._enqueue(job, time.monotonic() + delay)

    def _save(self, job):
        state = {"path": job.path, "step": job.step,
                 "chain": self.chain_names}
        if job.report is not None:
            state["report"] = _report_to_state(job.report)
        lock = files.write_json_atomic(job.state_path, state)
        old, job.lock = job.lock, lock
        old.release()

    def _finish(self, job):
        """The chain is done with this archive: drop its state."""
        remains = job.path is not None and os.path.exists(job.path) and \
            os.path.abspath(job.path) == os.path.abspath(job.origin)
        if remains:
            # still where it was written and named as written: remember it
            # is done, or the next start would take it for a crashed one
            files.write_json_atomic(job.state_path, {"done": True,
                                                "path": job.path}).release()
        else:
            try:
                os.unlink(job.state_path)
            except FileNotFoundError:
                pass
            files.fsync_directory(job.state_path)
        job.lock.release()
        with self._cond:
            self._jobs.pop(job.origin, None)
            self._cond.notify_all()
        LOG.info("shipped %s%s", job.origin,
                 "" if job.path in (None, job.origin) else
                 " (now %s)" % job.path)
