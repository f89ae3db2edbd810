"""SwiftUploadCallback without a Swift: options, naming, summaries, and
the upload logic against a fake connection."""

import datetime
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import time

import pytest
import requests
from swiftclient import client as swiftclient
from swiftclient.exceptions import ClientException

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker.ship import swift

V1 = {"auth": "http://swift.example:8080/auth/v1.0", "user": "acct:me",
      "key": "s3cret-key"}
V3 = {"os_auth_url": "https://keystone.example:5000/v3",
      "os_username": "shoebox", "os_password": "s3cret-pw",
      "os_project_name": "archives", "os_user_domain_name": "Default",
      "os_project_domain_name": "Default", "os_region_name": "DFW"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("ST_KEY", "OS_PASSWORD", "ST_AUTH", "ST_USER",
                 "OS_AUTH_URL", "OS_USERNAME", "OS_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)


def write_archive(path, count=5, version=2, start=None):
    start = start or datetime.datetime(2024, 3, 9, 23, 59, 58)
    records = []
    with archive.ArchiveWriter(path, version=version) as writer:
        for i in range(count):
            moment = start + datetime.timedelta(seconds=i)
            meta = {"event_type": "compute.instance.update",
                    "timestamp": moment.strftime("%Y-%m-%d %H:%M:%S.%f")}
            payload = ('{"n": %d, "pad": "%s"}' % (i, "x" * 300)).encode()
            writer.write(meta, payload)
            records.append((meta, payload))
    return records


# -- options ------------------------------------------------------------------

def test_defaults_v1():
    cb = swift.SwiftUploadCallback(**V1)
    assert cb.container == "shoebox"
    assert cb.segment_container == "shoebox_segments"
    assert cb.segment_size == 1 << 30
    assert cb.delete_after is None
    assert cb.object_prefix == ""
    assert cb.options["auth_version"] == "1"
    assert cb.options["retries"] == 2
    assert cb.options["timeout"] == 60.0
    assert cb.options["insecure"] is False


@pytest.mark.parametrize("text,expected", [
    ("262144", 262144), ("256K", 256 << 10), ("100M", 100 << 20),
    ("1G", 1 << 30), ("1g", 1 << 30), ("5GiB", 5 << 30), (" 2 M ", 2 << 20),
    (4096, 4096),
])
def test_segment_size_coercion(text, expected):
    assert swift.SwiftUploadCallback(segment_size=text,
                                     **V1).segment_size == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "0", "6G"])
def test_segment_size_rejected(text):
    with pytest.raises(ValueError, match="segment_size"):
        swift.SwiftUploadCallback(segment_size=text, **V1)


def test_string_options_coerced():
    cb = swift.SwiftUploadCallback(insecure="yes", retries="0", timeout="2.5",
                                   delete_after="86400", container=" logs ",
                                   **V1)
    assert cb.options["insecure"] is True
    assert cb.options["retries"] == 0
    assert cb.options["timeout"] == 2.5
    assert cb.delete_after == 86400
    assert cb.container == "logs"
    assert swift.SwiftUploadCallback(timeout="",
                                     **V1).options["timeout"] is None


@pytest.mark.parametrize("option,value", [
    ("insecure", "maybe"), ("retries", "two"), ("retries", "-1"),
    ("timeout", "soon"), ("timeout", "0"), ("delete_after", "0"),
    ("delete_after", "1d"), ("container", ""), ("container", "a/b"),
    ("auth_version", "2"),
])
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        swift.SwiftUploadCallback(**dict(V1, **{option: value}))


def test_auth_version_default_follows_os_auth_url():
    assert swift.SwiftUploadCallback(**V3).options["auth_version"] == "3"
    assert swift.SwiftUploadCallback(auth_version="v3.0",
                                     **V3).options["auth_version"] == "3"
    assert swift.SwiftUploadCallback(auth_version="1.0",
                                     **V1).options["auth_version"] == "1"


def test_missing_credentials():
    with pytest.raises(ValueError, match="key"):
        swift.SwiftUploadCallback(auth=V1["auth"], user=V1["user"])
    with pytest.raises(ValueError, match="os_password"):
        swift.SwiftUploadCallback(**dict(V3, os_password=""))
    with pytest.raises(ValueError, match="os_project_name or os_project_id"):
        swift.SwiftUploadCallback(**dict(V3, os_project_name=""))
    # a storage URL and a token need nothing else
    swift.SwiftUploadCallback(os_storage_url="http://s/v1/AUTH_x",
                              os_auth_token="tok")


def test_secrets_from_environment(monkeypatch):
    monkeypatch.setenv("ST_KEY", "from-env")
    monkeypatch.setenv("OS_PASSWORD", "pw-from-env")
    v1 = swift.SwiftUploadCallback(auth=V1["auth"], user=V1["user"], key="")
    assert v1.connection_kwargs()["key"] == "from-env"
    v3 = swift.SwiftUploadCallback(**dict(V3, os_password=""))
    assert v3.connection_kwargs()["key"] == "pw-from-env"
    # an explicit value wins
    assert swift.SwiftUploadCallback(
        **V1).connection_kwargs()["key"] == "s3cret-key"


def test_other_environment_variables_ignored(monkeypatch):
    monkeypatch.setenv("ST_AUTH", "http://elsewhere/auth/v1.0")
    monkeypatch.setenv("ST_USER", "other:user")
    monkeypatch.setenv("OS_AUTH_URL", "http://keystone.elsewhere/v3")
    monkeypatch.setenv("OS_PROJECT_NAME", "other")
    kwargs = swift.SwiftUploadCallback(**V1).connection_kwargs()
    assert kwargs["authurl"] == V1["auth"]
    assert kwargs["user"] == V1["user"]
    assert kwargs["auth_version"] == "1"
    assert kwargs["os_options"] == {}


def test_mapping_v1():
    cb = swift.SwiftUploadCallback(retries="0", timeout="5", insecure="true",
                                   **V1)
    kwargs = cb.connection_kwargs()
    assert kwargs == {
        "authurl": V1["auth"], "user": "acct:me", "key": "s3cret-key",
        "auth_version": "1", "os_options": {}, "preauthurl": None,
        "preauthtoken": None, "insecure": True, "retries": 0,
        "timeout": 5.0, "retry_on_ratelimit": True, "starting_backoff": 1,
        "max_backoff": 16,
    }
    conn = swiftclient.Connection(**kwargs)  # accepted as they are
    assert (conn.authurl, conn.user, conn.key) == (V1["auth"], "acct:me",
                                                   "s3cret-key")


def test_mapping_v3_reaches_keystone_auth(monkeypatch):
    cb = swift.SwiftUploadCallback(**V3)
    kwargs = cb.connection_kwargs()
    assert kwargs["auth_version"] == "3"
    assert (kwargs["authurl"], kwargs["user"], kwargs["key"]) == (
        V3["os_auth_url"], "shoebox", "s3cret-pw")
    assert kwargs["os_options"] == {
        "project_name": "archives", "project_id": None,
        "user_domain_name": "Default", "project_domain_name": "Default",
        "region_name": "DFW"}
    seen = {}

    def fake_keystone(auth_url, user, key, os_options, **kw):
        seen.update(auth_url=auth_url, user=user, key=key,
                    os_options=dict(os_options), **kw)
        return "https://swift.example/v1/AUTH_p", "tok"

    monkeypatch.setattr(swiftclient, "get_auth_keystone", fake_keystone)
    conn = swiftclient.Connection(**kwargs)
    assert conn.get_auth() == ("https://swift.example/v1/AUTH_p", "tok")
    assert seen["auth_url"] == V3["os_auth_url"]
    assert (seen["user"], seen["key"]) == ("shoebox", "s3cret-pw")
    assert seen["auth_version"] == "3"
    assert seen["os_options"]["project_name"] == "archives"
    assert seen["os_options"]["user_domain_name"] == "Default"
    assert seen["os_options"]["region_name"] == "DFW"


def test_mapping_preauth():
    cb = swift.SwiftUploadCallback(os_storage_url="http://s/v1/AUTH_x",
                                   os_auth_token="tok")
    kwargs = cb.connection_kwargs()
    assert kwargs["preauthurl"] == "http://s/v1/AUTH_x"
    assert kwargs["preauthtoken"] == "tok"
    conn = swiftclient.Connection(**kwargs)
    assert (conn.url, conn.token) == ("http://s/v1/AUTH_x", "tok")


def test_constructor_does_not_connect(monkeypatch):
    built = []
    monkeypatch.setattr(swift.swiftclient, "Connection",
                        lambda **kw: built.append(kw))
    started = time.monotonic()
    cb = swift.SwiftUploadCallback(auth="http://192.0.2.1:9/auth/v1.0",
                                   user="u", key="k")
    assert built == []
    assert cb._conn is None and cb._pool is None
    assert time.monotonic() - started < 1
    cb.close()  # nothing to release: fine


def test_secrets_not_in_repr():
    text = repr(swift.SwiftUploadCallback(**V1)) + repr(
        swift.SwiftUploadCallback(**V3))
    assert "s3cret" not in text


def test_swiftclient_logs_no_secret_prefix(monkeypatch):
    monkeypatch.setitem(swiftclient.logger_settings,
                        "reveal_sensitive_prefix", 16)
    cb = fake_callback(monkeypatch, FakeConnection())
    assert swiftclient.safe_value("X-Auth-Key", "s3cret-key") != "..."
    cb._connection()
    assert swiftclient.safe_value("X-Auth-Key", "s3cret-key") == "..."
    assert swiftclient.safe_value("X-Auth-Token", "AUTH_tk0123456789"
                                  "abcdef") == "..."


def test_entry_point():
    (ep,) = [e for e in importlib.metadata.entry_points(
        group="shoebox.callbacks") if e.name == "swift"]
    assert ep.load() is swift.SwiftUploadCallback


# -- naming -------------------------------------------------------------------

def test_object_name_with_prefix():
    cb = swift.SwiftUploadCallback(object_prefix="%Y/%m/%d/", **V1)
    moment = datetime.datetime(2024, 3, 9, 23, 59, 58)
    assert cb.object_name("/var/spool/a.events", moment) == \
        "2024/03/09/a.events"
    aware = datetime.datetime(2024, 3, 10, 1, 0, tzinfo=datetime.timezone(
        datetime.timedelta(hours=2)))  # 23:00 UTC the day before
    assert cb.object_name("a.events.gz", aware) == "2024/03/09/a.events.gz"


def test_object_name_without_prefix_and_leading_slash():
    moment = datetime.datetime(2024, 1, 1)
    assert swift.SwiftUploadCallback(**V1).object_name(
        "/x/y/b.events", moment) == "b.events"
    assert swift.SwiftUploadCallback(object_prefix="/%Y-", **V1).object_name(
        "b.events", moment) == "2024-b.events"


def test_segment_names_are_deterministic():
    cb = swift.SwiftUploadCallback(segment_size="256K", **V1)
    assert cb.segment_name("2024/a.events", 1000000, 3) == \
        "2024/a.events/1000000/262144/00000003"
    assert cb._segment_pattern("2024/a.events").match(
        "2024/a.events/1000000/1048576/00000000")
    assert not cb._segment_pattern("2024/a.events").match(
        "2024/a.events.gz/1/1/00000000")


# -- summaries ----------------------------------------------------------------

def test_summarize_plain_and_gzip(tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=7)
    summary = swift.summarize(path)
    assert summary.records == 7
    assert summary.versions == {2}
    assert summary.first_metadata == records[0][0]
    assert summary.last_metadata == records[-1][0]
    assert summary.damaged == 0
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    assert swift.summarize(path + ".gz") == summary


def test_summarize_mixed_versions_and_empty(tmp_path):
    path = str(tmp_path / "m.events")
    write_archive(path, count=2, version=1)
    with archive.ArchiveWriter(path, version=2, exclusive=False) as writer:
        writer.write({"timestamp": "2024-03-10 00:00:05.000000"}, b"{}")
    summary = swift.summarize(path)
    assert (summary.records, summary.versions) == (3, {1, 2})
    assert summary.last_metadata == {"timestamp":
                                     "2024-03-10 00:00:05.000000"}
    empty = tmp_path / "e.events"
    empty.write_bytes(b"")
    assert swift.summarize(str(empty)) == swift.ArchiveSummary()


def test_summarize_damaged_falls_back_to_salvage(tmp_path):
    path = str(tmp_path / "d.events")
    write_archive(path, count=6)
    data = bytearray(open(path, "rb").read())
    size = len(data) // 6
    data[size * 2 + 2] ^= 0xFF  # break the third record's header
    open(path, "wb").write(bytes(data) + b"torn tail")
    summary = swift.summarize(path)
    assert summary.records == 5
    assert summary.damaged >= 1
    assert summary.versions == {2}


# -- on_close against a fake connection ---------------------------------------

class FakeConnection:
    """Enough of swiftclient's Connection for the callback's logic."""

    def __init__(self, corrupt=False, fail=None):
        self.objects = {}
        self.containers = set()
        self.calls = []
        self.corrupt = corrupt
        self.fail = fail
        self.closed = False

    def _check(self, op):
        if self.fail and self.fail[0] == op:
            raise self.fail[1]

    def put_container(self, container):
        self.calls.append(("put_container", container))
        self.containers.add(container)

    def put_object(self, container, obj, contents, content_length=None,
                   etag=None, headers=None, content_type=None,
                   query_string=None, response_dict=None):
        self._check("put_object")
        self.calls.append(("put_object", container, obj, query_string))
        if query_string == "multipart-manifest=put":
            manifest = json.loads(contents)
            body = b"".join(self.objects[m["path"].split("/", 2)[1],
                                         m["path"].split("/", 2)[2]][0]
                            for m in manifest)
            slo = hashlib.md5("".join(m["etag"] for m in manifest)
                              .encode()).hexdigest()
            self.objects[container, obj] = (body, dict(headers), '"%s"' % slo)
            return slo
        chunks = []
        while True:
            chunk = contents.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
        body = b"".join(chunks)
        if self.corrupt:
            body = body[:-1] + b"!"
        md5 = hashlib.md5(body).hexdigest()
        if etag and etag != md5:
            raise ClientException("Object PUT failed", http_status=422,
                                  http_reason="Unprocessable Entity",
                                  http_response_headers={
                                      "X-Trans-Id": "tx422"})
        self.objects[container, obj] = (body, dict(headers or {}), md5)
        if response_dict is not None:
            response_dict["headers"] = {"x-trans-id": "txput"}
        return md5

    def head_object(self, container, obj):
        body, headers, etag = self.objects[container, obj]
        out = {"content-length": str(len(body)), "etag": etag,
               "x-trans-id": "txhead"}
        if etag.startswith('"'):
            out["x-static-large-object"] = "True"
        out.update({k.lower(): v for k, v in headers.items()})
        return out

    def get_container(self, container, prefix="", full_listing=False):
        return {}, [{"name": o} for c, o in sorted(self.objects)
                    if c == container and o.startswith(prefix)]

    def delete_object(self, container, obj):
        del self.objects[container, obj]

    def close(self):
        self.closed = True


def fake_callback(monkeypatch, conn, **options):
    monkeypatch.setattr(swift.swiftclient, "Connection", lambda **kw: conn)
    return swift.SwiftUploadCallback(**dict(V1, **options))


def test_on_close_plain(monkeypatch, tmp_path, caplog):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=4)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, object_prefix="%Y/%m/%d/",
                       delete_after="60")
    with caplog.at_level(logging.INFO, logger="shoebox_worker.ship.swift"):
        assert cb.on_close(path) == path
    body, headers, etag = conn.objects["shoebox", "2024/03/09/a.events"]
    data = open(path, "rb").read()
    assert body == data
    assert etag == hashlib.md5(data).hexdigest()
    assert headers["X-Object-Meta-Records"] == "4"
    assert headers["X-Object-Meta-First-Timestamp"] == \
        records[0][0]["timestamp"]
    assert headers["X-Object-Meta-Last-Timestamp"] == \
        records[-1][0]["timestamp"]
    assert headers["X-Object-Meta-Format-Versions"] == "2"
    assert headers["X-Object-Meta-Sha256"] == hashlib.sha256(
        data).hexdigest()
    assert headers["X-Object-Meta-Filename"] == "a.events"
    assert abs(int(headers["X-Delete-At"]) - (time.time() + 60)) < 5
    assert conn.containers == {"shoebox", "shoebox_segments"}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "2024/03/09/a.events" in line and "MB/s" in line
    assert "s3cret" not in caplog.text
    cb.close()
    assert conn.closed


def test_on_close_slo_and_stale_segments(monkeypatch, tmp_path):
    path = str(tmp_path / "big.events")
    write_archive(path, count=40)
    size = os.path.getsize(path)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, segment_size="4K")
    cb.on_close(path)
    body, _, etag = conn.objects["shoebox", "big.events"]
    assert body == open(path, "rb").read()
    segments = sorted(o for c, o in conn.objects if c == "shoebox_segments")
    assert segments == ["big.events/%d/4096/%08d" % (size, i)
                        for i in range((size + 4095) // 4096)]
    # other settings after a crash: the old segments go once verified
    cb2 = fake_callback(monkeypatch, conn, segment_size="8K")
    cb2.on_close(path)
    segments = sorted(o for c, o in conn.objects if c == "shoebox_segments")
    assert segments == ["big.events/%d/8192/%08d" % (size, i)
                        for i in range((size + 8191) // 8192)]
    # and a plain upload leaves none
    fake_callback(monkeypatch, conn).on_close(path)
    assert [o for c, o in conn.objects if c == "shoebox_segments"] == []
    assert conn.objects["shoebox", "big.events"][0] == open(path,
                                                            "rb").read()


def test_on_close_refused_by_swift(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path)
    before = open(path, "rb").read()
    conn = FakeConnection(corrupt=True)
    cb = fake_callback(monkeypatch, conn)
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path)
    text = str(info.value)
    assert "\n" not in text
    assert path in text and "shoebox/a.events" in text
    assert "422" in text and "tx422" in text
    assert info.value.callback == "swift" and info.value.filename == path
    assert open(path, "rb").read() == before
    assert cb._conn is None  # dropped: the next call reconnects


def test_on_close_head_mismatch(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path)
    conn = FakeConnection()
    real_head = conn.head_object

    def short_head(container, obj):
        head = real_head(container, obj)
        head["content-length"] = "1"
        return head

    conn.head_object = short_head
    cb = fake_callback(monkeypatch, conn)
    with pytest.raises(exceptions.UploadError, match="HEAD .*txhead"):
        cb.on_close(path)


def test_on_close_connection_error(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path)
    conn = FakeConnection(fail=("put_object", requests.ConnectionError(
        "Connection refused")))
    cb = fake_callback(monkeypatch, conn)
    with pytest.raises(exceptions.UploadError,
                       match="ConnectionError: Connection refused"):
        cb.on_close(path)
    assert os.path.exists(path)


def test_on_close_missing_file(monkeypatch, tmp_path):
    cb = fake_callback(monkeypatch, FakeConnection())
    with pytest.raises(exceptions.UploadError, match="FileNotFoundError"):
        cb.on_close(str(tmp_path / "nope.events"))


def test_describe_client_exception():
    exc = ClientException("Auth GET failed", http_status=401,
                          http_reason="Unauthorized",
                          http_response_headers={"X-Trans-Id": "tx1"})
    assert swift._describe(exc) == \
        "Auth GET failed: 401 Unauthorized (txn tx1)"
