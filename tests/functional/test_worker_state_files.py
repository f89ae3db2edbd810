"""The worker against the machine's RabbitMQ with shipping state of the
wrong shape left in its working directory: state files of the wrong shape
and a FIFO named ``.finished.ship``. It starts, ships every record once,
and stops on SIGTERM."""

import collections
import json
import os
import signal

import pytest

from shoebox_worker.ship import shipper

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"
#: Records per archive (the count roll checker).
PER_ARCHIVE = 4


def _config(ft, tmp_path, names, callbacks=None):
    return ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": PER_ARCHIVE},
        callbacks=callbacks, name="worker-%d.conf" % len(callbacks or ()))


def _first_run(ft, rabbit, names, tmp_path, archives):
    """``archives`` archives of :data:`PER_ARCHIVE` records each, written
    by a worker without callbacks (so left in place, listed as done);
    returns their paths and the message ids published."""
    rabbit.declare(names, names, ROUTING_KEY)
    published = ft.publish(ft.AMQP_URL, archives * PER_ARCHIVE, names,
                           ROUTING_KEY, seed=20)
    first = ft.run_worker(_config(ft, tmp_path, names))
    assert first.returncode == 0, first.log_tail()
    written = ft.archive_files(tmp_path / "archive")
    assert len(written) == archives
    return written, published


def _ships_everything_once(ft, rabbit, names, tmp_path, worker_procs,
                           published):
    """Publish more, start the worker shipping through ``gzip, move``, wait
    until every record is in the destination, stop it with SIGTERM;
    returns its log."""
    published = published + ft.publish(ft.AMQP_URL, PER_ARCHIVE, names,
                                       ROUTING_KEY, seed=21)
    shipped = tmp_path / "shipped"
    worker = worker_procs(_config(ft, tmp_path, names, {
        "gzip": {}, "move": {"destination_folder": shipped}}))

    def shipped_ids():
        return collections.Counter(
            r.metadata["message_id"] for r in ft.read_archives(shipped))

    ft.wait_until(lambda: not worker.alive() or sum(
        shipped_ids().values()) >= len(published), 60, interval=0.1,
        message="every record shipped")
    assert worker.alive(), worker.log_tail()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log_tail()
    assert shipped_ids() == collections.Counter(published)  # each once
    assert ft.archive_files(tmp_path / "archive") == []
    assert rabbit.depth(names) == 0
    return worker.log


def test_state_files_of_the_wrong_shape(rabbit, names, tmp_path,
                                        worker_procs, ft):
    # each a start that stopped the worker ("this is a bug", exit 1) or
    # skipped the whole chain (a step past its end: listed as done)
    written, published = _first_run(ft, rabbit, names, tmp_path, 3)
    os.unlink(tmp_path / "archive" / shipper.DONE_FILE)
    chain = ["gzip", "move"]
    states = [[], {"path": 5, "step": 0, "chain": chain},
              {"path": written[2], "step": 2, "chain": chain}]
    for path, state in zip(written, states, strict=True):
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump(state, f)
    log = _ships_everything_once(ft, rabbit, names, tmp_path, worker_procs,
                                 published)
    said = [line for line in log.splitlines()
            if "from the first step of the chain" in line]
    assert len(said) == 3 and all(" WARNING " in line for line in said), \
        log
    for path, problem in zip(written, [
            "holds [], not an object", "says path is 5, not a file name",
            "says step is 2, not one of the chain's 2 (0 to 1)"],
            strict=True):
        assert shipper.W_BAD_STATE % (path + shipper.STATE_SUFFIX, problem,
                                      path) in log


def test_a_fifo_named_finished_ship(rabbit, names, tmp_path, worker_procs,
                                    ft):
    # opening it for reading waited for a writer: the start hung, and
    # SIGTERM did not stop it
    written, published = _first_run(ft, rabbit, names, tmp_path, 2)
    done = tmp_path / "archive" / shipper.DONE_FILE
    os.unlink(done)
    os.mkfifo(done)
    log = _ships_everything_once(ft, rabbit, names, tmp_path, worker_procs,
                                 published)
    assert log.count(shipper.W_BAD_DONE % (
        done, "cannot be read (a FIFO)")) == 1, log
    # written again as a regular file; its archives were moved away since
    assert not os.path.islink(done) and json.loads(done.read_text()) == {}
