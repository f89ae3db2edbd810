"""Small file-system helpers every layer uses: a lock, a durable rename,
a check that a folder can be written.

A create or rename is durable only once the directory holding it is
fsynced (:func:`fsync_directory`); a lock is an exclusive, non-blocking
``flock`` that dies with its process (:class:`FileLock`);
:func:`ensure_writable_directory` creates a folder and proves it takes a
file, before anything depends on it.
"""

import fcntl
import json
import os
import tempfile

__all__ = ["FileLock", "ensure_writable_directory", "fsync_directory",
           "write_json_atomic"]

#: Prefix of the probe file :func:`ensure_writable_directory` writes.
PROBE_PREFIX = ".shoebox-probe-"


def fsync_directory(path):
    """fsync the directory holding ``path`` so a create/rename survives."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".",
                 os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLock:
    """An exclusive, non-blocking flock on a path, held until release()."""

    def __init__(self, path, create=True):
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise

    @classmethod
    def try_acquire(cls, path, create=True):
        """The lock, or None when another process holds it (or no file)."""
        try:
            return cls(path, create)
        except (BlockingIOError, FileNotFoundError):
            return None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_json_atomic(path, data):
    """Replace ``path`` with ``data`` atomically.

    :returns: a :class:`FileLock` held on the new file. It is taken on the
        temporary file before the rename, so ``path`` is never unlocked (a
        lock held on the file it replaces goes away with that file).
    """
    tmp = path + ".tmp"
    lock = FileLock(tmp)
    try:
        os.ftruncate(lock.fd, 0)
        with os.fdopen(os.dup(lock.fd), "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        lock.release()
        raise
    lock.path = path
    fsync_directory(path)
    return lock


def ensure_writable_directory(path):
    """Create the folder ``path`` if missing, then write, fsync and remove
    a probe file in it.

    :raises OSError: the folder cannot be created, or does not take a file
        (read-only, not a folder, no permission, disk full); its
        ``filename`` is the path that failed.
    """
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
    try:
        os.write(fd, b"probe")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)
