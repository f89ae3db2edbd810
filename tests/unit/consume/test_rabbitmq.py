"""Tests for shoebox_worker.consume.rabbitmq: what the versions differ in."""

import types

import pytest

from shoebox_worker import config as config_mod
from shoebox_worker.consume import rabbitmq


def connection(version):
    """A connected kombu connection as far as server_version reads it."""
    return types.SimpleNamespace(connection=types.SimpleNamespace(
        server_properties={"version": version} if version is not None
        else {}))


@pytest.mark.parametrize("said, version", [
    ("4.0.5", (4, 0, 5)), (b"3.10.8", (3, 10, 8)), ("4.1", (4, 1, 0)),
    ("4.2.0-rc.1", (4, 2, 0)), (None, None), ("", None), ("unknown", None),
])
def test_server_version(said, version):
    assert rabbitmq.server_version(connection(said)) == version


def test_no_version_on_virtual_transports():
    assert rabbitmq.server_version(types.SimpleNamespace()) is None


def consumer(**arguments):
    return types.SimpleNamespace(queue="q", queue_arguments=arguments,
                                 durable=True, is_stream=arguments.get(
                                     "x-queue-type") == "stream")


@pytest.mark.parametrize("version, arguments, limit", [
    ((4, 0, 5), {"x-queue-type": "quorum"}, 20),
    ((4, 3, 0), {"x-queue-type": "quorum"}, 20),
    ((3, 10, 8), {"x-queue-type": "quorum"}, None),
    (None, {"x-queue-type": "quorum"}, None),
    ((3, 10, 8), {"x-queue-type": "quorum", "x-delivery-limit": 5}, 5),
    ((4, 0, 5), {"x-queue-type": "quorum", "x-delivery-limit": 50}, 50),
    ((4, 0, 5), {"x-queue-type": "quorum", "x-delivery-limit": 0}, 0),
    ((4, 0, 5), {"x-queue-type": "quorum", "x-delivery-limit": -1}, None),
    ((4, 0, 5), {}, None),
    ((4, 0, 5), {"x-queue-type": "classic", "x-delivery-limit": 3}, None),
    ((4, 0, 5), {"x-queue-type": "stream"}, None),
])
def test_delivery_limit(version, arguments, limit):
    assert rabbitmq.delivery_limit(version, consumer(**arguments)) == limit


def test_limit_warning_only_without_a_dead_letter_exchange():
    quorum = consumer(**{"x-queue-type": "quorum"})
    warning = rabbitmq.limit_warning((4, 0, 5), quorum)
    assert warning.startswith("[consumer:q] a quorum queue on RabbitMQ "
                              "4.0.5: a message returned to it more than "
                              "20 time(s) is DROPPED (x-delivery-limit 20: "
                              "RabbitMQ 4's default, no "
                              "x-dead-letter-exchange)")
    assert rabbitmq.limit_warning((3, 10, 8), quorum) is None
    dead_lettered = consumer(**{"x-queue-type": "quorum",
                                "x-dead-letter-exchange": "dlx"})
    assert rabbitmq.limit_warning((4, 0, 5), dead_lettered) is None
    set_here = consumer(**{"x-queue-type": "quorum", "x-delivery-limit": 3})
    assert "(x-delivery-limit 3, no" in rabbitmq.limit_warning(
        (3, 10, 8), set_here)
    assert warning.endswith("or choose an x-delivery-limit (20 or more, "
                            "higher when restarts are frequent), in "
                            "queue_arguments")
    # what the line advises silences it: a limit chosen, the default or
    # more, on either version
    for chosen in (20, 1000):
        higher = consumer(**{"x-queue-type": "quorum",
                             "x-delivery-limit": chosen})
        assert rabbitmq.limit_warning((4, 0, 5), higher) is None
        assert rabbitmq.limit_warning((3, 10, 8), higher) is None
    below = consumer(**{"x-queue-type": "quorum", "x-delivery-limit": 19})
    assert "(x-delivery-limit 19, no" in rabbitmq.limit_warning(
        (4, 0, 5), below)


def load(tmp_path, consumers):
    path = tmp_path / "w.conf"
    path.write_text("[broker]\nurl = memory://\n%s\n[archive]\n"
                    "working_directory = %s\n" % (consumers, tmp_path))
    return config_mod.load(str(path), environ={})


def test_config_warnings(tmp_path):
    conf = load(tmp_path, (
        "[consumer:transient]\nexchange = nova\n"
        "[consumer:fine]\nexchange = nova\ndurable = true\n"
        "queue_arguments = x-queue-type=quorum\n"
        "[consumer:located]\nexchange = nova\ndurable = true\n"
        "queue_arguments = x-queue-master-locator=min-masters\n"))
    lines = rabbitmq.config_warnings(conf)
    assert [line.split(" ", 1)[0] for line in lines] == [
        "[consumer:transient]", "[consumer:located]"]
    assert "durable = false: set durable = true" in lines[0]
    assert "x-queue-leader-locator" in lines[1]


def test_a_stream_is_no_transient_queue(tmp_path):
    conf = load(tmp_path, "[consumer:s]\nexchange = nova\ndurable = true\n"
                          "queue_arguments = x-queue-type=stream\n")
    assert rabbitmq.config_warnings(conf) == []
