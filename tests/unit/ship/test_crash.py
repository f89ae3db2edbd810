"""Crash consistency and hostile folders, step by step, in one process.

A "crash" is a step that does its work and then raises :class:`Killed`
(a BaseException, so nothing catches it) inside ``Shipper._ship``, called
in the test's thread: the state file stays as the dead process left it,
and its lock is released as the process exit would. A second Shipper then
recovers the folder, as the next start does.

A second worker on the same folder is a second Shipper in this process:
flock locks belong to an open file description, so two FileLocks on one
path conflict as two processes do. Their interleaving is forced at
``files._flock``, between the open of a lock's path and the check that
it still names the file locked.
"""

import fcntl
import gzip
import json
import logging
import os

import pytest

from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import compression
from shoebox_worker import files
from shoebox_worker.ship import shipper
from shoebox_worker.ship import steps

RECORDS = [({"n": str(i)}, b'{"i": %d}' % i) for i in range(5)]


class Killed(BaseException):
    """The process dies here."""


def write_archive(path, records=RECORDS):
    with archive.ArchiveWriter(str(path)) as writer:
        for metadata, payload in records:
            writer.write(metadata, payload)
    return str(path)


def records_of(path):
    with archive.ArchiveReader(path) as reader:
        return list(reader)


class FlockHook:
    """``files.fcntl``, with ``before(fd)`` run before each ``flock``."""

    def __init__(self, before):
        self.before = before

    def __getattr__(self, name):
        return getattr(fcntl, name)

    def flock(self, fd, operation):
        self.before(fd)
        fcntl.flock(fd, operation)


def is_archive(name):
    return name.endswith(".events")


class DiesAfter:
    """Runs ``inner``'s on_close, then the process dies (before the
    shipper hears of it). Declares what ``inner`` declares."""

    def __init__(self, inner):
        self.inner = inner
        if hasattr(inner, "output_path"):
            self.output_path = inner.output_path

    def on_close(self, filename):
        self.inner.on_close(filename)
        raise Killed()


class Seen(callbacks.ArchiveCallback):
    """Records the path it gets and the records there."""

    def __init__(self, log):
        self.log = log

    def output_path(self, filename):
        return filename

    def on_close(self, filename):
        self.log.append((filename, records_of(filename)))
        return filename


def die_in(ship, origin):
    """Run ``origin``'s job in this thread until the process "dies"; then
    release what the dead process held."""
    job = ship._jobs[origin]
    with pytest.raises(Killed):
        ship._ship(job)
    job.lock.release()


def recover(directory, chain):
    """The next start: recover ``directory``, ship all, stop."""
    ship = shipper.Shipper(callbacks.CallbackChain(chain), 0.01, 0.05)
    ship.recover(str(directory), is_archive)
    ship.start()
    try:
        assert ship.wait_idle(timeout=10)
    finally:
        ship.stop(5)
    return ship


STEPS = {
    "gzip": (lambda dest: steps.GzipCallback(), ".gz"),
    "change_extension": (lambda dest: steps.ChangeExtensionCallback(),
                         ".done"),
    "move": (lambda dest: steps.MoveFileCallback(
        destination_folder=str(dest)), ""),
}
if "zstd" in compression.CODECS:
    STEPS["zstd"] = (lambda dest: steps.ZstdCallback(), ".zst")


class TestKilledInsideAStep:

    @pytest.mark.parametrize("name", sorted(STEPS))
    @pytest.mark.parametrize("position", ["first", "after another"])
    def test_archive_not_stranded(self, tmp_path, name, position):
        # the step removed its input; the process died before the
        # shipper could say where the file went: the state file must
        # already know
        work, dest = tmp_path / "work", tmp_path / "dest"
        work.mkdir()
        make, suffix = STEPS[name]
        path = write_archive(work / "a.events")
        before = [] if position == "first" else [
            ("memory", steps.MemoryCallback())]
        seen = []
        after = [("seen", Seen(seen)), ("delete", steps.DeleteFileCallback())]
        ship = shipper.Shipper(callbacks.CallbackChain(
            before + [(name, DiesAfter(make(dest)))] + after))
        ship.submit(path)
        die_in(ship, path)
        assert not os.path.exists(path)  # the step did its work
        assert seen == []
        recover(work, before + [(name, make(dest))] + after)
        where = str(dest if name == "move" else work)
        assert seen == [(os.path.join(where, "a.events" + suffix),
                         RECORDS)]
        assert os.listdir(work) == []

    def test_delete_done_before_the_kill(self, tmp_path, caplog):
        path = write_archive(tmp_path / "a.events")
        ship = shipper.Shipper(callbacks.CallbackChain(
            [("delete", DiesAfter(steps.DeleteFileCallback()))]))
        ship.submit(path)
        die_in(ship, path)
        with caplog.at_level(logging.INFO):
            recover(tmp_path, [("delete", steps.DeleteFileCallback())])
        assert os.listdir(tmp_path) == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    def test_undeclared_step_that_renames_is_warned_about(self, tmp_path,
                                                          caplog):
        class Renames(callbacks.ArchiveCallback):
            def on_close(self, filename):
                os.rename(filename, filename + ".x")
                return filename + ".x"

        path = write_archive(tmp_path / "a.events")
        with caplog.at_level(logging.WARNING):
            recover(tmp_path, [("renames", Renames()),
                               ("delete", steps.DeleteFileCallback())])
        assert os.listdir(tmp_path) == []
        assert [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING] == [
            shipper.W_UNDECLARED % ("renames", path, path + ".x", path)]


class TestHostileStateFiles:

    def test_planted_state_pointing_outside_is_refused(self, tmp_path,
                                                       caplog):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        victim = outside / "precious"
        victim.write_bytes(b"not yours")
        planted = work / ("x.events" + shipper.STATE_SUFFIX)
        planted.write_text(json.dumps({"path": str(victim), "step": 0,
                                       "chain": ["delete"]}))
        with caplog.at_level(logging.ERROR):
            recover(work, [("delete", steps.DeleteFileCallback())])
        assert victim.read_bytes() == b"not yours"
        assert planted.exists()  # left alone, for an operator
        assert "refused" in caplog.text

    def test_planted_output_pointing_outside_is_not_followed(self,
                                                             tmp_path,
                                                             caplog):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        victim = outside / "precious"
        victim.write_bytes(b"not yours")
        (work / ("x.events" + shipper.STATE_SUFFIX)).write_text(json.dumps(
            {"path": str(work / "x.events"), "step": 0,
             "output": str(victim), "chain": ["delete", "delete"]}))
        both = [("delete", steps.DeleteFileCallback())] * 2
        with caplog.at_level(logging.ERROR):
            recover(work, both)
        assert victim.read_bytes() == b"not yours"
        state = work / ("x.events" + shipper.STATE_SUFFIX)
        assert [r.getMessage() for r in caplog.records] == [
            shipper.E_REFUSED % (state, victim, work),
            "%s: state says %s, which is gone; nothing to ship"
            % (state, work / "x.events")]

    def test_state_may_name_the_move_destination(self, tmp_path):
        work, dest = tmp_path / "work", tmp_path / "dest"
        work.mkdir()
        dest.mkdir()
        write_archive(dest / "x.events")  # moved, then the worker died
        (work / ("x.events" + shipper.STATE_SUFFIX)).write_text(json.dumps(
            {"path": str(dest / "x.events"), "step": 1,
             "chain": ["move", "seen"]}))
        seen = []
        recover(work, [("move", steps.MoveFileCallback(
            destination_folder=str(dest))), ("seen", Seen(seen))])
        assert seen == [(str(dest / "x.events"), RECORDS)]
        assert os.listdir(work) == []

    def test_symlinked_archive_is_not_shipped(self, tmp_path, caplog):
        work, outside = tmp_path / "work", tmp_path / "outside"
        work.mkdir()
        outside.mkdir()
        victim = outside / "precious"
        victim.write_bytes(b"not an archive, not yours" * 10)
        os.symlink(victim, work / "x.events")
        memory = steps.MemoryCallback()
        with caplog.at_level(logging.ERROR):
            recover(work, [("memory", memory)])
        assert memory.events == []
        assert victim.read_bytes() == b"not an archive, not yours" * 10
        assert "not a regular file" in caplog.text


class TestTemporaryFiles:

    @pytest.fixture
    def victim(self, tmp_path):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        return victim

    def test_symlink_at_the_state_tmp_name(self, tmp_path, victim):
        work = tmp_path / "work"
        work.mkdir()
        path = write_archive(work / "a.events")
        os.symlink(victim, path + shipper.STATE_SUFFIX + ".tmp")
        ship = shipper.Shipper(callbacks.CallbackChain(
            [("memory", steps.MemoryCallback())]))
        ship.submit(path)
        ship._jobs[path].lock.release()
        assert victim.read_bytes() == b"precious"
        with open(path + shipper.STATE_SUFFIX) as f:
            assert json.load(f)["path"] == path

    def test_symlink_at_the_gzip_tmp_name(self, tmp_path, victim):
        path = write_archive(tmp_path / "a.events")
        os.symlink(victim, path + ".gz.tmp")
        new = steps.GzipCallback().on_close(path)
        assert victim.read_bytes() == b"precious"
        assert not os.path.islink(new)
        assert records_of(new) == RECORDS
        assert sorted(os.listdir(tmp_path)) == ["a.events.gz", "victim"]

    def test_stale_gzip_tmp_is_replaced(self, tmp_path):
        path = write_archive(tmp_path / "a.events")
        with open(path + ".gz.tmp", "wb") as f:
            f.write(b"\x1f\x8b half of a gzip from a crash" * 100)
        new = steps.GzipCallback().on_close(path)
        assert records_of(new) == RECORDS
        assert os.listdir(tmp_path) == ["a.events.gz"]

    def test_two_gzips_of_one_file_never_share_a_tmp(self, tmp_path):
        path = write_archive(tmp_path / "a.events")
        other = files.create_temporary(path + ".gz.tmp")  # another's, live
        try:
            with pytest.raises(BlockingIOError):
                compression.compress_file(path, compression.CODECS["gzip"])
            assert files.names_same_file(other.fd, path + ".gz.tmp")
        finally:
            other.release()
        assert not os.path.exists(path + ".gz")

    @pytest.fixture
    def other_filesystem(self, monkeypatch):
        """os.link of an archive fails as across file systems."""
        link = os.link

        def cross_device(src, dst, **kwargs):
            if src.endswith(".events"):
                raise OSError(18, "Invalid cross-device link")
            return link(src, dst, **kwargs)

        monkeypatch.setattr(os, "link", cross_device)

    def test_move_replaces_its_stale_tmp(self, tmp_path, other_filesystem):
        path = write_archive(tmp_path / "a.events")
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "a.events.tmp").write_bytes(b"half a copy, from a crash")
        move = steps.MoveFileCallback(destination_folder=str(dest))
        new = move.on_close(path)
        assert records_of(new) == RECORDS
        assert os.listdir(dest) == ["a.events"]
        assert not os.path.exists(path)

    def test_move_killed_after_its_rename_resumes(self, tmp_path,
                                                  other_filesystem):
        path = write_archive(tmp_path / "a.events")
        dest = tmp_path / "dest"
        dest.mkdir()
        with open(path, "rb") as src, open(dest / "a.events", "wb") as dst:
            dst.write(src.read())  # copied, then killed before the unlink
        move = steps.MoveFileCallback(destination_folder=str(dest))
        assert move.on_close(path) == str(dest / "a.events")
        assert not os.path.exists(path)
        # another file of that name is still never overwritten
        write_archive(tmp_path / "a.events", RECORDS[:1])
        with pytest.raises(FileExistsError):
            move.on_close(path)
        assert records_of(str(dest / "a.events")) == RECORDS

    def test_move_tmp_through_a_symlink(self, tmp_path, other_filesystem,
                                        victim):
        path = write_archive(tmp_path / "a.events")
        dest = tmp_path / "dest"
        dest.mkdir()
        os.symlink(victim, dest / "a.events.tmp")
        steps.MoveFileCallback(destination_folder=str(dest)).on_close(path)
        assert victim.read_bytes() == b"precious"
        assert os.listdir(dest) == ["a.events"]


class TestTwoWorkersOneFolder:

    def test_state_replaced_while_the_other_takes_its_lock(
            self, tmp_path, monkeypatch):
        # B ships the archive; A's recovery opens its state file, and
        # before A's flock B replaces that file (its next step) and lets
        # go of the old one: A must see that its lock holds a file gone
        path = write_archive(tmp_path / "a.events")
        uploads = []

        class Upload(callbacks.ArchiveCallback):
            def output_path(self, filename):
                return filename

            def on_close(self, filename):
                with gzip.open(filename) as f:  # a corrupt gzip raises
                    uploads.append(f.read())
                return filename

        def chain():
            return callbacks.CallbackChain([
                ("gzip", steps.GzipCallback()), ("upload", Upload()),
                ("delete", steps.DeleteFileCallback())])

        b = shipper.Shipper(chain(), 0.01, 0.05)
        b.submit(path)
        b_job = b._jobs[path]
        state_path = path + shipper.STATE_SUFFIX
        forced = []

        def interleaved(fd):
            target = os.readlink("/proc/self/fd/%d" % fd)
            if target == state_path and not forced:
                forced.append(True)
                b_job.step = 1  # B goes on: its state file is replaced
                b_job.path = path + ".gz"
                b._save(b_job)

        monkeypatch.setattr(files, "fcntl", FlockHook(interleaved))
        a = shipper.Shipper(chain(), 0.01, 0.05)
        a.recover(str(tmp_path), is_archive)
        monkeypatch.setattr(files, "fcntl", fcntl)
        assert forced
        assert a.pending() == 0
        # B had gzipped for real before it saved step 1
        b_job.step, b_job.path = 0, path
        for ship in (a, b):
            ship.start()
        try:
            assert a.wait_idle(timeout=10) and b.wait_idle(timeout=10)
        finally:
            for ship in (a, b):
                ship.stop(5)
        assert len(uploads) == 1
        assert os.listdir(tmp_path) == []

    def test_both_recover_one_folder(self, tmp_path):
        paths = [write_archive(tmp_path / ("%d.events" % i))
                 for i in range(6)]
        seen = []
        chain = [("gzip", steps.GzipCallback()), ("seen", Seen(seen)),
                 ("delete", steps.DeleteFileCallback())]
        a = shipper.Shipper(callbacks.CallbackChain(chain), 0.01, 0.05)
        b = shipper.Shipper(callbacks.CallbackChain(chain), 0.01, 0.05)
        assert a.recover(str(tmp_path), is_archive) + \
            b.recover(str(tmp_path), is_archive) == len(paths)
        for ship in (a, b):
            ship.start()
        try:
            assert a.wait_idle(timeout=10) and b.wait_idle(timeout=10)
        finally:
            for ship in (a, b):
                ship.stop(5)
        assert sorted(p for p, _ in seen) == sorted(p + ".gz"
                                                    for p in paths)
        assert os.listdir(tmp_path) == []

    @staticmethod
    def before_the_archive_lock(monkeypatch, path, then):
        """Run ``then()`` once, just before a flock of ``path``."""
        forced = []

        def hook(fd):
            if not forced and os.readlink("/proc/self/fd/%d" % fd) == path:
                forced.append(True)
                then()

        monkeypatch.setattr(files, "fcntl", FlockHook(hook))
        return forced

    def test_finished_by_the_other_between_the_list_and_the_lock(
            self, tmp_path, monkeypatch):
        # A lists the folder (a.events: no state file, not done); B, its
        # writer, hands it over and finishes it (no step: it stays, listed
        # as done) before A's flock: A must look at the list again
        done = write_archive(tmp_path / "0.events")
        first = shipper.Shipper(callbacks.CallbackChain([]))
        first.submit(done)
        first._ship(first._jobs[done])  # the list exists before A looks
        path = write_archive(tmp_path / "a.events")
        left = write_archive(tmp_path / "b.events")  # a killed run's
        b = shipper.Shipper(callbacks.CallbackChain([]))

        def b_finishes():
            b.submit(path)
            b._ship(b._jobs[path])

        forced = self.before_the_archive_lock(monkeypatch, path, b_finishes)
        memory = steps.MemoryCallback()
        a = shipper.Shipper(callbacks.CallbackChain([("m", memory)]))
        assert a.recover(str(tmp_path), is_archive) == 1
        monkeypatch.setattr(files, "fcntl", fcntl)
        assert forced and b.pending() == 0
        assert list(a._jobs) == [left]  # not a.events again
        a._jobs[left].lock.release()

    def test_handed_over_between_the_two_looks_does_not_stop_the_rest(
            self, tmp_path, monkeypatch):
        path = write_archive(tmp_path / "a.events")
        left = write_archive(tmp_path / "b.events")
        b = shipper.Shipper(callbacks.CallbackChain(
            [("m", steps.MemoryCallback())]))
        forced = self.before_the_archive_lock(
            monkeypatch, path, lambda: b.submit(path))
        a = shipper.Shipper(callbacks.CallbackChain(
            [("m", steps.MemoryCallback())]))
        assert a.recover(str(tmp_path), is_archive) == 1
        monkeypatch.setattr(files, "fcntl", fcntl)
        assert forced
        assert list(a._jobs) == [left] and list(b._jobs) == [path]
        for ship in (a, b):
            for job in ship._jobs.values():
                job.lock.release()
