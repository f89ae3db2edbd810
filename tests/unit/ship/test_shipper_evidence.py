"""Tests for shoebox_worker.ship.shipper's ``evidence=``: each archive a
step returned as contract.Stored is recorded before the archive's state
moves on; the chain is ticked and, at a stop, closed."""

import errno
import hashlib
import json
import logging
import os
import threading

from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import contract
from shoebox_worker.ship import shipper
from shoebox_worker.ship import steps

RECORDS = [({"n": str(i)}, b'{"i": %d}' % i) for i in range(3)]


def write_archive(path):
    with archive.ArchiveWriter(str(path)) as writer:
        for metadata, payload in RECORDS:
            writer.write(metadata, payload)
    return str(path), writer.report()


def state_of(origin):
    with open(origin + shipper.STATE_SUFFIX) as f:
        return json.load(f)


class Storing(callbacks.ArchiveCallback):
    """A step that stores the archive and says what the store holds."""

    def __init__(self):
        self.calls = []

    def on_close(self, filename):
        self.calls.append(filename)
        with open(filename, "rb") as f:
            data = f.read()
        return contract.Stored(
            filename, name="archives/" + os.path.basename(filename),
            size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            etag=hashlib.md5(data).hexdigest())


class After(callbacks.ArchiveCallback):
    """The step after it: what it was given."""

    def __init__(self):
        self.given = []

    def on_close(self, filename):
        self.given.append(filename)
        return filename


class Evidence:
    """A chain that remembers; ``record`` checks the state file on disk
    as it is called, and fails ``fail`` times first."""

    def __init__(self, fail=0, tick_error=None, close_error=None):
        self.fail = fail
        self.tick_error = tick_error
        self.close_error = close_error
        self.records = []
        self.states = []      # the state file when record was called
        self.ticks = 0
        self.ticked = threading.Event()
        self.closed = 0

    def record(self, stored, report, origin):
        self.states.append(state_of(origin))
        if self.fail:
            self.fail -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records.append((stored, report, origin))

    def tick(self):
        self.ticks += 1
        self.ticked.set()
        if self.tick_error is not None:
            raise self.tick_error

    def close(self):
        self.closed += 1
        if self.close_error is not None:
            raise self.close_error


def test_a_stored_archive_is_recorded_before_its_state_moves_on(
        tmp_path, make_shipper):
    path, report = write_archive(tmp_path / "a_0123456789ab-1.events")
    storing, after, evidence = Storing(), After(), Evidence()
    ship = make_shipper([("swift", storing), ("after", after)],
                        evidence=evidence)
    ship.submit(path, report=report)
    assert ship.wait_idle(timeout=5)
    [(stored, recorded_report, origin)] = evidence.records
    assert isinstance(stored, contract.Stored)
    assert stored.name == "archives/a_0123456789ab-1.events"
    assert stored.size == os.path.getsize(path)
    assert recorded_report == report
    assert origin == path
    # the state file still named the storing step as the one to run
    [state] = evidence.states
    assert state["step"] == 0
    assert state["chain"] == ["swift", "after"]
    assert state["path"] == path
    # the next step gets a plain path
    assert after.given == [path]
    assert type(after.given[0]) is str
    assert not os.path.exists(path + shipper.STATE_SUFFIX)


def test_a_step_returning_a_plain_path_records_nothing(tmp_path,
                                                       make_shipper):
    path, report = write_archive(tmp_path / "a.events")
    memory, evidence = steps.MemoryCallback(), Evidence()
    ship = make_shipper([("memory", memory)], evidence=evidence)
    ship.submit(path, report=report)
    assert ship.wait_idle(timeout=5)
    assert memory.events == [("close", path)]
    assert evidence.records == []
    assert evidence.states == []


def test_a_record_the_disk_refuses_runs_the_storing_step_again(
        tmp_path, make_shipper, caplog):
    path, report = write_archive(tmp_path / "a.events")
    storing, after, evidence = Storing(), After(), Evidence(fail=1)
    ship = make_shipper([("swift", storing), ("after", after)],
                        evidence=evidence)
    with caplog.at_level(logging.ERROR, logger="shoebox_worker"):
        ship.submit(path, report=report)
        assert ship.wait_idle(timeout=5)
    assert storing.calls == [path, path]
    assert [state["step"] for state in evidence.states] == [0, 0]
    assert len(evidence.records) == 1
    assert after.given == [path]
    assert not os.path.exists(path + shipper.STATE_SUFFIX)
    assert any("No space left on device" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)


def test_the_chain_is_ticked_between_archives(tmp_path, make_shipper):
    log = []

    class Logged(Evidence):
        def tick(self):
            log.append("tick")
            super().tick()

    class Step(callbacks.ArchiveCallback):
        def on_close(self, filename):
            log.append(os.path.basename(filename))
            return filename

    ship = make_shipper([("step", Step())], evidence=Logged(), start=False)
    for name in ("a.events", "b.events", "c.events"):
        path, report = write_archive(tmp_path / name)
        ship.submit(path, report=report)
    ship.start()  # three archives waiting: they go one by one
    assert ship.wait_idle(timeout=5)
    ship.stop(5)
    steps_run = [entry for entry in log if entry != "tick"]
    assert sorted(steps_run) == ["a.events", "b.events", "c.events"]
    for one, two in zip(log, log[1:], strict=False):
        assert "tick" in (one, two), log


def test_the_chain_is_ticked_while_no_archive_comes(make_shipper):
    evidence = Evidence()
    make_shipper([("memory", steps.MemoryCallback())],
                 evidence=evidence)
    assert evidence.ticked.wait(5)


def test_a_tick_that_fails_is_logged_once_and_shipping_goes_on(
        tmp_path, make_shipper, caplog):
    evidence = Evidence(tick_error=RuntimeError("the store is down"))
    memory = steps.MemoryCallback()
    with caplog.at_level(logging.ERROR, logger="shoebox_worker"):
        ship = make_shipper([("memory", memory)], evidence=evidence)
        paths = []
        for name in ("a.events", "b.events", "c.events"):
            path, report = write_archive(tmp_path / name)
            paths.append(path)
            ship.submit(path, report=report)
        assert ship.wait_idle(timeout=5)
        ship.stop(5)
    assert sorted(memory.events) == [("close", p) for p in paths]
    assert evidence.ticks >= 2
    said = [r.getMessage() for r in caplog.records
            if "cannot make a digest" in r.getMessage()]
    assert said == ["integrity: cannot make a digest (tried again every "
                    "second; archives keep shipping): RuntimeError: the "
                    "store is down"]


def test_stop_closes_the_chain(make_shipper):
    evidence = Evidence()
    ship = make_shipper([("memory", steps.MemoryCallback())],
                        evidence=evidence)
    assert evidence.closed == 0
    ship.stop(5)
    assert evidence.closed == 1


def test_a_close_that_fails_is_logged_and_the_callbacks_close_all_the_same(
        make_shipper, caplog):
    closed = []

    class Closing(callbacks.ArchiveCallback):
        def on_close(self, filename):
            return filename

        def close(self):
            closed.append(True)

    evidence = Evidence(close_error=RuntimeError("disk gone"))
    ship = make_shipper([("closing", Closing())], evidence=evidence)
    with caplog.at_level(logging.ERROR, logger="shoebox_worker"):
        ship.stop(5)
    assert evidence.closed == 1
    assert closed == [True]
    assert [r.getMessage() for r in caplog.records] == [
        "integrity: the final digest failed"]
