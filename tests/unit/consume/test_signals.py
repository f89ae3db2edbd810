"""A stop signal within a second of the last one counted is the same
stop: for the worker (shipping grace kept) and the supervisor (not passed
on twice). Injected clocks, no waiting."""

import types

import pytest

from shoebox_worker.consume import signals
from shoebox_worker.consume import supervisor as supervisor_mod
from shoebox_worker.consume import worker as worker_mod


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("gaps, counted", [
    ([], [True]),
    ([0.0], [True, False]),
    ([0.001], [True, False]),
    ([0.999], [True, False]),
    ([1.0], [True, True]),
    ([2.5], [True, True]),
    # measured from the last one counted, not the last repeat
    ([0.6, 0.6], [True, False, True]),
    ([0.2, 0.2, 0.2, 1.0], [True, False, False, False, True]),
])
def test_a_repeat_within_a_second_is_not_counted(gaps, counted):
    clock = Clock()
    stops = signals.StopSignals(clock)
    seen = [stops.received()]
    for gap in gaps:
        clock.now += gap
        seen.append(stops.received())
    assert seen == counted
    assert stops.count == counted.count(True)


def _worker(clock):
    """Just what Worker.stop uses."""
    worker = worker_mod.Worker.__new__(worker_mod.Worker)
    worker.notifier = types.SimpleNamespace(stopping=lambda: None)
    worker.stopping = None
    worker.stop_signals = signals.StopSignals(clock)
    return worker


def test_worker_two_signals_at_once_keep_the_shipping_grace():
    # Ctrl-C under the supervisor: SIGINT from the terminal, SIGTERM
    # passed on by the supervisor a few ms later
    clock = Clock()
    worker = _worker(clock)
    assert worker.stop() is True
    clock.now += 0.004
    assert worker.stop() is False
    assert worker.stopping == worker_mod.STOP_SIGNAL


def test_worker_a_second_signal_later_stops_shipping_too():
    clock = Clock()
    worker = _worker(clock)
    worker.stop()
    clock.now += 1.5
    assert worker.stop() is True
    assert worker.stopping == worker_mod.STOP_INTERRUPTED


def test_worker_a_failed_worker_stays_failed():
    clock = Clock()
    worker = _worker(clock)
    worker.stopping = worker_mod.STOP_FAILED
    worker.stop()
    clock.now += 5
    worker.stop()
    assert worker.stopping == worker_mod.STOP_FAILED


def test_worker_stop_without_an_injected_clock_uses_monotonic(monkeypatch):
    monkeypatch.setattr(signals.time, "monotonic", Clock(5.0))
    worker = worker_mod.Worker.__new__(worker_mod.Worker)
    worker.notifier = types.SimpleNamespace(stopping=lambda: None)
    worker.stopping = None
    assert worker.stop() and not worker.stop()
    assert worker.stopping == worker_mod.STOP_SIGNAL


def test_supervisor_passes_a_repeat_on_once(monkeypatch):
    clock = Clock()
    sup = supervisor_mod.Supervisor.__new__(supervisor_mod.Supervisor)
    sup.stop_signals = signals.StopSignals(clock)
    sup._signal = None
    passed_on = []
    sup._stop_children = lambda: passed_on.append(clock.now)
    sup._on_signal(2, None)
    clock.now += 0.3
    sup._on_signal(15, None)
    assert passed_on == [1000.0]
    assert sup._signal == 2
    clock.now += 1.0
    sup._on_signal(15, None)
    assert passed_on == [1000.0, 1001.3]
