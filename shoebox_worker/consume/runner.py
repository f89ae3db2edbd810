"""One worker process, from a loaded config to its exit code.

:func:`run_worker` is what ``shoebox-worker run`` does with ``processes =
1``, and what each child of the supervisor does: build the worker, ship
what a previous run left, declare, consume until told to stop, shut down.
The plugins come built (``cli`` builds them once, from the config it
checked; supervised children inherit them through fork).

A broker that cannot be reached within ``[broker] connect_max_retries``
ends the run with one :class:`~shoebox_worker.exceptions.ShoeboxError`
line naming it (password masked) and what to do.
"""

import logging
import signal

from shoebox_worker import __version__
from shoebox_worker import exceptions
from shoebox_worker.consume import broker
from shoebox_worker.consume import metrics
from shoebox_worker.consume import signals
from shoebox_worker.consume import worker as worker_mod

__all__ = ["run_worker", "run_child"]

LOG = logging.getLogger(__name__)

#: A supervised child's exit code when it stopped because of the broker (it
#: could not be reached within ``[broker] connect_max_retries``, or refused
#: something retrying will not fix): restarting the child would only repeat
#: it, so the supervisor stops and exits 1 (see :mod:`.supervisor`).
EXIT_BROKER = 3

def run_worker(conf, plugins, idle_exit=None,
               stop_signals=(signal.SIGTERM, signal.SIGINT)):
    """Run one worker process until it is told to stop.

    :param conf: a loaded :class:`~shoebox_worker.config.Config`.
    :param plugins: ``(roll_checker, [(name, callback), ...])`` from
        :func:`shoebox_worker.plugins.build`.
    :param idle_exit: stop once no message came for this many seconds.
    :param stop_signals: the signals that stop it (a supervised child
        hears SIGTERM alone: see :func:`run_child`).
    :returns: the exit code.
    :raises BrokerError: the broker could not be reached within
        ``[broker] connect_max_retries`` (see :mod:`.broker`).
    """
    roll_checker, callbacks = plugins
    worker = worker_mod.Worker(conf, roll_checker=roll_checker,
                               callbacks=callbacks, idle_exit=idle_exit)

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not worker.stop():
            LOG.info("got %s again within %.0f s: the same stop", name,
                     signals.REPEAT)
        elif worker.stopping != worker_mod.STOP_INTERRUPTED:
            LOG.info("got %s: stopping", name)
        elif worker.stop_signals.count > 1:
            LOG.info("got %s again: stopping now, shipping left to the "
                     "next start", name)
        else:  # the first signal, while --idle-exit ships before exiting
            LOG.info("got %s: stopping now, shipping left to the next "
                     "start", name)

    for signum in stop_signals:
        signal.signal(signum, on_signal)
    # a supervised child starts with them blocked (see Supervisor._start):
    # one that came meanwhile is delivered now, to the handler above
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM,
                                               signal.SIGINT))
    LOG.info("shoebox-worker %s starting: broker %s, archives in %s",
             __version__, conf.broker.redacted_url(), worker.directory)
    if conf.metrics.port:
        metrics.serve(worker.stats, [queue.name for queue in worker.queues],
                      worker.shipper.chain_names, conf.metrics.host,
                      conf.metrics.port)
    # ship what a previous run left even while the broker is unreachable
    worker.start()
    try:
        broker.declare(worker)
        worker.run()
    except worker_mod.StopRequested:
        LOG.info("stopped before the broker answered")
    finally:
        worker.shutdown()
    LOG.info("stopped")
    return worker.exit_code


def run_child(conf, plugins, idle_exit=None):
    """:func:`run_worker` in a supervised child: an error becomes one log
    line and an exit code, worded as ``cli.main`` words them
    (:func:`~shoebox_worker.exceptions.describe`); the traceback only when
    logging at DEBUG, as ``--debug`` does.

    The child stops on SIGTERM alone (the supervisor's ``_child`` ignores
    SIGINT): Ctrl-C reaches the whole process group, and the supervisor
    passes each stop it counts on as one SIGTERM, so a child that counted
    the terminal's SIGINT too would depend on which of the two came first
    and how far apart (a second stop skips the shipping grace).
    """
    try:
        return run_worker(conf, plugins, idle_exit,
                          stop_signals=(signal.SIGTERM,))
    except Exception as exc:
        line, code = exceptions.describe(exc)
        LOG.error("worker stopped: %s", line,
                  exc_info=LOG.isEnabledFor(logging.DEBUG))
        if isinstance(exc, broker.BrokerError):
            return EXIT_BROKER
        return code
