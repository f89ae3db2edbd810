"""Read and check the worker's INI configuration file.

:func:`load` turns the file into frozen, typed dataclasses, or raises
:class:`~shoebox_worker.exceptions.ConfigError` whose ``str()`` is one
line naming the file, section and key, e.g.::

    worker.conf [archive] fsync_every: expected an integer, got 'ten'

Each fixed section has one table of options (:data:`SECTIONS`: name ->
parser and default, in documentation order). The validator reads it, and
so does the test that checks ``etc/shoebox-worker.conf.sample`` documents
every option, so the two cannot drift apart.

``[roll_checker:NAME]`` and ``[callback:NAME]`` are free-form: their
options are handed as strings to the plugin's constructor by
:mod:`shoebox_worker.plugins`, which checks them against its signature.

Values may contain ``${NAME}`` references to environment variables (for
secrets such as the broker password or the Swift key). Neither the broker
URL nor a plugin option that looks secret appears in ``repr()``; log the
broker with :meth:`BrokerConfig.redacted_url`.
"""

import configparser
import dataclasses
import difflib
import math
import os
import re
import time
import types
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping

from kombu.transport import TRANSPORT_ALIASES

from shoebox_worker.exceptions import ConfigError

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
    "request_id", "queue", "routing_key", "malformed",
)

#: Shown instead of a secret.
MASK = "***"

_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_SECRET_KEY = re.compile(r"pass|secret|token|credential|(^|_)key\Z")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_INT = re.compile(r"[+-]?[0-9]+\Z")
_BOOLEANS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}


class _Invalid(Exception):
    """A value that does not parse; the message says what was expected."""


# -- value parsers: str -> typed value, or raise _Invalid -----------------

def _integer(minimum=None, maximum=None, optional=False):
    def parse(raw):
        if optional and raw == "":
            return None
        if not _INT.match(raw):
            raise _Invalid("expected an integer, got %r" % raw)
        value = int(raw)
        if maximum is not None and not minimum <= value <= maximum:
            raise _Invalid("expected an integer from %d to %d, got %r"
                           % (minimum, maximum, raw))
        if minimum is not None and value < minimum:
            raise _Invalid("expected an integer >= %d, got %r"
                           % (minimum, raw))
        return value
    return parse


def _number(minimum=0, exclusive=False):
    def parse(raw):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise _Invalid("expected a number, got %r" % raw)
        if exclusive and value <= minimum:
            raise _Invalid("expected a number > %g, got %r" % (minimum, raw))
        if value < minimum:
            raise _Invalid("expected a number >= %g, got %r"
                           % (minimum, raw))
        return value
    return parse


def _boolean(optional=False):
    def parse(raw):
        if optional and raw == "":
            return None
        try:
            return _BOOLEANS[raw.lower()]
        except KeyError:
            raise _Invalid("expected true or false (or yes/no, on/off, "
                           "1/0), got %r" % raw) from None
    return parse


def _choice(*choices, upper=False):
    def parse(raw):
        value = raw.upper() if upper else raw.lower()
        if value in choices:
            return value
        raise _Invalid("expected one of %s, got %r%s"
                       % (", ".join(choices), raw, _did_you_mean(
                           value, choices)))
    return parse


def _text(optional=False):
    def parse(raw):
        if not raw and not optional:
            raise _Invalid("must not be empty")
        return raw or None
    return parse


def _path(optional=False):
    def parse(raw):
        if not raw:
            if optional:
                return None
            raise _Invalid("must not be empty")
        return os.path.abspath(os.path.expanduser(raw))
    return parse


def _version(raw):
    if raw not in ("1", "2"):
        raise _Invalid("expected 1 or 2, got %r" % raw)
    return int(raw)


def _items(raw):
    """Comma- (or newline-) separated items, blanks dropped."""
    return [item.strip() for item in re.split(r"[,\n]", raw)
            if item.strip()]


def _plugin_name(raw):
    if not _PLUGIN_NAME.match(raw):
        if "," in raw or " " in raw.strip():
            raise _Invalid("expected one name, got %r" % raw)
        raise _Invalid("expected a plugin name, got %r" % raw)
    return raw


def _plugin_names(raw):
    names = []
    for item in _items(raw):
        if not _PLUGIN_NAME.match(item):
            raise _Invalid("expected comma-separated names, got %r" % item)
        if item in names:
            raise _Invalid("%r is listed twice" % item)
        names.append(item)
    return tuple(names)


def _dotted_paths(raw):
    paths = []
    for item in _items(raw):
        if any(not part.strip() for part in item.split(".")) or (
                " " in item):
            raise _Invalid("expected dotted paths like payload.instance_id, "
                           "got %r" % item)
        if item in paths:
            raise _Invalid("%r is listed twice" % item)
        paths.append(item)
    return tuple(paths)


def _pairs(raw, convert=str):
    result = {}
    for item in _items(raw):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise _Invalid("expected key=value, got %r" % item)
        if key in result:
            raise _Invalid("%r is set twice" % key)
        result[key] = convert(value)
    return types.MappingProxyType(result)


def _argument_value(value):
    if _INT.match(value):
        return int(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _queue_arguments(raw):
    return _pairs(raw, _argument_value)


def _static_metadata(raw):
    pairs = _pairs(raw)
    for key in pairs:
        if key in RESERVED_METADATA:
            raise _Invalid("%r is set by the worker itself" % key)
    return pairs


def _url(raw):
    urls = [part.strip() for part in raw.split(";") if part.strip()]
    if not urls:
        raise _Invalid("must not be empty")
    for number, url in enumerate(urls, 1):
        where = " (URL %d)" % number if len(urls) > 1 else ""
        scheme = _SCHEME.match(url)
        if not scheme:
            raise _Invalid("expected a URL like amqp://user:password@host:"
                           "5672//, got %r%s" % (redact_url(url), where))
        transport = scheme.group(1).split("+")[0]
        if transport not in TRANSPORT_ALIASES:
            raise _Invalid("unknown transport %r%s%s" % (
                transport, where,
                _did_you_mean(transport, sorted(TRANSPORT_ALIASES))))
        if any(char.isspace() for char in url):
            raise _Invalid("a URL may not contain spaces, got %r%s"
                           % (redact_url(url), where))
        netloc = url[scheme.end():].partition("/")[0]
        port = netloc.rpartition("@")[2].rpartition("]")[2]
        if ":" in port and not port.rpartition(":")[2].isdigit():
            raise _Invalid("bad port in %r%s" % (redact_url(url), where))
    return ";".join(urls)


def _filename_template(raw):
    if "{worker_id}" not in raw:
        raise _Invalid("must contain {worker_id}, so that two workers never "
                       "write the same file")
    try:
        rendered = time.strftime(raw.replace("{worker_id}", "host-1"),
                                 time.gmtime(0))
    except ValueError as err:
        raise _Invalid("not a valid strftime template: %s" % err) from None
    if "/" in rendered or "\0" in rendered:
        raise _Invalid("renders as %r, which contains '/': a file name, not "
                       "a path (see working_directory)" % rendered)
    if rendered in (".", ".."):
        raise _Invalid("renders as %r, which is not a file name" % rendered)
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
    Option("prefetch_count", _integer(minimum=1), "2000"),
    Option("heartbeat", _number(minimum=0), "60"),
    Option("connect_timeout", _number(minimum=0, exclusive=True), "10"),
    Option("connect_max_retries", _integer(minimum=0, optional=True), ""),
    Option("failover_strategy", _choice("round-robin", "shuffle"),
           "round-robin"),
)

CONSUMER_OPTIONS = _table(
    Option("exchange", _text(), "nova"),
    Option("exchange_type", _choice("direct", "topic", "fanout", "headers"),
           "topic"),
    Option("routing_key", _text(optional=True), ""),
    Option("durable", _boolean(), "false"),
    Option("exchange_durable", _boolean(optional=True), ""),
    Option("auto_delete", _boolean(), "false"),
    Option("queue_arguments", _queue_arguments, ""),
    Option("declare", _boolean(), "true"),
)

ARCHIVE_OPTIONS = _table(
    Option("working_directory", _path(), "/var/lib/shoebox-worker"),
    Option("filename_template", _filename_template,
           "shoebox_%Y%m%dT%H%M%S_{worker_id}.events"),
    Option("version", _version, "2"),
    Option("roll_checker", _plugin_name, "size"),
    Option("callbacks", _plugin_names, ""),
    Option("fsync_every", _integer(minimum=1), "1000"),
    Option("fsync_interval", _number(minimum=0, exclusive=True), "1.0"),
    Option("metadata_fields", _dotted_paths, ""),
    Option("static_metadata", _static_metadata, ""),
    Option("max_backlog_mb", _number(minimum=0, exclusive=True), "10240"),
    Option("retry_initial", _number(minimum=0, exclusive=True), "1.0"),
    Option("retry_max", _number(minimum=0, exclusive=True), "300"),
)

WORKER_OPTIONS = _table(
    Option("processes", _integer(minimum=1), "1"),
    Option("stats_interval", _number(minimum=0), "60"),
)

METRICS_OPTIONS = _table(
    Option("port", _integer(minimum=1, maximum=65535, optional=True), ""),
    Option("host", _text(), "127.0.0.1"),
)

LOGGING_OPTIONS = _table(
    Option("level", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
           "INFO"),
    Option("file", _path(optional=True), ""),
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
})

#: Sections named ``[PREFIX:NAME]``; the plugin ones are free-form.
PREFIXED_SECTIONS = ("consumer", "roll_checker", "callback")
_FIXED_SECTIONS = tuple(name for name in SECTIONS if name != "consumer")
_PLACEHOLDERS = {"consumer": "QUEUE", "roll_checker": "NAME",
                 "callback": "NAME"}


# -- the result -------------------------------------------------------------

def redact_url(url):
    """``url`` with the password of every ``;``-separated URL masked."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url):
    scheme = _SCHEME.match(url)
    if not scheme:
        return url
    rest = url[scheme.end():]
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return "%s%s:%s@%s%s" % (scheme.group(0), user, MASK, host, path)


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
class BrokerConfig:
    """``[broker]``. ``url`` is kombu's (``;`` between failover URLs)."""

    url: str
    prefetch_count: int = 2000
    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    connect_max_retries: int | None = None
    failover_strategy: str = "round-robin"

    @property
    def urls(self):
        """The failover URLs, in order."""
        return tuple(self.url.split(";"))

    def redacted_url(self):
        """The URL(s) with passwords masked, for logs."""
        return redact_url(self.url)

    def __repr__(self):
        rest = ", ".join("%s=%r" % (field.name, getattr(self, field.name))
                         for field in dataclasses.fields(self)
                         if field.name != "url")
        return "BrokerConfig(url=%r, %s)" % (self.redacted_url(), rest)


@dataclasses.dataclass(frozen=True)
class ConsumerConfig:
    """One ``[consumer:QUEUE]``; defaults already resolved."""

    queue: str
    exchange: str = "nova"
    exchange_type: str = "topic"
    #: None: the queue name.
    routing_key: str | None = None
    durable: bool = False
    #: None: same as ``durable``.
    exchange_durable: bool | None = None
    auto_delete: bool = False
    queue_arguments: Mapping[str, int | bool | str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    declare: bool = True

    def __post_init__(self):
        if self.routing_key is None:
            object.__setattr__(self, "routing_key", self.queue)
        if self.exchange_durable is None:
            object.__setattr__(self, "exchange_durable", self.durable)


@dataclasses.dataclass(frozen=True)
class ArchiveConfig:
    """``[archive]``. ``working_directory`` is absolute."""

    working_directory: str = "/var/lib/shoebox-worker"
    filename_template: str = "shoebox_%Y%m%dT%H%M%S_{worker_id}.events"
    version: int = 2
    roll_checker: str = "size"
    callbacks: tuple[str, ...] = ()
    fsync_every: int = 1000
    fsync_interval: float = 1.0
    metadata_fields: tuple[str, ...] = ()
    static_metadata: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    max_backlog_mb: float = 10240.0
    retry_initial: float = 1.0
    retry_max: float = 300.0

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
class WorkerConfig:
    """``[worker]``."""

    processes: int = 1
    stats_interval: float = 60.0


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``; ``port`` None means no metrics endpoint."""

    port: int | None = None
    host: str = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``; ``file`` None means stderr."""

    level: str = "INFO"
    file: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole, checked configuration.

    :ivar filename: the file it was read from (as given to :func:`load`).
    :ivar consumers: one per ``[consumer:QUEUE]``, in file order.
    :ivar roll_checker_options: ``[roll_checker:<archive.roll_checker>]``.
    :ivar callback_options: ``[callback:NAME]`` by name (only the names
        that have a section).
    """

    filename: str
    broker: BrokerConfig
    consumers: tuple[ConsumerConfig, ...]
    archive: ArchiveConfig
    roll_checker_options: PluginOptions
    callback_options: Mapping[str, PluginOptions]
    worker: WorkerConfig
    metrics: MetricsConfig
    logging: LoggingConfig

    def redacted_url(self):
        """The broker URL(s) with passwords masked, for logs."""
        return self.broker.redacted_url()


# -- loading ----------------------------------------------------------------

def _did_you_mean(word, candidates, template="%s"):
    match = difflib.get_close_matches(word, list(candidates), n=1)
    if not match:
        return ""
    return " (did you mean %s?)" % (template % match[0])


def _section_suggestion(name):
    prefix, sep, rest = name.partition(":")
    if sep:
        match = difflib.get_close_matches(prefix, PREFIXED_SECTIONS, n=1)
        if match:
            return " (did you mean [%s:%s]?)" % (match[0], rest)
    if name in PREFIXED_SECTIONS:
        return " (did you mean [%s:%s]?)" % (name, _PLACEHOLDERS[name])
    suggestion = _did_you_mean(name, _FIXED_SECTIONS, "[%s]")
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


def _expand(raw, environ, path, section, key):
    """Replace every ``${NAME}`` with the environment variable's value."""
    used = []

    def replace(match):
        name = match.group(1)
        if not _ENV_NAME.match(name):
            raise ConfigError("bad environment variable reference %r: "
                              "expected ${NAME}" % match.group(0),
                              path, section, key)
        if name not in environ:
            raise ConfigError("environment variable %s is not set" % name,
                              path, section, key)
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
            raise ConfigError("unknown option" + _did_you_mean(key, table),
                              path, section, key)
    values = {}
    for option in table.values():
        value = raw.get(option.name, option.default)
        if value is None:
            raise ConfigError("required option is missing", path, section,
                              option.name)
        try:
            values[option.name] = option.parse(value)
        except _Invalid as err:
            raise ConfigError(str(err), path, section,
                              option.name) from None
    return values


def _plugin_options(parser, section, path, environ):
    values, from_env = _raw_options(parser, section, path, environ)
    return PluginOptions(values, from_env)


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

    broker = BrokerConfig(**_read_section(
        parser, "broker", BROKER_OPTIONS, path, environ))

    consumers = []
    for section, queue in queues:
        consumers.append(ConsumerConfig(queue=queue, **_read_section(
            parser, section, CONSUMER_OPTIONS, path, environ)))

    archive = ArchiveConfig(**_read_section(
        parser, "archive", ARCHIVE_OPTIONS, path, environ))
    if archive.fsync_every * 2 > broker.prefetch_count:
        raise ConfigError(
            "%d needs [broker] prefetch_count >= %d (twice the ack batch, or "
            "the broker stops delivering), got %d" % (
                archive.fsync_every, archive.fsync_every * 2,
                broker.prefetch_count),
            path, "archive", "fsync_every")
    if archive.retry_max < archive.retry_initial:
        raise ConfigError("expected a number >= retry_initial (%g), got %g"
                          % (archive.retry_initial, archive.retry_max),
                          path, "archive", "retry_max")

    roll_checker_options = PluginOptions()
    for section, name in roll_sections:
        if name != archive.roll_checker:
            raise ConfigError(
                "roll checker %r is not the one selected by [archive] "
                "roll_checker (%s)%s" % (
                    name, archive.roll_checker, _did_you_mean(
                        name, [archive.roll_checker], "[roll_checker:%s]")),
                path, section)
        roll_checker_options = _plugin_options(parser, section, path,
                                               environ)
    callback_options = {}
    for section, name in callback_sections:
        if name not in archive.callbacks:
            raise ConfigError(
                "callback %r is not listed in [archive] callbacks%s" % (
                    name, _did_you_mean(name, archive.callbacks,
                                        "[callback:%s]")),
                path, section)
        callback_options[name] = _plugin_options(parser, section, path,
                                                 environ)

    return Config(
        filename=path,
        broker=broker,
        consumers=tuple(consumers),
        archive=archive,
        roll_checker_options=roll_checker_options,
        callback_options=types.MappingProxyType(callback_options),
        worker=WorkerConfig(**_read_section(
            parser, "worker", WORKER_OPTIONS, path, environ)),
        metrics=MetricsConfig(**_read_section(
            parser, "metrics", METRICS_OPTIONS, path, environ)),
        logging=LoggingConfig(**_read_section(
            parser, "logging", LOGGING_OPTIONS, path, environ)),
    )
