"""Consuming: from the broker's queues into archives, acked after fsync.

``worker`` (kombu's hooks), ``envelope`` (oslo.messaging's envelope, both
ways), ``broker`` (connection and declarations), ``rabbitmq`` (what
RabbitMQ's versions differ in), ``batch`` (the only code that acks),
``backpressure`` (when to pause), ``stream`` (stream offsets), ``runner``
(one worker process), ``supervisor`` (N of them), ``stats`` and
``metrics``.
"""
