"""``check-config --connect``: try, before deploying, what a run will need.

``check-config`` alone reads the config, builds its plugins and proves
that the working directory takes a file, without connecting. With
``--connect`` it also tries every outside thing a run depends on, with the
config's own credentials, and prints one line per check::

    working directory /var/lib/shoebox-worker/var/archive: OK: ...
    broker amqp://shoebox:***@rabbit1:5672// (URL 1 of 2): OK: logged
        in as shoebox (RabbitMQ 3.13.7)
    broker amqp://shoebox:***@rabbit2:5672// (URL 2 of 2): FAILED:
        [Errno 111] Connection refused
    queue shoebox-archiver: OK: exists, and the broker takes its
        declaration
    callback swift: OK: authenticated at ...; container shoebox exists

(each on one line).

- **each broker URL** (each failover URL, each host of a transport_url):
  a login, as the worker connects (TLS included), once, without retrying;
- **each ``[consumer:QUEUE]``**, on the first broker that let it in: a
  queue that exists must take the config's declaration (RabbitMQ refuses
  one with other flags or arguments, as it would at start), and so must
  every exchange it is bound to that exists; what does not exist yet is
  said, not created (a run declares it), except with ``declare = false``,
  where the queue must exist. Nothing is bound and nothing is consumed.
- **each callback that can check its access** (``check_access()``: the
  ``swift`` step authenticates, to Swift or Keystone, and HEADs its
  container).

Any failure makes the command exit 2, after every check has had its line;
a line that fails says what the broker or Swift answered and, when
retrying cannot fix it, what to check. Passwords are masked as everywhere.
"""

import dataclasses
import os

from shoebox_worker import exceptions

__all__ = ["Check", "run"]


@dataclasses.dataclass
class Check:
    """What one check found: ``what`` was checked, ``ok`` or not, and the
    ``detail`` (one line)."""

    what: str
    ok: bool
    detail: str

    def line(self):
        return "%s: %s: %s" % (self.what, "OK" if self.ok else "FAILED",
                               self.detail)


def run(conf, callbacks, out):
    """Run every check, writing each one's line as it is known.

    :param conf: a loaded :class:`~shoebox_worker.config.Config` (its
        working directory already checked, see ``cli``).
    :param callbacks: ``[(name, callback), ...]`` as built.
    :param out: called with each line.
    :returns: the :class:`Check` list.
    """
    checks = []

    def tell(check):
        checks.append(check)
        out(check.line())

    tell(Check("working directory %s" % os.path.abspath(
        conf.archive.working_directory), True,
        "writable (a probe file written and removed)"))
    connection = None
    for check, conn in _brokers(conf):
        tell(check)
        if conn is None:
            continue
        if connection is None:
            connection = conn
        else:
            conn.release()
    try:
        if connection is None:
            for consumer in conf.consumers:
                tell(Check("queue %s" % consumer.queue, False,
                           "not checked: no broker let the worker in"))
        else:
            for queue, consumer in zip(_queues(conf), conf.consumers,
                                       strict=True):
                tell(_queue(conf, connection, queue, consumer))
    finally:
        if connection is not None:
            connection.release()
    for name, callback in callbacks:
        check_access = getattr(callback, "check_access", None)
        if callable(check_access):
            tell(_callback(name, check_access))
    return checks


# -- the broker ---------------------------------------------------------------

def _brokers(conf):
    """``(Check, connection or None)`` for each broker URL."""
    from shoebox_worker.consume import broker
    urls = conf.broker.urls
    for number, url in enumerate(urls, 1):
        what = "broker %s" % url.redacted()
        if len(urls) > 1:
            what += " (URL %d of %d)" % (number, len(urls))
        conn = broker.make_connection(dataclasses.replace(
            conf.broker, url=url.for_kombu()))
        try:
            conn.connect()
            channel = conn.channel()
            if not broker.is_amqp(conn) and hasattr(channel, "client"):
                channel.client.ping()  # redis: connect is lazy
        except Exception as exc:
            conn.release()
            advice = broker.permanent_advice(exc)
            detail = broker.reason(exc)
            if advice is not None:
                detail += "; this will not heal by retrying: %s" % advice
            yield Check(what, False, detail), None
            continue
        server = getattr(conn.connection, "server_properties", None) or {}
        product = " ".join(str(server[key]) for key in ("product", "version")
                           if key in server)
        yield Check(what, True, "logged in%s%s" % (
            " as %s" % conn.userid if conn.userid else "",
            " (%s)" % product if product else "")), conn


def _queues(conf):
    from shoebox_worker.consume import broker
    return broker.make_queues(conf.consumers)


def _missing(conn, declare):
    """None when ``declare()`` (a passive declaration) finds it, else the
    broker's NOT_FOUND (the channel is then closed: the caller opens
    another)."""
    try:
        declare()
    except conn.channel_errors as exc:
        from shoebox_worker.consume import broker
        if broker.reply_code(exc) == broker.NOT_FOUND:
            return exc
        raise
    return None


def _queue(conf, conn, queue, consumer):
    """The queue exists (``declare = false``), or the broker takes its
    declaration, and that of every exchange of it that exists."""
    from shoebox_worker.consume import broker
    what = "queue %s" % consumer.queue
    channel = conn.channel()
    try:
        missing = _missing(conn, lambda: channel.queue_declare(
            queue=consumer.queue, passive=True))
        exists = missing is None
        if not consumer.declare:
            if not exists:
                return Check(what, False, str(broker.refusal(
                    conf.filename, consumer, missing)))
            return Check(what, True, "exists (declare = false: read as it "
                                     "is)")
        said = []
        if exists:
            channel = conn.channel()
            queue(channel).queue_declare()
            said.append("exists, and the broker takes its declaration")
        else:
            channel = conn.channel()
            said.append("not declared yet: a run declares it")
        missing = []
        for exchange in {b.exchange.name: b.exchange
                         for b in queue.bindings}.values():
            channel = conn.channel()
            if _missing(conn, lambda e=exchange, c=channel:
                        c.exchange_declare(exchange=e.name, type=e.type,
                                           passive=True)) is None:
                channel = conn.channel()
                exchange(channel).declare()
            else:
                missing.append(exchange.name)
        if missing:
            said.append("exchange(s) %s not declared yet: a run declares "
                        "them" % ", ".join(missing))
        return Check(what, True, "; ".join(said))
    except conn.channel_errors + conn.connection_errors as exc:
        return Check(what, False, str(broker.refusal(conf.filename,
                                                     consumer, exc)))
    finally:
        try:
            channel.close()
        except Exception:  # closed by the broker after an error
            pass


# -- the callbacks ------------------------------------------------------------

def _callback(name, check_access):
    what = "callback %s" % name
    try:
        return Check(what, True, check_access())
    except exceptions.CallbackError as exc:
        detail = exc.message
        if exc.permanent:
            detail += "; this will not heal by retrying: %s" % (
                exc.hint or "see the error")
        return Check(what, False, detail)
    except Exception as exc:  # a third-party step's own error
        return Check(what, False, "%s: %s" % (type(exc).__name__, exc))
