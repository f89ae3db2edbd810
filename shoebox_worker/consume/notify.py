"""systemd's notify protocol: readiness, watchdog pings, stopping.

Under ``Type=notify`` the service manager passes ``NOTIFY_SOCKET``, the
address of a Unix datagram socket (a path, or ``@name`` in the abstract
namespace), and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, the process it is meant for). The service sends
newline-separated ``KEY=VALUE`` datagrams to it (``sd_notify(3)``):

- ``READY=1`` once the worker consumes (``systemctl start`` returns then);
- ``WATCHDOG=1`` from the consume loop, every half of ``WATCHDOG_USEC``:
  a loop that hangs stops them, and the service manager kills and restarts
  the service;
- ``STOPPING=1`` when a stop begins (``TimeoutStopSec`` runs from there).

:class:`Notifier` is the sending side; it does nothing when
``NOTIFY_SOCKET`` is unset, never blocks (a full socket drops the
datagram) and never raises: a lost notification must not stop a worker.
:class:`Listener` is the receiving side, what the supervisor of ``[worker]
processes = N`` uses to be its children's service manager (see
:mod:`~shoebox_worker.consume.supervisor`): it tells the sender of each
datagram by its pid, as systemd does, from the kernel's credentials.
"""

import logging
import os
import socket
import struct
import time

__all__ = ["Notifier", "Listener", "DISABLED", "child_environ"]

LOG = logging.getLogger(__name__)

#: The environment variables of the protocol.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"

#: Largest datagram a :class:`Listener` reads (systemd's own limit).
MAX_DATAGRAM = 4096

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _address(name):
    """``@name`` is in the abstract namespace (a leading NUL byte)."""
    return "\0" + name[1:] if name.startswith("@") else name


class Notifier:
    """Tells the service manager what the worker does.

    :param address: ``NOTIFY_SOCKET``'s value; None disables everything.
    :param watchdog_usec: the watchdog timeout in microseconds, or None
        (no ``WatchdogSec=``): :meth:`watchdog` then sends nothing.
    :param clock: monotonic seconds (injected by tests).
    """

    def __init__(self, address=None, watchdog_usec=None,
                 clock=time.monotonic):
        self.address = address or None
        #: seconds between two pings (half the timeout), None: no watchdog
        self.watchdog_interval = watchdog_usec / 2e6 \
            if self.address and watchdog_usec else None
        self._clock = clock
        self._next_ping = 0.0
        self._stopping = False
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) \
            if self.address else None

    @classmethod
    def from_environ(cls, environ=None, pid=None):
        """The notifier the service manager set up for this process.

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or
        names this process (as ``sd_watchdog_enabled(3)`` does).
        """
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        usec = environ.get(WATCHDOG_USEC, "")
        watchdog_pid = environ.get(WATCHDOG_PID, "")
        if not usec.isdigit() or int(usec) == 0 or \
                (watchdog_pid and watchdog_pid != str(pid)):
            usec = None
        return cls(environ.get(NOTIFY_SOCKET), int(usec) if usec else None)

    @property
    def enabled(self):
        return self.address is not None

    def send(self, *fields):
        """Send ``KEY=VALUE`` fields in one datagram.

        :returns: True when it was sent.
        """
        if self.address is None:
            return False
        error = self._sendto("\n".join(fields).encode("utf-8", "replace")
                             + b"\n")
        if error is not None:
            LOG.debug("notify socket %s: %s", self.address, error)
        return error is None

    def _sendto(self, data):
        """One datagram, without blocking; returns the error or None."""
        try:
            self._socket.sendto(data, socket.MSG_DONTWAIT,
                                _address(self.address))
        except OSError as exc:
            return exc
        return None

    def ready(self, status=None):
        """``READY=1``: the worker consumes."""
        fields = ["READY=1"]
        if status:
            fields.append("STATUS=%s" % status)
        self.send(*fields)

    def watchdog(self, now=None):
        """``WATCHDOG=1`` if half the watchdog timeout passed since the
        last one (cheap to call often); nothing once stopping."""
        if self.watchdog_interval is None or self._stopping:
            return
        now = self._clock() if now is None else now
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def stopping(self):
        """``STOPPING=1``, once; no watchdog pings after it. Safe to call
        from a signal handler (one ``sendto``, no lock, no logging)."""
        if self._stopping:
            return
        self._stopping = True
        if self.address is not None:
            self._sendto(b"STOPPING=1\n")


#: A notifier that sends nothing (no ``NOTIFY_SOCKET``).
DISABLED = Notifier()


def child_environ(address, watchdog_usec, pid):
    """The notify variables of a process whose service manager listens on
    ``address`` (None: no service manager)."""
    if address is None:
        return {}
    environ = {NOTIFY_SOCKET: address}
    if watchdog_usec:
        environ[WATCHDOG_USEC] = str(watchdog_usec)
        environ[WATCHDOG_PID] = str(pid)
    return environ


class Listener:
    """A notify socket of our own, in the abstract namespace, for child
    processes to send to; :meth:`receive` returns who sent what.

    :param name: the socket's name (default: unique to this process).
    """

    def __init__(self, name=None):
        self.address = name or "@shoebox-worker/notify/%d/%s" % (
            os.getpid(), os.urandom(4).hex())
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(_address(self.address))
        self.socket.setblocking(False)

    def receive(self):
        """Every datagram waiting: ``[(pid, {key: value}), ...]``."""
        received = []
        while True:
            try:
                data, ancillary, _, _ = self.socket.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return received
            pid = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and \
                        kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(value[:_UCRED.size])[0]
            fields = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    fields[key] = value
            received.append((pid, fields))

    def close(self):
        self.socket.close()
