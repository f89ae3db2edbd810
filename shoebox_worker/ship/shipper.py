"""Shipping: run every closed archive through the callback chain, beside
consumption, until it is done, across failures and restarts.

The consumer hands a closed (fsynced) archive to :meth:`Shipper.submit`,
with the :class:`~shoebox_worker.archive.ArchiveReport` its writer made
(record count, first and last metadata, format versions), and goes on. A
background thread runs the chain one step at a time, passing the report to
the steps that take it (see :mod:`shoebox_worker.callbacks`), so no step
reads the archive to learn what is in it. After each step the progress is
saved in a small state file next to where the archive was written
(``x.events.ship``: the file's current path, the next step, where that
step will leave the file, and the report), written atomically. Where a
step leaves the file is asked of the step (``output_path``, see
:mod:`shoebox_worker.contract`) and written before the step runs, so a
crash at any point resumes at the step that was running, with the same
report, or after it when its input is gone and its output is there; an
archive is never found only under a name nothing looks for
(docs/shipping.md). A failed step is retried with
capped exponential backoff (with jitter); other archives keep moving
meanwhile. Steps must be idempotent (see :mod:`shoebox_worker.contract`):
a step may run again after a crash, never a step after it before it
succeeded, so nothing is deleted before the upload before it was verified.

**Finished archives.** When the chain is done, the state file goes. An
archive the chain left where it was written, under its own name (no
callbacks, or only ``swift``), is then listed in one small file per
working directory, ``.finished.ship`` (:data:`DONE_FILE`): its name,
inode, size and modification time. The next start ships no archive listed
there with the same inode, size and time, so a finished archive is never
shipped again, and no file is left beside it. The list is written
atomically before the state file is removed (a crash in between: the next
start finds the archive listed and removes its state file), under a
``flock`` on the directory (several workers may share it), and entries of
archives no longer there are dropped whenever it is written.

**Failures.** A step that fails is retried; each failing step's failures
are logged once, when they start (and when a failure of the other kind
joins them), then at most every :data:`FAILURE_LOG_INTERVAL` seconds with
a count and a duration ("still failing after 12 attempts, 5 min"), and
once more when the step works again, never with a traceback per retry.
Each archive whose retry delay has reached ``retry_max`` also gets a
WARNING of its own at each retry (at most every
:data:`CAPPED_LOG_INTERVAL` seconds), naming it, the step, how many
times and how long it has failed, and the last reason. A
failure retrying cannot fix (``CallbackError.permanent``: a refused key, a
name Swift refuses; see :mod:`shoebox_worker.contract`) is logged as such,
with what to check, and retried every ``retry_max`` seconds only, so that
fixing it heals the worker without a restart.

Every state file is held under an exclusive ``flock`` while its archive is
being shipped, and every archive from its creation until its state file
exists (checked after each ``flock``: the path still names the file
locked; see :class:`~shoebox_worker.files.FileLock`), so several workers
sharing a working directory never ship the same file twice nor take over
each other's active archive. Locks die with their process, so a killed
worker's files are taken over at the next start, and its empty archives
removed, whatever their age.

A state file may only send the chain to a regular file inside the working
directory or where the chain's declared outputs put the archive (a
``move`` destination); any other path is refused, loudly, and left alone.
State files and :data:`DONE_FILE` are read only when they are regular
files (never through a symlink, never waiting on a FIFO:
:func:`~shoebox_worker.files.read_regular`). A state file that cannot be
read, does not parse or has the wrong shape (not an object, a ``step`` that
is not one of the chain's, a ``path`` that is not a file name...) is said
in one WARNING line and its archive shipped from the first step of the
chain: a step may run again, never out of order, and none is skipped (it
is left alone, with that line, when the archive is no longer where it was
written). A :data:`DONE_FILE` of the wrong shape is said in one line too,
and written again with the entries that have the right one: the archives
it listed otherwise are shipped again.

:meth:`Shipper.recover` runs at start: it resumes every unlocked state
file, and treats every unlocked archive that has none as left by a killed
run: it is read once (:func:`~shoebox_worker.archive.inspect_file`) for its
report, a torn tail is cut off (and reported, in one line), then it is
shipped. An
archive whose report is not known (a state file written without one, or
one handed over without) gets it from the same function, in the shipping
thread, just before the first step that takes it.

**The index travels with the archive.** An archive's index
(:mod:`shoebox_worker.index`) is the file ``<path>.index`` beside it, and
the shipper keeps it there: after each step it moves the index to follow
the archive (``x.events.index`` becomes ``x.events.gz.index`` after
``gzip``, and goes into the ``move`` destination with it), and removes it
once a step removed the archive (``delete``), before the state file goes.
A crash in between is healed when the archive is resumed: its index is
looked for under every path the chain's declared outputs lead the
archive through (:meth:`~shoebox_worker.callbacks.CallbackChain.forms`)
and moved beside it. So no step handles the index, except one that ships
it (``swift`` uploads it beside the archive object). An archive recovered
without a state file gets its index rebuilt from its records (the same
read as its report); at start, an index whose archive is gone and that
no state file can still lead to (none names a prefix of it) is removed.
An archive without an index is shipped all the same: the index is best
effort and never holds an archive back. Once the chain is done with an
archive that stays on disk, its index is bound to the file as it is then
(:func:`shoebox_worker.index.bind_file`: its MD5 and size), so that a
reader trusts it for that file only.
"""

import dataclasses
import errno
import fcntl
import heapq
import json
import logging
import os
import random
import stat as stat_mod
import threading
import time

from shoebox_worker import archive
from shoebox_worker import contract
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index
from shoebox_worker.files import FileLock

__all__ = ["Shipper", "STATE_SUFFIX", "DONE_FILE"]

LOG = logging.getLogger(__name__)

#: Suffix of the state file kept beside each archive until it is shipped.
STATE_SUFFIX = ".ship"
#: The list of finished archives left where they were written, one per
#: working directory (a ``.ship`` file too: all shipping state is).
DONE_FILE = ".finished" + STATE_SUFFIX
#: A failing step is logged again at most this often (seconds).
FAILURE_LOG_INTERVAL = 300.0

E_FAILED = "%s (attempt %d; retrying in %.1f s)"
E_LOCAL = ("cannot ship %s: the local disk refused its state (%s); retrying "
           "in %.1f s, then with backoff")
E_LOCAL_AGAIN = "cannot ship %s (attempt %d): %s"
E_REFUSED = ("%s names %s, which is neither inside %s nor where the "
             "callback chain puts an archive, or not a regular file: "
             "refused, not shipped, left alone")
E_NOT_REGULAR = ("%s is not a regular file (a symlink?): not shipped, left "
                 "alone")
#: A state file of the wrong shape: which, what is wrong, the archive.
W_BAD_STATE = "%s %s: shipping %s from the first step of the chain"
#: The same, when the archive is not where it was written.
W_BAD_STATE_LEFT = ("%s %s, and %s is not there: left alone, for an "
                    "operator to look at")
#: A :data:`DONE_FILE` that cannot be used: which, what is wrong.
W_BAD_DONE = ("%s %s: archives it listed as shipped are shipped again")
#: An index that cannot be bound to the archive the chain left.
W_UNBOUND = ("cannot bind the index %s to %s (%s): pruned reads read the "
             "archive in full")
W_UNDECLARED = ("callback %s left %s at %s, not at %s as declared "
                "(output_path): a crash while it runs can strand the "
                "archive; see shoebox_worker.contract")
E_PERMANENT = "%s: will not heal by retrying: %s; retrying every %.0f s"
E_STILL = ("callback %s still failing after %d attempts, %s, on %d "
           "archive(s); the last: %s")
#: Each archive whose retry delay reached ``retry_max``, at each retry (at
#: most every :data:`CAPPED_LOG_INTERVAL`): which, since when, and why.
W_CAPPED = ("%s: step %s failed %d times in %s; retrying every %.0f s: %s")
#: An archive's :data:`W_CAPPED` line is logged at most this often
#: (seconds), however small ``retry_max`` is.
CAPPED_LOG_INTERVAL = 60.0
I_HEALED = "callback %s works again, after %d failed attempts in %s"


class _Job:
    """One archive on its way through the chain."""

    def __init__(self, origin, path, step, lock, since=None, report=None):
        self.origin = origin        # where the archive was written
        self.path = path            # where it is now
        self.step = step            # next step to run
        self.lock = lock            # FileLock on the state file
        self.report = report        # ArchiveReport of its records, or None
        self.declared = False       # does the step declare its output...
        self.output = None          # ...and where it leaves the file
        self.saved = None           # what its state file says now
        self.attempts = 0           # failures of the current step
        self.size = _size(path)
        # when its oldest record was written (at worst: its last write)
        self.since = since if since is not None else _mtime(path)
        self.failing_since = None   # monotonic time of its first failure
        self.permanent = False      # is its last failure a permanent one?
        self.last_error = None      # ...and what it said (a line)
        self.capped_logged = None   # when its last W_CAPPED line was
        # the archive's own FileLock, until a state file holds the archive
        # (submit could not write it: a sibling must not take it over)
        self.archive_lock = None

    @property
    def state_path(self):
        return self.origin + STATE_SUFFIX


def _regular(path):
    """Is ``path`` a regular file (not a symlink)?"""
    try:
        return stat_mod.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _allowed(path, directory, forms):
    """May a state file in ``directory`` send the chain to ``path``? Only
    inside ``directory``, or where the chain's declared outputs put the
    archive (``forms``: a ``move`` destination), and never to a symlink or
    another file that is not a regular one."""
    if os.path.lexists(path) and not _regular(path):
        return False
    if os.path.abspath(path) in {os.path.abspath(f) for f in forms}:
        return True
    return files.is_within(path, directory)


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


class _Episode:
    """The failures of one step, from its first to its next success."""

    def __init__(self, now):
        self.started = now
        self.attempts = 0
        self.origins = set()    # the archives failing at this step
        self.kinds = set()      # permanent flags seen
        self.logged = now       # when the last line about it was logged


# -- the list of finished archives ---------------------------------------

def _identity(stat):
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def _shown(value):
    """A JSON value as a state file holds it, cut short, for a log line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_json(path):
    """``(value, problem)`` of the JSON file ``path``, a regular one:
    ``problem`` says why there is no value (None when there is, or when
    there is no file: value None)."""
    try:
        return json.loads(files.read_regular(path)), None
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, "cannot be read (%s)" % (exc.strerror or exc)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...
        return None, "does not parse (%s)" % exc


def _is_identity(entry):
    """Is ``entry`` what :func:`_identity` makes (three whole numbers)?"""
    return isinstance(entry, list) and len(entry) == 3 and all(
        type(value) is int for value in entry)


def _done_problem(done):
    """``(entries, problem)`` of what :data:`DONE_FILE` holds: the entries
    of the right shape, and what is wrong (None: nothing)."""
    if not isinstance(done, dict):
        return {}, "holds %s, not an object" % _shown(done)
    kept = {name: entry for name, entry in done.items()
            if _is_identity(entry)}
    if len(kept) < len(done):
        name = next(name for name in done if name not in kept)
        return kept, "lists %s as %s, not [inode, size, mtime]" % (
            json.dumps(name), _shown(done[name]))
    return done, None


def _read_done(directory):
    """``(done, sound)``: the entries of :data:`DONE_FILE` that have the
    right shape, ``{name: [inode, size, mtime_ns]}``, and whether the file
    had that shape (or is missing); what is wrong is said
    (:data:`W_BAD_DONE`)."""
    path = os.path.join(directory, DONE_FILE)
    done, problem = _read_json(path)
    if problem is None:
        done, problem = ({}, None) if done is None else _done_problem(done)
    else:
        done = {}
    if problem is not None:
        LOG.warning(W_BAD_DONE, path, problem)
    return done, problem is None


def _load_done(directory):
    """``{name: [inode, size, mtime_ns]}`` of :data:`DONE_FILE`."""
    return _read_done(directory)[0]


def _done_stamp(directory):
    """What changes when :data:`DONE_FILE` is replaced."""
    try:
        stat = os.stat(os.path.join(directory, DONE_FILE))
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _is_done(path, done):
    """Is the archive at ``path`` the one ``done`` lists as finished?"""
    entry = done.get(os.path.basename(path))
    if entry is None:
        return False
    try:
        return _identity(os.stat(path)) == entry
    except OSError:
        return False


def _update_done(directory, add=None):
    """Add ``add`` (a path in ``directory``) to its :data:`DONE_FILE` and
    drop the archives no longer there; the file is replaced atomically,
    and only when it changes or is of the wrong shape, under a ``flock`` on
    the directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released with the fd
        done, sound = _read_done(directory)
        names = set(os.listdir(directory))
        kept = {name: entry for name, entry in done.items()
                if name in names}
        if add is not None:
            kept[os.path.basename(add)] = _identity(os.stat(add))
        if kept != done or not sound:
            files.write_json_atomic(os.path.join(directory, DONE_FILE),
                                    kept).release()
    finally:
        os.close(fd)


def _state_problem(state, chain_names):
    """What is wrong with the shape of a state file's ``state`` for a
    shipper running ``chain_names`` (None: nothing). The saved report is
    checked where it is read (:func:`_report_from_state`)."""
    if not isinstance(state, dict):
        return "holds %s, not an object" % _shown(state)
    if state.get("done", True) is not True:
        return "says done is %s, not true" % _shown(state["done"])
    for key in ("path", "output"):
        value = state.get(key)
        if value is not None and not (isinstance(value, str) and value
                                      and "\0" not in value):
            return "says %s is %s, not a file name" % (key, _shown(value))
    step = state.get("step", 0)
    if type(step) is not int:
        return "says step is %s, not a whole number" % _shown(step)
    steps = len(chain_names)
    if state.get("chain") == chain_names and not 0 <= step < max(steps, 1):
        return "says step is %d, not one of the chain's %d (0 to %d)" % (
            step, steps, max(steps - 1, 0))
    return None


def _read_state(state_path, chain_names):
    """``(state, problem)`` of a state file: its content and None, or
    ``{}`` and what is wrong with it (it cannot be read, does not parse,
    or has the wrong shape: :func:`_state_problem`)."""
    state, problem = _read_json(state_path)
    if problem is None:
        problem = _state_problem(state, chain_names)
    return (state, None) if problem is None else ({}, problem)


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
        "earliest": report.earliest,
        "latest": report.latest,
    }


def _report_from_state(origin, data):
    """The report a state file saved, or None when it has none (or one
    that does not parse). A state file written before reports had a time
    range gives one without (``earliest``/``latest`` None: unknown, so
    readers never prune that archive by time)."""
    if data is None:
        return None
    try:
        earliest, latest = data.get("earliest"), data.get("latest")
        if not all(v is None or isinstance(v, str)
                   for v in (earliest, latest)):
            raise TypeError("earliest/latest")
        if not all(data[key] is None or isinstance(data[key], dict)
                   for key in ("first_metadata", "last_metadata")):
            raise TypeError("first/last metadata")
        if not (data["torn_offset"] is None
                or type(data["torn_offset"]) is int):
            raise TypeError("torn_offset")
        return archive.ArchiveReport(
            origin, records=int(data["records"]), size=int(data["size"]),
            versions={int(v) for v in data["versions"]},
            skipped=[archive.Skipped(origin, int(start), int(end),
                                     str(reason))
                     for start, end, reason in data["skipped"]],
            torn_offset=data["torn_offset"],
            first_metadata=data["first_metadata"],
            last_metadata=data["last_metadata"],
            earliest=earliest, latest=latest)
    except (AttributeError, KeyError, TypeError, ValueError):
        LOG.warning("%s%s: the saved archive report does not parse; it is "
                    "read again from the archive", origin, STATE_SUFFIX)
        return None


def _move_index(source, target):
    """Move an index file to ``target`` (on another file system: copy it,
    durably, then remove it)."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(source, "rb") as f:
            data = f.read()
        index.write_file(target, data,
                         mode=stat_mod.S_IMODE(os.stat(source).st_mode))
        os.unlink(source)
    files.fsync_directory(target)


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
        ``callback_failed(name, permanent)`` and ``failing(by_kind)``
        methods (see :class:`~shoebox_worker.consume.stats.Stats`).
    :param index_fields: the fields an archive recovered without a state
        file is indexed by (``[archive] index_fields``; empty: none).
    :param evidence: a :class:`~shoebox_worker.integrity.chain.Chain`
        (``[integrity]``), or None: each archive a step returned as
        :class:`~shoebox_worker.contract.Stored` is recorded in it before
        the archive's state moves past that step, the chain is ticked
        between archives (and at least every second), and closed (its
        final digest) by the shipping thread when it stops, within
        :meth:`stop`'s timeout (what it cannot put then waits in the
        chain's ``outgoing/`` for the next start).
    """

    #: A failing step is logged again at most this often (seconds).
    failure_log_interval = FAILURE_LOG_INTERVAL

    def __init__(self, chain, retry_initial=1.0, retry_max=300.0,
                 stats=None, index_fields=(), evidence=None):
        self.chain = chain
        self.evidence = evidence
        self.index_fields = tuple(index_fields)
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
        self._episodes = {}         # step name -> _Episode while failing
        self._evidence_error = None  # the chain's last failure, as logged

    # -- what the consumer sees ---------------------------------------

    def submit(self, path, lock=None, since=None, report=None):
        """Hand over a closed archive; returns at once.

        Writes its state file (durably) before returning, so the archive is
        shipped even if the process dies right after. When the disk refuses
        it, the shipping thread writes it before the first step (retrying
        with backoff), and the archive stays locked until then: a killed
        process leaves an unlocked archive that the next start ships.

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
        if self.chain_names:
            try:
                job.declared, job.output = self.chain.output_path(0, path)
            except exceptions.CallbackError:
                pass  # the shipping thread asks again, and retries
        try:
            self._save(job)
        except OSError as exc:  # the disk refused it: the thread retries
            job.attempts = 1
            job.archive_lock = lock
            LOG.error(E_LOCAL, path, exc, 0.0)
        else:
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

    def stuck(self):
        """True when archives are left and the last attempt of each one
        failed in a way retrying will not fix (a refused key): only an
        operator can move them on (``--idle-exit`` then exits 1)."""
        with self._cond:
            return bool(self._jobs) and all(
                job.permanent and job.failing_since is not None
                for job in self._jobs.values())

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

    def recover(self, directory, pattern_match, on_record=None,
                on_damage=None, before_submit=None):
        """Find what a previous run left in ``directory`` and queue it.

        :param pattern_match: ``f(name) -> bool``: is this file name one of
            our archives (as the writer names them)?
        :param on_record: called with each valid record of each archive
            read here (those without a state file), as
            :func:`~shoebox_worker.archive.inspect_file` passes them, before
            anything is shipped (the worker finds its stream offsets so).
        :param on_damage: called with ``(path, skipped)`` for each damaged
            range with valid records after it (not a torn tail) in those
            archives: records may be missing before the ones after it.
        :param before_submit: called once, after every archive was read and
            before the state file of any of them is written (the worker
            saves its stream offsets then: an archive with a state file is
            not read again at the next start, so they must cover it first).
        :returns: the number of archives queued.
        """
        if not os.path.isdir(directory):
            if before_submit is not None:
                before_submit()
            return 0
        names = sorted(os.listdir(directory))
        count = 0
        for name in names:  # a crash mid-rename leaves *.tmp behind
            if name.endswith((STATE_SUFFIX + ".tmp", index.SUFFIX + ".tmp")):
                try:
                    files.remove_stale(os.path.join(directory, name))
                except BlockingIOError:
                    pass  # a live worker is writing it
        if os.path.lexists(os.path.join(directory, DONE_FILE)):
            # forget the archives gone since; one of the wrong shape is
            # said here, once, and written again
            try:
                _update_done(directory)
            except OSError as exc:  # a folder of that name: said when used
                LOG.warning("cannot write %s: %s",
                            os.path.join(directory, DONE_FILE), exc)
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(STATE_SUFFIX) and name != DONE_FILE:
                if not _regular(path):
                    LOG.error(E_NOT_REGULAR, path)
                    continue
                count += self._resume(path)
        done_stamp = _done_stamp(directory)
        done = _load_done(directory)
        names = sorted(os.listdir(directory))
        found = []  # (path, lock, report): submitted after before_submit
        for name in names:
            path = os.path.join(directory, name)
            if not pattern_match(name) or os.path.exists(path +
                                                         STATE_SUFFIX):
                continue
            if _is_done(path, done):
                continue
            if not _regular(path):
                if os.path.lexists(path):
                    LOG.error(E_NOT_REGULAR, path)
                continue
            # a live worker holds its archive's lock from the moment the
            # file exists (roll_manager.unique_path): an unlocked one is a
            # dead worker's, even an empty one just created
            lock = FileLock.try_acquire(path, create=False)
            if lock is None:
                continue  # being written by a live worker
            if os.path.exists(path + STATE_SUFFIX):
                lock.release()
                continue  # handed over between our two looks
            # finished since we read the list? It is written before the
            # state file goes, so a fresh look tells.
            if _done_stamp(directory) != done_stamp:
                done_stamp = _done_stamp(directory)
                done = _load_done(directory)
                if _is_done(path, done):
                    lock.release()
                    continue
            if os.path.getsize(path) == 0:
                LOG.warning("removing empty archive %s left by a killed run",
                            path)
                os.unlink(path)
                lock.release()
                continue
            builder = index.Builder(self.index_fields) \
                if self.index_fields else None
            try:
                report = self._recovered_report(
                    path, self._indexing(builder, on_record), on_damage)
            except Exception as exc:  # shipped as it is: never stranded
                LOG.error("%s: cannot read it for its report (%s); shipping "
                          "it as it is", path, exc)
                report = builder = None
            self._rebuild_index(path, builder)
            found.append((path, lock, report))
        if before_submit is not None:
            before_submit()
        for path, lock, report in found:
            LOG.info("shipping %s, left by a previous run", path)
            self.submit(path, lock, report=report)
            count += 1
        self._remove_orphan_indexes(directory)
        return count

    @staticmethod
    def _indexing(builder, on_record):
        """``on_record`` that also adds each record to ``builder``."""
        if builder is None:
            return on_record

        def collect(found):
            metadata = found[3]
            builder.add_notification(metadata.get("timestamp"),
                                     index.notification_of(found[4]))
            if on_record is not None:
                on_record(found)
        return collect

    @staticmethod
    def _rebuild_index(path, builder):
        """Write the index of a recovered archive (its records as read,
        the torn tail cut), replacing one its run may have left; a missing
        one when it cannot be written (best effort)."""
        target = index.sidecar(path)
        try:
            if builder is None:
                if os.path.lexists(target):
                    os.unlink(target)  # it may describe other records
                return
            index.write_file(target, builder.to_bytes(),
                             mode=stat_mod.S_IMODE(os.stat(path).st_mode))
        except OSError as exc:
            LOG.warning("%s: cannot write its index (%s); shipping it "
                        "without one", path, exc)

    @staticmethod
    def _remove_orphan_indexes(directory):
        """Remove each index whose archive is gone and that no state file
        can lead an archive to (a state file ``O.ship`` can when ``O`` is
        a prefix of the index's name: every step names its output after
        its input)."""
        names = os.listdir(directory)
        origins = [name[:-len(STATE_SUFFIX)] for name in names
                   if name.endswith(STATE_SUFFIX) and name != DONE_FILE]
        for name in names:
            if not name.endswith(index.SUFFIX):
                continue
            path = os.path.join(directory, name)
            archive_name = name[:-len(index.SUFFIX)]
            if os.path.lexists(path[:-len(index.SUFFIX)]) or any(
                    archive_name.startswith(origin) for origin in origins):
                continue
            if not _regular(path):
                continue
            LOG.info("removing %s: its archive is gone", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @staticmethod
    def _recovered_report(path, on_record=None, on_damage=None):
        """Read an archive left by a killed run for its report, and cut off
        a torn tail (the record being written when that run died; it was
        never acked), saying so in one line.

        :param on_record: passed to :func:`~shoebox_worker.archive.
            inspect_file` (a torn tail holds no valid record).
        :param on_damage: called with ``(path, skipped)`` for each damaged
            range before the end.
        :returns: the report of what is left.
        """
        report = archive.inspect_file(path, on_record=on_record, quiet=True)
        tail = report.skipped[-1] if report.torn_offset is not None \
            else None
        for skipped in report.skipped:
            if skipped is not tail:  # damage before the end: said as read
                LOG.warning("%s: skipped bytes %d-%d: %s", path,
                            skipped.start, skipped.end, skipped.reason)
                if on_damage is not None:
                    on_damage(path, skipped)
        if tail is None:
            return report
        cut = archive.cut_torn_tail(path, report)
        LOG.warning("%s: cut a torn tail of %d bytes at offset %d (%s: a "
                    "record being written when the last run died; it was "
                    "never acked)", path, cut[1], cut[0], tail.reason)
        # no valid record was in the tail: only its damaged range goes
        return dataclasses.replace(report, skipped=report.skipped[:-1],
                                   size=cut[0], torn_offset=None)

    def _resume(self, state_path):
        lock = FileLock.try_acquire(state_path, create=False)
        if lock is None:
            return 0
        origin = state_path[:-len(STATE_SUFFIX)]
        state, problem = _read_state(state_path, self.chain_names)
        directory = os.path.dirname(origin) or "."
        if state.get("done") or _is_done(origin, _load_done(directory)):
            # finished: by an older version, which kept a state file saying
            # so, or by a run that died before it removed this one
            if state.get("done") and os.path.exists(origin):
                _update_done(directory, origin)
            self._drop_state(state_path, lock)
            return 0
        if problem is not None:
            return self._restart(state_path, lock, problem)
        path = state.get("path", origin)
        step = int(state.get("step", 0))
        declared, output = "output" in state, state.get("output")
        if state.get("chain") != self.chain_names:
            LOG.warning("%s: the callback chain changed since it was "
                        "started (%s, now %s); running the new chain from "
                        "its first step", origin, state.get("chain"),
                        self.chain_names)
            step, declared = 0, False
        forms = self.chain.forms(origin)
        if path is not None and not _allowed(path, directory, forms):
            LOG.error(E_REFUSED, state_path, path, directory)
            if not _regular(origin):
                lock.release()  # left alone, for an operator to look at
                return 0
            path, step, declared = origin, 0, False
        if declared and output is not None and \
                not _allowed(output, directory, forms):
            LOG.error(E_REFUSED, state_path, output, directory)
            declared = False
        if path is None or not os.path.exists(path):
            if declared and step < len(self.chain_names) and (
                    output is None or os.path.exists(output)):
                # the step had done its work when the last run died
                LOG.info("%s: step %d (%s) had left it at %s; going on",
                         origin, step, self.chain_names[step], output)
                path, step = output, step + 1
            elif os.path.exists(origin):
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

    def _restart(self, state_path, lock, problem):
        """Ship from the first step the archive of a state file of the
        wrong shape (``problem``: what is wrong), or leave both alone when
        the archive is not where it was written."""
        origin = state_path[:-len(STATE_SUFFIX)]
        if not _regular(origin):
            LOG.warning(W_BAD_STATE_LEFT, state_path, problem, origin)
            lock.release()
            return 0
        LOG.warning(W_BAD_STATE, state_path, problem, origin)
        self._enqueue(_Job(origin, origin, 0, lock), time.monotonic())
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

    def _close_evidence(self):
        """The chain's final digest (best effort: what it cannot put now
        waits in its ``outgoing/`` for the next start)."""
        if self.evidence is None:
            return
        try:
            self.evidence.close()
        except Exception:  # the archives are shipped: never fail for it
            LOG.exception("integrity: the final digest failed")

    def _tick_evidence(self):
        """Tick the chain; a failure is logged when it differs from the
        last one (the next tick, a second later, tries again)."""
        try:
            self.evidence.tick()
        except Exception as exc:
            said = "%s: %s" % (type(exc).__name__, exc)
            if said != self._evidence_error:
                LOG.error("integrity: cannot make a digest (tried again "
                          "every second; archives keep shipping): %s", said)
            self._evidence_error = said
        else:
            self._evidence_error = None

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
        """The next job due; None after up to a second without one (or
        when stopping: :attr:`_stopping` tells)."""
        with self._cond:
            if self._stopping:
                return None
            if self._heap:
                wait = self._heap[0][0] - time.monotonic()
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
            if job is not None:
                self._run_job(job)
            if self.evidence is not None:
                self._tick_evidence()
            with self._cond:
                if self._stopping:
                    break
        # in this thread, so that stop()'s timeout bounds it too
        self._close_evidence()

    def _run_job(self, job):
        try:
            self._ship(job)
        except OSError as exc:  # a state file the disk refused (full)
            job.attempts += 1
            delay = self._delay(job.attempts)
            if job.attempts == 1:
                LOG.error(E_LOCAL, job.origin, exc, delay)
            else:
                LOG.debug(E_LOCAL_AGAIN, job.origin, job.attempts, exc)
            self._retry(job, delay)
        except Exception as exc:  # never let the thread die
            job.attempts += 1
            if job.attempts == 1:
                LOG.exception("unexpected error shipping %s", job.path)
            else:
                LOG.debug("unexpected error shipping %s again (attempt "
                          "%d): %s", job.path, job.attempts, exc)
            self._retry(job)
        finally:
            with self._cond:
                self._busy = None

    def _carry_index(self, job, also=()):
        """Put the archive's index beside it (``<job.path>.index``) from
        wherever the chain's outputs (or ``also``) put it before, or
        remove it once the archive is gone; best effort."""
        target = None if job.path is None else index.sidecar(job.path)
        for form in self.chain.forms(job.origin) + list(also):
            found = index.sidecar(form)
            if found == target or not _regular(found):
                continue
            try:
                if target is None or os.path.lexists(target):
                    os.unlink(found)
                    files.fsync_directory(found)
                else:
                    _move_index(found, target)
            except OSError as exc:
                LOG.warning("%s: cannot move its index %s (%s)", job.origin,
                            found, exc)

    def _ship(self, job):
        self._carry_index(job)  # a crash may have left it behind
        while job.step < len(self.chain_names) and job.path is not None:
            if self._stopping:
                self._enqueue(job, time.monotonic())
                return
            name = self.chain_names[job.step]
            if job.report is None and self.chain.wants_report(job.step):
                job.report = _inspect(job.path)
            started = time.monotonic()
            try:
                job.declared, job.output = self.chain.output_path(job.step,
                                                                  job.path)
                # where the step leaves the file is on disk before it runs
                self._save(job)
                new_path = self.chain.run_step(job.step, job.path,
                                               job.report)
            except exceptions.CallbackError as exc:
                self._failed(job, name, exc)
                return
            if self.evidence is not None and isinstance(
                    new_path, contract.Stored):
                # durable before the state moves past the step (a crash
                # runs the step again, which finds the object there)
                self.evidence.record(new_path, job.report, job.origin)
            if new_path is not None:
                new_path = str(new_path)
            if self.stats is not None:
                self.stats.callback_done(name, time.monotonic() - started)
            self._worked(job, name)
            if new_path != job.output:
                LOG.warning(W_UNDECLARED, name, job.path, new_path,
                            job.output)
            old, job.path = job.path, new_path
            job.step += 1
            job.size = _size(new_path)
            if new_path != old:
                self._carry_index(job, (old,))
        self._finish(job)

    def _delay(self, attempts, permanent=False):
        if permanent:
            base = self.retry_max
        else:
            base = min(self.retry_max,
                       self.retry_initial * 2 ** (attempts - 1))
        return base * random.uniform(0.75, 1.0)

    def _failed(self, job, name, exc):
        """Step ``name`` failed on ``job``: count it, log it (see the
        module documentation) and retry it later."""
        now = time.monotonic()
        job.attempts += 1
        job.permanent = exc.permanent
        job.last_error = "step %s: %s" % (name, exc.message) + (
            "; %s" % exc.hint if exc.permanent and exc.hint else "")
        if job.failing_since is None:
            job.failing_since = now  # monotonic: a clock step is no failure
        if self.stats is not None:
            self.stats.callback_failed(name, exc.permanent)
        delay = self._delay(job.attempts, exc.permanent)
        capped = exc.permanent or (self.retry_initial
                                   * 2 ** (job.attempts - 1) >= self.retry_max)
        with self._cond:
            episode = self._episodes.get(name)
            new = episode is None
            if new:
                episode = self._episodes[name] = _Episode(now)
            episode.attempts += 1
            episode.origins.add(job.origin)
            kind_is_new = exc.permanent not in episode.kinds
            episode.kinds.add(exc.permanent)
            due = now - episode.logged >= self.failure_log_interval
            if kind_is_new or due:
                episode.logged = now
        if kind_is_new and exc.permanent:
            LOG.error(E_PERMANENT, exc, exc.hint or "see the error",
                      self.retry_max)
        elif kind_is_new:
            LOG.error(E_FAILED, exc, job.attempts, delay)
        elif due:
            LOG.error(E_STILL, name, episode.attempts,
                      exceptions.duration(now - episode.started),
                      len(episode.origins), exc)
        else:
            LOG.debug(E_FAILED, exc, job.attempts, delay)
        if capped and not (kind_is_new and new) and (
                job.capped_logged is None
                or now - job.capped_logged >= CAPPED_LOG_INTERVAL):
            job.capped_logged = now
            LOG.warning(W_CAPPED, job.origin, name, job.attempts,
                        exceptions.duration(now - job.failing_since),
                        self.retry_max, exc)
        self._report_failing()
        self._retry(job, delay)

    def _worked(self, job, name):
        """Step ``name`` succeeded on ``job``."""
        was_failing = job.failing_since is not None
        job.attempts = 0
        job.failing_since = None
        job.permanent = False
        job.capped_logged = None
        healed = None
        with self._cond:
            episode = self._episodes.get(name)
            if episode is not None:
                episode.origins.discard(job.origin)
                if not episode.origins:
                    healed = self._episodes.pop(name)
        if healed is not None:
            LOG.info(I_HEALED, name, healed.attempts,
                     exceptions.duration(time.monotonic() - healed.started))
        if was_failing:
            self._report_failing()

    def _report_failing(self):
        """Tell the stats how many archives fail now, and since when."""
        if self.stats is None:
            return
        by_kind = {"transient": (0, None), "permanent": (0, None)}
        reasons = {}
        with self._cond:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.failing_since is None:
                continue
            kind = "permanent" if job.permanent else "transient"
            count, since = by_kind[kind]
            if since is None or job.failing_since < since:
                since = job.failing_since
                reasons[kind] = "%s: %s" % (job.origin, job.last_error)
            by_kind[kind] = (count + 1, since)
        self.stats.failing(by_kind, reasons)

    def _retry(self, job, delay=None):
        if delay is None:
            delay = self._delay(max(job.attempts, 1))
        self._enqueue(job, time.monotonic() + delay)

    @staticmethod
    def _drop_state(state_path, lock):
        """Remove a state file (durably), then release its lock."""
        try:
            os.unlink(state_path)
        except FileNotFoundError:
            pass
        files.fsync_directory(state_path)
        lock.release()

    def _save(self, job):
        """Write the job's state file (unless it says that already): where
        the archive is, its next step, where that step leaves it (when the
        step declares it) and its report."""
        state = {"path": job.path, "step": job.step,
                 "chain": self.chain_names}
        if job.declared:
            state["output"] = job.output
        if job.report is not None:
            state["report"] = _report_to_state(job.report)
        if state == job.saved:
            return
        lock = files.write_json_atomic(job.state_path, state)
        job.saved = state
        old, job.lock = job.lock, lock
        old.release()
        if job.archive_lock is not None:
            job.archive_lock.release()
            job.archive_lock = None

    @staticmethod
    def _bind_index(path):
        """Bind the index beside the archive the chain leaves at ``path``
        to that file (best effort: an index left unbound only prunes
        nothing)."""
        try:
            index.bind_file(path)
        except (exceptions.ShoeboxError, OSError) as exc:
            LOG.warning(W_UNBOUND, index.sidecar(path), path, exc)

    def _finish(self, job):
        """The chain is done with this archive: drop its state (its index
        first, when the archive is gone)."""
        if job.path is None or not os.path.exists(job.path):
            self._carry_index(job)
        else:
            self._bind_index(job.path)
        remains = job.path is not None and os.path.exists(job.path) and \
            os.path.abspath(job.path) == os.path.abspath(job.origin)
        if remains:
            # still where it was written and named as written: list it as
            # done, or the next start would take it for a crashed one
            _update_done(os.path.dirname(job.origin) or ".", job.origin)
        self._drop_state(job.state_path, job.lock)
        with self._cond:
            self._jobs.pop(job.origin, None)
            self._cond.notify_all()
        LOG.info("shipped %s%s", job.origin,
                 "" if job.path in (None, job.origin) else
                 " (now %s)" % job.path)
