"""Ed25519 keys of the digest chain: made, read, written, and replaced.

``shoebox-worker keygen DIR`` (:func:`keygen`) writes a private key
``DIR/signing.key`` (mode 0600, PEM, PKCS #8) and its public key
``DIR/signing.pub`` (PEM); neither is written over. The public key is
what an auditor pins.

The worker replaces its key file with the next key at every digest
(:func:`write_next`, then :func:`install_next`): the next key is written
to ``<key>.next`` and fsynced before the digest that announces it is
written anywhere; once that digest is on disk, the key is given a
second name, ``<key>.old``, ``<key>.next`` is renamed over the key (the
directory fsynced), and the old key's bytes are written over with zeros
and fsynced, so the file system no longer holds them (on a file system
that writes in place; a copy-on-write one or a snapshot may keep them:
docs/integrity.md); then ``<key>.old`` is removed. A crash before the
zeros leaves ``<key>.old``, which :func:`wipe_old` writes over and
removes at the next start (without that second name the old key's bytes
would outlive the crash, nameless, never written over; on a file system
without hard links they are written over through the open file, and a
crash there does leave them).

In a digest a public key is ``ed25519:`` and the base64 of its 32 raw
bytes (:func:`public_text`); :func:`load_public` reads that form, or a
PEM file.
"""

import base64
import binascii
import errno
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shoebox_worker import exceptions
from shoebox_worker import files

__all__ = ["PRIVATE_NAME", "PUBLIC_NAME", "keygen", "generate",
           "load_private", "load_public", "public_text", "parse_public",
           "verify", "write_next", "install_next", "wipe_old",
           "NEXT_SUFFIX", "OLD_SUFFIX"]

#: What :func:`keygen` writes in its folder.
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
#: The next key, beside the key file, between its writing and its use.
NEXT_SUFFIX = ".next"
#: The key being replaced, between the rename that replaces it and the
#: zeros written over its bytes.
OLD_SUFFIX = ".old"
#: How a public key starts in a digest.
PREFIX = "ed25519:"


class KeyError_(exceptions.ShoeboxError):
    """A key file that cannot be read or is not an Ed25519 key; one line
    naming it. (The underscore keeps it apart from Python's own
    ``KeyError``.)"""


def generate():
    """A new private key."""
    return ed25519.Ed25519PrivateKey.generate()


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(public):
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def public_text(key):
    """``ed25519:<base64 of the 32 raw bytes>`` of a private or public
    key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    raw = public.public_bytes(serialization.Encoding.Raw,
                              serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public(text):
    """The public key of :func:`public_text`'s form.

    :raises KeyError_: not that form.
    """
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise KeyError_("not an %s public key: %r" % (PREFIX, text))
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise KeyError_("not an %s public key: %r (%s)"
                        % (PREFIX, text, exc)) from None


def verify(public, signature, data):
    """Does ``signature`` sign ``data`` with ``public``?"""
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _write_new(path, data, mode):
    """Create ``path`` (never over a file), write, fsync it and its
    directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                 | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    files.fsync_directory(path)


def keygen(directory):
    """Write a new key pair into ``directory`` (created, 0700, if
    missing).

    :returns: ``(private_path, public_path)``.
    :raises FileExistsError: either file exists (nothing is written).
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    private_path = os.path.join(directory, PRIVATE_NAME)
    public_path = os.path.join(directory, PUBLIC_NAME)
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists: not written over",
                                  path)
    key = generate()
    _write_new(private_path, _private_pem(key), 0o600)
    _write_new(public_path, _public_pem(key.public_key()), 0o644)
    return private_path, public_path


def load_private(path):
    """The Ed25519 private key in ``path`` (PEM; never through a
    symlink).

    :raises KeyError_: it cannot be read or is no Ed25519 private key.
    """
    try:
        data = files.read_regular(path)
    except OSError as exc:
        raise KeyError_("cannot read the signing key %s: %s"
                        % (path, exc.strerror or exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyError_("%s is not a PEM private key without a passphrase: "
                        "%s" % (path, exc)) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyError_("%s is not an Ed25519 key (shoebox-worker keygen "
                        "makes one)" % path)
    return key


def load_public(path):
    """The Ed25519 public key in ``path``: a PEM public key (keygen's
    ``signing.pub``), a PEM private key (its public half), or one line of
    :func:`public_text`'s form.

    :raises KeyError_: none of those.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as exc:
        raise KeyError_("cannot read the public key %s: %s"
                        % (path, exc.strerror or exc)) from None
    text = data.decode("ascii", "replace").strip()
    if text.startswith(PREFIX):
        try:
            return parse_public(text)
        except KeyError_ as err:  # the file, named
            raise KeyError_("%s: %s" % (path, err)) from None
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyError_("%s is not a PEM public key: %s" % (path, exc)) \
            from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyError_("%s is not an Ed25519 key" % path)
    return key


def write_next(path):
    """Make the next key and write it durably to ``<path>.next`` (0600;
    a leftover there, from a crash before it was announced, is replaced).

    :returns: the new private key.
    """
    key = generate()
    nxt = path + NEXT_SUFFIX
    try:
        os.unlink(nxt)
    except FileNotFoundError:
        pass
    _write_new(nxt, _private_pem(key), 0o600)
    return key


def install_next(path):
    """Put ``<path>.next`` in the place of ``path`` (rename, directory
    fsynced), then write zeros over the old key's bytes and fsync them,
    through its second name ``<path>.old`` (:func:`wipe_old`), made
    durably before the rename: a crash after the rename leaves the old
    key there, to be written over at the next start. Nothing to do when
    there is no ``<path>.next`` (done before a crash).
    """
    nxt = path + NEXT_SUFFIX
    if not os.path.lexists(nxt):
        return
    wipe_old(path)  # a crash's, before its name is taken again
    held = None  # the old key, open, where no second name can be made
    try:
        os.link(path, path + OLD_SUFFIX, follow_symlinks=False)
    except FileNotFoundError:
        pass  # no key there: nothing to write over
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a file system without hard links: written over through the
        # open file, which a crash after the rename leaves undone
        held = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    else:
        files.fsync_directory(path)
    try:
        os.replace(nxt, path)
        files.fsync_directory(path)
        if held is not None:
            os.pwrite(held, b"\0" * os.fstat(held).st_size, 0)
            os.fsync(held)
    finally:
        if held is not None:
            os.close(held)
    wipe_old(path)


def wipe_old(path):
    """Write zeros over the bytes of ``<path>.old`` (a key replaced by
    :func:`install_next`), fsync them, and remove that name (the
    directory fsynced). When it names the key at ``path`` still (a crash
    before the rename), only the name is removed. Nothing to do when
    there is none.
    """
    old = path + OLD_SUFFIX
    try:
        fd = os.open(old, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not files.names_same_file(fd, path):
            size = os.fstat(fd).st_size
            os.pwrite(fd, b"\0" * size, 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(old)
    files.fsync_directory(old)
