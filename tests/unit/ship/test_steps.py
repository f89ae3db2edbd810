"""Tests for shoebox_worker.ship.steps: the built-in steps of the chain."""

import os

import pytest
from stevedore import driver

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import contract
from shoebox_worker.ship import steps

RECORDS = [({"n": str(i)}, b"payload %d" % i) for i in range(100)]
MTIME_NS = 1_600_000_000_123_456_789


@pytest.fixture
def events_file(tmp_path):
    path = tmp_path / "x.events"
    with archive.ArchiveWriter(path) as writer:
        for metadata, payload in RECORDS:
            writer.write(metadata, payload)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return str(path)


def read(path):
    with archive.ArchiveReader(path) as reader:
        return list(reader)


class TestChangeExtension:
    @pytest.mark.parametrize("extension", [".done", "done"])
    def test_rename(self, events_file, extension):
        callback = steps.ChangeExtensionCallback(new_extension=extension)
        new = callback.on_close(events_file)
        assert new == events_file + ".done"
        assert not os.path.exists(events_file)
        assert read(new) == RECORDS

    def test_default_and_invalid(self):
        assert steps.ChangeExtensionCallback().new_extension == ".done"
        for bad in ("", ".", "a/b"):
            with pytest.raises(ValueError):
                steps.ChangeExtensionCallback(new_extension=bad)

    def test_refuses_to_overwrite(self, events_file):
        with open(events_file + ".done", "wb") as f:
            f.write(b"other")
        with pytest.raises(FileExistsError):
            steps.ChangeExtensionCallback().on_close(events_file)
        assert os.path.exists(events_file)
        assert open(events_file + ".done", "rb").read() == b"other"


class TestMove:
    def test_move(self, events_file, tmp_path):
        dest = tmp_path / "sub" / "dir"
        callback = steps.MoveFileCallback(destination_folder=str(dest))
        new = callback.on_close(events_file)
        assert new == str(dest / "x.events")
        assert not os.path.exists(events_file)
        assert read(new) == RECORDS
        assert os.stat(new).st_mtime_ns == MTIME_NS

    def test_same_folder_is_a_no_op(self, events_file, tmp_path):
        callback = steps.MoveFileCallback(destination_folder=tmp_path)
        assert callback.on_close(events_file) == events_file
        assert read(events_file) == RECORDS

    def test_refuses_to_overwrite(self, events_file, tmp_path):
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "x.events").write_bytes(b"other")
        callback = steps.MoveFileCallback(destination_folder=str(dest))
        with pytest.raises(FileExistsError):
            callback.on_close(events_file)
        assert read(events_file) == RECORDS
        assert (dest / "x.events").read_bytes() == b"other"

    def test_rerun_after_crash_between_link_and_unlink(self, events_file,
                                                      tmp_path):
        dest = tmp_path / "dest"
        dest.mkdir()
        os.link(events_file, dest / "x.events")  # the crash left both
        callback = steps.MoveFileCallback(destination_folder=str(dest))
        assert callback.on_close(events_file) == str(dest / "x.events")
        assert not os.path.exists(events_file)
        assert read(dest / "x.events") == RECORDS

    def test_across_filesystems(self, events_file, tmp_path, monkeypatch):
        def no_link(src, dst):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(steps.os, "link", no_link)
        dest = tmp_path / "dest"
        callback = steps.MoveFileCallback(destination_folder=str(dest))
        new = callback.on_close(events_file)
        assert read(new) == RECORDS
        assert os.stat(new).st_mtime_ns == MTIME_NS
        assert not os.path.exists(events_file)
        assert os.listdir(dest) == ["x.events"]
        # a second file of the same name is still refused
        with open(events_file, "wb") as f:
            f.write(b"second")
        with pytest.raises(FileExistsError):
            callback.on_close(events_file)
        assert sorted(os.listdir(dest)) == ["x.events"]
        assert open(events_file, "rb").read() == b"second"


class TestDelete:
    def test_delete_is_idempotent(self, events_file):
        callback = steps.DeleteFileCallback()
        assert callback.on_close(events_file) is None
        assert not os.path.exists(events_file)
        assert callback.on_close(events_file) is None  # already gone


class TestCompress:
    @pytest.mark.parametrize("cls,suffix", [
        (steps.GzipCallback, ".gz"), (steps.ZstdCallback, ".zst")])
    def test_compress(self, events_file, cls, suffix):
        callback = cls(level="3")
        assert callback.level == 3
        new = callback.on_close(events_file)
        assert new == events_file + suffix
        assert not os.path.exists(events_file)
        assert not os.path.exists(new + ".tmp")
        assert os.stat(new).st_mtime_ns == MTIME_NS
        assert compression.is_compressed(new)
        assert read(new) == RECORDS
        # already compressed (a retry after the remove): passed through
        assert callback.on_close(new) == new

    @pytest.mark.parametrize("cls", [steps.GzipCallback,
                                     steps.ZstdCallback])
    def test_crash_between_rename_and_remove(self, events_file, cls,
                                             monkeypatch):
        callback = cls()
        real_remove = os.remove

        def crash(path):
            raise KeyboardInterrupt("power cut")

        monkeypatch.setattr(steps.os, "remove", crash)
        with pytest.raises(KeyboardInterrupt):
            callback.on_close(events_file)
        assert os.path.exists(events_file)  # both exist now
        first = open(events_file + callback.codec.suffix, "rb").read()
        monkeypatch.setattr(steps.os, "remove", real_remove)

        new = callback.on_close(events_file)  # the retry
        assert new == events_file + callback.codec.suffix
        assert not os.path.exists(events_file)
        assert open(new, "rb").read() == first
        assert os.stat(new).st_mtime_ns == MTIME_NS
        assert read(new) == RECORDS

    def test_defaults(self):
        assert steps.GzipCallback().level == 6
        assert steps.GzipCallback(level="").level == 6
        assert steps.ZstdCallback().level == 3
        with pytest.raises(ValueError):
            steps.GzipCallback(level="fast")


class TestMemory:
    def test_records_and_fails(self):
        callback = steps.MemoryCallback(fail_times="2")
        callback.on_open("a")
        for _ in range(2):
            with pytest.raises(RuntimeError):
                callback.on_close("a")
        assert callback.on_close("a") == "a"
        assert callback.events == [("open", "a"), ("fail", "a"),
                                   ("fail", "a"), ("close", "a")]
        assert steps.MemoryCallback.all_events[-4:] == callback.events


@pytest.mark.parametrize("name,kwargs,cls", [
    ("change_extension", {"new_extension": ".done"},
     steps.ChangeExtensionCallback),
    ("move", {"destination_folder": "/tmp"}, steps.MoveFileCallback),
    ("delete", {}, steps.DeleteFileCallback),
    ("gzip", {"level": "9"}, steps.GzipCallback),
    ("zstd", {"level": "19"}, steps.ZstdCallback),
    ("memory", {"fail_times": "1"}, steps.MemoryCallback),
])
def test_load_by_name(name, kwargs, cls):
    manager = driver.DriverManager("shoebox.callbacks", name,
                                   invoke_on_load=True, invoke_kwds=kwargs)
    assert type(manager.driver) is cls
    assert isinstance(manager.driver, contract.ArchiveCallbackSpec)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError):
        steps.GzipCallback(levle="9")
    with pytest.raises(TypeError):
        steps.DeleteFileCallback(force="yes")
