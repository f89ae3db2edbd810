"""Run ``shoebox-worker`` with a wall clock that steps, as an NTP step or
a VM snapshot restore would, while the monotonic clock runs on.

    python clockstep.py run --config worker.conf --idle-exit 3

``SHOEBOX_TEST_CLOCK``: ``after=offset,after=offset...``: from ``after``
seconds (monotonic, from this process's start) on, the wall clock is the
real one plus ``offset`` seconds (negative: behind). Before the first
step, the offset is 0. ``time.time``, ``time.time_ns`` and
``datetime.datetime.now``/``utcnow``/``today`` follow it; ``time.monotonic``
and ``time.sleep`` do not (libfaketime's ``FAKETIME_DONT_FAKE_MONOTONIC``
breaks ``time.sleep`` here).

``SHOEBOX_TEST_WORKER_ID``: the worker id to use instead of host-pid (a
restarted container: same host name, same PID).
"""

import datetime
import os
import sys
import time

_real_time = time.time
_real_time_ns = time.time_ns
_started = time.monotonic()
_steps = sorted(
    (float(after), float(offset))
    for after, offset in (item.split("=") for item in os.environ.get(
        "SHOEBOX_TEST_CLOCK", "").split(",") if item))


def offset():
    """The wall clock's offset now, in seconds."""
    elapsed = time.monotonic() - _started
    current = 0.0
    for after, value in _steps:
        if elapsed >= after:
            current = value
    return current


def fake_time():
    return _real_time() + offset()


def fake_time_ns():
    return _real_time_ns() + int(offset() * 1e9)


class FakeDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls.fromtimestamp(fake_time(), tz)

    @classmethod
    def utcnow(cls):
        return cls.now(datetime.timezone.utc).replace(tzinfo=None)

    @classmethod
    def today(cls):
        return cls.now()


def main():
    time.time = fake_time
    time.time_ns = fake_time_ns
    datetime.datetime = FakeDatetime
    ident = os.environ.get("SHOEBOX_TEST_WORKER_ID")
    if ident:
        from shoebox_worker.consume import worker
        worker.worker_id = lambda: ident
    from shoebox_worker import cli
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
