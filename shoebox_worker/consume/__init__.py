"""Consuming: from the broker's queues into archives, acked after fsync.

``worker`` (kombu's hooks), ``envelope`` (oslo.messaging's envelope, both
ways), ``broker`` (connection and declarations), ``runner`` (one worker
process), ``supervisor`` (N of them), ``stats`` and ``metrics``.
"""
