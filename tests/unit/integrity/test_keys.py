"""Tests for shoebox_worker.integrity.keys: keygen, reading keys, and the
key file replaced by the next key with the old bytes written over."""

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoebox_worker.integrity import keys


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def public_of_file(path):
    return keys.public_text(keys.load_private(path))


@pytest.fixture
def pair(tmp_path):
    """``(private_path, public_path)`` made by keygen."""
    return keys.keygen(str(tmp_path / "keys"))


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem_private(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)


# -- keygen -------------------------------------------------------------------

def test_keygen_writes_a_private_key_0600_and_its_public_key(tmp_path):
    folder = tmp_path / "new" / "keys"
    private, public = keys.keygen(str(folder))
    assert private == str(folder / "signing.key")
    assert public == str(folder / "signing.pub")
    assert mode_of(private) == 0o600
    assert mode_of(public) == 0o644
    assert mode_of(folder) & 0o077 == 0
    assert open(private, "rb").read().startswith(
        b"-----BEGIN PRIVATE KEY-----")
    assert open(public, "rb").read().startswith(
        b"-----BEGIN PUBLIC KEY-----")
    assert keys.public_text(keys.load_public(public)) == \
        public_of_file(private)


def test_keygen_modes_do_not_depend_on_the_umask(tmp_path):
    before = os.umask(0o077)
    try:
        private, public = keys.keygen(str(tmp_path / "keys"))
    finally:
        os.umask(before)
    assert mode_of(private) == 0o600
    assert mode_of(public) == 0o644


def test_keygen_makes_a_new_key_each_time(tmp_path):
    one, _ = keys.keygen(str(tmp_path / "one"))
    two, _ = keys.keygen(str(tmp_path / "two"))
    assert public_of_file(one) != public_of_file(two)


@pytest.mark.parametrize("existing", ["signing.key", "signing.pub"])
def test_keygen_never_writes_over_either_file(tmp_path, existing):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / existing).write_bytes(b"mine")
    with pytest.raises(FileExistsError) as info:
        keys.keygen(str(folder))
    assert info.value.filename == str(folder / existing)
    assert sorted(os.listdir(folder)) == [existing]
    assert (folder / existing).read_bytes() == b"mine"


def test_keygen_refuses_a_dangling_symlink_in_the_place_of_a_key(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    os.symlink(tmp_path / "elsewhere", folder / "signing.key")
    with pytest.raises(FileExistsError):
        keys.keygen(str(folder))
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(folder)) == ["signing.key"]


# -- reading keys -------------------------------------------------------------

def test_load_private_reads_keygens_key(pair):
    private, _ = pair
    key = keys.load_private(private)
    assert keys.public_text(key) == keys.public_text(key.public_key())


@pytest.mark.parametrize("data, message", [
    (b"", "is not a PEM private key"),
    (b"garbage\n", "is not a PEM private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "is not a PEM private key"),
])
def test_load_private_refuses_what_is_no_key(tmp_path, data, message):
    path = tmp_path / "signing.key"
    path.write_bytes(data)
    with pytest.raises(keys.KeyError_) as info:
        keys.load_private(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_private_refuses_a_key_with_a_passphrase(tmp_path):
    key = keys.generate()
    path = tmp_path / "signing.key"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(keys.KeyError_, match="without a passphrase"):
        keys.load_private(str(path))


def test_load_private_refuses_a_missing_file(tmp_path):
    with pytest.raises(keys.KeyError_) as info:
        keys.load_private(str(tmp_path / "nope"))
    assert str(info.value) == "cannot read the signing key %s: No such " \
        "file or directory" % (tmp_path / "nope")


def test_load_private_never_follows_a_symlink(pair, tmp_path):
    private, _ = pair
    link = tmp_path / "link.key"
    os.symlink(private, link)
    with pytest.raises(keys.KeyError_, match="symlink"):
        keys.load_private(str(link))


def test_load_private_refuses_a_key_that_is_not_ed25519(tmp_path):
    path = tmp_path / "ec.key"
    path.write_bytes(pem_private(ec_key()))
    with pytest.raises(keys.KeyError_, match="is not an Ed25519 key"):
        keys.load_private(str(path))


def test_load_public_reads_a_pem_public_key(pair):
    private, public = pair
    assert keys.public_text(keys.load_public(public)) == \
        public_of_file(private)


def test_load_public_reads_the_public_half_of_a_pem_private_key(pair):
    private, _ = pair
    assert keys.public_text(keys.load_public(private)) == \
        public_of_file(private)


def test_load_public_reads_the_text_form_on_one_line(pair, tmp_path):
    private, _ = pair
    path = tmp_path / "key.txt"
    path.write_text("  %s\n" % public_of_file(private))
    assert keys.public_text(keys.load_public(str(path))) == \
        public_of_file(private)


@pytest.mark.parametrize("data", [
    b"", b"garbage\n", b"ed25519:not base64!\n",
    b"ed25519:" + base64.b64encode(b"short") + b"\n",
    b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
])
def test_load_public_refuses_what_is_no_key(tmp_path, data):
    path = tmp_path / "key.pub"
    path.write_bytes(data)
    with pytest.raises(keys.KeyError_) as info:
        keys.load_public(str(path))
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_load_public_refuses_a_missing_file(tmp_path):
    with pytest.raises(keys.KeyError_, match="cannot read the public key"):
        keys.load_public(str(tmp_path / "nope"))


@pytest.mark.parametrize("pem", [pem_public, pem_private])
def test_load_public_refuses_a_key_that_is_not_ed25519(tmp_path, pem):
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(ec_key()))
    with pytest.raises(keys.KeyError_, match="is not an Ed25519 key"):
        keys.load_public(str(path))


def test_public_text_is_the_prefix_and_the_32_raw_bytes():
    key = keys.generate()
    text = keys.public_text(key)
    assert text.startswith("ed25519:")
    raw = base64.b64decode(text[len("ed25519:"):], validate=True)
    assert raw == key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keys.public_text(key.public_key()) == text
    assert keys.public_text(keys.parse_public(text)) == text


@pytest.mark.parametrize("text", [
    None, "", "ed25519:", "ed25519:@@@@", "rsa:" + "A" * 44,
    "ed25519:" + base64.b64encode(b"x" * 31).decode(),
])
def test_parse_public_refuses_other_text(text):
    with pytest.raises(keys.KeyError_):
        keys.parse_public(text)


def test_verify():
    key, other = keys.generate(), keys.generate()
    signature = key.sign(b"data")
    assert keys.verify(key.public_key(), signature, b"data")
    assert not keys.verify(key.public_key(), signature, b"datA")
    assert not keys.verify(other.public_key(), signature, b"data")


# -- the next key -------------------------------------------------------------

def test_write_next_writes_the_next_key_beside_the_key(pair):
    private, _ = pair
    before = open(private, "rb").read()
    key = keys.write_next(private)
    nxt = private + keys.NEXT_SUFFIX
    assert mode_of(nxt) == 0o600
    assert public_of_file(nxt) == keys.public_text(key)
    assert keys.public_text(key) != public_of_file(private)
    assert open(private, "rb").read() == before


def test_write_next_replaces_a_leftover(pair):
    private, _ = pair
    nxt = private + keys.NEXT_SUFFIX
    with open(nxt, "wb") as f:
        f.write(b"left by a crash")
    key = keys.write_next(private)
    assert public_of_file(nxt) == keys.public_text(key)


def test_install_next_puts_the_next_key_in_place(pair):
    private, _ = pair
    key = keys.write_next(private)
    keys.install_next(private)
    assert public_of_file(private) == keys.public_text(key)
    assert not os.path.lexists(private + keys.NEXT_SUFFIX)
    assert mode_of(private) == 0o600


def test_install_next_writes_zeros_over_the_old_keys_bytes(pair, tmp_path):
    private, _ = pair
    old = open(private, "rb").read()
    kept = tmp_path / "old-inode"
    os.link(private, kept)  # the old key's inode, after the rename too
    fd = os.open(private, os.O_RDONLY)
    try:
        keys.write_next(private)
        keys.install_next(private)
        assert os.pread(fd, len(old) + 10, 0) == b"\0" * len(old)
    finally:
        os.close(fd)
    assert kept.read_bytes() == b"\0" * len(old)
    assert not os.path.samefile(kept, private)


def test_install_next_without_a_next_key_does_nothing(pair):
    private, _ = pair
    before = open(private, "rb").read()
    inode = os.stat(private).st_ino
    keys.install_next(private)
    assert open(private, "rb").read() == before
    assert os.stat(private).st_ino == inode


def test_install_next_when_the_key_is_gone_puts_the_next_one(pair):
    private, _ = pair
    key = keys.write_next(private)
    os.unlink(private)
    keys.install_next(private)
    assert public_of_file(private) == keys.public_text(key)
    assert not os.path.lexists(private + keys.NEXT_SUFFIX)


def test_wipe_old_writes_zeros_over_a_crashs_old_key_and_removes_it(
        pair, tmp_path):
    private, _ = pair
    # a crash after the rename, before the zeros: the old key under .old
    old = private + keys.OLD_SUFFIX
    os.link(private, old)
    kept = tmp_path / "old-inode"
    os.link(private, kept)
    size = os.path.getsize(private)
    keys.write_next(private)
    os.replace(private + keys.NEXT_SUFFIX, private)
    keys.wipe_old(private)
    assert not os.path.lexists(old)
    assert kept.read_bytes() == b"\0" * size
    assert public_of_file(private)  # the new key is left alone


def test_wipe_old_of_the_key_in_use_only_removes_the_second_name(pair):
    private, _ = pair
    before = open(private, "rb").read()
    os.link(private, private + keys.OLD_SUFFIX)  # a crash before the rename
    keys.wipe_old(private)
    assert not os.path.lexists(private + keys.OLD_SUFFIX)
    assert open(private, "rb").read() == before
