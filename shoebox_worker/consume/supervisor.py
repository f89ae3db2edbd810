"""``[worker] processes = N``: N consumer processes under one supervisor.

One Python process tops out near one core (the GIL); measured here, two
consumers drain about 1.3x what one does. Each child is a full worker with
its own connection, archive and shipper; file names carry the child's pid,
and file locks keep children from taking over each other's archives.

The supervisor restarts a child that dies (with backoff), passes SIGTERM
and SIGINT on, and exits 0 once every child has exited 0.
"""

import logging
import multiprocessing
import os
import signal
import time

from shoebox_worker.consume import runner

__all__ = ["Supervisor"]

LOG = logging.getLogger(__name__)

#: Restart delays for a child that keeps dying: doubles up to this.
MAX_RESTART_DELAY = 30.0


def _child(conf, plugins, idle_exit):
    os._exit(runner.run_child(conf, plugins, idle_exit))


class Supervisor:
    """Starts ``conf.worker.processes`` workers and watches them.

    :param conf: a loaded :class:`~shoebox_worker.config.Config`.
    :param plugins: ``(roll_checker, [(name, callback), ...])`` from
        :func:`shoebox_worker.plugins.build`; each child inherits them
        through fork.
    :param idle_exit: passed on to each child's worker.
    """

    def __init__(self, conf, plugins, idle_exit=None):
        self.conf = conf
        self.plugins = plugins
        self.idle_exit = idle_exit
        self.count = conf.worker.processes
        self.stopping = False
        self._ctx = multiprocessing.get_context("fork")
        self.children = {}      # index -> Process
        self.delays = {}        # index -> next restart delay
        self.restart_at = {}    # index -> monotonic time

    def _start(self, index):
        proc = self._ctx.Process(target=_child,
                                 args=(self.conf, self.plugins,
                                       self.idle_exit),
                                 name="shoebox-worker-%d" % index)
        proc.start()
        self.children[index] = proc
        LOG.info("started worker %d (pid %d)", index, proc.pid)

    def _on_signal(self, signum, frame):
        if not self.stopping:
            LOG.info("got %s: stopping %d worker(s)",
                     signal.Signals(signum).name, len(self.children))
        self.stopping = True
        for proc in self.children.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def run(self):
        """Supervise until stopped; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(self.count):
            self._start(index)
        code = 0
        while self.children or (self.restart_at and not self.stopping):
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
                    self._on_signal(signal.SIGTERM, None)
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
        LOG.info("all workers stopped")
        return code
