"""Archive callbacks: what happens to an archive once it is closed.

A callback gets each archive the roll manager closes (``on_close``) and
returns the path the next one should get; :class:`CallbackChain` runs
several in order. The contract is in :mod:`shoebox_worker.contract`; the
built-in steps (``gzip``, ``swift``, ``delete``, ...) are in
:mod:`shoebox_worker.ship.steps` and :mod:`shoebox_worker.ship.swift`.
"""

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


class CallbackChain(ArchiveCallback):
    """Run callbacks in order, each on the path the previous returned.

    :param callbacks: callbacks, or ``(name, callback)`` pairs (names are
        used in errors and logs).
    """

    def __init__(self, callbacks=()):
        self.steps = []
        for item in callbacks:
            if isinstance(item, tuple):
                self.steps.append(item)
            else:
                self.steps.append((_name_of(item), item))

    def __len__(self):
        return len(self.steps)

    def on_open(self, filename):
        for _, callback in self.steps:
            on_open = getattr(callback, "on_open", None)
            if on_open is not None:
                on_open(filename)

    def run_step(self, index, filename):
        """Run step ``index`` on ``filename``.

        :returns: the path the step returned (None: the file is gone).
        :raises CallbackError: naming the step and the file; the file is
            left where it was.
        """
        name, callback = self.steps[index]
        try:
            return callback.on_close(filename)
        except Exception as exc:
            raise exceptions.CallbackError(
                "%s: %s" % (type(exc).__name__, exc), callback=name,
                filename=filename) from exc

    def on_close(self, filename, start=0):
        """Run the chain from step ``start``.

        :returns: the final path, or None when a step removed the file.
        :raises CallbackError: the first failing step; later steps do not
            run and the file stays where that step got it.
        """
        for index in range(start, len(self.steps)):
            if filename is None:
                break
            filename = self.run_step(index, filename)
        return filename
