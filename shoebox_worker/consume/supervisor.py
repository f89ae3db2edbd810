"""``[worker] processes = N``: N consumer processes under one supervisor.

One Python process tops out near one core (the GIL); measured here, two
consumers drain about 1.3x what one does. Each child is a full worker with
its own connection, archive and shipper; file names carry the child's pid,
and file locks keep children from taking over each other's archives.

The supervisor restarts a child that dies (with backoff), passes SIGTERM
and SIGINT on (as SIGTERM; a repeat within a second is not passed on: see
:mod:`.signals`; children ignore SIGINT, so the terminal's Ctrl-C reaches
them only through the supervisor, as one SIGTERM per stop), and exits 0
once every child has exited 0. A child that stops for a reason a new one
would meet again stops them all: a config mistake (exit 2), or a broker it
gave up on (``runner.EXIT_BROKER``: ``[broker] connect_max_retries`` ran
out; the supervisor then exits 1).

Under systemd (``Type=notify``, ``KillMode=mixed``, ``NotifyAccess=main``)
the supervisor is the service's main process and the only one that talks
to systemd; it is its children's service manager in turn. Each child gets
``NOTIFY_SOCKET`` naming a :class:`~shoebox_worker.consume.notify.Listener`
of the supervisor's, and the unit's ``WATCHDOG_USEC``, and notifies as a
single worker would. The supervisor sends ``READY=1`` once every child has
(once every child consumes), then ``WATCHDOG=1`` every half of
``WATCHDOG_USEC``, but only while every running child has pinged it within
``WATCHDOG_USEC`` (a child whose consume loop hangs stops the pings, and
systemd restarts the service; a restarted child has ``WATCHDOG_USEC`` from
its start for its first ping), and ``STOPPING=1`` when it stops its
children.
"""

import logging
import multiprocessing
import os
import signal
import time

from shoebox_worker.consume import notify
from shoebox_worker.consume import runner
from shoebox_worker.consume import signals

__all__ = ["Supervisor"]

LOG = logging.getLogger(__name__)

#: Restart delays for a child that keeps dying: doubles up to this.
MAX_RESTART_DELAY = 30.0
#: The signals that stop the supervisor and, through it, every child.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


W_HUNG = ("worker %d (pid %d) sent no watchdog ping for %.0f s: no more "
          "pings to the service manager, which will restart the service")


def _child(conf, plugins, idle_exit, notify_address, watchdog_usec):
    # Ctrl-C comes through the supervisor, as SIGTERM (runner.run_child);
    # SIGINT is still blocked here, and one pending is dropped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in (notify.NOTIFY_SOCKET, notify.WATCHDOG_USEC,
                 notify.WATCHDOG_PID):
        os.environ.pop(name, None)
    os.environ.update(notify.child_environ(notify_address, watchdog_usec,
                                           os.getpid()))
    os._exit(runner.run_child(conf, plugins, idle_exit))


class Supervisor:
    """Starts ``conf.worker.processes`` workers and watches them.

    :param conf: a loaded :class:`~shoebox_worker.config.Config`.
    :param plugins: ``(roll_checker, [(name, callback), ...])`` from
        :func:`shoebox_worker.plugins.build`; each child inherits them
        through fork.
    :param idle_exit: passed on to each child's worker.
    :param notifier: the service manager's
        :class:`~shoebox_worker.consume.notify.Notifier` (default: from
        ``NOTIFY_SOCKET``; without it the children get none either).
    """

    def __init__(self, conf, plugins, idle_exit=None, notifier=None):
        self.conf = conf
        self.plugins = plugins
        self.idle_exit = idle_exit
        self.count = conf.worker.processes
        self.stopping = False
        self._ctx = multiprocessing.get_context("fork")
        self.children = {}      # index -> Process
        self.delays = {}        # index -> next restart delay
        self.restart_at = {}    # index -> monotonic time
        self._signal = None     # the stop signal received, not yet logged
        #: SIGTERM/SIGINT counted (a repeat within a second is one)
        self.stop_signals = signals.StopSignals()
        self.notifier = notifier or notify.Notifier.from_environ()
        self._listener = None   # the children's notify socket
        self._watchdog_usec = None
        if self.notifier.watchdog_interval is not None:
            self._watchdog_usec = int(self.notifier.watchdog_interval * 2e6)
        self._ready = set()     # indexes whose child sent READY=1
        self._ready_sent = False  # READY=1 sent to the service manager
        self._pinged = {}       # index -> monotonic time of its last ping
        self._hung = set()      # indexes already said to be hung

    def _start(self, index):
        address = self._listener.address if self._listener else None
        proc = self._ctx.Process(target=_child,
                                 args=(self.conf, self.plugins,
                                       self.idle_exit, address,
                                       self._watchdog_usec),
                                 name="shoebox-worker-%d" % index)
        # SIGTERM and SIGINT wait while the child is forked and recorded:
        # here, so that a stop arriving meanwhile reaches the new child
        # too; in the child (which inherits the mask), until the worker
        # has its own handlers (runner.run_worker unblocks them)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
            self.children[index] = proc
            self._ready.discard(index)
            self._pinged[index] = time.monotonic()  # its first ping's grace
            self._hung.discard(index)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        LOG.info("started worker %d (pid %d)", index, proc.pid)

    def _on_signal(self, signum, frame):
        # no logging here: a handler that interrupts a log call and logs
        # again breaks the log stream; run() says it
        if not self.stop_signals.received():
            return  # the same stop told twice (Ctrl-C, then systemd...)
        self._signal = signum
        self._stop_children()

    def _log_signal(self):
        signum, self._signal = self._signal, None
        if signum is not None:
            LOG.info("got %s: stopping %d worker(s)",
                     signal.Signals(signum).name, self.count)

    def _stop_children(self):
        self.notifier.stopping()
        self.stopping = True
        for proc in self.children.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def run(self):
        """Supervise until stopped; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.notifier.enabled:
            self._listener = notify.Listener()
        try:
            return self._supervise()
        finally:
            if self._listener is not None:
                self._listener.close()

    def _supervise(self):
        for index in range(self.count):
            self._start(index)
        code = 0
        while self.children or (self.restart_at and not self.stopping):
            self._log_signal()
            self._notify()
            for index, proc in list(self.children.items()):
                proc.join(timeout=0.2 / max(len(self.children), 1))
                if proc.exitcode is None:
                    continue
                del self.children[index]
                if proc.exitcode == 0 and (self.stopping or
                                           self.idle_exit is not None):
                    continue
                if proc.exitcode == 2:  # a config mistake: no restart helps
                    LOG.error("worker %d exited with a configuration "
                              "error; stopping", index)
                    code = 2
                    self._stop_children()
                    continue
                if proc.exitcode == runner.EXIT_BROKER:
                    # it gave up on the broker ([broker]
                    # connect_max_retries): so would a new one
                    LOG.error("worker %d gave up on the broker; stopping",
                              index)
                    code = code or 1
                    self._stop_children()
                    continue
                if self.stopping:
                    code = code or 1
                    continue
                delay = self.delays.get(index, 1.0)
                self.delays[index] = min(delay * 2, MAX_RESTART_DELAY)
                self.restart_at[index] = time.monotonic() + delay
                LOG.error("worker %d (pid %d) exited with %s; restarting "
                          "in %.0f s", index, proc.pid, proc.exitcode, delay)
            now = time.monotonic()
            for index, when in list(self.restart_at.items()):
                if self.stopping:
                    del self.restart_at[index]
                elif now >= when:
                    del self.restart_at[index]
                    self._start(index)
            if not self.children:
                time.sleep(0.2)
        self._log_signal()
        LOG.info("all workers stopped")
        return code

    def _notify(self):
        """Read what the children told, and tell systemd (see the module
        docstring)."""
        if self._listener is None:
            return
        now = time.monotonic()
        index_of = {proc.pid: index
                    for index, proc in self.children.items()}
        for pid, fields in self._listener.receive():
            index = index_of.get(pid)
            if index is None:
                continue
            if fields.get("READY") == "1" and index not in self._ready:
                self._ready.add(index)
                if len(self._ready) == self.count and \
                        not self._ready_sent:
                    self._ready_sent = True
                    self.notifier.ready("%d workers consuming" % self.count)
            if fields.get("WATCHDOG") == "1":
                self._pinged[index] = now
                if index in self._hung:
                    self._hung.discard(index)
                    LOG.info("worker %d pings again", index)
        if self._watchdog_usec is None or self.stopping or \
                not self._ready_sent:
            return  # systemd's watchdog runs from READY=1 to STOPPING=1
        timeout = self._watchdog_usec / 1e6
        healthy = True
        for index, proc in self.children.items():
            silent = now - self._pinged.get(index, now)
            if silent > timeout:
                healthy = False
                if index not in self._hung:
                    self._hung.add(index)
                    LOG.error(W_HUNG, index, proc.pid, silent)
        if healthy:
            self.notifier.watchdog(now)
