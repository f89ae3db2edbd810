"""A broker URL: parse, validate, redact. The one place that reads one.

``[broker] url`` (and ``generate``/``replay``'s URL) is kombu's: one URL,
or several joined by ``;`` for failover::

    amqp://USER:PASSWORD@HOST:PORT/VHOST?QUERY;amqp://...

The password may hold any character, written as it is or percent-encoded
(``%2F`` for ``/``), so that a generated password can be pasted in. The
rules that make that unambiguous:

- the user and password end at the **last** ``@`` of the URL, so ``/``,
  ``#``, ``?``, ``@`` and ``:`` may appear in the password as they are
  (a ``@`` in the vhost or the query must be written ``%40``); the user
  ends at the first ``:`` (a ``:`` in the user must be written ``%3A``);
- the user and the password are percent-decoded: ``%`` followed by two hex
  digits is an escape (a password holding ``%41`` as such must be written
  ``%2541``); any other ``%`` is the character itself;
- a ``;`` starts the next URL only when the next URL's ``transport://``
  follows it (spaces between are allowed); any other ``;`` is part of
  the password, and refused after the host. So a password holding ``;``
  followed by ``name://`` must write that ``;`` as ``%3B`` (which is a
  ``;`` in every case).

A URL without ``@`` has no password; but what follows its ``host:`` is
masked in messages when it is not a port number (it may be a password
whose ``@`` is missing).

**oslo.messaging's transport_url, as it is.** A ``rabbit://`` URL is read
the way oslo.messaging reads its ``transport_url`` (nova.conf's, kolla's,
OpenStack-Ansible's), so that it can be pasted in::

    rabbit://USER:PASSWORD@HOST1:PORT1,USER:PASSWORD@HOST2:PORT2/VHOST?QUERY

- the hosts are separated by ``,``, each with its own user and password
  (a ``,`` in a password must be written ``%2C``, as oslo requires); the
  user and password of a host end at its last ``@``, and are
  percent-decoded as above; a host without a port is on 5672, as oslo
  connects;
- the virtual host is what follows the first ``/`` after the hosts,
  percent-decoded, as oslo reads it: ``/`` and nothing are RabbitMQ's
  default vhost ``/``, ``//`` is ``/`` too, ``/nova`` is ``nova`` and
  ``//nova`` is ``/nova``;
- the query sets ``[oslo_messaging_rabbit]`` options, as oslo's does:
  those that apply to a consumer set the ``[broker]`` option of the same
  meaning (:data:`OSLO_QUERY`: ``ssl``, ``ssl_ca_file``,
  ``ssl_cert_file``, ``ssl_key_file``, ``heartbeat_timeout_threshold``,
  ``kombu_failover_strategy``) and win over the section's, as oslo's do;
  the others (about the services' own queues and RPC) are accepted and
  ignored; any other name is refused, as oslo refuses it.

Each host becomes one failover URL in kombu's form (``amqp://``), so
everything below holds for them. Unlike oslo, which may pick a host at
random, the worker tries them in order (``failover_strategy``).

kombu splits on every ``;`` and reads the rest with ``urllib``, where ``/``,
``#`` and ``?`` end the host and the port: a password holding one was read
as the host or the port (and the error named it). So kombu never sees the
URL as written: :meth:`BrokerURL.for_kombu` percent-encodes the user and
password, and :func:`kombu_hostname` hands kombu the list of failover URLs.

Nothing here puts a password in a message: :class:`~.options.OptionError`
lines show the URL with the password masked (:meth:`BrokerURL.redacted`),
``repr()`` of a :class:`BrokerURL` masks it, and :func:`redact` masks any
text that may hold URLs, even ones that do not parse.
"""

import dataclasses
import re
from urllib.parse import parse_qsl
from urllib.parse import quote
from urllib.parse import unquote

from kombu.transport import TRANSPORT_ALIASES

from shoebox_worker.options import OptionError
from shoebox_worker.options import did_you_mean

__all__ = ["BrokerURL", "MASK", "OSLO_QUERY", "OSLO_SCHEMES",
           "kombu_hostname", "parse", "query_options", "redact", "split"]

#: Shown instead of a password, or any other secret, wherever one would
#: be shown (the one mask: broker URLs, Swift headers, plugin options).
MASK = "***"

#: Schemes read as oslo.messaging's transport_url.
OSLO_SCHEMES = ("rabbit",)
#: The port of a transport_url host that names none (oslo's).
OSLO_PORT = 5672
#: The options of oslo.messaging's ``[oslo_messaging_rabbit]`` that a
#: transport_url's query may set (oslo.messaging 18), and the ``[broker]``
#: option each one sets; None: not a consumer's business (the services'
#: own queues, pools, RPC): accepted, ignored. (The broker's certificate
#: is always verified here, whatever ssl_enforce_hostname_verification
#: says.)
OSLO_QUERY = {
    "ssl": "ssl",
    "ssl_ca_file": "ssl_ca_file",
    "ssl_cert_file": "ssl_cert_file",
    "ssl_key_file": "ssl_key_file",
    "heartbeat_timeout_threshold": "heartbeat",
    "kombu_failover_strategy": "failover_strategy",
    **dict.fromkeys((
        "amqp_auto_delete", "amqp_durable_queues", "conn_pool_min_size",
        "conn_pool_ttl", "direct_mandatory_flag", "enable_cancel_on_failover",
        "heartbeat_rate", "hostname", "kombu_compression",
        "kombu_missing_consumer_retry_timeout", "kombu_reconnect_delay",
        "kombu_reconnect_splay", "processname", "rabbit_ha_queues",
        "rabbit_interval_max", "rabbit_login_method",
        "rabbit_qos_prefetch_count", "rabbit_quorum_delivery_limit",
        "rabbit_quorum_max_memory_bytes", "rabbit_quorum_max_memory_length",
        "rabbit_quorum_queue", "rabbit_retry_backoff",
        "rabbit_retry_interval", "rabbit_stream_fanout",
        "rabbit_transient_queues_ttl", "rabbit_transient_quorum_queue",
        "rpc_conn_pool_size", "ssl_enforce_fips_mode",
        "ssl_enforce_hostname_verification", "ssl_version",
        "use_queue_manager")),
}

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.\-]*)://")
#: A ``;`` that separates two URLs: the next one's ``transport://`` (or
#: the end) follows it.
_SEPARATOR = re.compile(r";(?=\s*(?:[A-Za-z][A-Za-z0-9+.\-]*://|\Z))")


@dataclasses.dataclass(frozen=True)
class BrokerURL:
    """One broker URL, its user and password decoded.

    :ivar scheme: as written, e.g. ``amqp`` or ``sqla+mysql``.
    :ivar user: decoded; None when the URL names none.
    :ivar password: decoded; None when the URL has none.
    :ivar location: ``HOST:PORT/VHOST?QUERY`` as written.
    :ivar options: ``((broker option, value), ...)`` set by an
        oslo.messaging transport_url's query (:data:`OSLO_QUERY`), as
        written; empty for a kombu URL.
    """

    scheme: str
    user: str | None
    password: str | None
    location: str
    options: tuple = ()

    @property
    def transport(self):
        """kombu's transport name (``amqp`` of ``amqp+x``)."""
        return self.scheme.split("+")[0]

    def _text(self, password):
        if self.user is None and password is None:
            return "%s://%s" % (self.scheme, self.location)
        userinfo = quote(self.user or "", safe="")
        if password is not None:
            userinfo += ":" + password
        return "%s://%s@%s" % (self.scheme, userinfo, self.location)

    def for_kombu(self):
        """The URL with the user and password percent-encoded, as kombu
        (``urllib``) reads it back."""
        return self._text(None if self.password is None
                          else quote(self.password, safe=""))

    def redacted(self):
        """The URL with the password masked, for messages and logs."""
        return self._text(None if self.password is None else MASK)

    def __repr__(self):
        return "BrokerURL(%r)" % self.redacted()

    __str__ = redacted


def split(text):
    """The ``;``-separated URLs of ``text``, stripped, blanks dropped."""
    return [part.strip() for part in _SEPARATOR.split(text) if part.strip()]


def _parts(url):
    """``(scheme, userinfo or None, location)``; scheme None when there is
    no ``transport://`` (the userinfo is then what comes before the last
    ``@``, if any)."""
    scheme = _SCHEME.match(url)
    rest = url[scheme.end():] if scheme else url
    userinfo, at, location = rest.rpartition("@")
    return (scheme.group(1) if scheme else None,
            userinfo if at else None, location)


def _decode(text, what, shown):
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise OptionError("the %s in %r is not UTF-8 once percent-decoded"
                          % (what, shown)) from None


def _masked_port(location):
    """``location`` with a port that is not a number masked (it may be
    the password of a URL whose ``@`` is missing), or None when the port
    is a number or absent."""
    hostport = re.split(r"[/?#]", location, maxsplit=1)[0]
    host, colon, port = hostport.rpartition(":")
    if not colon or "]" in port or port.isdigit():  # ']': IPv6 address
        return None
    return host + ":" + MASK + location[len(hostport):]


def _check_location(url, shown):
    if any(char.isspace() for char in url.location):
        raise OptionError("a URL may not contain spaces outside the "
                          "password, got %r" % shown)
    if ";" in url.location:
        raise OptionError("a ';' after the host in %r: between failover "
                          "URLs, ';' must be followed by the next URL's "
                          "transport://" % shown)
    masked = _masked_port(url.location)
    if masked is not None:
        if url.password is None:  # the port may be a password, '@' missing
            shown = shown.replace(url.location, masked)
        raise OptionError("bad port in %r" % shown)


def _parse_one(text):
    scheme, userinfo, location = _parts(text)
    if scheme is None:
        raise OptionError("expected a URL like amqp://user:password@"
                          "host:5672//, got %r" % redact(text))
    if userinfo is None:
        user = password = None
    else:
        user, colon, password = userinfo.partition(":")
        if not colon:
            password = None
    shown = BrokerURL(scheme, user, None if password is None else "",
                      location).redacted()
    if scheme.split("+")[0] not in TRANSPORT_ALIASES:
        transport = scheme.split("+")[0]
        raise OptionError("unknown transport %r%s" % (
            transport, did_you_mean(transport, sorted(TRANSPORT_ALIASES))))
    url = BrokerURL(
        scheme,
        None if user is None else _decode(user, "user", shown),
        None if password is None else _decode(password, "password", shown),
        location)
    _check_location(url, shown)
    return url


def _oslo_parts(text):
    """``(scheme, [host, ...], path, query)`` of a transport_url: the hosts
    end at the first ``/``, ``?`` or ``#`` after the last ``@`` (so that a
    password may hold them as they are)."""
    scheme = _SCHEME.match(text)
    rest = text[scheme.end():]
    end = re.compile(r"[/?#]").search(rest, rest.rfind("@") + 1)
    netloc, tail = (rest[:end.start()], rest[end.start():]) if end else \
        (rest, "")
    tail = tail.partition("#")[0]
    path, _, query = tail.partition("?")
    return (scheme.group(1), [host for host in netloc.split(",") if host],
            path, query)


def _oslo_query(query, shown):
    """The ``[broker]`` options a transport_url's query sets."""
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OSLO_QUERY:
            raise OptionError(
                "unknown option %r in the query of %r: not one of "
                "oslo.messaging's [oslo_messaging_rabbit] options%s"
                % (key, shown, did_you_mean(key, sorted(OSLO_QUERY))))
        if OSLO_QUERY[key] is not None:
            # oslo joins repeated values with ","
            options[OSLO_QUERY[key]] = (
                options[OSLO_QUERY[key]] + "," + value
                if OSLO_QUERY[key] in options else value)
    return tuple(options.items())


def _parse_oslo(text):
    """The failover URLs of one oslo.messaging transport_url, one per
    host, in kombu's form (see the module docstring)."""
    shown = redact(text)
    _, hosts, path, query = _oslo_parts(text)
    options = _oslo_query(query, shown)
    if not hosts:  # oslo's default: the local broker, as guest
        hosts = ["guest:guest@localhost"]
    urls = []
    for number, host in enumerate(hosts, 1):
        userinfo, at, hostport = host.rpartition("@")
        user = password = None
        if at:
            user, colon, password = userinfo.partition(":")
            if not colon:
                password = None
        where = repr(shown) if len(hosts) == 1 else "host %d of %r" % (
            number, shown)
        if not hostport or hostport.startswith(":"):
            raise OptionError("no host name in %s" % where)
        if not re.search(r"(\]|^[^:]*|:[0-9]+)\Z", hostport):
            raise OptionError("bad port in %s" % where)
        if not re.search(r":[0-9]+\Z", hostport):
            hostport += ":%d" % OSLO_PORT
        url = BrokerURL(
            "amqp",
            None if user is None else _decode(user, "user", shown),
            None if password is None else _decode(password, "password",
                                                  shown),
            hostport + path, options)
        _check_location(url, url.redacted())
        urls.append(url)
    return urls


def parse(text):
    """The URLs of ``text`` (``;`` between failover URLs), checked.

    An oslo.messaging transport_url (``rabbit://``, see the module
    docstring) gives one URL per host.

    :returns: a tuple of :class:`BrokerURL`, at least one.
    :raises OptionError: one line, the URL shown with its password masked
        and numbered when there are several.
    """
    texts = split(text or "")
    if not texts:
        raise OptionError("must not be empty")
    urls = []
    for number, one in enumerate(texts, 1):
        try:
            scheme = _SCHEME.match(one)
            if scheme and scheme.group(1).lower() in OSLO_SCHEMES:
                urls.extend(_parse_oslo(one))
            else:
                urls.append(_parse_one(one))
        except OptionError as err:
            if len(texts) > 1:
                raise OptionError("%s (URL %d)" % (err, number)) from None
            raise
    return tuple(urls)


def query_options(urls):
    """The ``[broker]`` options the URLs' transport_url queries set
    (:data:`OSLO_QUERY`): ``{option: value as written}``.

    :raises OptionError: two URLs set one option to different values.
    """
    found = {}
    for url in urls:
        for key, value in url.options:
            if found.setdefault(key, value) != value:
                raise OptionError(
                    "the URLs' queries set %s to %r and to %r: give it "
                    "once" % (key, found[key], value))
    return found


def kombu_hostname(urls):
    """What to give ``kombu.Connection`` as its ``hostname``: the URL, or
    the list of failover URLs (a list, so kombu does not split on ``;``).

    :param urls: :class:`BrokerURL` objects (from :func:`parse`).
    """
    encoded = [url.for_kombu() for url in urls]
    return encoded[0] if len(encoded) == 1 else encoded


def redact(text):
    """``text`` (one or several URLs, parsed or not) with every password
    masked: whatever follows the user's ``:`` up to the last ``@``."""
    shown = []
    for part in split(text or ""):
        scheme = _SCHEME.match(part)
        if scheme and scheme.group(1).lower() in OSLO_SCHEMES:
            shown.append(_redact_oslo(part))
            continue
        scheme, userinfo, location = _parts(part)
        user, colon, _ = (userinfo or "").partition(":")
        if not colon:
            masked = _masked_port(location) if scheme else None
            shown.append(part if masked is None
                         else part[:len(part) - len(location)] + masked)
        elif scheme is None:
            shown.append("%s:%s@%s" % (user, MASK, location))
        else:
            shown.append(BrokerURL(scheme, unquote(user), MASK,
                                   location).redacted())
    return ";".join(shown)


def _redact_oslo(text):
    """A transport_url with every host's password masked."""
    scheme, hosts, path, query = _oslo_parts(text)
    masked = []
    for host in hosts:
        userinfo, at, hostport = host.rpartition("@")
        if not at:  # a port that is not a number may be a password
            masked.append(_masked_port(host) or host)
            continue
        user, colon, _ = userinfo.partition(":")
        masked.append("%s%s@%s" % (user, ":" + MASK if colon else "",
                                   hostport))
    return "%s://%s%s%s" % (scheme, ",".join(masked), path,
                            "?" + query if query else "")
