"""SwiftUploadCallback against the real Swift all-in-one.

Needs ST_AUTH, ST_USER and ST_KEY, e.g. from
    env="$(scripts/swift-saio start)" && eval "$env"
Without them the module is skipped, or fails when CI=true.
"""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
import uuid

import pytest
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import exceptions
from shoebox_worker.ship import steps
from shoebox_worker.ship import swift

pytestmark = pytest.mark.functional

ENV_VARS = ("ST_AUTH", "ST_USER", "ST_KEY")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
START = datetime.datetime(2025, 12, 31, 23, 58, 1, 250000)


@pytest.fixture(scope="module")
def env():
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        msg = ("%s not set; run: env=\"$(scripts/swift-saio start)\" && "
               "eval \"$env\"" % ", ".join(missing))
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return {name: os.environ[name] for name in ENV_VARS}


@pytest.fixture
def conn(env):
    c = swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                       key=env["ST_KEY"], auth_version="1", retries=2)
    yield c
    c.close()


@pytest.fixture
def container(conn, ft):
    """A unique container name; it and its segments go at the end."""
    name = "shoebox-test-%s" % uuid.uuid4().hex[:12]
    yield name
    ft.delete_swift_container(conn, name)


def make_callback(env, container, **options):
    options = dict({"auth": env["ST_AUTH"], "user": env["ST_USER"],
                    "key": env["ST_KEY"], "container": container,
                    "object_prefix": "%Y/%m/%d/", "retries": "1",
                    "timeout": "30"}, **options)
    return swift.SwiftUploadCallback(**options)


def write_archive(path, count=300, pad=300):
    """``count`` notification-like records, one a quarter second apart.

    :returns: ``(records, the writer's report)``.
    """
    records = []
    with archive.ArchiveWriter(path) as writer:
        for i in range(count):
            moment = START + datetime.timedelta(seconds=i / 4)
            stamp = moment.strftime("%Y-%m-%d %H:%M:%S.%f")
            meta = {"event_type": "compute.instance.update",
                    "message_id": str(uuid.UUID(int=i)),
                    "timestamp": stamp, "publisher_id": "compute.host1",
                    "priority": "INFO"}
            payload = json.dumps({
                "event_type": meta["event_type"], "timestamp": stamp,
                "message_id": meta["message_id"],
                "payload": {"n": i, "state": "active",
                            "blob": uuid.UUID(int=i * 7919).hex * (pad // 32)},
            }).encode()
            writer.write(meta, payload)
            records.append((meta, payload))
    return records, writer.report()


def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def download(conn, container, obj, path):
    headers, body = conn.get_object(container, obj)
    with open(path, "wb") as f:
        f.write(body)
    return headers


def test_upload_download_and_metadata(env, conn, container, tmp_path):
    path = str(tmp_path / "host1-20251231T235801-0001.events")
    records, report = write_archive(path)
    data = open(path, "rb").read()
    cb = make_callback(env, container)
    try:
        assert cb.on_close(path, report=report) == path
    finally:
        cb.close()
    obj = "2025/12/31/host1-20251231T235801-0001.events"
    assert [o["name"] for o in conn.get_container(container)[1]] == [obj]

    got = str(tmp_path / "downloaded.events")
    headers = download(conn, container, obj, got)
    assert open(got, "rb").read() == data
    with archive.ArchiveReader(got) as reader:
        assert [(m, p) for m, p in reader] == records

    assert headers["etag"] == hashlib.md5(data).hexdigest()
    assert int(headers["content-length"]) == len(data)
    assert headers["x-object-meta-records"] == "300"
    assert headers["x-object-meta-first-timestamp"] == \
        records[0][0]["timestamp"]
    assert headers["x-object-meta-last-timestamp"] == \
        records[-1][0]["timestamp"]
    assert headers["x-object-meta-format-versions"] == "2"
    assert headers["x-object-meta-sha256"] == hashlib.sha256(
        data).hexdigest()
    assert headers["x-object-meta-filename"] == os.path.basename(path)
    assert headers["content-type"] == "application/octet-stream"
    assert "x-delete-at" not in headers
    assert open(path, "rb").read() == data  # the local file is untouched


def test_key_from_environment_and_delete_after(env, conn, container,
                                               tmp_path, monkeypatch):
    monkeypatch.setenv("ST_KEY", env["ST_KEY"])
    path = str(tmp_path / "a.events")
    write_archive(path, count=20)
    cb = make_callback(env, container, key="", object_prefix="",
                       delete_after="3600")  # re-sent by the metadata POST
    try:
        cb.on_close(path)
    finally:
        cb.close()
    head = conn.head_object(container, "a.events")
    assert abs(int(head["x-delete-at"]) - (time.time() + 3600)) < 60
    assert head["x-object-meta-sha256"] == sha256_of(path)
    assert head["x-object-meta-records"] == "20"


def test_static_large_object(env, conn, container, tmp_path):
    path = str(tmp_path / "big.events")
    write_archive(path, count=1200, pad=800)
    size = os.path.getsize(path)
    assert size > 1 << 20
    cb = make_callback(env, container, segment_size="256K")
    try:
        cb.on_close(path)
    finally:
        cb.close()
    obj = "2025/12/31/big.events"
    head = conn.head_object(container, obj)
    assert head["x-static-large-object"].lower() == "true"
    assert int(head["content-length"]) == size
    assert head["x-object-meta-sha256"] == sha256_of(path)
    assert head["x-object-meta-records"] == "1200"
    _, segments = conn.get_container(container + "_segments",
                                     full_listing=True)
    count = -(-size // (256 << 10))
    assert [s["name"] for s in segments] == [
        "%s/%d/%d/%08d" % (obj, size, 256 << 10, i) for i in range(count)]
    slo_etag = hashlib.md5("".join(s["hash"] for s in segments).encode())
    assert head["etag"] == '"%s"' % slo_etag.hexdigest()
    got = str(tmp_path / "got.events")
    download(conn, container, obj, got)
    assert md5_of(got) == md5_of(path)
    with archive.ArchiveReader(got) as reader:
        assert sum(1 for _ in reader) == 1200


def test_reupload_is_idempotent(env, conn, container, tmp_path):
    path = str(tmp_path / "again.events")
    write_archive(path, count=1200, pad=800)
    size = os.path.getsize(path)
    obj = "2025/12/31/again.events"

    def segment_names():
        return [s["name"] for s in conn.get_container(
            container + "_segments", full_listing=True)[1]]

    cb = make_callback(env, container, segment_size="256K")
    try:
        cb.on_close(path)
        first = segment_names()
        cb.on_close(path)  # as after a crash: the same names again
        assert segment_names() == first
        assert [o["name"] for o in conn.get_container(container)[1]] == [obj]
    finally:
        cb.close()
    # settings changed between attempts: the object is there with this
    # very content, so nothing is sent and nothing replaced
    manifest = conn.head_object(container, obj)
    for segment_size in ("512K", "1G"):
        cb = make_callback(env, container, segment_size=segment_size)
        try:
            cb.on_close(path)
        finally:
            cb.close()
        assert segment_names() == first
        assert conn.head_object(container, obj)["etag"] == manifest["etag"]
    # a crash before the manifest, then other settings: the segments of
    # the earlier attempt go once the new object is verified
    conn.delete_object(container, obj)  # the manifest only
    cb = make_callback(env, container, segment_size="512K")
    try:
        cb.on_close(path)
    finally:
        cb.close()
    assert segment_names() == ["%s/%d/%d/%08d" % (obj, size, 512 << 10, i)
                               for i in range(-(-size // (512 << 10)))]
    # and as a plain object it needs none
    conn.delete_object(container, obj)
    cb = make_callback(env, container)
    try:
        cb.on_close(path)
    finally:
        cb.close()
    assert segment_names() == []
    assert [o["name"] for o in conn.get_container(container)[1]] == [obj]
    assert conn.head_object(container, obj)["etag"] == md5_of(path)


@pytest.mark.parametrize("segment_size", ["1G", "64K"])
def test_damaged_in_transit_is_refused(env, conn, container, tmp_path,
                                       monkeypatch, segment_size):
    """Bytes changed after they were hashed (on the wire): Swift's ETag is
    not the MD5 of what was sent, so the upload fails, and the object never
    gets its SHA-256 (the mark of a verified upload). The retry does not
    overwrite it (If-None-Match): it goes under another name."""
    path = str(tmp_path / "bad.events")
    write_archive(path, count=100)
    real = swift._Part.read

    def damaging_read(self, size=-1):
        data = real(self, size)
        return data[:-1] + bytes([data[-1] ^ 1]) if data else data

    monkeypatch.setattr(swift._Part, "read", damaging_read)
    cb = make_callback(env, container, retries="0",
                       segment_size=segment_size)
    try:
        with pytest.raises(exceptions.UploadError) as info:
            cb.on_close(path)
    finally:
        cb.close()
    text = str(info.value)
    assert "returned ETag" in text and "(txn tx" in text
    assert "%s/2025/12/31/bad.events" % container in text
    try:
        head = conn.head_object(container, "2025/12/31/bad.events")
    except swc.ClientException as exc:
        assert exc.http_status == 404
    else:
        assert "x-object-meta-sha256" not in head
    monkeypatch.undo()
    cb = make_callback(env, container, segment_size=segment_size)
    try:
        cb.on_close(path)  # the retry: never over what is there
    finally:
        cb.close()
    # what the damaged attempt left is other content: the file goes under
    # another name (see test_swift_names.py), verified
    other = "2025/12/31/bad~%s.events" % sha256_of(path)[:16]
    head = conn.head_object(container, other)
    assert head["x-object-meta-sha256"] == sha256_of(path)


@contextlib.contextmanager
def _debug_logs(caplog):
    """Every DEBUG line captured, swiftclient's included: the CLI sets its
    logger to WARNING, and a test run before in this process may have run
    the CLI."""
    with caplog.at_level(logging.DEBUG), \
            caplog.at_level(logging.DEBUG, logger="swiftclient"):
        yield


def _swiftclient_logged(caplog):
    """Did swiftclient log a request (so that what is not in the log was
    looked for where it would be)?"""
    return any(r.name.startswith("swiftclient") for r in caplog.records)


def test_wrong_key(env, container, tmp_path, caplog):
    path = str(tmp_path / "a.events")
    write_archive(path, count=20)
    before = md5_of(path)
    cb = make_callback(env, container, key="Zq9-bad-key-0123456789",
                       retries="0")
    started = time.monotonic()
    try:
        with _debug_logs(caplog), \
                pytest.raises(exceptions.UploadError) as info:
            cb.on_close(path)
    finally:
        cb.close()
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert "401" in text and path in text and container in text
    assert "Zq9" not in text
    assert _swiftclient_logged(caplog)
    assert "Zq9" not in caplog.text  # swiftclient's request log included
    assert md5_of(path) == before


def test_failed_request_logs_no_token(env, conn, container, tmp_path,
                                      caplog):
    path = str(tmp_path / "a.events")
    write_archive(path, count=5)
    _, token = conn.get_auth()  # the same user's token, while valid
    cb = make_callback(env, "x" * 300, retries="0")  # too long: 400
    try:
        with _debug_logs(caplog), \
                pytest.raises(exceptions.UploadError, match="400"):
            cb.on_close(path)
    finally:
        cb.close()
    assert "X-Auth-Token" in caplog.text  # swiftclient logged the request
    assert token[len("AUTH_tk"):][:6] not in caplog.text
    assert env["ST_KEY"] not in caplog.text.replace("X-Auth-Key", "")
    assert swc.logger_settings["reveal_sensitive_prefix"] == 16


def test_chain_gzip_swift_delete(env, conn, container, tmp_path):
    path = str(tmp_path / "chain.events")
    records, report = write_archive(path, count=200)
    cb = make_callback(env, container)
    chain = callbacks.CallbackChain([("gzip", steps.GzipCallback()),
                                     ("swift", cb),
                                     ("delete",
                                      steps.DeleteFileCallback())])
    try:
        assert chain.on_close(path, report=report) is None
    finally:
        cb.close()
    assert os.listdir(tmp_path) == []
    obj = "2025/12/31/chain.events.gz"
    got = str(tmp_path / "got.events.gz")
    headers = download(conn, container, obj, got)
    assert headers["x-object-meta-records"] == "200"
    assert headers["x-object-meta-format-versions"] == "2"
    assert headers["content-type"] == "application/gzip"
    with archive.ArchiveReader(got) as reader:
        assert list(reader) == records


def test_wrong_key_is_permanent_and_said_once(env, container, tmp_path):
    path = str(tmp_path / "a.events")
    _, report = write_archive(path, count=3)
    with make_callback(env, container, key="wrong") as cb:
        chain = callbacks.CallbackChain([("swift", cb)])
        with pytest.raises(exceptions.UploadError) as info:
            chain.on_close(path, report=report)
    error = info.value
    assert error.permanent
    assert error.hint == "check [callback:swift] user and key"
    assert str(error).count("failed on") == 1
    assert "401 Unauthorized" in str(error)
    assert os.path.exists(path)


def test_container_name_swift_refuses_is_permanent(env, tmp_path):
    path = str(tmp_path / "a.events")
    _, report = write_archive(path, count=3)
    with make_callback(env, "c" * 300) as cb:
        with pytest.raises(exceptions.UploadError) as info:
            cb.on_close(path, report=report)
    assert info.value.permanent, str(info.value)
    assert info.value.hint == "check [callback:swift] container"
