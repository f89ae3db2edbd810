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
from urllib.parse import quote
from urllib.parse import unquote

from kombu.transport import TRANSPORT_ALIASES

from shoebox_worker.options import OptionError
from shoebox_worker.options import did_you_mean

__all__ = ["BrokerURL", "MASK", "kombu_hostname", "parse", "redact", "split"]

#: Shown instead of a password.
MASK = "***"

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
    """

    scheme: str
    user: str | None
    password: str | None
    location: str

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


def parse(text):
    """The URLs of ``text`` (``;`` between failover URLs), checked.

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
            urls.append(_parse_one(one))
        except OptionError as err:
            if len(texts) > 1:
                raise OptionError("%s (URL %d)" % (err, number)) from None
            raise
    return tuple(urls)


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
