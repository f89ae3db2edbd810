"""Tests for shoebox_worker.ship.shipper: the background chain, its state
files,
retries and recovery after a crash."""

import errno
import gzip
import itertools
import json
import logging
import os
import random
import shutil
import threading
import time

import orjson
import pytest

from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index
from shoebox_worker import record
from shoebox_worker.consume import stats as stats_mod
from shoebox_worker.ship import shipper
from shoebox_worker.ship import steps

RECORDS = [({"n": str(i), "timestamp": "2024-03-09 10:0%d:00" % (4 - i)},
            b'{"i": %d}' % i) for i in range(5)]


def write_archive(path, records=RECORDS):
    with archive.ArchiveWriter(path) as writer:
        for metadata, payload in records:
            writer.write(metadata, payload)
    return str(path)


def read(path):
    with archive.ArchiveReader(path) as reader:
        return list(reader)


def state_of(path):
    with open(str(path) + shipper.STATE_SUFFIX) as f:
        return json.load(f)


def is_archive(name):
    return name.endswith(".events")


class Recorder(callbacks.ArchiveCallback):
    """Logs (name, filename, whether the file exists) into a shared list."""

    def __init__(self, name, log):
        self.name = name
        self.log = log

    def on_close(self, filename):
        self.log.append((self.name, filename, os.path.exists(filename)))
        return filename


class Flaky(callbacks.ArchiveCallback):
    def __init__(self, name, log, fail_times):
        self.name = name
        self.log = log
        self.fail_times = fail_times

    def on_close(self, filename):
        if self.fail_times:
            self.fail_times -= 1
            self.log.append((self.name + ":fail", filename,
                             os.path.exists(filename)))
            raise OSError("upload refused")
        self.log.append((self.name, filename, os.path.exists(filename)))
        return filename


class Reports(callbacks.ArchiveCallback):
    """Takes the report: logs (filename, report) into a shared list."""

    def __init__(self, log):
        self.log = log

    def on_close(self, filename, *, report=None):
        self.log.append((filename, report))
        return filename


def writer_report(path, records=RECORDS):
    with archive.ArchiveWriter(path) as writer:
        for metadata, payload in records:
            writer.write(metadata, payload)
    return writer.report()


def count_inspections(monkeypatch):
    """Count archive.inspect_file calls (they still run)."""
    calls = []
    real = archive.inspect_file

    def counted(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(archive, "inspect_file", counted)
    return calls


class Blocking(callbacks.ArchiveCallback):
    """Waits until the test releases it."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_close(self, filename):
        self.entered.set()
        assert self.release.wait(10)
        return filename


class Stats:
    def __init__(self):
        self.done = []
        self.failed = []
        self.failing_now = []

    def callback_done(self, name, seconds):
        self.done.append(name)

    def callback_failed(self, name, permanent=False):
        self.failed.append((name, permanent) if permanent else name)

    def failing(self, by_kind, reasons=None):
        self.failing_now.append({kind: count for kind, (count, _)
                                 in by_kind.items()})


class TestSubmit:
    def test_chain_runs_in_the_background_thread(self, tmp_path,
                                                 make_shipper):
        path = write_archive(tmp_path / "a.events")
        memory = steps.MemoryCallback()
        threads = []

        class Where(callbacks.ArchiveCallback):
            def on_close(self, filename):
                threads.append(threading.current_thread().name)
                return filename

        ship = make_shipper([("where", Where()), ("memory", memory)])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]
        assert threads == ["shoebox-shipper"]
        assert read(path) == RECORDS

    def test_submit_releases_the_archive_lock(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        lock = files.FileLock(path, create=False)
        ship = make_shipper([("memory", steps.MemoryCallback())])
        ship.submit(path, lock)
        assert lock.fd is None
        assert ship.wait_idle(timeout=5)

    def test_failing_step_is_retried_and_nothing_runs_after_it_before(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        log = []
        stats = Stats()
        ship = make_shipper([("upload", Flaky("upload", log, 3)),
                             ("after", Recorder("after", log)),
                             ("delete", steps.DeleteFileCallback())],
                            stats=stats)
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert log == [("upload:fail", path, True)] * 3 + [
            ("upload", path, True), ("after", path, True)]
        assert not os.path.exists(path)
        assert not os.path.exists(path + shipper.STATE_SUFFIX)
        assert stats.failed == ["upload"] * 3
        assert stats.done == ["upload", "after", "delete"]

    def test_failures_logged_once_then_at_a_bounded_rate(
            self, tmp_path, make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        log = []
        ship = make_shipper([("upload", Flaky("upload", log, 30))],
                            retry_initial=0.001, retry_max=0.002,
                            start=False)
        with caplog.at_level(logging.DEBUG, logger="shoebox_worker"):
            ship.submit(path)
            ship.start()
            assert ship.wait_idle(timeout=10)
        lines = [r for r in caplog.records if r.levelno >= logging.INFO
                 and r.name == "shoebox_worker.ship.shipper"
                 and not r.getMessage().startswith("shipped ")]
        messages = [r.getMessage() for r in lines]
        # failing, capped (once: at most every CAPPED_LOG_INTERVAL per
        # archive), works again
        assert len(messages) == 3, messages
        assert messages[0] == (
            "callback upload failed on %s: OSError: upload refused "
            "(attempt 1; retrying in %s)"
            % (path, messages[0].rpartition("retrying in ")[2][:-1]))
        assert messages[1].startswith(
            "%s: step upload failed 2 times in " % path)
        assert messages[1].endswith(
            "; retrying every 0 s: callback upload failed on %s: OSError: "
            "upload refused" % path)
        assert lines[1].levelno == logging.WARNING
        assert messages[2].startswith("callback upload works again, after "
                                      "30 failed attempts in ")
        assert not any(r.exc_info for r in caplog.records)

    def test_each_archive_is_named_at_each_capped_retry(
            self, tmp_path, make_shipper, caplog, monkeypatch):
        monkeypatch.setattr(shipper, "CAPPED_LOG_INTERVAL", 0.0)
        paths = [write_archive(tmp_path / name)
                 for name in ("a.events", "b.events")]

        class Poisoned(callbacks.ArchiveCallback):
            """Fails for ever on a.events, works on b.events at the 5th."""

            def __init__(self):
                self.tries = {}

            def on_close(self, filename):
                tries = self.tries[filename] = self.tries.get(filename,
                                                              0) + 1
                if filename == paths[0] or tries < 5:
                    raise OverflowError("date value out of range")
                return filename

        step = Poisoned()
        stats = stats_mod.Stats()
        # capped from the third attempt on (0.001, 0.002, 0.004 > 0.003)
        ship = make_shipper([("upload", step)], retry_initial=0.001,
                            retry_max=0.003, stats=stats, start=False)
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            for path in paths:
                ship.submit(path)
            ship.start()
            deadline = time.monotonic() + 10
            while not (step.tries.get(paths[0], 0) >= 12
                       and paths[1] not in ship._jobs):
                assert time.monotonic() < deadline, step.tries
                time.sleep(0.01)
            failing = stats.failing_now["transient"]
            age = stats.failing_age()
        capped = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and ": step upload failed "
                  in r.getMessage()]
        mine = [m for m in capped if m.startswith(paths[0] + ":")]
        # one line per capped retry: attempts 2 (delay 0.002 < cap: none),
        # 3, 4, ... each naming the archive, the count and the reason
        assert len(mine) >= 9
        assert "failed 3 times in " in mine[0]
        assert all("retrying every 0 s: callback upload failed on %s: "
                   "OverflowError: date value out of range" % paths[0] in m
                   for m in mine)
        assert len([m for m in capped if m.startswith(paths[1] + ":")]) == 2
        # the other archive was not held back
        assert paths[1] not in ship._jobs
        assert failing[0] == 1 and 0 <= age < 30  # monotonic

    def test_still_failing_says_how_often_and_how_long(
            self, tmp_path, make_shipper, caplog):
        paths = [write_archive(tmp_path / name)
                 for name in ("a.events", "b.events")]
        log = []
        ship = make_shipper([("upload", Flaky("upload", log, 6))],
                            retry_initial=0.001, retry_max=0.002,
                            start=False)
        ship.failure_log_interval = 0.0
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            for path in paths:
                ship.submit(path)
            ship.start()
            assert ship.wait_idle(timeout=10)
        still = [r.getMessage() for r in caplog.records
                 if "still failing" in r.getMessage()]
        assert len(still) == 5
        assert still[-1].startswith(
            "callback upload still failing after 6 attempts, 0 s, on 2 "
            "archive(s); the last: callback upload failed on ")

    def test_permanent_failure_said_at_once_retried_at_retry_max(
            self, tmp_path, make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        times = []

        class Refused(callbacks.ArchiveCallback):
            def on_close(self, filename):
                times.append(time.monotonic())
                if len(times) < 3:
                    raise exceptions.PermanentError(
                        "key refused", hint="check [callback:up] key")
                return filename

        stats = Stats()
        ship = make_shipper([("up", Refused())], retry_initial=0.001,
                            retry_max=0.2, stats=stats, start=False)
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            ship.submit(path)
            ship.start()
            assert ship.wait_idle(timeout=10)  # the fix heals it
        assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.15
        errors = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.ERROR]
        assert errors == [
            "callback up failed on %s: key refused: will not heal by "
            "retrying: check [callback:up] key; retrying every 0 s" % path]
        assert stats.failed == [("up", True)] * 2
        assert stats.failing_now == [
            {"transient": 0, "permanent": 1}] * 2 + [
            {"transient": 0, "permanent": 0}]

    def test_stuck_once_every_archive_left_fails_for_good(
            self, tmp_path, make_shipper):
        # what --idle-exit waits for: nothing but archives that only an
        # operator can move on (their last failure a permanent one)
        first = write_archive(tmp_path / "a.events")
        second = write_archive(tmp_path / "b.events")
        refused = {first}

        class Step(callbacks.ArchiveCallback):
            def on_close(self, filename):
                if filename in refused:
                    raise exceptions.PermanentError("key refused",
                                                    hint="check key")
                raise RuntimeError("Swift is down")  # may pass

        stats = Stats()
        ship = make_shipper([("up", Step())], retry_initial=0.01,
                            retry_max=0.05, stats=stats, start=False)
        assert not ship.stuck()  # nothing left
        ship.submit(first)
        ship.submit(second)
        ship.start()
        assert not ship.wait_idle(timeout=0.5, should_stop=ship.stuck)
        assert not ship.stuck()  # b.events may still pass
        refused.add(second)
        assert not ship.wait_idle(timeout=10, should_stop=ship.stuck)
        assert ship.stuck()
        refused.clear()  # fixed: they go on, and it is not stuck any more

        class Works(callbacks.ArchiveCallback):
            def on_close(self, filename):
                return filename
        ship.chain.steps[0] = ("up", Works())
        assert ship.wait_idle(timeout=10)
        assert not ship.stuck()

    def test_backoff_grows_and_is_capped(self):
        ship = shipper.Shipper(callbacks.CallbackChain([]), 1.0, 5.0)
        for attempts, (low, high) in {1: (0.75, 1), 2: (1.5, 2),
                                      3: (3, 4), 4: (3.75, 5),
                                      20: (3.75, 5)}.items():
            for _ in range(20):
                assert low <= ship._delay(attempts) <= high

    def test_jitter_spreads_each_delay_over_three_quarters_to_all(
            self, monkeypatch):
        # workers that failed together must not retry together: each delay
        # is spread over [0.75, 1] of its base, the whole range used
        monkeypatch.setattr(shipper, "random", random.Random(9))
        ship = shipper.Shipper(callbacks.CallbackChain([]), 2.0, 8.0)
        for attempts, permanent, base in ((1, False, 2.0), (2, False, 4.0),
                                          (9, False, 8.0), (1, True, 8.0)):
            delays = [ship._delay(attempts, permanent) / base
                      for _ in range(2000)]
            assert 0.75 <= min(delays) < 0.76, (attempts, permanent)
            assert 0.99 < max(delays) <= 1.0, (attempts, permanent)
            # spread over the range, not two values
            assert len({int(d * 40) for d in delays}) == 10

    def test_retry_waits_its_delay(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        times = []

        class Timed(callbacks.ArchiveCallback):
            def on_close(self, filename):
                times.append(time.monotonic())
                if len(times) < 3:
                    raise OSError("no")
                return filename

        ship = make_shipper([("timed", Timed())], retry_initial=0.1,
                            retry_max=0.2)
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert times[1] - times[0] >= 0.075
        assert times[2] - times[1] >= 0.15

    def test_state_file_while_pending_gone_after_when_moved(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        block = Blocking()
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("block", block),
                             ("delete", steps.DeleteFileCallback())])
        ship.submit(path)
        assert block.entered.wait(5)
        state = state_of(path)
        assert state == {"path": path + ".gz", "step": 1,
                         "chain": ["gzip", "block", "delete"]}
        assert ship.pending() == 1
        block.release.set()
        assert ship.wait_idle(timeout=5)
        assert os.listdir(tmp_path) == []

    def test_state_written_before_submit_returns(self, tmp_path,
                                                 make_shipper):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        ship.submit(path)
        # where the first step leaves it is known before it runs
        assert state_of(path) == {"path": path, "step": 0, "output": path,
                                  "chain": ["memory"]}

    @pytest.mark.parametrize("chain", [[], ["memory"]])
    def test_done_listed_when_the_file_stays_in_place(self, tmp_path,
                                                      make_shipper, chain):
        path = write_archive(tmp_path / "a.events")
        other = write_archive(tmp_path / "b.events")
        ship = make_shipper([(name, steps.MemoryCallback())
                             for name in chain])
        ship.submit(path)
        ship.submit(other)
        assert ship.wait_idle(timeout=5)
        # no state file stays beside them: one list for the folder
        assert sorted(os.listdir(tmp_path)) == [
            shipper.DONE_FILE, "a.events", "b.events"]
        # a new start neither resumes them nor takes them for crashed ones
        memory = steps.MemoryCallback()
        again = make_shipper([("memory", memory)])
        assert again.recover(str(tmp_path), is_archive) == 0
        assert again.pending() == 0 and memory.events == []

    def test_done_list_forgets_archives_gone(self, tmp_path, make_shipper):
        paths = [write_archive(tmp_path / name)
                 for name in ("a.events", "b.events")]
        ship = make_shipper([])
        for path in paths:
            ship.submit(path)
        assert ship.wait_idle(timeout=5)
        os.unlink(paths[0])  # taken away by the operator
        make_shipper([]).recover(str(tmp_path), is_archive)
        with open(tmp_path / shipper.DONE_FILE) as f:
            assert sorted(json.load(f)) == ["b.events"]

    def test_a_new_file_under_a_listed_name_is_shipped(self, tmp_path,
                                                       make_shipper):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        os.unlink(path)
        write_archive(path, RECORDS[:2])  # not the archive listed
        memory = steps.MemoryCallback()
        again = make_shipper([("memory", memory)])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert memory.events == [("close", path)]

    def test_crash_after_listing_before_the_state_went(self, tmp_path,
                                                       make_shipper,
                                                       monkeypatch):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        ship.submit(path)
        saved = state_of(path)

        def crash(state_path, lock):
            raise SystemExit("killed")  # the process dies here

        monkeypatch.setattr(shipper.Shipper, "_drop_state",
                            staticmethod(crash))
        job = ship._jobs[path]
        with pytest.raises(SystemExit):
            ship._finish(job)
        job.lock.release()
        monkeypatch.undo()
        assert state_of(path) == saved  # the state file stayed
        memory = steps.MemoryCallback()
        again = make_shipper([("memory", memory)])
        assert again.recover(str(tmp_path), is_archive) == 0
        assert again.pending() == 0 and memory.events == []
        assert sorted(os.listdir(tmp_path)) == [shipper.DONE_FILE,
                                                "a.events"]

    def test_done_state_of_an_older_version_moves_to_the_list(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"done": True, "path": path}, f)
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory)])
        assert ship.recover(str(tmp_path), is_archive) == 0
        assert sorted(os.listdir(tmp_path)) == [shipper.DONE_FILE,
                                                "a.events"]
        assert make_shipper([]).recover(str(tmp_path), is_archive) == 0
        assert memory.events == []

    def test_renamed_in_place_is_not_done_marked(self, tmp_path,
                                                 make_shipper):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("ext", steps.ChangeExtensionCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert sorted(os.listdir(tmp_path)) == ["a.events.done"]

    def test_other_archives_keep_moving_while_one_fails(self, tmp_path,
                                                        make_shipper):
        bad = write_archive(tmp_path / "bad.events")
        good = write_archive(tmp_path / "good.events")

        class FailsOnBad(callbacks.ArchiveCallback):
            def __init__(self):
                self.seen = []

            def on_close(self, filename):
                self.seen.append(filename)
                if filename == bad:
                    raise OSError("no")
                return filename

        step = FailsOnBad()
        # bad waits a minute for its retry: longer than this test
        ship = make_shipper([("step", step)], retry_initial=60,
                            retry_max=60)
        ship.submit(bad)
        ship.submit(good)
        # good is through (its job dropped) while bad waits: wait for that
        # state itself, told by the shipper's condition
        with ship._cond:
            assert ship._cond.wait_for(
                lambda: list(ship._jobs) == [bad] and ship._busy is None,
                timeout=30), (list(ship._jobs), step.seen)
        assert step.seen == [bad, good]
        assert ship.pending() == 1


class TestSettle:
    """settle() (on SIGTERM) waits for a running or due step, never for an
    archive waiting out its retry delay."""

    @staticmethod
    def waiting_for_retry(ship):
        """Wait until the shipper is idle with its one job in the heap,
        due later (a positive state, not a sleep)."""
        with ship._cond:
            assert ship._cond.wait_for(
                lambda: ship._busy is None and len(ship._heap) == 1 and
                ship._heap[0][0] > time.monotonic() + 30, timeout=10)

    def test_does_not_wait_out_a_retry_delay(self, tmp_path, make_shipper):
        failing = steps.MemoryCallback(fail_times=1000)
        ship = make_shipper([("memory", failing)], retry_initial=60,
                            retry_max=60)
        ship.submit(write_archive(tmp_path / "a.events"))
        self.waiting_for_retry(ship)
        assert ship.settle(0) is True  # nothing running or due
        assert failing.events == [("fail", str(tmp_path / "a.events"))]
        assert ship.pending() == 1

    def test_waits_for_a_running_step(self, tmp_path, make_shipper):
        block = Blocking()
        ship = make_shipper([("block", block)])
        ship.submit(write_archive(tmp_path / "a.events"))
        assert block.entered.wait(5)
        assert ship.settle(0) is False  # a step runs
        block.release.set()
        assert ship.settle(10) is True
        assert ship.wait_idle(timeout=5)

    def test_waits_for_a_due_archive(self, tmp_path, make_shipper):
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        ship.submit(write_archive(tmp_path / "a.events"))
        assert ship.settle(0) is False  # due now, not started yet


class TestBacklog:
    def test_numbers(self, tmp_path, make_shipper):
        block = Blocking()
        ship = make_shipper([("block", block)])
        assert ship.backlog == (0, 0, 0.0)
        one = write_archive(tmp_path / "one.events")
        two = write_archive(tmp_path / "two.events", RECORDS * 3)
        ship.submit(one)
        ship.submit(two)
        assert block.entered.wait(5)
        files, size, age = ship.backlog
        assert files == 2 == ship.pending()
        assert size == os.path.getsize(one) + os.path.getsize(two)
        assert 0 <= age < 5
        time.sleep(0.05)
        assert ship.backlog[2] >= 0.05
        block.release.set()
        assert ship.wait_idle(timeout=5)
        assert ship.backlog == (0, 0, 0.0)

    def test_size_follows_the_current_file(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events", RECORDS * 50)
        block = Blocking()
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("block", block)])
        ship.submit(path)
        assert block.entered.wait(5)
        assert ship.backlog[1] == os.path.getsize(path + ".gz")
        block.release.set()
        assert ship.wait_idle(timeout=5)

    def test_wait_idle_times_out_and_stops(self, tmp_path, make_shipper):
        block = Blocking()
        ship = make_shipper([("block", block)])
        ship.submit(write_archive(tmp_path / "a.events"))
        assert ship.wait_idle(timeout=0.05) is False
        assert ship.wait_idle(should_stop=lambda: True) is False
        block.release.set()
        assert ship.wait_idle(timeout=5)


class TestReport:
    def test_the_writers_report_reaches_the_steps_that_take_it(
            self, tmp_path, make_shipper, monkeypatch):
        path = str(tmp_path / "a.events")
        report = writer_report(path)
        inspected = count_inspections(monkeypatch)
        seen, log = [], []
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("plain", Recorder("plain", log)),
                             ("swift", Reports(seen))])
        ship.submit(path, report=report)
        assert ship.wait_idle(timeout=5)
        assert seen == [(path + ".gz", report)]
        assert log == [("plain", path + ".gz", True)]
        assert inspected == []  # the file was not read for it

    def test_kept_in_the_state_file_and_resumed_with(self, tmp_path,
                                                     make_shipper,
                                                     monkeypatch):
        path = str(tmp_path / "a.events")
        report = writer_report(path)
        block = Blocking()
        first = make_shipper([("block", block), ("swift", Reports([]))])
        first.submit(path, report=report)
        assert block.entered.wait(5)
        saved = state_of(path)["report"]
        assert saved["records"] == len(RECORDS)
        assert saved["versions"] == [record.CURRENT_VERSION]
        assert saved["first_metadata"] == RECORDS[0][0]
        assert saved["last_metadata"] == RECORDS[-1][0]
        assert (saved["earliest"], saved["latest"]) == (
            report.earliest, report.latest)
        # "kill -9" during the first step
        first._stopping = True
        with first._cond:
            first._jobs[path].lock.release()
        inspected = count_inspections(monkeypatch)
        seen = []
        again = make_shipper([("block", Recorder("block", [])),
                              ("swift", Reports(seen))])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert seen == [(path, report)]
        assert inspected == []
        block.release.set()

    def test_recovered_archive_is_read_once(self, tmp_path, make_shipper,
                                            monkeypatch):
        path = write_archive(tmp_path / "a.events")
        inspected = count_inspections(monkeypatch)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert inspected == [path]
        ((filename, report),) = seen
        assert filename == path
        assert (report.records, report.skipped) == (len(RECORDS), [])
        assert report.first_metadata == RECORDS[0][0]
        assert report.last_metadata == RECORDS[-1][0]
        assert report.versions == {record.CURRENT_VERSION}

    def test_recovered_torn_archive_reports_what_is_left(self, tmp_path,
                                                         make_shipper):
        path = write_archive(tmp_path / "a.events")
        whole = os.path.getsize(path)
        torn = record.pack({"n": "torn"}, b'{"never": "acked"}')
        with open(path, "ab") as f:
            f.write(torn[:len(torn) // 2])
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        ((_, report),) = seen
        assert os.path.getsize(path) == whole
        assert (report.records, report.size) == (len(RECORDS), whole)
        assert (report.skipped, report.torn_offset) == ([], None)
        assert report.last_metadata == RECORDS[-1][0]

    def test_state_without_report_is_read_once_before_the_step(
            self, tmp_path, make_shipper, monkeypatch):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0,
                       "chain": ["plain", "swift"]}, f)
        inspected = count_inspections(monkeypatch)
        seen = []
        block = Blocking()
        ship = make_shipper([("plain", block), ("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert block.entered.wait(5)
        assert inspected == []  # not for a step that does not take it
        assert "report" not in state_of(path)
        block.release.set()
        assert ship.wait_idle(timeout=5)
        assert inspected == [path]
        ((_, report),) = seen
        assert report.records == len(RECORDS)

    def test_report_read_for_a_step_is_saved(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        block = Blocking()
        ship = make_shipper([("swift", Reports([])), ("block", block)])
        ship.submit(path)  # no report: read before the swift step
        assert block.entered.wait(5)
        assert state_of(path)["report"]["records"] == len(RECORDS)
        block.release.set()
        assert ship.wait_idle(timeout=5)

    def test_unparsable_saved_report_is_read_again(self, tmp_path,
                                                   make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "chain": ["swift"],
                       "report": {"records": "many"}}, f)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        ((_, report),) = seen
        assert report.records == len(RECORDS)

    def test_a_saved_report_of_an_older_version_still_reads(
            self, tmp_path, make_shipper, monkeypatch):
        # written before reports had a time range: no earliest/latest
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "chain": ["swift"],
                       "report": {"records": 5, "size": 10, "versions": [2],
                                  "skipped": [], "torn_offset": None,
                                  "first_metadata": RECORDS[0][0],
                                  "last_metadata": RECORDS[-1][0]}}, f)
        inspected = count_inspections(monkeypatch)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        ((_, report),) = seen
        assert inspected == []
        assert (report.records, report.size) == (5, 10)
        assert (report.earliest, report.latest) == (None, None)

    @pytest.mark.parametrize("earliest", [7, ["x"], {"a": 1}])
    def test_a_saved_time_range_of_the_wrong_type_is_read_again(
            self, tmp_path, make_shipper, earliest):
        path = write_archive(tmp_path / "a.events")
        (tmp_path / "elsewhere").mkdir()
        report = writer_report(str(tmp_path / "elsewhere" / "b.events"))
        saved = shipper._report_to_state(report)
        saved["earliest"] = earliest
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "chain": ["swift"],
                       "report": saved}, f)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        ((_, got),) = seen
        assert got.earliest == "2024-03-09T10:00:00.000000Z"

    def test_unreadable_archive_gives_the_step_none(self, tmp_path,
                                                    make_shipper,
                                                    monkeypatch):
        path = write_archive(tmp_path / "a.events")

        def fail(path):
            raise OSError("unreadable")

        monkeypatch.setattr(archive, "inspect_file", fail)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert seen == [(path, None)]


class TestRecover:
    def test_resume_at_the_saved_step(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(path)
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path + ".gz", "step": 1,
                       "chain": ["gzip", "memory"]}, f)
        log = []
        memory = steps.MemoryCallback()
        ship = make_shipper([("gzip", Recorder("gzip", log)),
                             ("memory", memory)], start=False)
        assert ship.recover(str(tmp_path), is_archive) == 1
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert log == []  # step 0 is not run again
        assert memory.events == [("close", path + ".gz")]
        assert not os.path.exists(path + shipper.STATE_SUFFIX)

    def test_resume_after_a_crash_mid_chain(self, tmp_path, make_shipper):
        """A first run dies during step 1; the next one resumes there."""
        path = write_archive(tmp_path / "a.events")
        block = Blocking()
        first = make_shipper([("gzip", steps.GzipCallback()),
                              ("block", block)])
        first.submit(path)
        assert block.entered.wait(5)
        # "kill -9": the process and its locks are gone
        first._stopping = True
        with first._cond:
            first._jobs[path].lock.release()
        log = []
        again = make_shipper([("gzip", Recorder("gzip", log)),
                              ("block", Recorder("block", log))])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert log == [("block", path + ".gz", True)]
        block.release.set()

    def test_torn_tail_is_cut_and_the_archive_shipped(self, tmp_path,
                                                      make_shipper):
        path = write_archive(tmp_path / "a.events")
        whole = os.path.getsize(path)
        torn = record.pack({"n": "torn"}, b'{"never": "acked"}')
        with open(path, "ab") as f:
            f.write(torn[:len(torn) // 2])
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory)], start=False)
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert os.path.getsize(path) == whole
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]
        assert read(path) == RECORDS

    def test_torn_tail_is_reported_once(self, tmp_path, make_shipper,
                                        caplog):
        path = write_archive(tmp_path / "a.events")
        torn = record.pack({"n": "torn"}, b'{"never": "acked"}')
        with open(path, "ab") as f:
            f.write(torn[:len(torn) // 2])
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        with caplog.at_level(logging.INFO):
            assert ship.recover(str(tmp_path), is_archive) == 1
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "cut a torn tail of %d bytes" % (len(torn) // 2) in \
            warnings[0]

    def test_damage_before_a_torn_tail_is_reported_too(self, tmp_path,
                                                        make_shipper,
                                                        caplog):
        path = write_archive(tmp_path / "a.events")
        with open(path, "r+b") as f:
            f.seek(0)
            f.write(b"XXXX")  # the first record's marker
        with open(path, "ab") as f:
            f.write(b"\x00garbage")
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        with caplog.at_level(logging.INFO):
            assert ship.recover(str(tmp_path), is_archive) == 1
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, warnings
        assert "skipped bytes 0-" in warnings[0]
        assert "cut a torn tail" in warnings[1]

    def test_garbage_tail_is_cut(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        whole = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(b"\x00garbage\xff" * 10)
        ship = make_shipper([("memory", steps.MemoryCallback())])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert os.path.getsize(path) == whole
        assert read(path) == RECORDS

    def test_locked_archive_is_not_taken(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        lock = files.FileLock(path, create=False)  # a live writer
        try:
            memory = steps.MemoryCallback()
            ship = make_shipper([("memory", memory)])
            assert ship.recover(str(tmp_path), is_archive) == 0
            assert ship.pending() == 0
            assert not os.path.exists(path + shipper.STATE_SUFFIX)
        finally:
            lock.release()
        assert memory.events == []

    def test_locked_state_file_is_not_resumed(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        busy = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        busy.submit(path)  # holds the state file's lock, never ships
        memory = steps.MemoryCallback()
        other = make_shipper([("memory", memory)])
        assert other.recover(str(tmp_path), is_archive) == 0
        assert memory.events == []

    def test_state_saved_after_a_step_stays_locked(self, tmp_path,
                                                   make_shipper):
        # the state file is replaced after every step: the new one must be
        # locked too, or another worker would ship the same archive
        path = write_archive(tmp_path / "a.events")
        block = Blocking()
        busy = make_shipper([("gzip", steps.GzipCallback()),
                             ("block", block)])
        busy.submit(path)
        assert block.entered.wait(5)
        assert state_of(path)["step"] == 1
        log = []
        other = make_shipper([("gzip", Recorder("gzip", log)),
                              ("block", Recorder("block", log))])
        assert other.recover(str(tmp_path), is_archive) == 0
        assert other.pending() == 0
        block.release.set()
        assert busy.wait_idle(timeout=5)
        assert log == []

    def test_temporary_state_of_a_live_worker_is_kept(self, tmp_path,
                                                      make_shipper):
        tmp = tmp_path / ("a.events" + shipper.STATE_SUFFIX + ".tmp")
        lock = files.FileLock(str(tmp))  # being written right now
        try:
            ship = make_shipper([("m", steps.MemoryCallback())])
            ship.recover(str(tmp_path), is_archive)
            assert tmp.exists()
        finally:
            lock.release()

    def test_empty_archive_removed(self, tmp_path, make_shipper):
        # a dead worker's, just created: a live one would hold its lock
        (tmp_path / "empty.events").write_bytes(b"")
        (tmp_path / "other.txt").write_bytes(b"")
        ship = make_shipper([("memory", steps.MemoryCallback())])
        assert ship.recover(str(tmp_path), is_archive) == 0
        assert sorted(os.listdir(tmp_path)) == ["other.txt"]

    def test_empty_archive_of_a_live_writer_is_left(self, tmp_path,
                                                    make_shipper):
        path = tmp_path / "new.events"
        path.write_bytes(b"")
        lock = files.FileLock(str(path), create=False)  # its writer's
        try:
            ship = make_shipper([("memory", steps.MemoryCallback())])
            assert ship.recover(str(tmp_path), is_archive) == 0
            assert path.exists()
        finally:
            lock.release()

    def test_stop_leaves_pending_state_for_the_next_start(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        failing = steps.MemoryCallback(fail_times=1000)
        first = make_shipper([("memory", failing)], retry_initial=60,
                             retry_max=60)
        first.submit(path)
        deadline = time.monotonic() + 5
        while not failing.events and time.monotonic() < deadline:
            time.sleep(0.01)
        first.stop(5)
        assert not first._thread.is_alive()
        assert state_of(path) == {"path": path, "step": 0, "output": path,
                                  "chain": ["memory"]}
        with first._cond:  # the process exits
            first._jobs[path].lock.release()
        memory = steps.MemoryCallback()
        again = make_shipper([("memory", memory)])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert memory.events == [("close", path)]

    def test_chain_change_restarts_at_step_zero(self, tmp_path,
                                                make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 1,
                       "chain": ["zstd", "swift"]}, f)
        log = []
        ship = make_shipper([("first", Recorder("first", log)),
                             ("second", Recorder("second", log))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert log == [("first", path, True), ("second", path, True)]

    def test_state_pointing_at_a_missing_file_restarts_from_origin(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path + ".gz", "step": 1,
                       "chain": ["first", "second"]}, f)
        log = []
        ship = make_shipper([("first", Recorder("first", log)),
                             ("second", Recorder("second", log))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert log == [("first", path, True), ("second", path, True)]

    def test_state_of_a_vanished_file_is_dropped(self, tmp_path,
                                                 make_shipper):
        state = tmp_path / ("gone.events" + shipper.STATE_SUFFIX)
        state.write_text(json.dumps({"path": str(tmp_path / "gone.x"),
                                     "step": 0, "chain": ["m"]}))
        ship = make_shipper([("m", steps.MemoryCallback())])
        assert ship.recover(str(tmp_path), is_archive) == 0
        assert os.listdir(tmp_path) == []

    def test_corrupt_state_ships_from_the_start(self, tmp_path,
                                                make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            f.write('{"path": ')  # not possible with the atomic write
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory)])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]

    def test_leftover_temporary_state_removed(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        tmp = tmp_path / ("a.events" + shipper.STATE_SUFFIX + ".tmp")
        tmp.write_text("{")
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory)])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert not tmp.exists()
        assert memory.events == [("close", path)]

    def test_missing_directory(self, tmp_path, make_shipper):
        ship = make_shipper([], start=False)
        assert ship.recover(str(tmp_path / "nope"), is_archive) == 0


class TestPromisesFromTheMutationCheck:
    """What the survivors of ``scripts/mutation shipper`` showed untested
    (docs/mutation.md)."""

    def test_state_of_an_older_version_saying_done_of_a_gone_archive(
            self, tmp_path, make_shipper):
        state = tmp_path / ("gone.events" + shipper.STATE_SUFFIX)
        state.write_text(json.dumps({"done": True}))
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        assert ship.recover(str(tmp_path), is_archive) == 0
        assert os.listdir(tmp_path) == []

    def test_chain_change_does_not_follow_the_old_chains_output(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        old_output = tmp_path / "a.events.old"
        old_output.write_bytes(b"what the old chain's step left")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": str(tmp_path / "a.events.gone"), "step": 0,
                       "output": str(old_output), "chain": ["old"]}, f)
        log = []
        ship = make_shipper([("first", Recorder("first", log)),
                             ("second", Recorder("second", log))])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert log == [("first", path, True), ("second", path, True)]

    def test_refused_path_restarts_the_chain_on_the_origin(
            self, tmp_path, make_shipper, caplog):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        victim = outside / "precious"
        victim.write_bytes(b"not yours")
        path = write_archive(work / "a.events")
        state_path = path + shipper.STATE_SUFFIX
        with open(state_path, "w") as f:
            json.dump({"path": str(victim), "step": 1,
                       "chain": ["first", "second"]}, f)
        log = []
        ship = make_shipper([("first", Recorder("first", log)),
                             ("second", Recorder("second", log))])
        with caplog.at_level(logging.ERROR):
            assert ship.recover(str(work), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert log == [("first", path, True), ("second", path, True)]
        assert victim.read_bytes() == b"not yours"
        refused = [r.getMessage() for r in caplog.records
                   if "refused" in r.getMessage()]
        assert refused == [shipper.E_REFUSED % (state_path, victim, work)]

    def test_refused_state_without_its_archive_is_not_counted(
            self, tmp_path, make_shipper):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        (outside / "precious").write_bytes(b"not yours")
        planted = work / ("x.events" + shipper.STATE_SUFFIX)
        planted.write_text(json.dumps({"path": str(outside / "precious"),
                                       "step": 0, "chain": ["m"]}))
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        assert ship.recover(str(work), is_archive) == 0
        assert ship.pending() == 0
        assert planted.exists()

    def test_symlink_inside_the_folder_is_refused_as_a_path(
            self, tmp_path, make_shipper):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        victim = write_archive(outside / "precious.events")
        link = work / "link"
        os.symlink(victim, link)
        (work / ("x.events" + shipper.STATE_SUFFIX)).write_text(json.dumps(
            {"path": str(link), "step": 0, "chain": ["m"]}))
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        assert ship.recover(str(work), is_archive) == 0
        assert ship.wait_idle(timeout=5)
        assert memory.events == []
        assert os.path.islink(link)

    def test_a_state_file_gone_before_its_lock_is_not_made_again(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        # listed by recover, then finished and dropped by another worker
        assert ship._resume(path + shipper.STATE_SUFFIX) == 0
        assert ship.pending() == 0
        assert os.listdir(tmp_path) == ["a.events"]

    def test_obstacles_do_not_stop_the_recovery_of_the_rest(
            self, tmp_path, make_shipper):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        (outside / "x").write_bytes(b"not yours")
        os.symlink(outside / "x", work / ("a.events" + shipper.STATE_SUFFIX))
        resumed = [write_archive(work / name)
                   for name in ("b.events", "y.events")]
        for path in resumed:
            with open(path + shipper.STATE_SUFFIX, "w") as f:
                json.dump({"path": path, "step": 0, "chain": ["m"]}, f)
        live = files.FileLock(write_archive(work / "c.events"),
                              create=False)
        (work / "d.events").write_bytes(b"")
        tmp = work / ("e.events" + shipper.STATE_SUFFIX + ".tmp")
        tmp.write_text("{")
        os.symlink(outside / "x", work / "s.events")
        left = write_archive(work / "z.events")
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        try:
            assert ship.recover(str(work), is_archive) == 3
            assert ship.wait_idle(timeout=5)
        finally:
            live.release()
        assert sorted(memory.events) == [("close", p)
                                         for p in resumed + [left]]
        assert not tmp.exists()

    @staticmethod
    def fail_at(ship, job, monkeypatch, now):
        monkeypatch.setattr(shipper.time, "monotonic", lambda: now)
        ship._failed(job, "upload", exceptions.CallbackError(
            "refused", callback="upload", filename=job.origin))

    def test_still_failing_logged_once_per_interval(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("upload", steps.MemoryCallback())],
                            start=False)
        ship.failure_log_interval = 10.0
        job = shipper._Job(path, path, 0, files.FileLock(
            path + shipper.STATE_SUFFIX))

        def still():
            return sum(1 for r in caplog.records
                       if r.getMessage().startswith("callback upload still")
                       and r.levelno == logging.ERROR)
        with caplog.at_level(logging.DEBUG, logger="shoebox_worker"):
            self.fail_at(ship, job, monkeypatch, 100.0)
            self.fail_at(ship, job, monkeypatch, 105.0)
            assert still() == 0
            self.fail_at(ship, job, monkeypatch, 110.0)  # the interval
            assert still() == 1
            self.fail_at(ship, job, monkeypatch, 111.0)
            self.fail_at(ship, job, monkeypatch, 119.0)
            assert still() == 1
            self.fail_at(ship, job, monkeypatch, 120.0)
            assert still() == 2
        job.lock.release()

    def test_capped_said_once_the_backoff_reaches_retry_max(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("upload", steps.MemoryCallback())],
                            retry_initial=1.0, retry_max=300.0, start=False)
        job = shipper._Job(path, path, 0, files.FileLock(
            path + shipper.STATE_SUFFIX))
        capped = []
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            for attempt in range(1, 12):
                before = len(caplog.records)
                self.fail_at(ship, job, monkeypatch, attempt * 1000.0)
                if any(r.levelno == logging.WARNING
                       for r in caplog.records[before:]):
                    capped.append(attempt)
        # 2 ** 8 = 256 < 300 <= 2 ** 9: the 10th delay is the first capped
        assert capped == [10, 11]
        job.lock.release()

    def test_a_saved_report_is_the_report_resumed_with(self, tmp_path):
        origin = str(tmp_path / "a.events")
        report = archive.ArchiveReport(
            origin, records=3, size=900, versions={1, 2},
            skipped=[archive.Skipped(origin, 10, 40, "no record marker"),
                     archive.Skipped(origin, 850, 900, "torn")],
            torn_offset=850, first_metadata={"n": "0"},
            last_metadata={"n": "2"})
        saved = json.loads(json.dumps(shipper._report_to_state(report)))
        assert shipper._report_from_state(origin, saved) == report

    def test_recover_hands_each_record_read_to_on_record(
            self, tmp_path, make_shipper):
        write_archive(tmp_path / "a.events")
        found = []
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        assert ship.recover(str(tmp_path), is_archive,
                            on_record=found.append) == 1
        assert [(f[3], bytes(f[4])) for f in found] == RECORDS
        assert [f[0] for f in found] == [0] + list(itertools.accumulate(
            len(record.pack(*r)) for r in RECORDS[:-1]))

    def test_before_submit_runs_before_any_state_file_is_written(
            self, tmp_path, make_shipper):
        # the worker saves its stream offsets then: an archive with a
        # state file is not read again at the next start
        paths = [write_archive(tmp_path / name)
                 for name in ("a.events", "b.events")]
        seen = []
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        assert ship.recover(str(tmp_path), is_archive, before_submit=lambda:
                            seen.append([os.path.exists(p + ".ship")
                                         for p in paths])) == 2
        assert seen == [[False, False]]
        assert all(os.path.exists(p + ".ship") for p in paths)
        missing = []
        assert ship.recover(str(tmp_path / "none"), is_archive,
                            before_submit=lambda: missing.append(1)) == 0
        assert missing == [1]  # once, even with no directory

    def test_on_damage_is_told_of_damage_before_valid_records_only(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path, "r+b") as f:
            f.write(b"XXXX")  # the first record's marker
        with open(path, "ab") as f:
            f.write(b"\x00garbage")  # a torn tail: not told
        told = []
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        ship.recover(str(tmp_path), is_archive,
                     on_damage=lambda p, s: told.append((p, s.start)))
        assert told == [(path, 0)]

    def test_damage_before_a_torn_tail_said_exactly_and_kept(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")
        with open(path, "r+b") as f:
            f.write(b"XXXX")  # the first record's marker
        whole = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(b"\x00garbage")
        copy = str(tmp_path / "copy")
        shutil.copyfile(path, copy)
        damage, tail = archive.inspect_file(copy, quiet=True).skipped
        os.unlink(copy)
        inspected = count_inspections(monkeypatch)
        seen = []
        ship = make_shipper([("swift", Reports(seen))], start=False)
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        assert inspected == [path]  # read once, for the cut too
        assert [r.getMessage() for r in caplog.records] == [
            "%s: skipped bytes %d-%d: %s" % (path, damage.start, damage.end,
                                             damage.reason),
            "%s: cut a torn tail of 8 bytes at offset %d (%s: a record "
            "being written when the last run died; it was never acked)"
            % (path, whole, tail.reason)]
        ship.start()
        assert ship.wait_idle(timeout=5)
        ((_, report),) = seen
        assert report.skipped == [archive.Skipped(path, damage.start,
                                                  damage.end, damage.reason)]
        assert (report.size, report.torn_offset) == (whole, None)
        assert report.records == len(RECORDS) - 1

    def test_an_archive_listed_as_done_does_not_stop_the_rest(
            self, tmp_path, make_shipper):
        done = write_archive(tmp_path / "a.events")
        ship = make_shipper([])
        ship.submit(done)
        assert ship.wait_idle(timeout=5)
        left = write_archive(tmp_path / "b.events")  # a killed run's
        memory = steps.MemoryCallback()
        again = make_shipper([("m", memory)])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert memory.events == [("close", left)]

    def test_a_recovered_archive_is_unlocked_once_handed_over(
            self, tmp_path, make_shipper):
        # its lock, taken by recover, goes with submit (not left open
        # for the life of the process: one descriptor per archive)
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        assert ship.recover(str(tmp_path), is_archive) == 1
        other = files.FileLock.try_acquire(path, create=False)
        assert other is not None
        other.release()

    def test_an_archive_unreadable_at_recovery_is_shipped_as_it_is(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")

        def fail(path, **kwargs):
            raise OSError("unreadable")

        monkeypatch.setattr(archive, "inspect_file", fail)
        seen = []
        ship = make_shipper([("swift", Reports(seen))])
        with caplog.at_level(logging.ERROR, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        assert [r.getMessage() for r in caplog.records] == [
            "%s: cannot read it for its report (unreadable); shipping it "
            "as it is" % path]
        assert ship.wait_idle(timeout=5)
        assert seen == [(path, None)]

    def test_an_unexpected_error_is_retried_after_its_backoff(
            self, tmp_path, monkeypatch):
        # _run's retry of an error that is no CallbackError (attempts
        # counted there first)
        path = str(tmp_path / "a.events")
        ship = shipper.Shipper(callbacks.CallbackChain([]), 1.0, 300.0)
        job = shipper._Job(path, path, 0, None)
        monkeypatch.setattr(shipper.time, "monotonic", lambda: 1000.0)
        for attempts, base in ((1, 1.0), (3, 4.0)):
            job.attempts = attempts
            ship._retry(job)
            ((due, _, queued),) = ship._heap
            assert queued is job
            assert 1000.0 + 0.75 * base <= due <= 1000.0 + base
            ship._heap.clear()

    def test_an_unexpected_error_does_not_end_the_thread(
            self, tmp_path, make_shipper, caplog):
        class Breaks(Stats):
            def callback_done(self, name, seconds):
                if len(self.done) < 2:
                    self.done.append("broke")
                    raise RuntimeError("stats broke")
                super().callback_done(name, seconds)

        path = write_archive(tmp_path / "a.events")
        memory = steps.MemoryCallback()
        stats = Breaks()
        ship = make_shipper([("m", memory)], stats=stats)
        with caplog.at_level(logging.DEBUG, logger="shoebox_worker"):
            ship.submit(path)
            assert ship.wait_idle(timeout=5)
        assert ship._thread.is_alive()
        assert memory.events == [("close", path)] * 3  # run again
        assert stats.done == ["broke", "broke", "m"]
        lines = [r for r in caplog.records
                 if r.getMessage().startswith("unexpected")]
        # a traceback once, then a line at DEBUG per retry
        assert [(r.levelno, r.getMessage(), bool(r.exc_info))
                for r in lines] == [
            (logging.ERROR, "unexpected error shipping %s" % path, True),
            (logging.DEBUG, "unexpected error shipping %s again (attempt "
             "2): stats broke" % path, False)]

    def test_a_state_file_the_disk_refuses_is_one_line_and_retried(
            self, tmp_path, make_shipper, caplog, monkeypatch):
        path = write_archive(tmp_path / "a.events")
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        real, refused = shipper.files.write_json_atomic, []

        def full(target, data):
            if len(refused) < 2:
                refused.append(target)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(target, data)
        monkeypatch.setattr(shipper.files, "write_json_atomic", full)
        with caplog.at_level(logging.DEBUG, logger="shoebox_worker"):
            ship.submit(path)
            assert ship.wait_idle(timeout=5)
        # at submit, then in the shipping thread, before the first step
        assert refused == [path + shipper.STATE_SUFFIX] * 2
        assert memory.events == [("close", path)]  # run once, when saved
        lines = [(r.levelno, r.getMessage(), bool(r.exc_info))
                 for r in caplog.records
                 if r.getMessage().startswith(("cannot ship", "unexpected"))]
        assert lines == [
            (logging.ERROR, "cannot ship %s: the local disk refused its "
             "state ([Errno 28] No space left on device); retrying in 0.0 s, "
             "then with backoff" % path, False),
            (logging.DEBUG, "cannot ship %s (attempt 2): [Errno 28] No space "
             "left on device" % path, False)]
        assert not os.path.exists(path + shipper.STATE_SUFFIX)

    def test_the_archive_stays_locked_until_a_state_file_holds_it(
            self, tmp_path, make_shipper, monkeypatch):
        # a sibling sharing the folder must not take it for a dead
        # worker's archive meanwhile
        path = write_archive(tmp_path / "a.events")
        lock = files.FileLock(path)
        gate = threading.Event()
        real, refused = shipper.files.write_json_atomic, []

        def full(target, data):
            if not gate.is_set():
                refused.append(target)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(target, data)
        monkeypatch.setattr(shipper.files, "write_json_atomic", full)
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        ship.submit(path, lock)
        deadline = time.monotonic() + 5
        while len(refused) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(refused) >= 3  # submit's, and the thread's retries
        assert files.FileLock.try_acquire(path, create=False) is None
        assert memory.events == []
        gate.set()
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]
        taken = files.FileLock.try_acquire(path, create=False)
        assert taken is not None
        taken.release()

    def test_a_retried_step_does_not_write_its_state_again(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        inodes = []

        class Fails(callbacks.ArchiveCallback):
            def on_close(self, filename):
                inodes.append(os.stat(filename + shipper.STATE_SUFFIX).st_ino)
                if len(inodes) < 3:
                    raise OSError("no")
                return filename

        ship = make_shipper([("fails", Fails())], start=False)
        ship.submit(path)
        written = os.stat(path + shipper.STATE_SUFFIX).st_ino
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert inodes == [written] * 3  # replaced by no retry

    def test_failing_archives_counted_by_kind_since_the_oldest(
            self, tmp_path):
        seen = []

        class Failing:
            def failing(self, by_kind, reasons=None):
                seen.append(by_kind)

        ship = shipper.Shipper(callbacks.CallbackChain([]), stats=Failing())
        for name, since, permanent in (("a", None, False),
                                       ("b", 50.0, False),
                                       ("c", 20.0, False),
                                       ("d", 30.0, True),
                                       ("e", 40.0, False)):
            path = str(tmp_path / name)
            job = ship._jobs[path] = shipper._Job(path, path, 0, None)
            job.failing_since, job.permanent = since, permanent
        ship._report_failing()
        assert seen == [{"transient": (3, 20.0), "permanent": (1, 30.0)}]

    @staticmethod
    def capped_lines(caplog):
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]

    def test_capped_said_when_a_permanent_failure_joins_the_failing(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        a, b = (write_archive(tmp_path / name)
                for name in ("a.events", "b.events"))
        ship = make_shipper([("upload", steps.MemoryCallback())],
                            retry_initial=1.0, retry_max=300.0, start=False)
        jobs = [shipper._Job(path, path, 0, files.FileLock(
            path + shipper.STATE_SUFFIX)) for path in (a, b)]
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            self.fail_at(ship, jobs[0], monkeypatch, 100.0)  # transient
            exc = exceptions.CallbackError("key refused", callback="upload",
                                           filename=b, permanent=True)
            monkeypatch.setattr(shipper.time, "monotonic", lambda: 130.0)
            ship._failed(jobs[1], "upload", exc)
        # the permanent kind is new to the step: said, and this archive
        # retries at retry_max from now on: named
        assert self.capped_lines(caplog) == [
            shipper.W_CAPPED % (b, "upload", 1, "0 s", 300.0, exc)]
        for job in jobs:
            job.lock.release()

    def test_capped_said_again_at_its_interval_with_how_long(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("upload", steps.MemoryCallback())],
                            retry_initial=1.0, retry_max=1.0, start=False)
        job = shipper._Job(path, path, 0, files.FileLock(
            path + shipper.STATE_SUFFIX))
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            for now in (100.0, 130.0, 189.0, 190.0):
                self.fail_at(ship, job, monkeypatch, now)
        exc = exceptions.CallbackError("refused", callback="upload",
                                       filename=path)
        # capped from the first failure (its E_FAILED says it), then at
        # most every CAPPED_LOG_INTERVAL, at exactly that interval too
        assert shipper.CAPPED_LOG_INTERVAL == 60.0
        assert self.capped_lines(caplog) == [
            shipper.W_CAPPED % (path, "upload", 2, "30 s", 1.0, exc),
            shipper.W_CAPPED % (path, "upload", 4, "90 s", 1.0, exc)]
        job.lock.release()

    def test_after_a_success_failures_count_and_are_said_afresh(
            self, tmp_path, make_shipper, monkeypatch, caplog):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("upload", steps.MemoryCallback())],
                            retry_initial=1.0, retry_max=1.0, start=False)
        job = shipper._Job(path, path, 0, files.FileLock(
            path + shipper.STATE_SUFFIX))
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            self.fail_at(ship, job, monkeypatch, 100.0)
            self.fail_at(ship, job, monkeypatch, 110.0)  # capped: said
            ship._worked(job, "upload")  # at 110.0
            self.fail_at(ship, job, monkeypatch, 130.0)
            self.fail_at(ship, job, monkeypatch, 140.0)  # said again
        exc = exceptions.CallbackError("refused", callback="upload",
                                       filename=path)
        lines = [r.getMessage() for r in caplog.records]
        assert [line.partition("retrying in ")[0] for line in lines] == [
            "%s (attempt 1; " % exc,
            shipper.W_CAPPED % (path, "upload", 2, "10 s", 1.0, exc),
            "callback upload works again, after 2 failed attempts in 10 s",
            "%s (attempt 1; " % exc,
            shipper.W_CAPPED % (path, "upload", 2, "10 s", 1.0, exc)]
        job.lock.release()

    def test_a_done_list_that_does_not_parse_is_said_and_shipped_again(
            self, tmp_path, make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        done = tmp_path / shipper.DONE_FILE
        done.write_text("{")
        try:
            json.loads("{")
        except ValueError as exc:
            reason = str(exc)
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]
        assert caplog.records[0].getMessage() == (
            "%s does not parse (%s): archives it listed as shipped are "
            "shipped again" % (done, reason))

    def test_since_given_is_the_age_of_the_backlog(self, tmp_path,
                                                   make_shipper):
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        since = time.time() - 3600  # the oldest record, an hour ago
        ship.submit(path, since=since)
        assert 3600 <= ship.backlog[2] < 3660

    def test_stop_between_steps_leaves_the_rest_queued_quietly(
            self, tmp_path, make_shipper, caplog):
        first, second = (write_archive(tmp_path / name)
                         for name in ("a.events", "b.events"))
        block = Blocking()
        memory = steps.MemoryCallback()
        ship = make_shipper([("block", block), ("m", memory)])
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            ship.submit(first)
            assert block.entered.wait(5)
            ship.submit(second)  # queued behind it
            stopping = threading.Thread(target=ship.stop, args=(10,))
            stopping.start()
            with ship._cond:
                assert ship._cond.wait_for(lambda: ship._stopping, 5)
            block.release.set()
            stopping.join(10)
        assert not ship._thread.is_alive()
        assert memory.events == []  # nothing after the step that ran
        assert ship.pending() == 2  # their state files resume them
        assert all(os.path.exists(p + shipper.STATE_SUFFIX)
                   for p in (first, second))
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert caplog.records[-1].getMessage() == (
            "2 archive(s) not shipped yet; the next start resumes them")

    def test_stats_get_the_seconds_each_step_took(self, tmp_path,
                                                  make_shipper):
        class Timed(Stats):
            def callback_done(self, name, seconds):
                self.done.append((name, seconds))

        class Slow(callbacks.ArchiveCallback):
            def on_close(self, filename):
                time.sleep(0.05)
                return filename

        stats = Timed()
        ship = make_shipper([("slow", Slow())], stats=stats)
        ship.submit(write_archive(tmp_path / "a.events"))
        assert ship.wait_idle(timeout=5)
        ((name, seconds),) = stats.done
        assert name == "slow" and 0.05 <= seconds < 5

    def test_shipped_said_with_where_the_archive_is_now(
            self, tmp_path, make_shipper, caplog):
        stays, moved = (write_archive(tmp_path / name)
                        for name in ("a.events", "b.events"))
        ship = make_shipper([])
        gzipped = make_shipper([("gzip", steps.GzipCallback())])
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            ship.submit(stays)
            gzipped.submit(moved)
            for each in (ship, gzipped):
                assert each.wait_idle(timeout=5)
                each.stop(5)  # the line comes after the job is gone
        assert sorted(r.getMessage() for r in caplog.records
                      if r.getMessage().startswith("shipped ")) == [
            "shipped %s" % stays, "shipped %s (now %s.gz)" % (moved, moved)]

    def test_a_listed_name_whose_file_is_gone_resumes_its_state(
            self, tmp_path, make_shipper):
        # a.events was shipped and listed; a new a.events of that name
        # was gzipped by its step when the worker died: the list's stale
        # entry must not end the new archive's state
        path = write_archive(tmp_path / "a.events")
        ship = make_shipper([])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        os.unlink(path)
        write_archive(path, RECORDS[:2])
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(path)
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path + ".gz", "step": 1,
                       "chain": ["gzip", "m"]}, f)
        memory = steps.MemoryCallback()
        again = make_shipper([("gzip", steps.GzipCallback()), ("m", memory)])
        assert again.recover(str(tmp_path), is_archive) == 1
        assert again.wait_idle(timeout=5)
        assert memory.events == [("close", path + ".gz")]

    def test_archives_due_at_one_instant_go_in_the_order_queued(
            self, tmp_path, make_shipper, monkeypatch):
        paths = [write_archive(tmp_path / ("%d.events" % i))
                 for i in range(3)]
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        monkeypatch.setattr(shipper.time, "monotonic", lambda: 1000.0)
        for path in paths:
            ship.submit(path)
        assert [ship._next().origin for _ in paths] == paths
        ship._busy = None

    def test_stop_closes_each_callback_once_even_after_a_failing_close(
            self, tmp_path, make_shipper, caplog):
        closed = []

        class Closes(callbacks.ArchiveCallback):
            def __init__(self, name, fails=False):
                self.name, self.fails = name, fails

            def on_close(self, filename):
                return filename

            def close(self):
                closed.append(self.name)
                if self.fails:
                    raise OSError("pool gone")

        ship = make_shipper([("a", Closes("a", fails=True)),
                             ("b", Closes("b")),
                             ("plain", steps.MemoryCallback())])
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            ship.stop(5)
        assert closed == ["a", "b"]
        (line,) = caplog.records
        assert line.getMessage() == "closing callback a failed"
        assert line.exc_info

    def test_stop_leaves_a_stuck_step_after_its_timeout(
            self, tmp_path, make_shipper, caplog):
        closed = []

        class Stuck(Blocking):
            def close(self):
                closed.append(True)

        step = Stuck()
        ship = make_shipper([("stuck", step)])
        ship.submit(write_archive(tmp_path / "a.events"))
        assert step.entered.wait(5)
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            ship.stop(0.2)
        assert 0.2 <= time.monotonic() - started < 5
        assert closed == []  # not under a step that still runs
        assert [r.getMessage() for r in caplog.records] == [
            "shipping step still running after 0 s; its state file resumes "
            "it next start",
            "1 archive(s) not shipped yet; the next start resumes them"]
        step.release.set()
        ship._thread.join(5)

    def test_reports_that_cannot_be_had_are_said(self, tmp_path,
                                                 monkeypatch, caplog):
        origin = str(tmp_path / "a.events")

        def fail(path):
            raise OSError("unreadable")

        monkeypatch.setattr(archive, "inspect_file", fail)
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert shipper._report_from_state(origin,
                                              {"records": "many"}) is None
            assert shipper._inspect(origin) is None
        assert [r.getMessage() for r in caplog.records] == [
            "%s.ship: the saved archive report does not parse; it is read "
            "again from the archive" % origin,
            "%s: cannot read its records for a report: unreadable" % origin]

    def test_what_recovery_finds_is_said_word_for_word(
            self, tmp_path, make_shipper, caplog):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        (outside / "x").write_bytes(b"not yours")
        state_link = work / ("a.events" + shipper.STATE_SUFFIX)
        os.symlink(outside / "x", state_link)
        archive_link = work / "b.events"
        os.symlink(outside / "x", archive_link)
        (work / "c.events").write_bytes(b"")
        left = write_archive(work / "d.events")
        moved = write_archive(work / "e.events.gz")  # the step's output
        state = work / ("e.events" + shipper.STATE_SUFFIX)
        state.write_text(json.dumps({"path": str(work / "e.events"),
                                     "step": 0, "output": moved,
                                     "chain": ["gzip", "m"]}))
        changed = write_archive(work / "f.events")
        with open(changed + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": changed, "step": 1, "chain": ["old"]}, f)
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("m", steps.MemoryCallback())], start=False)
        with caplog.at_level(logging.INFO, logger="shoebox_worker"):
            assert ship.recover(str(work), is_archive) == 3
        assert [r.getMessage() for r in caplog.records] == [
            shipper.E_NOT_REGULAR % state_link,
            "%s: step 0 (gzip) had left it at %s; going on"
            % (work / "e.events", moved),
            "resuming shipping of %s at step 1 of 2" % moved,
            "%s: the callback chain changed since it was started (['old'], "
            "now ['gzip', 'm']); running the new chain from its first step"
            % changed,
            "resuming shipping of %s at step 0 of 2" % changed,
            shipper.E_NOT_REGULAR % archive_link,
            "removing empty archive %s left by a killed run"
            % (work / "c.events"),
            "shipping %s, left by a previous run" % left]


class TestSettleWaits:
    """settle() wakes at least every 0.2 s (an archive may fall due with
    no notify) and never past its deadline."""

    class Waits(type(threading.Condition())):
        def __init__(self):
            super().__init__()
            self.timeouts = []

        def wait(self, timeout=None):
            self.timeouts.append(timeout)
            return super().wait(timeout)

    @pytest.mark.parametrize("timeout", [0.05, 0.5])
    def test_polls_and_keeps_its_deadline(self, tmp_path, make_shipper,
                                          timeout):
        ship = make_shipper([("m", steps.MemoryCallback())], start=False)
        ship._cond = cond = self.Waits()
        ship._busy = object()  # a step runs, and never ends
        started = time.monotonic()
        assert ship.settle(timeout) is False
        assert time.monotonic() - started >= timeout
        assert cond.timeouts
        assert all(t is not None and 0 < t <= min(timeout, 0.2) + 1e-9
                   for t in cond.timeouts), cond.timeouts
        ship._busy = None


def with_index(path, values=("i-1",)):
    """An index beside the archive at ``path``."""
    builder = index.Builder(("payload.instance_id",))
    for value in values:
        builder.add(None, (value,))
    index.write_file(index.sidecar(path), builder.to_bytes())
    return index.sidecar(path)


class Sees(callbacks.ArchiveCallback):
    """Notes whether each file it gets has its index beside it."""

    def __init__(self):
        self.seen = []

    def on_close(self, filename):
        self.seen.append((filename, os.path.exists(filename + ".index")))
        return filename


def listing(folder):
    return sorted(os.listdir(folder))


class TestIndex:
    """The index travels with the archive along the chain."""

    def test_follows_gzip_and_goes_with_delete(self, tmp_path,
                                               make_shipper):
        path = write_archive(tmp_path / "a.events")
        with_index(path)
        sees = Sees()
        ship = make_shipper([("gzip", steps.GzipCallback()), ("sees", sees),
                             ("delete", steps.DeleteFileCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert sees.seen == [(path + ".gz", True)]
        assert listing(tmp_path) == []

    def test_stays_beside_what_the_chain_leaves(self, tmp_path,
                                                make_shipper):
        path = write_archive(tmp_path / "a.events")
        with_index(path, ("x",))
        ship = make_shipper([("gzip", steps.GzipCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert listing(tmp_path) == ["a.events.gz", "a.events.gz.index"]
        assert index.read_file(path + ".gz.index").may_contain(
            "payload.instance_id", "x")

    def test_moves_with_move(self, tmp_path, make_shipper):
        work, dest = tmp_path / "work", tmp_path / "dest"
        work.mkdir()
        path = write_archive(work / "a.events")
        with_index(path)
        ship = make_shipper([("move", steps.MoveFileCallback(
            destination_folder=str(dest)))])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert listing(work) == []
        assert listing(dest) == ["a.events", "a.events.index"]

    def test_moves_to_another_file_system(self, tmp_path, make_shipper,
                                          monkeypatch):
        real_rename = os.rename

        def rename(src, dst):
            if src.endswith(".index"):
                raise OSError(shipper.errno.EXDEV, "Invalid cross-device link")
            return real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
        path = write_archive(tmp_path / "a.events")
        data = open(with_index(path), "rb").read()
        ship = make_shipper([("x", steps.ChangeExtensionCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert listing(tmp_path) == ["a.events.done", "a.events.done.index"]
        assert open(path + ".done.index", "rb").read() == index.bind(
            data, index.etag_of_file(path + ".done"),
            os.path.getsize(path + ".done"))

    def test_bound_to_the_file_the_chain_leaves(self, tmp_path,
                                                make_shipper):
        path = write_archive(tmp_path / "a.events")
        with_index(path)
        assert index.read_file(index.sidecar(path)).etag is None
        ship = make_shipper([("gzip", steps.GzipCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        got = index.read_file(path + ".gz.index")
        assert (got.etag, got.archive_size) == (
            index.etag_of_file(path + ".gz"), os.path.getsize(path + ".gz"))
        assert got.may_contain("payload.instance_id", "i-1")

    def test_one_that_cannot_be_bound_stays_and_is_said(
            self, tmp_path, make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        with open(index.sidecar(path), "wb") as f:
            f.write(b"SBXI\x02 damaged")
        ship = make_shipper([("x", steps.ChangeExtensionCallback())])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert listing(tmp_path) == ["a.events.done", "a.events.done.index"]
        assert "cannot bind the index %s.done.index" % path in caplog.text

    def test_an_archive_without_one_ships(self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        sees = Sees()
        ship = make_shipper([("gzip", steps.GzipCallback()), ("sees", sees)])
        ship.submit(path)
        assert ship.wait_idle(timeout=5)
        assert sees.seen == [(path + ".gz", False)]
        assert listing(tmp_path) == ["a.events.gz"]

    def test_a_crash_after_a_step_leaves_it_behind(self, tmp_path,
                                                   make_shipper):
        """gzip done, killed before the index followed: found by the
        chain's forms when the archive is resumed."""
        path = write_archive(tmp_path / "a.events")
        with_index(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(path)
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "output": path + ".gz",
                       "chain": ["gzip", "sees"]}, f)
        sees = Sees()
        ship = make_shipper([("gzip", steps.GzipCallback()), ("sees", sees)],
                            start=False)
        assert ship.recover(str(tmp_path), is_archive) == 1
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert sees.seen == [(path + ".gz", True)]
        assert listing(tmp_path) == ["a.events.gz", "a.events.gz.index"]

    def test_a_crash_after_delete_leaves_no_index(self, tmp_path,
                                                  make_shipper):
        path = str(tmp_path / "a.events")
        with_index(path + ".gz")  # the archive itself is gone
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path + ".gz", "step": 1, "output": None,
                       "chain": ["gzip", "delete"]}, f)
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("delete", steps.DeleteFileCallback())],
                            start=False)
        ship.recover(str(tmp_path), is_archive)
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert listing(tmp_path) == []

    def test_recovery_rebuilds_it_from_the_records(self, tmp_path,
                                                   make_shipper):
        notes = [{"payload": {"instance_id": "i-%d" % i},
                  "_context_project_id": 7} for i in range(5)]
        records = [({"timestamp": "2026-11-26 12:00:0%d.000000" % (4 - i)},
                    orjson.dumps(note)) for i, note in enumerate(notes)]
        records.append(({}, b"not json"))
        path = write_archive(tmp_path / "a.events", records)
        with_index(path, ("stale",))  # the killed run's, or another's
        torn = record.pack({"n": "torn"}, b'{"payload": {"instance_id": '
                           b'"torn"}}')
        with open(path, "ab") as f:
            f.write(torn[:len(torn) // 2])
        sees = Sees()
        fields = ("payload.instance_id", "_context_project_id")
        ship = make_shipper([("sees", sees)], start=False,
                            index_fields=fields)
        assert ship.recover(str(tmp_path), is_archive) == 1
        got = index.read_file(path + ".index")
        assert got.fields == fields
        assert got.records == 6
        assert not got.may_contain("payload.instance_id", "stale")
        assert all(got.may_contain("payload.instance_id", "i-%d" % i)
                   for i in range(5))
        assert got.may_contain("_context_project_id", "7")
        assert (got.earliest, got.latest) == ("2026-11-26T12:00:00.000000Z",
                                              "2026-11-26T12:00:04.000000Z")
        ship.start()
        assert ship.wait_idle(timeout=5)
        assert sees.seen == [(path, True)]

    def test_recovery_without_index_fields_drops_a_stale_one(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with_index(path)
        ship = make_shipper([("memory", steps.MemoryCallback())],
                            start=False)
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert not os.path.exists(path + ".index")

    def test_orphans_are_removed_at_start(self, tmp_path, make_shipper):
        gone = with_index(str(tmp_path / "gone.events.gz"))
        # in flight: a.events.ship can lead to a.events.gz
        path = write_archive(tmp_path / "a.events")
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        kept = with_index(path + ".gz")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path + ".gz", "step": 1,
                       "chain": ["gzip", "memory"]}, f)
        leftover = tmp_path / "b.events.index.tmp"
        leftover.write_bytes(b"half")
        ship = make_shipper([("gzip", steps.GzipCallback()),
                             ("memory", steps.MemoryCallback())],
                            start=False)
        ship.recover(str(tmp_path), is_archive)
        assert not os.path.exists(gone)
        assert not leftover.exists()
        assert os.path.exists(kept)


def test_the_done_stamp_is_the_lists_own_not_its_folders(tmp_path):
    # recover looks at the done list again when its stamp changed; a list
    # replaced within one tick of the folder's coarse clock leaves the
    # folder looking unchanged, the list's new inode does not
    folder = str(tmp_path)
    done = os.path.join(folder, shipper.DONE_FILE)
    with open(done, "w") as f:
        f.write("{}")
    before = shipper._done_stamp(folder)
    folder_times = os.stat(folder)
    with open(done + ".tmp", "w") as f:
        f.write('{"x.events": [1, 2, 3]}')
    os.replace(done + ".tmp", done)
    os.utime(folder, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    assert shipper._done_stamp(folder) != before
    os.unlink(done)
    assert shipper._done_stamp(folder) is None


class TestStateReadDefensively:
    """A state file or the done list of the wrong shape is said in one
    WARNING line; its archive goes through the whole chain, in order."""

    CHAIN = ["memory", "delete"]

    # (what the state file holds, what the warning says is wrong: None
    # for the error json.loads gives); PATH stands for the archive's path
    BAD = [
        (b"[]", "holds [], not an object"),
        (b'"a.events"', 'holds "a.events", not an object'),
        (b'{"path": ', None),
        (b'{"path": "\xff"}', None),
        (b"[" * 100000, None),
        ({"path": 5, "step": 0}, "says path is 5, not a file name"),
        ({"path": ["x"], "step": 0}, 'says path is ["x"], not a file name'),
        ({"path": "a\0", "step": 0},
         'says path is "a\\u0000", not a file name'),
        ({"path": "", "step": 0}, 'says path is "", not a file name'),
        ({"path": "PATH", "step": 0, "output": 7},
         "says output is 7, not a file name"),
        ({"path": "PATH", "step": "1"},
         'says step is "1", not a whole number'),
        ({"path": "PATH", "step": 1.0},
         "says step is 1.0, not a whole number"),
        ({"path": "PATH", "step": True},
         "says step is true, not a whole number"),
        ({"path": "PATH", "step": None},
         "says step is null, not a whole number"),
        ({"path": "PATH", "step": -1},
         "says step is -1, not one of the chain's 2 (0 to 1)"),
        ({"path": "PATH", "step": 2},
         "says step is 2, not one of the chain's 2 (0 to 1)"),
        ({"path": "PATH", "step": 2 ** 70},
         "says step is %d, not one of the chain's 2 (0 to 1)" % 2 ** 70),
        ({"done": "yes", "path": "PATH"}, 'says done is "yes", not true'),
        ({"done": 1}, "says done is 1, not true"),
    ]

    @pytest.mark.parametrize("content,problem", BAD, ids=[
        (problem or repr(content))[:40] for content, problem in BAD])
    def test_said_once_and_shipped_through_the_whole_chain(
            self, tmp_path, make_shipper, caplog, content, problem):
        if problem is None:
            try:
                json.loads(content)
            except (ValueError, RecursionError) as exc:
                problem = "does not parse (%s)" % exc
        path = write_archive(tmp_path / "a.events")
        state = path + shipper.STATE_SUFFIX
        if isinstance(content, dict):
            content = json.dumps(
                {**{key: value.replace("PATH", path)
                    if isinstance(value, str) else value
                    for key, value in content.items()},
                 "chain": self.CHAIN}).encode()
        with open(state, "wb") as f:
            f.write(content)
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory),
                             ("delete", steps.DeleteFileCallback())],
                            start=False)
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        said = [(r.levelname, r.getMessage()) for r in caplog.records]
        ship.start()
        assert ship.wait_idle(timeout=5)
        # memory saw the archive before delete removed it: never deleted
        # unshipped, no step run out of order, none skipped
        assert memory.events == [("close", path)]
        assert os.listdir(tmp_path) == []
        assert said == [("WARNING", shipper.W_BAD_STATE % (
            state, problem.replace("PATH", path), path))]

    def test_a_chain_of_one_step_resumes_at_its_only_step(
            self, tmp_path, make_shipper):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "chain": ["memory"]}, f)
        memory = steps.MemoryCallback()
        ship = make_shipper([("memory", memory)])
        assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert memory.events == [("close", path)]

    def test_an_empty_chain_takes_step_zero(self, tmp_path, make_shipper,
                                            caplog):
        path = write_archive(tmp_path / "a.events")
        with open(path + shipper.STATE_SUFFIX, "w") as f:
            json.dump({"path": path, "step": 0, "chain": []}, f)
        ship = make_shipper([])
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        assert ship.wait_idle(timeout=5)
        assert caplog.records == []
        assert sorted(os.listdir(tmp_path)) == [shipper.DONE_FILE,
                                                "a.events"]

    def test_a_wrong_state_of_a_gone_archive_is_left_alone(
            self, tmp_path, make_shipper, caplog):
        state = tmp_path / ("gone.events" + shipper.STATE_SUFFIX)
        state.write_text("[]")
        (tmp_path / "gone.events.gz").write_bytes(b"where it may be now")
        ship = make_shipper([("gzip", steps.GzipCallback())])
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 0
        assert [r.getMessage() for r in caplog.records] == [
            shipper.W_BAD_STATE_LEFT % (state, "holds [], not an object",
                                        tmp_path / "gone.events")]
        assert state.read_text() == "[]"
        assert (tmp_path / "gone.events.gz").exists()

    def test_a_saved_report_of_the_wrong_shape_is_read_again(
            self, tmp_path, make_shipper, caplog):
        log = []
        path = write_archive(tmp_path / "a.events")
        report = shipper._report_to_state(archive.inspect_file(path))
        for key, value in (("first_metadata", ["n"]),
                           ("last_metadata", "n"), ("torn_offset", "0")):
            with open(path + shipper.STATE_SUFFIX, "w") as f:
                json.dump({"path": path, "step": 0, "chain": ["r"],
                           "report": {**report, key: value}}, f)
            ship = make_shipper([("r", Reports(log))], start=False)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
                assert ship.recover(str(tmp_path), is_archive) == 1
            assert [r.getMessage() for r in caplog.records] == [
                "%s.ship: the saved archive report does not parse; it is "
                "read again from the archive" % path], key
            ship.start()
            assert ship.wait_idle(timeout=5)
            ship.stop(5)
            os.unlink(tmp_path / shipper.DONE_FILE)
        assert [r.first_metadata for _, r in log] == [RECORDS[0][0]] * 3


class TestDoneListReadDefensively:
    """The done list is read only as a regular file, and one of the wrong
    shape is said once and written again."""

    def _recover(self, tmp_path, make_shipper, caplog):
        """Recover ``tmp_path`` in a thread (a hang fails, not blocks, the
        test); returns the memory callback and the WARNING lines."""
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)])
        found = []
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            thread = threading.Thread(target=lambda: found.append(
                ship.recover(str(tmp_path), is_archive)), daemon=True)
            thread.start()
            thread.join(5)
        done = tmp_path / shipper.DONE_FILE
        if thread.is_alive():  # let it go: a writer gives the reader EOF
            os.close(os.open(done, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(5)
            pytest.fail("recover hung on %s" % done)
        assert ship.wait_idle(timeout=5)
        return found, memory, [(r.levelname, r.getMessage())
                               for r in caplog.records]

    def test_a_fifo_is_not_waited_on(self, tmp_path, make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        done = tmp_path / shipper.DONE_FILE
        os.mkfifo(done)
        found, memory, said = self._recover(tmp_path, make_shipper, caplog)
        assert found == [1]
        assert memory.events == [("close", path)]
        assert said == [("WARNING", shipper.W_BAD_DONE % (
            done, "cannot be read (a FIFO)"))]
        assert json.loads(done.read_text()) == {
            "a.events": shipper._identity(os.stat(path))}

    def test_a_symlink_is_not_followed(self, tmp_path, make_shipper,
                                       caplog):
        work = tmp_path / "work"
        work.mkdir()
        path = write_archive(work / "a.events")
        target = tmp_path / "elsewhere.json"
        target.write_text(json.dumps(
            {"a.events": shipper._identity(os.stat(path))}))
        done = work / shipper.DONE_FILE
        os.symlink(target, done)
        found, memory, said = self._recover(work, make_shipper, caplog)
        assert found == [1]
        assert memory.events == [("close", path)]
        assert said == [("WARNING", shipper.W_BAD_DONE % (
            done, "cannot be read (a symlink (not followed))"))]
        assert not os.path.islink(done)
        assert json.loads(target.read_text()) == {
            "a.events": shipper._identity(os.stat(path))}

    @pytest.mark.parametrize("content,problem", [
        ("[]", "holds [], not an object"),
        ('{"a.events": "x"}', 'lists "a.events" as "x", not [inode, size, '
         'mtime]'),
        ('{"a.events": [1, 2]}', 'lists "a.events" as [1, 2], not [inode, '
         'size, mtime]'),
        ('{"a.events": [1, 2, true]}', 'lists "a.events" as [1, 2, true], '
         'not [inode, size, mtime]'),
    ])
    def test_the_wrong_shape_is_said_once_and_written_again(
            self, tmp_path, make_shipper, caplog, content, problem):
        path = write_archive(tmp_path / "a.events")
        other = write_archive(tmp_path / "b.events")
        with open(other + shipper.STATE_SUFFIX, "w") as f:  # reads the list
            json.dump({"path": other, "step": 0, "chain": ["m"]}, f)
        done = tmp_path / shipper.DONE_FILE
        done.write_text(content)
        found, memory, said = self._recover(tmp_path, make_shipper, caplog)
        assert found == [2]
        assert sorted(memory.events) == [("close", path), ("close", other)]
        assert said == [("WARNING", shipper.W_BAD_DONE % (done, problem))]

    def test_entries_of_the_right_shape_are_kept(self, tmp_path,
                                                 make_shipper, caplog):
        path = write_archive(tmp_path / "a.events")
        kept = write_archive(tmp_path / "b.events")
        done = tmp_path / shipper.DONE_FILE
        done.write_text(json.dumps({
            "a.events": None, "b.events": shipper._identity(os.stat(kept))}))
        found, memory, said = self._recover(tmp_path, make_shipper, caplog)
        assert found == [1]
        assert memory.events == [("close", path)]
        assert said == [("WARNING", shipper.W_BAD_DONE % (
            done, 'lists "a.events" as null, not [inode, size, mtime]'))]
        assert json.loads(done.read_text()) == {
            "a.events": shipper._identity(os.stat(path)),
            "b.events": shipper._identity(os.stat(kept))}

    def test_a_folder_of_its_name_does_not_stop_the_recovery(
            self, tmp_path, make_shipper, caplog):
        write_archive(tmp_path / "a.events")
        done = tmp_path / shipper.DONE_FILE
        done.mkdir()
        memory = steps.MemoryCallback()
        ship = make_shipper([("m", memory)], start=False)
        with caplog.at_level(logging.WARNING, logger="shoebox_worker"):
            assert ship.recover(str(tmp_path), is_archive) == 1
        assert [r.getMessage() for r in caplog.records][:2] == [
            shipper.W_BAD_DONE % (done, "cannot be read (a directory)"),
            "cannot write %s: [Errno 21] Is a directory: '%s.tmp' -> '%s'"
            % (done, done, done)]
