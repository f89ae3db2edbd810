"""The batch of messages written but not acked yet: the one home for acks.

The worker decides what happens to a message (:meth:`Worker.on_message
<shoebox_worker.consume.worker.Worker.on_message>`); a :class:`Batch`
carries it out, and is the only code that acks, requeues or nacks:

- :meth:`Batch.add` a message once its record is written;
- :meth:`Batch.commit` fsyncs the archive (the ``sync`` passed in), then
  acks every message of the batch: one ``basic.ack(multiple=True)`` on
  AMQP, one ack per message on kombu's virtual transports (memory, redis),
  which ack one delivery tag at a time;
- :meth:`Batch.requeue` gives the batch back to the broker when its records
  could not be synced (one ``basic.nack(multiple=True, requeue=True)`` on
  AMQP), and :meth:`requeue_one` a message that was not written at all. A
  stream queue takes nothing back (RabbitMQ closes the connection on a
  ``basic.nack`` or ``basic.reject`` of its message): its messages are
  acked instead, which only gives credit, and the worker reads them again
  from the stream when it subscribes after the last offset synced
  (:mod:`~shoebox_worker.consume.stream`);
- :meth:`Batch.take_back` empties the batch for the worker to write its
  messages again itself, once the disk has room, without a word to the
  broker: they stay unacked there, and no delivery attempt is spent (a
  quorum queue drops, or dead-letters, a message returned too often:
  :mod:`~shoebox_worker.consume.rabbitmq`). A stream's are acked, as
  :meth:`Batch.requeue` does;
- :meth:`Batch.forget` drops the batch when the connection was lost: the
  broker delivers those messages again by itself (their records stay in the
  archive: duplicates are possible, losses are not).

If ``sync`` fails, nothing is acked, the batch is kept for the caller to
requeue, and :class:`SyncFailed` carries the error: an error of the ack
itself (the connection is gone: an ``OSError`` too) is not one, and
propagates for kombu to reconnect.
"""

import logging

from amqp import spec as amqp_spec

__all__ = ["Batch", "SyncFailed"]

LOG = logging.getLogger(__name__)

#: ``basic.nack``'s arguments: delivery-tag (longlong), multiple and
#: requeue (bits), as py-amqp packs them.
NACK_ARGS = "Lbb"


def _nack_up_to(message):
    """One ``basic.nack(multiple=True, requeue=True)`` for ``message`` and
    every earlier unacked delivery of its channel.

    py-amqp's channel receives nacks (publisher confirms) but has no method
    to send one (no ``basic_nack``): the frame goes through its generic
    ``send_method``.
    """
    message.channel.send_method(amqp_spec.Basic.Nack, NACK_ARGS,
                                (message.delivery_tag, True, True))


class SyncFailed(Exception):
    """The archive could not be synced; nothing was acked.

    :ivar error: the ``OSError`` of the sync.
    """

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class Batch:
    """Written, unacked messages, and how to ack or requeue them.

    :param sync: called with no argument before acking; must make every
        record written so far durable (flush and fsync), or raise.
    """

    def __init__(self, sync):
        self._sync = sync
        self._messages = []
        #: When the oldest message of the batch was added.
        self.since = 0.0
        #: Ack and requeue a batch with one frame (py-amqp), or message by
        #: message (kombu's virtual transports). Set per connection.
        self.multiple = False

    def __len__(self):
        return len(self._messages)

    def add(self, message, now, stream=False, queue=None):
        """Take a message whose record is written (not yet synced).

        :param now: the monotonic time (kept in :attr:`since` when the
            batch was empty).
        :param stream: the message is a stream queue's (never requeued).
        :param queue: its queue's name, given back by :meth:`take_back`.
        """
        if not self._messages:
            self.since = now
        self._messages.append((message, stream, queue))

    def commit(self):
        """Sync, then ack the whole batch.

        :returns: how many messages were acked.
        :raises SyncFailed: ``sync`` raised an ``OSError``; nothing was
            acked, the batch is kept.
        """
        if not self._messages:
            return 0
        try:
            self._sync()
        except OSError as exc:
            raise SyncFailed(exc) from exc
        messages, self._messages = self._messages, []
        if self.multiple:
            messages[-1][0].ack(multiple=True)
        else:
            for message, _, _ in messages:
                message.ack()
        return len(messages)

    def requeue(self):
        """Give every message of the batch back to the broker (a stream's:
        ack it, see above). On AMQP, one nack of the last when no message
        is a stream's, else one frame per message: a nack of several
        would reach the stream's too.

        :returns: how many messages were given back.
        """
        messages, self._messages = self._messages, []
        if not messages:
            return 0
        if self.multiple and not any(stream for _, stream, _ in messages):
            _nack_up_to(messages[-1][0])
        else:
            for message, stream, _ in messages:
                self.requeue_one(message, stream)
        return len(messages)

    def take_back(self):
        """Empty the batch; its messages (not a stream's, which are acked:
        see above) go back to the caller, still unacked on the broker.

        :returns: ``[(queue, message)]`` in the order they were added.
        """
        messages, self._messages = self._messages, []
        kept = []
        for message, stream, queue in messages:
            if stream:
                message.ack()
            else:
                kept.append((queue, message))
        return kept

    @staticmethod
    def requeue_one(message, stream=False):
        """Give back a message that was not written (and not added); a
        stream's is acked (see above)."""
        if stream:
            message.ack()
        else:
            message.requeue()

    def forget(self):
        """Drop the batch without a word to the broker: its channel is gone
        and the broker delivers those messages again.

        :returns: how many messages were dropped.
        """
        count, self._messages = len(self._messages), []
        return count
