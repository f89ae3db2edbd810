"""Read and check the worker's INI configuration file.

:func:`load` turns the file into frozen, typed dataclasses, or raises
:class:`~shoebox_worker.exceptions.ConfigError` whose ``str()`` is one
line naming the file, section and key, e.g.::

    worker.conf [archive] fsync_every: expected an integer, got 'ten'

Each fixed section has one table of options (:data:`SECTIONS`: name ->
parser and default, in documentation order; the parsers are the common
coercers of :mod:`shoebox_worker.options` and a few of this file's own).
The validator reads it, the section's dataclass takes its field defaults
from it, and so does the test that checks ``etc/shoebox-worker.conf.sample``
documents every option, so none of them can drift apart.

``[roll_checker:NAME]`` and ``[callback:NAME]`` are free-form: their
options are handed as strings to the plugin's constructor by
:mod:`shoebox_worker.plugins`, which checks them against its signature.

Values may contain ``${NAME}`` references to environment variables (for
secrets such as the broker password or the Swift key), and
``${credential:NAME}`` references to systemd credentials: the file NAME in
``$CREDENTIALS_DIRECTORY``, which systemd fills from the unit's
``LoadCredential=`` lines (its trailing newline dropped). Neither the broker
URL nor a plugin option that looks secret appears in ``repr()``; log the
broker with :meth:`BrokerConfig.redacted_url`. How a broker URL is read
(any character in its password) is :mod:`shoebox_worker.broker_url`'s.
``[archive] file_mode`` and ``dir_mode`` must be what one umask gives
(:attr:`ArchiveConfig.umask`, which ``cli`` sets before anything is
created).
"""

import configparser
import dataclasses
import datetime
import difflib
import os
import re
import ssl
import time
import types
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping

from shoebox_worker import broker_url
from shoebox_worker import index
from shoebox_worker import options
from shoebox_worker.exceptions import ConfigError
from shoebox_worker.options import OptionError
from shoebox_worker.options import did_you_mean

__all__ = [
    "ArchiveConfig",
    "BrokerConfig",
    "Config",
    "ConsumerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "Option",
    "PluginOptions",
    "RESERVED_METADATA",
    "SECTIONS",
    "WorkerConfig",
    "load",
    "redact_url",
]

#: Metadata keys the worker sets itself; ``static_metadata`` may not.
RESERVED_METADATA = (
    "event_type", "message_id", "timestamp", "publisher_id", "priority",
    "request_id", "queue", "routing_key", "exchange", "malformed",
    "stream_offset",
)

#: The longest exchange name, routing key or queue name (an AMQP short
#: string).
MAX_NAME_BYTES = 255

#: Shown instead of a secret.
MASK = broker_url.MASK

_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_SECRET_KEY = re.compile(r"pass|secret|token|credential|(^|_)key\Z")


# -- parsers of this file's own kinds of value (the common kinds, numbers,
# -- booleans, paths..., are in shoebox_worker.options) ---------------------

def _plugin_name_item(item):
    if not _PLUGIN_NAME.match(item):
        raise OptionError("expected comma-separated names, got %r" % item)
    return item


def _amqp_names(what):
    """A comma list of distinct exchange names, routing keys or queue
    names (``what``): each without blanks (``nova glance`` is a mistake
    for ``nova, glance``, not an exchange of that name) and at most
    :data:`MAX_NAME_BYTES` bytes."""
    def item(each):
        if any(char.isspace() for char in each):
            raise OptionError("expected comma-separated %s, got %r"
                              % (what, each))
        if len(each.encode("utf-8")) > MAX_NAME_BYTES:
            raise OptionError("%r is longer than %d bytes"
                              % (each, MAX_NAME_BYTES))
        return each
    return options.names(item)


def _required(parse):
    """``parse``, refusing a value that gives no item."""
    def required(raw):
        result = parse(raw)
        if not result:
            raise OptionError("must not be empty")
        return result
    return required


def _optional_list(parse):
    """``parse``, or None for a value that gives no item."""
    def optional(raw):
        return parse(raw) or None
    return optional


def _dotted_path(item):
    if any(not part.strip() for part in item.split(".")) or " " in item:
        raise OptionError("expected dotted paths like payload.instance_id, "
                          "got %r" % item)
    return item


def _argument_value(value):
    try:
        return options.integer()(value)
    except OptionError:
        pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


_queue_arguments = options.pairs(_argument_value)

#: A RabbitMQ stream's age offset (``1h``, ``30m``, ``7D``): it passes
#: such a string on as it is.
_STREAM_AGE = re.compile(r"\d+[YMDhms]\Z")


def _stream_offset(raw):
    """``stream_offset``: first, last, next, an offset (an int), an age
    such as ``1h`` (a str), or an ISO 8601 time (an aware datetime; UTC
    when it names no zone)."""
    word = raw.strip()
    if word.lower() in ("first", "last", "next"):
        return word.lower()
    if word.isdigit():
        return int(word)
    if _STREAM_AGE.match(word):
        return word
    try:
        when = datetime.datetime.fromisoformat(word)
    except ValueError:
        raise OptionError(
            "expected first, last, next, an offset (a number), an ISO 8601 "
            "time such as 2026-12-02T18:00:00Z, or an age such as 1h, got "
            "%r" % raw) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when


def _static_metadata(raw):
    pairs = options.pairs()(raw)
    for key in pairs:
        if key in RESERVED_METADATA:
            raise OptionError("%r is set by the worker itself" % key)
    return pairs


def _url(raw):
    """The URL(s) as written, checked (see :mod:`.broker_url`)."""
    broker_url.parse(raw)  # BrokerConfig.urls parses it again when used
    return ";".join(broker_url.split(raw))


#: The longest a ``filename_template`` may render (with a host-1 worker
#: id): a file name has at most 255 bytes, and the worker adds to it the
#: whole host name (up to 64), ``_<token>-<sequence>`` (up to 34, see
#: :mod:`shoebox_worker.roll_manager`), a ``~N`` and suffixes such as
#: ``.gz.ship.tmp``.
_MAX_TEMPLATE_BYTES = 128


def _digest_prefix(raw):
    """An object name prefix ending in ``/``, without ``..`` parts."""
    value = options.text()(raw)
    if not value.endswith("/") or value.startswith("/") or \
            ".." in value.split("/"):
        raise options.OptionError("expected a prefix such as _digests/ "
                                  "(ending in /, not starting with one), "
                                  "got %r" % raw)
    return value


def _filename_template(raw):
    """``[archive] filename_template``: a strftime template with
    ``{worker_id}``. The worker's roll manager adds
    ``_<token>-<sequence>`` before the extension of every name it makes
    (``unique_names``), so names never repeat, whatever the clock, the host
    name or the PID."""
    if "{worker_id}" not in raw:
        raise OptionError("must contain {worker_id}, so that two workers "
                          "never write the same file")
    try:
        rendered = time.strftime(raw.replace("{worker_id}", "host-1"),
                                 time.gmtime(0))
    except ValueError as err:
        raise OptionError("not a valid strftime template: %s"
                          % err) from None
    if "/" in rendered or "\0" in rendered:
        raise OptionError("renders as %r, which contains '/': a file name, "
                          "not a path (see working_directory)" % rendered)
    if rendered in (".", ".."):
        raise OptionError("renders as %r, which is not a file name"
                          % rendered)
    if len(rendered.encode("utf-8")) > _MAX_TEMPLATE_BYTES:
        raise OptionError(
            "renders as %d bytes; at most %d, as the worker adds the host "
            "name, a unique part and suffixes to a name that may not pass "
            "255 bytes" % (len(rendered.encode("utf-8")),
                           _MAX_TEMPLATE_BYTES))
    return raw


# -- the option tables ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a fixed section.

    :param name: the key, as written in the file.
    :param parse: turns the string from the file into the typed value.
    :param default: the default as written in the file (parsed like a
        value from the file), or None when the option is required.
    """

    name: str
    parse: Callable[[str], object]
    default: str | None


def _table(*options):
    return types.MappingProxyType({option.name: option for option in options})


BROKER_OPTIONS = _table(
    Option("url", _url, None),
    Option("prefetch_count", options.integer(minimum=1), "2000"),
    Option("heartbeat", options.number(minimum=0), "60"),
    Option("connect_timeout", options.number(minimum=0, exclusive=True),
           "10"),
    Option("connect_max_retries", options.integer(minimum=0, empty=None),
           ""),
    Option("failover_strategy", options.choice("round-robin", "shuffle"),
           "round-robin"),
    Option("ssl", options.boolean(), "false"),
    Option("ssl_ca_file", options.path(empty=None), ""),
    Option("ssl_cert_file", options.path(empty=None), ""),
    Option("ssl_key_file", options.path(empty=None), ""),
)

CONSUMER_OPTIONS = _table(
    Option("exchange", _required(_amqp_names("exchange names")), "nova"),
    Option("exchange_type",
           options.choice("direct", "topic", "fanout", "headers"), "topic"),
    Option("routing_key", _optional_list(_amqp_names("routing keys")), ""),
    Option("durable", options.boolean(), "false"),
    Option("exchange_durable", options.boolean(empty=None), ""),
    Option("auto_delete", options.boolean(), "false"),
    Option("queue_arguments", _queue_arguments, ""),
    Option("declare", options.boolean(), "true"),
    Option("stream_offset", _stream_offset, "first"),
)

ARCHIVE_OPTIONS = _table(
    Option("working_directory", options.path(), "/var/lib/shoebox-worker"),
    Option("filename_template", _filename_template,
           "shoebox_%Y%m%dT%H%M%S_{worker_id}.events"),
    Option("version", options.integer_in(1, 2), "2"),
    Option("roll_checker", _required(options.names(_plugin_name_item)),
           "size"),
    Option("callbacks", options.names(_plugin_name_item), ""),
    Option("fsync_every", options.integer(minimum=1), "1000"),
    Option("fsync_interval", options.number(minimum=0, exclusive=True),
           "1.0"),
    Option("metadata_fields", options.names(_dotted_path), ""),
    Option("static_metadata", _static_metadata, ""),
    Option("index_fields", options.names(_dotted_path),
           ", ".join(index.DEFAULT_FIELDS)),
    Option("max_backlog_mb", options.number(minimum=0, exclusive=True),
           "10240"),
    Option("retry_initial", options.number(minimum=0, exclusive=True),
           "1.0"),
    Option("retry_max", options.number(minimum=0, exclusive=True), "300"),
    Option("file_mode", options.mode(), "0600"),
    Option("dir_mode", options.mode(), "0700"),
)

WORKER_OPTIONS = _table(
    Option("processes", options.integer(minimum=1), "1"),
    Option("stats_interval", options.number(minimum=0), "60"),
)

METRICS_OPTIONS = _table(
    Option("port", options.integer(minimum=1, maximum=65535, empty=None),
           ""),
    Option("host", options.text(), "127.0.0.1"),
    Option("watch_queues", _amqp_names("queue names"), ""),
)

LOGGING_OPTIONS = _table(
    Option("level",
           options.choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
           "INFO"),
    Option("file", options.path(empty=None), ""),
    Option("format", options.choice("text", "json"), "text"),
)

INTEGRITY_OPTIONS = _table(
    Option("signing_key", options.path(empty=None), ""),
    Option("digest_interval", options.integer(minimum=1), "300"),
    Option("digest_prefix", _digest_prefix, "_digests/"),
)

#: Every fixed section's options, in the order the sample documents them.
#: ``consumer`` is the table of each ``[consumer:QUEUE]`` section.
SECTIONS = types.MappingProxyType({
    "broker": BROKER_OPTIONS,
    "consumer": CONSUMER_OPTIONS,
    "archive": ARCHIVE_OPTIONS,
    "worker": WORKER_OPTIONS,
    "metrics": METRICS_OPTIONS,
    "logging": LOGGING_OPTIONS,
    "integrity": INTEGRITY_OPTIONS,
})

#: Sections named ``[PREFIX:NAME]``; the plugin ones are free-form.
PREFIXED_SECTIONS = ("consumer", "roll_checker", "callback")
_FIXED_SECTIONS = tuple(name for name in SECTIONS if name != "consumer")
_PLACEHOLDERS = {"consumer": "QUEUE", "roll_checker": "NAME",
                 "callback": "NAME"}


# -- the result -------------------------------------------------------------

def redact_url(url):
    """``url`` with the password of every ``;``-separated URL masked (see
    :func:`shoebox_worker.broker_url.redact`)."""
    return broker_url.redact(url)


def _defaults_from(table):
    """Give a section's dataclass its defaults from the option table.

    Each default is written once, as the string in ``table`` (the one the
    sample documents), and parsed like a value from the file; a field
    whose option has no default (``url``) or is not in the table
    (``queue``) stays required.
    """
    def decorate(cls):
        for name in cls.__annotations__:
            option = table.get(name)
            if option is None or option.default is None:
                continue
            value = option.parse(option.default)
            try:
                hash(value)
            except TypeError:  # a read-only mapping: not a plain default
                default = dataclasses.field(
                    default_factory=lambda value=value: value)
            else:
                default = dataclasses.field(default=value)
            setattr(cls, name, default)
        return cls
    return decorate


class PluginOptions(Mapping):
    """The str -> str options of one plugin, read-only.

    ``repr()`` masks values that came from the environment, values of keys
    that look secret (``key``, ``password``, ``token``, ...) and passwords
    in URLs, so a logged config never shows them.
    """

    def __init__(self, items=(), secret_keys=()):
        self._items = dict(items)
        self._secret_keys = frozenset(secret_keys)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def is_secret(self, key):
        """Whether ``repr()`` masks this option's value."""
        return key in self._secret_keys or bool(_SECRET_KEY.search(key))

    def __repr__(self):
        shown = {key: MASK if self.is_secret(key) else redact_url(value)
                 for key, value in self._items.items()}
        return "PluginOptions(%r)" % shown


@dataclasses.dataclass(frozen=True)
@_defaults_from(BROKER_OPTIONS)
class BrokerConfig:
    """``[broker]``. ``url`` is kombu's (``;`` between failover URLs), or
    oslo.messaging's transport_url (``rabbit://``), whose query's options
    (``?ssl=1``) win over the section's, as oslo's do
    (:func:`~shoebox_worker.broker_url.query_options`).

    :raises OptionError: a query option's value does not parse.
    """

    url: str
    prefetch_count: int
    heartbeat: float
    connect_timeout: float
    connect_max_retries: int | None
    failover_strategy: str
    #: TLS on ``amqp://`` URLs (``amqps://`` ones have it anyway)...
    ssl: bool
    #: ...verifying the broker against this CA bundle (None: the
    #: system's CAs)...
    ssl_ca_file: str | None
    #: ...and showing this client certificate and key (None: none).
    ssl_cert_file: str | None
    ssl_key_file: str | None

    def __post_init__(self):
        for key, value in broker_url.query_options(self.urls).items():
            try:
                parsed = BROKER_OPTIONS[key].parse(value)
            except OptionError as err:
                option = next(name for name, target in
                              broker_url.OSLO_QUERY.items() if target == key
                              and "%s=" % name in self.url)
                raise OptionError("%s=%s in the URL's query: %s" % (
                    option, value, err)) from None
            object.__setattr__(self, key, parsed)

    @property
    def tls(self):
        """Whether the connection uses TLS: ``ssl = true`` or
        ``amqps://`` URLs (:func:`load` checks that the URLs agree)."""
        return self.ssl or self.urls[0].scheme == "amqps"

    @property
    def urls(self):
        """The failover URLs, in order, parsed: a tuple of
        :class:`~shoebox_worker.broker_url.BrokerURL`."""
        return broker_url.parse(self.url)

    def redacted_url(self):
        """The URL(s) with passwords masked, for logs."""
        return redact_url(self.url)

    def __repr__(self):
        rest = ", ".join("%s=%r" % (field.name, getattr(self, field.name))
                         for field in dataclasses.fields(self)
                         if field.name != "url")
        return "BrokerConfig(url=%r, %s)" % (self.redacted_url(), rest)


@dataclasses.dataclass(frozen=True)
@_defaults_from(CONSUMER_OPTIONS)
class ConsumerConfig:
    """One ``[consumer:QUEUE]``; ``exchange_durable`` already resolved.

    The queue is bound to every exchange of ``exchange`` with every key of
    ``routing_key``: :attr:`bindings`.
    """

    queue: str
    #: The exchanges, in file order.
    exchange: tuple[str, ...]
    exchange_type: str
    #: The binding keys, in file order; None (not set): the queue's name.
    routing_key: tuple[str, ...] | None
    durable: bool
    #: None: same as ``durable``.
    exchange_durable: bool | None
    auto_delete: bool
    queue_arguments: Mapping[str, int | bool | str]
    declare: bool
    #: Where a stream queue is read from the first time (see
    #: :mod:`shoebox_worker.consume.stream`).
    stream_offset: str | int | datetime.datetime

    @property
    def is_stream(self):
        """Does this queue read a RabbitMQ stream (``x-queue-type =
        stream``)?"""
        return self.queue_arguments.get("x-queue-type") == "stream"

    def __post_init__(self):
        if self.exchange_durable is None:
            object.__setattr__(self, "exchange_durable", self.durable)

    @property
    def routing_keys(self):
        """The binding keys: ``routing_key``, or the queue's name when it
        is not set."""
        return self.routing_key or (self.queue,)

    @property
    def bindings(self):
        """Every ``(exchange, routing key)`` pair the queue is bound with,
        in file order (exchange by exchange)."""
        return tuple((exchange, key) for exchange in self.exchange
                     for key in self.routing_keys)


@dataclasses.dataclass(frozen=True)
@_defaults_from(ARCHIVE_OPTIONS)
class ArchiveConfig:
    """``[archive]``. ``working_directory`` is absolute."""

    working_directory: str
    filename_template: str
    version: int
    #: One roll checker or several: the archive rolls when the first of
    #: them says so (``size, time``).
    roll_checker: tuple[str, ...]
    callbacks: tuple[str, ...]
    fsync_every: int
    fsync_interval: float
    metadata_fields: tuple[str, ...]
    static_metadata: Mapping[str, str]
    #: Dotted paths indexed for each archive (empty: no index).
    index_fields: tuple[str, ...]
    max_backlog_mb: float
    retry_initial: float
    retry_max: float
    #: Permission bits of the files the worker creates...
    file_mode: int
    #: ...and of its folders; :attr:`umask` gives both.
    dir_mode: int

    @property
    def umask(self):
        """The process umask that makes files created with mode 0666
        ``file_mode`` and folders created with 0777 ``dir_mode`` (which
        :func:`load` checks that one umask can do)."""
        return 0o777 & ~self.dir_mode

    def template_for(self, worker_id):
        """The strftime template with ``{worker_id}`` filled in.

        :param worker_id: e.g. ``"%s-%d" % (host, pid)``; ``%`` in it is
            escaped, ``/`` is refused.
        :raises ValueError: ``worker_id`` contains ``/``.
        """
        if "/" in worker_id:
            raise ValueError("worker_id may not contain '/': %r" % worker_id)
        return self.filename_template.replace(
            "{worker_id}", worker_id.replace("%", "%%"))


@dataclasses.dataclass(frozen=True)
@_defaults_from(WORKER_OPTIONS)
class WorkerConfig:
    """``[worker]``."""

    processes: int
    stats_interval: float


@dataclasses.dataclass(frozen=True)
@_defaults_from(METRICS_OPTIONS)
class MetricsConfig:
    """``[metrics]``; ``port`` None means no metrics endpoint."""

    port: int | None
    host: str
    #: Queues (besides the consumed ones) whose depth is exported.
    watch_queues: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
@_defaults_from(LOGGING_OPTIONS)
class LoggingConfig:
    """``[logging]``; ``file`` None means stderr."""

    level: str
    file: str | None
    #: ``text`` or ``json`` (one object a line): :mod:`shoebox_worker.logs`
    format: str


@dataclasses.dataclass(frozen=True)
@_defaults_from(INTEGRITY_OPTIONS)
class IntegrityConfig:
    """``[integrity]``; ``signing_key`` None means no digests
    (:mod:`shoebox_worker.integrity`)."""

    signing_key: str | None
    digest_interval: int
    digest_prefix: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole, checked configuration.

    :ivar filename: the file it was read from (as given to :func:`load`).
    :ivar consumers: one per ``[consumer:QUEUE]``, in file order.
    :ivar roll_checker_options: ``[roll_checker:NAME]`` by name (only the
        names of ``[archive] roll_checker`` that have a section).
    :ivar callback_options: ``[callback:NAME]`` by name (only the names
        that have a section).
    """

    filename: str
    broker: BrokerConfig
    consumers: tuple[ConsumerConfig, ...]
    archive: ArchiveConfig
    roll_checker_options: Mapping[str, PluginOptions]
    callback_options: Mapping[str, PluginOptions]
    worker: WorkerConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    integrity: IntegrityConfig = IntegrityConfig()

    def redacted_url(self):
        """The broker URL(s) with passwords masked, for logs."""
        return self.broker.redacted_url()


# -- loading ----------------------------------------------------------------

def _section_suggestion(name):
    prefix, sep, rest = name.partition(":")
    if sep:
        match = difflib.get_close_matches(prefix, PREFIXED_SECTIONS, n=1)
        if match:
            return " (did you mean [%s:%s]?)" % (match[0], rest)
    if name in PREFIXED_SECTIONS:
        return " (did you mean [%s:%s]?)" % (name, _PLACEHOLDERS[name])
    suggestion = did_you_mean(name, _FIXED_SECTIONS, "[%s]")
    if not suggestion:
        match = difflib.get_close_matches(name, PREFIXED_SECTIONS, n=1)
        if match:
            suggestion = " (did you mean [%s:%s]?)" % (
                match[0], _PLACEHOLDERS[match[0]])
    return suggestion


def _read(path):
    try:
        with open(path, encoding="utf-8-sig") as stream:
            text = stream.read()
    except UnicodeDecodeError as err:
        raise ConfigError("cannot read: not UTF-8 text (byte 0x%02x at "
                          "offset %d)" % (err.object[err.start], err.start),
                          path) from None
    except OSError as err:
        raise ConfigError("cannot read: %s" % (err.strerror or err),
                          path) from None
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as err:
        raise ConfigError("line %d: %r comes before any [section] header"
                          % (err.lineno, err.line.strip()), path) from None
    except configparser.ParsingError as err:
        lineno = err.errors[0][0]
        line = text.splitlines()[lineno - 1].strip()
        raise ConfigError("line %d: expected 'key = value', a [section] or "
                          "a # comment, got %r" % (lineno, line),
                          path) from None
    except configparser.DuplicateSectionError as err:
        raise ConfigError("line %d: section appears twice" % err.lineno,
                          path, err.section) from None
    except configparser.DuplicateOptionError as err:
        raise ConfigError("line %d: option set twice in this section"
                          % err.lineno, path, err.section,
                          err.option) from None
    return parser


#: The unit's ``EnvironmentFile=`` (etc/shoebox-worker.service).
ENVIRONMENT_FILE = "/etc/shoebox-worker/env"
#: ``${credential:NAME}``: the systemd credential NAME.
CREDENTIAL_PREFIX = "credential:"
#: Where systemd puts a unit's credentials (``LoadCredential=``).
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@+-]+\Z")


def _credential(name, environ, path, section, key):
    """The content of the systemd credential ``name``, its trailing
    newline dropped."""
    if not _CREDENTIAL_NAME.match(name) or name in (".", ".."):
        raise ConfigError("bad credential name %r in ${credential:%s}: "
                          "letters, digits and . _ - @ + only"
                          % (name, name), path, section, key)
    folder = environ.get(CREDENTIALS_VARIABLE)
    if not folder:
        raise ConfigError(
            "${credential:%s}: %s is not set: systemd sets it for a unit "
            "with LoadCredential= (see etc/shoebox-worker.service); run by "
            "hand, set it to a folder holding the file %s"
            % (name, CREDENTIALS_VARIABLE, name), path, section, key)
    filename = os.path.join(folder, name)
    try:
        with open(filename, "rb") as stream:
            data = stream.read()
    except OSError as err:
        raise ConfigError(
            "${credential:%s}: cannot read %s: %s (is the unit's "
            "LoadCredential= for it set, and its file there?)"
            % (name, filename, err.strerror or err), path, section,
            key) from None
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError("${credential:%s}: %s is not UTF-8 text"
                          % (name, filename), path, section, key) from None


def _expand(raw, environ, path, section, key):
    """Replace every ``${NAME}`` with the environment variable's value,
    and every ``${credential:NAME}`` with the systemd credential's."""
    used = []

    def replace(match):
        name = match.group(1)
        if name.startswith(CREDENTIAL_PREFIX):
            used.append(name)
            return _credential(name[len(CREDENTIAL_PREFIX):], environ,
                               path, section, key)
        if not _ENV_NAME.match(name):
            raise ConfigError("bad environment variable reference %r: "
                              "expected ${NAME} or ${credential:NAME}"
                              % match.group(0),
                              path, section, key)
        if name not in environ:
            raise ConfigError("environment variable %s is not set (under "
                              "systemd: in %s, the unit's EnvironmentFile=)"
                              % (name, ENVIRONMENT_FILE), path, section, key)
        used.append(name)
        return environ[name]

    return _ENV_REF.sub(replace, raw), bool(used)


def _raw_options(parser, section, path, environ):
    """The section's options as written, environment expanded.

    :returns: ``(values, keys whose value came from the environment)``.
    """
    values, from_env = {}, set()
    if parser.has_section(section):
        for key, raw in parser.items(section, raw=True):
            values[key], expanded = _expand(raw, environ, path, section, key)
            if expanded:
                from_env.add(key)
    return values, from_env


def _read_section(parser, section, table, path, environ):
    """Check a fixed section against its table; return typed values."""
    raw, _ = _raw_options(parser, section, path, environ)
    for key in raw:
        if key not in table:
            raise ConfigError("unknown option" + did_you_mean(key, table),
                              path, section, key)
    values = {}
    for option in table.values():
        value = raw.get(option.name, option.default)
        if value is None:
            raise ConfigError("required option is missing", path, section,
                              option.name)
        try:
            values[option.name] = option.parse(value)
        except OptionError as err:
            raise ConfigError(str(err), path, section,
                              option.name) from None
    return values


def _plugin_options(parser, section, path, environ):
    values, from_env = _raw_options(parser, section, path, environ)
    return PluginOptions(values, from_env)


def _check_modes(archive, path):
    """One umask gives both modes (see :attr:`ArchiveConfig.umask`): the
    files' must be the folders' without the x bits, and the worker must be
    able to use what it creates."""
    if archive.dir_mode & 0o700 != 0o700:
        raise ConfigError("expected a mode with 0700 (the worker reads, "
                          "writes and enters its folders), got %04o"
                          % archive.dir_mode, path, "archive", "dir_mode")
    expected = archive.dir_mode & 0o666
    if archive.file_mode != expected:
        raise ConfigError(
            "expected %04o (dir_mode %04o without its x bits: the worker "
            "sets one umask for both), got %04o; to open the archives to a "
            "group, set both, e.g. file_mode = 0640 and dir_mode = 0750"
            % (expected, archive.dir_mode, archive.file_mode),
            path, "archive", "file_mode")


def _check_streams(consumers, path):
    """A stream is durable and never auto-deleted (RabbitMQ refuses
    others); say so on one line before the broker does."""
    for consumer in consumers:
        if not consumer.is_stream:
            continue
        section = "consumer:%s" % consumer.queue
        if not consumer.durable:
            raise ConfigError("expected true for a stream queue "
                              "(x-queue-type = stream), got false", path,
                              section, "durable")
        if consumer.auto_delete:
            raise ConfigError("expected false for a stream queue "
                              "(x-queue-type = stream), got true", path,
                              section, "auto_delete")


#: The ``[broker]`` options that only apply with TLS.
_TLS_FILES = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")


def _check_tls(broker, path):
    """TLS options that make sense together, and files that load.

    With TLS on (``ssl = true`` or ``amqps://``), every URL is AMQP and
    either all ``amqps://`` or none (kombu has one ``ssl`` setting for all
    failover URLs); the CA bundle, certificate and key are loaded the way
    the connection will load them, so that a missing, unreadable or
    mismatched file is one line here rather than a failure at every
    connection attempt. Files given with TLS off are refused rather than
    ignored.
    """
    schemes = {url.scheme for url in broker.urls}
    if not broker.tls:
        for key in _TLS_FILES:
            if getattr(broker, key) is not None:
                raise ConfigError("TLS is off: set ssl = true (or use "
                                  "amqps:// URLs) for it to be used",
                                  path, "broker", key)
        return
    if not schemes <= {"amqp", "amqps", "pyamqp"}:
        raise ConfigError("TLS applies to amqp:// and amqps:// URLs, the "
                          "URL is %s://" % sorted(schemes - {
                              "amqp", "amqps", "pyamqp"})[0],
                          path, "broker", "ssl" if broker.ssl else "url")
    if "amqps" in schemes and len(schemes) > 1:
        raise ConfigError("mixes amqps:// and %s:// URLs: write them all "
                          "amqps:// (TLS), or all amqp:// with ssl = true"
                          % sorted(schemes - {"amqps"})[0],
                          path, "broker", "url")
    if broker.ssl_key_file is not None and broker.ssl_cert_file is None:
        raise ConfigError("a key without ssl_cert_file: set both, or "
                          "neither", path, "broker", "ssl_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for key in _TLS_FILES:
        value = getattr(broker, key)
        if value is not None and not os.path.isfile(value):
            raise ConfigError("%s: %s" % (value, "no such file" if not
                                          os.path.lexists(value) else
                                          "not a regular file"),
                              path, "broker", key)
    key = "ssl_ca_file"
    try:
        if broker.ssl_ca_file is not None:
            context.load_verify_locations(cafile=broker.ssl_ca_file)
        key = "ssl_cert_file"
        if broker.ssl_cert_file is not None:
            context.load_cert_chain(broker.ssl_cert_file,
                                    broker.ssl_key_file)
    except OSError as err:  # ssl.SSLError too
        if getattr(err, "reason", None) == "KEY_VALUES_MISMATCH":
            key = "ssl_key_file"
        shown = getattr(broker, key)
        if key == "ssl_cert_file" and broker.ssl_key_file is not None:
            shown += " (key %s)" % broker.ssl_key_file
        what = _ssl_reason(err) if isinstance(err, ssl.SSLError) \
            else err.strerror
        raise ConfigError("cannot load %s: %s" % (shown, what or err),
                          path, "broker", key) from None


def _ssl_reason(err):
    """An OpenSSL error in words: ``PEM lib``, ``key values mismatch``."""
    text = err.args[1] if len(err.args) > 1 else str(err)
    text = re.sub(r"^\[[^]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", str(text))
    hints = {"KEY_VALUES_MISMATCH": "the key is not the certificate's",
             "PEM lib": "not a PEM certificate or key (or a key that needs "
                        "a passphrase)",
             "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in it"}
    return hints.get(getattr(err, "reason", None) or text, text)


def load(path, environ=None):
    """Read and check a configuration file.

    :param path: the INI file.
    :param environ: where ``${NAME}`` references are looked up
        (default: ``os.environ``).
    :returns: :class:`Config`.
    :raises ConfigError: on the first mistake, with one line naming the
        file, section and key.
    """
    path = os.fspath(path)
    environ = os.environ if environ is None else environ
    parser = _read(path)

    if parser.defaults():
        raise ConfigError(
            "options in [DEFAULT] are not allowed (configparser copies them "
            "into every section, where plugins would refuse them); move it "
            "to the section it belongs to", path, parser.default_section,
            next(iter(parser.defaults())))

    queues, roll_sections, callback_sections = [], [], []
    for section in parser.sections():
        if section in _FIXED_SECTIONS:
            continue
        prefix, sep, name = section.partition(":")
        if not sep or prefix not in PREFIXED_SECTIONS:
            raise ConfigError("unknown section" + _section_suggestion(
                section), path, section)
        if not name.strip():
            raise ConfigError("empty %s name after %r"
                              % (_PLACEHOLDERS[prefix].lower(), prefix + ":"),
                              path, section)
        {"consumer": queues, "roll_checker": roll_sections,
         "callback": callback_sections}[prefix].append(
            (section, name.strip()))
    if not queues:
        raise ConfigError("no [consumer:QUEUE] section: name at least one "
                          "queue to consume", path)

    try:
        broker = BrokerConfig(**_read_section(
            parser, "broker", BROKER_OPTIONS, path, environ))
    except OptionError as err:  # the URL's query (oslo's transport_url)
        raise ConfigError(str(err), path, "broker", "url") from None
    _check_tls(broker, path)

    consumers = []
    for section, queue in queues:
        consumers.append(ConsumerConfig(queue=queue, **_read_section(
            parser, section, CONSUMER_OPTIONS, path, environ)))

    _check_streams(consumers, path)

    archive = ArchiveConfig(**_read_section(
        parser, "archive", ARCHIVE_OPTIONS, path, environ))
    if archive.fsync_every * 2 > broker.prefetch_count:
        raise ConfigError(
            "%d needs [broker] prefetch_count >= %d (twice the ack batch, or "
            "the broker stops delivering), got %d" % (
                archive.fsync_every, archive.fsync_every * 2,
                broker.prefetch_count),
            path, "archive", "fsync_every")
    _check_modes(archive, path)
    if archive.retry_max < archive.retry_initial:
        raise ConfigError("expected a number >= retry_initial (%g), got %g"
                          % (archive.retry_initial, archive.retry_max),
                          path, "archive", "retry_max")

    roll_checker_options = {}
    for section, name in roll_sections:
        if name not in archive.roll_checker:
            raise ConfigError(
                "roll checker %r is not listed in [archive] roll_checker "
                "(%s)%s" % (
                    name, ", ".join(archive.roll_checker), did_you_mean(
                        name, archive.roll_checker, "[roll_checker:%s]")),
                path, section)
        roll_checker_options[name] = _plugin_options(parser, section, path,
                                                     environ)
    callback_options = {}
    for section, name in callback_sections:
        if name not in archive.callbacks:
            raise ConfigError(
                "callback %r is not listed in [archive] callbacks%s" % (
                    name, did_you_mean(name, archive.callbacks,
                                        "[callback:%s]")),
                path, section)
        callback_options[name] = _plugin_options(parser, section, path,
                                                 environ)

    worker = WorkerConfig(**_read_section(
        parser, "worker", WORKER_OPTIONS, path, environ))
    streams = [c.queue for c in consumers if c.is_stream]
    if streams and worker.processes > 1:
        raise ConfigError(
            "expected 1 with the stream queue %r, got %d: every consumer of "
            "a stream reads all of it, so each process would archive every "
            "message" % (streams[0], worker.processes),
            path, "worker", "processes")

    return Config(
        filename=path,
        broker=broker,
        consumers=tuple(consumers),
        archive=archive,
        roll_checker_options=types.MappingProxyType(roll_checker_options),
        callback_options=types.MappingProxyType(callback_options),
        worker=worker,
        metrics=MetricsConfig(**_read_section(
            parser, "metrics", METRICS_OPTIONS, path, environ)),
        logging=LoggingConfig(**_read_section(
            parser, "logging", LOGGING_OPTIONS, path, environ)),
        integrity=IntegrityConfig(**_read_section(
            parser, "integrity", INTEGRITY_OPTIONS, path, environ)),
    )
