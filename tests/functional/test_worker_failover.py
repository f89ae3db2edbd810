"""Failover between broker URLs, on the real RabbitMQ.

``[broker] url`` takes several URLs separated by ``;``. Here the first one
is a TCP proxy in front of the machine's RabbitMQ that the test controls;
the second one is RabbitMQ itself. The worker starts on the proxy and
takes messages through it; the test then cuts the proxy (listener and
connections) while messages are delivered but not yet acked, and publishes
more. The worker must carry on through the second URL with nothing lost.
"""

import socket
import threading

import pytest

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"


def _counts(broker, queue):
    """``(ready, unacked)`` of ``queue``, asked of the broker."""
    out = broker.ctl("list_queues", "-q", "--no-table-headers", "name",
                     "messages_ready", "messages_unacknowledged")
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return None


class Proxy:
    """Forwards 127.0.0.1:<port> to RabbitMQ until :meth:`cut`."""

    def __init__(self, target=("127.0.0.1", 5672)):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b),
                                 daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        """Refuse new connections and drop the open ones."""
        try:  # wakes the accept() (a close alone leaves it listening)
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.mark.both_brokers
def test_fails_over_to_the_next_url_and_loses_nothing(rabbit, broker, names,
                                                      tmp_path, ft,
                                                      worker_procs):
    rabbit.declare(names, names, ROUTING_KEY, durable=True)
    proxy = Proxy(target=("127.0.0.1", broker.port))
    try:
        urls = "amqp://guest:guest@127.0.0.1:%d//;%s" % (proxy.port,
                                                         broker.url)
        before = ft.publish(broker.url, 300, names, ROUTING_KEY, seed=11,
                            durable=True)
        # acks wait for 200 records or 30 s: at the cut, the worker holds
        # delivered messages it has not acked
        config = ft.worker_config(
            tmp_path, names, names, url=urls, routing_key=ROUTING_KEY,
            durable=True, roll_checker="count",
            roll_options={"roll_count": 1000},
            broker={"prefetch_count": 400, "heartbeat": 2,
                    "connect_timeout": 2},
            archive_options={"fsync_every": 200, "fsync_interval": 30},
            worker={"stats_interval": 0})
        worker = worker_procs(config, idle_exit=3)
        ft.wait_until(lambda: _counts(broker, names) == (0, 100), 30,
                      interval=0.3, message="200 acked, 100 delivered")
        # consuming through the proxy, the first URL
        assert proxy.accepted >= 1
        assert worker.wait_for_log(
            r"consuming from %s on \S+:%d/" % (names, proxy.port), 5), \
            worker.log_tail()
        proxy.cut()
        after = ft.publish(broker.url, 100, names, ROUTING_KEY, seed=12,
                           durable=True)
        code = worker.wait(45)
        log = worker.log
        assert code == 0, worker.log_tail()
        # and then through the second
        assert ":%d/" % broker.port in log.split("consuming from")[-1], \
            worker.log_tail()
        assert rabbit.depth(names) == 0
        records = ft.read_archives(tmp_path / "archive")
        ids = [r.metadata["message_id"] for r in records]
        assert set(ids) == set(before) | set(after)
        # the 100 unacked at the cut came back: duplicates, counted
        duplicates = len(ids) - len(set(ids))
        assert duplicates == 100, duplicates
    finally:
        proxy.cut()
