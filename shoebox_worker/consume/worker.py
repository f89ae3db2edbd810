"""The worker: drain notification queues into archives, at least once.

Delivery guarantee
------------------
**A message is acked only after its record is written, flushed and
fsynced.** Nothing acked is ever lost: not on a crash, a ``kill -9``, a
power cut, a broker restart or a Swift outage. Messages that were received
but not yet acked when something went wrong come back from the broker and
are written again: duplicates are possible, losses are not.

Acks and fsyncs are batched: records are written as they come; once every
``fsync_every`` records or ``fsync_interval`` seconds (whichever comes
first), and whenever an archive rolls, the archive is fsynced and one
``basic.ack(multiple=True)`` acks the whole batch. ``prefetch_count`` must
be at least twice ``fsync_every`` or the broker stops delivering while a
batch waits for its ack.

Bad input is archived, never dropped and never requeued in a loop: a body
that is not JSON, not UTF-8, a broken envelope or not a JSON object is
written verbatim with ``malformed=<reason>`` in its metadata, acked, counted
and logged at a bounded rate.

One method decides what happens to a message: :meth:`Worker.on_message`.
It writes (then the batch is acked by :meth:`Worker.commit`), or, when the
disk refuses the write, requeues the unsynced batch, cuts it off the archive
and pauses consumption until there is room again. Consumption also pauses
while the archives waiting to be shipped exceed ``max_backlog_mb``.

Closed archives go to the :class:`~shoebox_worker.ship.shipper.Shipper`,
which runs the callback chain (compress, upload, delete) in a background
thread, retrying failures with backoff, so a slow upload never stalls
consumption.

Everything kombu already does is left to kombu: :class:`Worker` is a
:class:`kombu.mixins.ConsumerMixin` (reconnects with backoff, failover
between broker URLs, heartbeats); it adds ``on_message`` and the periodic
work in ``on_iteration`` (time-based rolls while the queue is idle, the
fsync interval, backpressure, the stats line).
"""

import errno
import fnmatch
import functools
import logging
import os
import re
import shutil
import socket
import struct
import time
from contextlib import contextmanager

import kombu
from kombu import mixins

from shoebox_worker import callbacks
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import plugins
from shoebox_worker import roll_manager
from shoebox_worker.consume import envelope
from shoebox_worker.consume import stats as stats_mod
from shoebox_worker.ship import shipper as shipper_mod

__all__ = ["Worker", "StopRequested", "make_connection", "make_queues",
           "worker_id", "archive_pattern"]

LOG = logging.getLogger(__name__)

#: Free space needed on the archive's filesystem before a paused worker
#: (disk full) takes messages again.
RESUME_FREE_BYTES = 64 * 1024 * 1024
#: Resume after a backlog pause once the backlog is under this share of
#: ``max_backlog_mb``.
BACKLOG_RESUME_RATIO = 0.9
#: On SIGTERM, how long shipping may go on before the state files are left
#: to the next start.
SHUTDOWN_SHIP_GRACE = 10.0
#: At most one log line per this many seconds about malformed messages.
MALFORMED_LOG_INTERVAL = 10.0
#: How often periodic work runs (idle rolls, fsync interval, backpressure).
TICK = 0.1
#: Longest a blocking read waits for the broker before periodic work runs
#: (the kernel's SO_RCVTIMEO on the AMQP socket; see Worker.consume).
RECV_TIMEOUT = 0.5

W_MALFORMED = "archived a malformed message from %s (%s); %d so far"
W_PAUSED = ("PAUSED consuming from %s: %s. Nothing more is taken off the "
            "queue until this clears.")
W_RESUMED = "RESUMED consuming: %s"
E_DISK = "cannot write archive %s: %s"


def worker_id():
    """Host and process: part of every file name, so that workers sharing a
    folder or a Swift container never write the same name. The whole host
    name is used (``a.dc1`` and ``a.dc2`` differ), dots made dashes."""
    host = socket.gethostname() or "localhost"
    host = re.sub(r"[^A-Za-z0-9_-]", "-", host)
    return "%s-%d" % (host, os.getpid())


def archive_pattern(template):
    """A glob matching every file name ``template`` can produce."""
    pattern = re.sub(r"%-?[A-Za-z%]", "*", template)
    pattern = pattern.replace("{worker_id}", "*")
    pattern = re.sub(r"\*+", "*", pattern)
    for char in (" ", "/", ":"):
        pattern = pattern.replace(char, "_")
    return pattern


def make_connection(broker):
    """A kombu Connection from ``[broker]`` (failover URLs, heartbeat)."""
    return kombu.Connection(
        broker.url,
        heartbeat=broker.heartbeat or None,
        connect_timeout=broker.connect_timeout,
        failover_strategy=broker.failover_strategy,
        transport_options={"max_retries": broker.connect_max_retries}
        if broker.connect_max_retries is not None else None,
    )


def make_queues(consumers):
    """kombu Queues from the ``[consumer:QUEUE]`` sections."""
    queues = []
    for c in consumers:
        exchange = kombu.Exchange(c.exchange, type=c.exchange_type,
                                  durable=c.exchange_durable,
                                  no_declare=not c.declare)
        queues.append(kombu.Queue(
            c.queue, exchange, routing_key=c.routing_key, durable=c.durable,
            auto_delete=c.auto_delete,
            queue_arguments=dict(c.queue_arguments) or None,
            no_declare=not c.declare))
    return queues


def _properties(message):
    """A message's AMQP properties, for the metadata of a malformed body."""
    properties = message.properties
    if "content_type" not in properties:
        # kombu's virtual transports (redis, memory) keep these apart
        properties = dict(properties, content_type=message.content_type,
                          content_encoding=message.content_encoding)
    return properties


class StopRequested(exceptions.ShoeboxError):
    """Raised inside kombu's connection retries once we are told to stop."""


class _Handoff:
    """The write manager's archive callback: lock new archives while they
    are written, hand closed ones to the shipper."""

    def __init__(self, worker):
        self.worker = worker
        self.lock = None
        #: when the active archive was opened (its first record's time)
        self.opened_at = None

    def on_open(self, filename):
        self.lock = files.FileLock(filename, create=False)
        self.opened_at = time.time()

    def on_close(self, filename):
        lock, self.lock = self.lock, None
        since, self.opened_at = self.opened_at, None
        self.worker.stats.rolled()
        self.worker.shipper.submit(filename, lock, since=since)
        return filename


class Worker(mixins.ConsumerMixin):
    """Consumes ``[consumer:*]`` queues into rolling archives.

    :param config: a loaded :class:`~shoebox_worker.config.Config`.
    :param connection: a kombu Connection (default: from ``[broker]``).
    :param idle_exit: stop once no message came for this many seconds;
        :meth:`shutdown` then ships everything before returning.
    :param ident: the worker id put into file names.
    """

    def __init__(self, config, connection=None, idle_exit=None, ident=None,
                 stats=None):
        self.config = config
        self.connection = connection or make_connection(config.broker)
        self.connect_max_retries = config.broker.connect_max_retries
        self.idle_exit = idle_exit
        self.ident = ident or worker_id()
        archive_conf = config.archive
        self.directory = os.path.abspath(archive_conf.working_directory)
        os.makedirs(self.directory, exist_ok=True)
        self.stats = stats or stats_mod.Stats()
        checker, chain = plugins.build(config)
        self.chain = callbacks.CallbackChain(chain)
        self.shipper = shipper_mod.Shipper(
            self.chain, archive_conf.retry_initial, archive_conf.retry_max,
            stats=self.stats)
        self.stats.backlog_source = self
        self.template = archive_conf.template_for(self.ident)
        self.pattern = archive_pattern(archive_conf.filename_template)
        self.manager = roll_manager.WritingRollManager(
            self.template, checker, directory=self.directory,
            archive_callback=_Handoff(self), version=archive_conf.version)
        self.unwrap = envelope.Unwrapper(
            archive_conf.metadata_fields, archive_conf.static_metadata)
        self.queues = make_queues(config.consumers)
        self.fsync_every = archive_conf.fsync_every
        self.fsync_interval = archive_conf.fsync_interval
        self.max_backlog = archive_conf.max_backlog_mb * 1024 * 1024
        self._pending = []          # received, written, not yet acked
        self._pending_since = 0.0
        self._multiple_ack = None   # decided once the channel is known
        self._consumers = []
        self._paused = None         # why consumption is paused, or None
        self._disk_full = False
        self._last_message = time.monotonic()
        self._next_tick = 0.0
        self._next_stats = time.monotonic() + config.worker.stats_interval
        self._malformed_logged = 0.0
        self.exit_code = 0

    @property
    def backlog(self):
        """Data at risk: ``(files, bytes, oldest_age_seconds)`` of every
        record not yet through the whole chain, the active archive's
        included (it is on this disk only)."""
        files, size, age = self.shipper.backlog
        writer = self.manager.active_archive
        opened_at = self.manager.archive_callback.opened_at
        if writer is not None and opened_at is not None:
            files += 1
            size += writer.size
            age = max(age, time.time() - opened_at)
        return files, size, age

    # -- start and stop ------------------------------------------------

    def start(self):
        """Recover what a killed run left, start shipping."""
        recovered = self.shipper.recover(
            self.directory, lambda name: fnmatch.fnmatch(name, self.pattern))
        if recovered:
            LOG.info("%d archive(s) from a previous run queued for "
                     "shipping", recovered)
        self.shipper.start()

    def shutdown(self, ship_timeout=30.0):
        """After :meth:`run`: ack what is written, close the archive, then
        finish shipping (all of it when ``--idle-exit`` stopped the worker;
        after a signal, only the steps running or due) and leave the rest
        to the state files for the next start."""
        try:
            self.commit()
        except Exception:  # the connection may be gone; they come back
            LOG.warning("could not ack the last batch; the broker will "
                        "deliver it again", exc_info=True)
        self._pending = []
        self.manager.close()
        if self._stopped_idle and self.exit_code == 0:
            LOG.info("idle: shipping %d archive(s) before exiting",
                     self.shipper.pending())
            self.shipper.wait_idle(should_stop=lambda: self._interrupted)
        elif not self._interrupted:
            self.shipper.settle(SHUTDOWN_SHIP_GRACE)
        self.shipper.stop(ship_timeout)
        self.stats.log_line(force=True)

    _interrupted = False
    #: stopped by --idle-exit (not by a signal): ship everything first
    _stopped_idle = False

    def run(self, _tokens=1, **kwargs):
        """Consume until stopped (kombu reconnects on broker loss)."""
        try:
            super().run(_tokens, **kwargs)
        except StopRequested:
            LOG.info("stopped while waiting for the broker")

    def check_stop(self):
        """Called by kombu every second while it retries a connection."""
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

    def stop(self):
        """Ask the worker to stop (a signal handler calls this)."""
        if self.should_stop:
            self._interrupted = True  # a second signal: don't wait to ship
        self.should_stop = True

    # -- kombu hooks -----------------------------------------------------

    def get_consumers(self, Consumer, channel):
        if hasattr(channel, "auto_decode"):
            channel.auto_decode = False  # we want the body's bytes
        # py-amqp acks up to a tag with one frame; kombu's virtual
        # transports (memory, redis) ack one tag at a time
        self._multiple_ack = getattr(
            self.connection.transport, "driver_type", "") == "amqp"
        return [Consumer(queues=[queue], accept=[],
                         on_message=functools.partial(self.on_message,
                                                      queue.name),
                         prefetch_count=self.config.broker.prefetch_count)
                for queue in self.queues]

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        self._consumers = consumers
        # --idle-exit counts from here: time spent reconnecting is not idle
        self._last_message = time.monotonic()
        LOG.info("consuming from %s on %s",
                 ", ".join(q.name for q in self.queues),
                 connection.as_uri())
        if self._paused:
            self._cancel_consumers()

    def on_consume_end(self, connection, channel):
        # ack the last batch while the channel is still open
        if self.should_stop:
            self.commit()

    def consume(self, limit=None, timeout=None, safety_interval=1,
                **kwargs):
        """kombu's loop, reading without a Python-level socket timeout.

        ``ConsumerMixin.consume`` drains with ``timeout=1``, so CPython
        polls before every ``recv()`` (py-amqp makes about nine per message)
        and py-amqp sets and resets the timeout on every call: about a fifth
        of the throughput, measured. Here the socket stays blocking with a
        kernel receive timeout (SO_RCVTIMEO), which py-amqp turns into the
        same ``socket.timeout`` when no frame starts in time, so periodic
        work, heartbeats and the stop flag still run while the queue is
        idle. Other transports (memory, redis) use kombu's loop unchanged.
        """
        if getattr(self.connection.transport, "driver_type", "") != "amqp":
            yield from super().consume(limit, timeout, safety_interval,
                                       **kwargs)
            return
        interval = max(0.05, min(RECV_TIMEOUT, self.fsync_interval / 2))
        with self.consumer_context(**kwargs) as (conn, channel, consumers):
            sock = conn.connection.sock
            sock.settimeout(None)
            seconds = int(interval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", seconds,
                                        int((interval - seconds) * 1e6)))
            while not self.should_stop:
                self.on_iteration()
                try:
                    conn.drain_events(timeout=None)
                except socket.timeout:
                    conn.heartbeat_check()
                except OSError:
                    if not self.should_stop:
                        raise
                else:
                    yield

    def on_connection_error(self, exc, interval):
        LOG.warning("broker connection error: %s; retrying in %.1f s",
                    exc, interval)

    def on_connection_revived(self):
        # unacked messages of the old channel are redelivered; their
        # records stay in the archive (duplicates are allowed, losses not)
        if self._pending:
            LOG.warning("connection lost with %d written but unacked "
                        "message(s); they will be delivered again",
                        len(self._pending))
            self.manager.sync()
            self._pending = []
        LOG.info("connected to %s", self.connection.as_uri())

    # -- the one place that decides ------------------------------------

    def on_message(self, queue, message):
        """Write one message; ack it with its batch; or requeue it."""
        if self._disk_full:
            message.requeue()
            return
        body = envelope.to_bytes(message.body, message.content_encoding)
        payload, metadata = self.unwrap(
            body, queue, message.delivery_info.get("routing_key"),
            functools.partial(_properties, message))
        try:
            size = self.manager.write(metadata, payload)
        except OSError as exc:
            self._pending.append(message)
            self._write_failed(exc)
            return
        now = time.monotonic()
        self._last_message = now
        if not self._pending:
            self._pending_since = now
        self._pending.append(message)
        self.stats.consumed(queue, size)
        if "malformed" in metadata:
            self._malformed(queue, metadata["malformed"], now)
        if (len(self._pending) >= self.fsync_every
                or self.manager.active_archive is None):
            self.commit()

    def commit(self):
        """fsync the archive, then ack every pending message at once."""
        if not self._pending:
            return
        try:
            self.manager.sync()
        except OSError as exc:
            self._write_failed(exc)
            return
        pending, self._pending = self._pending, []
        if self._multiple_ack:
            pending[-1].ack(multiple=True)
        else:
            for message in pending:
                message.ack()
        self.stats.acked(len(pending))

    # -- periodic work ---------------------------------------------------

    def on_iteration(self):
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK
        if self._pending and now - self._pending_since >= \
                self.fsync_interval:
            self.commit()
        if self.manager.maybe_roll():
            self.commit()
        self._check_backpressure()
        if self.idle_exit is not None and now - self._last_message >= \
                self.idle_exit and not self._pending:
            LOG.info("no message for %.0f s: stopping", self.idle_exit)
            self._stopped_idle = True
            self.should_stop = True
        if self.config.worker.stats_interval and now >= self._next_stats:
            self._next_stats = now + self.config.worker.stats_interval
            self.stats.log_line()

    def _malformed(self, queue, reason, now):
        count = self.stats.malformed(queue)
        if now - self._malformed_logged >= MALFORMED_LOG_INTERVAL:
            self._malformed_logged = now
            LOG.warning(W_MALFORMED, queue, reason, count)

    # -- backpressure ------------------------------------------------------

    def _write_failed(self, exc):
        """The disk refused a write: requeue what is not synced, cut it off
        the archive, and pause until there is room (or stop on other
        errors)."""
        pending, self._pending = self._pending, []
        filename = self.manager.active_filename
        LOG.error(E_DISK, filename, exc)
        writer = self.manager.active_archive
        synced = 0
        try:
            if writer is not None:
                synced = writer.abandon()
        finally:
            self.manager.active_archive = None
            self.manager.active_filename = None
            if filename is not None and synced == 0:
                self._drop_empty(filename)
            elif filename is not None:
                self.manager.archive_callback.on_close(filename)
        if pending:
            self._requeue(pending)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._disk_full = True
            self._pause("disk full under %s" % self.directory)
        else:
            LOG.critical("stopping: the archive directory is not writable "
                         "(%s)", exc)
            self.exit_code = 1
            self.should_stop = True

    def _drop_empty(self, filename):
        handoff = self.manager.archive_callback
        if handoff.lock is not None:
            handoff.lock.release()
            handoff.lock = None
        try:
            os.unlink(filename)
        except OSError:
            pass

    def _requeue(self, messages):
        if self._multiple_ack:
            last = messages[-1]
            last.channel.basic_nack(last.delivery_tag, multiple=True,
                                    requeue=True)
        else:
            for message in messages:
                message.requeue()
        LOG.warning("requeued %d unsynced message(s)", len(messages))

    def _check_backpressure(self):
        if self._disk_full:
            free = shutil.disk_usage(self.directory).free
            if free >= RESUME_FREE_BYTES:
                self._disk_full = False
                self._resume("disk has %d MB free" % (free >> 20))
            return
        files, size, _ = self.shipper.backlog
        if not self._paused and size > self.max_backlog:
            self._pause("%d archive(s), %.1f MB waiting to be shipped, over "
                        "max_backlog_mb = %g" % (
                            files, size / 1048576.0,
                            self.max_backlog / 1048576.0))
        elif self._paused and size <= self.max_backlog * \
                BACKLOG_RESUME_RATIO:
            self._resume("backlog down to %.1f MB" % (size / 1048576.0))

    def _pause(self, why):
        if self._paused:
            return
        self._paused = why
        self.commit()
        self._cancel_consumers()
        self.stats.paused = True
        LOG.critical(W_PAUSED, ", ".join(q.name for q in self.queues), why)

    def _resume(self, why):
        if not self._paused:
            return
        self._paused = None
        self.stats.paused = False
        for consumer in self._consumers:
            consumer.consume()
        LOG.warning(W_RESUMED, why)

    def _cancel_consumers(self):
        for consumer in self._consumers:
            try:
                consumer.cancel()
            except Exception:  # a dead channel; reconnect recreates them
                LOG.debug("cancel failed", exc_info=True)
