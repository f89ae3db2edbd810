"""A quorum queue's delivery limit, and a disk that fills and frees 30
times while 20,000 messages flow: nothing is lost, on RabbitMQ 3.10 and
4.0.

A quorum queue drops a message returned to it more often than its
delivery limit (no dead-letter exchange is set here): RabbitMQ 4.0 gives
every quorum queue a limit of 20; on 3.10 the queue sets
``x-delivery-limit = 0``, so that a single return drops a message. The
worker returns nothing while its connection lives: what the full disk
refuses is kept unacked and written once there is room. The working
directory is a tmpfs of its own (96 MB); the messages are published in
31 chunks: each of the first 30 while the worker is stopped (SIGSTOP),
the tmpfs then filled with a file, so that the worker's next write meets
a full disk with deliveries under way; the test waits for it to pause,
deletes the file and waits for it to resume. Archives are moved off the
tmpfs as they close. Then every message must be in the archives, none returned
(``shoebox_messages_redelivered_total`` 0), and the worker must have said
at start, in one line, that a message returned too often is dropped.
"""

import collections
import errno
import os
import re
import subprocess

import pytest

pytestmark = [pytest.mark.functional, pytest.mark.both_brokers]

COUNT = 20000
FILLS = 30
ROUTING_KEY = "notifications.info"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 96 MB of this test's own (root only: mount)."""
    path = tmp_path / "disk"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o",
                             "size=96m,mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("mount -t tmpfs failed: %s" % result.stderr)
        pytest.skip("mount -t tmpfs failed (not root?): %s" % result.stderr)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path):
    """Write ``path`` until the file system refuses a byte more."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break


def _metric(ft, port, name):
    status, text = ft.http_get(port, "/metrics")
    assert status == 200, "the worker's /metrics did not answer"
    values = re.findall(r"^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), text,
                        re.M)
    return sum(float(v) for v in values)


@pytest.mark.slow
def test_a_disk_that_fills_and_frees_30_times_loses_nothing(
        rabbit, broker, names, tmp_path, small_disk, worker_procs, ft):
    arguments = {"x-queue-type": "quorum"}
    if not broker.is_4:  # 3.x: no limit unless set; 0 drops at a return
        arguments["x-delivery-limit"] = 0
    rabbit.declare(names, names, ROUTING_KEY, durable=True,
                   queue_arguments=arguments)
    port = ft.free_port()
    # shipped on the same file system: a move is a hard link and an unlink,
    # so shipping frees no room, and only the test's unlink of its filler
    # ends a pause (shipped to another one, a move freed a few hundred KB
    # once the worker went on, and a fill near the end of a chunk made no
    # pause: seen in CI)
    dest = small_disk / "shipped"
    config = ft.worker_config(
        tmp_path, names, names, url=broker.url, routing_key=ROUTING_KEY,
        durable=True, roll_checker="count", roll_options={"roll_count": 500},
        callbacks={"move": {"destination_folder": dest}},
        consumer_options={"queue_arguments": ", ".join(
            "%s=%s" % item for item in arguments.items())},
        # small batches: the 30 fills come before the queue is drained
        broker={"prefetch_count": 50},
        archive_options={"working_directory": small_disk / "archive",
                         "fsync_every": 25})
    with open(config, "a") as f:
        f.write("\n[metrics]\nport = %d\n" % port)
    worker = worker_procs(config, idle_exit=2)
    assert worker.wait_for_log("consuming from", 60), worker.log_tail()

    # the messages flow in chunks: each published while the worker is
    # stopped (SIGSTOP), and the disk filled before it goes on, so that
    # its next write meets a full disk with deliveries under way
    published = []
    chunk = COUNT // (FILLS + 1)
    filler = small_disk / "filler"
    for fill in range(1, FILLS + 1):
        with ft.paused(worker):
            published += ft.publish(broker.url, chunk, names, ROUTING_KEY,
                                    seed=4100 + fill, durable=True)
            _fill(filler)
        ft.wait_until(lambda: _metric(ft, port, "shoebox_paused") == 1, 60,
                      message="the pause of fill %d" % fill)
        filler.unlink()
        ft.wait_until(lambda: _metric(ft, port, "shoebox_paused") == 0, 60,
                      message="the resume after fill %d" % fill)
    published += ft.publish(broker.url, COUNT - len(published), names,
                            ROUTING_KEY, seed=4100, durable=True)
    assert len(re.findall("PAUSED consuming", worker.log)) == FILLS
    assert len(re.findall("RESUMED consuming", worker.log)) == FILLS
    redelivered = _metric(ft, port, "shoebox_messages_redelivered_total")
    assert worker.wait(180) == 0, worker.log_tail()

    left = sorted(name for name in os.listdir(small_disk / "archive")
                  if not name.startswith(".") and name != "worker.lock")
    records = ft.read_archives(dest)
    counts = collections.Counter(r.metadata["message_id"] for r in records)
    lost = set(published) - set(counts)
    duplicates = sum(counts.values()) - len(counts)
    kept = [int(n) for n in re.findall(
        r"kept (\d+) unsynced message\(s\)", worker.log)]
    print("\n%s %s: %d fills, %d messages, %d lost, %d duplicate(s), %d "
          "redelivered; unsynced messages kept at the pauses: %s" % (
              broker.name, ".".join(map(str, broker.version)), FILLS,
              COUNT, len(lost), duplicates, redelivered, kept))
    assert not lost, "%d message(s) lost, e.g. %s; left in the working "\
        "directory: %s" % (len(lost), sorted(lost)[:3], left)
    assert set(counts) == set(published)
    assert left == [], left
    assert redelivered == 0
    assert rabbit.depth(names) == 0
    limit = "x-delivery-limit 20: RabbitMQ 4's default" if broker.is_4 \
        else "x-delivery-limit 0"
    warnings = [line for line in worker.log.splitlines()
                if "is DROPPED (%s" % limit in line]
    assert len(warnings) == 1, worker.log_tail()
