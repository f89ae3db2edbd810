"""The plugin contract: what a roll checker and an archive callback are.

This module is the one place that says it. A plugin needs no base class
from this project: any class with these methods works, registered as an
entry point in ``shoebox.roll_checkers`` or ``shoebox.callbacks``::

    [options.entry_points]
    shoebox.callbacks =
        tag = mypackage.callbacks:TagCallback

and selected by name in the worker's config (``callbacks = gzip, tag``).

**Construction.** The worker builds each plugin once at start with the
options of its own config section as keyword arguments, all of them
strings (``[callback:tag] suffix = .x`` gives ``TagCallback(suffix=".x")``).
Declare them keyword-only with defaults and coerce them, e.g. with
:mod:`shoebox_worker.options`
(``options.coerce("level", level, options.integer_in(1, 9))``), whose
error names the option; a third-party plugin may instead raise
``ValueError("level: expected 1 to 9, got '99'")``. Either way the worker
stops with one line naming the file, section and option, as it does for
an option the constructor does not take, so an operator's typo never goes
unnoticed. Constructors must not connect anywhere: ``check-config``
builds them too.

**Threads.** The worker calls a roll checker from its consumer thread
only, and each callback from its shipping thread only.

**Crashes.** A step may be killed at any system call. To be safe, a step
that renames, moves or removes the archive declares where it leaves it
(:meth:`ArchiveCallbackSpec.output_path`), and every step is idempotent
and makes its temporary files exclusively (see there). The built-in steps
all do; docs/shipping.md tells how the worker uses it.

The Protocols are named ``...Spec`` because they only describe: the
convenience base classes a plugin may subclass are
:class:`shoebox_worker.roll_checker.RollChecker` and
:class:`shoebox_worker.callbacks.ArchiveCallback`.
"""

import typing

__all__ = ["RollCheckerSpec", "ArchiveCallbackSpec", "Stored"]


class Stored(str):
    """The path a storing step returns (a ``str``: the next step gets it
    as any path), with what the store holds once the step verified it.

    :ivar name: the object's name in its container.
    :ivar size: its size in bytes.
    :ivar sha256: the hex SHA-256 of its bytes.
    :ivar etag: the ETag the store gave it (what a listing shows).
    """

    def __new__(cls, path, *, name, size, sha256, etag):
        self = super().__new__(cls, path)
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.etag = etag
        return self


@typing.runtime_checkable
class RollCheckerSpec(typing.Protocol):
    """Decides when the active archive rolls over to a new file."""

    def start(self, archive) -> None:
        """Called once when a new archive is opened.

        :param archive: the new :class:`~shoebox_worker.archive.ArchiveWriter`
            (``tell()`` gives its size in bytes, ``records`` its count).
        """

    def check(self, archive) -> bool:
        """Should the archive roll now?

        Called after every write, and every tick (0.1 s,
        ``shoebox_worker.consume.worker.TICK``) while no message arrives,
        so time-based rules fire on an idle queue. Must be cheap.

        :param archive: the active archive.
        :returns: True to close it and open a new one on the next write.
        """


@typing.runtime_checkable
class ArchiveCallbackSpec(typing.Protocol):
    """One step of the chain run on every archive (compress, upload, ...)."""

    def on_open(self, filename: str) -> None:
        """Optional: called when a new archive file is created.

        Only the library's roll managers call it (when the chain is their
        ``archive_callback``). The worker does not: there, callbacks run in
        the shipping thread only, on closed archives.
        """

    def output_path(self, filename: str) -> str | None:
        """Optional, and needed by every step that renames, moves or
        removes the file: where :meth:`on_close` will leave ``filename``.

        The worker calls it just before ``on_close`` and records the
        answer in the archive's state file (fsynced) before ``on_close``
        runs. If the process dies while the step runs, the next start
        finds either ``filename`` (and runs the step again: it must be
        idempotent) or, when ``filename`` is gone, the path declared here
        (the step is then done, and the chain goes on from there). Without
        it, a step that removes ``filename`` and dies before it returns
        strands the archive: the state file names a file that is gone, and
        the new name is one the recovery scan never looks for.

        It must be a pure function of ``filename`` (and the step's own
        options): no I/O, the same answer every time, the very path
        ``on_close`` returns. A step that declares nothing is taken to
        leave the file where it got it (an upload, a digest beside it): if
        such a step returns another path anyway, the worker follows it but
        logs a warning, as the crash window above is then open.

        Put what the step makes either where it says here or outside the
        working directory; and make its temporary files safely: create
        them exclusively and never through a symlink
        (``os.open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW,
        0o666)``), replace a leftover of a crash (remove it and create it
        again: the worker runs one step on one archive at a time, across
        all workers sharing the folder), fsync, then rename into place.
        :func:`shoebox_worker.files.create_temporary` does all of that.

        A state file may only send the chain to a path inside the working
        directory or to one a step declares here for that archive (a
        ``move`` destination): any other is refused.

        **The archive's index.** When the archive has one
        (:mod:`shoebox_worker.index`), it is the file
        ``<filename>.index`` beside the file a step gets. A step leaves
        it alone: the worker moves it to follow the path the step
        returns (declared or not) and removes it when the step removed
        the archive. A step that ships the archive somewhere may ship the
        index too (``swift`` uploads it as ``<object>.index``); it
        describes the records, so a step that changes the bytes only
        (compression) keeps it valid.

        :returns: the path ``on_close(filename)`` will return; None when it
            removes the file (``delete``).
        """

    def on_close(self, filename: str) -> str | None:
        """Called for every closed archive, in chain order.

        :param filename: the path the previous step returned (the closed
            archive for the first step).
        :param report: optional, for the steps that want it: an
            ``on_close`` that declares a keyword-only parameter ``report``
            (``def on_close(self, filename, *, report=None)``) is called as
            ``on_close(filename, report=...)`` with the archive's
            :class:`~shoebox_worker.archive.ArchiveReport` (its records,
            format versions, and the first and last records' metadata),
            known from the writer when the archive rolled, so the step
            need not read the file. It describes the archive as written:
            ``report.filename`` is the closed archive, while ``filename``
            may since have been compressed or renamed by earlier steps.
            Every other ``on_close`` is called ``on_close(filename)``.
        :returns: the path the next step should get: the same one, a new
            one (``gzip`` returns ``x.events.gz``), or None when the file
            is gone (``delete``), which ends the chain. A step that stores
            the archive in an object store may return the path as a
            :class:`Stored` (a ``str``) that also says what the store holds
            now; with ``[integrity]`` on, the worker lists it in its next
            signed digest (docs/integrity.md).
        :raises Exception: anything, on failure. The file must then still
            be where ``filename`` says: the worker keeps it, logs the error
            naming this step and the file, and retries this step later
            with capped exponential backoff. So a step may run again on
            the same file after a failure or a crash: make it idempotent
            (write to a temporary name and rename; upload under a name
            derived from the file's name).
        :raises shoebox_worker.exceptions.PermanentError: a failure that
            retrying will not fix until an operator changes something
            (credentials refused, a name the destination refuses):
            ``raise PermanentError("login refused", hint="check
            [callback:tag] password")``. The worker logs it at once as one
            that will not heal by retrying, with the hint, counts it in
            ``shoebox_callback_permanent_failures_total``, and still retries
            it, every ``retry_max`` seconds, so that the fix heals the
            worker without a restart. (A step of this project may instead
            raise a :class:`~shoebox_worker.exceptions.CallbackError` with
            ``permanent=True``; its message is then logged as it is, not
            wrapped again.)
        """
