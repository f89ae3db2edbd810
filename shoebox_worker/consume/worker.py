"""The worker: drain notification queues into archives, at least once.

Delivery guarantee
------------------
**A message is acked only after its record is written, flushed and
fsynced.** Nothing acked is ever lost: not on a crash, a ``kill -9``, a
power cut, a broker restart or a Swift outage. Messages that were received
but not yet acked when something went wrong come back from the broker and
are written again: duplicates are possible, losses are not. A stream
queue (``x-queue-type = stream``) is archived exactly once: each record
carries its stream offset, saved beside the archives at each ack point and
before an archive is shipped, and the worker resumes after the last one
(:mod:`~shoebox_worker.consume.stream`; docs/streams.md).

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
It writes the record and adds the message to the
:class:`~shoebox_worker.consume.batch.Batch` (acked with it), or, when the
disk refuses the write, cuts the unsynced records off the archive, takes
their messages back from the batch, unacked, and pauses consumption until
there is room again, then writes them first. Consumption also pauses
while the archives waiting to be shipped exceed ``max_backlog_mb``. While
paused, nothing goes back to the broker (a quorum queue drops a message
returned too often: :mod:`~shoebox_worker.consume.rabbitmq`): what is
delivered meanwhile is kept unacked, which fills the consumers' prefetch
window and stops deliveries (a stream's messages are acked as credit and
read again from the stream; its consumers are cancelled).
:data:`HOLD_MAX` seconds after the first message was kept, what is kept
is given back, and every consumer is cancelled until the pause ends. The
batch is the only code that acks or requeues.

A roll is returned, not looked for: the roll manager's ``write()`` and
``maybe_roll()`` return the closed archive's report, and the worker hands
it to the :class:`~shoebox_worker.ship.shipper.Shipper`, which runs the
callback chain (compress, upload, delete) in a background thread, retrying
failures with backoff, so a slow upload never stalls consumption. Each
archive is locked from its creation until the shipper's state file holds
it, so no other worker sharing the folder takes it over.

Everything kombu already does is left to kombu: :class:`Worker` is a
:class:`kombu.mixins.ConsumerMixin` (reconnects with backoff, failover
between broker URLs, heartbeats); it adds ``on_message`` and the periodic
work in ``on_iteration`` (time-based rolls while the queue is idle, the
fsync interval, backpressure, the stats line). On RabbitMQ it reads through
:class:`~shoebox_worker.consume.broker.BlockingReads` (measured faster).

Under systemd (``Type=notify``) the worker tells its service manager,
through :class:`~shoebox_worker.consume.notify.Notifier`: ``READY=1`` once
it consumes, ``WATCHDOG=1`` from ``on_iteration`` (and while kombu retries
a connection), ``STOPPING=1`` when asked to stop. Without ``NOTIFY_SOCKET``
nothing is sent.
"""

import errno
import functools
import logging
import os
import re
import shutil
import socket
import time

from shoebox_worker import callbacks as callbacks_mod
from shoebox_worker import roll_manager
from shoebox_worker.consume import backpressure as backpressure_mod
from shoebox_worker.consume import batch as batch_mod
from shoebox_worker.consume import broker
from shoebox_worker.consume import envelope
from shoebox_worker.consume import notify
from shoebox_worker.consume import rabbitmq
from shoebox_worker.consume import signals
from shoebox_worker.consume import stats as stats_mod
from shoebox_worker.consume import stream as stream_mod
from shoebox_worker.ship import shipper as shipper_mod

__all__ = ["Worker", "StopRequested", "worker_id", "archive_pattern",
           "archive_matcher"]

LOG = logging.getLogger(__name__)

#: On SIGTERM, how long shipping may go on before the state files are left
#: to the next start.
SHUTDOWN_SHIP_GRACE = 10.0
#: At most one log line per this many seconds about malformed messages.
MALFORMED_LOG_INTERVAL = 10.0
#: How often periodic work runs (idle rolls, fsync interval, backpressure).
TICK = 0.1
#: Longest a blocking read waits for the broker before periodic work runs
#: (the kernel's SO_RCVTIMEO on the AMQP socket; see
#: :class:`~shoebox_worker.consume.broker.BlockingReads`).
RECV_TIMEOUT = 0.5

#: Why a worker stops (:attr:`Worker.stopping`), None while it runs.
#: SIGTERM/SIGINT: ship what is running or due, leave the rest.
STOP_SIGNAL = "signal"
#: A second signal: leave all shipping to the next start.
STOP_INTERRUPTED = "interrupted"
#: ``--idle-exit``: ship everything before exiting.
STOP_IDLE = "idle"
#: ``--idle-exit``: seconds between two reads of the consumed queues'
#: depths once the worker is quiet (it stops only when they are 0).
IDLE_DEPTH_INTERVAL = 1.0
#: The archive directory is not writable: exit code 1.
STOP_FAILED = "failed"
#: Seconds a pause (a full disk, a backlog) may keep delivered messages
#: unacked, counted from the first one kept, before they are given back.
HOLD_MAX = rabbitmq.HOLD_MAX
#: At most one line per this many seconds about messages returned often.
REDELIVERY_LOG_INTERVAL = 60.0
W_RETURNS = ("message %s of %s has been returned to the broker %d time(s); "
             "the queue drops it (or dead-letters it) after %d")

W_MALFORMED = "archived a malformed message from %s (%s); %d so far"
W_PAUSED = ("PAUSED consuming from %s: %s. Nothing more is taken off the "
            "queue until this clears.")
W_RESUMED = "RESUMED consuming: %s"
E_DISK = "cannot write archive %s: %s"
E_HELD = ("cannot save the stream offsets (%s): %s kept from the shipper "
          "until they are saved (tried again every %.0f s; a stop leaves it "
          "to the next start)")
I_HELD = ("stream offsets saved: handing the %d archive(s) kept back to the "
          "shipper")
E_STUCK = ("idle: exiting 1: %d archive(s) left whose shipping fails in a "
           "way retrying will not fix (see above); the next start ships "
           "them once that is fixed")
#: Seconds between two tries to save the stream offsets while closed
#: archives wait for them (see Worker._ship_held).
HELD_RETRY = 1.0


def worker_id():
    """Host and process: part of every file name, to tell the workers
    sharing a folder or a Swift container apart. The whole host name is
    used (``a.dc1`` and ``a.dc2`` differ), dots made dashes. Both repeat
    (a container's worker is often PID 1 at every start): what makes a
    name unique is the random token and sequence the roll manager adds
    (``unique_names``)."""
    host = socket.gethostname() or "localhost"
    host = re.sub(r"[^A-Za-z0-9_-]", "-", host)
    return "%s-%d" % (host, os.getpid())


def archive_pattern(template):
    """A glob matching every file name ``template`` can produce (and
    more: for reading; recovery uses :func:`archive_matcher`)."""
    pattern = re.sub(r"%-?[A-Za-z%]", "*", template)
    pattern = pattern.replace("{worker_id}", "*")
    pattern = re.sub(r"\*+", "*", pattern)
    for char in (" ", "/", ":"):
        pattern = pattern.replace(char, "_")
    return pattern


#: What one strftime directive or ``{worker_id}`` renders as in a file
#: name: never a dot (host names have their dots made dashes, and the
#: worker does not set a locale), so one archive's name never matches the
#: compressed or renamed form of another (``x.gz``, ``x.events.zst``).
_FIELD = r"[^./]*"
#: The ``~N`` a taken name gets (see :func:`roll_manager.unique_path`).
_COUNTER = r"(?:~\d+)?"


def archive_matcher(template):
    """A regular expression matching exactly the names the writer gives
    its archives under ``template``, for any time and worker id, with or
    without the ``~N`` counter of a taken name; never the names a step
    gives them (``x.events.gz``, ``x.events.done``, and for a template
    without an extension ``x.gz``), which recovery finds through their
    state files instead.

    :returns: a compiled pattern; use ``.fullmatch(name)``.
    """
    out = []
    directive = r"%[-_0^#]?[EO]?[A-Za-z]"  # with glibc's flags
    for part in re.split(r"(%s|%%%%|\{worker_id\})" % directive,
                         template):
        if part == "%%":
            out.append(re.escape("%"))
        elif part == "{worker_id}" or re.fullmatch(directive, part):
            if not out or out[-1] != _FIELD:  # one for several in a row
                out.append(_FIELD)
        else:
            for char in part:
                if char in (" ", "/", ":"):  # as render_template does
                    char = "_"
                out.append(_COUNTER + r"\." if char == "." else
                           re.escape(char))
    return re.compile("".join(out) + _COUNTER)


def _properties(message):
    """A message's AMQP properties, for the metadata of a malformed body."""
    properties = message.properties
    if "content_type" not in properties:
        # kombu's virtual transports (redis, memory) keep these apart
        properties = dict(properties, content_type=message.content_type,
                          content_encoding=message.content_encoding)
    return properties


#: Raised inside kombu's connection retries once we are told to stop.
StopRequested = broker.StopRequested


class _ArchiveLock(callbacks_mod.ArchiveCallback):
    """The roll manager's archive callback in a worker: notes when each
    archive was opened. The archive's lock itself is taken by the roll
    manager as it creates the file (``keep_locks``) and handed to the
    shipper with the closed archive (:meth:`Worker._ship`), which releases
    it once the archive's state file exists."""

    def __init__(self):
        #: when the active archive was opened (its first record's time)
        self.opened_at = None

    def on_open(self, filename):
        self.opened_at = time.time()

    def take(self):
        """When the archive just closed was opened."""
        taken, self.opened_at = self.opened_at, None
        return taken


def evidence_of(config, directory, chain, stats):
    """The :class:`~shoebox_worker.integrity.chain.Chain` ``[integrity]``
    asks for, putting its digests through the chain's storing step (the
    first with ``put_digest``); None without ``signing_key``.

    :raises ConfigError: no step of the chain stores digests.
    """
    integrity = config.integrity
    if integrity.signing_key is None:
        return None
    from shoebox_worker.integrity import chain as chain_mod
    return chain_mod.Chain(
        directory=directory, signing_key=integrity.signing_key,
        store=chain_mod.store_of(config, chain.steps),
        prefix=integrity.digest_prefix, interval=integrity.digest_interval,
        stats=stats)


class Worker(broker.Reconnecting):
    """Consumes ``[consumer:*]`` queues into rolling archives.

    :param config: a loaded :class:`~shoebox_worker.config.Config`.
    :param roll_checker: the roll checker, and
    :param callbacks: ``[(name, callback), ...]``, the callback chain, both
        as :func:`shoebox_worker.plugins.build` returns them.
    :param connection: a kombu Connection (default: from ``[broker]``).
    :param idle_exit: stop once no message came for this many seconds
        and no consumed queue (but a stream) holds a ready message;
        :meth:`shutdown` then ships everything before returning.
    :param ident: the worker id put into file names.
    :param stats: a :class:`~shoebox_worker.consume.stats.Stats` to count
        into (default: a new one).
    :param notifier: a :class:`~shoebox_worker.consume.notify.Notifier`
        (default: the service manager's, from ``NOTIFY_SOCKET``; it does
        nothing when that is unset).
    """

    def __init__(self, config, *, roll_checker, callbacks, connection=None,
                 idle_exit=None, ident=None, stats=None, notifier=None):
        self.config = config
        self.connection = connection or broker.make_connection(config.broker)
        self.connect_max_retries = config.broker.connect_max_retries
        self.idle_exit = idle_exit
        self.ident = ident or worker_id()
        archive_conf = config.archive
        self.directory = os.path.abspath(archive_conf.working_directory)
        os.makedirs(self.directory, exist_ok=True)
        self.stats = stats or stats_mod.Stats()
        self.notifier = notifier or notify.Notifier.from_environ()
        self.chain = callbacks_mod.CallbackChain(callbacks)
        #: the signed digest chain (``[integrity]``), or None
        self.evidence = evidence_of(config, self.directory, self.chain,
                                    self.stats)
        self.shipper = shipper_mod.Shipper(
            self.chain, archive_conf.retry_initial, archive_conf.retry_max,
            stats=self.stats, index_fields=archive_conf.index_fields,
            evidence=self.evidence)
        # the roll manager's _<token>-<sequence> right after the worker
        # id: the recovery glob's * for {worker_id} covers both
        self.template = archive_conf.template_for(
            self.ident + roll_manager.UNIQUE_FIELD)
        self.pattern = archive_pattern(archive_conf.filename_template)
        self.archive_name = archive_matcher(archive_conf.filename_template)
        self._archive_lock = _ArchiveLock()
        self.manager = roll_manager.WritingRollManager(
            self.template, roll_checker, directory=self.directory,
            archive_callback=self._archive_lock,
            version=archive_conf.version, keep_locks=True,
            unique_names=True, index_fields=archive_conf.index_fields)
        #: The stream queues' offsets (empty without stream queues).
        self.streams = stream_mod.Streams(self.directory, config.consumers)
        self.batch = batch_mod.Batch(self._sync)
        # closed archives kept from the shipper, (report, lock, since):
        # their stream offsets could not be saved yet (see _ship_held)
        self._held = []
        self._held_retry = 0.0
        self.unwrap = envelope.Unwrapper(
            archive_conf.metadata_fields, archive_conf.static_metadata,
            index_fields=archive_conf.index_fields)
        self.queues = broker.make_queues(config.consumers)
        #: the depths of the consumed and watched queues, read for the
        #: metrics endpoint only
        self.depths = broker.QueueDepths(
            [queue.name for queue in self.queues] +
            list(config.metrics.watch_queues)) \
            if config.metrics.port is not None else None
        #: --idle-exit: the consumed queues that must hold no ready
        #: message (a stream's count is its length, not what is left to
        #: read: not those), read every second while quiet
        self._idle_depths = broker.QueueDepths(
            [queue.name for queue in self.queues
             if self.streams.get(queue.name) is None]) \
            if idle_exit is not None else None
        if self._idle_depths is not None:
            self._idle_depths.interval = IDLE_DEPTH_INTERVAL
        #: the connection consuming now (a clone of :attr:`connection`)
        self._consuming_on = None
        self.fsync_every = archive_conf.fsync_every
        self.fsync_interval = archive_conf.fsync_interval
        self.receive_timeout = max(0.05, min(RECV_TIMEOUT,
                                             self.fsync_interval / 2))
        self.backpressure = backpressure_mod.Backpressure(
            archive_conf.max_backlog_mb * 1024 * 1024)
        #: Why the worker stops (``STOP_*``), None while it runs.
        self.stopping = None
        self._consumers = []
        #: the consumers cancelled while paused (see _cancel_consumers),
        #: and whether kept messages were given back (then all are)
        self._cancelled = []
        self._hold_expired = False
        #: whether consuming ever started (else no stats line at the end)
        self._consumed = False
        self.outage = broker.Outage(listeners=self.stats.listeners)
        self._last_message = time.monotonic()
        self._next_tick = 0.0
        self._next_stats = time.monotonic() + config.worker.stats_interval
        self._malformed_logged = 0.0
        #: ``(queue, message, counted)`` delivered but not written, kept
        #: unacked while paused (never returned to the broker: a return
        #: spends one of a quorum queue's delivery attempts), written when
        #: the pause ends; and since when the oldest waits
        self._waiting = []
        self._waiting_since = None
        #: the broker's version and each queue's delivery limit, as of the
        #: last connection (:mod:`~shoebox_worker.consume.rabbitmq`); None
        #: until a connection was read
        self._server_version = None
        self._limits = None
        self._redelivery_logged = 0.0

    @property
    def should_stop(self):
        """kombu's stop flag, read by its loops: true once stopping."""
        return self.stopping is not None

    @should_stop.setter
    def should_stop(self, value):
        # kombu's way to stop a ConsumerMixin: as a signal would
        if value and self.stopping is None:
            self.stopping = STOP_SIGNAL

    @property
    def paused(self):
        """Why consumption is paused (``backpressure.PAUSE_*``), None while
        it runs."""
        return self.backpressure.paused

    @property
    def exit_code(self):
        """1 when the archive directory failed, or ``--idle-exit`` left
        archives that fail in a way retrying will not fix; else 0."""
        return 1 if self.stopping == STOP_FAILED or self._stuck else 0

    #: ``--idle-exit`` ended with only such archives left.
    _stuck = False

    # -- start and stop ------------------------------------------------

    def start(self):
        """Recover what a killed run left, start shipping."""
        if self.evidence is not None:
            # finishes a digest a crash cut short, before anything ships
            self.evidence.open()
        recovered = self.shipper.recover(
            self.directory,
            lambda name: self.archive_name.fullmatch(name) is not None,
            on_record=self.streams.recovered if self.streams else None,
            on_damage=self.streams.damaged if self.streams else None,
            # before a recovered archive gets a state file (the next start
            # would not read it again) and is shipped: the offsets found
            # in it are saved
            before_submit=self.streams.resume)
        if recovered:
            LOG.info("%d archive(s) from a previous run queued for "
                     "shipping", recovered)
        self.shipper.start()

    #: SIGTERM/SIGINT counted so far (a repeat within a second is one:
    #: see :mod:`~shoebox_worker.consume.signals`).
    stop_signals = None

    def stop(self):
        """Ask the worker to stop (a signal handler calls this); a second
        call, more than :data:`~shoebox_worker.consume.signals.REPEAT`
        seconds after the first, stops the wait for shipping too.

        :returns: False when this call repeated the last one (and changed
            nothing).
        """
        self.notifier.stopping()
        if self.stop_signals is None:
            self.stop_signals = signals.StopSignals()
        if not self.stop_signals.received():
            return False
        if self.stopping is None:
            self.stopping = STOP_SIGNAL
        elif self.stopping != STOP_FAILED:
            self.stopping = STOP_INTERRUPTED
        return True

    def shutdown(self, ship_timeout=30.0):
        """After :meth:`run`: ack what is written, close the archive, then
        finish shipping (all of it when ``--idle-exit`` stopped the worker;
        after a signal, only the steps running or due) and leave the rest
        to the state files for the next start."""
        self.notifier.stopping()
        self.stats.stopping = True
        try:
            self._commit()
        except Exception as exc:  # the connection may be gone
            LOG.warning("could not ack the last batch (%s); the broker "
                        "will deliver it again", broker.reason(exc))
        self.batch.forget()
        self._ship(self.manager.close())
        if self.stopping == STOP_IDLE:
            LOG.info("idle: shipping %d archive(s) before exiting",
                     self.shipper.pending())
            self.shipper.wait_idle(
                should_stop=lambda: self.stopping == STOP_INTERRUPTED
                or self.shipper.stuck())
            if self.stopping != STOP_INTERRUPTED and self.shipper.stuck():
                self._stuck = True
                LOG.error(E_STUCK, self.shipper.pending())
        elif self.stopping != STOP_INTERRUPTED:
            self.shipper.settle(SHUTDOWN_SHIP_GRACE)
        self.shipper.stop(ship_timeout)
        self.streams.release()
        self._update_stats()
        if self._consumed:  # else there is nothing to say
            self.stats.log_line(force=True)

    # -- kombu hooks -----------------------------------------------------

    def get_consumers(self, Consumer, channel):
        if hasattr(channel, "auto_decode"):
            channel.auto_decode = False  # we want the body's bytes
        self.batch.multiple = broker.is_amqp(self.connection)
        consumers = [
            Consumer(queues=[queue], accept=[],
                     on_message=functools.partial(self.on_message,
                                                  queue.name),
                     prefetch_count=self.config.broker.prefetch_count)
            for queue in self.queues]
        for consumer in consumers:  # a stream: right after the last written
            self.streams.position(consumer)
        return consumers

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        super().on_consume_ready(connection, channel, consumers, **kwargs)
        self._read_limits(connection)
        if not self._consumed:
            self.notifier.ready("consuming from %s" % ", ".join(
                q.name for q in self.queues))
        self._consumed = True
        self.stats.consuming_now()
        self._consumers = consumers
        self._consuming_on = connection
        for depths in (self.depths, self._idle_depths):
            if depths is not None:  # their channel was the lost connection's
                depths.reset()
        # --idle-exit counts from here: time spent reconnecting is not idle
        self._last_message = time.monotonic()
        LOG.info("consuming from %s on %s",
                 ", ".join(q.name for q in self.queues),
                 connection.as_uri())
        self._cancelled = []
        if self.paused:
            self._cancel_consumers(everyone=self._hold_expired)

    def on_consume_end(self, connection, channel):
        # ack the last batch while the channel is still open
        if self.should_stop:
            self._commit()

    def on_connection_revived(self):
        # unacked messages of the old channel are redelivered; their
        # records stay in the archive (duplicates are allowed, losses not)
        dropped = self.batch.forget()
        if dropped:
            LOG.warning("connection lost with %d written but unacked "
                        "message(s); they will be delivered again",
                        dropped)
        waiting, self._waiting = self._waiting, []
        self._waiting_since = None
        if waiting:
            LOG.warning("connection lost with %d message(s) kept for the "
                        "full disk; they will be delivered again",
                        len(waiting))
        if self.outage.since is None:  # else recovered() tells it
            LOG.info("connected to %s", self.connection.as_uri())

    # -- the one place that decides ------------------------------------

    def on_message(self, queue, message, counted=False):
        """Write one message and add it to the batch (acked with it); or,
        while paused, keep it unacked to write on resuming (a stream's:
        ack it, it is read again from the stream).

        :param counted: a kept message written again: it was counted
            (consumed, malformed, returned) when it first came.

        Once the disk has failed for good (:data:`STOP_FAILED`), nothing
        more is written: messages stay unacked for the next start.
        """
        if self.stopping == STOP_FAILED:
            # the disk failed for good: left unacked, the broker delivers
            # it again once the connection closes (not written, no line)
            return
        stream = self.streams.get(queue)
        if self.paused:
            if stream is not None:
                self.batch.requeue_one(message, stream=True)
            else:
                self._keep([(queue, message)], counted)
            return
        now = time.monotonic()
        if not counted:
            self._count_returns(queue, message, now)
        offset = None
        if stream is not None:
            offset = stream.offset_of(message)
            if not stream.is_new(offset):  # archived already: only credit
                stream.credit(offset)
                self._last_message = now
                self.batch.add(message, now, True, queue)
                if len(self.batch) >= self.fsync_every:
                    self._commit()
                return
        body = envelope.to_bytes(message.body, message.content_encoding)
        delivery = message.delivery_info
        payload, metadata, values = self.unwrap(
            body, queue, delivery.get("routing_key"),
            functools.partial(_properties, message),
            exchange=delivery.get("exchange"))
        if offset is not None:
            metadata[stream_mod.METADATA_KEY] = str(offset)
        if not counted:  # once, also when the disk refuses it
            self.stats.consumed(queue)
            if "malformed" in metadata:
                self._malformed(queue, metadata["malformed"], now)
        try:
            closed = self.manager.write(metadata, payload, values)
        except OSError as exc:
            # kept or requeued with the unsynced rest
            self.batch.add(message, now, stream is not None, queue)
            self._write_failed(exc)
            return
        if stream is not None:
            stream.written(offset, body)
        self._last_message = now
        self.batch.add(message, now, stream is not None, queue)
        if closed is not None:
            self._ship(closed)
            self._commit()
        elif len(self.batch) >= self.fsync_every:
            self._commit()

    # -- periodic work ---------------------------------------------------

    def on_iteration(self):
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK
        self.notifier.watchdog(now)
        if self.batch and now - self.batch.since >= self.fsync_interval:
            self._commit()
        closed = self.manager.maybe_roll()
        if closed is not None:
            self._ship(closed)
            self._commit()
        if self._held and now >= self._held_retry:
            self._ship_held()
        self._apply(self.backpressure.check(
            self.shipper.backlog,
            lambda: shutil.disk_usage(self.directory).free))
        # paused by a backlog only an operator can ship: --idle-exit ends it
        stuck = self.paused is not None and self.shipper.stuck()
        if (self.paused or self._waiting) and not stuck:
            # --idle-exit counts only time in which a message could come
            self._last_message = now
        if self._waiting and now - self._waiting_since >= HOLD_MAX:
            self._give_back_waiting()
        if self.idle_exit is not None and not self.batch and \
                now - self._last_message >= self.idle_exit and \
                self.stopping is None and (stuck or self._drained(now)):
            LOG.info("no message for %.0f s: stopping", self.idle_exit)
            self.stopping = STOP_IDLE
        self._update_stats()
        if self.config.worker.stats_interval and now >= self._next_stats:
            self._next_stats = now + self.config.worker.stats_interval
            self.stats.log_line()
        # last: on py-amqp, waiting for the broker's answers also delivers
        # messages (on_message runs), which finds everything above done
        if self.depths is not None and self._consuming_on is not None:
            self.stats.queue_depths = self.depths.poll(self._consuming_on,
                                                       now)

    def _drained(self, now):
        """For ``--idle-exit``: no consumed queue holds a message ready
        for this worker (quiet is not idle while the broker still has
        some: a slow moment must not end a drain early)."""
        if self._consuming_on is None:
            return True
        depths = self._idle_depths.poll(self._consuming_on, now)
        return not any(depths.values())

    def _update_stats(self):
        """Pass down what only the consumer thread knows: the data at
        risk."""
        files_, size, age = self.shipper.backlog
        if self.manager.active_archive is not None and \
                self._archive_lock.opened_at is not None:
            files_ += 1
            size += self.manager.active_archive.size
            age = max(age, time.time() - self._archive_lock.opened_at)
        self.stats.update(len(self.batch), self.manager.bytes_written,
                          (files_, size, age))

    def _malformed(self, queue, reason, now):
        count = self.stats.malformed(queue)
        if now - self._malformed_logged >= MALFORMED_LOG_INTERVAL:
            self._malformed_logged = now
            LOG.warning(W_MALFORMED, queue, reason, count)

    # -- acks, rolls, write failures -------------------------------------

    def _sync(self):
        """The batch's sync: fsync the archive, then save the stream
        offsets it now holds (before the ack)."""
        self.manager.sync()
        self.streams.synced()
        self.streams.save()

    def _commit(self):
        """fsync the archive, then ack the batch (or, when the fsync fails,
        handle it as a failed write)."""
        try:
            acked = self.batch.commit()
        except batch_mod.SyncFailed as exc:
            self._write_failed(exc.error)
            return
        self.stats.acked(acked)

    def _ship(self, report):
        """Hand a closed archive (its report from the roll manager, or None
        when none closed) and its lock to the shipper."""
        if report is None:
            return
        since = self._archive_lock.take()
        lock = self.manager.take_lock(report.filename)
        # a closed archive is fsynced, and nothing is written after it yet
        self.streams.synced()
        self._held.append((report, lock, since))
        self._ship_held(report.filename)

    def _ship_held(self, new=None):
        """Hand the closed archives to the shipper once the stream offsets
        that cover them are saved (before the shipper may upload and
        delete them); when the disk refuses, keep them back and try again
        (each :data:`HELD_RETRY` seconds, from :meth:`on_iteration`).

        :param new: the archive just closed (said at once if kept back).
        """
        if not self._held:
            return
        try:
            self.streams.save()
        except OSError as exc:
            self._held_retry = time.monotonic() + HELD_RETRY
            if new is not None:
                LOG.error(E_HELD, exc, new, HELD_RETRY)
            return
        held, self._held = self._held, []
        if new is None or len(held) > 1:
            LOG.info(I_HELD, len(held) - (new is not None))
        for report, lock, since in held:
            self.stats.rolled()
            self.shipper.submit(report.filename, lock, since=since,
                                report=report)

    def _write_failed(self, exc):
        """The disk refused a write or a sync: cut what is not synced off
        the archive; when it is full, keep its messages (unacked) and pause
        until there is room, then write them again; on other errors,
        requeue them and stop."""
        LOG.error(E_DISK, self.manager.active_filename, exc)
        closed = self.manager.cut_unsynced()
        self.streams.cut()
        if closed is None:
            self._archive_lock.take()  # the empty archive is gone
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            taken = self.batch.take_back()
            if taken:
                self._keep(taken, counted=True)
                LOG.warning("kept %d unsynced message(s) to write again "
                            "once there is room (unacked: not returned to "
                            "the broker)", len(taken))
            self._apply(self.backpressure.disk_full(
                "disk full under %s" % self.directory))
        else:
            requeued = self.batch.requeue()
            if requeued:
                LOG.warning("requeued %d unsynced message(s)", requeued)
            LOG.critical("stopping: the archive directory is not writable "
                         "(%s)", exc)
            self.stopping = STOP_FAILED
        self._ship(closed)

    # -- backpressure ------------------------------------------------------

    def _apply(self, change):
        """Do what the backpressure decided: cancel the consumers (after
        acking what is written), or resume them."""
        if change is None:
            return
        if change.action == backpressure_mod.PAUSE:
            LOG.critical(W_PAUSED, ", ".join(q.name for q in self.queues),
                         change.reason)
            if not change.was_paused:
                self._commit()
                self._cancel_consumers()
                self.stats.paused = True
            return
        self.stats.paused = False
        LOG.warning(W_RESUMED, change.reason)
        # before any new delivery: an ack of a later one acks these too
        waiting, self._waiting = self._waiting, []
        self._waiting_since = None
        for queue, message, counted in waiting:
            self.on_message(queue, message, counted)
        if self.paused:  # the disk refused one of them: still full
            return
        self._hold_expired = False
        cancelled, self._cancelled = self._cancelled, []
        for consumer in cancelled:
            self.streams.position(consumer)
            consumer.consume()

    def _keep(self, messages, counted=False):
        """Keep delivered messages, ``[(queue, message)]``, unacked until
        the pause ends (``counted``: see :meth:`on_message`)."""
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.extend((queue, message, counted)
                             for queue, message in messages)

    def _give_back_waiting(self):
        """Messages kept for :data:`HOLD_MAX` seconds: give them back to
        the broker before it closes the channel for holding them unacked
        too long (its consumer timeout, 30 minutes by default), and cancel
        every consumer until consumption resumes (so none is kept
        again)."""
        waiting, self._waiting = self._waiting, []
        self._waiting_since = None
        self._hold_expired = True
        self._cancel_consumers(everyone=True)
        for _, message, _ in waiting:
            self.batch.requeue_one(message)
        LOG.warning("paused with messages kept for %.0f minutes: gave %d "
                    "kept message(s) back to the broker", HOLD_MAX / 60,
                    len(waiting))

    def _read_limits(self, connection):
        """The broker's version, and what it means for each queue's
        delivery limit; said once per version (see
        :func:`~shoebox_worker.consume.rabbitmq.limit_warning`)."""
        version = rabbitmq.server_version(connection)
        if version == self._server_version and self._limits is not None:
            return
        self._server_version = version
        self._limits = {}
        for consumer in self.config.consumers:
            limit = rabbitmq.delivery_limit(version, consumer)
            if limit is not None:
                self._limits[consumer.queue] = limit
            warning = rabbitmq.limit_warning(version, consumer)
            if warning is not None:
                LOG.warning("%s", warning)

    def _count_returns(self, queue, message, now):
        """A message that was returned to the broker before (it carries an
        ``x-delivery-count``: a quorum queue's) is counted; when its queue
        has a delivery limit and the message comes near it, say so (once a
        minute at most)."""
        returns = (message.headers or {}).get("x-delivery-count")
        if not returns:
            return
        self.stats.redelivered(queue)
        limit = (self._limits or {}).get(queue)
        if limit is not None and returns * 2 >= limit and \
                now - self._redelivery_logged >= REDELIVERY_LOG_INTERVAL:
            self._redelivery_logged = now
            LOG.warning(W_RETURNS, message.properties.get("message_id")
                        or message.delivery_tag, queue, returns, limit)

    def _cancel_consumers(self, everyone=False):
        """Stop deliveries while paused: a stream's consumers are
        cancelled (their messages are acked as credit, and a stream would
        deliver for ever); the others stay, and their deliveries are kept
        unacked, which fills the prefetch window and stops them with no
        frame sent. (A ``basic.cancel`` on a quorum queue of RabbitMQ 3.10
        returns the deliveries under way to the queue, each a delivery
        attempt spent; seen here.)

        :param everyone: cancel every consumer (kept messages were given
            back).
        """
        for consumer in self._consumers:
            if consumer in self._cancelled or not everyone and not any(
                    self.streams.get(queue.name) is not None
                    for queue in consumer.queues):
                continue
            self._cancelled.append(consumer)
            try:
                consumer.cancel()
            except Exception:  # a dead channel; reconnect recreates them
                LOG.debug("cancel failed", exc_info=True)
