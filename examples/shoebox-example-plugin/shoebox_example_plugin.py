"""A shoebox-worker archive callback: write ``<file>.sha256`` beside it
(or into ``folder``).

It follows the whole plugin contract (``shoebox_worker.contract``):

- keyword-only options with defaults, checked in the constructor;
- ``output_path``: the step says, before it runs, where it leaves the
  archive (here: where it got it), so that the worker can record that in
  the archive's state file first; a step that renamed, moved or removed
  the archive would return its new path (or None) here;
- idempotent: run again after a crash, it writes the same sidecar;
- its temporary file is created exclusively, never through a symlink, and
  a crash's leftover is replaced; it is fsynced before the rename.
"""

import hashlib
import os


class Sha256Callback:
    """Writes the archive's digest in ``sha256sum`` format, then passes the
    archive on unchanged.

    :param suffix: appended to the archive's name (default ``.sha256``).
    :param folder: where the sidecar goes (default: beside the archive;
        set it to keep the working directory to archives only).
    """

    def __init__(self, *, suffix=".sha256", folder=""):
        if not suffix or "/" in suffix:
            raise ValueError("suffix: expected a file name suffix like "
                             ".sha256, got %r" % (suffix,))
        self.suffix = suffix
        self.folder = str(folder)

    def output_path(self, filename):
        return filename  # the archive stays where it is

    def on_close(self, filename):
        digest = hashlib.sha256()
        with open(filename, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        folder = self.folder or os.path.dirname(filename) or "."
        os.makedirs(folder, exist_ok=True)
        sidecar = os.path.join(folder, os.path.basename(filename) +
                               self.suffix)
        tmp = sidecar + ".tmp"
        line = "%s  %s\n" % (digest.hexdigest(), os.path.basename(filename))
        fd = _create_exclusive(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sidecar)  # the same bytes if run again
        return filename


def _create_exclusive(path):
    """Create ``path`` for writing: exclusively, never through a symlink;
    a leftover (a crash's, or a symlink planted there) is removed first.
    The worker never runs two steps on one archive at once, so a leftover
    is never another live writer's."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    while True:
        try:
            return os.open(path, flags, 0o666)
        except FileExistsError:
            os.unlink(path)  # removes a symlink itself, not its target
