"""oslo.messaging's real Notifier -> RabbitMQ -> ``shoebox-worker run``.

Notifications are sent as nova sends them (``messagingv2`` driver, and the
older ``messaging`` v1 driver), to a control_exchange of our own, and the
worker's ``[consumer:TOPIC.PRIORITY]`` sections declare what oslo declares
(topic exchange and queue, both non-durable as ``amqp_durable_queues``
defaults): a mismatch would make oslo's or the worker's declaration fail.
"""

import json
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
