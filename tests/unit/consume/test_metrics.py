"""Tests for shoebox_worker.consume.metrics: the Prometheus collector."""

import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest

from shoebox_worker.consume import metrics
from shoebox_worker.consume import stats as stats_mod

QUEUES = ["notifications.info", "notifications.error"]
CALLBACKS = ["gzip", "swift"]


def samples(registry):
    text = generate_latest(registry).decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class TestMetrics:
    def test_collector_reads_stats(self):
        stats = stats_mod.Stats()
        registry = CollectorRegistry()
        registry.register(metrics.StatsCollector(stats, QUEUES, CALLBACKS))
        for _ in range(5):
            stats.consumed("notifications.info")
        stats.consumed("notifications.error")
        stats.update(unacked=3, bytes_written=510,
                     backlog=(2, 2048, 12.5))
        stats.malformed("notifications.error")
        stats.acked(3)
        stats.rolled()
        stats.callback_done("gzip", 0.5)
        stats.callback_failed("swift")
        stats.callback_failed("swift", permanent=True)
        stats.failing({"transient": (0, None),
                       "permanent": (2, time.monotonic() - 60)})
        stats.paused = True
        got = samples(registry)
        assert got['shoebox_messages_consumed_total{queue='
                   '"notifications.info"}'] == 5
        assert got['shoebox_messages_consumed_total{queue='
                   '"notifications.error"}'] == 1
        assert got['shoebox_messages_malformed_total{queue='
                   '"notifications.info"}'] == 0
        assert got['shoebox_messages_malformed_total{queue='
                   '"notifications.error"}'] == 1
        assert got["shoebox_messages_acked_total"] == 3
        assert got["shoebox_bytes_written_total"] == 510
        assert got["shoebox_rolls_total"] == 1
        assert got['shoebox_callback_successes_total{callback="gzip"}'] == 1
        assert got['shoebox_callback_successes_total{callback="swift"}'] \
            == 0
        assert got['shoebox_callback_failures_total{callback="swift"}'] == 2
        assert got['shoebox_callback_permanent_failures_total{callback='
                   '"swift"}'] == 1
        assert got['shoebox_callback_permanent_failures_total{callback='
                   '"gzip"}'] == 0
        assert got['shoebox_failing_archives{kind="permanent"}'] == 2
        assert got['shoebox_failing_archives{kind="transient"}'] == 0
        assert 60 <= got["shoebox_oldest_failure_age_seconds"] < 70
        assert got["shoebox_unacked_messages"] == 3
        assert got["shoebox_unshipped_files"] == 2
        assert got["shoebox_unshipped_bytes"] == 2048
        assert got["shoebox_oldest_unshipped_age_seconds"] == 12.5
        assert got["shoebox_paused"] == 1

    def test_queue_depths_as_read(self):
        stats = stats_mod.Stats()
        registry = CollectorRegistry()
        registry.register(metrics.StatsCollector(stats, QUEUES, CALLBACKS))
        # before the first read: no sample at all (not a 0 that would
        # look like an empty queue)
        assert not [name for name in samples(registry)
                    if name.startswith("shoebox_queue_messages")]
        # a watched queue that does not exist is not in the read
        stats.queue_depths = {"notifications.info": 0,
                              "notifications.error": 7,
                              "versioned_notifications.info": 120}
        got = {name: value for name, value in samples(registry).items()
               if name.startswith("shoebox_queue_messages")}
        assert got == {
            'shoebox_queue_messages{queue="notifications.info"}': 0,
            'shoebox_queue_messages{queue="notifications.error"}': 7,
            'shoebox_queue_messages{queue='
            '"versioned_notifications.info"}': 120}
        text = generate_latest(registry).decode()
        assert "# TYPE shoebox_queue_messages gauge" in text

    def test_worker_index(self):
        assert metrics.worker_index() == 0

    def test_port_in_use_is_one_line(self):
        import socket
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        stats = stats_mod.Stats()
        try:
            with pytest.raises(metrics.MetricsError,
                               match=r"\[metrics\] cannot listen on "
                                     r"127\.0\.0\.1:\d+"):
                metrics.serve(stats, QUEUES, CALLBACKS, "127.0.0.1",
                              sock.getsockname()[1])
        finally:
            sock.close()
        assert stats.listeners == [stats._heard]  # its own only


def test_events_feed_the_histogram_and_the_broker_failures():
    """What happens between scrapes comes through Stats.listeners: step
    durations and broker failures by kind (the worker's Outage tells)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stats = stats_mod.Stats()
    registry = metrics.serve(stats, QUEUES, CALLBACKS, "127.0.0.1", port)
    before = samples(registry)
    assert before['shoebox_broker_failures_total{kind="permanent"}'] == 0
    for listener in stats.listeners:
        listener("broker_failed", "permanent", None)
        listener("broker_failed", "transient", None)
        listener("broker_failed", "transient", None)
        listener("callback_done", "gzip", 0.2)
    after = samples(registry)
    assert after['shoebox_broker_failures_total{kind="permanent"}'] == 1
    assert after['shoebox_broker_failures_total{kind="transient"}'] == 2
    assert after['shoebox_upload_seconds_count{callback="gzip"}'] == 1


def _get(port, path):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path),
                                    timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_healthz_metrics_and_nothing_else_on_their_paths():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stats = stats_mod.Stats()
    metrics.serve(stats, QUEUES, CALLBACKS, "127.0.0.1", port)
    assert _get(port, "/healthz") == (
        503, "unhealthy: not consuming yet: connecting to the broker\n")
    status, text = _get(port, "/metrics")
    assert status == 200
    assert "\nshoebox_up 0.0\n" in text
    assert "\nshoebox_consuming 0.0\n" in text
    assert 'shoebox_build_info{version="%s"} 1.0' % metrics.__version__ \
        in text
    stats.consuming_now()
    assert _get(port, "/healthz") == (200, "ok: consuming; shipping works\n")
    assert "\nshoebox_up 1.0\n" in _get(port, "/metrics")[1]
    stats.failing({"transient": (0, None), "permanent": (1, time.monotonic())},
                  {"permanent": "x.events: step swift: 401"})
    status, text = _get(port, "/healthz")
    assert status == 503 and text.startswith(
        "unhealthy: shipping fails in a way retrying will not fix")
    assert "\nshoebox_up 0.0\n" in _get(port, "/metrics")[1]
    # /healthz is not the metrics, and other paths are nothing
    assert _get(port, "/")[0] == 404
    assert _get(port, "/metricsx")[0] == 404
