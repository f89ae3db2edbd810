"""The delivery guarantee seen from the kernel: every ``basic.ack`` the
worker sends follows the ``fsync`` of the archive that holds the records
it acks.

The unit tests record "sync" when ``ArchiveWriter.sync`` runs, whether or
not it fsynced; this test watches the real system calls instead. The
worker runs under ``strace -f`` (its threads included) against the
machine's RabbitMQ, and the trace is replayed in order:

- ``write`` on an archive file adds bytes to it; ``fsync`` (or
  ``fdatasync``) makes every byte written to it so far durable;
- the bytes written to the AMQP socket are parsed into frames; a
  ``basic.ack`` (class 60, method 80) with delivery tag ``D`` and the
  ``multiple`` bit acks deliveries 1..D of its channel.

The worker consumes one queue on one channel and this test publishes
nothing else, so delivery ``k`` is the ``k``-th record written (archives in
the order they were first written). After the run each archive is read
back to know where each record ends; at every ack, each record it covers
must lie below the durable offset of its archive at that point of the
trace.
"""

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from shoebox_worker import archive

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")

#: ``PID name(FD<path>, "...", ...) = result``, and the halves strace prints
#: when two threads interleave (``<unfinished ...>`` / ``<... name
#: resumed>``).
CALL = re.compile(r"^(\d+)\s+(\w+)\((\d+)<(.*?)>(?=[,)]| <unf)(.*)$")
RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
DATA = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
RESULT = re.compile(r"=\s+(-?\d+)")

FRAME_METHOD = 1
FRAME_END = 0xCE
BASIC_ACK = (60, 80)


def _bytes(escaped):
    """strace -xx's "\\x01\\x02" as bytes."""
    return bytes.fromhex(escaped.replace("\\x", ""))


class AmqpStream:
    """The frames a client wrote on one socket, in order (a frame may span
    two writes)."""

    def __init__(self):
        self.buffer = b""
        self.started = False

    def feed(self, data):
        """:returns: the ``(channel, delivery_tag, multiple)`` of every
        complete basic.ack frame in the stream so far."""
        self.buffer += data
        if not self.started:  # the protocol header comes first
            if len(self.buffer) < 8:
                return []
            assert self.buffer[:4] == b"AMQP", self.buffer[:8]
            self.buffer, self.started = self.buffer[8:], True
        acks = []
        while len(self.buffer) >= 7:
            kind, channel, size = struct.unpack(">BHI", self.buffer[:7])
            if len(self.buffer) < 8 + size:
                break
            payload = self.buffer[7:7 + size]
            assert self.buffer[7 + size] == FRAME_END, "lost frame sync"
            self.buffer = self.buffer[8 + size:]
            if kind == FRAME_METHOD and \
                    struct.unpack(">HH", payload[:4]) == BASIC_ACK:
                tag, bits = struct.unpack(">QB", payload[4:13])
                acks.append((channel, tag, bool(bits & 1)))
        return acks


def replay(trace_path):
    """The trace as events in order: ``("write", path, nbytes)``,
    ``("sync", path)``, ``("ack", channel, tag, multiple)``.

    A write counts at its entry with its returned size (strace prints the
    data at entry and the result when it resumes); an fsync counts when
    it returns (its ``resumed`` line, or its whole line).
    """
    events = []
    pending = {}   # pid -> (name, path, data) of an unfinished call
    streams = {}   # socket description -> AmqpStream
    writes = {}    # pid -> index in events of an unfinished write

    def handle(name, path, data, result, pid, at=None):
        if name in ("fsync", "fdatasync"):
            if result == 0:
                events.append(("sync", path))
            return
        if path.startswith("TCP") and ":5672]" in path:
            stream = streams.setdefault(path, AmqpStream())
            for ack in stream.feed(data):
                events.append(("ack",) + ack)
        elif path.endswith(".events"):
            if at is None:
                events.append(("write", path, result))
            else:
                events[at] = ("write", path, result)

    with open(trace_path) as f:
        for line in f:
            line = line.rstrip("\n")
            match = CALL.match(line)
            if match:
                pid, name, _, path, rest = match.groups()
                if path.startswith("\\x"):  # -xx escapes paths too
                    path = _bytes(path).decode()
                data = b"".join(_bytes(m) for m in DATA.findall(rest)) \
                    if name not in ("fsync", "fdatasync") else b""
                if rest.endswith("<unfinished ...>"):
                    if name in ("fsync", "fdatasync"):
                        pending[pid] = (name, path)
                    elif path.endswith(".events"):
                        # reserve the write's place; its size comes later
                        events.append(("write", path, None))
                        writes[pid] = (len(events) - 1, path)
                    else:
                        handle(name, path, data, None, pid)
                    continue
                result = RESULT.search(rest.rsplit(")", 1)[-1])
                handle(name, path, data,
                       int(result.group(1)) if result else None, pid)
                continue
            match = RESUMED.match(line)
            if match:
                pid, name, rest = match.groups()
                result = RESULT.search(rest.rsplit(")", 1)[-1])
                value = int(result.group(1)) if result else None
                if pid in pending and pending[pid][0] == name:
                    _, path = pending.pop(pid)
                    handle(name, path, b"", value, pid)
                elif pid in writes:
                    at, path = writes.pop(pid)
                    handle(name, path, b"", value, pid, at=at)
    return events


def record_ends(directory, order):
    """Where each record ends, in delivery order: ``[(path, end), ...]``
    over the archives in ``order`` (the order they were first written)."""
    ends = []
    for path in order:
        with archive.ArchiveReader(os.path.join(directory, path)) as reader:
            for offset, _, size, _, _ in reader.records():
                ends.append((path, offset + size))
    return ends


def test_every_ack_follows_the_fsync_of_its_records(rabbit, names, tmp_path,
                                                    ft):
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing (scripts/debian-packages installs "
                    "it)")
    rabbit.declare(names, names, ROUTING_KEY)
    count = 400
    ids = ft.publish(ft.AMQP_URL, count, names, ROUTING_KEY)
    # archives of 90 records, a commit every 25: rolls land mid-batch
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": 90},
        broker={"prefetch_count": 100},
        archive_options={"fsync_every": 25, "fsync_interval": 0.3},
        worker={"stats_interval": 0})
    trace = tmp_path / "strace.out"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [strace, "-f", "-qq", "--seccomp-bpf", "-yy", "-xx",
             "-s", "4194304", "-o", str(trace),
             "-e", "trace=write,writev,sendto,sendmsg,fsync,fdatasync",
             WORKER, "run", "--config", config, "--idle-exit", "1.5"],
            stdout=out, stderr=subprocess.STDOUT, timeout=120,
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert rabbit.depth(names) == 0

    directory = tmp_path / "archive"
    records = ft.read_archives(directory)
    assert sorted(r.metadata["message_id"] for r in records) == sorted(ids)

    events = replay(trace)
    written = [e[1] for e in events if e[0] == "write"]
    order = [os.path.basename(p) for p in dict.fromkeys(written)]
    assert len(order) == len(ft.archive_files(directory)) >= 4, order
    ends = record_ends(str(directory), order)
    assert len(ends) == count

    size = {}      # archive -> bytes written so far
    durable = {}   # archive -> bytes fsynced
    acked = 0
    acks = 0
    for event in events:
        if event[0] == "write":
            name = os.path.basename(event[1])
            assert event[2] is not None and event[2] >= 0, event
            size[name] = size.get(name, 0) + event[2]
        elif event[0] == "sync":
            name = os.path.basename(event[1])
            if name in size:
                durable[name] = size[name]
        else:
            _, channel, tag, multiple = event
            acks += 1
            assert multiple, event  # one basic.ack(multiple=True) a batch
            assert tag > acked, event
            for k in range(acked, tag):
                name, end = ends[k]
                assert durable.get(name, 0) >= end, (
                    "delivery %d acked before its record (%s, ends at %d) "
                    "was fsynced (%d durable)" % (k + 1, name, end,
                                                  durable.get(name, 0)))
            acked = tag
    assert acked == count
    # a commit each 25 records and at each roll: not one ack per message
    assert count // 25 <= acks < count // 5, acks
