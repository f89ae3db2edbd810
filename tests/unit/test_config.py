"""Tests for shoebox_worker.config: every message, every default."""

import dataclasses
import datetime
import os
import pathlib
import textwrap

import pytest

from shoebox_worker import config
from shoebox_worker.exceptions import ConfigError
from shoebox_worker.integrity import keys

BASE = """\
[broker]
url = memory://

[consumer:notifications.info]
"""


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write ``worker.conf`` in the (temporary) current directory."""
    monkeypatch.chdir(tmp_path)

    def write(text, name="worker.conf"):
        pathlib.Path(name).write_text(textwrap.dedent(text))
        return name
    return write


def error(path, environ=None):
    """The one-line message load() fails with."""
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={} if environ is None else environ)
    message = str(info.value)
    assert "\n" not in message
    return message


def base_error(write, text, environ=None):
    return error(write(BASE + textwrap.dedent(text)), environ)


def load(write, text="", environ=None):
    return config.load(write(BASE + textwrap.dedent(text)),
                       environ={} if environ is None else environ)


# -- defaults ---------------------------------------------------------------

def test_defaults(write):
    conf = load(write)
    assert conf.filename == "worker.conf"
    assert conf.broker == config.BrokerConfig(
        url="memory://", prefetch_count=2000, heartbeat=60.0,
        connect_timeout=10.0, connect_max_retries=None,
        failover_strategy="round-robin")
    assert conf.consumers == (config.ConsumerConfig(
        queue="notifications.info", exchange=("nova",),
        exchange_type="topic", routing_key=None, durable=False,
        exchange_durable=False, auto_delete=False, queue_arguments={},
        declare=True),)
    assert conf.consumers[0].bindings == (("nova", "notifications.info"),)
    archive = conf.archive
    assert archive.working_directory == "/var/lib/shoebox-worker"
    assert archive.filename_template == (
        "shoebox_%Y%m%dT%H%M%S_{worker_id}.events")
    assert archive.version == 2
    assert archive.roll_checker == ("size",)
    assert archive.callbacks == ()
    assert archive.fsync_every == 1000
    assert archive.fsync_interval == 1.0
    assert archive.metadata_fields == ()
    assert dict(archive.static_metadata) == {}
    assert archive.max_backlog_mb == 10240
    assert archive.retry_initial == 1.0
    assert archive.retry_max == 300
    assert dict(conf.roll_checker_options) == {}
    assert dict(conf.callback_options) == {}
    assert conf.worker == config.WorkerConfig(processes=1,
                                              stats_interval=60.0)
    assert conf.metrics == config.MetricsConfig(port=None, host="127.0.0.1",
                                                watch_queues=())
    assert conf.logging == config.LoggingConfig(level="INFO", file=None)


def test_dataclasses_follow_the_option_tables():
    classes = {
        "broker": config.BrokerConfig, "consumer": config.ConsumerConfig,
        "archive": config.ArchiveConfig, "worker": config.WorkerConfig,
        "metrics": config.MetricsConfig, "logging": config.LoggingConfig,
        "integrity": config.IntegrityConfig,
    }
    assert list(classes) == list(config.SECTIONS)
    for section, cls in classes.items():
        table = config.SECTIONS[section]
        fields = [f for f in dataclasses.fields(cls) if f.name != "queue"]
        assert [f.name for f in fields] == list(table), section
        for field in fields:
            option = table[field.name]
            if option.default is None or field.name in (
                    "routing_key", "exchange_durable"):
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            else:
                default = field.default_factory()
            assert option.parse(option.default) == default, field.name


def test_consumer_defaults_derive_from_queue_and_durable():
    consumer = config.ConsumerConfig("q", durable=True)
    assert consumer.routing_key is None  # not set: the worker warns
    assert consumer.routing_keys == ("q",)
    assert consumer.bindings == (("nova", "q"),)
    assert consumer.exchange_durable is True
    consumer = config.ConsumerConfig("q", routing_key=("k",), durable=True,
                                     exchange_durable=False)
    assert (consumer.routing_keys, consumer.exchange_durable) == (("k",),
                                                                  False)


def test_bindings_are_every_exchange_with_every_key():
    consumer = config.ConsumerConfig(
        "q", exchange=("nova", "glance", "neutron"),
        routing_key=("notifications.*", "versioned_notifications.*"))
    assert consumer.bindings == (
        ("nova", "notifications.*"), ("nova", "versioned_notifications.*"),
        ("glance", "notifications.*"),
        ("glance", "versioned_notifications.*"),
        ("neutron", "notifications.*"),
        ("neutron", "versioned_notifications.*"))


# -- the file ---------------------------------------------------------------

def test_missing_file(write):
    assert error("missing.conf") == (
        "missing.conf: cannot read: No such file or directory")


def test_directory(write):
    os.mkdir("conf.d")
    assert error("conf.d") == "conf.d: cannot read: Is a directory"


def test_unreadable_file(write, monkeypatch):
    path = write(BASE)
    os.chmod(path, 0)
    if os.geteuid() == 0:
        # root reads anything: refuse the way the kernel does for others.
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(config, "open", refuse, raising=False)
    assert error(path) == "worker.conf: cannot read: Permission denied"


def test_not_utf8(write):
    pathlib.Path("worker.conf").write_bytes(b"[broker]\nurl = \xff\n")
    assert error("worker.conf") == (
        "worker.conf: cannot read: not UTF-8 text (byte 0xff at offset 15)")


def test_accepts_path_objects_and_a_bom(write):
    write(BASE)
    data = pathlib.Path("worker.conf").read_bytes()
    pathlib.Path("worker.conf").write_bytes(b"\xef\xbb\xbf" + data)
    conf = config.load(pathlib.Path("worker.conf"), environ={})
    assert conf.filename == "worker.conf"


def test_option_before_any_section(write):
    assert error(write("url = memory://\n")) == (
        "worker.conf: line 1: 'url = memory://' comes before any "
        "[section] header")


def test_line_that_is_not_an_option(write):
    path = write(BASE + "\n[archive]\nfsync_every 10\n")
    assert error(path) == (
        "worker.conf: line 7: expected 'key = value', a [section] or a # "
        "comment, got 'fsync_every 10'")


def test_section_twice(write):
    path = write(BASE + "\n[archive]\n\n[archive]\n")
    assert error(path) == (
        "worker.conf [archive]: line 8: section appears twice")


def test_option_twice(write):
    path = write(BASE + "\n[archive]\nfsync_every = 1\nfsync_every = 2\n")
    assert error(path) == (
        "worker.conf [archive] fsync_every: line 8: option set twice in "
        "this section")


def test_keys_in_default_are_refused(write):
    path = write("[DEFAULT]\nlevel = 9\n\n" + BASE)
    assert error(path) == (
        "worker.conf [DEFAULT] level: options in [DEFAULT] are not allowed "
        "(configparser copies them into every section, where plugins would "
        "refuse them); move it to the section it belongs to")


def test_empty_default_section_is_fine(write):
    assert config.load(write("[DEFAULT]\n" + BASE), environ={})


def test_no_consumer(write):
    assert error(write("[broker]\nurl = memory://\n")) == (
        "worker.conf: no [consumer:QUEUE] section: name at least one queue "
        "to consume")


def test_missing_url(write):
    assert error(write("[broker]\n\n[consumer:q]\n")) == (
        "worker.conf [broker] url: required option is missing")


def test_missing_broker_section(write):
    assert error(write("[consumer:q]\n")) == (
        "worker.conf [broker] url: required option is missing")


def test_empty_url(write):
    assert error(write("[broker]\nurl =\n[consumer:q]\n")) == (
        "worker.conf [broker] url: must not be empty")


# -- unknown sections and options ------------------------------------------

@pytest.mark.parametrize("section, message", [
    ("archvie", "unknown section (did you mean [archive]?)"),
    ("Broker", "unknown section (did you mean [broker]?)"),
    ("consumers:notifications.info",
     "unknown section (did you mean [consumer:notifications.info]?)"),
    ("consumer", "unknown section (did you mean [consumer:QUEUE]?)"),
    ("callback", "unknown section (did you mean [callback:NAME]?)"),
    ("callbacks", "unknown section (did you mean [callback:NAME]?)"),
    ("rollchecker:size",
     "unknown section (did you mean [roll_checker:size]?)"),
    ("zzz", "unknown section"),
])
def test_unknown_section(write, section, message):
    assert base_error(write, "[%s]\n" % section) == (
        "worker.conf [%s]: %s" % (section, message))


@pytest.mark.parametrize("section, prefix", [
    ("consumer:", "queue"), ("callback:", "name"), ("roll_checker: ", "name"),
])
def test_empty_prefixed_section_name(write, section, prefix):
    assert base_error(write, "[%s]\n" % section) == (
        "worker.conf [%s]: empty %s name after %r"
        % (section, prefix, section.strip()))


@pytest.mark.parametrize("section, key, message", [
    ("archive", "rol_checker",
     "unknown option (did you mean roll_checker?)"),
    ("archive", "fsync_evry", "unknown option (did you mean fsync_every?)"),
    ("broker", "prefetch", "unknown option (did you mean prefetch_count?)"),
    ("consumer:notifications.info", "durabel",
     "unknown option (did you mean durable?)"),
    ("worker", "colour", "unknown option"),
    ("metrics", "prot", "unknown option (did you mean port?)"),
    ("logging", "levl", "unknown option (did you mean level?)"),
])
def test_unknown_option(write, section, key, message):
    text = "[consumer:notifications.info]\n[broker]\nurl = memory://\n"
    if section.startswith("consumer:"):
        text = "[broker]\nurl = memory://\n"
    if section != "broker":
        text += "[%s]\n" % section
    text += "%s = 1\n" % key
    assert error(write(text)) == "worker.conf [%s] %s: %s" % (
        section, key, message)


def test_keys_are_case_insensitive(write):
    assert load(write, "[archive]\nFsync_Every = 10\n").archive.fsync_every \
        == 10


# -- environment variables and secrets -------------------------------------

def test_environment_variables_expand_anywhere(write):
    conf = load(write, """
        [archive]
        static_metadata = region=${REGION}, cell=c${CELL}
        """, environ={"REGION": "dfw", "CELL": "1"})
    assert dict(conf.archive.static_metadata) == {
        "region": "dfw", "cell": "c1"}


def test_environment_defaults_to_os_environ(write, monkeypatch):
    monkeypatch.setenv("SHOEBOX_TEST_PASSWORD", "s3cret")
    path = write("""\
        [broker]
        url = amqp://guest:${SHOEBOX_TEST_PASSWORD}@127.0.0.1:5672//
        [consumer:q]
        """)
    conf = config.load(path)
    assert conf.broker.url == "amqp://guest:s3cret@127.0.0.1:5672//"


def test_unset_environment_variable(write):
    path = write("""\
        [broker]
        url = amqp://guest:${RABBIT_PASSWORD}@127.0.0.1:5672//
        [consumer:q]
        """)
    assert error(path) == (
        "worker.conf [broker] url: environment variable RABBIT_PASSWORD is "
        "not set (under systemd: in /etc/shoebox-worker/env, the unit's "
        "EnvironmentFile=)")


def test_unset_environment_variable_in_plugin_section(write):
    assert base_error(write, """
        [archive]
        callbacks = swift
        [callback:swift]
        key = ${SWIFT_KEY}
        """) == (
        "worker.conf [callback:swift] key: environment variable SWIFT_KEY "
        "is not set (under systemd: in /etc/shoebox-worker/env, the unit's "
        "EnvironmentFile=)")


def test_bad_environment_reference(write):
    assert base_error(write, """
        [archive]
        static_metadata = region=${REGION:-dfw}
        """) == (
        "worker.conf [archive] static_metadata: bad environment variable "
        "reference '${REGION:-dfw}': expected ${NAME} or "
        "${credential:NAME}")


def test_systemd_credentials(write, tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "rabbit-password").write_text("a/b#c@d%e;f\n")
    (creds / "swift-key").write_bytes(b"k3y")
    conf = config.load(write("""
        [broker]
        url = amqp://shoebox:${credential:rabbit-password}@rabbit1//
        [consumer:q]
        [archive]
        working_directory = .
        callbacks = swift
        [callback:swift]
        key = ${credential:swift-key}
        """), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert conf.broker.urls[0].password == "a/b#c@d%e;f"
    assert conf.callback_options["swift"]["key"] == "k3y"
    # secrets: masked wherever the config is shown
    assert "a/b#c" not in repr(conf) and "k3y" not in repr(conf)


@pytest.mark.parametrize("value, environ, message", [
    ("${credential:rabbit-password}", {},
     "${credential:rabbit-password}: CREDENTIALS_DIRECTORY is not set: "
     "systemd sets it for a unit with LoadCredential= (see "
     "etc/shoebox-worker.service); run by hand, set it to a folder holding "
     "the file rabbit-password"),
    ("${credential:missing}", {"CREDENTIALS_DIRECTORY": "{creds}"},
     "${credential:missing}: cannot read {creds}/missing: No such file or "
     "directory (is the unit's LoadCredential= for it set, and its file "
     "there?)"),
    ("${credential:../etc}", {"CREDENTIALS_DIRECTORY": "{creds}"},
     "bad credential name '../etc' in ${credential:../etc}: letters, "
     "digits and . _ - @ + only"),
])
def test_systemd_credential_mistakes(write, tmp_path, value, environ,
                                     message):
    creds = str(tmp_path)
    environ = {k: v.replace("{creds}", creds) for k, v in environ.items()}
    assert base_error(write, "[archive]\nstatic_metadata = a=%s\n" % value,
                      environ=environ) == (
        "worker.conf [archive] static_metadata: "
        + message.replace("{creds}", creds))


def test_expanded_values_are_not_expanded_again(write):
    conf = load(write, "[archive]\nstatic_metadata = a=${A}\n",
                environ={"A": "${B}"})
    assert conf.archive.static_metadata["a"] == "${B}"


def test_secrets_stay_out_of_repr_and_str(write):
    path = write("""\
        [broker]
        url = amqp://shoebox:inline-secret@rabbit1:5672//;amqp://shoebox:${RABBIT_PASSWORD}@rabbit2//
        [consumer:q]
        [archive]
        callbacks = swift
        [callback:swift]
        user = test:tester
        key = plain-swift-key
        os_password = os-secret
        os_auth_url = https://admin:url-secret@keystone/v3
        container = ${CONTAINER}
        """)  # noqa: E501
    conf = config.load(path, environ={"RABBIT_PASSWORD": "env-secret",
                                      "CONTAINER": "from-env"})
    assert conf.broker.url == (
        "amqp://shoebox:inline-secret@rabbit1:5672//;"
        "amqp://shoebox:env-secret@rabbit2//")
    options = conf.callback_options["swift"]
    assert options["key"] == "plain-swift-key"
    assert options["os_password"] == "os-secret"
    assert options["container"] == "from-env"
    for text in (repr(conf), str(conf), repr(conf.broker), repr(options)):
        for secret in ("inline-secret", "env-secret", "plain-swift-key",
                       "os-secret", "url-secret", "from-env"):
            assert secret not in text
    assert "test:tester" in repr(options)
    assert conf.redacted_url() == conf.broker.redacted_url() == (
        "amqp://shoebox:***@rabbit1:5672//;amqp://shoebox:***@rabbit2//")
    assert [url.password for url in conf.broker.urls] == [
        "inline-secret", "env-secret"]
    assert [url.location for url in conf.broker.urls] == [
        "rabbit1:5672//", "rabbit2//"]


@pytest.mark.parametrize("url, redacted", [
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("amqp://u:p@ss@host/vhost", "amqp://u:***@host/vhost"),
    ("amqp://user@host//", "amqp://user@host//"),
    ("memory://", "memory://"),
    ("amqp://a:1@h1//;redis://:2@h2:6379", "amqp://a:***@h1//;redis://:***@h2:6379"),
])
def test_redact_url(url, redacted):
    assert config.redact_url(url) == redacted


# -- [broker] ---------------------------------------------------------------

def test_broker_values(write):
    conf = config.load(write("""\
        [broker]
        url = amqp://h1// ; amqp://h2//
        prefetch_count = 5000
        heartbeat = 0
        connect_timeout = 2.5
        connect_max_retries = 0
        failover_strategy = shuffle
        [consumer:q]
        """), environ={})
    assert conf.broker == config.BrokerConfig(
        url="amqp://h1//;amqp://h2//", prefetch_count=5000, heartbeat=0.0,
        connect_timeout=2.5, connect_max_retries=0,
        failover_strategy="shuffle")


@pytest.mark.parametrize("key, value, message", [
    ("prefetch_count", "ten", "expected an integer, got 'ten'"),
    ("prefetch_count", "0", "expected an integer >= 1, got '0'"),
    ("prefetch_count", "2.5", "expected an integer, got '2.5'"),
    ("heartbeat", "-1", "expected a number >= 0, got '-1'"),
    ("heartbeat", "nan", "expected a number, got 'nan'"),
    ("connect_timeout", "0", "expected a number > 0, got '0'"),
    ("connect_max_retries", "-1", "expected an integer >= 0, got '-1'"),
    ("failover_strategy", "roundrobin",
     "expected one of round-robin, shuffle, got 'roundrobin' "
     "(did you mean round-robin?)"),
])
def test_broker_errors(write, key, value, message):
    path = write("[broker]\nurl = memory://\n%s = %s\n[consumer:q]\n"
                 % (key, value))
    assert error(path) == "worker.conf [broker] %s: %s" % (key, message)


@pytest.mark.parametrize("url, message", [
    ("amqps2://guest:secret@h//",
     "unknown transport 'amqps2' (did you mean amqps?)"),
    ("amqp://h//;zzz://guest:secret@h2//",
     "unknown transport 'zzz' (URL 2)"),
    ("127.0.0.1:5672",
     "expected a URL like amqp://user:password@host:5672//, "
     "got '127.0.0.1:5672'"),
    ("amqp://guest:secret@h:56x2//",
     "bad port in 'amqp://guest:***@h:56x2//'"),
])
def test_broker_url_errors(write, url, message):
    path = write("[broker]\nurl = %s\n[consumer:q]\n" % url)
    result = error(path)
    assert result == "worker.conf [broker] url: %s" % message
    assert "secret" not in result


def test_broker_url_transports(write):
    for url in ("redis://:pw@127.0.0.1:6379/0", "memory://",
                "sqla+sqlite:///x.db", "amqp://[::1]:5672//"):
        path = write("[broker]\nurl = %s\n[consumer:q]\n" % url)
        assert config.load(path, environ={}).broker.url == url


# -- [consumer:QUEUE] -------------------------------------------------------

def test_consumers(write):
    conf = config.load(write("""\
        [broker]
        url = memory://
        [consumer:notifications.info]
        exchange = glance
        exchange_type = Direct
        routing_key = notifications.*
        durable = yes
        auto_delete = on
        queue_arguments = x-queue-type=quorum, x-max-length=100000, x-single-active-consumer=true, x-overflow=reject-publish, x-x=-5
        declare = off
        [consumer:notifications.error]
        durable = true
        exchange_durable = false
        """), environ={})  # noqa: E501
    info, err = conf.consumers
    assert info == config.ConsumerConfig(
        queue="notifications.info", exchange=("glance",),
        exchange_type="direct", routing_key=("notifications.*",),
        durable=True,
        exchange_durable=True, auto_delete=True,
        queue_arguments={"x-queue-type": "quorum", "x-max-length": 100000,
                         "x-single-active-consumer": True,
                         "x-overflow": "reject-publish", "x-x": -5},
        declare=False)
    assert type(info.queue_arguments["x-max-length"]) is int
    assert (err.queue, err.routing_keys, err.durable, err.exchange_durable) \
        == ("notifications.error", ("notifications.error",), True, False)
    assert err.exchange == ("nova",)


def test_exchange_and_routing_key_are_comma_lists(write):
    # blanks around items and empty items (a trailing comma, a doubled
    # one) are dropped; a value may go on over indented lines
    conf = config.load(write("""\
        [broker]
        url = memory://
        [consumer:shoebox-archiver]
        exchange = nova,glance , ,neutron,
            cinder
            heat
        routing_key =   notifications.* ,versioned_notifications.#,
        """), environ={})
    consumer = conf.consumers[0]
    assert consumer.exchange == ("nova", "glance", "neutron", "cinder",
                                 "heat")
    assert consumer.routing_key == ("notifications.*",
                                    "versioned_notifications.#")
    assert len(consumer.bindings) == 10
    assert consumer.bindings[:3] == (
        ("nova", "notifications.*"), ("nova", "versioned_notifications.#"),
        ("glance", "notifications.*"))


def test_a_routing_key_of_commas_only_is_not_set(write):
    conf = config.load(write(
        "[broker]\nurl = memory://\n[consumer:q]\nrouting_key = , ,\n"),
        environ={})
    assert conf.consumers[0].routing_key is None
    assert conf.consumers[0].bindings == (("nova", "q"),)


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("True", True), ("yes", True), ("on", True), ("1", True),
    ("false", False), ("NO", False), ("off", False), ("0", False),
])
def test_booleans(write, value, expected):
    conf = config.load(write(
        "[broker]\nurl = memory://\n[consumer:q]\ndurable = %s\n" % value),
        environ={})
    assert conf.consumers[0].durable is expected


@pytest.mark.parametrize("key, value, message", [
    ("durable", "maybe",
     "expected true or false (or yes/no, on/off, 1/0), got 'maybe'"),
    ("exchange_durable", "si",
     "expected true or false (or yes/no, on/off, 1/0), got 'si'"),
    ("exchange_type", "topik",
     "expected one of direct, topic, fanout, headers, got 'topik' "
     "(did you mean topic?)"),
    ("exchange", "", "must not be empty"),
    ("exchange", " , ,", "must not be empty"),
    # once taken as one exchange named so, which no service publishes to
    ("exchange", "nova glance",
     "expected comma-separated exchange names, got 'nova glance'"),
    ("exchange", "nova, nova", "'nova' is listed twice"),
    ("exchange", "x" * 256, "'%s' is longer than 255 bytes" % ("x" * 256)),
    ("routing_key", "notifications.* versioned_notifications.*",
     "expected comma-separated routing keys, got "
     "'notifications.* versioned_notifications.*'"),
    ("routing_key", "a.*, b, a.*", "'a.*' is listed twice"),
    ("queue_arguments", "x-queue-type",
     "expected key=value, got 'x-queue-type'"),
    ("queue_arguments", "=quorum", "expected key=value, got '=quorum'"),
    ("queue_arguments", "a=1, a=2", "'a' is set twice"),
])
def test_consumer_errors(write, key, value, message):
    path = write("[broker]\nurl = memory://\n[consumer:q]\n%s = %s\n"
                 % (key, value))
    assert error(path) == "worker.conf [consumer:q] %s: %s" % (key, message)


STREAM = """\
    [broker]
    url = memory://
    [consumer:s]
    durable = true
    queue_arguments = x-queue-type=stream, x-max-age=7D
    """


@pytest.mark.parametrize("value, expected", [
    ("first", "first"), ("LAST", "last"), ("next", "next"), ("0", 0),
    ("123456789012", 123456789012), ("1h", "1h"), ("30m", "30m"),
    ("7D", "7D"), ("2Y", "2Y"),
    ("2026-12-02T18:00:00Z", datetime.datetime(
        2026, 12, 2, 18, tzinfo=datetime.timezone.utc)),
    ("2026-12-02 18:00:05", datetime.datetime(  # no zone: UTC
        2026, 12, 2, 18, 0, 5, tzinfo=datetime.timezone.utc)),
    ("2026-12-02T19:00:00+01:00", datetime.datetime(
        2026, 12, 2, 18, tzinfo=datetime.timezone.utc)),
])
def test_stream_offset(write, value, expected):
    conf = config.load(write(STREAM + "stream_offset = %s\n" % value),
                       environ={})
    (stream,) = conf.consumers
    assert stream.is_stream
    assert stream.stream_offset == expected
    assert type(stream.stream_offset) is type(expected)


def test_stream_offset_defaults_to_first_and_only_streams_are_streams(
        write):
    conf = config.load(write(STREAM + "[consumer:c]\n"), environ={})
    stream, classic = conf.consumers
    assert stream.stream_offset == "first" == classic.stream_offset
    assert stream.is_stream and not classic.is_stream


@pytest.mark.parametrize("value", ["beginning", "-1", "1w", "1.5h",
                                   "2026-13-01", "yesterday"])
def test_stream_offset_errors(write, value):
    assert error(write(STREAM + "stream_offset = %s\n" % value)) == (
        "worker.conf [consumer:s] stream_offset: expected first, last, "
        "next, an offset (a number), an ISO 8601 time such as "
        "2026-12-02T18:00:00Z, or an age such as 1h, got %r" % value)


@pytest.mark.parametrize("key, value, message", [
    ("durable", "false", "expected true for a stream queue (x-queue-type = "
     "stream), got false"),
    ("auto_delete", "true", "expected false for a stream queue "
     "(x-queue-type = stream), got true"),
])
def test_stream_queue_errors(write, key, value, message):
    text = STREAM if key != "durable" else STREAM.replace(
        "durable = true\n", "")
    assert error(write(text + "%s = %s\n" % (key, value))) == \
        "worker.conf [consumer:s] %s: %s" % (key, message)


def test_processes_refused_with_a_stream(write):
    assert error(write(STREAM + "[consumer:c]\n[worker]\nprocesses = 3\n")) \
        == ("worker.conf [worker] processes: expected 1 with the stream "
            "queue 's', got 3: every consumer of a stream reads all of it, "
            "so each process would archive every message")
    conf = config.load(write("[broker]\nurl = memory://\n[consumer:c]\n"
                             "[worker]\nprocesses = 3\n"), environ={})
    assert conf.worker.processes == 3  # without a stream: fine


def test_stream_offset_is_reserved_metadata(write):
    assert "stream_offset" in config.RESERVED_METADATA
    assert base_error(write, """
        [archive]
        static_metadata = stream_offset=1
        """) == ("worker.conf [archive] static_metadata: 'stream_offset' is "
                 "set by the worker itself")


# -- [archive] --------------------------------------------------------------

def test_archive_values(write, tmp_path):
    conf = load(write, """
        [archive]
        working_directory = var/archive
        filename_template = nova_%Y%m%d_{worker_id}.dat
        version = 1
        roll_checker = count
        callbacks = gzip,
            swift, delete
        fsync_every = 10
        fsync_interval = 0.25
        metadata_fields = payload.instance_id, payload.tenant_id
        static_metadata = region=dfw, cell = c1
        max_backlog_mb = 0.5
        retry_initial = 2
        retry_max = 2
        """)
    archive = conf.archive
    assert archive.working_directory == str(tmp_path / "var" / "archive")
    assert archive.filename_template == "nova_%Y%m%d_{worker_id}.dat"
    assert archive.version == 1
    assert archive.roll_checker == ("count",)
    assert archive.callbacks == ("gzip", "swift", "delete")
    assert archive.fsync_every == 10
    assert archive.fsync_interval == 0.25
    assert archive.metadata_fields == ("payload.instance_id",
                                       "payload.tenant_id")
    assert dict(archive.static_metadata) == {"region": "dfw", "cell": "c1"}
    assert archive.max_backlog_mb == 0.5
    assert (archive.retry_initial, archive.retry_max) == (2.0, 2.0)


def test_home_directory_is_expanded(write, monkeypatch):
    monkeypatch.setenv("HOME", "/home/shoebox")
    conf = load(write, "[archive]\nworking_directory = ~/archive\n")
    assert conf.archive.working_directory == "/home/shoebox/archive"


def test_template_for():
    archive = config.ArchiveConfig()
    assert archive.template_for("host1-42") == (
        "shoebox_%Y%m%dT%H%M%S_host1-42.events")
    assert archive.template_for("100%-7") == (
        "shoebox_%Y%m%dT%H%M%S_100%%-7.events")
    with pytest.raises(ValueError):
        archive.template_for("a/b")


@pytest.mark.parametrize("key, value, message", [
    ("working_directory", "", "must not be empty"),
    ("filename_template", "shoebox_%Y.events",
     "must contain {worker_id}, so that two workers never write the same "
     "file"),
    ("filename_template", "%Y/%m/{worker_id}.events",
     "renders as '1970/01/host-1.events', which contains '/': a file name, "
     "not a path (see working_directory)"),
    ("filename_template", "%D_{worker_id}",
     "renders as '01/01/70_host-1', which contains '/': a file name, not a "
     "path (see working_directory)"),
    ("version", "3", "expected 1 or 2, got '3'"),
    ("roll_checker", "size time",
     "expected comma-separated names, got 'size time'"),
    ("roll_checker", "size, time, size", "'size' is listed twice"),
    ("roll_checker", "", "must not be empty"),
    ("callbacks", "gzip swift",
     "expected comma-separated names, got 'gzip swift'"),
    ("callbacks", "gzip, swift, gzip", "'gzip' is listed twice"),
    ("fsync_every", "ten", "expected an integer, got 'ten'"),
    ("fsync_every", "0", "expected an integer >= 1, got '0'"),
    ("fsync_interval", "0", "expected a number > 0, got '0'"),
    ("fsync_interval", "soon", "expected a number, got 'soon'"),
    ("metadata_fields", "payload..instance_id",
     "expected dotted paths like payload.instance_id, got "
     "'payload..instance_id'"),
    ("metadata_fields", "payload.a, payload.a",
     "'payload.a' is listed twice"),
    ("static_metadata", "region", "expected key=value, got 'region'"),
    ("static_metadata", "queue=x", "'queue' is set by the worker itself"),
    ("static_metadata", "exchange=x",
     "'exchange' is set by the worker itself"),
    ("max_backlog_mb", "0", "expected a number > 0, got '0'"),
    ("retry_initial", "-1", "expected a number > 0, got '-1'"),
    ("retry_max", "0.5", "expected a number >= retry_initial (1), got 0.5"),
])
def test_archive_errors(write, key, value, message):
    assert base_error(write, "[archive]\n%s = %s\n" % (key, value)) == (
        "worker.conf [archive] %s: %s" % (key, message))


def test_fsync_every_needs_twice_the_prefetch(write):
    assert base_error(write, "[archive]\nfsync_every = 1500\n") == (
        "worker.conf [archive] fsync_every: 1500 needs [broker] "
        "prefetch_count >= 3000 (twice the ack batch, or the broker stops "
        "delivering), got 2000")
    conf = load(write, "[archive]\nfsync_every = 1000\n")
    assert conf.archive.fsync_every * 2 == conf.broker.prefetch_count


# -- plugin sections --------------------------------------------------------

def test_plugin_options_are_strings(write):
    conf = load(write, """
        [archive]
        roll_checker = time
        callbacks = change_extension, move
        [roll_checker:time]
        roll_minutes = 15
        [callback:move]
        destination_folder = ${DONE}
        [callback:change_extension]
        new_extension = .done
        """, environ={"DONE": "/srv/done"})
    assert {name: dict(options)
            for name, options in conf.roll_checker_options.items()} == {
        "time": {"roll_minutes": "15"}}
    assert {name: dict(options)
            for name, options in conf.callback_options.items()} == {
        "move": {"destination_folder": "/srv/done"},
        "change_extension": {"new_extension": ".done"}}
    # Taken from the environment: masked in repr, as a secret would be.
    assert "/srv/done" not in repr(conf)
    assert "'.done'" in repr(conf)


def test_roll_checker_section_not_selected(write):
    assert base_error(write, """
        [archive]
        roll_checker = time
        [roll_checker:tme]
        roll_minutes = 5
        """) == (
        "worker.conf [roll_checker:tme]: roll checker 'tme' is not listed "
        "in [archive] roll_checker (time) (did you mean "
        "[roll_checker:time]?)")
    assert base_error(write, "[roll_checker:time]\nroll_minutes = 5\n") == (
        "worker.conf [roll_checker:time]: roll checker 'time' is not listed "
        "in [archive] roll_checker (size)")


def test_several_roll_checkers_each_with_its_section(write):
    conf = load(write, """
        [archive]
        roll_checker = size, time
        [roll_checker:size]
        roll_size_mb = 256
        [roll_checker:time]
        roll_minutes = 60
        """)
    assert conf.archive.roll_checker == ("size", "time")
    assert {name: dict(options)
            for name, options in conf.roll_checker_options.items()} == {
        "size": {"roll_size_mb": "256"}, "time": {"roll_minutes": "60"}}


def test_callback_section_not_listed(write):
    assert base_error(write, """
        [archive]
        callbacks = gzip, swift
        [callback:gzp]
        level = 9
        """) == (
        "worker.conf [callback:gzp]: callback 'gzp' is not listed in "
        "[archive] callbacks (did you mean [callback:gzip]?)")
    assert base_error(write, "[callback:move]\n") == (
        "worker.conf [callback:move]: callback 'move' is not listed in "
        "[archive] callbacks")


# -- [worker], [metrics], [logging] ----------------------------------------

def test_worker_metrics_logging_values(write, tmp_path):
    conf = load(write, """
        [worker]
        processes = 4
        stats_interval = 0
        [metrics]
        port = 9100
        host = 0.0.0.0
        [logging]
        level = debug
        file = log/worker.log
        """)
    assert conf.worker == config.WorkerConfig(processes=4, stats_interval=0)
    assert conf.metrics == config.MetricsConfig(port=9100, host="0.0.0.0",
                                                watch_queues=())
    assert conf.logging == config.LoggingConfig(
        level="DEBUG", file=str(tmp_path / "log" / "worker.log"))


def test_watch_queues(write):
    conf = load(write, """
        [metrics]
        watch_queues = notifications.info,, notifications.error ,
        """)
    assert conf.metrics.watch_queues == ("notifications.info",
                                         "notifications.error")


@pytest.mark.parametrize("section, key, value, message", [
    ("worker", "processes", "0", "expected an integer >= 1, got '0'"),
    ("worker", "stats_interval", "-5", "expected a number >= 0, got '-5'"),
    ("metrics", "port", "70000",
     "expected an integer from 1 to 65535, got '70000'"),
    ("metrics", "port", "0", "expected an integer from 1 to 65535, got '0'"),
    ("metrics", "port", "http", "expected an integer, got 'http'"),
    ("metrics", "host", "", "must not be empty"),
    ("metrics", "watch_queues", "notifications.info notifications.error",
     "expected comma-separated queue names, got "
     "'notifications.info notifications.error'"),
    ("metrics", "watch_queues", "a, a", "'a' is listed twice"),
    ("logging", "level", "verbose",
     "expected one of DEBUG, INFO, WARNING, ERROR, got 'verbose'"),
    ("logging", "level", "warn",
     "expected one of DEBUG, INFO, WARNING, ERROR, got 'warn' "
     "(did you mean WARNING?)"),
])
def test_worker_metrics_logging_errors(write, section, key, value, message):
    assert base_error(write, "[%s]\n%s = %s\n" % (section, key, value)) == (
        "worker.conf [%s] %s: %s" % (section, key, message))


def test_first_mistake_wins_in_a_fixed_order(write):
    # An unknown section is reported before a bad value elsewhere.
    assert base_error(write, """
        [archive]
        fsync_every = ten
        [archvie]
        """).startswith("worker.conf [archvie]: unknown section")


def test_config_is_frozen(write):
    conf = load(write)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conf.archive.fsync_every = 1
    with pytest.raises(TypeError):
        conf.archive.static_metadata["a"] = "b"



# -- [archive] file_mode, dir_mode --------------------------------------------

@pytest.mark.parametrize("modes, umask", [
    ("", 0o077),
    ("file_mode = 0640\ndir_mode = 0750", 0o027),
    ("file_mode = 660\ndir_mode = 770", 0o007),
])
def test_modes_give_one_umask(write, modes, umask):
    conf = config.load(write("[broker]\nurl = memory://\n[consumer:q]\n"
                             "[archive]\n%s\n" % modes), environ={})
    assert conf.archive.umask == umask
    assert 0o666 & ~umask == conf.archive.file_mode
    assert 0o777 & ~umask == conf.archive.dir_mode


@pytest.mark.parametrize("modes, message", [
    ("file_mode = 0640", "[archive] file_mode: expected 0600 (dir_mode 0700 "
     "without its x bits: the worker sets one umask for both), got 0640; "
     "to open the archives to a group, set both, e.g. file_mode = 0640 and "
     "dir_mode = 0750"),
    ("file_mode = 0700", "[archive] file_mode: expected 0600"),
    ("dir_mode = 0750\nfile_mode = 0600", "[archive] file_mode: expected "
     "0640"),
    ("dir_mode = 0500\nfile_mode = 0400", "[archive] dir_mode: expected a "
     "mode with 0700 (the worker reads, writes and enters its folders), "
     "got 0500"),
    ("dir_mode = rwx", "[archive] dir_mode: expected permission bits in "
     "octal"),
])
def test_modes_one_umask_cannot_give(write, modes, message):
    path = write("[broker]\nurl = memory://\n[consumer:q]\n[archive]\n%s\n"
                 % modes)
    assert error(path).startswith("worker.conf " + message)


# -- [broker] TLS -------------------------------------------------------------

@pytest.fixture
def pki(tmp_path):
    """A CA (ca.pem), a client certificate (client.pem, client.key, and
    both in one file, client-both.pem) and another key (other.key)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    other = ca.issue_cert("other.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    leaf.private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client-both.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return tmp_path


def _tls(write, options, url="amqp://h//"):
    return write("[broker]\nurl = %s\n%s\n[consumer:q]\n" % (url, options))


def test_tls_defaults_off(write):
    broker = load(write).broker
    assert (broker.ssl, broker.ssl_ca_file, broker.ssl_cert_file,
            broker.ssl_key_file) == (False, None, None, None)
    assert broker.tls is False


def test_tls_options(write, pki):
    broker = config.load(_tls(write, (
        "ssl = true\nssl_ca_file = %s/ca.pem\nssl_cert_file = %s/client.pem"
        "\nssl_key_file = %s/client.key" % (pki, pki, pki))),
        environ={}).broker
    assert (broker.ssl, broker.ssl_ca_file, broker.ssl_cert_file,
            broker.ssl_key_file) == (True, str(pki / "ca.pem"),
                                     str(pki / "client.pem"),
                                     str(pki / "client.key"))
    assert broker.tls is True


def test_tls_by_amqps_urls(write, pki):
    broker = config.load(_tls(write, "ssl_ca_file = %s/ca.pem" % pki,
                              url="amqps://h1//;amqps://h2//"),
                         environ={}).broker
    assert broker.ssl is False and broker.tls is True


def test_tls_key_in_the_certificate_file(write, pki):
    broker = config.load(_tls(write, "ssl = true\nssl_cert_file = %s/"
                              "client-both.pem" % pki), environ={}).broker
    assert broker.ssl_key_file is None


@pytest.mark.parametrize("options, url, key, message", [
    ("ssl_ca_file = {d}/ca.pem", "amqp://h//", "ssl_ca_file",
     "TLS is off: set ssl = true (or use amqps:// URLs) for it to be used"),
    ("ssl = true", "redis://h:6379/0", "ssl",
     "TLS applies to amqp:// and amqps:// URLs, the URL is redis://"),
    ("", "amqps://h1//;amqp://h2//", "url",
     "mixes amqps:// and amqp:// URLs: write them all amqps:// (TLS), or "
     "all amqp:// with ssl = true"),
    ("ssl = true\nssl_key_file = {d}/client.key", "amqp://h//",
     "ssl_key_file", "a key without ssl_cert_file: set both, or neither"),
    ("ssl = true\nssl_ca_file = {d}/missing.pem", "amqp://h//",
     "ssl_ca_file", "{d}/missing.pem: no such file"),
    ("ssl = true\nssl_ca_file = {d}", "amqp://h//", "ssl_ca_file",
     "{d}: not a regular file"),
    ("ssl = true\nssl_ca_file = {d}/junk.pem", "amqp://h//", "ssl_ca_file",
     "cannot load {d}/junk.pem: no certificate in it"),
    ("ssl = true\nssl_cert_file = {d}/client.pem", "amqp://h//",
     "ssl_cert_file", "cannot load {d}/client.pem: not a PEM certificate "
     "or key (or a key that needs a passphrase)"),
    ("ssl = true\nssl_cert_file = {d}/client.pem\nssl_key_file = "
     "{d}/other.key", "amqp://h//", "ssl_key_file",
     "cannot load {d}/other.key: the key is not the certificate's"),
    ("ssl = true\nssl_cert_file = {d}/client.pem\nssl_key_file = "
     "{d}/gone.key", "amqp://h//", "ssl_key_file",
     "{d}/gone.key: no such file"),
])
def test_tls_errors(write, pki, options, url, key, message):
    path = _tls(write, options.format(d=pki), url=url)
    assert error(path) == "worker.conf [broker] %s: %s" % (
        key, message.format(d=pki))


# -- [integrity] --------------------------------------------------------------

def test_integrity_defaults_off(write):
    assert load(write).integrity == config.IntegrityConfig(
        signing_key=None, digest_interval=300, digest_prefix="_digests/")


def test_integrity_values(write, tmp_path):
    private, _ = keys.keygen(str(tmp_path / "keys"))
    conf = load(write, """
        [integrity]
        signing_key = %s
        digest_interval = 60
        digest_prefix = evidence/digests/
        """ % private)
    assert conf.integrity == config.IntegrityConfig(
        signing_key=private, digest_interval=60,
        digest_prefix="evidence/digests/")


def test_a_signing_key_in_a_folder_nobody_writes_is_read_all_the_same(
        write, tmp_path):
    # the tools (an index-bundle timer under ProtectSystem=strict) read
    # the config; only run and check-config need the key (chain.check)
    private, _ = keys.keygen(str(tmp_path / "keys"))
    folder = os.path.dirname(private)
    os.chmod(folder, 0o500)
    try:
        conf = load(write, "[integrity]\nsigning_key = %s\n" % private)
    finally:
        os.chmod(folder, 0o700)
    assert conf.integrity.signing_key == private


@pytest.mark.parametrize("value", ["digests", "/digests/", "a/../b/",
                                   "../"])
def test_a_digest_prefix_must_end_in_a_slash(write, value):
    assert base_error(write, "[integrity]\ndigest_prefix = %s\n" % value) \
        == ("worker.conf [integrity] digest_prefix: expected a prefix such "
            "as _digests/ (ending in /, not starting with one), got %r"
            % value)


@pytest.mark.parametrize("value, message", [
    ("0", "expected an integer >= 1, got '0'"),
    ("5m", "expected an integer, got '5m'"),
])
def test_a_digest_interval_is_whole_seconds(write, value, message):
    assert base_error(write, "[integrity]\ndigest_interval = %s\n" % value) \
        == "worker.conf [integrity] digest_interval: %s" % message
