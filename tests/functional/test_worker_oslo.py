"""oslo.messaging's real Notifier -> RabbitMQ -> ``shoebox-worker run``.

Notifications are sent as nova sends them (``messagingv2`` driver, and the
older ``messaging`` v1 driver), to a control_exchange of our own, and the
worker's ``[consumer:TOPIC.PRIORITY]`` sections declare what oslo declares
(topic exchange and queue, both non-durable as ``amqp_durable_queues``
defaults): a mismatch would make oslo's or the worker's declaration fail.
"""

import json
import threading
import uuid

import pytest

pytestmark = pytest.mark.functional

oslo_messaging = pytest.importorskip("oslo_messaging")
cfg = pytest.importorskip("oslo_config.cfg")
context = pytest.importorskip("oslo_context.context")

OSLO_URL = "rabbit://guest:guest@127.0.0.1:5672/"
PUBLISHER = "compute.host1"


@pytest.fixture
def control_exchange(rabbit, names):
    """A control_exchange of our own, so it can be deleted afterwards."""
    exchange = rabbit.track_exchange(names + "-openstack")
    oslo_messaging.set_transport_defaults(control_exchange=exchange)
    yield exchange
    oslo_messaging.set_transport_defaults(control_exchange="openstack")


def _payload(driver, index):
    return {"index": index, "driver": driver,
            "display_name": "vm-\u00fc\u4e2d-%d" % index,
            "instance_id": str(uuid.UUID(int=index)),
            "nested": {"list": [1, 2.5, None, True], "empty": {}},
            "text": "quote \" backslash \\ newline \n tab \t"}


def test_oslo_notifier_end_to_end(rabbit, names, control_exchange,
                                  tmp_path, worker_procs, ft):
    topic = names
    info, error = rabbit.track_queue(topic + ".info"), \
        rabbit.track_queue(topic + ".error")
    common = {"exchange": control_exchange, "durable": False}
    config = ft.worker_config(
        tmp_path, info, control_exchange, durable=False,
        roll_checker="count", roll_options={"roll_count": 70},
        callbacks={"gzip": {}},
        consumers={error: dict(common)})
    # start the worker first: oslo routes only to queues that exist
    worker = worker_procs(config, idle_exit=3)
    assert worker.wait_for_log("consuming from", 30), worker.log_tail()

    transport = oslo_messaging.get_notification_transport(
        cfg.CONF, url=OSLO_URL)
    sent = {}   # (driver, index) -> (priority, event_type, request_id)
    try:
        for driver, count in (("messagingv2", 150), ("messaging", 50)):
            notifier = oslo_messaging.Notifier(
                transport, publisher_id=PUBLISHER, driver=driver,
                topics=[topic])
            for index in range(count):
                request_id = "req-%s" % uuid.uuid4()
                # a RequestContext, as nova passes (oslo drops plain dicts)
                ctxt = context.RequestContext(
                    request_id=request_id, user_id="u1", project_id="p1",
                    auth_token="secret-token")
                event_type = "compute.instance.update.%d" % (index % 3)
                if index % 10 == 9:
                    notifier.error(ctxt, event_type, _payload(driver, index))
                    priority = "ERROR"
                else:
                    notifier.info(ctxt, event_type, _payload(driver, index))
                    priority = "INFO"
                sent[driver, index] = (priority, event_type, request_id)
    finally:
        transport.cleanup()

    assert worker.wait(60) == 0, worker.log_tail()
    records = ft.read_archives(tmp_path / "archive")
    assert rabbit.depth(info) == 0 and rabbit.depth(error) == 0

    seen = {}
    for record in records:
        meta = record.metadata
        assert "malformed" not in meta, meta
        notification = json.loads(record.payload)
        payload = notification["payload"]
        key = payload["driver"], payload["index"]
        assert key not in seen, "archived twice: %r" % (key,)
        seen[key] = notification["message_id"]
        priority, event_type, request_id = sent[key]
        # the payload is exactly what was sent, after a JSON round trip
        assert payload == _payload(*key)
        assert notification["event_type"] == event_type
        assert meta["event_type"] == event_type
        assert meta["publisher_id"] == PUBLISHER
        assert meta["priority"] == priority
        assert meta["request_id"] == request_id
        assert notification["_context_request_id"] == request_id
        assert notification["_context_project_id"] == "p1"
        assert meta["message_id"] == notification["message_id"]
        assert meta["timestamp"] == notification["timestamp"]
        queue = "%s.%s" % (topic, priority.lower())
        assert meta["queue"] == queue and meta["routing_key"] == queue
        if key[0] == "messagingv2":
            # the record is the oslo.message string, not re-serialised
            assert b"oslo.version" not in record.payload
    assert set(seen) == set(sent)
    assert len(set(seen.values())) == len(sent)  # distinct message_ids
    assert len(records) == len(sent)             # each exactly once


# -- the archiver's own queue, beside Ceilometer ------------------------------

#: Three services, each publishing to its own control_exchange.
SERVICES = ("nova", "glance", "neutron")
#: What each of them sends on each topic.
INFO, ERROR = 20, 5
DEFAULT_QUEUES = ("notifications.info", "notifications.error",
                  "versioned_notifications.info",
                  "versioned_notifications.error")


class CeilometerEndpoint:
    """A notification endpoint as Ceilometer's: info() only, so its
    listener consumes the default queue notifications.info."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = []  # (publisher_id, the test's id, oslo's message_id)

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        with self.lock:
            self.seen.append((publisher_id, payload["sent_id"],
                              metadata["message_id"]))
        return oslo_messaging.NotificationResult.HANDLED

    def count(self):
        with self.lock:
            return len(self.seen)


def _transport(control_exchange):
    """A notification transport of its own config, whose notifiers publish
    to ``control_exchange`` (oslo reads it when the driver is made)."""
    oslo_messaging.set_transport_defaults(control_exchange=control_exchange)
    try:
        return oslo_messaging.get_notification_transport(cfg.ConfigOpts(),
                                                         url=OSLO_URL)
    finally:
        oslo_messaging.set_transport_defaults(control_exchange="openstack")


def test_own_queue_gets_a_copy_while_ceilometer_drains_the_default_queue(
        rabbit, names, tmp_path, worker_procs, ft):
    exchanges = {service: rabbit.track_exchange("%s-%s" % (names, service))
                 for service in SERVICES}
    own = rabbit.track_queue(names + "-archiver")
    # the services' default queues: oslo's notifier and listener declare
    # them on the shared vhost; delete those that this test makes
    for queue in DEFAULT_QUEUES:
        if rabbit.depth(queue) is None:
            rabbit.track_queue(queue)
    # the archiver's own durable quorum queue, bound to the three
    # exchanges (which no service has declared yet) with both topics, as
    # the sample config is to Ceilometer's 14
    config = ft.worker_config(
        tmp_path, own, ", ".join(exchanges.values()),
        routing_key="notifications.*, versioned_notifications.*",
        durable=True, roll_checker="count", roll_options={"roll_count": 40},
        callbacks={"gzip": {}},
        consumer_options={"exchange_durable": False,
                          "queue_arguments": "x-queue-type=quorum"})
    worker = worker_procs(config, idle_exit=3)
    assert worker.wait_for_log("consuming from", 30), worker.log_tail()
    assert "routing_key is not set" not in worker.log

    # Ceilometer: one listener on notifications.info of every exchange
    endpoint = CeilometerEndpoint()
    listener_transport = _transport("unused")
    listener = oslo_messaging.get_notification_listener(
        listener_transport,
        [oslo_messaging.Target(topic="notifications", exchange=exchange)
         for exchange in exchanges.values()],
        [endpoint], executor="threading")
    listener.start()
    transports = []
    sent = {}  # the test's id -> (exchange, routing key, publisher_id)
    try:
        for service, exchange in exchanges.items():
            transport = _transport(exchange)
            transports.append(transport)
            publisher = "%s.host1" % service
            # as nova does: a legacy and a versioned notifier
            for topic in ("notifications", "versioned_notifications"):
                notifier = oslo_messaging.Notifier(
                    transport, publisher_id=publisher, driver="messagingv2",
                    topics=[topic])
                for index in range(INFO + ERROR):
                    sent_id = str(uuid.uuid4())
                    ctxt = context.RequestContext(request_id="req-%s"
                                                  % sent_id)
                    payload = {"sent_id": sent_id, "index": index}
                    if index < INFO:
                        notifier.info(ctxt, "%s.thing.update" % service,
                                      payload)
                        priority = "info"
                    else:
                        notifier.error(ctxt, "%s.thing.error" % service,
                                       payload)
                        priority = "error"
                    sent[sent_id] = (exchange, "%s.%s" % (topic, priority),
                                     publisher)
        expected_ceilometer = {
            sent_id for sent_id, (_, key, _) in sent.items()
            if key == "notifications.info"}
        ft.wait_until(lambda: endpoint.count() >= len(expected_ceilometer),
                      60, message="Ceilometer's listener to get %d"
                      % len(expected_ceilometer))
    finally:
        listener.stop()
        listener.wait()
        for transport in transports + [listener_transport]:
            transport.cleanup()
    assert worker.wait(90) == 0, worker.log_tail()

    # Ceilometer got every info notification of the three services, once
    got = {}
    for publisher, sent_id, message_id in endpoint.seen:
        assert sent_id not in got, "Ceilometer got one twice"
        got[sent_id] = message_id
        assert publisher == sent[sent_id][2]
    assert len(expected_ceilometer) == len(SERVICES) * INFO
    assert set(got) == expected_ceilometer

    # the archiver got every message of every topic and priority, once,
    # each with its exchange
    records = ft.read_archives(tmp_path / "archive")
    archived = {}
    for record in records:
        meta = record.metadata
        assert "malformed" not in meta, meta
        notification = json.loads(record.payload)
        sent_id = notification["payload"]["sent_id"]
        assert sent_id not in archived, "archived twice"
        archived[sent_id] = (meta["exchange"], meta["routing_key"],
                             meta["publisher_id"])
        assert meta["queue"] == own
        assert meta["message_id"] == notification["message_id"]
        if sent_id in got:  # the very message Ceilometer got
            assert meta["message_id"] == got[sent_id]
    assert len(sent) == len(SERVICES) * 2 * (INFO + ERROR)
    assert archived == sent
    # nobody consumes the other default queues: they fill up (what
    # [metrics] watch_queues is for)
    assert rabbit.depth("notifications.info") == 0
    assert rabbit.depth(own) == 0
    assert rabbit.depth("notifications.error") >= len(SERVICES) * ERROR
