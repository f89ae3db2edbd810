"""Tests for shoebox_worker.tools.publish that need no broker: the pacer,
the replay envelope, the outcome's lines, the broker errors' lines, the
progress bar. Publishing to RabbitMQ is in
tests/functional/test_generator_publish.py and test_tools_commands.py."""

import argparse
import json
import socket
import ssl
import time
import types

import amqp.exceptions
import kombu.exceptions
import pytest
from kombu import Exchange

from shoebox_worker.consume import broker
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError
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


class TestOutcome:
    def test_all_confirmed(self):
        outcome = publish.Outcome(sent=5, confirmed=5)
        assert outcome.summary() == "5 confirmed"
        assert outcome.lost == 0
        assert outcome.error("nova", "k") is None

    def test_returned_and_nacked(self):
        outcome = publish.Outcome(sent=6, confirmed=0, returned=5, nacked=1)
        assert outcome.summary() == "0 confirmed, 5 returned, 1 nacked"
        err = outcome.error("nova", "nobody.listens", "bind one")
        assert isinstance(err, ToolError)
        assert str(err) == (
            "5 of 6 returned: no queue is bound to exchange nova with "
            "routing key nobody.listens: bind one; 1 of 6 nacked: the "
            "broker refused them (see its log)")


URL = "amqp://guest:secret@127.0.0.1:5672//"


def _amqp(cls, text, method=(40, 10)):
    return cls(reply_text=text, method_sig=method)


class _NoConfirms:
    """A channel whose broker never confirms (what a quorum queue without
    its majority does): confirm_select, the ack and nack events, and a
    drain_events that times out."""

    def __init__(self):
        self.events = {"basic_ack": set(), "basic_nack": set(),
                       "basic_return": set()}
        self.connection = self

    def confirm_select(self):
        pass

    def drain_events(self, timeout):
        time.sleep(min(timeout, 0.01))
        raise socket.timeout()


class TestSender:
    @staticmethod
    def sender(monkeypatch, window=2, timeout=0.05):
        monkeypatch.setattr(publish, "CONFIRM_WINDOW", window)
        monkeypatch.setattr(publish, "CONFIRM_TIMEOUT", timeout)
        sender = publish._Sender(_NoConfirms(), Exchange("x"), "k")
        sent = []
        sender._producer = types.SimpleNamespace(
            publish=lambda body, **kwargs: sent.append(body))
        return sender, sent

    def test_a_full_window_without_confirms_stops_the_run(self,
                                                          monkeypatch):
        sender, sent = self.sender(monkeypatch)
        sender.send(b"1")
        sender.send(b"2")
        with pytest.raises(publish.ConfirmTimeout) as caught:
            sender.send(b"3")
        assert len(sent) == 3
        assert sender.outcome == publish.Outcome(sent=3, unconfirmed=3)
        assert str(caught.value).startswith(
            "the broker confirmed none of 3 messages for 0 s: stopped "
            "after 3 sent (0 confirmed, 3 unconfirmed;")

    def test_confirms_are_counted_as_they_come(self, monkeypatch):
        # a run that a broker error ends has the confirms so far
        sender, _ = self.sender(monkeypatch, window=10)
        for body in (b"1", b"2", b"3"):
            sender.send(body)
        sender._on_return(None, "x", "k", None)  # 3 is returned...
        sender._on_ack(2, True)
        sender._on_ack(3, False)  # ... and then acked
        assert sender.outcome == publish.Outcome(sent=3, confirmed=2,
                                                 returned=1)
        sender.send(b"4")
        sender.give_up()  # a broker error: 4 will get no answer
        assert sender.outcome == publish.Outcome(sent=4, confirmed=2,
                                                 returned=1, unconfirmed=1)
        assert sender.finish() == sender.outcome  # nothing left to wait for


class TestBrokerError:
    @pytest.mark.parametrize("err,hint", [
        (_amqp(amqp.exceptions.NotFound,
               "NOT_FOUND - no exchange 'x' in vhost '/'"),
         publish.PERMANENT_HINTS[404]),
        (_amqp(amqp.exceptions.AccessRefused,
               "ACCESS_REFUSED - access to exchange 'x' in vhost '/' "
               "refused for user 'u'"),
         publish.PERMANENT_HINTS[403]),
        (_amqp(amqp.exceptions.AccessRefused,
               "ACCESS_REFUSED - Login was refused using authentication "
               "mechanism PLAIN.", (0, 0)),
         publish.LOGIN_HINT),
        (_amqp(amqp.exceptions.PreconditionFailed,
               "PRECONDITION_FAILED - inequivalent arg 'durable'"),
         publish.PERMANENT_HINTS[406]),
        (_amqp(amqp.exceptions.NotAllowed,
               "NOT_ALLOWED - vhost v not found", (10, 40)),
         publish.PERMANENT_HINTS[530]),
    ])
    def test_permanent_says_retrying_will_not_help(self, err, hint):
        assert publish.is_permanent(err)
        text = str(publish.broker_error(URL, err))
        assert text.startswith("broker amqp://guest:***@127.0.0.1:5672//: ")
        assert text.endswith("; retrying will not help: " + hint)
        assert "\n" not in text and "secret" not in text

    def test_command_hint_replaces_the_default(self):
        err = _amqp(amqp.exceptions.NotFound, "NOT_FOUND - no exchange")
        text = str(publish.broker_error(URL, err, {404: "check --exchange"}))
        assert text.endswith("retrying will not help: check --exchange")

    @pytest.mark.parametrize("config, advice", [
        (None, publish.SYSTEM_CAS_HINT),
        ("worker.conf",
         broker.TLS_PERMANENT["CERTIFICATE_VERIFY_FAILED"][1])])
    def test_an_untrusted_certificate_advises_by_the_command(self, config,
                                                             advice):
        """Without --config there is no [broker] ssl_ca_file to set."""
        verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
        verify.reason = "CERTIFICATE_VERIFY_FAILED"
        verify.verify_message = "self-signed certificate in certificate chain"
        err = kombu.exceptions.OperationalError(str(verify))
        err.__cause__ = verify
        hints = publish.tls_hints(argparse.Namespace(config=config))
        text = str(publish.broker_error(URL, err, {404: "x", **hints}))
        assert text == ("broker amqp://guest:***@127.0.0.1:5672//: TLS: "
                        "certificate verify failed: self-signed certificate "
                        "in certificate chain; retrying will not help: "
                        + advice)

    @pytest.mark.parametrize("err", [
        ConnectionRefusedError(111, "Connection refused"),
        kombu.exceptions.OperationalError("[Errno 111] Connection refused"),
    ])
    def test_unreachable_is_not_permanent(self, err):
        assert not publish.is_permanent(err)
        text = str(publish.broker_error(URL, err))
        assert "retrying will not help" not in text
        assert text.endswith("; " + publish.UNREACHABLE_HINT)



# -- where replay and generate find the broker URL --------------------------

def _args(**kwargs):
    import argparse
    return argparse.Namespace(**{"url": None, "config": None, **kwargs})


def _broker_config(tmp_path, url):
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = %s\n[consumer:q]\n[archive]\n"
                    "working_directory = %s\n" % (url, tmp_path))
    return str(path)


SECRET_URL = "amqp://u:s3cr/#;t@h//"


def test_url_from_the_config(tmp_path):
    config = _broker_config(tmp_path, SECRET_URL)
    assert publish.url_from(_args(config=config),
                            {publish.URL_VARIABLE: "memory://"}) == SECRET_URL


def test_url_from_the_environment():
    assert publish.url_from(
        _args(), {publish.URL_VARIABLE: SECRET_URL}) == SECRET_URL


def test_url_option_wins(tmp_path):
    config = _broker_config(tmp_path, SECRET_URL)
    assert publish.url_from(_args(url="memory://", config=config),
                            {publish.URL_VARIABLE: SECRET_URL}) == "memory://"


def test_no_url_says_where_to_put_one():
    with pytest.raises(ToolError) as caught:
        publish.url_from(_args(), {publish.URL_VARIABLE: " "})
    assert str(caught.value) == (
        "no broker URL: give --config FILE (its [broker] url) or set "
        "SHOEBOX_BROKER_URL (--url works too, but shows the password to "
        "every local user in ps)")


def test_a_bad_url_from_the_environment_is_one_line_without_the_password():
    with pytest.raises(ToolError) as caught:
        publish.url_from(_args(), {publish.URL_VARIABLE: "amqp://u:s3cr/et@h:x"})
    assert str(caught.value) == \
        "SHOEBOX_BROKER_URL: bad port in 'amqp://u:***@h:x'"


def test_a_bad_query_option_is_a_usage_mistake_not_a_bug():
    with pytest.raises(UsageError) as caught:
        publish.url_from(_args(), {publish.URL_VARIABLE: (
            "rabbit://nova:s3cret@127.0.0.1:1/"
            "?heartbeat_timeout_threshold=x")})
    assert str(caught.value) == (
        "SHOEBOX_BROKER_URL: heartbeat_timeout_threshold=x in the URL's "
        "query: expected a number, got 'x'")


def test_generate_publishes_to_a_url_with_any_password(monkeypatch, capsys):
    monkeypatch.setenv(publish.URL_VARIABLE, "memory://")
    import argparse
    args = argparse.Namespace(
        url=None, config=None, count=3, rate=None, exchange="nova",
        routing_key="notifications.info", durable=False, seed=1, start=None,
        queue="q")
    assert publish.cmd_generate(args) == 0
    assert "published 3 notifications" in capsys.readouterr().out
