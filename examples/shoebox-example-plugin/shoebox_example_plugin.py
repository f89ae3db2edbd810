"""A shoebox-worker archive callback: write ``<file>.sha256`` beside it."""

import hashlib
import os


class Sha256Callback:
    """Writes the archive's digest in ``sha256sum`` format, then passes the
    archive on unchanged. Option ``[callback:sha256] suffix`` (default
    ``.sha256``)."""

    def __init__(self, *, suffix=".sha256"):
        self.suffix = suffix

    def on_close(self, filename):
        digest = hashlib.sha256()
        with open(filename, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        tmp = filename + self.suffix + ".tmp"  # idempotent: rename
        with open(tmp, "w") as f:
            f.write("%s  %s\n" % (digest.hexdigest(),
                                  os.path.basename(filename)))
        os.replace(tmp, filename + self.suffix)
        return filename
