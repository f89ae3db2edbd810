"""Connecting, declaring, and reading from the broker.

:func:`make_connection` and :func:`make_queues` turn ``[broker]`` and the
``[consumer:QUEUE]`` sections into kombu objects. :func:`declare` runs
once at start, before consuming: it connects (retrying as configured),
declares every queue whose section says ``declare = true`` and checks that
every other one exists. What the broker refuses there is one
:class:`~shoebox_worker.exceptions.ConfigError` line naming the option to
change: oslo.messaging declares its exchanges and queues non-durable
unless ``amqp_durable_queues`` is set, and RabbitMQ refuses
(``PRECONDITION_FAILED``) a declaration that differs from the existing
one, naming the argument that differs; RabbitMQ 4.3 refuses
(``INTERNAL_ERROR``, closing the connection) a queue that is neither
durable nor exclusive (:data:`DEPRECATED`).

Once consuming, :class:`Reconnecting` leaves reconnecting to kombu and
only changes how failures are told: an :class:`Outage` logs the first
failure with its reason, then one line a minute at most with a count and a
duration, never a traceback per retry. Errors that retrying cannot fix
(the login or the vhost refused, a queue that is gone) are said to be so at
once and retried with backoff (at most every :data:`RETRY_MAX` seconds),
so that fixing them heals the worker without a restart.

:class:`QueueDepths` reads how many messages wait in the consumed (and
watched) queues, for the ``shoebox_queue_messages`` metric.

:func:`is_amqp` tells py-amqp (one frame acks a whole batch) from kombu's
virtual transports (memory, redis: one ack per message), and
:class:`BlockingReads` is the AMQP-only read loop the worker uses for
throughput.
"""

import logging
import re
import signal
import socket
import ssl
import struct
import threading
import time
from contextlib import contextmanager

import kombu
import kombu.exceptions
from kombu import mixins
from kombu.utils.objects import cached_property

from shoebox_worker import broker_url
from shoebox_worker import exceptions
from shoebox_worker.consume import notify
from shoebox_worker.consume import rabbitmq

__all__ = ["make_connection", "make_queues", "declare", "is_amqp",
           "ssl_argument", "Connection", "BrokerError", "StopRequested",
           "Outage", "permanent_advice", "tls_refusal", "deprecated_feature",
           "QueueDepths", "BlockingReads", "Reconnecting", "refusal"]

LOG = logging.getLogger(__name__)

#: AMQP reply codes.
ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406
NOT_ALLOWED = 530
INTERNAL_ERROR = 541

#: Backoff between attempts after an error that retrying cannot fix:
#: ``RETRY_STEP`` seconds more each time, at most ``RETRY_MAX`` (kombu's
#: defaults for connection retries).
RETRY_STEP = 2.0
RETRY_MAX = 30.0

#: Broker errors that retrying does not fix, by AMQP reply code, and what
#: to do about them.
PERMANENT = {
    ACCESS_REFUSED: "check the user and password in [broker] url and the "
                    "user's permissions on the vhost",
    NOT_FOUND: "declare it on the broker, or set declare = true in its "
               "[consumer:QUEUE] section",
    PRECONDITION_FAILED: "make the [consumer:QUEUE] options match what the "
                         "broker has, or set declare = false",
    NOT_ALLOWED: "check the vhost in [broker] url, and that the user may "
                 "use it",
}

#: RabbitMQ 4's deprecated features a declaration of ours can use, the
#: ``[consumer:QUEUE]`` option to change and how (see
#: :mod:`~shoebox_worker.consume.rabbitmq`, where what differs between
#: versions is kept).
DEPRECATED = rabbitmq.DEPRECATED
#: for a deprecated feature not listed there
_DEPRECATED_ADVICE = ("stop using the feature the broker names, or permit it "
                      "on the broker (deprecated_features.permit)")
_DEPRECATED_FEATURE = re.compile(r"Feature `(?P<feature>[^`]+)` is deprecated")
#: A stream (or quorum queue) consumed on a cluster node that holds no
#: replica of it yet (a node just restarted): the replica comes, or the
#: next connection is to another node; not the config's fault.
_NO_LOCAL_REPLICA = "does not have a replica on the local node"

#: TLS failures that retrying does not fix, by OpenSSL's reason: the
#: ``[broker]`` option to look at, and what to do. The broker's
#: certificate not trusted (or not for that host name), the broker
#: refusing ours (TLS 1.3 tells it as an alert at the first read), or a
#: port that does not speak TLS.
TLS_PERMANENT = {
    "CERTIFICATE_VERIFY_FAILED": (
        "ssl_ca_file", "the broker's certificate is not trusted: set "
                       "[broker] ssl_ca_file to the CA that signed it, and "
                       "use the host name it was made for"),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "ssl_cert_file", "the broker refused the client certificate (its "
                         "CA is not one the broker trusts): check [broker] "
                         "ssl_cert_file and the broker's cacertfile"),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "ssl_cert_file", "the broker refused the client certificate: check "
                         "[broker] ssl_cert_file and ssl_key_file"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        "ssl_cert_file", "the broker refused the client certificate as "
                         "expired: renew [broker] ssl_cert_file"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "ssl_cert_file", "the broker requires a client certificate: set "
                         "[broker] ssl_cert_file and ssl_key_file"),
    "WRONG_VERSION_NUMBER": (
        "url", "the broker's port does not speak TLS: use its TLS port "
               "(5671 by default) in [broker] url"),
}

#: A TLS connection the broker closed without a word during or right
#: after the handshake: over TLS 1.3 the handshake ends on the client's
#: side before the broker checks the client certificate, and RabbitMQ
#: 3.10 (Erlang 25) then closes a connection whose certificate it refuses
#: without an alert (``SSLEOFError`` at the first write).
TLS_CLOSED = (
    "ssl_cert_file", "the broker closed the TLS connection during the "
                     "handshake, as it does when it refuses the client "
                     "certificate: check [broker] ssl_cert_file (its CA "
                     "must be one the broker trusts) and ssl_key_file, or "
                     "whether the broker requires one")

W_FAILED = "broker %s: %s; %s"
W_PERMANENT = ("broker %s: %s; this will not heal by retrying: %s "
               "(retrying in %.0f s, then with backoff up to every %.0f s, "
               "so that a fix heals the worker)")
W_STILL = "broker %s still failing after %d attempts, %s: %s"
I_BACK = "broker %s back after %d failed attempt(s), %s"
W_QUEUE_NAME_KEY = (
    "[consumer:%s] routing_key is not set, so the queue is bound with its "
    "own name %r as routing key (right for a service's default queue such "
    "as notifications.info; the archiver's own queue needs e.g. "
    "routing_key = notifications.*, versioned_notifications.*): set "
    "routing_key to say which")
I_BOUND = "[consumer:%s] queue %s bound to exchange(s) %s with %s"

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']*)' for (?P<kind>queue|exchange) "
    r"'(?P<name>.*?)' in vhost '(?P<vhost>.*?)': received (?P<received>.*)"
    r" but current is (?P<current>.*)\Z")


class BrokerError(exceptions.ShoeboxError):
    """The broker cannot be reached, or refused what the worker asked."""


class StopRequested(exceptions.ShoeboxError):
    """Raised inside kombu's connection retries once we are told to
    stop."""


class Connection(kombu.Connection):
    """kombu's Connection, checking each failover host's TLS certificate
    against that host's name.

    py-amqp takes the host name to check from the ``ssl`` dict's
    ``server_hostname``; kombu fills in a None one with the host it
    connects to, but in the dict itself, which every later connection
    (another failover URL, a clone) shares: the second host would be
    checked against the first one's name. Each attempt here starts from
    a copy with None again.
    """

    def _establish_connection(self):
        if isinstance(self.ssl, dict) and "server_hostname" in self.ssl:
            self.ssl = dict(self.ssl, server_hostname=None)
        return super()._establish_connection()

    def as_uri(self, include_password=False, mask=broker_url.MASK,
               **kwargs):
        """kombu's, with the one mask of every secret (kombu's own is
        ``**``)."""
        return super().as_uri(include_password, mask, **kwargs)


def ssl_argument(broker):
    """What ``kombu.Connection(ssl=...)`` takes for ``[broker]``: False
    without TLS, else py-amqp's TLS options (the broker's certificate
    required and checked against the host name of the URL in use, with
    ``ssl_ca_file`` or the system's CAs; the client certificate if set).

    :param broker: a :class:`~shoebox_worker.config.BrokerConfig`.
    """
    if not broker.tls:
        return False
    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    if broker.ssl_ca_file is not None:
        options["ca_certs"] = broker.ssl_ca_file
    if broker.ssl_cert_file is not None:
        options["certfile"] = broker.ssl_cert_file
        options["keyfile"] = broker.ssl_key_file
    return options


def make_connection(broker, transport_options=None):
    """A kombu Connection from ``[broker]`` (failover URLs, heartbeat,
    TLS).

    kombu gets the URLs as :func:`~shoebox_worker.broker_url.
    kombu_hostname` encodes them, so that any character in a password
    reaches the broker as written.

    :param transport_options: more of py-amqp's (``confirm_publish``).
    """
    options = dict(transport_options or {})
    if broker.connect_max_retries is not None:
        options["max_retries"] = broker.connect_max_retries
    return Connection(
        broker_url.kombu_hostname(broker.urls),
        heartbeat=broker.heartbeat or None,
        connect_timeout=broker.connect_timeout,
        failover_strategy=broker.failover_strategy,
        ssl=ssl_argument(broker),
        transport_options=options or None,
    )


def make_queues(consumers):
    """kombu Queues from the ``[consumer:QUEUE]`` sections: each bound with
    every ``(exchange, routing key)`` pair of its section
    (:attr:`~shoebox_worker.config.ConsumerConfig.bindings`).

    Declaring a queue declares its exchanges too (unless
    ``declare = false``), as oslo.messaging's listeners do: an exchange
    that no service has declared yet (a service not deployed, or not
    started yet) is created with the section's ``exchange_type`` and
    ``exchange_durable``, and the service publishes to it when it comes.
    """
    queues = []
    for c in consumers:
        exchanges = {name: kombu.Exchange(name, type=c.exchange_type,
                                          durable=c.exchange_durable,
                                          no_declare=not c.declare)
                     for name in c.exchange}
        queues.append(kombu.Queue(
            c.queue, bindings=[
                kombu.binding(exchanges[name], routing_key=key)
                for name, key in c.bindings],
            durable=c.durable, auto_delete=c.auto_delete,
            queue_arguments=dict(c.queue_arguments) or None,
            no_declare=not c.declare))
    return queues


def reason(exc):
    """One line for a broker error: the broker's reply, or the OS error
    (OpenSSL's words for a TLS one)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and \
            exc.verify_message:
        return "TLS: certificate verify failed: %s" % exc.verify_message
    if isinstance(exc, ssl.SSLEOFError):
        return "TLS: the broker closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return "TLS: %s" % exc.reason.lower().replace("_", " ")
    text = getattr(exc, "reply_text", None) or str(exc)
    text = " ".join(text.split()).rstrip(". ")
    return text or type(exc).__name__


def reply_code(exc):
    """The AMQP reply code of a broker error (an int), or None. kombu's
    virtual transports (redis, memory) give it as a string."""
    try:
        return int(getattr(exc, "reply_code", None))
    except (TypeError, ValueError):
        return None


def tls_refusal(exc):
    """``(option, advice)`` for a TLS failure that retrying does not fix
    (:data:`TLS_PERMANENT`, :data:`TLS_CLOSED`), or None."""
    if isinstance(exc, ssl.SSLEOFError):
        return TLS_CLOSED
    if isinstance(exc, ssl.SSLError):
        return TLS_PERMANENT.get(exc.reason)
    return None


def permanent_advice(exc):
    """What to do about an error that retrying cannot fix, or None when
    ``exc`` may heal by itself (a refused or lost connection)."""
    refusal = tls_refusal(exc)
    if refusal is not None:
        return refusal[1]
    feature = deprecated_feature(exc)
    if feature is not None:
        return DEPRECATED.get(feature, (None, _DEPRECATED_ADVICE))[1]
    if _NO_LOCAL_REPLICA in reason(exc):
        return None
    return PERMANENT.get(reply_code(exc))


def deprecated_feature(exc):
    """The name of the deprecated feature a RabbitMQ 4 broker refused
    (:data:`DEPRECATED`), or None."""
    if reply_code(exc) != INTERNAL_ERROR:
        return None
    match = _DEPRECATED_FEATURE.search(reason(exc))
    return match.group("feature") if match else None


class Outage:
    """A run of broker failures, told once and then at a bounded rate.

    :meth:`failed` is called on every failed attempt; the first one is
    logged with its reason, an error that retrying cannot fix is logged at
    once (as such), and the rest at most once per :attr:`report_interval`
    with a count and a duration. :meth:`recovered` ends the run.

    :param clock: monotonic seconds (injected by tests).
    :param listeners: callables told ``("broker_failed", kind, None)`` on
        each failure, ``kind`` being ``"permanent"`` or ``"transient"``
        (as :attr:`Stats.listeners
        <shoebox_worker.consume.stats.Stats.listeners>` are).
    """

    #: Longest silence while failures go on.
    report_interval = 60.0

    def __init__(self, clock=time.monotonic, listeners=()):
        self._clock = clock
        self.listeners = listeners
        #: failed attempts since the last success, and since when
        self.attempts = 0
        self.since = None
        #: whether the last failure was one retrying cannot fix
        self.permanent = False
        self._next_report = 0.0

    def failed(self, where, exc, retry_in):
        """Count one failed attempt and log it if it is due.

        :param where: the broker URL, passwords masked.
        :param exc: the error.
        :param retry_in: seconds until the next attempt (0: at once).
        """
        now = self._clock()
        advice = permanent_advice(exc)
        first = self.since is None
        if first:
            self.since = now
        self.attempts += 1
        newly_permanent = advice is not None and not self.permanent
        self.permanent = advice is not None
        for listener in self.listeners:
            listener("broker_failed",
                     "permanent" if advice else "transient", None)
        then = "retrying in %.0f s" % retry_in if retry_in else \
            "reconnecting"
        if newly_permanent:
            LOG.error(W_PERMANENT, where, reason(exc), advice, retry_in,
                      RETRY_MAX)
        elif first:
            LOG.warning(W_FAILED, where, reason(exc), then)
        elif now >= self._next_report:
            LOG.warning(W_STILL, where, self.attempts,
                        exceptions.duration(now - self.since), reason(exc))
        else:
            LOG.debug(W_FAILED, where, reason(exc), then)
            return
        self._next_report = now + self.report_interval

    def recovered(self, where):
        """The broker works again: log how long it did not, if it did not.

        :returns: True when this ended a run of failures.
        """
        if self.since is None:
            return False
        LOG.info(I_BACK, where, self.attempts,
                 exceptions.duration(self._clock() - self.since))
        self.attempts, self.since, self.permanent = 0, None, False
        return True

    def gave_up(self, where, exc, retries):
        """The error to raise once ``connect_max_retries`` ran out."""
        attempts = self.attempts
        duration = exceptions.duration(self._clock() - self.since) \
            if self.since is not None else "0 s"
        return BrokerError(
            "cannot connect to the broker %s: %s (gave up after %d failed "
            "attempt(s), %s, as [broker] connect_max_retries = %s says); "
            "check that it runs and that [broker] url points to it"
            % (where, reason(exc), attempts + 1, duration, retries))


def declare(worker):
    """Connect (retrying as configured), declare every queue that is ours
    to declare, and check that the others exist.

    :raises ConfigError: the broker refused the login, the vhost or a
        declaration (an existing exchange or queue has other flags), or a
        ``declare = false`` queue does not exist.
    :raises BrokerError: the broker cannot be reached within
        ``connect_max_retries``, refused something else, or TLS failed in
        a way that retrying does not fix (:func:`tls_refusal`: at once,
        whatever ``connect_max_retries`` says).
    """
    conn = worker.connection
    where = conn.as_uri()

    def on_error(exc, interval):
        # kombu retries every OSError, TLS ones too: not those. The host
        # is named here: kombu moves to the next failover URL after this.
        if tls_refusal(exc) is not None:
            raise _TLSRefused(exc, conn.as_uri())
        worker.on_connection_error(exc, interval)

    try:
        conn.ensure_connection(on_error, worker.connect_max_retries,
                               callback=worker.check_stop)
    except _TLSRefused as refused:
        raise _tls_failed(worker, *refused.args) from None
    except kombu.exceptions.OperationalError as exc:
        if tls_refusal(exc.__cause__) is not None:  # the last attempt's
            raise _tls_failed(worker, exc.__cause__,
                              conn.as_uri()) from None
        raise worker.outage.gave_up(
            where, exc.__cause__ or exc,
            worker.connect_max_retries) from None
    except conn.connection_errors + conn.channel_errors as exc:
        if permanent_advice(exc) is None:
            raise BrokerError("cannot connect to the broker %s: %s"
                              % (where, reason(exc))) from None
        raise exceptions.ConfigError(
            "the broker %s refused the connection: %s: %s" % (
                where, reason(exc), PERMANENT[ACCESS_REFUSED]),
            filename=worker.config.filename, section="broker",
            key="url") from None
    try:
        _declare_all(worker, conn)
    finally:
        # the consumer works on a clone of this connection: don't keep an
        # idle second one open for the broker to time out
        conn.release()


class _TLSRefused(Exception):
    """Ends kombu's connection retries on a TLS failure that retrying does
    not fix (carries it, and the URL of the host that failed)."""


def _tls_failed(worker, exc, url):
    """The one line for a TLS failure at start, naming the file, the
    option to look at and the URL (password masked) of the host that
    failed: a :class:`BrokerError` (exit 1, and a supervisor does not
    restart its child), as the fix may be on the broker's side as well as
    in the config."""
    option, advice = tls_refusal(exc)
    return BrokerError(
        "%s [broker] %s: TLS to the broker %s failed: %s; this will not "
        "heal by retrying: %s" % (worker.config.filename, option, url,
                                  reason(exc), advice))


def _declare_all(worker, conn):
    for queue, consumer in zip(worker.queues, worker.config.consumers,
                               strict=True):
        if consumer.declare and consumer.routing_key is None:
            LOG.warning(W_QUEUE_NAME_KEY, consumer.queue, consumer.queue)
        channel = conn.channel()
        try:
            if consumer.declare:
                queue(channel).declare()
                LOG.info(I_BOUND, consumer.queue, consumer.queue,
                         ", ".join(consumer.exchange),
                         ", ".join(consumer.routing_keys))
            else:
                channel.queue_declare(queue=queue.name, passive=True)
        except conn.channel_errors as exc:
            raise refusal(worker.config.filename, consumer, exc) from None
        except conn.connection_errors as exc:
            if deprecated_feature(exc) is None:
                raise
            raise refusal(worker.config.filename, consumer, exc) from None
        finally:
            try:
                channel.close()
            except Exception:  # closed by the broker after the error
                pass


def refusal(filename, consumer, exc):
    """The one line for a declaration (or check) the broker refused (at a
    worker's start, and in ``check-config --connect``)."""
    section = "consumer:%s" % consumer.queue
    code = reply_code(exc)
    text = reason(exc)
    if code == NOT_FOUND and not consumer.declare:
        return exceptions.ConfigError(
            "no queue %r on the broker (%s): with declare = false the "
            "worker only reads a queue that exists; have the services "
            "declare it first, or set declare = true" % (consumer.queue,
                                                         text),
            filename=filename, section=section, key="declare")
    if code == PRECONDITION_FAILED:
        return _mismatch(filename, section, text)
    feature = deprecated_feature(exc)
    if feature is not None:
        option, advice = DEPRECATED.get(feature, (None, _DEPRECATED_ADVICE))
        return exceptions.ConfigError(
            "the broker refused the declaration: %s; %s" % (text, advice),
            filename=filename, section=section, key=option)
    if code == ACCESS_REFUSED:
        return exceptions.ConfigError(
            "the broker refused: %s; give the user configure permission "
            "on it, or set declare = false" % text
            if consumer.declare else "the broker refused: %s; give the "
            "user read permission on the queue" % text,
            filename=filename, section=section)
    return BrokerError("[%s] the broker refused: %s" % (section, text))


def _mismatch(filename, section, text):
    """``PRECONDITION_FAILED``: name the option that differs and the value
    the broker has."""
    match = _INEQUIVALENT.search(text)
    option = None
    if match:
        arg, kind = match.group("arg"), match.group("kind")
        if kind == "exchange":
            option = {"durable": "exchange_durable",
                      "type": "exchange_type"}.get(arg)
        elif arg in ("durable", "auto_delete"):
            option = arg
        elif arg.startswith("x-"):
            option = "queue_arguments"
    if option is None:
        return exceptions.ConfigError(
            "the broker refused the declaration: %s; set durable, "
            "exchange_durable, auto_delete and queue_arguments to what the "
            "services declared, or declare = false" % text,
            filename=filename, section=section)
    arg = match.group("arg")
    broker_value = _quoted(match.group("current"))
    ours = _quoted(match.group("received"))
    has = "without %s" % arg if broker_value is None else \
        "with %s = %s" % (arg, broker_value)
    ours = "no %s" % arg if ours is None else "%s = %s" % (arg, ours)
    if option == "queue_arguments":
        fix = "set queue_arguments to match"
    else:
        fix = "set %s = %s" % (option, broker_value)
    hint = ""
    if arg == "durable":
        hint = (" (oslo.messaging declares non-durable unless "
                "amqp_durable_queues = true)")
    return exceptions.ConfigError(
        "%s %r exists on the broker %s, this config says %s%s: %s, or "
        "declare = false to use it as it is"
        % (match.group("kind"), match.group("name"), has, ours, hint, fix),
        filename=filename, section=section, key=option)


def _quoted(text):
    """``'true'`` or ``the value 'quorum' of type 'longstr'``: the value;
    ``none``: None."""
    quoted = re.search(r"'([^']*)'", text)
    return quoted.group(1) if quoted else None


#: Seconds between two reads of the queues' depths (a passive declare of
#: each): often enough for a lag graph, rare enough to cost nothing.
DEPTH_INTERVAL = 5.0

W_NO_QUEUE = ("cannot read the depth of queue %r (%s): no "
              "shoebox_queue_messages for it until it can be read")
I_QUEUE_BACK = "the depth of queue %r can be read again"


class QueueDepths:
    """How many messages wait in some queues, read every :attr:`interval`
    seconds with a passive ``queue.declare`` (which creates nothing and
    answers with the count of ready messages).

    :meth:`poll` must be called from the thread that owns the connection
    (py-amqp is not thread-safe): the worker calls it from
    ``on_iteration``, last, since on py-amqp the wait for each answer
    also dispatches the deliveries that arrive meanwhile. The reads use a
    channel of their own, so that the broker closing it (``NOT_FOUND``
    for a queue that does not exist) leaves the consuming channel alone;
    the next read opens another.

    A queue that does not exist (or that the broker refuses to tell
    about) has no depth: it is left out of :attr:`depths`, and said once,
    with :data:`W_NO_QUEUE`, until it can be read again. On kombu's
    virtual transports, where an empty queue may not exist (redis keeps no
    empty list), a queue the transport does not know has 0 messages.

    :param names: the queues, in order (repeats are read once).
    """

    #: Seconds between two reads.
    interval = DEPTH_INTERVAL

    def __init__(self, names):
        self.names = tuple(dict.fromkeys(names))
        #: ``{queue: messages ready}`` as of the last read, for the queues
        #: that exist.
        self.depths = {}
        self._channel = None
        self._next = 0.0
        self._missing = set()

    def reset(self):
        """The connection changed: read on a new channel, now."""
        self._channel = None
        self._next = 0.0

    def poll(self, connection, now):
        """Read the depths if they are due.

        :param connection: the kombu connection that consumes.
        :param now: monotonic seconds.
        :returns: :attr:`depths` (a new dict after each read).
        """
        if now < self._next:
            return self.depths
        self._next = now + self.interval
        depths = {}
        for name in self.names:
            count = self._read(connection, name)
            if count is not None:
                depths[name] = count
        self.depths = depths
        return depths

    def _read(self, connection, name):
        """The depth of one queue, or None when it does not exist (or the
        answer did not come in time: then the last value stays)."""
        try:
            if self._channel is None:
                self._channel = connection.channel()
            _, count, _ = self._channel.queue_declare(queue=name,
                                                      passive=True)
        except connection.channel_errors as exc:
            amqp = is_amqp(connection)
            if amqp:
                self._channel = None  # the broker closed it
            if reply_code(exc) == NOT_FOUND and not amqp:
                return 0
            if name not in self._missing:
                self._missing.add(name)
                LOG.warning(W_NO_QUEUE, name, reason(exc))
            return None
        except socket.timeout:
            # no answer within the read timeout: keep the last value
            return self.depths.get(name)
        if name in self._missing:
            self._missing.discard(name)
            LOG.info(I_QUEUE_BACK, name)
        return count


def is_amqp(connection):
    """True on py-amqp (RabbitMQ), False on kombu's virtual transports."""
    return getattr(connection.transport, "driver_type", "") == "amqp"


def _timeval(seconds):
    """``SO_RCVTIMEO``'s value for ``seconds``."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class _ReadDeadline:
    """Signals do not make a blocking read wait past its timeout.

    A signal interrupts ``recv()``; CPython runs the Python handler and
    calls ``recv()`` again, and the kernel starts ``SO_RCVTIMEO`` over. So
    signals that came more often than the timeout (SIGHUP every 0.1 s, in a
    test) kept an idle read, and the periodic work after it, waiting for as
    long as they came. While a read waits, each Python handler of the
    process is followed here by setting the receive timeout to what is left
    of the read's own (1 ms at least), and the next read has the whole
    timeout again. Handlers are wrapped from the main thread only (where
    Python runs them) and given back on leaving.
    """

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self._deadline = None
        self._shortened = False
        self._wrapped = {}  # {signum: (the original, our wrapper)}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in signal.valid_signals():
                try:
                    handler = signal.getsignal(signum)
                except (OSError, ValueError):
                    continue
                if callable(handler):
                    wrapper = self._wrap(handler)
                    signal.signal(signum, wrapper)
                    self._wrapped[signum] = (handler, wrapper)
        return self

    def __exit__(self, *exc_info):
        self._deadline = None
        for signum, (handler, wrapper) in self._wrapped.items():
            if signal.getsignal(signum) is wrapper:
                signal.signal(signum, handler)
        self._wrapped.clear()

    def _wrap(self, handler):
        def wrapper(signum, frame):
            try:
                handler(signum, frame)
            finally:
                self._keep_deadline()
        return wrapper

    def _keep_deadline(self):
        if self._deadline is None:
            return
        left = max(0.001, self._deadline - time.monotonic())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             _timeval(left))
        self._shortened = True

    def reading(self):
        """A read starts: it may wait the whole timeout."""
        if self._shortened:
            self._shortened = False
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 _timeval(self.timeout))
        self._deadline = time.monotonic() + self.timeout

    def done(self):
        """The read ended: a signal now changes nothing."""
        self._deadline = None


class BlockingReads(mixins.ConsumerMixin):
    """kombu's consume loop, reading AMQP without a Python-level timeout.

    ``ConsumerMixin.consume`` drains with ``timeout=safety_interval``, so
    CPython polls before every ``recv()`` (py-amqp makes about nine per
    message) and py-amqp sets and resets the socket timeout on every call.
    Here the socket stays blocking with a kernel receive timeout
    (``SO_RCVTIMEO`` of :attr:`receive_timeout` seconds), which py-amqp
    turns into the same ``socket.timeout`` when no frame starts in time, so
    ``on_iteration``, heartbeats and the stop flag still run while the queue
    is idle. Other transports, and TLS connections, use kombu's loop
    unchanged.

    Measured on the project's 2-core VM, 2026-11-29, as the worker's CPU
    time to drain 30,000 prefilled notifications (``bench/worker.py``'s
    prefill and config, ``shoebox-worker run --idle-exit 1``, user + system
    time of the process; three runs each, interleaved): 60-66 us a message
    with this loop, 72-77 us with kombu's (about a fifth more). Wall-clock
    rates from ``bench/worker.py`` were too noisy that day (other builds
    shared the two cores) to tell the two apart.
    """

    #: Longest a blocking read waits before ``on_iteration`` runs again.
    receive_timeout = 0.5

    def consume(self, limit=None, timeout=None, safety_interval=1,
                **kwargs):
        if not is_amqp(self.connection) or self.connection.ssl:
            # a kernel receive timeout does not end a blocking read of
            # Python's TLS sockets (OpenSSL retries it): kombu's loop
            yield from super().consume(limit, timeout, safety_interval,
                                       **kwargs)
            return
        with self.consumer_context(**kwargs) as (conn, channel, consumers):
            sock = conn.connection.sock
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            _timeval(self.receive_timeout))
            with _ReadDeadline(sock, self.receive_timeout) as read:
                while not self.should_stop:
                    self.on_iteration()
                    read.reading()
                    try:
                        conn.drain_events(timeout=None)
                    except socket.timeout:
                        conn.heartbeat_check()
                        continue
                    except OSError:
                        if not self.should_stop:
                            raise
                        continue
                    finally:
                        read.done()
                    yield


class Reconnecting(BlockingReads):
    """The read loop, with broker failures told once and a way out.

    kombu's ``run()`` reconnects: when :meth:`consume` ends, it starts it
    again (at most once a second), and ``ensure_connection`` retries the
    connection with backoff, calling :meth:`on_connection_error` on each
    failure. This class only changes what is said: a failure that ends
    :meth:`consume` goes to the :attr:`outage` instead of kombu's
    traceback, and an error that retrying cannot fix waits
    longer each time (:attr:`retry_step` more, at most :attr:`retry_max`
    seconds) before the next attempt. A stop
    request (:attr:`should_stop`) ends the waits; once
    ``connect_max_retries`` ran out, :class:`BrokerError` ends the run.
    """

    #: After an error that retrying cannot fix, wait this many seconds
    #: more each attempt before the next one...
    retry_step = RETRY_STEP
    #: ...and at most this many.
    retry_max = RETRY_MAX
    #: The broker's connect_max_retries (None: retry for ever).
    connect_max_retries = None
    #: The service manager's :class:`~shoebox_worker.consume.notify.
    #: Notifier`: pinged while retrying too, so that a broker outage is
    #: not taken for a hung worker.
    notifier = notify.DISABLED

    @cached_property
    def outage(self):
        """The :class:`Outage` that tells this consumer's failures."""
        return Outage()

    def run(self, _tokens=1, **kwargs):
        """Consume until stopped (kombu reconnects on broker loss)."""
        try:
            super().run(_tokens, **kwargs)
        except StopRequested:
            LOG.info("stopped while waiting for the broker")

    def check_stop(self):
        """Called by kombu every second while it retries a connection."""
        self.notifier.watchdog()
        if self.should_stop:
            raise StopRequested()

    @contextmanager
    def establish_connection(self):
        # kombu's, plus a way out of the retry loop on SIGTERM
        with self.create_connection() as conn:
            conn.ensure_connection(self.on_connection_error,
                                   self.connect_max_retries,
                                   callback=self.check_stop)
            yield conn

    def on_connection_error(self, exc, interval):
        self.outage.failed(self.connection.as_uri(), exc, interval)

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        self.outage.recovered(connection.as_uri())

    def consume(self, limit=None, timeout=None, safety_interval=1,
                **kwargs):
        errors = self.connection.connection_errors + \
            self.connection.channel_errors
        try:
            yield from super().consume(limit, timeout, safety_interval,
                                       **kwargs)
        except kombu.exceptions.OperationalError as exc:
            raise self.outage.gave_up(
                self.connection.as_uri(), exc.__cause__ or exc,
                self.connect_max_retries) from None
        except errors as exc:
            if self.should_stop:
                return
            if permanent_advice(exc) is None:
                # kombu's run() reconnects (ensure_connection retries)
                self.outage.failed(self.connection.as_uri(), exc, 0)
                return
            interval = min(self.retry_step * (self.outage.attempts + 1),
                           self.retry_max)
            self.outage.failed(self.connection.as_uri(), exc, interval)
            self._wait(interval)

    def _wait(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.should_stop:
            self.notifier.watchdog()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))
