"""SwiftUploadCallback without a Swift: options, naming, the object
metadata from the archive's report, hashing while sending, the upload logic
against a fake connection, and what swiftclient logs."""

import datetime
import gc
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import time

import pytest
import requests
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1.identity import v3 as identity_v3
from swiftclient import client as swiftclient
from swiftclient.exceptions import ClientException

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker import index
from shoebox_worker import timestamps
from shoebox_worker.ship import swift
from shoebox_worker.swift import layout

V1 = {"auth": "http://swift.example:8080/auth/v1.0", "user": "acct:me",
      "key": "s3cret-key"}
V3 = {"os_auth_url": "https://keystone.example:5000/v3",
      "os_username": "shoebox", "os_password": "s3cret-pw",
      "os_project_name": "archives", "os_user_domain_name": "Default",
      "os_project_domain_name": "Default", "os_region_name": "DFW"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("ST_KEY", "OS_PASSWORD", "ST_AUTH", "ST_USER",
                 "OS_AUTH_URL", "OS_USERNAME", "OS_PROJECT_NAME",
                 "OS_APPLICATION_CREDENTIAL_SECRET"):
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
    assert v3.options["os_password"] == "pw-from-env"
    assert auth_plugin(v3).auth_methods[0].password == "pw-from-env"
    monkeypatch.setenv("OS_APPLICATION_CREDENTIAL_SECRET", "ac-from-env")
    app = swift.SwiftUploadCallback(**APP)
    method = auth_plugin(app).auth_methods[0]
    assert method.application_credential_secret == "ac-from-env"
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


def auth_plugin(cb):
    """The keystoneauth1 plugin of the session the callback would use."""
    kwargs = cb.connection_kwargs()
    assert "authurl" not in kwargs and "key" not in kwargs
    return kwargs["session"].auth


def test_mapping_v3_names_to_a_keystoneauth_session():
    cb = swift.SwiftUploadCallback(os_endpoint_type="internal", **V3)
    kwargs = cb.connection_kwargs()
    assert kwargs["auth_version"] == "3"
    assert kwargs["os_options"] == {"region_name": "DFW",
                                    "endpoint_type": "internal"}
    plugin = kwargs["session"].auth
    assert isinstance(plugin, identity_v3.Password)
    assert plugin.auth_url == V3["os_auth_url"]
    method = plugin.auth_methods[0]
    assert (method.username, method.password, method.user_domain_name,
            method.user_id, method.user_domain_id) == (
        "shoebox", "s3cret-pw", "Default", None, None)
    assert (plugin.project_name, plugin.project_domain_name,
            plugin.project_id, plugin.project_domain_id) == (
        "archives", "Default", None, None)
    conn = swift._Connection(**kwargs)  # accepted as they are
    assert conn.session is kwargs["session"]
    assert conn.os_options["region_name"] == "DFW"


def test_mapping_v3_ids():
    cb = swift.SwiftUploadCallback(
        os_auth_url=V3["os_auth_url"], os_user_id="u1", os_password="pw",
        os_project_id="p1")
    plugin = auth_plugin(cb)
    method = plugin.auth_methods[0]
    assert (method.user_id, method.username) == ("u1", None)
    assert (plugin.project_id, plugin.project_name) == ("p1", None)
    cb = swift.SwiftUploadCallback(**dict(
        V3, os_user_domain_name="", os_user_domain_id="d1",
        os_project_domain_name="", os_project_domain_id="d2"))
    plugin = auth_plugin(cb)
    assert plugin.auth_methods[0].user_domain_id == "d1"
    assert plugin.project_domain_id == "d2"


APP = {"os_auth_url": "https://keystone.example:5000/v3",
       "os_auth_type": "v3applicationcredential",
       "os_application_credential_id": "ac1"}


def test_mapping_application_credential():
    cb = swift.SwiftUploadCallback(
        os_application_credential_secret="ac-s3cret", **APP)
    plugin = auth_plugin(cb)
    assert isinstance(plugin, identity_v3.ApplicationCredential)
    method = plugin.auth_methods[0]
    assert (method.application_credential_id,
            method.application_credential_secret) == (
        "ac1", "ac-s3cret")
    by_name = swift.SwiftUploadCallback(
        os_auth_url=APP["os_auth_url"],
        os_auth_type="v3applicationcredential",
        os_application_credential_name="shoebox-ac",
        os_application_credential_secret="ac-s3cret", os_username="shoebox",
        os_user_domain_name="Default")
    method = auth_plugin(by_name).auth_methods[0]
    assert (method.application_credential_name, method.username,
            method.user_domain_name) == ("shoebox-ac", "shoebox", "Default")
    assert "ac-s3cret" not in repr(cb) + repr(by_name)


@pytest.mark.parametrize("options, named", [
    (dict(V3, os_username=""), "os_username or os_user_id"),
    (dict(V3, os_user_domain_name=""),
     "os_user_domain_name or os_user_domain_id"),
    (dict(V3, os_project_domain_name=""),
     "os_project_domain_name or os_project_domain_id"),
    (dict(V3, os_auth_url="", auth_version="3"), "os_auth_url"),
    (dict(V3, os_auth_type="token"), "os_auth_type"),
    (dict(APP), "os_application_credential_secret"),
    (dict(APP, os_application_credential_id="",
          os_application_credential_secret="s"),
     "os_application_credential_id or os_application_credential_name"),
    (dict(APP, os_application_credential_id="",
          os_application_credential_name="n",
          os_application_credential_secret="s"),
     "os_user_id or os_username"),
    (dict(APP, os_application_credential_secret="s",
          os_project_name="archives"), "os_project_name"),
])
def test_bad_keystone_options_name_the_option(options, named):
    with pytest.raises(ValueError, match=named) as info:
        swift.SwiftUploadCallback(**options)
    assert "\n" not in str(info.value)
    assert "s3cret" not in str(info.value)


class FakeSession:
    """A keystoneauth1 session's token side: a new token after each
    invalidate()."""

    def __init__(self):
        self.tokens = 0
        self.current = None

    def get_endpoint(self, **kwargs):
        return "http://swift.example/v1/AUTH_p"

    def get_token(self):
        if self.current is None:
            self.tokens += 1
            self.current = "token-%d" % self.tokens
        return self.current

    def invalidate(self):
        self.current = None
        return True


def test_expired_token_mid_slo_renewed_and_segment_resent(monkeypatch,
                                                          tmp_path):
    """A 401 to a segment PUT: swiftclient invalidates the session's token,
    gets a new one and sends the segment again from its first byte; the
    file is still hashed once, the upload completes and is verified."""
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=40)
    size = os.path.getsize(path)
    session = FakeSession()
    fake = FakeConnection()
    sent = []
    real_put = FakeConnection.put_object

    def put_object(url, token, container, name, contents, **kwargs):
        """swiftclient's module function, sending to the fake."""
        for unused in ("http_conn", "service_token", "chunk_size"):
            kwargs.pop(unused, None)
        if isinstance(contents, str):  # the manifest
            sent.append((name, token, len(contents)))
        else:
            assert contents.sent == 0  # sent from its first byte
            body = contents.read(len(contents))
            sent.append((name, token, len(body)))
            if name.endswith("/00000001") and token == "token-1":
                raise ClientException("Object PUT failed", http_status=401)
            contents.reset()
        return real_put(fake, container, name, contents, **kwargs)

    monkeypatch.setattr(swiftclient, "put_object", put_object)

    class Conn(swift._Connection):
        """The real put_object (its _retry and re-auth), the fake's
        other requests."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            for name in ("put_container", "post_object", "head_object",
                         "get_container", "delete_object", "close"):
                setattr(self, name, getattr(fake, name))

    cb = swift.SwiftUploadCallback(segment_size=str(size // 3 + 1),
                                   retries="0", **V3)
    monkeypatch.setattr(swift, "_Connection", lambda **kw: Conn(
        **dict(kw, session=session)))
    monkeypatch.setattr(swift.time, "sleep", lambda s: None)
    monkeypatch.setattr(swiftclient, "sleep", lambda s: None)
    cb.on_close(path, report=report_of(path, records))
    segments = [(n.rsplit("/", 1)[1], tok) for n, tok, _ in sent
                if "/" in n]
    assert segments == [("00000000", "token-1"), ("00000001", "token-1"),
                        ("00000001", "token-2"), ("00000002", "token-2")]
    assert sent[-1][1] == "token-2"  # the manifest
    assert session.tokens == 2
    with open(path, "rb") as f:
        data = f.read()
    body, headers, _ = fake.objects["shoebox", "a.events"]
    assert body == data
    assert headers["X-Object-Meta-Sha256"] == hashlib.sha256(
        data).hexdigest()


def test_token_about_to_expire_renewed_before_a_request():
    class AuthRef:
        def __init__(self, left):
            self.left = left

        def will_expire_soon(self, seconds):
            return self.left < seconds

    class Session:
        invalidated = 0

        def invalidate(self):
            self.invalidated += 1

    class Conn:
        url, token = "http://s/v1/AUTH_p", "tok"

    conn = Conn()
    conn.session = Session()
    conn.session.auth = type("Plugin", (), {})()
    conn.session.auth.auth_ref = AuthRef(swift.TOKEN_MARGIN + 5)
    swift.SwiftUploadCallback._renew_token_if_expiring(conn)
    assert (conn.url, conn.token, conn.session.invalidated) == (
        "http://s/v1/AUTH_p", "tok", 0)
    conn.session.auth.auth_ref = AuthRef(swift.TOKEN_MARGIN - 1)
    swift.SwiftUploadCallback._renew_token_if_expiring(conn)
    assert (conn.url, conn.token, conn.session.invalidated) == (
        None, None, 1)


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
    monkeypatch.setattr(swift, "_Connection", lambda **kw: built.append(kw))
    started = time.monotonic()
    cb = swift.SwiftUploadCallback(auth="http://192.0.2.1:9/auth/v1.0",
                                   user="u", key="k")
    assert built == []
    assert cb._conn is None
    assert time.monotonic() - started < 1
    cb.close()  # nothing to release: fine


def test_connection_sends_large_blocks():
    conn = swift._Connection(**swift.SwiftUploadCallback(
        **V1).connection_kwargs())
    _, http = conn.http_connection("http://swift.example:8080/v1/AUTH_x")
    for url in ("http://swift.example/v1", "https://swift.example/v1"):
        adapter = http.request_session.get_adapter(url)
        pool = adapter.poolmanager.connection_from_url(url)
        assert pool.conn_kw["blocksize"] == swift.SEND_BLOCK
    http.close()


def test_connection_closes_the_adapters_alive_and_holds_none():
    conn = swift._Connection(**swift.SwiftUploadCallback(
        **V1).connection_kwargs())
    url = "http://swift.example:8080/v1/AUTH_x"
    for _ in range(3):  # swiftclient's retries drop the last one
        conn.http_conn = conn.http_connection(url)
    gc.collect()
    alive = list(conn._adapters)
    assert len(alive) == 1  # the dropped ones were not kept
    pool = alive[0].poolmanager.connection_from_url(url)
    closed = []
    pool.close = lambda: closed.append(pool)
    del alive
    conn.close()
    assert closed == [pool]
    assert len(conn._adapters) == 0


def test_secrets_not_in_repr():
    text = repr(swift.SwiftUploadCallback(**V1)) + repr(
        swift.SwiftUploadCallback(**V3))
    assert "s3cret" not in text


class FakeResponse:
    def __init__(self, status, headers):
        self.status = status
        self.reason = "Unauthorized" if status == 401 else "Error"
        self._headers = headers

    def getheaders(self):
        return list(self._headers.items())


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
@pytest.mark.parametrize("status", [401, 500, 201])
def test_swiftclient_logs_no_key_nor_token(monkeypatch, caplog, level,
                                           status):
    settings = dict(swiftclient.logger_settings)
    cb = fake_callback(monkeypatch, FakeConnection())
    cb._connection()
    key, token = "Zq9s3cretKey0123456789", "AUTH_tkZq9t0ken0123456789abcdef"
    with caplog.at_level(level, logger="swiftclient"):
        # what swiftclient logs for a request (auth, or one with a token)
        swiftclient.http_log(
            ("http://swift.example/v1/AUTH_x/c/o", "PUT"),
            {"headers": {"X-Auth-Key": key, "X-Auth-Token": token,
                         "X-Auth-User": "acct:me"}},
            FakeResponse(status, {"X-Auth-Token": token,
                                  "X-Storage-Token": token,
                                  "X-Auth-Token-Expires": "86399",
                                  "X-Trans-Id": "tx1"}), b"")
    if status >= 300 or level == logging.DEBUG:
        assert "curl -i" in caplog.text and "X-Auth-Key" in caplog.text
        assert "acct:me" in caplog.text and "86399" in caplog.text
    assert "Zq9" not in caplog.text
    assert swiftclient.logger_settings == settings  # left as they were
    cb._drop_connection()
    cb._connection()  # the filter is put on once
    assert sum(isinstance(f, swift._RedactSecrets) for f in logging.getLogger(
        "swiftclient").filters) == 1


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
    assert cb.segment_container == cb.container + "_segments"
    # what the cleanup of stale segments looks for (the layout's pattern)
    assert layout.segment_pattern("2024/a.events").match(
        "2024/a.events/1000000/1048576/00000000")
    assert not layout.segment_pattern("2024/a.events").match(
        "2024/a.events.gz/1/1/00000000")


# -- what the object metadata says ------------------------------------------

def headers_of(report, **options):
    cb = swift.SwiftUploadCallback(**dict(V1, **options))
    return cb._headers("/x/a.events", report)


def test_headers_from_the_writers_report(tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=7)
    report = archive.inspect_file(path)
    report.versions = {2}  # what the writer's report says
    assert headers_of(report) == {
        "X-Object-Meta-Filename": "a.events",
        "X-Object-Meta-Records": "7",
        "X-Object-Meta-Format-Versions": "2",
        "X-Object-Meta-First-Timestamp": records[0][0]["timestamp"],
        "X-Object-Meta-Last-Timestamp": records[-1][0]["timestamp"],
        "X-Object-Meta-Earliest-Timestamp": "2024-03-09T23:59:58.000000Z",
        "X-Object-Meta-Latest-Timestamp": "2024-03-10T00:00:04.000000Z",
    }


def test_the_time_range_is_of_all_records_not_the_first_and_last():
    # late records: the first record is not the earliest, the last not the
    # latest; the range is what readers prune by, so it must hold them all
    report = archive.ArchiveReport(
        "o.events", records=3,
        first_metadata={"timestamp": "2024-03-09 10:00"},
        last_metadata={"timestamp": "2024-03-09 09:00"},
        earliest="2024-03-09T08:00:00.000000Z",
        latest="2024-03-09T11:00:00.000000Z")
    headers = headers_of(report)
    assert headers["X-Object-Meta-Earliest-Timestamp"] == \
        "2024-03-09T08:00:00.000000Z"
    assert headers["X-Object-Meta-Latest-Timestamp"] == \
        "2024-03-09T11:00:00.000000Z"


@pytest.mark.parametrize("value", ["yesterday", "", 7, "\x00"])
def test_a_time_range_that_does_not_parse_is_left_out(value):
    report = archive.ArchiveReport("o.events", records=1, earliest=value,
                                   latest=value)
    headers = headers_of(report)
    assert "X-Object-Meta-Earliest-Timestamp" not in headers
    assert "X-Object-Meta-Latest-Timestamp" not in headers


def test_headers_of_an_empty_damaged_and_unreadable_archive():
    empty = archive.ArchiveReport("e.events")
    assert headers_of(empty) == {"X-Object-Meta-Filename": "a.events",
                                 "X-Object-Meta-Records": "0"}
    damaged = archive.ArchiveReport("d.events", records=5, versions={1, 2},
                                    skipped=[archive.Skipped("d", 1, 2, "x"),
                                             archive.Skipped("d", 5, 9, "y")])
    headers = headers_of(damaged)
    assert headers["X-Object-Meta-Damaged-Ranges"] == "2"
    assert headers["X-Object-Meta-Format-Versions"] == "1,2"
    assert headers_of(None) == {"X-Object-Meta-Filename": "a.events",
                                "X-Object-Meta-Damaged-Ranges": "1"}
    # expiry by Swift's clock, not ours
    assert headers_of(empty, delete_after="60")["X-Delete-After"] == "60"
    assert not [h for h in headers_of(empty, delete_after="60")
                if "Delete-At" in h]


#: Values of a record's ``timestamp`` that are no timestamp (out of range
#: once in UTC, absurd, of the wrong type, huge, control characters).
POISON_TIMESTAMPS = [
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00", "1969-12-31T23:59:59+00:00", "3000-01-01",
    "2024-13-45T99:99:99", "yesterday", "", " ", "2024-03-09 \u00e9t\u00e9",
    "2024-03-09T10:00:00" + "0" * 300, "2024-03-09T10:00:00\x00",
    "\r\n2024-03-09T10:00:00", 20240309, None, ["2024-03-09"],
    {"t": 1}, 1.5e300, True]


@pytest.mark.parametrize("value", POISON_TIMESTAMPS)
def test_a_timestamp_that_does_not_parse_is_left_out(value):
    report = archive.ArchiveReport(
        "o.events", records=1, versions={2},
        first_metadata={"timestamp": value, "event_type": "x" * 10000},
        last_metadata={"timestamp": value})
    headers = headers_of(report)
    assert headers == {"X-Object-Meta-Filename": "a.events",
                       "X-Object-Meta-Records": "1",
                       "X-Object-Meta-Format-Versions": "2"}
    assert timestamps.record_time(report.first_metadata) is None


@pytest.mark.parametrize("metadata", [None, "timestamp", ["a"], 7])
def test_metadata_of_the_wrong_type_is_left_out(metadata):
    report = archive.ArchiveReport("o.events", records="many",
                                   versions={"2", None},
                                   first_metadata=metadata,
                                   last_metadata=metadata)
    assert headers_of(report) == {"X-Object-Meta-Filename": "a.events"}


def test_plausible_timestamps_are_kept_bounded_and_ascii():
    def first(value):
        report = archive.ArchiveReport("o.events", records=1,
                                       first_metadata={"timestamp": value})
        return headers_of(report).get("X-Object-Meta-First-Timestamp")

    assert first("2024-03-09T10:00:00+01:00") == "2024-03-09T10:00:00+01:00"
    assert first(" 2024-03-09 10:00:00.123456 ") == \
        "2024-03-09 10:00:00.123456"
    assert first("1970-01-01T00:00:00+00:00") == "1970-01-01T00:00:00+00:00"
    assert first("2999-12-31T23:59:59+00:00") == "2999-12-31T23:59:59+00:00"
    assert first("1970-01-01T00:59:59+01:00") is None  # 1969 in UTC
    assert first("2999-12-31T23:59:59-01:00") is None  # 3000 in UTC
    assert timestamps.record_time({"timestamp": "2024-03-09 10:00:00"}) == \
        datetime.datetime(2024, 3, 9, 10, tzinfo=datetime.UTC)
    assert len(swift._header_value("\u00e9" * 1000)) == 256
    assert swift._header_value("\u00e9" * 1000).isascii()
    assert swift._header_value("a\x00b") == "a%00b"
    assert swift._header_value("x" * 300) == "x" * 256


def test_record_times_are_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        naive = timestamps.record_time({"timestamp": "2024-03-09 10:00:00"})
        aware = timestamps.record_time(
            {"timestamp": "2024-03-09T10:00:00+01:00"})
    finally:
        monkeypatch.undo()
        time.tzset()
    assert (naive.hour, naive.utcoffset()) == (10, datetime.timedelta(0))
    assert (aware.hour, aware.utcoffset()) == (9, datetime.timedelta(0))


def test_a_timestamp_is_at_most_40_characters():
    stamp = "2024-03-09T10:00:00.123456+01:00"  # 32
    assert timestamps.record_time({"timestamp": stamp.rjust(40)}) is not None
    assert timestamps.record_time({"timestamp": stamp.rjust(41)}) is None


@pytest.mark.parametrize("value", POISON_TIMESTAMPS[:6])
def test_on_close_with_a_poison_timestamp_uploads(monkeypatch, tmp_path,
                                                   value):
    path = str(tmp_path / "a.events")
    write_archive(path)
    os.utime(path, (1e9, 1e9))
    report = archive.ArchiveReport(path, records=3, versions={2},
                                   first_metadata={"timestamp": value},
                                   last_metadata={"timestamp": value})
    conn = FakeConnection()
    fake_callback(monkeypatch, conn, object_prefix="%Y/").on_close(
        path, report=report)
    _, headers, _ = conn.objects["shoebox", "2001/a.events"]  # its mtime
    assert headers["X-Object-Meta-Records"] == "3"
    assert "X-Object-Meta-First-Timestamp" not in headers


# -- hashing while sending --------------------------------------------------

def test_parts_hash_what_they_send_and_a_retry_is_not_hashed_twice(
        tmp_path):
    data = os.urandom(300000)
    path = tmp_path / "f"
    path.write_bytes(data)
    file_hash = swift._FileHash(str(path))
    with open(path, "rb") as f:
        first = swift._Part(f.fileno(), 0, 100000, file_hash)
        assert len(first) == 100000
        first.read(70000)
        first.reset()  # swiftclient retries the request
        body = b"".join(iter(lambda: first.read(16384), b""))
        assert body == data[:100000] and first.sent == 100000
        assert first.md5.hexdigest() == hashlib.md5(body).hexdigest()
        second = swift._Part(f.fileno(), 100000, 200000, file_hash)
        with pytest.raises(swift._Mismatch, match="100000 of 300000"):
            file_hash.hexdigest(300000)
        assert second.read() == data[100000:]
        assert second.read(10) == b""
    assert file_hash.hexdigest(300000) == hashlib.sha256(data).hexdigest()


def test_a_part_of_a_file_that_shrank_fails(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 20, swift._FileHash(str(path)))
        assert part.read(10) == b"x" * 10
        with pytest.raises(OSError, match="shrank"):
            part.read(10)


def test_skipped_bytes_are_never_hashed(tmp_path):
    file_hash = swift._FileHash("f")
    file_hash.update(0, b"abc")
    with pytest.raises(RuntimeError, match="never sent"):
        file_hash.update(5, b"def")


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
        self._check("put_container")
        self.calls.append(("put_container", container))
        self.containers.add(container)

    @staticmethod
    def _expiry(headers):
        """Like Swift: X-Delete-After becomes X-Delete-At, by its clock."""
        headers = dict(headers or {})
        after = headers.pop("X-Delete-After", None)
        if after is not None:
            headers["X-Delete-At"] = str(int(time.time()) + int(after))
        headers.pop("If-None-Match", None)
        return headers

    def put_object(self, container, obj, contents, content_length=None,
                   etag=None, headers=None, content_type=None,
                   query_string=None, response_dict=None):
        self._check("put_object")
        self.calls.append(("put_object", container, obj, query_string))
        if (headers or {}).get("If-None-Match") == "*" and (
                container, obj) in self.objects:
            raise ClientException("Object PUT failed", http_status=412,
                                  http_reason="Precondition Failed")
        headers = self._expiry(headers)
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
        self.calls[-1] += (etag, len(body))
        if self.corrupt:  # damaged on the way: Swift hashes what it got
            body = body[:-1] + b"!"
        md5 = hashlib.md5(body).hexdigest()
        if etag and etag != md5:
            raise ClientException("Object PUT failed", http_status=422,
                                  http_reason="Unprocessable Entity",
                                  http_response_headers={
                                      "X-Trans-Id": "tx422"})
        headers = dict(headers or {}, **{"Content-Type": content_type})
        self.objects[container, obj] = (body, headers, md5)
        if response_dict is not None:
            response_dict["headers"] = {"x-trans-id": "txput"}
        return md5

    def post_object(self, container, obj, headers, response_dict=None):
        """Like Swift: replaces all user metadata (and X-Delete-At)."""
        self._check("post_object")
        self.calls.append(("post_object", container, obj))
        if self.fail and self.fail[0] == "lose_post":
            return
        body, old, etag = self.objects[container, obj]
        kept = {k: v for k, v in old.items()
                if not k.lower().startswith("x-object-meta-")
                and k.lower() != "x-delete-at"}
        self.objects[container, obj] = (body, dict(
            kept, **self._expiry(headers)), etag)

    def head_object(self, container, obj):
        self.calls.append(("head_object", container, obj))
        if (container, obj) not in self.objects:
            raise ClientException("Object HEAD failed", http_status=404,
                                  http_reason="Not Found")
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
    monkeypatch.setattr(swift, "_Connection", lambda **kw: conn)
    return swift.SwiftUploadCallback(**dict(V1, **options))


def report_of(path, records):
    """The report the writer makes for ``records`` (``write_archive``)."""
    return archive.ArchiveReport(
        path, records=len(records), size=os.path.getsize(path),
        versions={2}, first_metadata=records[0][0],
        last_metadata=records[-1][0])


def count_reads(monkeypatch):
    """Bytes read through os.pread (how the callback reads the file), and
    no archive.inspect_file."""
    read = []
    real = os.pread

    def pread(fd, n, offset):
        data = real(fd, n, offset)
        read.append(len(data))
        return data

    def inspect_file(path):
        raise AssertionError("the file was read for a report")

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(archive, "inspect_file", inspect_file)
    return read


def test_on_close_plain(monkeypatch, tmp_path, caplog):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=4)
    data = open(path, "rb").read()
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, object_prefix="%Y/%m/%d/",
                       delete_after="60")
    read = count_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="shoebox_worker.ship.swift"):
        assert cb.on_close(path, report=report_of(path, records)) == path
    assert sum(read) == len(data) + 4  # once, and its magic for the type
    body, headers, etag = conn.objects["shoebox", "2024/03/09/a.events"]
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
    assert headers["Content-Type"] == "application/octet-stream"
    assert conn.containers == {"shoebox", "shoebox_segments"}
    # sent without an ETag (it is not known before), checked after
    puts = [c for c in conn.calls if c[0] == "put_object"]
    assert puts == [("put_object", "shoebox", "2024/03/09/a.events", None,
                     None, len(data))]
    assert ("post_object", "shoebox", "2024/03/09/a.events") in conn.calls
    (line,) = [r.getMessage() for r in caplog.records]
    assert "2024/03/09/a.events" in line and "MB/s" in line
    assert "s3cret" not in caplog.text
    cb.close()
    assert conn.closed


def test_on_close_without_report_reads_it(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=3)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    conn = FakeConnection()
    fake_callback(monkeypatch, conn).on_close(path + ".gz")
    _, headers, _ = conn.objects["shoebox", "a.events.gz"]
    assert headers["X-Object-Meta-Records"] == "3"
    assert headers["X-Object-Meta-Last-Timestamp"] == \
        records[-1][0]["timestamp"]
    assert headers["Content-Type"] == "application/gzip"
    assert headers["X-Object-Meta-Format-Versions"] == "2"


def test_on_close_unreadable_archive_is_uploaded_all_the_same(
        monkeypatch, tmp_path):
    path = tmp_path / "junk.events.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not really gzip" * 10)

    def fail(filename):
        raise OSError("cannot read")

    monkeypatch.setattr(archive, "inspect_file", fail)
    conn = FakeConnection()
    os.utime(path, (1e9, 1e9))
    fake_callback(monkeypatch, conn, object_prefix="%Y/").on_close(path)
    body, headers, _ = conn.objects["shoebox", "2001/junk.events.gz"]
    assert body == path.read_bytes()
    assert headers["X-Object-Meta-Damaged-Ranges"] == "1"
    assert "X-Object-Meta-Records" not in headers


def test_lost_metadata_post_fails_the_upload(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    conn = FakeConnection(fail=("lose_post", None))
    cb = fake_callback(monkeypatch, conn)
    with pytest.raises(exceptions.UploadError,
                       match="HEAD shoebox/a.events: SHA-256 None.*txhead"):
        cb.on_close(path, report=report_of(path, records))

def test_on_close_slo_and_stale_segments(monkeypatch, tmp_path):
    path = str(tmp_path / "big.events")
    write_archive(path, count=40)
    size = os.path.getsize(path)
    data = open(path, "rb").read()
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, segment_size="4K",
                       delete_after="60")
    records = archive.inspect_file(path)
    read = count_reads(monkeypatch)
    cb.on_close(path, report=records)
    assert sum(read) == size + 4  # once, and its magic for the type
    body, headers, etag = conn.objects["shoebox", "big.events"]
    assert body == data
    assert headers["X-Object-Meta-Sha256"] == hashlib.sha256(
        data).hexdigest()
    assert headers["X-Object-Meta-Records"] == "40"
    segments = sorted(o for c, o in conn.objects if c == "shoebox_segments")
    assert segments == ["big.events/%d/4096/%08d" % (size, i)
                        for i in range((size + 4095) // 4096)]
    for name in segments:  # each expiring after the manifest
        assert int(conn.objects["shoebox_segments", name][1][
            "X-Delete-At"]) >= int(headers["X-Delete-At"]) + \
            swift.SEGMENT_EXPIRY_MARGIN
    # the manifest goes last, once the SHA-256 is known
    puts = [c for c in conn.calls if c[0] == "put_object"]
    assert puts[-1][:4] == ("put_object", "shoebox", "big.events",
                            "multipart-manifest=put")
    monkeypatch.undo()
    # the same file again, with other settings: already there, nothing is
    # sent and nothing replaced
    manifest = conn.objects["shoebox", "big.events"]
    cb2 = fake_callback(monkeypatch, conn, segment_size="8K")
    calls = len(conn.calls)
    cb2.on_close(path)
    assert not [c for c in conn.calls[calls:] if c[0] == "put_object"]
    assert conn.objects["shoebox", "big.events"] == manifest
    assert sorted(o for c, o in conn.objects
                  if c == "shoebox_segments") == segments
    fake_callback(monkeypatch, conn).on_close(path)  # now a plain object
    assert conn.objects["shoebox", "big.events"] == manifest
    assert [k for k in conn.objects if k[0] == "shoebox"] == [
        ("shoebox", "big.events")]
    assert sorted(o for c, o in conn.objects
                  if c == "shoebox_segments") == segments
    # segments of an earlier attempt that never made its manifest go once
    # the object is verified (a crash, then another segment_size)
    del conn.objects["shoebox", "big.events"]
    cb2.on_close(path)
    segments = sorted(o for c, o in conn.objects if c == "shoebox_segments")
    assert segments == ["big.events/%d/8192/%08d" % (size, i)
                        for i in range((size + 8191) // 8192)]
    # and a plain upload leaves none
    del conn.objects["shoebox", "big.events"]
    fake_callback(monkeypatch, conn).on_close(path)
    assert [o for c, o in conn.objects if c == "shoebox_segments"] == []
    assert conn.objects["shoebox", "big.events"][0] == open(path,
                                                            "rb").read()


# -- never over an existing object (If-None-Match: *) -------------------------

def other_file(tmp_path, name="a.events", count=3):
    path = str(tmp_path / "other" / name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_archive(path, count=count)
    return path


@pytest.mark.parametrize("segment_size", ["1G", "2K"])
def test_a_name_holding_other_content_gets_a_new_name_loudly(
        monkeypatch, tmp_path, caplog, segment_size):
    path = str(tmp_path / "a.events")
    write_archive(path, count=20)
    data = open(path, "rb").read()
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, segment_size=segment_size)
    cb.on_close(other_file(tmp_path, count=25))
    theirs = conn.objects["shoebox", "a.events"]
    segments = {k: v for k, v in conn.objects.items()
                if k[0] == "shoebox_segments"}
    with caplog.at_level(logging.INFO, logger="shoebox_worker.ship.swift"):
        assert cb.on_close(path) == path
    assert conn.objects["shoebox", "a.events"] == theirs  # untouched
    for key, value in segments.items():
        assert conn.objects[key] == value
    other = "a~%s.events" % hashlib.sha256(data).hexdigest()[:16]
    body, headers, _ = conn.objects["shoebox", other]
    assert body == data
    assert headers["X-Object-Meta-Filename"] == "a.events"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "shoebox/a.events holds other content (%d bytes, ETag " % len(
        theirs[0]) in warning.getMessage()
    assert "NOT overwriting" in warning.getMessage()
    assert path in warning.getMessage()
    assert "shoebox/%s instead" % other in warning.getMessage()
    assert "to shoebox/%s:" % other in caplog.records[-1].getMessage()
    # a retry finds its own upload under the new name: done, nothing sent
    calls = len(conn.calls)
    cb.on_close(path)
    sent = [c for c in conn.calls[calls:] if c[0] == "put_object"]
    assert conn.objects["shoebox", other][0] == data
    assert all(c[2] in ("a.events", other) or c[1] == "shoebox_segments"
               for c in sent)


def test_a_name_taken_again_and_again_fails(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
    for name in ("a.events", "a~%s.events" % sha, "a~%s-2.events" % sha,
                 "a~%s-3.events" % sha):
        conn.objects["shoebox", name] = (b"x", {}, hashlib.md5(
            b"x").hexdigest())
    with pytest.raises(exceptions.UploadError, match="holds other|1 bytes"):
        cb.on_close(path)
    assert all(body == b"x" for body, _, _ in conn.objects.values())


def test_the_same_content_already_there_is_done(monkeypatch, tmp_path,
                                                caplog):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, delete_after="60")
    cb.on_close(path, report=report_of(path, records))
    before = conn.objects["shoebox", "a.events"]
    with caplog.at_level(logging.INFO, logger="shoebox_worker.ship.swift"):
        cb.on_close(path, report=report_of(path, records))
    assert conn.objects["shoebox", "a.events"] == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "already holds" in caplog.text
    assert len([k for k in conn.objects if k[0] == "shoebox"]) == 1


def test_an_earlier_upload_cut_before_its_metadata_is_completed(
        monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    data = open(path, "rb").read()
    conn = FakeConnection()
    conn.objects["shoebox", "a.events"] = (data, {}, hashlib.md5(
        data).hexdigest())  # PUT done, then a crash before the POST
    fake_callback(monkeypatch, conn).on_close(
        path, report=report_of(path, records))
    body, headers, _ = conn.objects["shoebox", "a.events"]
    assert body == data
    assert headers["X-Object-Meta-Sha256"] == hashlib.sha256(
        data).hexdigest()
    assert headers["X-Object-Meta-Records"] == str(len(records))


def test_a_segment_of_an_earlier_attempt_is_reused(monkeypatch, tmp_path):
    path = str(tmp_path / "big.events")
    write_archive(path, count=40)
    data = open(path, "rb").read()
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, segment_size="4K",
                       delete_after="60")
    first = cb.segment_name("big.events", len(data), 0)
    conn.objects["shoebox_segments", first] = (
        data[:4096], {"X-Delete-At": "1"}, hashlib.md5(
            data[:4096]).hexdigest())
    cb.on_close(path)
    assert conn.objects["shoebox", "big.events"][0] == data
    # its expiry renewed, later than the manifest's
    assert int(conn.objects["shoebox_segments", first][1][
        "X-Delete-At"]) > int(conn.objects["shoebox", "big.events"][1][
            "X-Delete-At"])


@pytest.mark.parametrize("segment_size", ["1G", "1K"])
def test_on_close_damaged_in_transit(monkeypatch, tmp_path, segment_size):
    path = str(tmp_path / "a.events")
    write_archive(path)
    before = open(path, "rb").read()
    conn = FakeConnection(corrupt=True)
    cb = fake_callback(monkeypatch, conn, segment_size=segment_size)
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path)
    text = str(info.value)
    assert "\n" not in text
    assert path in text and "shoebox/a.events" in text
    assert "returned ETag" in text and "(txn txput)" in text
    assert ("post_object", "shoebox", "a.events") not in conn.calls
    assert not [c for c in conn.calls if c[0] == "put_object" and c[3]]
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


@pytest.mark.parametrize("op, exc, hint", [
    ("put_object", ClientException("Auth GET failed", http_status=401,
                                   http_reason="Unauthorized"),
     "check [callback:swift] user and key"),
    ("put_object", ClientException("Unauthorized. Check username, "
                                   "password and tenant name/id."),
     "check [callback:swift] user and key"),
    ("put_object", ClientException("Object PUT failed", http_status=403,
                                   http_reason="Forbidden"),
     "check that the [callback:swift] user may write to containers shoebox "
     "and shoebox_segments (with Keystone: an operator role of Swift's "
     "keystoneauth in the project)"),
    ("put_container", ClientException(
        "Container PUT failed", http_status=400, http_reason="Bad Request",
        http_path="/v1/AUTH_test/" + "c" * 300),
     "check [callback:swift] container"),
    ("put_object", ClientException(
        "Object PUT failed", http_status=400, http_reason="Bad Request",
        http_path="/v1/AUTH_test/shoebox/" + "o" * 2000),
     "check [callback:swift] object_prefix and segment_size (Swift "
     "refuses the object's name or size)"),
])
def test_errors_retrying_cannot_fix_are_told_apart(monkeypatch, tmp_path,
                                                   op, exc, hint):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    cb = fake_callback(monkeypatch, FakeConnection(fail=(op, exc)))
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path, report=report_of(path, records))
    assert info.value.permanent and info.value.hint == hint
    assert str(info.value).count("failed on") == 1


@pytest.mark.parametrize("exc", [
    ClientException("Object PUT failed", http_status=503,
                    http_reason="Service Unavailable"),
    ClientException("Object PUT failed", http_status=422),
    ConnectionRefusedError(111, "Connection refused"),
])
def test_errors_that_may_pass_are_not_permanent(monkeypatch, tmp_path,
                                                exc):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    cb = fake_callback(monkeypatch, FakeConnection(fail=("put_object", exc)))
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path, report=report_of(path, records))
    assert not info.value.permanent and info.value.hint is None


@pytest.mark.parametrize("exc, hint", [
    (ks_exceptions.Unauthorized("The request you have made requires "
                                "authentication.", http_status=401),
     "check [callback:swift] os_username (or os_user_id), os_password, "
     "the domains and the project"),
    (ks_exceptions.EndpointNotFound("no object-store"),
     "check [callback:swift] os_region_name, os_endpoint_type and "
     "os_service_type (no such endpoint in the Keystone catalog)"),
])
def test_keystone_refusals_are_permanent(monkeypatch, tmp_path, exc, hint):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    monkeypatch.setattr(swift, "_Connection", lambda **kw: FakeConnection(
        fail=("put_container", exc)))
    cb = swift.SwiftUploadCallback(**V3)
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path, report=report_of(path, records))
    assert info.value.permanent and info.value.hint == hint
    assert "s3cret" not in str(info.value)


def test_keystone_unreachable_may_pass(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path)
    monkeypatch.setattr(swift, "_Connection", lambda **kw: FakeConnection(
        fail=("put_container", ks_exceptions.ConnectFailure("refused"))))
    cb = swift.SwiftUploadCallback(**V3)
    with pytest.raises(exceptions.UploadError) as info:
        cb.on_close(path, report=report_of(path, records))
    assert not info.value.permanent


@pytest.mark.parametrize("segment_size", ["1G", "2K"])
def test_this_file_there_with_a_wrong_etag_fails(monkeypatch, tmp_path,
                                                 segment_size):
    # a plain object with this SHA-256 and size whose ETag is not its MD5:
    # Swift's word does not hold, and the upload fails
    path = str(tmp_path / "a.events")
    write_archive(path, count=10)
    data = open(path, "rb").read()
    conn = FakeConnection()
    sha = hashlib.sha256(data).hexdigest()
    conn.objects["shoebox", "a.events"] = (
        data, {"X-Object-Meta-Sha256": sha}, "0" * 32)
    cb = fake_callback(monkeypatch, conn, segment_size=segment_size)
    if segment_size == "1G":
        with pytest.raises(exceptions.UploadError, match="ETag 0{32}"):
            cb.on_close(path)
    else:  # as an SLO: size and SHA-256 decide, and this is the file
        cb.on_close(path)
    assert [k for k in conn.objects if k[0] == "shoebox"] == [
        ("shoebox", "a.events")]


def test_head_after_upload_compares_the_etag(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path)
    conn = FakeConnection()
    real_head = conn.head_object

    def lying_head(container, obj):
        head = real_head(container, obj)
        head["etag"] = "0" * 32
        return head

    conn.head_object = lying_head
    with pytest.raises(exceptions.UploadError,
                       match="HEAD shoebox/a.events: .*ETag 0{32}; expected"):
        fake_callback(monkeypatch, conn).on_close(path)


def test_a_segment_name_holding_other_bytes_sends_it_all_elsewhere(
        monkeypatch, tmp_path, caplog):
    path = str(tmp_path / "big.events")
    write_archive(path, count=20)
    data = open(path, "rb").read()
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, segment_size="2K")
    first = cb.segment_name("big.events", len(data), 0)
    conn.objects["shoebox_segments", first] = (b"abc", {}, hashlib.md5(
        b"abc").hexdigest())
    with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
        cb.on_close(path)
    assert ("holds other content (segment shoebox_segments/%s: 3 bytes, "
            "ETag %s, SHA-256 none)" % (first, hashlib.md5(b"abc").hexdigest())
            in caplog.text)
    assert conn.objects["shoebox_segments", first][0] == b"abc"
    other = "big~%s.events" % hashlib.sha256(data).hexdigest()[:16]
    assert conn.objects["shoebox", other][0] == data


def test_each_put_renews_a_token_about_to_expire(monkeypatch, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")

    class AuthRef:
        def will_expire_soon(self, margin):
            return margin == swift.TOKEN_MARGIN

    class Session:
        invalidated = 0
        auth = type("Auth", (), {"auth_ref": AuthRef()})()

        def invalidate(self):
            self.invalidated += 1

    class Conn:
        session = Session()
        url = token = "old"

        def put_object(self, container, obj, contents, **kwargs):
            while contents.read(2):
                pass
            return hashlib.md5(b"abc").hexdigest()

    conn = Conn()
    cb = swift.SwiftUploadCallback(**V1)
    with open(path, "rb") as f:
        part = swift._Part(f.fileno(), 0, 3, swift._FileHash(str(path)))
        cb._put(conn, "c", "o", part, {}, "t/t")
    assert conn.session.invalidated == 1
    assert conn.url is conn.token is None


# -- the index beside the archive --------------------------------------------

def index_beside(path, value="i-1"):
    builder = index.Builder(("payload.instance_id",))
    builder.add(None, (value,))
    data = builder.to_bytes()
    index.write_file(index.sidecar(path), data)
    return data


def bound_to(data, path):
    """``data``, an index, bound to the plain object of the file
    ``path``."""
    return index.bind(data, index.etag_of_file(path), os.path.getsize(path))


def test_index_uploaded_after_the_archive_beside_it(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=2)
    data = index_beside(path)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn, object_prefix="%Y/",
                       delete_after="60")
    assert cb.on_close(path, report=report_of(path, records)) == path
    body, headers, etag = conn.objects["shoebox", "2024/a.events.index"]
    assert body == bound_to(data, path)
    assert etag == hashlib.md5(body).hexdigest()
    assert index.Index.from_bytes(body).etag == \
        conn.objects["shoebox", "2024/a.events"][2].strip('"')
    assert abs(int(headers["X-Delete-At"]) - (time.time() + 60)) < 5
    assert headers["Content-Type"] == swift.INDEX_CONTENT_TYPE
    puts = [c[2] for c in conn.calls if c[0] == "put_object"]
    assert puts == ["2024/a.events", "2024/a.events.index"]
    # the archive verified (its HEAD) before the index is sent
    calls = [c[:3] for c in conn.calls]
    assert calls.index(("head_object", "shoebox", "2024/a.events")) < \
        calls.index(("put_object", "shoebox", "2024/a.events.index"))
    assert os.path.exists(index.sidecar(path))  # the chain removes it


def test_index_put_with_if_none_match(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    index_beside(path)
    conn = FakeConnection()
    sent = []
    real_put = conn.put_object

    def put_object(container, obj, contents, **kwargs):
        sent.append((obj, dict(kwargs["headers"])))
        return real_put(container, obj, contents, **kwargs)

    conn.put_object = put_object
    fake_callback(monkeypatch, conn).on_close(path)
    assert [(obj, h.get("If-None-Match")) for obj, h in sent] == [
        ("a.events", "*"), ("a.events.index", "*")]


def test_index_sent_before_is_done(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    records = write_archive(path, count=2)
    index_beside(path)
    conn = FakeConnection()
    cb = fake_callback(monkeypatch, conn)
    cb.on_close(path, report=report_of(path, records))
    before = dict(conn.objects)
    conn.calls.clear()
    cb.on_close(path, report=report_of(path, records))  # a retry
    assert conn.objects == before
    puts = [c[2] for c in conn.calls if c[0] == "put_object"]
    assert puts == ["a.events", "a.events.index"]  # both 412, both done


def test_another_index_under_the_name_is_replaced(monkeypatch, tmp_path,
                                                  caplog):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    data = index_beside(path)
    conn = FakeConnection()
    conn.objects["shoebox", "a.events.index"] = (b"old", {}, hashlib.md5(
        b"old").hexdigest())
    fake_callback(monkeypatch, conn).on_close(path)
    assert conn.objects["shoebox", "a.events.index"][0] == \
        bound_to(data, path)
    assert "index object shoebox/a.events.index holds other content" in \
        caplog.text


def test_no_index_sends_nothing_more(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    conn = FakeConnection()
    fake_callback(monkeypatch, conn).on_close(path)
    assert sorted(conn.objects) == [("shoebox", "a.events")]


def test_a_failed_index_upload_fails_the_step(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    index_beside(path)
    conn = FakeConnection(corrupt=False)
    real_put = conn.put_object

    def put_object(container, obj, contents, **kwargs):
        if obj.endswith(".index"):
            raise ClientException("Object PUT failed", http_status=503)
        return real_put(container, obj, contents, **kwargs)

    conn.put_object = put_object
    with pytest.raises(exceptions.UploadError, match="503"):
        fake_callback(monkeypatch, conn).on_close(path)
    assert ("shoebox", "a.events") in conn.objects


def test_index_beside_the_other_name(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    data = index_beside(path)
    conn = FakeConnection()
    conn.objects["shoebox", "a.events"] = (b"other", {}, hashlib.md5(
        b"other").hexdigest())
    fake_callback(monkeypatch, conn).on_close(path)
    (other,) = [o for c, o in conn.objects
                if o.startswith("a~") and not o.endswith(".index")]
    assert conn.objects["shoebox", other + ".index"][0] == \
        bound_to(data, path)
    assert ("shoebox", "a.events.index") not in conn.objects


def test_index_of_an_slo_bound_to_its_etag(monkeypatch, tmp_path):
    path = str(tmp_path / "a.events")
    write_archive(path, count=40)
    data = index_beside(path)
    conn = FakeConnection()
    fake_callback(monkeypatch, conn, segment_size="1024").on_close(path)
    etag = conn.objects["shoebox", "a.events"][2].strip('"')
    assert etag != index.etag_of_file(path)  # its segments' ETag
    assert conn.objects["shoebox", "a.events.index"][0] == index.bind(
        data, etag, os.path.getsize(path))


def test_a_damaged_index_is_not_uploaded(monkeypatch, tmp_path, caplog):
    path = str(tmp_path / "a.events")
    write_archive(path, count=2)
    with open(index.sidecar(path), "wb") as f:
        f.write(b"SBXI\x02 not an index")
    conn = FakeConnection()
    assert fake_callback(monkeypatch, conn).on_close(path) == path
    assert sorted(conn.objects) == [("shoebox", "a.events")]
    assert "is read in full by pruned reads" in caplog.text


def test_swiftclient_log_lines_mask_secrets_with_the_one_mask():
    # the mask of every secret: broker URLs and Swift headers alike
    from shoebox_worker import broker_url
    record = logging.LogRecord(
        "swiftclient", logging.INFO, "f.py", 1,
        "REQ: curl -i http://h/v1 -H \"X-Auth-Token: AUTH_tk5e3c\" "
        "RESP headers: {'X-Auth-Key': 's3cr3t', 'Content-Length': '0'}",
        (), None)
    swift._RedactSecrets().filter(record)
    text = record.getMessage()
    assert "tk5e3c" not in text and "s3cr3t" not in text
    assert "X-Auth-Token: %s" % broker_url.MASK in text
    assert "'X-Auth-Key': '%s'" % broker_url.MASK in text
    assert broker_url.MASK == "***"


# -- redirects: credentials stay with their origin -------------------------

class Recorder:
    """A local HTTP server (a thread) that answers every request with
    ``answer(handler)`` and records the method, path and headers it got."""

    def __init__(self, answer):
        import http.server
        import threading
        self.requests = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((
                    self.command, self.path,
                    {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = answer(self)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def headers(self):
        """Every header name received (lowercase)."""
        return {name for _, _, headers, _ in self.requests
                for name in headers}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def elsewhere():
    """Another origin (another port), which answers 401 to anything."""
    server = Recorder(lambda handler: (401, {}))
    yield server
    server.close()


def redirecting_to(target):
    """A server that answers 302 to the same path at ``target``."""
    return Recorder(lambda handler: (302, {"Location": target + handler.path}))


def test_a_v1_auth_redirected_elsewhere_does_not_send_the_key(elsewhere,
                                                              caplog):
    auth = redirecting_to(elsewhere.url)
    try:
        cb = swift.SwiftUploadCallback(auth=auth.url + "/auth/v1.0",
                                       user="acct:me", key="s3cret-key",
                                       retries=0)
        conn = cb.new_connection()
        with caplog.at_level(logging.DEBUG, logger="swiftclient"), \
                pytest.raises(ClientException, match="Auth GET failed"):
            conn.get_auth()
        conn.close()
    finally:
        auth.close()
    assert [r[1] for r in auth.requests] == ["/auth/v1.0"]
    assert auth.requests[0][2]["x-auth-key"] == "s3cret-key"
    assert not {"x-auth-key", "x-auth-user"} & elsewhere.headers()
    assert "/auth/v1.0 -X GET" in caplog.text  # as swiftclient logs it
    assert "s3cret" not in caplog.text


def test_a_swift_answer_redirected_elsewhere_does_not_send_the_token(
        elsewhere):
    storage = redirecting_to(elsewhere.url)
    try:
        cb = swift.SwiftUploadCallback(
            os_storage_url=storage.url + "/v1/AUTH_me",
            os_auth_token="tok-s3cret", retries=0)
        for request in (lambda conn: conn.head_container("c"),
                        lambda conn: conn.get_object("c", "o")):
            conn = cb.new_connection()  # a 401 makes it forget the token
            with pytest.raises(ClientException):
                request(conn)
            conn.close()
    finally:
        storage.close()
    assert len(storage.requests) == 2
    assert all(r[2]["x-auth-token"] == "tok-s3cret"
               for r in storage.requests)
    assert "x-auth-token" not in elsewhere.headers()


def test_a_same_origin_redirect_keeps_the_token():
    """Credentials are dropped on another origin's hop, not on every hop."""
    def answer(handler):
        if handler.path.startswith("/old/"):
            return 302, {"Location": handler.path.replace("/old/", "/v1/")}
        return 204, {"X-Container-Object-Count": "0"}
    storage = Recorder(answer)
    try:
        cb = swift.SwiftUploadCallback(os_storage_url=storage.url + "/old/a",
                                       os_auth_token="tok-s3cret", retries=0)
        conn = cb.new_connection()
        conn.head_container("c")
        conn.close()
    finally:
        storage.close()
    assert [(r[1], r[2].get("x-auth-token")) for r in storage.requests] == [
        ("/old/a/c", "tok-s3cret"), ("/v1/a/c", "tok-s3cret")]


def test_a_keystone_answer_redirected_elsewhere_sends_no_password(elsewhere):
    keystone = redirecting_to(elsewhere.url)
    try:
        cb = swift.SwiftUploadCallback(**dict(
            V3, os_auth_url=keystone.url + "/v3"))
        session = swift.keystone_session(cb.options)
        with pytest.raises(ks_exceptions.ClientException):
            session.get_token()
    finally:
        keystone.close()
    assert keystone.requests
    assert b"s3cret-pw" in keystone.requests[0][3]
    assert elsewhere.requests == []
