"""What RabbitMQ's versions differ in, for this worker: in one place.

The version is read from what the server says of itself when a
connection opens (``server_properties["version"]``, ``"4.0.5"``), never
guessed; kombu's virtual transports (redis, memory) have none.

**Delivery limits.** A quorum queue drops a message that was returned to
it too many times, or dead-letters it when the queue has a dead-letter
exchange. RabbitMQ 4.0 and later give every quorum queue a limit of
:data:`DEFAULT_DELIVERY_LIMIT` (20); on 3.x only ``x-delivery-limit`` sets
one. A message is returned, and its ``x-delivery-count`` raised by one,
when it is nacked or rejected with requeue, and when the channel holding
it unacked closes (seen on 4.0.5: a connection closed with one message
unacked, three times: ``x-delivery-count`` 1, 2, 3). The worker returns
nothing while its connection lives (what a full disk refused, and what
comes while it pauses, is kept unacked: :mod:`~shoebox_worker.consume.
worker`), so only a lost connection (a restart, a broker outage, a kill),
messages kept longer than :data:`HOLD_MAX`, or a write error other than
a full disk (the worker then stops) spends an attempt.
:func:`delivery_limit` says what applies to a queue, from its
``queue_arguments`` and the version (a policy on the broker may set
either, and the worker cannot see policies); :func:`limit_warning` is the
one line said at start when messages could be dropped.

**Deprecated features.** RabbitMQ 4 refuses a deprecated feature that its
configuration does not permit with ``INTERNAL_ERROR`` ("Feature
`transient_nonexcl_queues` is deprecated. Its use is not permitted ..."),
closing the connection; 4.3 denies transient non-exclusive queues and
global QoS by default. :data:`DEPRECATED` says, for each feature a
declaration of ours can use, the ``[consumer:QUEUE]`` option to change
and how; :func:`config_warnings` finds them in a config before any broker
is asked (``check-config``). The worker never asks for global QoS (its
prefetch is per consumer).
"""

import re

__all__ = ["DEFAULT_DELIVERY_LIMIT", "DEPRECATED", "HOLD_MAX",
           "config_warnings",
           "delivery_limit", "limit_warning", "server_version"]

#: The delivery limit RabbitMQ 4.0 and later give a quorum queue that sets
#: none.
DEFAULT_DELIVERY_LIMIT = 20
#: The first version with :data:`DEFAULT_DELIVERY_LIMIT`.
LIMIT_BY_DEFAULT_SINCE = (4, 0)
#: Seconds a paused worker may keep delivered messages unacked before it
#: gives them back to the broker (once): under RabbitMQ's consumer timeout
#: (30 minutes by default), which closes the channel of a consumer that
#: holds a message unacked for longer.
HOLD_MAX = 900.0

#: ``{feature: ([consumer:QUEUE] option, what to do)}``.
DEPRECATED = {
    "transient_nonexcl_queues": (
        "durable", "set durable = true (RabbitMQ 4.3 and later refuse "
                   "queues that are neither durable nor exclusive, unless "
                   "deprecated_features.permit.transient_nonexcl_queues = "
                   "true), and make it a quorum queue on a cluster"),
    "queue_master_locator": (
        "queue_arguments", "use x-queue-leader-locator instead of "
                           "x-queue-master-locator (deprecated since "
                           "RabbitMQ 4.0)"),
}

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def server_version(connection):
    """The version the broker of a kombu ``connection`` (connected) said
    it runs, as ``(major, minor, patch)``; None when it said none (kombu's
    virtual transports)."""
    properties = getattr(getattr(connection, "connection", None),
                         "server_properties", None) or {}
    text = properties.get("version")
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    match = _VERSION.match(text or "")
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def version_text(version):
    return ".".join(map(str, version)) if version else "unknown"


def delivery_limit(version, consumer):
    """How many times a message of ``consumer``'s queue may be returned
    before the broker drops (or dead-letters) it, as far as the config and
    the version tell; None when no limit applies (a classic queue or a
    stream, or a quorum queue on 3.x without ``x-delivery-limit``).

    :param version: :func:`server_version`'s.
    :param consumer: a :class:`~shoebox_worker.config.ConsumerConfig`.
    """
    arguments = consumer.queue_arguments
    if arguments.get("x-queue-type") != "quorum":
        return None
    limit = arguments.get("x-delivery-limit")
    if isinstance(limit, int) and not isinstance(limit, bool):
        # RabbitMQ 4 takes a negative limit for "none"
        return limit if limit >= 0 else None
    if version is not None and version >= LIMIT_BY_DEFAULT_SINCE:
        return DEFAULT_DELIVERY_LIMIT
    return None


def limit_warning(version, consumer):
    """The one line to say at start when a message of ``consumer``'s queue
    would be dropped, not dead-lettered, once returned too often, and
    nobody chose that: None when nothing can be dropped that way (no
    limit, or a dead-letter exchange in ``queue_arguments``) and when the
    config sets an ``x-delivery-limit`` of :data:`DEFAULT_DELIVERY_LIMIT`
    or more (the higher limit this line advises). RabbitMQ 4's default,
    and a limit set below it, are said."""
    limit = delivery_limit(version, consumer)
    arguments = consumer.queue_arguments
    if limit is None or arguments.get("x-dead-letter-exchange"):
        return None
    if "x-delivery-limit" in arguments and limit >= DEFAULT_DELIVERY_LIMIT:
        return None
    return ("[consumer:%s] a quorum queue on RabbitMQ %s: a message "
            "returned to it more than %d time(s) is DROPPED "
            "(x-delivery-limit %d%s, no "
            "x-dead-letter-exchange). This worker returns messages only "
            "when its connection is lost (a restart, a kill, a broker "
            "outage: every message it holds then), when it has kept "
            "messages for %d minutes while paused (a full disk, a "
            "backlog), or when the disk fails otherwise; unless a policy "
            "on the broker "
            "sets them, set x-dead-letter-exchange (and a queue bound to "
            "it), or choose an x-delivery-limit (%d or more, higher when "
            "restarts are frequent), in queue_arguments" % (
                consumer.queue, version_text(version), limit, limit,
                "" if "x-delivery-limit" in arguments
                else ": RabbitMQ 4's default", HOLD_MAX // 60,
                DEFAULT_DELIVERY_LIMIT))


def config_warnings(config):
    """One line for each part of ``config`` (a loaded
    :class:`~shoebox_worker.config.Config`) that RabbitMQ 4.x refuses, or
    will refuse, and what to write instead (``check-config``)."""
    lines = []
    for consumer in config.consumers:
        section = "[consumer:%s]" % consumer.queue
        if not consumer.durable and not consumer.is_stream:
            lines.append("%s durable = false: %s" % (
                section, DEPRECATED["transient_nonexcl_queues"][1]))
        if "x-queue-master-locator" in consumer.queue_arguments:
            lines.append("%s queue_arguments: %s" % (
                section, DEPRECATED["queue_master_locator"][1]))
    return lines
