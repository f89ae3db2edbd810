"""Tests for shoebox_worker.consume.stats: counters and the stats line."""

import logging
import time

from shoebox_worker.consume import stats as stats_mod


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_counts_and_values_passed_down():
    stats = stats_mod.Stats()
    assert (stats.unacked, stats.backlog, stats.bytes_written) == (
        0, (0, 0, 0.0), 0)
    stats.consumed("a")
    stats.consumed("a")
    stats.consumed("b")
    assert stats.malformed("b") == 1
    assert stats.malformed("a") == 2
    stats.acked(2)
    stats.rolled()
    stats.update(unacked=1, bytes_written=4096, backlog=(2, 8192, 3.5))
    assert stats.consumed_total == 3
    assert dict(stats.consumed_by_queue) == {"a": 2, "b": 1}
    assert stats.acked_total == 2 and stats.rolls == 1
    assert stats.unacked == 1 and stats.bytes_written == 4096
    assert stats.backlog == (2, 8192, 3.5)


def test_callback_events_reach_listeners():
    stats = stats_mod.Stats()
    heard = []
    stats.listeners.append(lambda *event: heard.append(event))
    stats.callback_done("gzip", 0.25)
    stats.callback_failed("swift")
    stats.callback_failed("swift", permanent=True)
    assert stats.callback_successes == {"gzip": 1}
    assert stats.callback_failures == {"swift": 2}
    assert stats.callback_permanent_failures == {"swift": 1}
    assert heard == [("callback_done", "gzip", 0.25),
                     ("callback_failed", "swift", None),
                     ("callback_failed", "swift", None)]


def test_failing_age_is_on_the_monotonic_clock(monkeypatch):
    now = [5000.0]
    stats = stats_mod.Stats(clock=lambda: now[0])
    stats.failing({"transient": (1, 4000.0), "permanent": (0, None)})
    monkeypatch.setattr(time, "time", lambda: 1.0)  # wall clock stepped
    assert stats.failing_age() == 1000.0
    now[0] = 5010.0
    assert stats.failing_age() == 1010.0


def test_failing_archives_and_how_long():
    stats = stats_mod.Stats()
    assert stats.failing_age() == 0.0
    stats.failing({"transient": (1, 1000.0), "permanent": (2, 900.0)})
    assert stats.failing_now["permanent"] == (2, 900.0)
    assert stats.failing_age(now=1200.0) == 300.0
    stats.failing({"transient": (0, None), "permanent": (0, None)})
    assert stats.failing_age(now=1200.0) == 0.0


def test_log_line_format_and_rates(caplog):
    clock = Clock()
    stats = stats_mod.Stats(clock=clock)
    for _ in range(300):
        stats.consumed("q")
    stats.malformed("q")
    stats.acked(250)
    stats.rolled()
    stats.update(unacked=50, bytes_written=3 * 1048576,
                 backlog=(2, 5 * 1048576, 42.0))
    clock.now += 2.0
    with caplog.at_level(logging.INFO, logger=stats_mod.__name__):
        stats.log_line()
        stats.paused = True
        clock.now += 1.0
        stats.log_line()
    first, second = (r.getMessage() for r in caplog.records)
    assert first == ("150 msg/s, 1.50 MB/s; consumed 300, acked 250, "
                     "malformed 1, rolls 1; unshipped 2 file(s), 5.0 MB, "
                     "oldest 42 s")
    # rates are since the last line
    assert second.startswith("0 msg/s, 0.00 MB/s; consumed 300")
    assert second.endswith("oldest 42 s; PAUSED")


# -- health: consuming, and shipping works ------------------------------------

def test_health_says_why_not():
    clock = Clock()
    stats = stats_mod.Stats(clock=clock)
    assert stats.health() == (False, "not consuming yet: connecting to the "
                                     "broker")
    stats.consuming_now()
    assert stats.health() == (True, "consuming; shipping works")
    # the broker fails (the worker's Outage tells its listeners)
    for listener in stats.listeners:
        listener("broker_failed", "transient", None)
    clock.now += 12
    assert stats.health() == (False, "not consuming: the broker has been "
                                     "failing for 12 s (see the log)")
    for listener in stats.listeners:
        listener("broker_failed", "permanent", None)
    assert stats.health()[1].endswith(
        "for 12 s, in a way retrying will not fix (see the log)")
    stats.consuming_now()  # back
    assert stats.health()[0]
    stats.paused = True
    assert stats.health() == (False, "consumption paused: disk full, or the "
                                     "archives to ship over max_backlog_mb "
                                     "(see the log)")
    stats.paused = False
    # a step failing transiently: healthy for TRANSIENT_GRACE seconds
    stats.failing({"transient": (1, clock.now), "permanent": (0, None)},
                  {"transient": "x.events: step swift: 503"})
    clock.now += stats_mod.TRANSIENT_GRACE - 1
    assert stats.health()[0]
    clock.now += 1
    assert stats.health() == (False, "shipping has been failing on 1 "
                                     "archive(s) for 300 s: x.events: step "
                                     "swift: 503")
    # a permanent one: at once
    stats.failing({"transient": (0, None), "permanent": (2, clock.now - 3)},
                  {"permanent": "y.events: step swift: 401; check key"})
    assert stats.health() == (False, "shipping fails in a way retrying will "
                                     "not fix, on 2 archive(s) for 3 s: "
                                     "y.events: step swift: 401; check key")
    stats.failing({"transient": (0, None), "permanent": (0, None)})
    assert stats.health()[0]
    stats.stopping = True
    assert stats.health() == (False, "stopping")
