"""Tests for shoebox_worker.roll_manager: series of archives."""

import datetime
import fcntl
import os

import pytest

import shoebox_worker
from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker import index as index_mod
from shoebox_worker import record
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker.ship import steps

SECOND = "test_%Y%m%d_%H%M%S.events"  # one-second resolution
FROZEN = datetime.datetime(2024, 2, 29, 23, 59, 59,
                           tzinfo=datetime.timezone.utc)


def records(count):
    return [({"index": str(i)}, b"payload_%d" % i) for i in range(count)]


def write(manager, items):
    for metadata, payload in items:
        manager.write(metadata, payload)


def read_all(template, directory=".", **kwargs):
    with roll_manager.ReadingRollManager(template, directory,
                                         **kwargs) as manager:
        return list(manager)


@pytest.fixture
def frozen(monkeypatch):
    """Every file name is rendered in the same second."""
    monkeypatch.setattr(roll_manager, "utcnow", lambda: FROZEN)


def test_seed_readme_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    # -- the seed README, verbatim but for the import --
    from shoebox_worker import roll_checker, roll_manager  # noqa: F811, I001

    checker = roll_checker.SizeRollChecker(roll_size_mb=100)
    x = roll_manager.WritingRollManager("test_%c.events", checker)
    for index in range(10):
        x.write({"index": str(index)}, "payload_%d" % index)
    x.close()

    manager = roll_manager.ReadingRollManager("test_*.events")
    while True:
        try:
            metadata, payload = manager.read()
            seen.append((metadata, payload))  # (added: check what we read)
        except roll_manager.NoMoreFiles:
            break
    # -- end --
    assert seen == records(10)
    [name] = os.listdir(tmp_path)
    assert name.startswith("test_") and name.endswith(".events")
    assert not set(" :/") & set(name)
    assert roll_manager.NoMoreFiles is shoebox_worker.NoMoreFiles


class TestSameSecondRolls:
    def test_real_clock_percent_c(self, tmp_path):
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                "test_%c.events", checker, directory=str(tmp_path)) as m:
            write(m, records(50))
        assert len(os.listdir(tmp_path)) == 50
        assert read_all("test_*.events", str(tmp_path)) == records(50)

    def test_frozen_clock(self, tmp_path, frozen):
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path)) as manager:
            write(manager, records(50))
            assert manager.opened == 50
        names = sorted(os.listdir(tmp_path))
        assert len(names) == 50
        assert "test_20240229_235959.events" in names
        assert "test_20240229_235959~49.events" in names
        assert read_all("test_*.events", str(tmp_path)) == records(50)

    def test_files_moved_and_gzipped_away(self, tmp_path, frozen):
        out = tmp_path / "out"
        memory = steps.MemoryCallback()
        chain = callbacks.CallbackChain([
            steps.GzipCallback(),
            steps.MoveFileCallback(destination_folder=str(out)),
            memory])
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path / "spool"),
                archive_callback=chain) as manager:
            write(manager, records(50))
        assert os.listdir(tmp_path / "spool") == []
        closed = [name for event, name in memory.events if event == "close"]
        opened = [name for event, name in memory.events if event == "open"]
        assert len(set(closed)) == len(set(opened)) == 50  # never reused
        assert len(os.listdir(out)) == 50
        assert read_all("test_*.events.gz", str(out)) == records(50)

    def test_files_deleted_away(self, tmp_path, frozen):
        memory = steps.MemoryCallback()
        chain = callbacks.CallbackChain([memory,
                                         steps.DeleteFileCallback()])
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path),
                archive_callback=chain) as manager:
            write(manager, records(20))
        names = [name for event, name in memory.events if event == "open"]
        assert len(set(names)) == 20
        assert os.listdir(tmp_path) == []

    def test_second_boundary_with_coarse_timestamps(self, tmp_path,
                                                    monkeypatch):
        # The template changes second half-way, and the file system stamps
        # every file with the same mtime (coarse clock). Read order must
        # still be write order.
        now = [FROZEN]
        monkeypatch.setattr(roll_manager, "utcnow", lambda: now[0])
        real_close = archive.ArchiveWriter.close

        def coarse_close(self):
            was_open = not self.closed
            real_close(self)
            if was_open:
                os.utime(self.filename, ns=(10**18, 10**18))

        monkeypatch.setattr(archive.ArchiveWriter, "close", coarse_close)
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                "test_%c.events", checker,
                directory=str(tmp_path)) as manager:
            for i, item in enumerate(records(20)):
                if i == 10:
                    now[0] += datetime.timedelta(seconds=1)
                write(manager, [item])
        assert read_all("test_*.events", str(tmp_path)) == records(20)

    def test_other_writer_took_the_name(self, tmp_path, frozen):
        taken = tmp_path / "test_20240229_235959.events"
        taken.write_bytes(b"not ours")
        (tmp_path / "test_20240229_235959~1.events.gz").write_bytes(b"x")
        checker = roll_checker.NeverRollChecker()
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path)) as manager:
            write(manager, records(1))
            assert manager.active_filename.endswith("235959~2.events")
        assert taken.read_bytes() == b"not ours"


class TestWriting:
    def test_version_1_files(self, tmp_path):
        checker = roll_checker.NeverRollChecker()
        with roll_manager.WritingRollManager(
                "v1_%Y.events", checker, directory=str(tmp_path),
                version=1) as manager:
            write(manager, records(3))
            path = manager.active_filename
        assert open(path, "rb").read() == b"".join(
            record.pack(m, p, 1) for m, p in records(3))

    def test_default_version_is_2(self, tmp_path):
        with roll_manager.WritingRollManager(
                "v_%Y.events", roll_checker.NeverRollChecker(),
                directory=str(tmp_path)) as manager:
            write(manager, records(1))
            path = manager.active_filename
        assert open(path, "rb").read() == record.pack(*records(1)[0], 2)

    def test_unknown_version(self, tmp_path):
        with pytest.raises(exceptions.InvalidVersion):
            roll_manager.WritingRollManager(
                "x", roll_checker.NeverRollChecker(), version=9)

    def test_close_returns_the_report_and_runs_the_callback(self,
                                                            tmp_path):
        manager = roll_manager.WritingRollManager(
            "c_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path / "new"),
            archive_callback=steps.ChangeExtensionCallback())
        assert manager.close() is None  # nothing open
        assert manager.write({"a": "b"}, "c") is None
        assert manager.write({"a": "d"}, "e") is None
        manager.sync()
        path = manager.active_filename
        size = os.path.getsize(path)
        assert size > 0
        assert manager.bytes_written == size
        report = manager.close()
        assert report == archive.ArchiveReport(
            path, records=2, size=size, versions={record.CURRENT_VERSION},
            first_metadata={"a": "b"}, last_metadata={"a": "d"})
        assert os.path.exists(path + ".done")  # the callback ran
        assert manager.close() is None

    def test_write_returns_the_report_of_a_roll(self, tmp_path):
        memory = steps.MemoryCallback()
        manager = roll_manager.WritingRollManager(
            "r_%Y.events", roll_checker.CountRollChecker(roll_count=2),
            directory=str(tmp_path), archive_callback=memory)
        assert manager.write({"n": "0"}, "a") is None
        first = manager.active_filename
        report = manager.write({"n": "1"}, "b")
        assert (report.filename, report.records) == (first, 2)
        assert report.size == os.path.getsize(first)
        assert memory.events == [("open", first), ("close", first)]
        assert manager.maybe_roll() is None
        manager.write({"n": "2"}, "c")
        assert manager.close().records == 1


class TestCutUnsynced:
    def manager(self, tmp_path, callback=None):
        return roll_manager.WritingRollManager(
            "u_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path), archive_callback=callback)

    def test_cuts_back_to_the_last_sync_and_closes(self, tmp_path):
        memory = steps.MemoryCallback()
        manager = self.manager(tmp_path, memory)
        write(manager, records(3))
        manager.sync()
        synced = os.path.getsize(manager.active_filename)
        write(manager, records(5)[3:])
        path = manager.active_filename
        report = manager.cut_unsynced()
        assert manager.active_archive is None
        assert (report.filename, report.records, report.size) == (
            path, 3, synced)
        assert report.last_metadata == {"index": "2"}
        assert memory.events == [("open", path), ("close", path)]
        assert read_all("u_*", str(tmp_path)) == records(3)
        assert manager.cut_unsynced() is None  # nothing open

    def test_the_time_range_is_the_synced_records(self, tmp_path):
        manager = self.manager(tmp_path)
        manager.write({"timestamp": "2024-03-09 10:00:00"}, b"{}")
        manager.sync()
        manager.write({"timestamp": "2024-03-09 08:00:00"}, b"{}")
        report = manager.cut_unsynced()
        assert (report.records, report.earliest, report.latest) == (
            1, "2024-03-09T10:00:00.000000Z", "2024-03-09T10:00:00.000000Z")

    def test_nothing_synced_removes_the_file(self, tmp_path):
        memory = steps.MemoryCallback()
        manager = self.manager(tmp_path, memory)
        write(manager, records(2))
        path = manager.active_filename
        assert manager.cut_unsynced() is None
        assert os.listdir(tmp_path) == []
        assert memory.events == [("open", path)]  # no on_close: it is gone
        write(manager, records(1))  # the next write opens a new file
        assert manager.active_filename != path
        assert manager.close().records == 1

    def test_callback_without_on_open(self, tmp_path):
        class CloseOnly:
            def on_close(self, filename):
                return filename

        with roll_manager.WritingRollManager(
                "c_%Y.events", roll_checker.NeverRollChecker(),
                directory=str(tmp_path),
                archive_callback=CloseOnly()) as manager:
            write(manager, records(1))


class TestReading:
    def test_compressed_files_in_order(self, tmp_path):
        checker = roll_checker.CountRollChecker(roll_count=3)
        with roll_manager.WritingRollManager(
                "test_%Y.events", checker, directory=str(tmp_path)) as m:
            write(m, records(18))
        paths = roll_manager.sort_written_order(
            str(p) for p in tmp_path.iterdir())
        assert len(paths) == 6
        steps.GzipCallback().on_close(paths[1])
        steps.ZstdCallback().on_close(paths[2])
        steps.GzipCallback().on_close(paths[4])
        assert read_all("test_*.events*", str(tmp_path)) == records(18)
        assert read_all("test_*.events", str(tmp_path)) == [
            r for i, r in enumerate(records(18)) if i // 3 not in (1, 2, 4)]

    def test_callbacks_on_read_files(self, tmp_path):
        with roll_manager.WritingRollManager(
                "r_%Y.events", roll_checker.CountRollChecker(roll_count=2),
                directory=str(tmp_path)) as m:
            write(m, records(4))
        memory = steps.MemoryCallback()
        assert read_all("r_*", str(tmp_path),
                        archive_callback=memory) == records(4)
        assert [event for event, _ in memory.events] == [
            "open", "close", "open", "close"]

    def test_no_files(self, tmp_path):
        manager = roll_manager.ReadingRollManager("*.events", str(tmp_path))
        with pytest.raises(roll_manager.NoMoreFiles):
            manager.read()

    def test_damaged_file_strict_and_salvage(self, tmp_path):
        with roll_manager.WritingRollManager(
                "d_%Y.events", roll_checker.CountRollChecker(roll_count=3),
                directory=str(tmp_path)) as m:
            write(m, records(6))
        first = roll_manager.sort_written_order(
            str(p) for p in tmp_path.iterdir())[0]
        data = bytearray(open(first, "rb").read())
        data[-2] ^= 1  # last record of the first file
        stat = os.stat(first)
        with open(first, "wb") as f:
            f.write(data)
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        manager = roll_manager.ReadingRollManager("d_*", str(tmp_path))
        assert [manager.read(), manager.read()] == records(2)
        with pytest.raises(exceptions.CorruptRecord):
            manager.read()
        got = read_all("d_*", str(tmp_path), salvage=True)
        assert got == records(2) + records(6)[3:]


class TestNames:
    def test_render_template(self):
        when = datetime.datetime(2024, 1, 2, 3, 4, 5)
        assert roll_manager.render_template("a %c/b.events", when) == (
            "a_Tue_Jan__2_03_04_05_2024_b.events")
        assert roll_manager.render_template("%Y", when) == "2024"

    def test_unique_path(self, tmp_path):
        def unique(path, start=0):
            path, counter, lock = roll_manager.unique_path(path, start)
            lock.release()
            return path, counter

        base = str(tmp_path / "x.events")
        assert unique(base) == (base, 0)
        assert unique(base) == (str(tmp_path / "x~1.events"), 1)
        (tmp_path / "x~2.events.gz").write_bytes(b"")
        assert unique(base) == (str(tmp_path / "x~3.events"), 3)
        assert unique(base, start=7)[1] == 7
        noext = str(tmp_path / "plain")
        unique(noext)
        assert unique(noext)[0] == noext + "~1"

    def test_unique_path_is_locked_from_its_creation(self, tmp_path):
        path, _, lock = roll_manager.unique_path(str(tmp_path / "x.events"))
        try:
            assert files.FileLock.try_acquire(path, create=False) is None
            assert files.names_same_file(lock.fd, path)
        finally:
            lock.release()
        assert files.FileLock.try_acquire(path, create=False) is not None

    def test_a_recovery_removing_the_new_file_is_survived(
            self, tmp_path, monkeypatch):
        # another worker's recovery locks the empty file between our
        # create and our flock, and removes it: we create it again
        path = str(tmp_path / "x.events")
        raced = []

        class Racing:
            def __getattr__(self, name):
                return getattr(fcntl, name)

            def flock(self, fd, operation):
                if not raced:
                    raced.append(True)
                    other = files.FileLock(path, create=False)
                    os.unlink(path)
                    other.release()
                fcntl.flock(fd, operation)

        monkeypatch.setattr(files, "fcntl", Racing())
        got, counter, lock = roll_manager.unique_path(path)
        try:
            assert raced and (got, counter) == (path, 0)
            assert files.names_same_file(lock.fd, path)
        finally:
            lock.release()

    def test_writer_holds_and_releases_the_lock(self, tmp_path):
        manager = roll_manager.WritingRollManager(
            "a_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path))
        manager.write({"k": "v"}, b"x")
        path = manager.active_filename
        assert files.FileLock.try_acquire(path, create=False) is None
        manager.close()
        assert files.FileLock.try_acquire(path, create=False) is not None
        assert manager.take_lock(path) is None

    def test_keep_locks_hands_the_lock_on(self, tmp_path):
        manager = roll_manager.WritingRollManager(
            "a_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path), keep_locks=True)
        manager.write({"k": "v"}, b"x")
        path = manager.active_filename
        manager.close()
        assert files.FileLock.try_acquire(path, create=False) is None
        lock = manager.take_lock(path)
        assert files.names_same_file(lock.fd, path)
        lock.release()
        assert files.FileLock.try_acquire(path, create=False) is not None

    def test_sort_written_order(self, tmp_path):
        names = ["b.events", "a~2.events", "a~10.events.gz", "a.events"]
        for name in names:
            (tmp_path / name).write_bytes(b"")
            os.utime(tmp_path / name, ns=(5, 5))
        os.utime(tmp_path / "b.events", ns=(6, 6))
        got = roll_manager.sort_written_order(
            str(tmp_path / n) for n in names)
        assert [os.path.basename(p) for p in got] == [
            "a.events", "a~2.events", "a~10.events.gz", "b.events"]


class TestUniqueNames:
    """unique_names: a name is never made twice, whatever the clock."""

    def test_a_clock_stepped_back_repeats_no_name(self, tmp_path,
                                                  monkeypatch):
        # the wall clock goes 10 s forward, then steps back over them, and
        # each archive is deleted as soon as it is closed (shipped): the
        # folder holds nothing to warn of a name used before
        moments = [FROZEN + datetime.timedelta(seconds=s)
                   for s in list(range(10)) + list(range(10))]
        clock = iter(moments)
        monkeypatch.setattr(roll_manager, "utcnow", lambda: next(clock))
        memory = steps.MemoryCallback()
        chain = callbacks.CallbackChain([memory,
                                         steps.DeleteFileCallback()])
        checker = roll_checker.CountRollChecker(roll_count=1)
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path),
                archive_callback=chain, unique_names=True) as manager:
            write(manager, records(20))
        names = [os.path.basename(n) for e, n in memory.events
                 if e == "open"]
        assert len(names) == len(set(names)) == 20
        token = manager.token
        assert len(token) == 12 and int(token, 16) >= 0
        assert names[0] == "test_20240229_235959_%s-0.events" % token
        assert names[19] == "test_20240301_000008_%s-19.events" % token

    def test_a_new_manager_with_the_same_clock_repeats_no_name(
            self, tmp_path, frozen):
        # a restart: same host, same PID, same second
        made = set()
        for _ in range(3):
            memory = steps.MemoryCallback()
            chain = callbacks.CallbackChain([memory,
                                             steps.DeleteFileCallback()])
            with roll_manager.WritingRollManager(
                    SECOND, roll_checker.CountRollChecker(roll_count=1),
                    directory=str(tmp_path), archive_callback=chain,
                    unique_names=True) as manager:
                write(manager, records(2))
            made.update(n for e, n in memory.events if e == "open")
        assert len(made) == 6

    def test_off_by_default_and_in_written_order(self, tmp_path, frozen):
        checker = roll_checker.CountRollChecker(roll_count=2)
        with roll_manager.WritingRollManager(
                SECOND, checker, directory=str(tmp_path)) as manager:
            write(manager, records(2))
        assert manager.token is None
        assert os.listdir(tmp_path) == ["test_20240229_235959.events"]
        other = tmp_path / "unique"
        with roll_manager.WritingRollManager(
                SECOND, roll_checker.CountRollChecker(roll_count=1),
                directory=str(other), unique_names=True) as manager:
            write(manager, records(12))  # -10 sorts before -2 by name
        assert read_all("test_*.events", str(other)) == records(12)

    def test_where_the_template_says(self, tmp_path, frozen):
        template = "x_%Y{unique}_w.events"
        with roll_manager.WritingRollManager(
                template, roll_checker.CountRollChecker(roll_count=1),
                directory=str(tmp_path), unique_names=True) as manager:
            write(manager, records(1))
        assert os.listdir(tmp_path) == ["x_2024_%s-0_w.events"
                                        % manager.token]
        with roll_manager.WritingRollManager(
                template, roll_checker.CountRollChecker(roll_count=1),
                directory=str(tmp_path / "plain")) as manager:
            write(manager, records(1))
        assert os.listdir(tmp_path / "plain") == ["x_2024_w.events"]

    def test_with_unique(self):
        assert roll_manager.with_unique("a{unique}.b.c", "t") == "a_t.b.c"
        assert roll_manager.with_unique("x.events", "t-1") == "x_t-1.events"
        assert roll_manager.with_unique("d/x.y.gz", "*") == "d/x.y_*.gz"
        assert roll_manager.with_unique("plain", "t-1") == "plain_t-1"
        assert roll_manager.with_unique(".hidden", "t") == ".hidden_t"


class TestIndex:
    """With index_fields, each closed archive has its index beside it."""

    FIELDS = ("payload.instance_id", "_context_project_id")

    def manager(self, tmp_path, **kwargs):
        return roll_manager.WritingRollManager(
            "i_%Y.events", roll_checker.SizeRollChecker(roll_size_mb=1),
            directory=str(tmp_path), index_fields=self.FIELDS, **kwargs)

    def test_written_at_close_beside_the_archive(self, tmp_path,
                                                 monkeypatch):
        synced = []
        real_write = index_mod.write_file

        def write_file(path, data, mode=None):
            real_write(path, data, mode)
            synced.append(path)

        monkeypatch.setattr(index_mod, "write_file", write_file)
        old = os.umask(0o077)  # the archive's mode: the worker's file_mode
        try:
            manager = self.manager(tmp_path)
            manager.write({"timestamp": "2026-11-26 12:00:04.000000"}, b"{}",
                          ("i-0", None))
        finally:
            os.umask(old)
        os.chmod(manager.active_filename, 0o640)  # the index copies it
        stamps = ["2026-11-26 12:00:0%d.000000" % i for i in (5, 1, 9, 3)]
        for i, stamp in enumerate(stamps):
            manager.write({"timestamp": stamp}, b"{}",
                          ("i-%d" % i, "p" if i == 1 else None))
        path = manager.active_filename
        assert not os.path.exists(path + ".index")  # not before the roll
        report = manager.close()
        assert synced == [path + ".index"]
        assert sorted(os.listdir(tmp_path)) == [
            os.path.basename(path), os.path.basename(path) + ".index"]
        assert os.stat(path + ".index").st_mode & 0o777 == 0o640
        got = index_mod.read_file(path + ".index")
        assert (got.records, report.records) == (5, 5)
        assert (got.earliest, got.latest) == ("2026-11-26T12:00:01.000000Z",
                                              "2026-11-26T12:00:09.000000Z")
        assert all(got.may_contain("payload.instance_id", "i-%d" % i)
                   for i in range(4))
        assert got.may_contain("_context_project_id", "p")
        assert got.distinct == {"payload.instance_id": 4,
                                "_context_project_id": 1}

    def test_each_archive_its_own(self, tmp_path, frozen):
        manager = roll_manager.WritingRollManager(
            "i_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path), index_fields=self.FIELDS)
        manager.write({}, b"{}", ("a", None))
        first = manager.close()
        manager.write({}, b"{}", ("b", None))
        second = manager.close()
        one = index_mod.read_file(first.filename + ".index")
        two = index_mod.read_file(second.filename + ".index")
        assert (one.records, two.records) == (1, 1)
        assert one.distinct["payload.instance_id"] == 1
        assert two.may_contain("payload.instance_id", "b")

    def test_none_without_index_fields(self, tmp_path):
        manager = roll_manager.WritingRollManager(
            "i_%Y.events", roll_checker.NeverRollChecker(),
            directory=str(tmp_path))
        manager.write({}, b"{}")
        manager.close()
        assert [n for n in os.listdir(tmp_path) if n.endswith(".index")] \
            == []

    def test_none_after_a_cut(self, tmp_path):
        manager = self.manager(tmp_path)
        manager.write({}, b"{}", ("a", None))
        manager.sync()
        manager.write({}, b"{}", ("b", None))
        assert manager.cut_unsynced().records == 1
        assert [n for n in os.listdir(tmp_path) if n.endswith(".index")] \
            == []

    def test_an_index_that_cannot_be_written_is_a_warning(
            self, tmp_path, monkeypatch, caplog):
        def refuse(path, data, mode=None):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(index_mod, "write_file", refuse)
        manager = self.manager(tmp_path)
        manager.write({}, b"{}", ("a", None))
        path = manager.active_filename
        assert manager.close().records == 1
        assert os.listdir(tmp_path) == [os.path.basename(path)]
        assert "cannot write its index" in caplog.text
