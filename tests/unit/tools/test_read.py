"""Tests for shoebox_worker.tools.read (finding archives, rendering, cat,
verify), in process. The commands as a user runs them are in
tests/functional/test_tools_commands.py."""

import io
import json
import os
import re
import sys
import types

import pytest

from shoebox_worker import archive
from shoebox_worker import cli
from shoebox_worker import compression
from shoebox_worker import index as archive_index
from shoebox_worker import record
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker.consume import envelope
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import read


def write(path, records, version=2):
    with archive.ArchiveWriter(path, version=version) as writer:
        offsets = []
        for metadata, payload in records:
            offsets.append(writer.tell())
            writer.write(metadata, payload)
    return offsets


def notes(count, start=0):
    return [({"event_type": "compute.instance.update" if n % 2 else
              "compute.instance.exists", "n": str(n)},
             json.dumps({"n": n, "event_type": "x"}))
            for n in range(start, start + count)]


def run(argv, capsysbinary):
    code = cli.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


class TestRender:
    def test_json_payload_unchanged(self):
        payload = b'{"b": 1,  "a": [1, 2.50]}'
        assert read.render_record({}, payload) == payload + b"\n"

    def test_newlines_compacted_strings_kept(self):
        payload = b'{\n  "a": "x  y\\n z",\n  "b": [1,\n 2]\n}'
        line = read.render_record({}, payload)
        assert line == b'{"a":"x  y\\n z","b":[1,2]}\n'
        assert json.loads(line) == json.loads(payload)

    def test_escaped_quotes_in_strings(self):
        payload = b'{"a": "say \\"hi\\"  \\\\",\n "b": "\\\\"}'
        line = read.render_record({}, payload)
        assert json.loads(line) == json.loads(payload)
        assert b'"say \\"hi\\"  \\\\"' in line

    def test_big_integers_are_json(self):
        payload = b'{"a": 123456789012345678901234567890}'
        assert read.render_record({}, payload) == payload + b"\n"

    def test_not_json_becomes_a_string(self):
        assert json.loads(read.render_record({}, b"hello")) == "hello"
        assert json.loads(read.render_record({}, b"NaN")) == "NaN"
        assert json.loads(read.render_record({}, b"\xff\xfeok")) == \
            "\\xff\\xfeok"

    def test_with_metadata(self):
        line = read.render_record({"k": "v", "bad": "\udcff"}, b"[1]",
                                   with_metadata=True)
        assert json.loads(line) == {"metadata": {"k": "v", "bad": "\\xff"},
                                    "payload": [1]}
        assert line.count(b"\n") == 1


class TestFindArchives:
    def test_directory_recursive_written_order_archives_only(self, tmp_path):
        sub = tmp_path / "sub"
        sub.mkdir()
        paths = []
        for index, name in enumerate(["z.events", "sub/a.events",
                                      "m.events"]):
            path = str(tmp_path / name)
            write(path, notes(2, index * 2))
            os.utime(path, ns=(0, (index + 1) * 10**9))
            paths.append(path)
        gz = compression.compress_file(paths[2], compression.CODECS["gzip"])
        os.utime(gz, ns=(0, 4 * 10**9))
        (tmp_path / "notes.txt").write_text("not an archive")
        (tmp_path / "x.events.ship").write_text('{"step": 0}')
        (tmp_path / "log.gz").write_bytes(compression.gzip.compress(b"hi"))
        assert read.find_archives([str(tmp_path)]) == paths + [gz]

    def test_an_index_is_not_an_archive(self, tmp_path):
        path = str(tmp_path / "a.events")
        write(path, notes(2))
        # an index whose filter bytes hold a record marker
        builder = archive_index.Builder(("f",))
        builder.add(None, ("v",))
        data = bytearray(builder.to_bytes())
        data[-12:-8] = b"\x84\x78\x86\x69"
        (tmp_path / "a.events.index").write_bytes(bytes(data))
        assert read.find_archives([str(tmp_path)]) == [path]

    def test_damaged_first_record_still_found(self, tmp_path):
        path = tmp_path / "d.events"
        write(path, notes(3))
        data = bytearray(path.read_bytes())
        data[0:4] = b"XXXX"
        path.write_bytes(bytes(data))
        assert read.find_archives([str(tmp_path)]) == [str(path)]

    def test_files_in_given_order(self, tmp_path):
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        write(a, notes(1))
        write(b, notes(1))
        assert read.find_archives([b, a]) == [b, a]

    def test_missing_and_empty(self, tmp_path):
        with pytest.raises(ToolError, match="no such file"):
            read.find_archives([str(tmp_path / "nope")])
        with pytest.raises(ToolError, match="no archives"):
            read.find_archives([str(tmp_path)])


class TestCat:
    def test_versions_and_codecs(self, tmp_path, capsysbinary):
        write(tmp_path / "a.events", notes(3), version=1)
        write(tmp_path / "b.events", notes(2, 3))
        zst = compression.compress_file(str(tmp_path / "b.events"),
                                        compression.CODECS["zstd"])
        code, out, err = run(["cat", str(tmp_path / "a.events"), zst],
                             capsysbinary)
        assert (code, err) == (0, "")
        assert [json.loads(line)["n"] for line in out.splitlines()] == \
            [0, 1, 2, 3, 4]

    def test_metadata_and_match(self, tmp_path, capsysbinary):
        write(tmp_path / "a.events", notes(6))
        code, out, _ = run(["cat", "--metadata", "--match",
                            "event_type=*.update", "--match", "n=[135]",
                            str(tmp_path / "a.events")], capsysbinary)
        assert code == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["metadata"]["n"] for line in lines] == ["1", "3", "5"]
        assert lines[0]["payload"] == {"n": 1, "event_type": "x"}

    def test_since_until_where_dedup(self, tmp_path, capsysbinary):
        records = [({"timestamp": "2024-03-09 10:%02d:00" % n,
                     "message_id": "m%d" % (n % 4)},
                    json.dumps({"n": n, "payload": {"odd": n % 2}}))
                   for n in range(10)]
        records.append(({"message_id": "untimed"}, "{}"))
        write(tmp_path / "a.events", records)
        code, out, err = run(["cat", "--since", "2024-03-09T10:02:00",
                              "--until", "2024-03-09T10:08:00", "--where",
                              "payload.odd=1", "--dedup",
                              str(tmp_path / "a.events")], capsysbinary)
        assert code == 0
        # 3, 5, 7 in the window and odd; 7 repeats 3's message_id
        assert [json.loads(line)["n"] for line in out.splitlines()] == [3, 5]
        assert err == ("shoebox-worker: 1 record without a usable timestamp "
                       "left out by --since/--until\n"
                       "shoebox-worker: 1 duplicate dropped by --dedup\n")

    def test_no_selection_costs_nothing_per_record(self, tmp_path,
                                                   capsysbinary,
                                                   monkeypatch):
        made = []
        real = read.select.Selection._make_keep

        def spy(self):
            keep = real(self)

            def counted(metadata, payload):
                made.append(1)
                return keep(metadata, payload)
            return counted

        monkeypatch.setattr(read.select.Selection, "_make_keep", spy)
        write(tmp_path / "a.events", notes(5))
        code, out, _ = run(["cat", str(tmp_path / "a.events")], capsysbinary)
        assert code == 0 and len(out.splitlines()) == 5 and made == []
        run(["cat", "--dedup", str(tmp_path / "a.events")], capsysbinary)
        assert len(made) == 5

    TRICKY = [b'{"a": 1}', b'{\n "a": [1,\n 2]}', b'"\\ud800"', b"1e400",
              b'{"a":1,}', b"\xff\xfe", b"[1]x", b"NaN", b'{"a":1,"a":2}',
              b'{"big": 123456789012345678901234567890}', b"", b"  7 ",
              b'{"t": "\x01"}', b"[" * 600 + b"]" * 600]

    @pytest.mark.parametrize("fast", [True, False])
    def test_output_is_render_record_whichever_validates(
            self, tmp_path, capsysbinary, monkeypatch, fast):
        if not fast:
            monkeypatch.setattr(read, "simdjson", None)
        write(tmp_path / "a.events", [({}, p) for p in self.TRICKY])
        code, out, _ = run(["cat", str(tmp_path / "a.events")], capsysbinary)
        assert code == 0
        assert out == b"".join(read.render_record({}, p)
                               for p in self.TRICKY)

    def test_missing_key_does_not_match(self, tmp_path, capsysbinary):
        write(tmp_path / "a.events", notes(2))
        code, out, _ = run(["cat", "--match", "nope=*",
                            str(tmp_path / "a.events")], capsysbinary)
        assert (code, out) == (0, b"")

    def test_big_output_in_chunks(self, tmp_path, capsysbinary, monkeypatch):
        monkeypatch.setattr(read, "OUTPUT_CHUNK", 100)
        write(tmp_path / "a.events", notes(50))
        code, out, _ = run(["cat", str(tmp_path / "a.events")],
                           capsysbinary)
        assert code == 0 and len(out.splitlines()) == 50

    def test_damage_stops_with_one_line(self, tmp_path, capsysbinary):
        path = tmp_path / "a.events"
        offsets = write(path, notes(4))
        data = bytearray(path.read_bytes())
        data[offsets[2] + 30] ^= 0xFF
        path.write_bytes(bytes(data))
        code, out, err = run(["cat", str(path)], capsysbinary)
        assert code == 1
        assert len(out.splitlines()) == 2  # the records before it
        assert err.count("\n") == 1
        assert "offset %d" % offsets[2] in err and "--salvage" in err
        code, out, err = run(["cat", "--salvage", str(path)], capsysbinary)
        assert code == 0
        assert [json.loads(x)["n"] for x in out.splitlines()] == [0, 1, 3]
        assert "skipped damaged bytes %d-%d" % (offsets[2], offsets[3]) \
            in err

    def test_broken_pipe_is_quiet(self, tmp_path, monkeypatch):
        write(tmp_path / "a.events", notes(3))

        class Closed(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                raise BrokenPipeError(32, "Broken pipe")

            def fileno(self):
                return fd

        fd = os.open(os.devnull, os.O_WRONLY)
        monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(
            buffer=Closed(), flush=lambda: None))
        try:
            assert cli.main(["cat", str(tmp_path / "a.events")]) == \
                read.EXIT_BROKEN_PIPE
        finally:
            os.close(fd)


class TestVerify:
    def test_ok(self, tmp_path):
        path = str(tmp_path / "a.events")
        write(path, notes(3), version=1)
        report, salvaged_to = read.verify_file(path)
        assert report.ok and report.records == 3 and salvaged_to is None
        assert read.report_line(report) == (
            "%s: OK: 3 records, %d bytes, version 1" % (
                path, os.path.getsize(path)))

    def test_damage_and_torn_tail(self, tmp_path):
        path = str(tmp_path / "a.events")
        pieces = ([record.pack(m, p, 1) for m, p in notes(3)]
                  + [record.pack(m, p, 2) for m, p in notes(3, 3)])
        offsets = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
        data = bytearray(b"".join(pieces)[:-10])  # the last one is torn
        data[offsets[1] + 2] ^= 0x01  # no marker: bad bytes
        with open(path, "wb") as f:
            f.write(data)
        size = len(data)
        report, _ = read.verify_file(path)
        assert not report.ok
        assert report.records == 4  # 0, 2 (v1), 3, 4 (v2)
        assert report.versions == {1, 2}
        assert [(s.start, s.end) for s in report.skipped] == [
            (offsets[1], offsets[2]), (offsets[5], size)]
        assert report.torn_offset == offsets[5]
        line = read.report_line(report)
        assert "DAMAGED: 4 records, %d bytes, versions 1, 2" % size in line
        assert "bad bytes %d-%d" % (offsets[1], offsets[2]) in line
        assert "torn tail at offset %d (%d bytes" % (
            offsets[5], size - offsets[5]) in line

    def test_salvage_keeps_versions(self, tmp_path):
        path = str(tmp_path / "a.events")
        offsets = write(path, notes(3), version=1)
        with open(path, "ab") as out:
            out.write(record.pack({"n": "3"}, b"{}", 2))
            out.write(b"\x84\x78\x86\x69\x02\x00torn")
        data = bytearray(open(path, "rb").read())
        data[offsets[1] + 7] ^= 0x01  # v1 header: end-of-header marker
        open(path, "wb").write(bytes(data))
        report, salvaged_to = read.verify_file(path, salvage=True)
        assert salvaged_to == path + ".salvaged"
        expected = (record.pack(*notes(1)[0], 1)
                    + record.pack(*notes(1, 2)[0], 1)
                    + record.pack({"n": "3"}, b"{}", 2))
        with open(salvaged_to, "rb") as f:
            assert f.read() == expected
        assert "3 good records written to %s" % salvaged_to in \
            read.report_line(report, salvaged_to)
        assert read.verify_file(salvaged_to)[0].ok

    def test_no_salvaged_copy_when_ok(self, tmp_path):
        path = str(tmp_path / "a.events")
        write(path, notes(1))
        assert read.verify_file(path, salvage=True)[1] is None
        assert not os.path.exists(path + ".salvaged")

    def test_command_exit_codes(self, tmp_path, capsys):
        good = str(tmp_path / "good.events")
        write(good, notes(2))
        assert cli.main(["verify", good]) == 0
        assert capsys.readouterr().out.startswith(good + ": OK")
        assert cli.main(["verify", good, str(tmp_path / "missing")]) == 1
        out, err = capsys.readouterr()
        assert "OK" in out and "missing: no such file" in err


class TestNotAnArchive:
    """A file with no record in it: saying so, not the salvage hint."""

    TEXT = b"# README\n\nnot an archive at all\n" * 100

    @pytest.fixture(params=["plain", "gz"])
    def text_file(self, request, tmp_path):
        path = tmp_path / "README.md"
        if request.param == "gz":
            path = tmp_path / "README.md.gz"
            import gzip
            path.write_bytes(gzip.compress(self.TEXT))
        else:
            path.write_bytes(self.TEXT)
        return str(path)

    @pytest.mark.parametrize("argv", [["cat"], ["cat", "--salvage"],
                                      ["verify"], ["verify", "--salvage"]])
    def test_said_in_one_line(self, text_file, capsys, argv):
        assert cli.main(argv + [text_file]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            "shoebox-worker: %s: not a shoebox archive (no record in it); "
            "check the path: cat, verify and replay read the worker's "
            "archives (plain, .gz or .zst)\n" % text_file)
        assert not os.path.exists(text_file + ".salvaged")

    @pytest.mark.parametrize("salvage", [False, True])
    def test_read_records(self, text_file, salvage):
        with pytest.raises(ToolError, match="not a shoebox archive"):
            list(read.read_records(text_file, salvage=salvage))

    def test_a_marker_past_the_first_block_is_damage(self, tmp_path,
                                                     monkeypatch, capsys):
        # garbage first, then a record: --salvage helps, so say that
        monkeypatch.setattr(read, "OUTPUT_CHUNK", 64)
        good = tmp_path / "good.events"
        write(good, notes(1))
        path = tmp_path / "a.events"
        path.write_bytes(self.TEXT + good.read_bytes())
        assert cli.main(["cat", str(path)]) == 1
        err = capsys.readouterr().err
        assert "not a shoebox archive" not in err
        assert "use --salvage" in err
        assert cli.main(["cat", "--salvage", str(path)]) == 0

    def test_a_damaged_first_record_is_damage(self, tmp_path, capsys):
        path = tmp_path / "a.events"
        write(path, notes(1))
        data = bytearray(path.read_bytes())
        data[30] ^= 0xFF
        path.write_bytes(bytes(data))
        assert cli.main(["cat", str(path)]) == 1
        err = capsys.readouterr().err
        assert "offset 0" in err and "use --salvage" in err
        assert cli.main(["verify", str(path)]) == 1
        out, err = capsys.readouterr()
        assert "DAMAGED" in out and err == ""

    def test_empty_file_is_an_empty_archive(self, tmp_path, capsys):
        path = tmp_path / "empty.events"
        path.write_bytes(b"")
        assert cli.main(["verify", str(path)]) == 0
        assert ": OK: 0 records" in capsys.readouterr().out


def damaged_archive(path):
    """An archive with one bad record in the middle; returns the bytes a
    salvaged copy holds."""
    pieces = [record.pack(m, p) for m, p in notes(3)]
    data = bytearray(b"".join(pieces))
    data[len(pieces[0]) + 30] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    return pieces[0] + pieces[2]


class TestSalvagedCopy:
    def test_symlink_planted_at_the_temporary_name_is_not_followed(
            self, tmp_path):
        path = str(tmp_path / "a.events")
        expected = damaged_archive(path)
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        os.symlink(victim, path + ".salvaged.tmp")
        report, salvaged_to = read.verify_file(path, salvage=True)
        assert victim.read_bytes() == b"precious"
        assert not os.path.islink(salvaged_to)
        with open(salvaged_to, "rb") as f:
            assert f.read() == expected
        assert not os.path.lexists(path + ".salvaged.tmp")

    def test_symlink_at_the_final_name_is_replaced(self, tmp_path):
        path = str(tmp_path / "a.events")
        expected = damaged_archive(path)
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        os.symlink(victim, path + ".salvaged")
        read.verify_file(path, salvage=True)
        assert victim.read_bytes() == b"precious"
        assert not os.path.islink(path + ".salvaged")
        with open(path + ".salvaged", "rb") as f:
            assert f.read() == expected

    def test_stale_temporary_file_is_replaced(self, tmp_path):
        path = str(tmp_path / "a.events")
        expected = damaged_archive(path)
        with open(path + ".salvaged.tmp", "wb") as f:
            f.write(b"left by a crash" * 1000)
        read.verify_file(path, salvage=True)
        with open(path + ".salvaged", "rb") as f:
            assert f.read() == expected
        assert os.stat(path + ".salvaged").st_mode & 0o777 == 0o600

    def test_temporary_name_made_again_and_again_gives_up(
            self, tmp_path, monkeypatch):
        path = str(tmp_path / "a.events")
        damaged_archive(path)
        tmp = path + ".salvaged.tmp"
        real_unlink = os.unlink

        def unlink(name):  # someone makes the link again at once
            real_unlink(name)
            os.symlink("/nonexistent", name)

        os.symlink("/nonexistent", tmp)
        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(ToolError, match="cannot write: File exists"):
            read.verify_file(path, salvage=True)
        assert os.readlink(tmp) == "/nonexistent"

    def test_directory_at_the_temporary_name_is_one_line(self, tmp_path):
        path = str(tmp_path / "a.events")
        damaged_archive(path)
        os.mkdir(path + ".salvaged.tmp")
        with pytest.raises(ToolError, match="a.events.salvaged: cannot "
                                            "write"):
            read.verify_file(path, salvage=True)


class TestSalvageIsStreamed:
    def test_the_good_records_are_not_kept_until_the_end(self, tmp_path):
        """verify --salvage writes each good record as it finds it: what
        it holds does not grow with the archive (16 MiB of records here;
        the reader's own buffers take about 4 MiB whatever the size)."""
        import tracemalloc
        path = str(tmp_path / "big.events")
        pad = "x" * 16000
        pieces = [record.pack({"n": str(n)}, b'{"pad": "%s"}' % pad.encode())
                  for n in range(1024)]
        data = bytearray(b"".join(pieces))
        data[len(pieces[0]) + 30] ^= 0x01  # the second record damaged
        with open(path, "wb") as f:
            f.write(data)
        del data
        tracemalloc.start()
        try:
            report, salvaged_to = read.verify_file(path, salvage=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.records == 1023 and salvaged_to == path + ".salvaged"
        assert os.path.getsize(salvaged_to) == sum(map(len, pieces)) - len(
            pieces[1])
        assert peak < 8 << 20, peak

    def test_an_archive_found_ok_leaves_no_file(self, tmp_path):
        path = str(tmp_path / "a.events")
        write(path, notes(3))
        assert read.verify_file(path, salvage=True)[1] is None
        assert sorted(os.listdir(tmp_path)) == ["a.events"]

    def test_a_failed_read_leaves_no_temporary(self, tmp_path):
        path = str(tmp_path / "a.events")
        damaged_archive(path)
        item = read.sources.item_of(path)
        data = open(path, "rb").read()
        item.open = lambda: _Failing(data[:-5], OSError(5, "Input/output "
                                                        "error"))
        with pytest.raises(ToolError, match="cannot read"):
            read.verify_file(item, salvage=True)
        assert sorted(os.listdir(tmp_path)) == ["a.events"]


class MemorySwift(read.sources.Swift):
    """A :class:`~shoebox_worker.tools.sources.Swift` of objects in a
    dict."""

    def __init__(self, objects):
        super().__init__()
        self.objects = objects

    def connection(self):
        objects = self.objects

        class Connection:
            url = token = None

            def get_object(self, container, obj, resp_chunk_size=None):
                return {}, _Body(objects[obj])

        return Connection()


class _Body(list):
    def __init__(self, data):
        super().__init__([bytes(data)])

    def close(self):
        pass


def test_verify_salvage_goes_on_past_an_object_name_holding_nul(
        tmp_path, monkeypatch, capsys):
    """A listed name with NUL cannot name a local file: that object is one
    line, and the rest of the listing is verified and salvaged."""
    monkeypatch.chdir(tmp_path)
    expected = damaged_archive(str(tmp_path / "damaged"))
    bad = (tmp_path / "damaged").read_bytes()
    os.unlink(tmp_path / "damaged")
    names = ["a\0b.events", "c\0\n.events", "d.events"]
    swift = MemorySwift(dict.fromkeys(names, bad))
    items = [read.sources.SwiftItem(swift, "c", name, size=len(bad),
                                    listed=True) for name in names]
    monkeypatch.setattr(read, "swift_of", lambda args: swift)
    monkeypatch.setattr(read.sources, "find", lambda specs, **kw: items)
    assert cli.main(["verify", "--salvage", "swift://c"]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines == [
        "shoebox-worker: a\\x00b.events.salvaged: cannot write: embedded "
        "null byte",
        "shoebox-worker: c\\x00\\n.events.salvaged: cannot write: "
        "embedded null byte"]
    assert "swift://c/d.events: DAMAGED: 2 records" in out
    assert (tmp_path / "d.events.salvaged").read_bytes() == expected
    assert sorted(os.listdir(tmp_path)) == ["d.events.salvaged"]


class _Failing(io.RawIOBase):
    """A stream that gives a few bytes, then raises ``error``."""

    def __init__(self, data, error):
        self.data, self.error = data, error

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.data:
            raise self.error
        n = min(len(buffer), len(self.data))
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


# the reader's own words for no memory, or read.py's for an I/O error
CANNOT_READ = (r"a\.events(: cannot read: Input/output error|, offset \d+: "
               r"a record of \d+ bytes starts here: more than this process "
               r"can hold in memory)")


class TestReadErrorsAreOneLine:
    """An I/O error or no memory while reading: a ToolError naming the
    file, from verify, verify --salvage and cat (and replay's reader)."""

    @pytest.fixture(params=[OSError(5, "Input/output error"), MemoryError()],
                    ids=["EIO", "memory"])
    def failing(self, request, tmp_path, monkeypatch):
        path = str(tmp_path / "a.events")
        write(path, notes(3))
        head = record.pack(*notes(1)[0])
        monkeypatch.setattr(
            compression, "open_read",
            lambda p: io.BufferedReader(_Failing(head, request.param), 64))
        return path

    @pytest.mark.parametrize("salvage", [False, True])
    def test_verify(self, failing, salvage):
        with pytest.raises(ToolError, match=CANNOT_READ):
            read.verify_file(failing, salvage=salvage)

    @pytest.mark.parametrize("salvage", [False, True])
    def test_read_records(self, failing, salvage):
        with pytest.raises(ToolError, match=CANNOT_READ):
            list(read.read_records(failing, salvage))

    @pytest.mark.parametrize("salvage", [False, True])
    def test_cat(self, failing, salvage, capsysbinary):
        argv = ["cat", failing] + (["--salvage"] if salvage else [])
        assert cli.main(argv) == 1
        err = capsysbinary.readouterr().err.decode()
        assert err.count("\n") == 1 and err.startswith("shoebox-worker: ")
        assert re.search(CANNOT_READ, err)

    def test_record_too_big_for_memory_in_verify(self, tmp_path,
                                                 monkeypatch):
        path = str(tmp_path / "a.events")
        write(path, notes(2))
        monkeypatch.setattr(record, "READ_CHUNK", 16)
        real_fill = record._Walk._fill

        def fill(self, need):
            if need > 1000:
                raise MemoryError
            return real_fill(self, need)

        big = record.pack({"k": "v"}, b"x" * 5000)
        with open(path, "ab") as f:
            f.write(big)
        monkeypatch.setattr(archive, "READ_CHUNK", 16)
        monkeypatch.setattr(record._Walk, "_fill", fill)
        with pytest.raises(ToolError):
            read.verify_file(path, salvage=True)


class TestOneBadArchiveAmongOthers:
    """A damaged or missing archive is one line; the ones after it are
    still read, and the command exits 1."""

    @pytest.fixture
    def three(self, tmp_path):
        paths = [str(tmp_path / ("%d.events" % n)) for n in range(3)]
        for n, path in enumerate(paths):
            write(path, notes(4, start=10 * n))
        with open(paths[1], "r+b") as f:  # the third record's marker
            f.seek(write(str(tmp_path / "x.events"), notes(4, 10))[2])
            f.write(b"\0\0\0\0")
        return paths

    def test_cat_goes_on(self, three, capsysbinary):
        code, out, err = run(["cat", *three], capsysbinary)
        assert code == 1
        assert [json.loads(line)["n"] for line in out.splitlines()] == [
            0, 1, 2, 3, 10, 11, 20, 21, 22, 23]
        assert err.count("\n") == 1 and "1.events, offset" in err

    def test_verify_goes_on(self, three, capsysbinary):
        code, out, err = run(["verify", *three], capsysbinary)
        assert code == 1 and err == ""
        assert [line.split(": ")[1] for line in out.decode().splitlines()] \
            == ["OK", "DAMAGED", "OK"]

    def test_read_all_reports_and_goes_on(self, three):
        errors = []
        items = read.find_archives(three)
        got = [m["n"] for m, _ in read.read_all(items, False, 4,
                                                 errors.append)]
        assert got == ["0", "1", "2", "3", "10", "11", "20", "21", "22",
                       "23"]
        [error] = errors
        assert isinstance(error, ToolError) and "1.events" in str(error)

    def test_a_file_in_a_directory_that_is_not_an_archive_is_skipped(
            self, tmp_path, capsysbinary):
        write(str(tmp_path / "a.events"), notes(2))
        (tmp_path / "notes.txt").write_text("hello\n")
        code, out, err = run(["cat", str(tmp_path)], capsysbinary)
        assert (code, err) == (0, "") and out.count(b"\n") == 2


class TestAGlobOfAnArchiveFolder:
    """``verify var/archive/*``: the natural glob after ``ls var/archive``
    names each archive's ``.index`` too."""

    @pytest.fixture
    def folder(self, tmp_path):
        from shoebox_worker import roll_checker
        from shoebox_worker import roll_manager
        manager = roll_manager.WritingRollManager(
            "a_%Y%m%dT%H%M%S.events", roll_checker.CountRollChecker(
                roll_count=3), directory=str(tmp_path), unique_names=True,
            index_fields=archive_index.DEFAULT_FIELDS)
        for metadata, payload in notes(6):
            manager.write(metadata, payload)
        manager.close()
        names = sorted(os.listdir(tmp_path))
        assert [n.endswith(".index") for n in names] == [False, True] * 2
        return tmp_path, [str(tmp_path / n) for n in names]

    @pytest.mark.parametrize("command", ["verify", "cat"])
    def test_the_index_files_are_skipped(self, folder, capsysbinary,
                                         command):
        _, paths = folder
        code, out, err = run([command] + paths, capsysbinary)
        assert (code, err) == (0, "")
        if command == "verify":
            assert [line.split(": ")[1] for line in
                    out.decode().splitlines()] == ["OK"] * 2
        else:
            assert len(out.splitlines()) == 6

    def test_an_index_alone_is_one_line(self, folder, capsysbinary):
        _, paths = folder
        code, out, err = run(["verify", paths[1]], capsysbinary)
        assert (code, out) == (1, b"")
        assert err == ("shoebox-worker: %s: an archive's index, not an "
                       "archive: name the archive (without .index) or its "
                       "folder\n" % paths[1])


def worker_write(directory, bodies, name="issue20_%Y%m%d%H%M%S.events"):
    """Archive message ``bodies`` as the worker does (its envelope reading,
    the default index fields, the index beside the archive, bound to it as
    the shipper binds it); the archive's path."""
    unwrap = envelope.Unwrapper(index_fields=archive_index.DEFAULT_FIELDS)
    manager = roll_manager.WritingRollManager(
        name, roll_checker.NeverRollChecker(), directory=str(directory),
        index_fields=archive_index.DEFAULT_FIELDS)
    for body in bodies:
        payload, metadata, values = unwrap(body, "q", "rk")
        manager.write(metadata, payload, values)
    path = manager.active_filename
    manager.close()
    assert archive_index.bind_file(path)
    return path


def cat_with_and_without_index(directory, argv, capsysbinary):
    """The lines ``cat argv DIR`` prints with the archives' indexes, and
    with them removed."""
    code, with_index, err = run(["cat"] + argv + [str(directory)],
                                capsysbinary)
    assert code == 0, err
    for path in directory.glob("*" + archive_index.SUFFIX):
        path.unlink()
    code, without, err = run(["cat"] + argv + [str(directory)],
                             capsysbinary)
    assert code == 0, err
    return with_index.splitlines(), without.splitlines()


class TestTheIndexReadsAsCatDoes:
    """Issue 20's reproductions: what ``cat`` selects without an archive's
    index, it selects with it."""

    def test_since_finds_a_timestamp_with_an_offset(self, tmp_path,
                                                    capsysbinary):
        # 26 characters with a space at 10, as oslo's own form, but with
        # an offset: 2024-03-02T00:00:00.1Z
        stamps = ["2024-03-01 10:00:00.000000", "2024-03-01 12:00:00.1-1200",
                  "2024-03-01 13:00:00.000000"]
        worker_write(tmp_path, [envelope.wrap({
            "event_type": "compute.instance.exists", "timestamp": stamp,
            "message_id": "m%d" % n}) for n, stamp in enumerate(stamps)])
        with_index, without = cat_with_and_without_index(
            tmp_path, ["--since", "2024-03-01T20:00:00"], capsysbinary)
        assert [json.loads(line)["message_id"] for line in without] == ["m1"]
        assert with_index == without

    def test_where_finds_what_the_reader_reads(self, tmp_path, capsysbinary):
        bodies = [
            # a repeated key: the reader takes the last
            b'{"event_type": "e", "message_id": "m0", "payload": '
            b'{"instance_id": "AAA", "instance_id": "BBB"}}',
            # bodies orjson refuses and json reads
            b'{"event_type": "e", "message_id": "m1", "payload": '
            b'{"instance_id": "BBB", "name": "\\ud800"}}',
            b'{"event_type": "e", "message_id": "m2", "payload": '
            b'{"instance_id": "BBB", "size": 1e400}}',
        ]
        worker_write(tmp_path, bodies)
        with_index, without = cat_with_and_without_index(
            tmp_path, ["--where", "payload.instance_id=BBB"], capsysbinary)
        assert len(without) == 3
        assert with_index == without


class TestAnIndexBesideAFileThatIsNotItsOwn:
    """``cat --where``/``--since`` of a folder whose archives' ``.index``
    files do not describe them: one claiming no values and no time (as a
    hostile one may), one left from the archive's bytes before they were
    replaced (stale). Neither may hide a record: each is one warning and
    its archive is read."""

    TARGET = "i-target"
    DAY = "2026-11-26T12:00:00"

    @staticmethod
    def archive(path, ids, hour=12):
        from shoebox_worker import roll_checker
        from shoebox_worker import roll_manager
        manager = roll_manager.WritingRollManager(
            os.path.basename(path), roll_checker.NeverRollChecker(),
            directory=os.path.dirname(path),
            index_fields=archive_index.DEFAULT_FIELDS)
        for n, value in enumerate(ids):
            stamp = "2026-11-26 %02d:00:%02d.000000" % (hour, n)
            note = {"payload": {"instance_id": value}, "timestamp": stamp,
                    "message_id": "%s-%d" % (value, n)}
            manager.write({"timestamp": stamp}, json.dumps(note),
                          archive_index.values_of(
                              note, archive_index.compile_fields(
                                  archive_index.DEFAULT_FIELDS)))
        manager.close()

    @pytest.fixture
    def folder(self, tmp_path):
        forged = str(tmp_path / "forged.events")
        self.archive(forged, [self.TARGET, "i-1"])
        # no values, and a time long before the window
        archive_index.write_file(archive_index.sidecar(forged),
                                 archive_index.build([(
                                     {"timestamp": "2000-01-01 00:00:00."
                                                   "000000"}, {})]))
        # stale: its index was written for other records (none of TARGET,
        # an hour that is not the window's), then the archive replaced
        stale = str(tmp_path / "stale.events")
        self.archive(stale, ["i-2", "i-3"], hour=3)
        replaced = str(tmp_path / "new" / "stale.events")
        os.mkdir(tmp_path / "new")
        self.archive(replaced, [self.TARGET, "i-4"])
        os.replace(replaced, stale)
        os.unlink(archive_index.sidecar(replaced))
        return tmp_path

    @pytest.mark.parametrize("selection", [
        ["--where", "payload.instance_id=" + TARGET],
        ["--since", DAY, "--until", "2026-11-26T13:00:00"]])
    def test_every_record_is_printed_and_each_is_one_warning(
            self, folder, capsysbinary, selection):
        code, out, err = run(["cat", *selection, str(folder)], capsysbinary)
        assert code == 0, err
        found = [json.loads(line)["payload"]["instance_id"]
                 for line in out.splitlines()]
        assert found.count(self.TARGET) == 2, (found, err)
        lines = err.splitlines()
        assert len(lines) == 2, err
        for name in ("forged", "stale"):
            path = str(folder / (name + ".events"))
            (line,) = [x for x in lines if x.startswith(
                "shoebox-worker: warning: %s.index: " % path)]
            assert line.endswith("; reading %s in full" % path), line
