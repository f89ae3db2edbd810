"""Tests for shoebox_worker.consume.notify: real Unix datagram sockets, a
fake clock for the watchdog's rate."""

import os
import socket
import threading
import types

import pytest

from shoebox_worker.consume import notify
from shoebox_worker.consume import supervisor


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def path_socket(tmp_path):
    """A notify socket at a path, as systemd makes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket():
    """A notify socket in the abstract namespace (``@name``)."""
    name = "@shoebox-test/%d/%s" % (os.getpid(), os.urandom(4).hex())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(2)
    yield name, sock
    sock.close()


def pending(sock):
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_without_notify_socket_nothing_is_enabled():
    notifier = notify.Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()  # nothing to send to, nothing raised


def test_watchdog_usec_without_notify_socket_is_ignored():
    notifier = notify.Notifier.from_environ({"WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("environ, interval", [
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "43"}, None),  # not us
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout_for_this_pid(environ,
                                                           interval):
    environ = dict(environ, NOTIFY_SOCKET="/run/x")
    notifier = notify.Notifier.from_environ(environ, pid=42)
    assert notifier.enabled
    assert notifier.watchdog_interval == interval


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_ready_reaches_a_path_or_abstract_socket(kind, request):
    address, sock = request.getfixturevalue(kind)
    notifier = notify.Notifier.from_environ({"NOTIFY_SOCKET": address})
    notifier.ready("consuming from q")
    assert sock.recv(4096) == b"READY=1\nSTATUS=consuming from q\n"


def test_watchdog_pings_at_most_every_half_timeout(path_socket):
    address, sock = path_socket
    clock = Clock()
    notifier = notify.Notifier(address, watchdog_usec=1_000_000,
                               clock=clock)
    sent = []
    for step in range(21):  # 0.0 to 2.0 s by 0.1 s
        clock.now = 100.0 + step * 0.1
        notifier.watchdog()
        sent += [clock.now] * len(pending(sock))
    assert sent == pytest.approx([100.0, 100.5, 101.0, 101.5, 102.0])


def test_no_watchdog_pings_without_watchdog_usec(path_socket):
    address, sock = path_socket
    notifier = notify.Notifier(address)
    notifier.watchdog()
    notifier.ready()
    assert pending(sock) == ["READY=1\n"]


def test_stopping_is_sent_once_and_ends_the_pings(path_socket):
    address, sock = path_socket
    clock = Clock()
    notifier = notify.Notifier(address, watchdog_usec=1_000_000,
                               clock=clock)
    notifier.watchdog()
    notifier.stopping()
    notifier.stopping()
    clock.now += 10
    notifier.watchdog()
    assert pending(sock) == ["WATCHDOG=1\n", "STOPPING=1\n"]


def test_no_listener_is_not_an_error(tmp_path):
    notifier = notify.Notifier(str(tmp_path / "gone"), 1_000_000)
    assert notifier.send("READY=1") is False
    notifier.watchdog()
    notifier.stopping()


def test_a_full_socket_drops_instead_of_blocking(path_socket):
    address, sock = path_socket  # never read: its queue fills up
    notifier = notify.Notifier(address)
    results = []
    sender = threading.Thread(target=lambda: results.extend(
        notifier.send("WATCHDOG=1") for _ in range(2000)), daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "send blocked on a full socket"
    assert results[0] is True and results[-1] is False


def test_child_environ():
    assert notify.child_environ(None, 30_000_000, 7) == {}
    assert notify.child_environ("@a", None, 7) == {"NOTIFY_SOCKET": "@a"}
    assert notify.child_environ("@a", 30_000_000, 7) == {
        "NOTIFY_SOCKET": "@a", "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "7"}


def test_listener_tells_the_sender_by_pid():
    listener = notify.Listener()
    try:
        assert listener.address.startswith("@")
        assert listener.receive() == []
        pid = os.fork()
        if pid == 0:  # the child: notify as a supervised worker would
            try:
                notifier = notify.Notifier.from_environ(
                    notify.child_environ(listener.address, 2_000_000,
                                         os.getpid()))
                notifier.ready("up")
                notifier.watchdog()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        notify.Notifier(listener.address).send("WATCHDOG=1", "X=a=b")
        assert listener.receive() == [
            (pid, {"READY": "1", "STATUS": "up"}),
            (pid, {"WATCHDOG": "1"}),
            (os.getpid(), {"WATCHDOG": "1", "X": "a=b"}),
        ]
    finally:
        listener.close()


# -- the supervisor as its children's service manager ------------------------

class FakeListener:
    address = "@fake"

    def __init__(self):
        self.queue = []

    def receive(self):
        received, self.queue = self.queue, []
        return received


class Supervised:
    """A Supervisor of two children (pids 1001, 1002) whose notify
    socket and clock the test drives; what it sends goes to ``sock``."""

    def __init__(self, address, sock, monkeypatch):
        self.clock = Clock()
        monkeypatch.setattr(supervisor, "time", types.SimpleNamespace(
            monotonic=self.clock))
        conf = types.SimpleNamespace(worker=types.SimpleNamespace(
            processes=2))
        self.sup = supervisor.Supervisor(
            conf, None, notifier=notify.Notifier(address, 2_000_000))
        self.sup._listener = self.listener = FakeListener()
        self.sock = sock
        self.sup.children = {0: types.SimpleNamespace(pid=1001, is_alive=bool),
                             1: types.SimpleNamespace(pid=1002, is_alive=bool)}
        for index in self.sup.children:
            self.sup._pinged[index] = self.clock.now

    def tell(self, pid, **fields):
        self.listener.queue.append((pid, fields))

    def step(self, seconds=0.0):
        """Let ``seconds`` pass, run one round; what it sent."""
        self.clock.now += seconds
        self.sup._notify()
        return pending(self.sock)


@pytest.fixture
def supervised(path_socket, monkeypatch):
    address, sock = path_socket
    return Supervised(address, sock, monkeypatch)


def test_supervisor_is_ready_once_every_child_is(supervised):
    supervised.tell(1001, READY="1", STATUS="x")
    supervised.tell(1001, WATCHDOG="1")
    assert supervised.step(1) == []  # one of two: not yet, and no pings
    supervised.tell(9999, READY="1")  # not a child of ours
    assert supervised.step() == []
    supervised.tell(1002, READY="1")
    supervised.tell(1002, WATCHDOG="1")
    assert supervised.step() == ["READY=1\nSTATUS=2 workers consuming\n",
                                 "WATCHDOG=1\n"]
    # a restarted child does not make the service ready again
    supervised.sup._ready.discard(0)
    supervised.tell(1001, READY="1")
    assert supervised.step() == []


def test_supervisor_pings_only_while_every_child_pings(supervised, caplog):
    supervised.tell(1001, READY="1")
    supervised.tell(1002, READY="1")
    assert supervised.step() == ["READY=1\nSTATUS=2 workers consuming\n",
                                 "WATCHDOG=1\n"]
    for _ in range(3):  # both ping every second: so does the supervisor
        supervised.tell(1001, WATCHDOG="1")
        supervised.tell(1002, WATCHDOG="1")
        assert supervised.step(1) == ["WATCHDOG=1\n"]
    supervised.tell(1001, WATCHDOG="1")  # 1002 hangs
    assert supervised.step(1) == ["WATCHDOG=1\n"]  # 1 s < WATCHDOG_USEC
    supervised.tell(1001, WATCHDOG="1")
    assert supervised.step(1.5) == []  # 2.5 s: no more
    supervised.tell(1001, WATCHDOG="1")
    assert supervised.step(1) == []
    assert "worker 1 (pid 1002) sent no watchdog ping" in caplog.text
    supervised.tell(1002, WATCHDOG="1")  # back
    assert supervised.step(0.1) == ["WATCHDOG=1\n"]
    caplog.clear()
    supervised.sup._stop_children()
    # children that ship before they exit do not ping: that is no hang
    assert supervised.step(5) == ["STOPPING=1\n"]
    assert "watchdog" not in caplog.text
