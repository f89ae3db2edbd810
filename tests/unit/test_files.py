"""Tests for shoebox_worker.files: FileLock, write_json_atomic,
fsync_directory and read_regular.

flock locks belong to an open file description, so "another process" is
played either by a second open of the path (a second FileLock) or by a real
subprocess.
"""

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from shoebox_worker import files

#: Bounds every subprocess in these tests.
TIMEOUT = 10.0

#: A process that takes the lock, says so, and holds it until stdin closes.
HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()
""")

#: A process that tries the lock once and prints what happened.
PROBE = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("held")
    else:
        print("free")
""")


def probe(path):
    """Whether another process can take the lock on ``path`` right now."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)],
                         capture_output=True, text=True, check=True,
                         timeout=TIMEOUT)
    return out.stdout.strip()


@pytest.fixture
def holder():
    """Starts a process holding the lock on a path; ends it at teardown."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class TestFileLock:

    def test_lock_creates_the_file_and_holds_it(self, tmp_path):
        path = tmp_path / "a.lock"
        lock = files.FileLock(str(path))
        assert path.exists()
        assert lock.path == str(path)
        assert os.fstat(lock.fd).st_ino == path.stat().st_ino
        assert probe(path) == "held"
        lock.release()
        assert probe(path) == "free"

    def test_lock_follows_a_replacement_during_the_flock(self, tmp_path,
                                                         monkeypatch):
        # the path is renamed over while the lock is being taken: what is
        # held must be the file the path names after, not the one gone
        path = tmp_path / "state"
        path.write_text("old")
        replaced = []

        class Replacing:
            def __getattr__(self, name):
                return getattr(fcntl, name)

            def flock(self, fd, operation):
                if not replaced:
                    replaced.append(True)
                    (tmp_path / "new").write_text("new")
                    os.rename(tmp_path / "new", path)
                fcntl.flock(fd, operation)

        monkeypatch.setattr(files, "fcntl", Replacing())
        lock = files.FileLock(str(path), create=False)
        monkeypatch.setattr(files, "fcntl", fcntl)
        try:
            assert replaced
            assert files.names_same_file(lock.fd, str(path))
            assert probe(path) == "held"
        finally:
            lock.release()

    def test_lock_never_follows_a_symlink(self, tmp_path):
        target = tmp_path / "target"
        target.write_text("x")
        os.symlink(target, tmp_path / "link")
        with pytest.raises(OSError):
            files.FileLock(str(tmp_path / "link"))
        assert probe(target) == "free"

    def test_second_open_in_the_same_process_is_refused(self, tmp_path):
        path = str(tmp_path / "a.lock")
        lock = files.FileLock(path)
        with pytest.raises(BlockingIOError):
            files.FileLock(path)
        assert files.FileLock.try_acquire(path) is None
        lock.release()
        again = files.FileLock.try_acquire(path)
        assert again is not None
        again.release()

    def test_held_by_another_process(self, tmp_path, holder):
        path = tmp_path / "a.lock"
        proc = holder(path)
        assert files.FileLock.try_acquire(str(path)) is None
        assert files.FileLock.try_acquire(str(path), create=False) is None
        with pytest.raises(BlockingIOError):
            files.FileLock(str(path))
        # the lock dies with its process
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)
        lock = files.FileLock.try_acquire(str(path), create=False)
        assert lock is not None
        lock.release()

    def test_refused_lock_closes_its_descriptor(self, tmp_path):
        path = str(tmp_path / "a.lock")
        lock = files.FileLock(path)
        before = open_fds()
        for _ in range(5):
            with pytest.raises(BlockingIOError):
                files.FileLock(path)
            assert files.FileLock.try_acquire(path) is None
        assert open_fds() == before
        lock.release()

    def test_missing_file_without_create(self, tmp_path):
        path = tmp_path / "gone.events"
        assert files.FileLock.try_acquire(str(path), create=False) is None
        with pytest.raises(FileNotFoundError):
            files.FileLock(str(path), create=False)
        assert not path.exists()

    def test_other_errors_are_not_swallowed(self, tmp_path):
        # only "held" and "no such file" mean None
        with pytest.raises(IsADirectoryError):
            files.FileLock.try_acquire(str(tmp_path))

    def test_release_is_idempotent(self, tmp_path):
        path = str(tmp_path / "a.lock")
        lock = files.FileLock(path)
        before = open_fds()
        lock.release()
        assert lock.fd is None
        assert open_fds() == before - 1
        lock.release()
        assert lock.fd is None
        assert open_fds() == before - 1
        assert probe(path) == "free"

    def test_a_with_block_holds_it_and_releases_it(self, tmp_path):
        path = str(tmp_path / "a.lock")
        with pytest.raises(RuntimeError):
            with files.FileLock(path) as lock:
                assert probe(path) == "held"
                raise RuntimeError("inside")
        assert lock.fd is None
        assert probe(path) == "free"

    def test_release_does_not_touch_the_file(self, tmp_path):
        path = tmp_path / "a.events"
        path.write_bytes(b"data")
        files.FileLock(str(path), create=False).release()
        assert path.read_bytes() == b"data"


class TestWriteJsonAtomic:

    def test_writes_and_returns_a_lock_on_the_new_file(self, tmp_path):
        path = tmp_path / "state.json"
        lock = files.write_json_atomic(str(path), {"a": [1, 2]})
        assert json.loads(path.read_text()) == {"a": [1, 2]}
        assert lock.path == str(path)
        assert os.fstat(lock.fd).st_ino == path.stat().st_ino
        assert files.FileLock.try_acquire(str(path)) is None
        assert probe(path) == "held"
        assert not (tmp_path / "state.json.tmp").exists()
        lock.release()
        assert probe(path) == "free"

    def test_replaces_by_rename_not_in_place(self, tmp_path):
        path = tmp_path / "state.json"
        path.write_text(json.dumps({"old": "x" * 1000}))
        old_inode = path.stat().st_ino
        with open(path) as reader:   # a reader of the old file
            files.write_json_atomic(str(path), {"new": 1}).release()
            assert json.loads(reader.read()) == {"old": "x" * 1000}
        assert path.stat().st_ino != old_inode
        assert json.loads(path.read_text()) == {"new": 1}

    def test_a_stale_longer_temporary_file_is_truncated(self, tmp_path):
        path = tmp_path / "state.json"
        (tmp_path / "state.json.tmp").write_text("x" * 4096)  # a crash's
        files.write_json_atomic(str(path), {"n": 1}).release()
        assert json.loads(path.read_text()) == {"n": 1}

    def test_old_lock_goes_with_the_replaced_file(self, tmp_path):
        path = tmp_path / "state.json"
        first = files.write_json_atomic(str(path), {"n": 1})
        # the holder of the old file does not stop a rewrite...
        second = files.write_json_atomic(str(path), {"n": 2})
        # ...and the new file is locked by the new lock only
        assert os.fstat(second.fd).st_ino == path.stat().st_ino
        assert os.fstat(first.fd).st_ino != path.stat().st_ino
        first.release()
        assert probe(path) == "held"
        second.release()
        assert probe(path) == "free"

    def test_data_is_fsynced_before_the_rename_then_the_directory(
            self, tmp_path, monkeypatch):
        path = tmp_path / "state.json"
        tmp = tmp_path / "state.json.tmp"
        seen = []
        fsync = os.fsync

        def spy(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                seen.append(("dir", os.fstat(fd).st_ino,
                             path.read_text() if path.exists() else None))
            else:
                seen.append(("file", tmp.exists() and tmp.read_text()))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", spy)
        files.write_json_atomic(str(path), {"n": 1}).release()
        assert seen == [("file", '{"n": 1}'),
                        ("dir", tmp_path.stat().st_ino, '{"n": 1}')]

    def test_failure_leaves_old_content_and_no_lock(self, tmp_path):
        path = tmp_path / "state.json"
        path.write_text('{"old": 1}')
        before = open_fds()
        with pytest.raises(TypeError):
            files.write_json_atomic(str(path), {"bad": object()})
        assert json.loads(path.read_text()) == {"old": 1}
        assert open_fds() == before
        assert probe(path) == "free"
        assert not (tmp_path / "state.json.tmp").exists()

    def test_failure_of_the_rename_releases_the_lock(
            self, tmp_path, monkeypatch):
        path = tmp_path / "state.json"
        path.write_text('{"old": 1}')

        def fail(src, dst):
            raise OSError("no rename today")

        monkeypatch.setattr(os, "replace", fail)
        before = open_fds()
        with pytest.raises(OSError, match="no rename today"):
            files.write_json_atomic(str(path), {"new": 1})
        assert json.loads(path.read_text()) == {"old": 1}
        assert open_fds() == before
        assert not (tmp_path / "state.json.tmp").exists()

    def test_concurrent_writer_holding_the_temporary_file(
            self, tmp_path, holder):
        path = tmp_path / "state.json"
        path.write_text('{"old": 1}')
        holder(tmp_path / "state.json.tmp")
        with pytest.raises(BlockingIOError):
            files.write_json_atomic(str(path), {"new": 1})
        assert json.loads(path.read_text()) == {"old": 1}


class TestWriteAtomic:
    def test_bytes_in_place_with_their_mode_and_no_lock_kept(self, tmp_path):
        path = str(tmp_path / "x.index")
        assert files.write_atomic(path, b"abc" * 100000, mode=0o640) is None
        assert open(path, "rb").read() == b"abc" * 100000
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert os.listdir(tmp_path) == ["x.index"]
        with open(path, "rb") as f:  # released: another may lock it
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_a_failed_write_leaves_the_old_file_and_no_temporary(
            self, tmp_path, monkeypatch):
        path = str(tmp_path / "x.index")
        files.write_atomic(path, b"old")

        def full(fd, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space"):
            files.write_atomic(path, b"new")
        monkeypatch.undo()
        assert open(path, "rb").read() == b"old"
        assert os.listdir(tmp_path) == ["x.index"]


class TestFsyncDirectory:

    @pytest.fixture
    def fsyncs(self, monkeypatch):
        seen = []
        fsync = os.fsync

        def spy(fd):
            st = os.fstat(fd)
            seen.append((stat.S_ISDIR(st.st_mode), st.st_ino))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", spy)
        return seen

    def test_fsyncs_the_directory_holding_the_path(self, tmp_path, fsyncs):
        sub = tmp_path / "sub"
        sub.mkdir()
        before = open_fds()
        files.fsync_directory(str(sub / "not-yet-there"))
        assert fsyncs == [(True, sub.stat().st_ino)]
        assert open_fds() == before

    def test_relative_path_is_the_current_directory(
            self, tmp_path, monkeypatch, fsyncs):
        monkeypatch.chdir(tmp_path)
        files.fsync_directory("a.events")
        assert fsyncs == [(True, tmp_path.stat().st_ino)]

    def test_closes_the_directory_when_fsync_fails(
            self, tmp_path, monkeypatch):
        def fail(fd):
            raise OSError("EIO")

        monkeypatch.setattr(os, "fsync", fail)
        before = open_fds()
        with pytest.raises(OSError, match="EIO"):
            files.fsync_directory(str(tmp_path / "a"))
        assert open_fds() == before

    def test_missing_directory(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            files.fsync_directory(str(tmp_path / "nowhere" / "a"))


def _read_only_folder(tmp_path):
    """A folder that refuses new files to this user: a chmod 555 one, or
    /sys for root (whom permission bits do not stop)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


class TestEnsureWritableDirectory:
    def test_creates_missing_folders_and_leaves_them_empty(self, tmp_path):
        path = tmp_path / "a" / "b"
        files.ensure_writable_directory(str(path))
        assert path.is_dir() and list(path.iterdir()) == []

    def test_an_existing_folder_is_left_as_it_was(self, tmp_path):
        (tmp_path / "kept").write_text("x")
        files.ensure_writable_directory(str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]

    def test_probe_of_a_killed_run_is_removed(self, tmp_path, holder):
        (tmp_path / (files.PROBE_PREFIX + "dead")).write_text("probe")
        live = tmp_path / (files.PROBE_PREFIX + "live")
        holder(live)  # another worker probing right now
        files.ensure_writable_directory(str(tmp_path))
        assert os.listdir(tmp_path) == [live.name]

    @pytest.mark.parametrize("where", ["under_a_file", "a_file", "proc"])
    def test_cannot_create(self, tmp_path, where):
        (tmp_path / "f").write_text("x")
        path = {"under_a_file": str(tmp_path / "f" / "sub"),
                "a_file": str(tmp_path / "f"),
                "proc": "/proc/shoebox-nope"}[where]
        with pytest.raises(OSError):
            files.ensure_writable_directory(path)

    def test_read_only_folder(self, tmp_path):
        path = _read_only_folder(tmp_path)
        before = os.listdir(path)
        with pytest.raises(OSError) as info:
            files.ensure_writable_directory(path)
        assert info.value.errno in (13, 30)  # EACCES, EROFS
        assert os.listdir(path) == before


class TestReadRegular:
    def test_reads_a_regular_file(self, tmp_path):
        path = tmp_path / "state"
        path.write_bytes(b"x" * 200000)
        assert files.read_regular(str(path)) == b"x" * 200000

    @pytest.mark.parametrize("make,kind,code", [
        (os.mkfifo, "a FIFO", errno.EINVAL),
        (os.mkdir, "a directory", errno.EINVAL),
        (lambda path: os.symlink(path + ".target", path),
         "a symlink (not followed)", errno.ELOOP),
    ])
    def test_refuses_what_is_not_one_without_waiting(self, tmp_path, make,
                                                     kind, code):
        path = str(tmp_path / "state")
        with open(path + ".target", "w") as f:
            f.write("{}")
        make(path)
        # a FIFO without a writer: a blocking open would never return
        with pytest.raises(OSError) as caught:
            files.read_regular(path)
        assert (caught.value.errno, caught.value.strerror,
                caught.value.filename) == (code, kind, path)

    def test_a_missing_file_is_file_not_found(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            files.read_regular(str(tmp_path / "none"))
