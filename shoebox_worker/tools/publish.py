"""Publishing to a broker: ``replay``, ``generate`` and :func:`publish`.

Both send notifications as oslo.messaging's notifier does: in the v2
envelope (:func:`shoebox_worker.consume.envelope.wrap`), JSON, UTF-8,
persistent, mandatory, with publisher confirms, so that a message the
broker refuses (nacks) or cannot route to any queue (returns) is counted
and never silent: both commands print how many were confirmed, and exit 1
when any was returned, nacked or left unconfirmed (:class:`_Sender`
pipelines the confirms). ``replay`` republishes archived
notifications (read with :mod:`shoebox_worker.tools.read`); ``generate``
publishes the simulator's (:mod:`shoebox_worker.tools.simulator`).

A broker that is down or refuses is one
:class:`~shoebox_worker.tools.ToolError` line within a few seconds
(:func:`connect`), never a retry loop; :func:`broker_error` tells the
errors that retrying cannot fix (a refused login or permission, a missing
vhost or exchange, an exchange declared with other settings) from the
transient ones, and says what to check. :class:`Pacer` holds either
command to ``--rate``.
"""

import collections
import dataclasses
import datetime
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

import amqp.exceptions
import kombu.exceptions
from kombu import Exchange
from kombu import Producer
from kombu import Queue

from shoebox_worker import broker_url
from shoebox_worker import config
from shoebox_worker import tools
from shoebox_worker.consume import broker
from shoebox_worker.consume import envelope
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import progress
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools import simulator

__all__ = [
    "Outcome",
    "Pacer",
    "broker_error",
    "broker_errors",
    "cmd_generate",
    "cmd_replay",
    "connect",
    "publish",
    "tls_from",
    "tls_hints",
    "url_from",
]

LOG = logging.getLogger(__name__)

#: Longest wait for the broker to accept a connection, seconds.
BROKER_CONNECT_TIMEOUT = 5.0
#: Connection attempts before replay/generate give up (per failover URL).
BROKER_CONNECT_RETRIES = 1


# -- the broker ---------------------------------------------------------------

def broker_errors(conn=None):
    """What a broker that is down, refuses or goes away raises (with
    ``conn``'s transport's own errors when given)."""
    errors = (OSError, kombu.exceptions.KombuError,
              amqp.exceptions.AMQPError)
    if conn is not None:
        errors += tuple(conn.connection_errors) + tuple(conn.channel_errors)
    return errors


#: What to check when the broker refuses with an AMQP reply code that
#: retrying cannot fix (the default hints; a command may give its own).
PERMANENT_HINTS = {
    broker.ACCESS_REFUSED: "check the user's permissions on the vhost",
    broker.NOT_FOUND: "check the exchange name and the vhost",
    broker.PRECONDITION_FAILED: "it exists with other settings: match them "
                                "or use another name",
    broker.NOT_ALLOWED: "check the vhost in the URL and the user's access "
                        "to it",
}

#: The hint for a refused login (a 403 at connection time).
LOGIN_HINT = "check the user name and password in the URL"
#: What to do when RabbitMQ 4 refuses a deprecated feature a tool used.
DEPRECATED_HINTS = {
    "transient_nonexcl_queues": "give --durable (RabbitMQ 4.3 and later "
                                "refuse a --queue that is not durable)",
}
#: The hint for a broker that cannot be reached (which may heal).
UNREACHABLE_HINT = ("check that the broker runs and listens at that "
                    "address, then try again")


def is_permanent(err):
    """Whether retrying cannot fix ``err``: an AMQP refusal (403 access
    refused, 404 not found, 406 precondition failed, 530 not allowed),
    as opposed to a broker that is down or a connection that drops."""
    return (isinstance(err, amqp.exceptions.AMQPError)
            and broker.reply_code(err) in broker.PERMANENT)


def _tls_cause(err):
    """The TLS failure that retrying does not fix behind ``err`` (kombu
    wraps the last attempt's in an OperationalError), or None."""
    for candidate in (err, err.__cause__):
        if broker.tls_refusal(candidate) is not None:
            return candidate
    return None


def broker_error(url, err, hints=None):
    """A one-line :class:`ToolError` for a broker failure: the URL
    (password redacted), what the broker said, and what to do; an error
    that retrying cannot fix (:func:`is_permanent`) says so.

    :param hints: ``{reply code: what to check}``, over
        :data:`PERMANENT_HINTS`, and ``{TLS option: what to do}`` (the
        ``[broker]`` option a TLS refusal points at, :func:`tls_hints`),
        over the worker's advice.
    """
    tls = _tls_cause(err)
    text = " ".join(str(err).split()) or type(err).__name__
    feature = broker.deprecated_feature(err)
    if feature is not None:  # RabbitMQ 4: refused, the connection closed
        return ToolError("broker %s: the broker refused a deprecated "
                         "feature, %s; retrying will not help: %s" % (
                             broker_url.redact(url), feature,
                             (hints or {}).get(feature, DEPRECATED_HINTS.get(
                                 feature, broker.permanent_advice(err)))))
    if tls is not None:
        option, advice = broker.tls_refusal(tls)
        text = "%s; retrying will not help: %s" % (
            broker.reason(tls), (hints or {}).get(option, advice))
    elif is_permanent(err):
        code = broker.reply_code(err)
        if code == broker.ACCESS_REFUSED and "Login was refused" in text:
            hint = LOGIN_HINT
        else:
            hint = {**PERMANENT_HINTS, **(hints or {})}[code]
        text += "; retrying will not help: " + hint
    elif isinstance(err, OSError | kombu.exceptions.OperationalError):
        text += "; " + UNREACHABLE_HINT
    return ToolError("broker %s: %s" % (broker_url.redact(url), text))


#: Where ``replay`` and ``generate`` read the broker URL when neither
#: ``--url`` nor ``--config`` gives it.
URL_VARIABLE = tools.URL_VARIABLE


def url_from(args, environ):
    """The broker URL a command was given: ``--url``, else ``--config``'s
    ``[broker] url``, else ``$SHOEBOX_BROKER_URL``.

    :raises ToolError: none of them is given, or the URL does not parse
        (one line, its password masked).
    """
    if getattr(args, "url", None):
        url, where = args.url, "--url"
    elif getattr(args, "config", None):
        return config.load(args.config).broker.url  # checked by load
    elif environ.get(URL_VARIABLE, "").strip():
        url, where = environ[URL_VARIABLE], URL_VARIABLE
    else:
        raise UsageError("no broker URL: give --config FILE (its [broker] "
                        "url) or set %s (--url works too, but shows the "
                        "password to every local user in ps)" % URL_VARIABLE)
    try:
        # the query's options too (heartbeat_timeout_threshold=x ...)
        config.BrokerConfig(url=url)
    except ValueError as err:
        raise UsageError("%s: %s" % (where, err)) from None
    return url


def tls_from(args, url):
    """What ``kombu.Connection(ssl=...)`` takes for a command's broker
    (:func:`shoebox_worker.consume.broker.ssl_argument`): with
    ``--config``, its ``[broker]`` TLS options (``ssl``, ``ssl_ca_file``,
    ``ssl_cert_file``, ``ssl_key_file``, checked by the config's
    :func:`~shoebox_worker.config.load`) for ``url``; without, TLS with
    the system's CAs for ``amqps://`` URLs."""
    if getattr(args, "config", None):
        settings = dataclasses.replace(config.load(args.config).broker,
                                       url=url)
    else:
        settings = config.BrokerConfig(url=url)
    return broker.ssl_argument(settings)


#: For a command given no ``--config``: its broker's certificate is checked
#: against the system's CAs, and there is no ``[broker] ssl_ca_file`` to
#: set.
SYSTEM_CAS_HINT = ("the system's CAs do not trust the broker's "
                   "certificate: give --config FILE with [broker] "
                   "ssl_ca_file set to the CA that signed it (or add that "
                   "CA to the system's), and use the host name it was made "
                   "for")


def tls_hints(args):
    """:func:`broker_error`'s TLS hints for a command: none with
    ``--config`` (the worker's advice, naming its ``[broker]`` options,
    holds), else :data:`SYSTEM_CAS_HINT` for an untrusted certificate."""
    if getattr(args, "config", None):
        return {}
    return {"ssl_ca_file": SYSTEM_CAS_HINT}


def _kombu_hostname(url):
    """``url`` (as written, see :mod:`shoebox_worker.broker_url`) as kombu
    must be given it."""
    return broker_url.kombu_hostname(broker_url.parse(url))


def connect(url, ssl=False, hints=None):
    """A connected kombu Connection, or a ToolError within a few seconds
    (:class:`_Sender` turns publisher confirms on for its channel).

    :param ssl: kombu's TLS argument (:func:`tls_from`).
    :param hints: :func:`broker_error`'s (:func:`tls_hints`).
    """
    conn = broker.Connection(_kombu_hostname(url),
                             connect_timeout=BROKER_CONNECT_TIMEOUT,
                             ssl=ssl)
    try:
        conn.ensure_connection(
            max_retries=BROKER_CONNECT_RETRIES * len(broker_url.split(url)),
            interval_start=0.5, interval_step=0.5, interval_max=1.0)
    except broker_errors(conn) as err:
        conn.release()
        raise broker_error(url, err, hints) from None
    return conn


@dataclasses.dataclass
class Outcome:
    """How the broker took the messages sent.

    ``confirmed`` ones were acked and routed to a queue; ``returned`` ones
    were acked but no queue is bound for their routing key (the broker
    dropped them); ``nacked`` ones the broker refused; ``unconfirmed``
    ones got no answer in time, or before the connection was lost (they
    may or may not be queued). Counted as the answers come. Without
    publisher confirms (``confirm=False``) nothing is counted but
    ``sent``; on kombu's virtual transports, which have none, a message
    sent counts as confirmed.
    """

    sent: int = 0
    confirmed: int = 0
    returned: int = 0
    nacked: int = 0
    #: sent, and neither confirmed nor nacked within CONFIRM_TIMEOUT (or
    #: before a broker error stopped the run)
    unconfirmed: int = 0

    @property
    def lost(self):
        """How many the broker did not queue, or did not say it did:
        returned, nacked and unconfirmed."""
        return self.returned + self.nacked + self.unconfirmed

    def summary(self):
        """``5 confirmed``, or ``0 confirmed, 5 returned, 1 nacked``."""
        parts = ["%d confirmed" % self.confirmed]
        if self.returned:
            parts.append("%d returned" % self.returned)
        if self.nacked:
            parts.append("%d nacked" % self.nacked)
        if self.unconfirmed:
            parts.append("%d unconfirmed" % self.unconfirmed)
        return ", ".join(parts)

    def error(self, exchange, routing_key,
              fix="bind a queue, or check --routing-key"):
        """The one-line :class:`ToolError` for what was lost, or None;
        ``fix`` says what to do about returned messages."""
        if not self.lost:
            return None
        reasons = []
        if self.returned:
            reasons.append(
                "%d of %d returned: no queue is bound to exchange %s with "
                "routing key %s: %s" % (
                    self.returned, self.sent, exchange, routing_key, fix))
        if self.nacked:
            reasons.append(
                "%d of %d nacked: the broker refused them (see its log)"
                % (self.nacked, self.sent))
        if self.unconfirmed:
            reasons.append(
                "%d of %d unconfirmed: the broker did not confirm them "
                "within %.0f s (they may or may not be queued)"
                % (self.unconfirmed, self.sent, CONFIRM_TIMEOUT))
        return ToolError("; ".join(reasons))


#: Publisher confirms are pipelined: at most this many messages, and
#: this many bytes, are sent and not yet confirmed at once (the broker
#: confirms several with one frame).
CONFIRM_WINDOW = 1000
CONFIRM_WINDOW_BYTES = 16 << 20
#: Seconds to wait for a confirm: for the last ones (what is still
#: unconfirmed then is counted, and reported, as such), and for room in a
#: full window (then the run stops: :class:`ConfirmTimeout`).
CONFIRM_TIMEOUT = 60.0


class ConfirmTimeout(ToolError):
    """The broker confirmed nothing for :data:`CONFIRM_TIMEOUT` seconds
    while the window was full (a quorum queue without its majority, a
    blocked connection): the run stops rather than wait for ever."""


class _Sender:
    """Publishes bodies as mandatory to one exchange and routing key and
    counts the :class:`Outcome`.

    With publisher confirms, the confirms are pipelined: :meth:`send`
    returns once the message is sent, while at most
    :data:`CONFIRM_WINDOW` messages (and :data:`CONFIRM_WINDOW_BYTES`)
    wait for theirs; :meth:`finish` waits for the rest (up to
    :data:`CONFIRM_TIMEOUT` seconds: what is still unconfirmed then is
    counted as such). Each message ends confirmed, returned (the broker's
    basic.return, which comes before its ack), nacked or unconfirmed. On
    kombu's virtual transports, which have no confirms, a message sent is
    counted as confirmed.
    """

    def __init__(self, channel, exchange, routing_key, confirm=True):
        self.outcome = Outcome()
        self.routing_key = routing_key
        self.confirm = confirm
        self._producer = Producer(channel, exchange=exchange,
                                  auto_declare=False,
                                  on_return=self._on_return)
        #: ``{sequence: body size}`` of the messages not confirmed yet
        self._pending = collections.OrderedDict()
        self._pending_bytes = 0
        self._sequence = 0
        self._pipelined = confirm and hasattr(channel, "confirm_select")
        if self._pipelined:
            self._connection = channel.connection
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)

    def _on_return(self, exc, exchange, routing_key, message):
        self.outcome.returned += 1

    def _settle(self, tag, multiple):
        settled = 0
        if multiple:
            while self._pending and next(iter(self._pending)) <= tag:
                self._pending_bytes -= self._pending.popitem(last=False)[1]
                settled += 1
        elif tag in self._pending:
            self._pending_bytes -= self._pending.pop(tag)
            settled = 1
        return settled

    def _on_ack(self, tag, multiple):
        # a returned message is acked too (its basic.return comes first):
        # counted returned, not confirmed
        self._acked += self._settle(tag, multiple)
        self.outcome.confirmed = self._acked - self.outcome.returned

    def _on_nack(self, tag, multiple):
        self.outcome.nacked += self._settle(tag, multiple)

    _acked = 0

    def send(self, body):
        """Publish one body, then wait while the window is full; broker
        errors propagate."""
        self.outcome.sent += 1
        self._producer.publish(
            body, routing_key=self.routing_key,
            content_type="application/json", content_encoding="utf-8",
            delivery_mode=2, mandatory=True, declare=[], retry=False)
        if not self._pipelined:
            if self.confirm:
                self.outcome.confirmed = \
                    self.outcome.sent - self.outcome.returned
            return
        self._sequence += 1
        self._pending[self._sequence] = len(body)
        self._pending_bytes += len(body)
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while len(self._pending) > CONFIRM_WINDOW or \
                self._pending_bytes > CONFIRM_WINDOW_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                self.give_up()
                raise ConfirmTimeout(
                    "the broker confirmed none of %d messages for %.0f s: "
                    "stopped after %d sent (%s; the unconfirmed may or may "
                    "not be queued): check the broker (a quorum queue "
                    "without its majority, an alarm blocking publishers)"
                    % (self.outcome.unconfirmed, CONFIRM_TIMEOUT,
                       self.outcome.sent, self.outcome.summary()))
            self._wait(left)

    def finish(self):
        """Wait for the confirms still due; count what is left
        unconfirmed after :data:`CONFIRM_TIMEOUT` seconds."""
        if self._pipelined:
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while self._pending and time.monotonic() < deadline:
                self._wait(deadline - time.monotonic())
            self.give_up()
        return self.outcome

    def give_up(self):
        """Count what is still waiting for its confirm as unconfirmed (the
        run ends: done, timed out, or stopped by a broker error)."""
        self.outcome.unconfirmed += len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def _wait(self, timeout):
        try:
            self._connection.drain_events(timeout=max(0.0, timeout))
        except socket.timeout:
            pass


def _declare(channel, exchange):
    """Declare ``exchange``; a reserved ``amq.*`` one, which a client may
    not declare, is only checked to exist."""
    if exchange.name.startswith("amq."):
        channel.exchange_declare(exchange.name, exchange.type, passive=True)
    else:
        exchange(channel).declare()


class Pacer:
    """Hold a loop to at most ``rate`` iterations a second.

    A token schedule: the n-th message is due at ``t0 + n / rate``; it sleeps
    only when the loop is ahead of that schedule, so there is no sleep per
    message when the sender is slower than the rate anyway.

    :param rate: iterations a second, or None for no limit.
    :raises ValueError: a rate that is not > 0.
    """

    def __init__(self, rate):
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate!r}")
        self.interval = None if rate is None else 1.0 / rate
        self.start = time.monotonic()

    def wait(self, sent):
        """Sleep until the ``sent``-th iteration (from 0) is due."""
        if self.interval is None:
            return
        delay = self.start + sent * self.interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def publish(url: str, count: int, *, exchange: str = "nova",
            routing_key: str = "notifications.info",
            exchange_type: str = "topic", durable: bool = False,
            rate: float | None = None, seed: int | None = None,
            start: datetime.datetime | None = None,
            declare_queue: str | None = None, confirm: bool = True,
            progress: Callable[[int], object] | None = None,
            ssl: bool | dict = False) -> Outcome:
    """Publish ``count`` synthetic notifications in the v2 envelope.

    Sends as oslo.messaging's notifier does: to a ``topic`` exchange
    (non-durable by default, like oslo.messaging's default), JSON, UTF-8,
    persistent delivery mode; and as mandatory, so that the broker returns
    what no queue takes instead of dropping it silently.

    :param url: kombu broker URL, e.g. ``amqp://guest:guest@localhost//``
        (any character in the password, see
        :mod:`shoebox_worker.broker_url`).
    :param count: how many to publish.
    :param exchange: exchange name (declared once, before publishing; a
        reserved ``amq.*`` exchange is only checked to exist).
    :param routing_key: routing key, ``<topic>.<priority>``.
    :param exchange_type: exchange type.
    :param durable: durability of the exchange (and of ``declare_queue``);
        it must match an existing declaration or the broker refuses it.
    :param rate: at most this many messages a second; None for as fast as
        the broker takes them.
    :param seed: seed for
        :func:`~shoebox_worker.tools.simulator.notifications`.
    :param start: time of the first notification (default now); with the
        same ``seed`` the same ``start`` gives the same bytes.
    :param declare_queue: name of a queue to declare and bind to the
        exchange with ``routing_key`` before publishing, so that nothing is
        dropped when no consumer has declared it yet.
    :param confirm: use publisher confirms (pipelined, :class:`_Sender`),
        and the :class:`Outcome` counts what was confirmed, returned,
        nacked and unconfirmed.
    :param progress: optional callable, called with the number sent so far
        after each message.
    :param ssl: kombu's TLS argument (:func:`tls_from`).
    :returns: the :class:`Outcome`: how many were sent, confirmed, returned
        and nacked.
    :raises: the transport's errors (:func:`broker_errors`) on anything
        but a nack or a return; :class:`ConfirmTimeout`.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate!r}")
    with broker.Connection(_kombu_hostname(url), ssl=ssl) as conn:
        conn.connect()
        channel = conn.channel()
        target = Exchange(exchange, type=exchange_type, durable=durable,
                          auto_delete=False)
        _declare(channel, target)
        if declare_queue:
            Queue(declare_queue, exchange=target, routing_key=routing_key,
                  durable=durable, auto_delete=False)(channel).declare()
        sender = _Sender(channel, target, routing_key, confirm=confirm)
        LOG.info("publishing %d notifications to exchange %s (%s) with "
                 "routing key %s on %s%s", count, exchange, exchange_type,
                 routing_key, conn.as_uri(),
                 " with confirms" if confirm else "")
        pacer = Pacer(rate)
        started = pacer.start
        send = sender.send
        for sent, notification in enumerate(
                simulator.notifications(count, seed=seed, start=start)):
            pacer.wait(sent)
            send(envelope.wrap(notification))
            if progress is not None:
                progress(sent + 1)
        outcome = sender.finish()
        elapsed = time.monotonic() - started
        LOG.info("published %d notifications in %.2fs (%.0f msg/s): %s",
                 outcome.sent, elapsed,
                 outcome.sent / elapsed if elapsed > 0 else 0.0,
                 outcome.summary())
    return outcome


# -- replay -----------------------------------------------------------------

#: What ``replay`` says to check when the broker refuses for good.
REPLAY_HINTS = {
    broker.NOT_FOUND: "check --exchange (replay publishes only to an "
                      "existing exchange) and the vhost of [broker] url",
    broker.ACCESS_REFUSED: "check the permissions of [broker] url's user on "
                           "the vhost",
}


def cmd_replay(args):
    """Republish archived notifications in the oslo.messaging v2 envelope."""
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be > 0, got %g" % args.rate)
    read.quiet_reader_logs()
    url = url_from(args, os.environ)
    tls = tls_from(args, url)
    selection = select.from_args(args)
    with read.swift_of(args) as swift:
        items = read.find_items(args, swift, selection)
        return _replay(args, url, tls, items, selection)


def _replay(args, url, tls, items, selection):
    keep = selection.keep if selection.active else None
    unreadable = []  # archives that could not be read: said at the end
    malformed = filtered = 0
    hints = tls_hints(args)
    conn = connect(url, ssl=tls, hints=hints)
    errors = broker_errors(conn)
    error = None
    sender = None
    try:
        channel = conn.channel()
        exchange = Exchange(args.exchange, type="topic", passive=True)
        if (args.exchange and
                getattr(conn.transport, "driver_type", "") == "amqp"):
            # an exchange that does not exist would drop everything
            channel.exchange_declare(args.exchange, "topic", passive=True)
        sender = _Sender(channel, exchange, args.routing_key)
        pacer = Pacer(args.rate)
        for metadata, payload in read.read_all(
                items, args.salvage, args.jobs, unreadable.append,
                shown=progress.wanted(False)):
            if keep is not None and not keep(metadata, payload):
                filtered += 1
                continue
            body = _envelope(metadata, payload)
            if body is None:
                malformed += 1
                continue
            pacer.wait(sender.outcome.sent)
            sender.send(body)
        sender.finish()
    except errors as err:
        error = broker_error(url, err, {**REPLAY_HINTS, **hints})
    except ConfirmTimeout as err:
        error = err
    finally:
        if sender is not None:  # a broker error: no answer will come
            sender.give_up()
        conn.release()
    if sender is None:
        raise error
    outcome = sender.outcome
    print("replayed to exchange %s with routing key %s: %d published, %s, "
          "%d skipped (malformed)%s" % (
              args.exchange, args.routing_key, outcome.sent,
              outcome.summary(), malformed,
              ", %d not selected by %s" % (filtered, selection.options())
              if selection.active else ""),
          flush=True)
    for line in selection.notes():
        print("shoebox-worker: %s" % line, file=sys.stderr)
    for err in unreadable:  # one line each; the others were replayed
        read.say(err, debug=getattr(args, "debug", False))
    if error is not None:
        raise error
    lost = outcome.error(args.exchange, args.routing_key)
    if lost is not None:
        raise lost
    return EXIT_FAILURE if unreadable else EXIT_OK


def _envelope(metadata, payload):
    """The v2 envelope of an archived notification, or None when the
    record is not one (malformed, not UTF-8 JSON)."""
    if "malformed" in metadata:
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not read.is_json(payload):
        return None
    return envelope.wrap(text)


# -- generate ---------------------------------------------------------------

#: What ``generate`` says to check when the broker refuses for good.
GENERATE_HINTS = {
    broker.NOT_FOUND: "check --exchange and the vhost in --url (generate "
                      "declares any exchange but a reserved amq.* one, which "
                      "must exist)",
    broker.PRECONDITION_FAILED: "the exchange (or --queue) exists with other "
                                "settings: match them (--durable) or use "
                                "another name",
}


def cmd_generate(args):
    """Publish synthetic nova notifications."""
    if args.count < 0:
        raise UsageError("--count must be >= 0, got %d" % args.count)
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be > 0, got %g" % args.rate)
    url = url_from(args, os.environ)
    tls = tls_from(args, url)
    hints = tls_hints(args)
    # fail fast with one line when it is down
    conn = connect(url, ssl=tls, hints=hints)
    conn.release()
    bar = progress.bar(args.count)
    try:
        outcome = publish(
            url, args.count, exchange=args.exchange,
            routing_key=args.routing_key, durable=args.durable,
            rate=args.rate, seed=args.seed, start=args.start,
            declare_queue=args.queue, ssl=tls,
            progress=None if bar.disable else lambda n: bar.update(1))
    except broker_errors() as err:
        raise broker_error(url, err, {**GENERATE_HINTS, **hints}) from None
    finally:
        bar.close()
    print("published %d notification%s to exchange %s with routing key %s "
          "on %s: %s" % (outcome.sent, "" if outcome.sent == 1 else "s",
                         args.exchange, args.routing_key,
                         broker_url.redact(url), outcome.summary()),
          flush=True)
    lost = outcome.error(args.exchange, args.routing_key,
                         "bind a queue (or pass --queue NAME), or check "
                         "--routing-key")
    if lost is not None:
        raise lost
    return EXIT_OK
