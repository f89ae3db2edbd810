"""Tests for shoebox_worker.consume.runner: what a supervised child's
failure becomes (one log line and an exit code the supervisor acts on),
and the signals it stops on."""

import logging
import signal

import pytest

from shoebox_worker import exceptions
from shoebox_worker.consume import broker
from shoebox_worker.consume import runner


@pytest.mark.parametrize("error, code", [
    (broker.BrokerError("cannot connect to the broker x: refused"),
     runner.EXIT_BROKER),
    (exceptions.ConfigError("bad", "w.conf", "archive", "version"),
     exceptions.EXIT_USAGE),
    (exceptions.ShoeboxError("archive directory not writable"),
     exceptions.EXIT_FAILURE),
    (RuntimeError("boom"), exceptions.EXIT_FAILURE),
])
def test_run_child_turns_an_error_into_an_exit_code(monkeypatch, caplog,
                                                   error, code):
    def fails(conf, plugins, idle_exit=None, stop_signals=()):
        raise error

    monkeypatch.setattr(runner, "run_worker", fails)
    with caplog.at_level(logging.INFO, logger=runner.__name__):
        assert runner.run_child(object(), (None, [])) == code
    (record,) = [r for r in caplog.records if r.name == runner.__name__]
    assert record.getMessage() == "worker stopped: %s" % (
        exceptions.describe(error)[0])
    assert not record.exc_info  # a traceback only at DEBUG


def test_exit_broker_is_neither_success_nor_a_config_error():
    assert runner.EXIT_BROKER not in (exceptions.EXIT_OK,
                                      exceptions.EXIT_FAILURE,
                                      exceptions.EXIT_USAGE)


def test_a_supervised_child_stops_on_sigterm_alone(monkeypatch):
    # Ctrl-C reaches the whole group: the child hears it only through the
    # supervisor's one SIGTERM (see runner.run_child)
    seen = {}

    def records(conf, plugins, idle_exit=None, stop_signals=()):
        seen["stop_signals"] = stop_signals
        return 0

    monkeypatch.setattr(runner, "run_worker", records)
    assert runner.run_child(object(), (None, [])) == 0
    assert seen == {"stop_signals": (signal.SIGTERM,)}
