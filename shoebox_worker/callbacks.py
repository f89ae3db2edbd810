"""Archive callbacks: what happens to an archive once it is closed.

Loaded by name from ``shoebox.callbacks`` and run as a chain: each
``on_close`` gets the path the previous one returned (see
:mod:`shoebox_worker.contract`). Built-ins:

==================  =====================================================
``change_extension`` ``x.events`` -> ``x.events.done`` (``new_extension``)
``move``             into ``destination_folder``
``gzip``, ``zstd``   compress (``level``), remove the original
``delete``           remove the file; ends the chain
``memory``           remember what it saw (tests and demos)
``swift``            upload to OpenStack Swift (:mod:`shoebox_worker.swift`)
==================  =====================================================
"""

import logging
import os
import threading

from shoebox_worker import compression
from shoebox_worker import exceptions

__all__ = [
    "ArchiveCallback",
    "CallbackChain",
    "ChangeExtensionCallback",
    "MoveFileCallback",
    "DeleteFileCallback",
    "CompressCallback",
    "GzipCallback",
    "ZstdCallback",
    "MemoryCallback",
]

LOG = logging.getLogger(__name__)


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


class ChangeExtensionCallback(ArchiveCallback):
    """``x.events`` becomes ``x.events.done``.

    :param new_extension: the extension appended (with or without its dot),
        default ``.done``.
    """

    def __init__(self, *, new_extension=".done"):
        extension = str(new_extension).lstrip(".")
        if not extension or "/" in extension:
            raise ValueError("new_extension: must be a non-empty name")
        self.new_extension = "." + extension

    def on_close(self, filename):
        new = filename + self.new_extension
        if os.path.exists(new):
            raise FileExistsError("%s exists; not overwriting it" % new)
        os.rename(filename, new)
        compression.fsync_directory(new)
        return new


class MoveFileCallback(ArchiveCallback):
    """Move the file into ``destination_folder`` (created if missing).

    An existing file of the same name is never overwritten.

    :param destination_folder: default ``.``.
    """

    def __init__(self, *, destination_folder="."):
        self.destination_folder = str(destination_folder)

    def on_close(self, filename):
        os.makedirs(self.destination_folder, exist_ok=True)
        new = os.path.join(self.destination_folder,
                           os.path.basename(filename))
        if os.path.abspath(new) == os.path.abspath(filename):
            return filename
        try:  # a hard link refuses to replace an existing name
            os.link(filename, new)
        except FileExistsError:
            # a retry after a crash between link and unlink: same file
            if not os.path.samefile(filename, new):
                raise FileExistsError("%s exists; not overwriting it"
                                      % new) from None
        except OSError:  # another filesystem: copy, then rename into place
            tmp = new + ".tmp"
            with open(filename, "rb") as src, open(tmp, "xb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            stat = os.stat(filename)  # readers order files by mtime
            os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            if os.path.exists(new):
                os.unlink(tmp)
                raise FileExistsError("%s exists; not overwriting it"
                                      % new) from None
            os.rename(tmp, new)
        compression.fsync_directory(new)
        os.unlink(filename)
        return new


class DeleteFileCallback(ArchiveCallback):
    """Delete the file; the chain ends here (put it last)."""

    def __init__(self):
        pass

    def on_close(self, filename):
        try:
            os.remove(filename)
        except FileNotFoundError:  # a retry after a crash: already gone
            pass
        return None


class CompressCallback(ArchiveCallback):
    """Compress the file, fsync, rename into place, remove the original.

    :param codec: ``gzip`` or ``zstd``.
    :param level: compression level (codec default when empty).
    """

    codec_name = None
    #: The levels the codec takes: (lowest, highest).
    levels = (1, 9)

    def __init__(self, *, level=None):
        self.codec = compression.get_codec(self.codec_name)
        self.level = (self.codec.default_level if level in (None, "")
                      else int(level))
        low, high = self.levels
        if not low <= self.level <= high:
            # else every archive would fail to compress, forever
            raise ValueError("level: expected %d to %d, got %r"
                             % (low, high, level))

    def on_close(self, filename):
        if filename.endswith(self.codec.suffix):
            return filename  # already done before a crash
        new = compression.compress_file(filename, self.codec, self.level)
        os.remove(filename)
        compression.fsync_directory(filename)
        return new


class GzipCallback(CompressCallback):
    """gzip the archive (``x.events`` -> ``x.events.gz``); ``level`` 1-9."""

    codec_name = "gzip"


class ZstdCallback(CompressCallback):
    """zstd the archive (``x.events`` -> ``x.events.zst``); ``level`` 1-22.

    Needs the ``zstandard`` package (``pip install shoebox-worker[zstd]``).
    """

    codec_name = "zstd"
    levels = (1, 22)


class MemoryCallback(ArchiveCallback):
    """Remember every file it sees, for tests and demos.

    Every instance appends ``(event, filename)`` to its own :attr:`events`
    and to the class-wide :attr:`all_events`, so a test can see what a
    worker loaded by name did.

    :param fail_times: fail that many ``on_close`` calls before succeeding
        (to exercise retries).
    """

    all_events = []
    _lock = threading.Lock()

    def __init__(self, *, fail_times=0):
        self.fail_times = int(fail_times)
        self.events = []

    def _record(self, event, filename):
        with self._lock:
            self.events.append((event, filename))
            MemoryCallback.all_events.append((event, filename))

    def on_open(self, filename):
        self._record("open", filename)

    def on_close(self, filename):
        if self.fail_times > 0:
            self.fail_times -= 1
            self._record("fail", filename)
            raise RuntimeError("memory callback told to fail")
        self._record("close", filename)
        return filename
