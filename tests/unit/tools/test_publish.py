"""Tests for shoebox_worker.tools.publish that need no broker: the pacer,
the replay envelope, a broker that is down. Publishing to RabbitMQ is in
tests/functional/test_generator_publish.py and test_tools_commands.py."""

import json

import pytest

from shoebox_worker.tools import ToolError
from shoebox_worker.tools import publish


class TestPacer:
    def test_no_rate_never_sleeps(self, monkeypatch):
        monkeypatch.setattr(publish.time, "sleep", pytest.fail)
        pacer = publish.Pacer(None)
        for sent in range(1000):
            pacer.wait(sent)

    def test_sleeps_until_due(self, monkeypatch):
        now = [100.0]
        slept = []
        monkeypatch.setattr(publish.time, "monotonic", lambda: now[0])
        monkeypatch.setattr(publish.time, "sleep", slept.append)
        pacer = publish.Pacer(10)
        pacer.wait(0)
        assert slept == []
        pacer.wait(5)  # due at 100.5
        assert slept == [pytest.approx(0.5)]
        now[0] = 101.0  # behind schedule: no sleep
        pacer.wait(6)
        assert len(slept) == 1

    @pytest.mark.parametrize("rate", [0, -1])
    def test_refuses_bad_rate(self, rate):
        with pytest.raises(ValueError):
            publish.Pacer(rate)


class TestReplayEnvelope:
    def test_notification_text_kept(self):
        text = b'{"event_type": "x",\n "n": 1}'
        body = publish._envelope({"event_type": "x"}, text)
        assert json.loads(body) == {"oslo.version": "2.0",
                                    "oslo.message": text.decode()}

    @pytest.mark.parametrize("metadata,payload", [
        ({"malformed": "not JSON"}, b"{}"),
        ({}, b"\xff\xfe"),
        ({}, b"not json"),
    ])
    def test_not_a_notification(self, metadata, payload):
        assert publish._envelope(metadata, payload) is None


def test_connect_to_a_broker_that_is_down_is_one_line():
    with pytest.raises(ToolError) as info:
        publish.connect("amqp://guest:secret@127.0.0.1:1//")
    text = str(info.value)
    assert text.startswith("broker amqp://guest:***@127.0.0.1:1//: ")
    assert "\n" not in text and "secret" not in text
