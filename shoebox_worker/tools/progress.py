"""Progress bars on a terminal, for reads and publishing that take a while.

A bar goes to stderr, and only when stderr is a terminal: piped or
redirected, the tools print nothing but their output and their own lines.
A command that prints records or report lines on stdout (``cat``,
``verify``) shows it only when stdout is not the terminal too (the bar
would cut its lines); ``replay`` and ``export``, which print one summary at
the end, show it whenever stderr is a terminal.

:class:`Reading` counts archives and their stored bytes (what is read from
disk or downloaded, compressed) against what the listing said, so it needs
no first pass over the records.
"""

import sys

__all__ = ["Reading", "bar", "wanted"]


def wanted(prints_lines, stderr=None, stdout=None):
    """Whether to show a bar (see the module documentation)."""
    stderr = sys.stderr if stderr is None else stderr
    stdout = sys.stdout if stdout is None else stdout
    if not _isatty(stderr):
        return False
    return not (prints_lines and _isatty(stdout))


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a file
        return False


def bar(total=None, unit="msg", file=None, enabled=None, **options):
    """A tqdm bar on ``file`` (stderr), shown only when ``enabled``
    (default: when it is a terminal); it counts whole units, never scaled
    (not ``31.0/1.00k``), unless ``options`` say otherwise."""
    from tqdm import tqdm
    file = sys.stderr if file is None else file
    if enabled is None:
        enabled = _isatty(file)
    options.setdefault("unit_scale", False)
    return tqdm(total=total, unit=unit, file=file, disable=not enabled,
                dynamic_ncols=True, **options)


def _size(item):
    return getattr(item, "size", None) or 0  # a path: counted, no bytes


class Reading:
    """The archives of a read done so far, and their stored bytes.

    :param items: the archives to read (:class:`~.sources.Item`, their
        ``size`` from the listing or the file system).
    :param enabled: show the bar (:func:`wanted`).
    """

    def __init__(self, items, enabled, file=None):
        self.total = len(items)
        self.done = 0
        self._bar = bar(sum(_size(item) for item in items), unit="B",
                        file=file, enabled=enabled, unit_scale=True,
                        unit_divisor=1024, desc=self._desc())

    def _desc(self):
        return "%d/%d archives" % (self.done, self.total)

    def finished(self, item):
        """One more archive read."""
        self.done += 1
        self._bar.set_description(self._desc(), refresh=False)
        self._bar.update(_size(item))

    def track(self, items):
        """Yield ``items``, counting each once the caller is done with it
        (when it asks for the next); closes the bar at the end."""
        try:
            for item in items:
                yield item
                self.finished(item)
        finally:
            self.close()

    def close(self):
        self._bar.close()
