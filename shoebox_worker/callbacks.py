"""Archive callbacks: what happens to an archive once it is closed.

A callback gets each archive the roll manager closes (``on_close``) and
returns the path the next one should get; :class:`CallbackChain` runs
several in order. The contract is in :mod:`shoebox_worker.contract`; the
built-in steps (``gzip``, ``swift``, ``delete``, ...) are in
:mod:`shoebox_worker.ship.steps` and :mod:`shoebox_worker.ship.swift`.

A step that wants to know what is in the archive (record count, first and
last metadata, format versions) declares a keyword-only ``report``
parameter, ``on_close(self, filename, *, report=None)``; the chain then
passes it the :class:`~shoebox_worker.archive.ArchiveReport` it was given
(the writer's, made at roll time), so the step need not read the file for
it. Other steps are called ``on_close(filename)``. The chain decides which
is which once, from each ``on_close`` signature, when it is built.

A step that declares ``output_path(filename)`` says where ``on_close``
will leave the file before it runs (:meth:`CallbackChain.output_path`);
the shipper records that in the archive's state file first, so a crash
while the step runs never strands the archive under a name nothing
knows (see :mod:`shoebox_worker.contract`).
"""

import inspect

from shoebox_worker import exceptions

__all__ = [
    "ArchiveCallback",
    "CallbackChain",
]

class ArchiveCallback:
    """Convenience base: ``on_open`` does nothing, ``on_close`` passes the
    file on unchanged."""

    def on_open(self, filename):
        """Called when an archive is opened."""

    def on_close(self, filename):
        """Called when an archive is closed; returns its (new) path."""
        return filename


def _name_of(callback):
    return getattr(callback, "name", None) or type(callback).__name__


def _takes_report(callback):
    """Does ``callback.on_close`` declare a keyword-only ``report``?"""
    try:
        parameters = inspect.signature(callback.on_close).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    parameter = parameters.get("report")
    return (parameter is not None
            and parameter.kind is inspect.Parameter.KEYWORD_ONLY)


class CallbackChain(ArchiveCallback):
    """Run callbacks in order, each on the path the previous returned.

    :param callbacks: callbacks, or ``(name, callback)`` pairs (names are
        used in errors and logs).
    """

    def __init__(self, callbacks=()):
        #: ``(name, callback)`` pairs, in order.
        self.steps = []
        for item in callbacks:
            if isinstance(item, tuple):
                self.steps.append(item)
            else:
                self.steps.append((_name_of(item), item))
        self._wants_report = tuple(_takes_report(callback)
                                   for _, callback in self.steps)

    def __len__(self):
        return len(self.steps)

    def on_open(self, filename):
        for _, callback in self.steps:
            on_open = getattr(callback, "on_open", None)
            if on_open is not None:
                on_open(filename)

    def output_path(self, index, filename):
        """Where step ``index`` will leave ``filename``, as it declares.

        :returns: ``(declared, path)``: ``(True, path)`` from the step's
            ``output_path`` (``path`` None: the step removes the file), or
            ``(False, filename)`` for a step that declares nothing (taken
            to leave the file where it got it).
        :raises CallbackError: the step's ``output_path`` failed.
        """
        name, callback = self.steps[index]
        declare = getattr(callback, "output_path", None)
        if declare is None:
            return False, filename
        try:
            path = declare(filename)
        except Exception as exc:
            raise exceptions.CallbackError(
                "output_path: %s: %s" % (type(exc).__name__, exc),
                callback=name, filename=filename) from exc
        return True, None if path is None else str(path)

    def forms(self, filename):
        """Every path the chain's declared outputs lead ``filename``
        through: ``[filename, after step 0, after step 1, ...]``, up to
        the step that removes it or the first that cannot tell (steps
        that declare nothing count as leaving the file where it is)."""
        forms = [filename]
        for index in range(len(self.steps)):
            try:
                _, filename = self.output_path(index, filename)
            except exceptions.CallbackError:
                break
            if filename is None:
                break
            forms.append(filename)
        return forms

    def wants_report(self, index):
        """Does step ``index`` take the archive's report?"""
        return self._wants_report[index]

    def run_step(self, index, filename, report=None):
        """Run step ``index`` on ``filename``.

        :param report: the archive's
            :class:`~shoebox_worker.archive.ArchiveReport` (or None), passed
            on to a step that declares ``report``.
        :returns: the path the step returned (None: the file is gone).
        :raises CallbackError: naming the step and the file; the file is
            left where it was. A step's own :class:`CallbackError` (such
            as swift's ``UploadError``) goes up as it is, its step and
            file filled in when it names none; any other exception is
            wrapped in one, ``permanent`` when it is a
            :class:`~shoebox_worker.exceptions.PermanentError`.
        """
        name, callback = self.steps[index]
        try:
            if self._wants_report[index]:
                return callback.on_close(filename, report=report)
            return callback.on_close(filename)
        except exceptions.CallbackError as exc:
            if exc.callback is None:
                exc.callback = name
            if exc.filename is None:
                exc.filename = filename
            raise
        except exceptions.PermanentError as exc:
            raise exceptions.CallbackError(
                exc.message, callback=name, filename=filename,
                permanent=True, hint=exc.hint) from exc
        except Exception as exc:
            raise exceptions.CallbackError(
                "%s: %s" % (type(exc).__name__, exc), callback=name,
                filename=filename) from exc

    def on_close(self, filename, start=0, *, report=None):
        """Run the chain from step ``start``.

        :param report: passed to the steps that take it (see the module
            documentation).
        :returns: the final path, or None when a step removed the file.
        :raises CallbackError: the first failing step; later steps do not
            run and the file stays where that step got it.
        """
        for index in range(start, len(self.steps)):
            if filename is None:
                break
            filename = self.run_step(index, filename, report)
        return filename
