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
Declare them keyword-only with defaults and coerce them (``int(level)``);
an option the constructor does not take stops the start with a config
error, so an operator's typo never goes unnoticed. Constructors must not
connect anywhere: ``check-config`` builds them too.

**Threads.** The worker calls a roll checker from its consumer thread
only, and each callback from its shipping thread only.
"""

import typing

__all__ = ["RollChecker", "ArchiveCallback"]


@typing.runtime_checkable
class RollChecker(typing.Protocol):
    """Decides when the active archive rolls over to a new file."""

    def start(self, archive) -> None:
        """Called once when a new archive is opened.

        :param archive: the new :class:`~shoebox_worker.archive.ArchiveWriter`
            (``tell()`` gives its size in bytes, ``records`` its count).
        """

    def check(self, archive) -> bool:
        """Should the archive roll now?

        Called after every write, and about once a second while no message
        arrives, so time-based rules fire on an idle queue. Must be cheap.

        :param archive: the active archive.
        :returns: True to close it and open a new one on the next write.
        """


@typing.runtime_checkable
class ArchiveCallback(typing.Protocol):
    """One step of the chain run on every archive (compress, upload, ...)."""

    def on_open(self, filename: str) -> None:
        """Optional: called when a new archive file is created.

        Only the library's roll managers call it (when the chain is their
        ``archive_callback``). The worker does not: there, callbacks run in
        the shipping thread only, on closed archives.
        """

    def on_close(self, filename: str) -> str | None:
        """Called for every closed archive, in chain order.

        :param filename: the path the previous step returned (the closed
            archive for the first step).
        :returns: the path the next step should get: the same one, a new
            one (``gzip`` returns ``x.events.gz``), or None when the file
            is gone (``delete``), which ends the chain.
        :raises Exception: anything, on failure. The file must then still
            be where ``filename`` says: the worker keeps it, logs the error
            naming this step and the file, and retries this step later
            with capped exponential backoff. So a step may run again on
            the same file after a failure or a crash: make it idempotent
            (write to a temporary name and rename; upload under a name
            derived from the file's name).
        """
