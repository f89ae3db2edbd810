"""A quorum queue on the project's own 3-node RabbitMQ cluster
(``scripts/rabbit-cluster``, the ``cluster`` fixture), the node holding its
leader (node 3: it is declared there) killed with SIGKILL while the worker
consumes and a publisher with confirms publishes: every confirmed message
is archived.

The worker is given the three URLs (``;``), the leader's first, so that
its connection is the one the kill cuts: plain ``amqp://``, and (``tls``)
the nodes' ``amqps://`` listeners with ``[broker] ssl_ca_file`` set to the
cluster's test CA, the URL it fails over to naming its host ``localhost``
and the others ``127.0.0.1`` (the certificate covers both; kombu's pyamqp
transport connects to ``localhost`` as ``127.0.0.1``, so both are checked
against ``127.0.0.1``). After the kill, the worker's connection must be a
TLS one on another node, as the broker lists it. The publisher uses kombu as
designed for this: ``confirm_publish`` and ``Connection.ensure`` (which
reconnects, to the next URL, and publishes again: a message whose confirm
the kill swallowed is sent twice, so duplicates are allowed and counted).
The time from the kill to the next message the worker acked (fsynced
first) is measured from its metrics endpoint and printed, not asserted.
"""

import collections
import contextlib
import json
import re
import threading
import time
import urllib.request

import pytest
from kombu import Connection
from kombu import Exchange
from kombu import Queue

from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

COUNT = 5000
RATE = 500.0  # messages a second: ten seconds of publishing
ROUTING_KEY = "notifications.info"
QUORUM = {"x-queue-type": "quorum"}
#: The tests that kill node 3 (tests/conftest.py): the queue's leader is
#: placed there. The TLS tests use nodes 1 and 2 meanwhile.
NODE_3 = pytest.mark.xdist_group("cluster-node-3")


class Publisher(threading.Thread):
    """Publishes COUNT notifications at RATE with confirms, through kombu's
    ``Connection.ensure`` over the cluster's URLs; ``confirmed`` holds the
    message_ids whose publish returned (the broker confirmed them)."""

    def __init__(self, urls, exchange, seed):
        super().__init__(daemon=True)
        self.urls = urls
        self.exchange = exchange
        self.seed = seed
        self.confirmed = []
        self.sent = set()
        self.retries = 0
        self.error = None

    def _retrying(self, exc, interval):
        self.retries += 1

    def run(self):
        try:
            with Connection(self.urls, connect_timeout=5, heartbeat=10,
                            transport_options={"confirm_publish": True}) \
                    as conn:
                producer = conn.Producer(
                    exchange=Exchange(self.exchange, type="topic",
                                      durable=True), auto_declare=False)
                publish = conn.ensure(producer, producer.publish,
                                      errback=self._retrying, max_retries=60,
                                      interval_start=0.2, interval_step=0.5,
                                      interval_max=2)
                started = time.monotonic()
                for n, notification in enumerate(simulator.notifications(
                        COUNT, seed=self.seed)):
                    wait = started + n / RATE - time.monotonic()
                    if wait > 0:  # one reading: a second may be past it
                        time.sleep(wait)
                    self.sent.add(notification["message_id"])
                    publish(envelope.wrap(notification),
                            routing_key=ROUTING_KEY,
                            content_type="application/json",
                            content_encoding="utf-8", delivery_mode=2,
                            declare=[], retry=False)
                    self.confirmed.append(notification["message_id"])
        except Exception as exc:  # reported by the test
            self.error = exc


class AckWatch(threading.Thread):
    """Samples the worker's ``shoebox_messages_acked_total`` and how many
    times it logged ``consuming from`` every 20 ms."""

    def __init__(self, port, worker):
        super().__init__(daemon=True)
        self.url = "http://127.0.0.1:%d/metrics" % port
        self.worker = worker
        self.samples = []
        self.stop = threading.Event()

    def acked(self):
        try:
            with urllib.request.urlopen(self.url, timeout=1) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        match = re.search(r"^shoebox_messages_acked_total (\S+)$", text,
                          re.M)
        return float(match.group(1)) if match else None

    def run(self):
        while not self.stop.is_set():
            acked = self.acked()
            if acked is not None:
                self.samples.append((time.monotonic(), acked,
                                     self.worker.log.count("consuming from")))
            time.sleep(0.02)

    def next_ack_after(self, kill):
        """Seconds from ``kill`` to the first ack after it: after the
        worker consumed again on a new connection, when it reconnected;
        and whether it did."""
        after = [s for s in self.samples if s[0] > kill]
        if not after:
            return None, False
        connections = after[0][2]
        reconnected = [s for s in after if s[2] > connections]
        base = reconnected[0] if reconnected else after[0]
        for when, acked, _ in after:
            if when > base[0] and acked > base[1]:
                return when - kill, bool(reconnected)
        return None, bool(reconnected)


def _through_the_kill(worker, publisher, confirmed, restart, ft):
    """With the leader's node killed: wait until the worker consumes on
    another node (its second "consuming from") and the publisher has had
    a confirm from the nodes left, so that both worked through the
    outage (the node stays down until then); then start the node again
    (``restart``, in the background) and wait for the publisher to end
    without an error."""
    try:
        ft.wait_until(lambda: worker.log.count("consuming from") >= 2, 120,
                      interval=0.05, message="the worker consuming again")
    except BaseException:
        print("the worker's log:\n%s" % worker.log_tail())
        raise
    ft.wait_until(lambda: len(publisher.confirmed) > confirmed
                  or not publisher.is_alive(), 120, interval=0.05,
                  message="a confirm after the kill")
    restart.begin()
    publisher.join(300)
    assert not publisher.is_alive(), "publisher still running"
    assert publisher.error is None, repr(publisher.error)


class _Restart(threading.Thread):
    """Starts a killed node again in the background (it rejoins the
    cluster) once :meth:`begin` is called, while the test goes on;
    :meth:`join` waits until it serves and returns when it did
    (``time.monotonic()``)."""

    def __init__(self, cluster, node):
        super().__init__(daemon=True)
        self.cluster, self.node = cluster, node
        self.error = self.done = None

    def begin(self):
        if self.ident is None:
            self.start()

    def run(self):
        try:
            self.cluster.restart(self.node)
            self.done = time.monotonic()
        except BaseException as exc:  # reported by join
            self.error = exc

    def join(self, timeout=300):
        self.begin()
        super().join(timeout)
        assert not self.is_alive(), "node %s not back in %d s" % (
            self.node, timeout)
        if self.error is not None:
            raise self.error
        return self.done


@contextlib.contextmanager
def _killed(cluster, node):
    """SIGKILL ``node``; the body calls ``begin()`` on what it is given
    when the node may come back. Whatever happens, the node serves again
    when the body is left: the next test of the group needs all three."""
    cluster.kill(node)
    restart = _Restart(cluster, node)
    try:
        yield restart
    finally:
        restart.join()


def _declare(cluster, name, arguments=QUORUM):
    """Declare the queue through node 3, so that its leader is there
    (RabbitMQ's default leader locator, client-local): the node these
    tests kill. Returns that node."""
    node = cluster.nodes[2]
    with Connection(cluster.url_of(node), connect_timeout=5) as conn:
        exchange = Exchange(name, type="topic", durable=True)
        Queue(name, exchange, routing_key=ROUTING_KEY, durable=True,
              queue_arguments=arguments)(conn.default_channel).declare()
    leader = cluster.leader(name)
    assert leader == node, "the leader of %s is on %s, not on %s" % (
        name, leader, node)
    return leader


def _delete(cluster, name):
    with Connection(cluster.urls, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=3)
        channel = conn.channel()
        channel.queue_delete(name)
        channel.exchange_delete(name)


def _depth(cluster, name):
    try:
        with Connection(cluster.urls, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            return conn.channel().queue_declare(name, passive=True)[1]
    except Exception:
        return None


def _worker_urls(cluster, order, tls):
    """The URLs of the nodes ``order`` for the worker: plain, or TLS with
    the second (where the worker fails over to) named ``localhost``."""
    if not tls:
        return [cluster.url_of(node) for node in order]
    urls = [cluster.tls_url_of(node) for node in order]
    urls[1] = urls[1].replace("@127.0.0.1:", "@localhost:")
    return urls


def _port(url):
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _tls_connections(cluster, node, pid, ft):
    """The server ports of process ``pid``'s TLS connections, as the
    cluster lists them (asked of ``node``); other tests' connections (the
    TLS tests run beside these) are not counted."""
    ours = set()
    for url in cluster.urls + cluster.tls_urls:
        ours |= ft.local_ports(pid, _port(url))
    result = cluster.ctl(node, "list_connections", "-q", "port", "ssl",
                         "peer_port", "--formatter", "json")
    assert result.returncode == 0, result.stderr
    return sorted(c["port"] for c in json.loads(result.stdout)
                  if c["ssl"] and c["peer_port"] in ours)


@NODE_3
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_killing_the_leader_loses_no_confirmed_message(
        cluster, names, tmp_path, worker_procs, ft, tls):
    leader = _declare(cluster, names)
    try:
        _run(cluster, names, leader, tmp_path, worker_procs, ft, tls)
    finally:
        _delete(cluster, names)


def _run(cluster, names, leader, tmp_path, worker_procs, ft, tls):
    others = [node for node in cluster.nodes if node != leader]
    worker_urls = _worker_urls(cluster, [leader] + others, tls)
    config = ft.worker_config(
        tmp_path, names, names, url=";".join(worker_urls),
        routing_key=ROUTING_KEY, durable=True,
        consumer_options={"queue_arguments": "x-queue-type=quorum"},
        roll_checker="count", roll_options={"roll_count": 1000},
        broker={"prefetch_count": 200,
                **({"ssl_ca_file": cluster.ca} if tls else {})},
        archive_options={"fsync_every": 50})
    metrics_port = ft.free_port()
    with open(config, "a") as conf:
        conf.write("\n[metrics]\nport = %d\n" % metrics_port)
    worker = worker_procs(config)
    assert worker.wait_for_log(r"consuming from", 60), worker.log_tail()

    watch = AckWatch(metrics_port, worker)
    watch.start()
    # the publisher starts on a node that is not the leader's
    publisher = Publisher([cluster.url_of(node) for node in others + [leader]],
                          names, seed=11)
    publisher.start()
    try:
        ft.wait_until(lambda: len(publisher.confirmed) >= COUNT * 0.3
                      or not publisher.is_alive(), 60,
                      message="a third published")
        confirmed_at_kill = len(publisher.confirmed)
        killed = time.monotonic()
        with _killed(cluster, leader) as restart:
            _through_the_kill(worker, publisher, confirmed_at_kill,
                              restart, ft)
            ft.wait_until(lambda: _depth(cluster, names) == 0
                          and (watch.samples[-1][1] if watch.samples else 0)
                          >= len(set(publisher.confirmed)), 180,
                          interval=0.2,
                          message="every confirmed message acked")
        restarted = restart.done
    finally:
        watch.stop.set()
        watch.join(5)
    # where the worker consumes now, as it logged it and as the broker
    # lists its TLS connections (the publisher's are plain)
    consuming = re.findall(r"consuming from \S+ on (\S+)", worker.log)
    tls_now = _tls_connections(cluster, others[0], worker.pid, ft)
    worker.signal(15)
    assert worker.wait(60) == 0, worker.log_tail()

    records = ft.read_archives(tmp_path / "archive")
    counts = collections.Counter(r.metadata["message_id"] for r in records)
    confirmed = set(publisher.confirmed)
    lost = confirmed - set(counts)
    assert not lost, "%d confirmed message(s) lost, e.g. %s" % (
        len(lost), sorted(lost)[:3])
    unexpected = set(counts) - publisher.sent
    assert not unexpected, sorted(unexpected)[:3]
    duplicates = sum(counts.values()) - len(counts)
    gap, reconnected = watch.next_ack_after(killed)
    print("\ncluster (%s): killed the leader %s (the worker's node) with "
          "SIGKILL after %d confirmed, serving again %.1f s after the "
          "kill; %d confirmed of %d sent (%d publisher retries), %d "
          "archived: 0 lost, %d duplicate(s), %d archived unconfirmed; "
          "kill to next acked message: %s (worker reconnected: %s); the "
          "worker connected %d time(s)" % (
              "tls" if tls else "plain", leader, confirmed_at_kill,
              restarted - killed,
              len(confirmed), len(publisher.sent),
              publisher.retries, len(counts), duplicates,
              len(set(counts) - confirmed),
              "%.2f s" % gap if gap is not None else "not seen",
              reconnected, worker.log.count("consuming from")))
    assert gap is not None, "no ack seen after the kill"
    assert len(consuming) >= 2, worker.log_tail()
    scheme = "amqps" if tls else "amqp"
    assert consuming[0] == "%s://guest:***@127.0.0.1:%d//" % (
        scheme, _port(worker_urls[0])), consuming
    assert consuming[-1].startswith(scheme + "://"), consuming
    assert _port(consuming[-1]) in {_port(u) for u in worker_urls[1:]}, \
        consuming
    if tls:
        print("cluster (tls): the worker consumed on %s, then on %s; the "
              "broker's TLS connections: port(s) %s" % (
                  consuming[0], consuming[-1], tls_now))
        assert tls_now == [_port(consuming[-1])], tls_now
    else:
        assert tls_now == [], tls_now


# -- a stream on the cluster ------------------------------------------------

STREAM = {"x-queue-type": "stream"}


@NODE_3
def test_a_stream_on_the_cluster_its_leader_killed_every_offset_once(
        cluster, names, tmp_path, worker_procs, ft):
    """A stream replicated on the three nodes, its leader's node killed
    with SIGKILL mid-run: the worker resumes on another node after the
    last offset it wrote, so no offset is archived twice, and every
    confirmed message is archived (a publish the kill left unconfirmed is
    sent again: a second stream entry, archived as such)."""
    leader = _declare(cluster, names, STREAM)
    try:
        others = [node for node in cluster.nodes if node != leader]
        config = ft.worker_config(
            tmp_path, names, names, url=";".join(
                cluster.url_of(node) for node in [leader] + others),
            routing_key=ROUTING_KEY, durable=True,
            consumer_options={"queue_arguments": "x-queue-type=stream",
                              "exchange_durable": True},
            roll_checker="count", roll_options={"roll_count": 1000},
            broker={"prefetch_count": 200},
            archive_options={"fsync_every": 50})
        worker = worker_procs(config)
        assert worker.wait_for_log(r"consuming from", 60), worker.log_tail()
        publisher = Publisher([cluster.url_of(node)
                               for node in others + [leader]],
                              names, seed=13)
        publisher.start()
        ft.wait_until(lambda: len(publisher.confirmed) >= COUNT * 0.3
                      or not publisher.is_alive(), 60,
                      message="a third published")
        confirmed_at_kill = len(publisher.confirmed)
        with _killed(cluster, leader) as restart:
            _through_the_kill(worker, publisher, confirmed_at_kill,
                              restart, ft)
        worker.signal(15)
        assert worker.wait(60) == 0, worker.log_tail()
        # what it had not read yet: a restart resumes after its last offset
        rest = ft.run_worker(config, idle_exit=2, timeout=120)
        assert rest.returncode == 0, rest.log_tail()
    finally:
        _delete(cluster, names)
    records = ft.read_archives(tmp_path / "archive")
    offsets = collections.Counter(int(r.metadata["stream_offset"])
                                  for r in records)
    twice = sorted(o for o, n in offsets.items() if n > 1)
    assert not twice, "offsets archived twice: %s" % twice[:5]
    # every entry from the first to the last, none missing
    assert sorted(offsets) == list(range(len(offsets))), worker.log_tail()
    ids = collections.Counter(r.metadata["message_id"] for r in records)
    lost = set(publisher.confirmed) - set(ids)
    assert not lost, "%d confirmed message(s) lost" % len(lost)
    assert set(ids) <= publisher.sent
    print("\nstream on the cluster: leader %s killed; %d entries archived "
          "once each (offsets 0-%d), %d confirmed of %d sent, %d sent twice "
          "by the publisher; the worker connected %d time(s), its restart "
          "archived %d" % (
              leader, len(offsets), len(offsets) - 1,
              len(set(publisher.confirmed)), len(publisher.sent),
              sum(n - 1 for n in ids.values()),
              worker.log.count("consuming from"),
              len(offsets) - _archived_before(rest.log)))
    assert worker.log.count("consuming from") >= 2, worker.log_tail()


def _archived_before(log):
    """The last offset the first run archived + 1, from the restart's
    resume line."""
    match = re.search(r"resuming after offset (\d+)", log)
    return int(match.group(1)) + 1 if match else 0
