"""A failed fsync on the real RabbitMQ (3.10 and 4.0): the records of the
unsynced batch are cut off the archive, its messages kept unacked (not
returned to the broker: a return spends one of a quorum queue's delivery
attempts) and written again once the disk has room, and the worker
carries on: nothing lost, nothing twice.

The fsync is made to fail from outside, with strace's fault injection
(``-e inject=fsync:error=ENOSPC:when=K``): the K-th fsync of the worker is
its second commit (the first ones are the start-up probe and the archive
folder); strace counts per thread, so the shipper thread's 4th fsync fails
as well, and is retried. ENOSPC pauses consumption until 64 MB are free,
which they are at once here: the worker resumes at its next tick.
"""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.functional, pytest.mark.both_brokers]

ROUTING_KEY = "notifications.info"
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")


def test_a_failed_fsync_keeps_the_batch_and_loses_nothing(
        rabbit, broker, names, tmp_path, ft):
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing (scripts/debian-packages installs "
                    "it)")
    rabbit.declare(names, names, ROUTING_KEY, durable=True)
    ids = ft.publish(broker.url, 200, names, ROUTING_KEY, seed=21,
                     durable=True)
    config = ft.worker_config(
        tmp_path, names, names, url=broker.url, routing_key=ROUTING_KEY,
        durable=True,
        roll_checker="count", roll_options={"roll_count": 1000},
        broker={"prefetch_count": 100},
        archive_options={"fsync_every": 25, "fsync_interval": 5},
        worker={"stats_interval": 0})
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync",
             "-e", "inject=fsync:error=ENOSPC:when=4",
             WORKER, "run", "--config", config, "--idle-exit", "2"],
            stdout=out, stderr=subprocess.STDOUT, timeout=90)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "No space left on device" in text, text[-3000:]
    assert "kept 25 unsynced message(s)" in text, text[-3000:]
    assert "RESUMED consuming" in text, text[-3000:]
    # (strace counts calls per thread: the shipper thread's 4th fsync
    # fails too, and is retried)
    assert rabbit.depth(names) == 0
    records = ft.read_archives(tmp_path / "archive")
    assert sorted(r.metadata["message_id"] for r in records) == sorted(ids)
