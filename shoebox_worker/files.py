"""Small file-system helpers every layer uses: a lock, a durable rename,
temporary files, a check that a folder can be written, a read that opens
regular files only.

A create or rename is durable only once the directory holding it is
fsynced (:func:`fsync_directory`); a lock is an exclusive ``flock`` that
dies with its process, and holds the file its path names (checked after
the ``flock``: :class:`FileLock`); a temporary file is created exclusively,
never through a symlink, and a crash's leftover is replaced
(:func:`create_temporary`); :func:`ensure_writable_directory` creates a
folder and proves it takes a file, before anything depends on it;
:func:`read_regular` reads a file of our own (a state file) without
following a symlink and without waiting on a FIFO or a device.
"""

import errno
import fcntl
import json
import os
import stat

__all__ = ["FileLock", "create_temporary", "ensure_writable_directory",
           "fsync_directory", "is_within", "names_same_file", "read_regular",
           "remove_stale", "write_atomic", "write_json_atomic"]

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


#: Every file this project creates is created with this mode; the umask
#: (set by the worker from ``[archive] file_mode``) takes away the rest.
FILE_MODE = 0o666
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def names_same_file(fd, path):
    """Does ``path`` (not followed if a symlink) name the file open as
    ``fd``?"""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class FileLock:
    """An exclusive flock on a path, held until release().

    After the ``flock`` the path is looked at again: when it no longer
    names the file locked (it was replaced by a rename, or removed, while
    the lock was being taken), the lock is let go and taken again on what
    the path names now. So a lock held is always a lock on the file the
    path names, never on a file that has since gone away. A symlink is
    never followed (``OSError`` ``ELOOP``).

    :param create: create the file (mode :data:`FILE_MODE`) if missing.
    :param blocking: wait for the lock instead of raising
        ``BlockingIOError``.
    :param exclusive: the file must not exist yet (``O_EXCL``); it is
        created locked, and raises ``FileExistsError`` when it exists.
        Another process may lock a file between its creation and our
        ``flock`` and remove it (recovery removing an empty archive of a
        dead worker does): we then wait for it and create the file again,
        so a live creator always ends up holding its file.
    """

    def __init__(self, path, create=True, blocking=False, exclusive=False):
        self.path = path
        self.fd = None
        flags = os.O_RDWR | _NOFOLLOW
        if create or exclusive:
            flags |= os.O_CREAT
        if exclusive:
            flags |= os.O_EXCL
            blocking = True  # only a remover holds it, for a moment
        operation = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(path, flags, FILE_MODE)
            try:
                fcntl.flock(fd, operation)
                if names_same_file(fd, path):
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # replaced or removed meanwhile: lock what is there

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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def create_temporary(path):
    """Create the temporary file ``path`` exclusively (``O_EXCL``, never
    through a symlink), locked.

    A leftover at that name that no process holds (a crash's, or a
    symlink planted there) is removed first and the file created anew; it
    is never written through.

    :returns: a :class:`FileLock` on the new, empty file (``lock.fd`` is
        open for reading and writing).
    :raises BlockingIOError: a live process holds a file of that name
        (it is writing the same temporary file right now).
    """
    while True:
        try:
            return FileLock(path, exclusive=True)
        except FileExistsError:
            remove_stale(path)


def remove_stale(path):
    """Remove ``path`` unless a live process holds its lock; a symlink is
    removed (not followed).

    :raises BlockingIOError: a live process holds it.
    """
    try:
        stale = FileLock(path, create=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)  # a symlink: not ours
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        stale.release()


#: What a file that is not a regular one is, for :func:`read_regular`.
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"))


def read_regular(path):
    """The bytes of the regular file ``path``.

    It is opened without following a symlink (``O_NOFOLLOW``) and without
    waiting (``O_NONBLOCK``: opening a FIFO with no writer does not hang),
    and read only once ``fstat`` says it is a regular file.

    :raises OSError: as ``open`` does (``FileNotFoundError``...), or
        ``ELOOP`` for a symlink, or ``EINVAL`` for a FIFO, a device, a
        socket or a directory; its ``strerror`` says which, in words.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symlink (not followed)",
                          path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)),
                        "not a regular file")
            raise OSError(errno.EINVAL, kind, path)
        parts = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    finally:
        os.close(fd)


def is_within(path, folder):
    """Does ``path`` lie inside ``folder`` (symlinks of its folders
    resolved; the path itself may be missing)?"""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    root = os.path.realpath(folder)
    name = os.path.basename(path)
    if name in ("", ".", ".."):
        return False
    return parent == root or parent.startswith(root.rstrip(os.sep) + os.sep)


def write_json_atomic(path, data):
    """Replace ``path`` with ``data`` (JSON) atomically
    (:func:`write_atomic`).

    :returns: a :class:`FileLock` held on the new file. It is taken on the
        temporary file before the rename, so ``path`` is never unlocked (a
        lock held on the file it replaces goes away with that file).
    :raises BlockingIOError: another process is writing ``<path>.tmp``.
    """
    return write_atomic(path, json.dumps(data).encode("utf-8"), keep=True)


def write_atomic(path, data, mode=None, keep=False):
    """Replace ``path`` with the bytes ``data`` atomically: writes
    ``<path>.tmp`` (created by :func:`create_temporary`), fsyncs, renames
    it over ``path`` and fsyncs the directory; the temporary file is
    removed if anything fails.

    :param mode: the file's permission bits (default: as umask leaves
        them).
    :param keep: return the :class:`FileLock` held on the new file (else
        it is released).
    :raises BlockingIOError: another process is writing ``<path>.tmp``.
    """
    tmp = path + ".tmp"
    lock = create_temporary(tmp)
    try:
        if mode is not None:
            os.fchmod(lock.fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(lock.fd, view):]
        os.fsync(lock.fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        lock.release()
        raise
    fsync_directory(path)
    if not keep:
        lock.release()
        return None
    lock.path = path
    return lock


def ensure_writable_directory(path):
    """Create the folder ``path`` if missing, then write, fsync and remove
    a probe file in it (created locked, as :class:`FileLock` with
    ``exclusive`` does). The probes of killed runs (no process holds
    them) are removed first.

    :raises OSError: the folder cannot be created, or does not take a file
        (read-only, not a folder, no permission, disk full); its
        ``filename`` is the path that failed.
    """
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.startswith(PROBE_PREFIX):
            try:
                remove_stale(os.path.join(path, name))
            except BlockingIOError:
                pass  # a live worker's
    while True:
        probe = os.path.join(path, PROBE_PREFIX + os.urandom(6).hex())
        try:
            lock = FileLock(probe, exclusive=True)
        except FileExistsError:
            continue
        break
    try:
        os.write(lock.fd, b"probe")
        os.fsync(lock.fd)
    finally:
        try:
            os.unlink(probe)
        finally:
            lock.release()
