"""Publishing to a broker: ``replay``, ``generate`` and :func:`publish`.

Both send notifications as oslo.messaging's notifier does: in the v2
envelope (:func:`shoebox_worker.consume.envelope.wrap`), JSON, UTF-8,
persistent, with publisher confirms, so a refusal is counted and never
silent. ``replay`` republishes archived notifications (read with
:mod:`shoebox_worker.tools.read`); ``generate`` publishes the simulator's
(:mod:`shoebox_worker.tools.simulator`). A broker that is down or refuses
is one :class:`~shoebox_worker.tools.ToolError` line within a few seconds
(:func:`connect`). :class:`Pacer` holds either to ``--rate``.
"""

import logging
import sys
import time
from collections.abc import Callable

import amqp.exceptions
import kombu.exceptions
from kombu import Connection
from kombu import Exchange
from kombu import Producer
from kombu import Queue

from shoebox_worker import config
from shoebox_worker.consume import envelope
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import read
from shoebox_worker.tools import simulator

__all__ = [
    "Pacer",
    "broker_error",
    "broker_errors",
    "cmd_generate",
    "cmd_replay",
    "connect",
    "publish",
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
    errors = (OSError, kombu.exceptions.KombuError, amqp.exceptions.AMQPError,
              amqp.exceptions.MessageNacked)
    if conn is not None:
        errors += tuple(conn.connection_errors) + tuple(conn.channel_errors)
    return errors


def broker_error(url, err):
    """A one-line :class:`ToolError` for a broker failure, password
    redacted."""
    text = " ".join(str(err).split()) or type(err).__name__
    return ToolError("broker %s: %s" % (config.redact_url(url), text))


def _progress(total=None, unit="msg"):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def connect(url):
    """A connected kombu Connection with publisher confirms, or a
    ToolError within a few seconds."""
    conn = Connection(url, connect_timeout=BROKER_CONNECT_TIMEOUT,
                      transport_options={"confirm_publish": True})
    try:
        conn.ensure_connection(
            max_retries=BROKER_CONNECT_RETRIES * max(1, url.count(";") + 1),
            interval_start=0.5, interval_step=0.5, interval_max=1.0)
    except broker_errors(conn) as err:
        conn.release()
        raise broker_error(url, err) from None
    return conn


class _Returned:
    """Collects basic.return (mandatory message that no queue took)."""

    def __init__(self):
        self.error = None

    def __call__(self, exc, exchange, routing_key, message):
        self.error = exc


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
            declare_queue: str | None = None, confirm: bool = True,
            progress: Callable[[int], object] | None = None) -> int:
    """Publish ``count`` synthetic notifications in the v2 envelope.

    Sends as oslo.messaging's notifier does: to a ``topic`` exchange
    (non-durable by default, like oslo.messaging's default), JSON, UTF-8,
    persistent delivery mode.

    :param url: kombu broker URL, e.g. ``amqp://guest:guest@localhost//``.
    :param count: how many to publish.
    :param exchange: exchange name (declared once, before publishing).
    :param routing_key: routing key, ``<topic>.<priority>``.
    :param exchange_type: exchange type.
    :param durable: durability of the exchange (and of ``declare_queue``);
        it must match an existing declaration or the broker refuses it.
    :param rate: at most this many messages a second; None for as fast as
        the broker takes them.
    :param seed: seed for
        :func:`~shoebox_worker.tools.simulator.notifications`.
    :param declare_queue: name of a queue to declare and bind to the
        exchange with ``routing_key`` before publishing, so that nothing is
        dropped when no consumer has declared it yet.
    :param confirm: use publisher confirms: each publish waits for the
        broker's ack and a refusal raises.
    :param progress: optional callable, called with the number sent so far
        after each message.
    :returns: the number of messages published.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate!r}")
    transport_options = {"confirm_publish": True} if confirm else {}
    sent = 0
    with Connection(url, transport_options=transport_options) as conn:
        conn.connect()
        channel = conn.channel()
        target = Exchange(exchange, type=exchange_type, durable=durable,
                          auto_delete=False)
        target(channel).declare()
        if declare_queue:
            Queue(declare_queue, exchange=target, routing_key=routing_key,
                  durable=durable, auto_delete=False)(channel).declare()
        producer = Producer(channel, exchange=target, auto_declare=False)
        LOG.info("publishing %d notifications to exchange %s (%s) with "
                 "routing key %s on %s%s", count, exchange, exchange_type,
                 routing_key, conn.as_uri(),
                 " with confirms" if confirm else "")
        pacer = Pacer(rate)
        started = pacer.start
        publish_one = producer.publish
        for notification in simulator.notifications(count, seed=seed):
            pacer.wait(sent)
            publish_one(envelope.wrap(notification), routing_key=routing_key,
                        content_type="application/json",
                        content_encoding="utf-8", delivery_mode=2,
                        declare=[], retry=False)
            sent += 1
            if progress is not None:
                progress(sent)
        elapsed = time.monotonic() - started
        LOG.info("published %d notifications in %.2fs (%.0f msg/s)", sent,
                 elapsed, sent / elapsed if elapsed > 0 else 0.0)
    return sent


# -- replay -----------------------------------------------------------------

def cmd_replay(args):
    """Republish archived notifications in the oslo.messaging v2 envelope."""
    if args.rate is not None and args.rate <= 0:
        raise ToolError("--rate must be > 0, got %g" % args.rate)
    read.quiet_reader_logs()
    conf = config.load(args.config)
    files = read.find_archives(args.paths)
    match = read.matcher(args.match)
    url = conf.broker.url
    total = None
    if sys.stderr.isatty():  # the bar needs a total: count first
        total = sum(1 for path in files
                    for _ in read.read_records(path, args.salvage))
    published = failed = malformed = filtered = unroutable = 0
    conn = connect(url)
    errors = broker_errors(conn)
    error = None
    started = False
    bar = _progress(total)
    try:
        channel = conn.channel()
        exchange = Exchange(args.exchange, type="topic", passive=True)
        if getattr(conn.transport, "driver_type", "") == "amqp":
            # an exchange that does not exist would drop everything
            exchange(channel).declare()
        returned = _Returned()
        producer = Producer(channel, exchange=exchange, auto_declare=False,
                            on_return=returned)
        started = True
        pacer = Pacer(args.rate)
        attempts = 0
        for path in files:
            for metadata, payload in read.read_records(path, args.salvage):
                bar.update(1)
                if match is not None and not match(metadata):
                    filtered += 1
                    continue
                body = _envelope(metadata, payload)
                if body is None:
                    malformed += 1
                    continue
                pacer.wait(attempts)
                attempts += 1
                returned.error = None
                try:
                    producer.publish(
                        body, routing_key=args.routing_key,
                        content_type="application/json",
                        content_encoding="utf-8", delivery_mode=2,
                        mandatory=True, declare=[], retry=False)
                except errors as err:
                    failed += 1
                    if _is_nack(err):
                        continue
                    raise
                if returned.error is not None:
                    failed += 1
                    unroutable += 1
                    continue
                published += 1
    except errors as err:
        error = broker_error(url, err)
    except ToolError as err:  # a damaged or unreadable archive
        error = err
    finally:
        bar.close()
        conn.release()
    if not started:
        raise error
    print("replayed to exchange %s with routing key %s: %d published, %d "
          "failed, %d skipped (malformed)%s" % (
              args.exchange, args.routing_key, published, failed, malformed,
              ", %d not matching --match" % filtered if args.match else ""),
          flush=True)
    if error is not None:
        raise error
    if unroutable:
        raise ToolError("%d message%s returned unroutable: no queue is bound "
                        "to exchange %s with routing key %s" % (
                            unroutable, "s were" if unroutable > 1 else
                            " was", args.exchange, args.routing_key))
    return EXIT_FAILURE if failed else EXIT_OK


def _is_nack(err):
    return isinstance(err, amqp.exceptions.MessageNacked)


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

def cmd_generate(args):
    """Publish synthetic nova notifications."""
    if args.count < 0:
        raise ToolError("--count must be >= 0, got %d" % args.count)
    if args.rate is not None and args.rate <= 0:
        raise ToolError("--rate must be > 0, got %g" % args.rate)
    conn = connect(args.url)  # fail fast with one line when it is down
    conn.release()
    bar = _progress(args.count)
    try:
        sent = publish(
            args.url, args.count, exchange=args.exchange,
            routing_key=args.routing_key, durable=args.durable,
            rate=args.rate, seed=args.seed, declare_queue=args.queue,
            progress=None if bar.disable else lambda n: bar.update(1))
    except broker_errors() as err:
        raise broker_error(args.url, err) from None
    finally:
        bar.close()
    print("published %d notification%s to exchange %s with routing key %s "
          "on %s" % (sent, "" if sent == 1 else "s", args.exchange,
                     args.routing_key, config.redact_url(args.url)),
          flush=True)
    return EXIT_OK
