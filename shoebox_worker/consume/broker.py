"""Connecting, declaring, and reading from the broker.

oslo.messaging declares its exchanges and queues non-durable unless
``amqp_durable_queues`` is set, and RabbitMQ refuses
(``PRECONDITION_FAILED``) a declaration that differs from the existing
one. :func:`declare` runs the worker's declarations once at start and
turns that refusal into one line saying which ``[consumer:QUEUE]`` option
to change, instead of a reconnect loop.

:func:`is_amqp` tells py-amqp (one frame acks a whole batch) from kombu's
virtual transports (memory, redis: one ack per message), and
:class:`BlockingReads` is the AMQP-only read loop the worker uses for
throughput.
"""

import logging
import socket
import struct

from kombu import mixins

from shoebox_worker import exceptions

__all__ = ["declare", "is_amqp", "BlockingReads"]

LOG = logging.getLogger(__name__)

#: AMQP reply code for PRECONDITION_FAILED.
PRECONDITION_FAILED = 406


def declare(worker):
    """Connect (retrying as configured) and declare every queue.

    :raises ConfigError: the broker refused a declaration because an
        existing exchange or queue has other flags.
    """
    conn = worker.connection
    conn.ensure_connection(worker.on_connection_error,
                           worker.connect_max_retries,
                           callback=worker.check_stop)
    try:
        _declare_all(worker, conn)
    finally:
        # the consumer works on a clone of this connection: don't keep an
        # idle second one open for the broker to time out
        conn.release()


def _declare_all(worker, conn):
    for queue, consumer in zip(worker.queues, worker.config.consumers,
                               strict=True):
        if not consumer.declare:
            continue
        channel = conn.channel()
        try:
            queue(channel).declare()
        except conn.channel_errors as exc:
            if getattr(exc, "reply_code", getattr(exc, "code", None)) != \
                    PRECONDITION_FAILED:
                raise
            raise exceptions.ConfigError(
                "the broker refused the declaration: %s. The exchange or "
                "queue already exists with other flags: set durable, "
                "exchange_durable, auto_delete and queue_arguments to what "
                "the services declared (oslo.messaging declares "
                "non-durable unless amqp_durable_queues = true), or "
                "declare = false" % (getattr(exc, "reply_text", None) or exc),
                filename=worker.config.filename,
                section="consumer:%s" % consumer.queue) from None
        finally:
            try:
                channel.close()
            except Exception:  # closed by the broker after the error
                pass


def is_amqp(connection):
    """True on py-amqp (RabbitMQ), False on kombu's virtual transports."""
    return getattr(connection.transport, "driver_type", "") == "amqp"


class BlockingReads(mixins.ConsumerMixin):
    """kombu's consume loop, reading AMQP without a Python-level timeout.

    ``ConsumerMixin.consume`` drains with ``timeout=safety_interval``, so
    CPython polls before every ``recv()`` (py-amqp makes about nine per
    message) and py-amqp sets and resets the socket timeout on every call.
    Here the socket stays blocking with a kernel receive timeout
    (``SO_RCVTIMEO`` of :attr:`receive_timeout` seconds), which py-amqp
    turns into the same ``socket.timeout`` when no frame starts in time, so
    ``on_iteration``, heartbeats and the stop flag still run while the queue
    is idle. Other transports use kombu's loop unchanged.

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
        if not is_amqp(self.connection):
            yield from super().consume(limit, timeout, safety_interval,
                                       **kwargs)
            return
        with self.consumer_context(**kwargs) as (conn, channel, consumers):
            sock = conn.connection.sock
            sock.settimeout(None)
            seconds = int(self.receive_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", seconds, int(
                                (self.receive_timeout - seconds) * 1e6)))
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
