"""Prometheus metrics and a health check of a running worker, on
``[metrics] port``.

:func:`serve` starts an HTTP server in a thread of its own, with two
paths: ``/metrics``, the Prometheus text format of a registry of its own
(no default process/platform collectors), and ``/healthz``, ``200`` with
``ok: ...`` while the worker consumes and shipping works, else ``503``
with the reason (:meth:`~shoebox_worker.consume.stats.Stats.health`):
not consuming (not connected yet, the broker failing, paused, stopping),
an archive whose shipping fails in a way retrying will not fix, or one
failing for 5 minutes or more. Any other path is a 404. The counters are not
touched on the hot path: a custom collector reads the worker's
:class:`~shoebox_worker.consume.stats.Stats` (and nothing else) when
Prometheus scrapes; the data-at-risk gauges are as of the worker's last
tick (a tenth of a second). Only the
callback duration histogram and the broker failure counter are fed as
events happen (from the shipping and the consumer thread), through
``Stats.listeners``.

Exported (``queue`` and ``callback`` labels are the config's names)::

    shoebox_messages_consumed_total{queue}    messages written to archives
    shoebox_messages_acked_total              messages acked to the broker
    shoebox_messages_malformed_total{queue}   archived with malformed=...
    shoebox_messages_redelivered_total{queue} came back after a return
                                              (x-delivery-count)
    shoebox_bytes_written_total               record bytes written
    shoebox_rolls_total                       archives closed
    shoebox_callback_successes_total{callback}
    shoebox_callback_failures_total{callback} failed attempts (retried)
    shoebox_callback_permanent_failures_total{callback}
                                              those of them that retrying
                                              will not fix (a refused key)
    shoebox_upload_seconds{callback}          histogram of step durations
    shoebox_broker_failures_total{kind}       failed broker connections
                                              and declarations, by kind:
                                              transient, or permanent
                                              (retrying will not fix it:
                                              a refused login, a queue
                                              that is gone)

and the data at risk, now::

    shoebox_unacked_messages                  written, not yet acked
    shoebox_unshipped_files                   archives (the active one
    shoebox_unshipped_bytes                   too) not yet through the
                                              callback chain
    shoebox_oldest_unshipped_age_seconds      age of the oldest record
                                              among them
    shoebox_paused                            1 while consumption is paused
    shoebox_failing_archives{kind}            archives whose current step
                                              fails now, by the kind of its
                                              last failure (transient or
                                              permanent)
    shoebox_oldest_failure_age_seconds        how long the oldest of them
                                              has been failing; 0 if none

and whether it does its job, and what it is::

    shoebox_up                                1 while /healthz says 200
    shoebox_consuming                         1 while it has its consumers
                                              (paused too: shoebox_paused)
    shoebox_build_info{version}               1, the version as a label

and the lag: the messages waiting in each consumed queue and in each of
``[metrics] watch_queues`` (read every few seconds, see
:class:`~shoebox_worker.consume.broker.QueueDepths`; a queue that does
not exist has no sample)::

    shoebox_queue_messages{queue}             messages ready in the queue

With ``[worker] processes = N`` each worker process serves its own
endpoint: worker ``k`` (0 to N-1) on ``port + k``.
"""

import logging
import multiprocessing
import re
import socket
import socketserver
import threading
from wsgiref import simple_server

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily

from shoebox_worker import __version__
from shoebox_worker import exceptions

__all__ = ["MetricsError", "StatsCollector", "app", "serve",
           "worker_index"]

LOG = logging.getLogger(__name__)

#: Buckets of shoebox_upload_seconds: a gzip of a small archive to a
#: slow upload of a large one.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, float("inf"))

_CHILD_NAME = re.compile(r"shoebox-worker-(\d+)\Z")


class MetricsError(exceptions.ShoeboxError):
    """The metrics endpoint cannot start."""


class StatsCollector:
    """Reads a worker's counters at scrape time.

    :param stats: the worker's :class:`~shoebox_worker.consume.stats.Stats`,
        the only thing read at scrape time.
    :param queues: queue names (exported as zeros before their first
        message).
    :param callbacks: callback names, likewise.
    """

    def __init__(self, stats, queues, callbacks):
        self.stats = stats
        self.queues = list(queues)
        self.callbacks = list(callbacks)

    def _by_label(self, family, counter, names):
        counts = dict(counter)  # one C-level copy: safe against writers
        for name in dict.fromkeys(list(names) + sorted(counts)):
            family.add_metric([name], counts.get(name, 0))
        return family

    def collect(self):
        stats = self.stats
        yield self._by_label(CounterMetricFamily(
            "shoebox_messages_consumed",
            "Messages written to an archive, by queue.", labels=["queue"]),
            stats.consumed_by_queue, self.queues)
        yield CounterMetricFamily(
            "shoebox_messages_acked",
            "Messages acked to the broker (after their records were "
            "fsynced).", value=stats.acked_total)
        yield self._by_label(CounterMetricFamily(
            "shoebox_messages_redelivered",
            "Messages that came back after being returned to the broker "
            "(x-delivery-count, on queues with a delivery limit), by "
            "queue.", labels=["queue"]),
            stats.redelivered_by_queue, self.queues)
        yield self._by_label(CounterMetricFamily(
            "shoebox_messages_malformed",
            "Messages archived verbatim with malformed=<reason> in their "
            "metadata, by queue.", labels=["queue"]),
            stats.malformed_by_queue, self.queues)
        yield CounterMetricFamily(
            "shoebox_bytes_written",
            "Record bytes written to archives (uncompressed).",
            value=stats.bytes_written)
        yield CounterMetricFamily(
            "shoebox_rolls", "Archives closed and handed to the callback "
            "chain.", value=stats.rolls)
        yield self._by_label(CounterMetricFamily(
            "shoebox_callback_successes",
            "Callback steps that succeeded, by callback.",
            labels=["callback"]), stats.callback_successes, self.callbacks)
        yield self._by_label(CounterMetricFamily(
            "shoebox_callback_failures",
            "Callback steps that failed (and are retried), by callback.",
            labels=["callback"]), stats.callback_failures, self.callbacks)
        yield self._by_label(CounterMetricFamily(
            "shoebox_callback_permanent_failures",
            "Callback steps that failed in a way retrying will not fix "
            "(credentials or names refused; still retried, every retry_max "
            "seconds), by callback.",
            labels=["callback"]), stats.callback_permanent_failures,
            self.callbacks)
        yield CounterMetricFamily(
            "shoebox_digests_stored",
            "Signed digests stored ([integrity]).",
            value=stats.digests_stored)
        yield CounterMetricFamily(
            "shoebox_digest_failures",
            "Attempts to store a signed digest that failed (each is kept "
            "and tried again; archives keep shipping).",
            value=stats.digest_failures)

        # the data at risk
        yield GaugeMetricFamily(
            "shoebox_unacked_messages",
            "Messages written but not acked yet (the broker redelivers "
            "them if the worker dies).", value=stats.unacked)
        files, size, age = stats.backlog
        yield GaugeMetricFamily(
            "shoebox_unshipped_files",
            "Archives not yet through the callback chain, the active one "
            "included.",
            value=files)
        yield GaugeMetricFamily(
            "shoebox_unshipped_bytes",
            "Bytes of the archives not yet through the callback chain, the "
            "active one included.", value=size)
        yield GaugeMetricFamily(
            "shoebox_oldest_unshipped_age_seconds",
            "Age in seconds of the oldest record not yet through the "
            "callback chain: since its archive was opened (for one left "
            "by a previous run: since its last write); 0 when none waits.",
            value=age)
        yield GaugeMetricFamily(
            "shoebox_paused",
            "1 while consumption is paused (disk full or backlog over "
            "max_backlog_mb), else 0.", value=1 if stats.paused else 0)
        failing = GaugeMetricFamily(
            "shoebox_failing_archives",
            "Archives whose current callback step fails now, by the kind "
            "of its last failure: transient, or permanent (retrying will "
            "not fix it).", labels=["kind"])
        for kind, (count, _) in sorted(stats.failing_now.items()):
            failing.add_metric([kind], count)
        yield failing
        yield GaugeMetricFamily(
            "shoebox_oldest_failure_age_seconds",
            "How long the archive failing longest has been failing, in "
            "seconds; 0 when none fails.", value=stats.failing_age())
        depths = GaugeMetricFamily(
            "shoebox_queue_messages",
            "Messages ready in each consumed or watched queue, as read "
            "every few seconds; none for a queue that does not exist.",
            labels=["queue"])
        for queue, count in stats.queue_depths.items():
            depths.add_metric([queue], count)
        yield depths

        # whether it does its job, and what it is
        healthy, _ = stats.health()
        yield GaugeMetricFamily(
            "shoebox_up",
            "1 while the worker consumes and shipping works (/healthz "
            "answers 200), else 0.", value=1 if healthy else 0)
        yield GaugeMetricFamily(
            "shoebox_consuming", "1 while the worker has its consumers "
            "(also while paused: see shoebox_paused), else 0.",
            value=1 if stats.consuming and not stats.stopping else 0)
        info = GaugeMetricFamily(
            "shoebox_build_info", "The running shoebox-worker's version "
            "(always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def worker_index():
    """``k`` in a supervised child ``shoebox-worker-k``, else 0."""
    if multiprocessing.parent_process() is None:
        return 0
    match = _CHILD_NAME.match(multiprocessing.current_process().name)
    return int(match.group(1)) if match else 0


def serve(stats, queues, callbacks, host, port):
    """Serve a worker's metrics over HTTP in a background thread.

    :param stats: the worker's :class:`~shoebox_worker.consume.stats.Stats`.
    :param queues: its queue names.
    :param callbacks: the names of its callback chain's steps.
    :param host: address to listen on.
    :param port: TCP port; a supervised child ``k`` listens on ``port + k``.
    :returns: the registry.
    :raises MetricsError: the port cannot be bound.
    """
    port += worker_index()
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, queues, callbacks))
    durations = Histogram(
        "shoebox_upload_seconds",
        "Duration of each successful callback step (compress, upload, "
        "...), by callback.", ["callback"], registry=registry,
        buckets=DURATION_BUCKETS)
    for name in callbacks:
        durations.labels(name)  # export zeros before the first roll
    broker_failures = Counter(
        "shoebox_broker_failures",
        "Failed broker connections and declarations, by kind: transient, "
        "or permanent (retrying will not fix it).", ["kind"],
        registry=registry)
    for kind in ("transient", "permanent"):
        broker_failures.labels(kind)

    def on_event(event, name, seconds):
        if event == "callback_done":
            durations.labels(name).observe(seconds)
        elif event == "broker_failed":
            broker_failures.labels(name).inc()

    stats.listeners.append(on_event)
    try:
        _start_server(host, port, app(stats, registry))
    except OSError as err:
        stats.listeners.remove(on_event)
        raise MetricsError("[metrics] cannot listen on %s:%d: %s" % (
            host, port, err.strerror or err)) from None
    LOG.info("serving Prometheus metrics on http://%s:%d/metrics and the "
             "health check on /healthz", host, port)
    return registry


def app(stats, registry):
    """The WSGI application: ``/metrics``, ``/healthz``, else 404."""
    metrics_app = make_wsgi_app(registry)

    def application(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            healthy, reason = stats.health()
            body = ("%s: %s\n" % ("ok" if healthy else "unhealthy",
                                   reason)).encode("utf-8")
            status = "200 OK" if healthy else "503 Service Unavailable"
        else:
            body = b"not found: /metrics or /healthz\n"
            status = "404 Not Found"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body]
    return application


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    """A thread per request, none waited for at exit."""

    daemon_threads = True


class _QuietHandler(simple_server.WSGIRequestHandler):
    """No access log on stderr."""

    def log_message(self, format, *args):
        pass


def _start_server(host, port, application):
    """Serve ``application`` on ``host:port`` (IPv4 or IPv6) in a daemon
    thread.

    :raises OSError: the address cannot be bound.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    server = simple_server.make_server(address[0], port, application,
                                       Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="shoebox-metrics",
                     daemon=True).start()
    return server
