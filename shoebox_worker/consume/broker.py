"""Connecting and declaring, with the one error operators hit most.

oslo.messaging declares its exchanges and queues non-durable unless
``amqp_durable_queues`` is set, and RabbitMQ refuses
(``PRECONDITION_FAILED``) a declaration that differs from the existing
one. :func:`declare` runs the worker's declarations once at start and
turns that refusal into one line saying which ``[consumer:QUEUE]`` option
to change, instead of a reconnect loop.
"""

import logging

from shoebox_worker import exceptions

__all__ = ["declare"]

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
