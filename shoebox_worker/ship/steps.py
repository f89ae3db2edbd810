"""The built-in steps of the shipping chain (``shoebox.callbacks``).

==================  =====================================================
``change_extension`` ``x.events`` -> ``x.events.done`` (``new_extension``)
``move``             into ``destination_folder``
``gzip``, ``zstd``   compress (``level``), remove the original
``delete``           remove the file; ends the chain
``memory``           remember what it saw (tests and demos)
``swift``            upload to OpenStack Swift (:mod:`.swift`)
==================  =====================================================

Each follows :class:`~shoebox_worker.contract.ArchiveCallbackSpec`: it may
run again on the same file after a failure or a crash, so each is
idempotent, and each declares where it leaves the file
(``output_path``), which the shipper records before it runs.
"""

import errno
import filecmp
import logging
import os
import threading

from shoebox_worker import compression
from shoebox_worker import files
from shoebox_worker import options
from shoebox_worker.callbacks import ArchiveCallback

__all__ = [
    "ChangeExtensionCallback",
    "MoveFileCallback",
    "DeleteFileCallback",
    "CompressCallback",
    "GzipCallback",
    "ZstdCallback",
    "MemoryCallback",
]

LOG = logging.getLogger(__name__)


class ChangeExtensionCallback(ArchiveCallback):
    """``x.events`` becomes ``x.events.done``.

    :param new_extension: the extension appended (with or without its dot),
        default ``.done``.
    """

    def __init__(self, *, new_extension=".done"):
        extension = options.coerce("new_extension", new_extension,
                                   options.name()).lstrip(".")
        if not extension:
            raise options.OptionError("expected an extension like .done, "
                                      "got %r" % (new_extension,),
                                      "new_extension")
        self.new_extension = "." + extension

    def output_path(self, filename):
        return filename + self.new_extension

    def on_close(self, filename):
        new = self.output_path(filename)
        if os.path.exists(new):
            raise FileExistsError("%s exists; not overwriting it" % new)
        os.rename(filename, new)
        files.fsync_directory(new)
        return new


class MoveFileCallback(ArchiveCallback):
    """Move the file into ``destination_folder`` (created if missing).

    An existing file of the same name is never overwritten, unless it is
    this file already (a retry after a crash). On one file system the
    file is hard-linked, then unlinked; to another, it is copied to
    ``<dest>.tmp`` (created exclusively, a crash's leftover replaced),
    fsynced and linked into place.

    :param destination_folder: default ``.``.
    """

    def __init__(self, *, destination_folder="."):
        self.destination_folder = str(destination_folder)

    def output_path(self, filename):
        new = os.path.join(self.destination_folder,
                           os.path.basename(filename))
        if os.path.abspath(new) == os.path.abspath(filename):
            return filename
        return new

    def on_close(self, filename):
        new = self.output_path(filename)
        if new == filename:
            return filename
        os.makedirs(self.destination_folder, exist_ok=True)
        try:  # a hard link refuses to replace an existing name
            os.link(filename, new)
        except FileExistsError:
            # a retry after a crash between link and unlink: same file
            if not os.path.samefile(filename, new):
                _refuse_unless_same(filename, new)
        except OSError as exc:  # another filesystem: copy, then link
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP,
                                 errno.EMLINK):
                raise
            _copy_into_place(filename, new)
        files.fsync_directory(new)
        os.unlink(filename)
        return new


def _refuse_unless_same(filename, new):
    """``new`` exists: fine when it holds the same bytes (a copy finished
    before a crash), else refused."""
    if not filecmp.cmp(filename, new, shallow=False):
        raise FileExistsError("%s exists; not overwriting it" % new)


def _copy_into_place(filename, new):
    """Copy ``filename`` to ``new`` on another file system, durably, never
    over an existing file."""
    if os.path.lexists(new):  # a retry after a crash: the copy is there
        _refuse_unless_same(filename, new)
        return
    tmp = new + ".tmp"
    lock = files.create_temporary(tmp)
    try:
        with open(filename, "rb") as src, \
                os.fdopen(os.dup(lock.fd), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
            stat = os.stat(filename)  # readers order files by mtime
            os.utime(dst.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if os.path.lexists(new):  # appeared meanwhile: never replaced
            _refuse_unless_same(filename, new)
        else:
            os.rename(tmp, new)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        lock.release()


class DeleteFileCallback(ArchiveCallback):
    """Delete the file; the chain ends here (put it last)."""

    def __init__(self):
        pass

    def output_path(self, filename):
        return None

    def on_close(self, filename):
        try:
            os.remove(filename)
        except FileNotFoundError:  # a retry after a crash: already gone
            pass
        return None


class CompressCallback(ArchiveCallback):
    """Compress the file, fsync, rename into place, remove the original.

    Subclasses set :attr:`codec_name` and :attr:`levels`.

    :param level: compression level (codec default when empty).
    """

    #: ``gzip`` or ``zstd`` (:func:`shoebox_worker.compression.get_codec`).
    codec_name = None
    #: The levels the codec takes: (lowest, highest).
    levels = (1, 9)

    def __init__(self, *, level=None):
        self.codec = compression.get_codec(self.codec_name)
        # checked now: else every archive would fail to compress, forever
        self.level = options.coerce("level", level, options.integer_in(
            *self.levels, empty=self.codec.default_level))

    def output_path(self, filename):
        if filename.endswith(self.codec.suffix):
            return filename  # already done before a crash
        return filename + self.codec.suffix

    def on_close(self, filename):
        if filename.endswith(self.codec.suffix):
            return filename  # already done before a crash
        new = compression.compress_file(filename, self.codec, self.level)
        os.remove(filename)
        files.fsync_directory(filename)
        return new


class GzipCallback(CompressCallback):
    """gzip the archive (``x.events`` -> ``x.events.gz``); ``level`` 1-9."""

    codec_name = "gzip"


class ZstdCallback(CompressCallback):
    """zstd the archive (``x.events`` -> ``x.events.zst``); ``level`` 1-22.

    Needs the ``zstandard`` package (the ``zstd`` extra of
    shoebox-worker: ``pip install zstandard``).
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
        self.fail_times = options.coerce("fail_times", fail_times,
                                         options.integer(minimum=0))
        self.events = []

    def _record(self, event, filename):
        with self._lock:
            self.events.append((event, filename))
            MemoryCallback.all_events.append((event, filename))

    def on_open(self, filename):
        self._record("open", filename)

    def output_path(self, filename):
        return filename

    def on_close(self, filename):
        if self.fail_times > 0:
            self.fail_times -= 1
            self._record("fail", filename)
            raise RuntimeError("memory callback told to fail")
        self._record("close", filename)
        return filename
