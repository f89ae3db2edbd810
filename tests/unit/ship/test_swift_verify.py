"""Tests for the verification and summary functions of
shoebox_worker.ship.swift, one by one (what a mutation check of them
asked for: see docs/mutation.md)."""

import datetime
import hashlib
import os
import time

import pytest
from swiftclient.exceptions import ClientException

from shoebox_worker.ship import swift

MD5 = hashlib.md5(b"abc").hexdigest()
SHA = hashlib.sha256(b"abc").hexdigest()
V1 = {"auth": "http://127.0.0.1:1/auth/v1.0", "user": "t:u", "key": "k"}


@pytest.mark.parametrize("head, sha256, md5, same", [
    ({"content-length": "3", "etag": MD5}, SHA, MD5, True),
    ({"content-length": "3", "etag": '"%s"' % MD5}, None, MD5, True),
    ({"content-length": "3", "etag": MD5}, None, "0" * 32, False),
    ({"content-length": "3", "etag": MD5}, None, None, False),
    ({"content-length": "4", "etag": MD5}, SHA, MD5, False),
    ({"etag": MD5}, SHA, MD5, False),
    ({"content-length": "-3", "etag": MD5}, SHA, MD5, False),
    ({"content-length": "x", "etag": MD5}, SHA, MD5, False),
    ({"content-length": "3"}, SHA, MD5, False),
    # our SHA-256 decides, whatever the ETag
    ({"content-length": "3", "etag": "e", "x-object-meta-sha256": SHA},
     SHA, MD5, True),
    ({"content-length": "3", "etag": MD5, "x-object-meta-sha256": "f"},
     SHA, MD5, False),
    # an SLO's ETag is its segments': without a SHA-256, not the same
    ({"content-length": "3", "etag": '"%s"' % MD5,
      "x-static-large-object": "True"}, SHA, MD5, False),
    ({"content-length": "3", "etag": MD5, "x-static-large-object": "true"},
     None, MD5, False),
    ({"content-length": "3", "etag": MD5, "x-static-large-object": "False"},
     None, MD5, True),
])
def test_same_content(head, sha256, md5, same):
    assert swift._same_content(head, 3, sha256, md5) is same


def test_what_is_there():
    assert swift._what_is_there({"content-length": "3", "etag": MD5}) == \
        "3 bytes, ETag %s, SHA-256 none" % MD5
    assert swift._what_is_there({}) == "? bytes, ETag ?, SHA-256 none"


class Heads:
    def __init__(self, head):
        self.head = head

    def head_object(self, container, obj):
        return dict(self.head, **{"x-trans-id": "txh"})


def head_check(head, etag=MD5, sha256=SHA, slo=False):
    cb = swift.SwiftUploadCallback(**V1)
    cb._head(Heads(head), "o", 3, etag, sha256, slo)


GOOD = {"content-length": "3", "etag": MD5, "x-object-meta-sha256": SHA}


@pytest.mark.parametrize("change, message", [
    ({"content-length": "4"}, "HEAD shoebox/o: 4 bytes, ETag %s; expected 3 "
     "bytes, ETag %s (txn txh)" % (MD5, MD5)),
    ({"etag": "e"}, "HEAD shoebox/o: 3 bytes, ETag e; expected 3 bytes, "
     "ETag %s (txn txh)" % MD5),
    ({"x-object-meta-sha256": "s"}, "HEAD shoebox/o: SHA-256 s; expected "
     "%s (txn txh)" % SHA),
])
def test_head_mismatches(change, message):
    with pytest.raises(swift._Mismatch) as info:
        head_check(dict(GOOD, **change))
    assert swift._describe(info.value) == "_Mismatch: " + message


def test_head_checks():
    head_check(GOOD)
    head_check(dict(GOOD, etag='"%s"' % MD5))
    head_check(dict(GOOD, etag="other"), etag=None)  # not compared
    head_check(dict(GOOD, **{"x-static-large-object": "True"}), slo=True)
    with pytest.raises(swift._Mismatch, match="^HEAD shoebox/o: -1 bytes"):
        head_check({"etag": MD5, "x-object-meta-sha256": SHA})
    with pytest.raises(swift._Mismatch, match="SHA-256 None"):
        head_check({"content-length": "3", "etag": MD5})
    with pytest.raises(swift._Mismatch) as info:
        head_check({"content-length": "3", "x-object-meta-sha256": SHA})
    assert str(info.value) == ("HEAD shoebox/o: 3 bytes, ETag ; expected 3 "
                               "bytes, ETag %s" % MD5)
    for value in (None, "false", "yes"):
        head = dict(GOOD) if value is None else dict(
            GOOD, **{"x-static-large-object": value})
        with pytest.raises(swift._Mismatch) as info:
            head_check(head, slo=True)
        assert str(info.value) == \
            "HEAD shoebox/o: not a Static Large Object"
        assert info.value.transaction_id == "txh"


def test_parts_read_exactly_what_is_asked(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    file_hash = swift._FileHash(str(path))
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 3, file_hash)
        assert part.read(0) == b""
        assert [part.read(1) for _ in range(4)] == [b"0", b"1", b"2", b""]
        part.reset()
        assert part.read(2) == b"01" and part.read() == b"2"
        part.reset()
        part.drain()
        assert (part.sent, part.md5.hexdigest()) == (
            3, hashlib.md5(b"012").hexdigest())
        second = swift._Part(f.fileno(), 3, 4, file_hash)
        assert second.read(10) == b"3456"
        assert file_hash.hexdigest(7) == hashlib.sha256(
            b"0123456").hexdigest()
        whole = swift._Part(f.fileno(), 0, 10, swift._FileHash(str(path)))
        assert whole.read(None) == b"0123456789"


def test_a_part_says_which_file_shrank(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 2, swift._FileHash(str(path)))
        part.read(1)
        with pytest.raises(OSError) as info:
            part.read(1)
    assert str(info.value) == "%s shrank while being sent" % path


def test_file_hash_messages():
    file_hash = swift._FileHash("f.events")
    file_hash.update(0, b"abc")
    file_hash.update(3, b"")
    file_hash.update(1, b"bc")  # sent again: not hashed twice
    with pytest.raises(RuntimeError) as info:
        file_hash.update(5, b"x")
    assert str(info.value) == "f.events: bytes 3-5 were never sent"
    with pytest.raises(swift._Mismatch) as info:
        file_hash.hexdigest(4)
    assert str(info.value) == "f.events: 3 of 4 bytes were sent"
    assert file_hash.hexdigest(3) == SHA


def test_file_sha256_reads_the_first_size_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(swift, "SEND_BLOCK", 7)
    data = os.urandom(100)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert swift._file_sha256(f.fileno(), 50) == hashlib.sha256(
            data[:50]).hexdigest()
        assert swift._file_sha256(f.fileno(), 0) == hashlib.sha256(
            b"").hexdigest()
        with pytest.raises(OSError) as info:
            swift._file_sha256(f.fileno(), 101)
    assert str(info.value) == "the file shrank while being read"


@pytest.mark.parametrize("obj, attempt, other", [
    ("x.events", 1, "x~%s.events" % SHA[:16]),
    ("2024/03/x.events.gz", 1, "2024/03/x~%s.events.gz" % SHA[:16]),
    ("a.b/x", 2, "a.b/x~%s-2" % SHA[:16]),
    ("x.events", 3, "x~%s-3.events" % SHA[:16]),
])
def test_other_name(obj, attempt, other):
    assert swift._other_name(obj, SHA, attempt) == other


def test_versions_and_counts():
    assert swift._versions({1, 2}) == "1,2"
    assert swift._versions({255}) == "255"
    assert swift._versions({256}) is None
    assert swift._versions({-1}) is None
    assert swift._versions(set()) is None
    assert swift._versions({1, "2"}) is None
    assert swift._count(0) == 0 and swift._count(7) == 7
    assert swift._count(-1) is None and swift._count(True) is None
    assert swift._count(1.0) is None and swift._count("3") is None


def test_header_values_keep_their_safe_characters():
    safe = " !#$&'()*+,/:;=?@[]~"
    assert swift._header_value(safe + "\u00e9") == safe + "%C3%A9"
    assert swift._header_value(12) == "12"


def test_object_names_in_utc_whatever_the_local_zone(monkeypatch):
    cb = swift.SwiftUploadCallback(**dict(V1, object_prefix="/%Y/%H/"))
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        naive = cb.object_name("/d/x.events",
                               datetime.datetime(2024, 12, 31, 20))
        aware = cb.object_name("/d/x.events", datetime.datetime(
            2025, 1, 1, 5, tzinfo=datetime.timezone(
                datetime.timedelta(hours=9))))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert naive == aware == "2024/20/x.events"
    plain = swift.SwiftUploadCallback(**V1)
    assert plain.object_name("/d/Xx.events", datetime.datetime(2024, 1, 1)) \
        == "Xx.events"
    with pytest.raises(ValueError) as info:
        swift.SwiftUploadCallback(**V1).object_name(
            "", datetime.datetime(2024, 1, 1))
    assert str(info.value) == "empty object name for ''"


class Refusing:
    """A connection whose PUTs answer ``status``, reading no body."""

    def __init__(self, status):
        self.status = status
        self.kwargs = None

    def put_object(self, container, obj, contents, **kwargs):
        self.kwargs = kwargs
        raise ClientException("Object PUT failed", http_status=self.status)


def test_put_sends_its_length_and_if_none_match(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    cb = swift.SwiftUploadCallback(**V1)
    cb._containers.update({"c", "d"})
    conn = Refusing(412)
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        with pytest.raises(swift._Exists) as info:
            cb._put(conn, "c", "o", part, {"X-A": "1"}, "t/t")
    assert str(info.value) == "c/o exists"
    assert part.md5.hexdigest() == MD5  # drained: its MD5 is known
    assert conn.kwargs["content_length"] == 3
    assert conn.kwargs["headers"] == {"X-A": "1", "If-None-Match": "*"}
    assert conn.kwargs["content_type"] == "t/t"
    assert cb._containers == {"c", "d"}
    with open(path, "rb") as f:  # the container went away: made again
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        with pytest.raises(ClientException):
            cb._put(Refusing(404), "c", "o", part, {}, "t/t")
    assert cb._containers == {"d"}
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        with pytest.raises(ClientException):
            cb._put(Refusing(405), "d", "o", part, {}, "t/t")
    assert cb._containers == {"d"}


class Answering:
    def __init__(self, etag):
        self.etag = etag

    def put_object(self, container, obj, contents, **kwargs):
        while contents.read(2):
            pass
        kwargs["response_dict"]["headers"] = {"x-trans-id": "txp"}
        return self.etag


def test_put_mismatch_message(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    cb = swift.SwiftUploadCallback(**V1)
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        assert cb._put(Answering(MD5), "c", "o", part, {}, "t/t") == MD5
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        with pytest.raises(swift._Mismatch) as info:
            cb._put(Answering("e"), "c", "o", part, {}, "t/t")
    assert swift._describe(info.value) == (
        "_Mismatch: PUT c/o returned ETag e; MD5 of the 3 of 3 bytes sent: "
        "%s (txn txp)" % MD5)
