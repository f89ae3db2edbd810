"""Tests for shoebox_worker.tools.export: the rows, the day partitions,
the files' names and modes, the run's all-or-nothing rename (a failing
write, a full disk, SIGTERM, SIGKILL at the rename), read back by DuckDB."""

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import duckdb
import pytest

from shoebox_worker import archive
from shoebox_worker import cli
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import export


def records(days=3, per_day=4):
    out = []
    for day in range(days):
        for n in range(per_day):
            out.append((
                {"event_type": "compute.instance.%s" % (
                    "exists" if n % 2 else "update"),
                 "message_id": "m-%d-%d" % (day, n),
                 "timestamp": "2024-03-%02d 23:59:%02d.000001" % (day + 1, n)},
                json.dumps({"payload": {"instance_id": "i-%d" % n},
                            "n": n}).encode()))
    return out


def export_all(out, rows, fmt="jsonl", codec="gzip"):
    exporter = export.Exporter(str(out), fmt, codec)
    for metadata, payload in rows:
        exporter.add(metadata, payload)
    return exporter, exporter.close()


def listing(out):
    return sorted(os.path.relpath(os.path.join(folder, name), out)
                  for folder, _, names in os.walk(out) for name in names)


def days_of(out):
    """The day folders of every run of ``out``, in order."""
    return [name.split("/")[1] for name in listing(out)]


def glob(out, ext):
    """What the README tells readers to read."""
    return "%s/run=*/date=*/*%s" % (out, ext)


def query(sql):
    return duckdb.sql(sql).fetchall()


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_jsonl_rows_by_day_read_by_duckdb(tmp_path, codec):
    out = tmp_path / "out"
    exporter, written = export_all(out, records(), codec=codec)
    assert written == 3 and exporter.rows == 12
    names = listing(out)
    assert days_of(out) == [
        "date=2024-03-01", "date=2024-03-02", "date=2024-03-03"]
    assert {n.split("/")[0] for n in names} == {"run=" + exporter.run.id}
    suffix = ".jsonl.gz" if codec == "gzip" else ".jsonl.zst"
    assert all(n.split("/")[2].startswith("part-") and n.endswith(suffix)
               for n in names)
    files = glob(out, suffix)
    got = query(
        "SELECT date, event_type, count(*) FROM read_json('%s', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY ALL" % files)
    assert [(str(d), e, c) for d, e, c in got] == [
        ("2024-03-0%d" % day, "compute.instance.%s" % kind, 2)
        for day in (1, 2, 3) for kind in ("exists", "update")]
    (row,) = query(
        "SELECT timestamp, notification.payload.instance_id, message_id "
        "FROM read_json('%s', hive_partitioning = true) "
        "WHERE message_id = 'm-1-3'" % files)
    assert str(row[0]).startswith("2024-03-02 23:59:03.000001")
    assert row[1:] == ("i-3", "m-1-3")


def test_parquet_has_a_real_timestamp_and_metadata_columns(tmp_path):
    out = tmp_path / "out"
    exporter, _ = export_all(out, records(), fmt="parquet")
    files = glob(out, ".parquet")
    types = dict(query("SELECT column_name, column_type FROM (DESCRIBE "
                       "SELECT * FROM read_parquet('%s', hive_partitioning "
                       "= true))" % files))
    assert types["timestamp"] == "TIMESTAMP WITH TIME ZONE"
    assert types["event_type"] == types["message_id"] == "VARCHAR"
    assert types["notification"] == "VARCHAR"
    got = query(
        "SELECT count(*), count(DISTINCT date), min(timestamp) AT TIME ZONE "
        "'UTC', max(json_extract_string(notification, '$.payload."
        "instance_id')), min(run) FROM read_parquet('%s', "
        "hive_partitioning = true)" % files)
    assert [(c, d, str(t), i, r) for c, d, t, i, r in got] == [
        (12, 3, "2024-03-01 23:59:00.000001", "i-3", exporter.run.id)]


def test_a_day_is_the_utc_day_of_the_timestamp(tmp_path):
    rows = [({"timestamp": "2024-03-01T23:30:00-02:00"}, b"{}"),
            ({"timestamp": "2024-03-02T00:30:00+02:00"}, b"{}")]
    out = tmp_path / "out"
    export_all(out, rows)
    assert days_of(out) == ["date=2024-03-01", "date=2024-03-02"]


def test_records_without_a_usable_timestamp_are_kept_apart(tmp_path):
    rows = [({"timestamp": "yesterday"}, b'{"a": 1}'),
            ({}, b"not json \xff"),
            ({"timestamp": "2024-03-01 10:00:00"}, b"{}")]
    out = tmp_path / "out"
    exporter, _ = export_all(out, rows)
    assert exporter.days == {"unknown", "2024-03-01"}
    got = query("SELECT date, timestamp, notification FROM read_json('%s', "
                "hive_partitioning = true, union_by_name = true, columns = "
                "{timestamp: 'VARCHAR', notification: 'JSON'}) ORDER BY ALL"
                % glob(out, ".jsonl.gz"))
    assert [(str(d), t, n) for d, t, n in got] == [
        ("2024-03-01", "2024-03-01T10:00:00.000000Z", "{}"),
        ("unknown", None, '"not json \\\\xff"'),
        ("unknown", None, '{"a":1}')]


def test_metadata_keys_that_clash_are_renamed(tmp_path):
    rows = [({"timestamp": "2024-03-01 10:00:00", "date": "d",
              "notification": "n", "run": "r"}, b"{}")]
    out = tmp_path / "out"
    exporter, _ = export_all(out, rows, fmt="parquet")
    got = query("SELECT date, run, metadata_date, metadata_notification, "
                "metadata_run, notification FROM read_parquet('%s', "
                "hive_partitioning = true)" % glob(out, ".parquet"))
    assert [tuple(map(str, row)) for row in got] == [
        ("2024-03-01", exporter.run.id, "d", "n", "r", "{}")]


def test_nothing_is_visible_before_close_and_nothing_after_abort(tmp_path):
    out = tmp_path / "out"
    exporter = export.Exporter(str(out), "jsonl")
    for metadata, payload in records():
        exporter.add(metadata, payload)
    assert listing(out) and all(n.startswith(export.STAGING)
                                for n in listing(out))
    with pytest.raises(duckdb.IOException, match="No files found"):
        query("SELECT count(*) FROM read_json('%s')" % glob(out, ".jsonl.gz"))
    exporter.abort()
    assert os.listdir(out) == []


def test_two_exports_into_one_folder_keep_both(tmp_path):
    out = tmp_path / "out"
    export_all(out, records(days=1))
    export_all(out, records(days=1))
    assert len(listing(out)) == 2
    assert query("SELECT count(*), count(DISTINCT run) FROM read_json('%s', "
                 "hive_partitioning = true)" % glob(out, ".jsonl.gz")
                 ) == [(8, 2)]


def test_more_days_than_open_files_are_all_written(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "OPEN_FILES", 2)
    rows = records(days=4, per_day=3)
    rows = rows[0::3] + rows[1::3] + rows[2::3]  # the days interleaved
    out = tmp_path / "out"
    exporter, written = export_all(out, rows)
    assert written > 4  # days came back after their file was finished
    got = query("SELECT date, count(*) FROM read_json('%s', "
                "hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
                % glob(out, ".jsonl.gz"))
    assert [(str(d), c) for d, c in got] == [
        ("2024-03-0%d" % day, 3) for day in (1, 2, 3, 4)]


def test_parquet_files_hold_at_most_so_many_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARQUET_ROWS", 5)
    rows = records(days=1, per_day=12)
    rows[11][0]["extra"] = "only here"  # another schema in the last file
    out = tmp_path / "out"
    _, written = export_all(out, rows, fmt="parquet")
    assert written == 3
    got = query("SELECT count(*), count(extra) FROM read_parquet("
                "'%s', union_by_name = true)" % glob(out, ".parquet"))
    assert got == [(12, 1)]


def test_parquet_buffers_are_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARQUET_BUFFER", 2000)
    out = tmp_path / "out"
    _, written = export_all(out, records(days=2, per_day=10),
                            fmt="parquet")
    assert written > 2
    assert query("SELECT count(*) FROM read_parquet('%s')"
                 % glob(out, ".parquet")) == [(20,)]


def test_unknown_format_and_codec_are_one_line(tmp_path):
    with pytest.raises(ToolError, match="unknown export format 'csv'"):
        export.Exporter(str(tmp_path), "csv")
    with pytest.raises(ToolError, match="unknown compression 'lz4'"):
        export.Exporter(str(tmp_path), "jsonl", "lz4")


# -- the command ------------------------------------------------------------

def write_archive(path, rows):
    with archive.ArchiveWriter(str(path)) as writer:
        for metadata, payload in rows:
            writer.write(metadata, payload)
    return str(path)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_exports_what_is_selected(tmp_path, capsys):
    rows = records(days=3)
    first = write_archive(tmp_path / "a.events", rows[:6])
    second = write_archive(tmp_path / "b.events", rows[6:])
    out = tmp_path / "out"
    code, said, err = run(["export", "--out", str(out), "--since",
                           "2024-03-02", "--where", "payload.instance_id=i-1",
                           first, second], capsys)
    assert (code, err) == (0, "")
    assert said == ("exported 2 records of 2 archives to %s: 2 files, "
                    "2 days\n" % out)
    got = query("SELECT date, message_id FROM read_json('%s', "
                "hive_partitioning = true) ORDER BY ALL"
                % glob(out, ".jsonl.gz"))
    assert [(str(d), m) for d, m in got] == [("2024-03-02", "m-1-1"),
                                             ("2024-03-03", "m-2-1")]


def test_a_damaged_archive_is_one_line_and_the_rest_exported(tmp_path,
                                                             capsys):
    good = write_archive(tmp_path / "a.events", records(days=1))
    bad = tmp_path / "b.events"
    write_archive(bad, records(days=1))
    data = bytearray(bad.read_bytes())
    data[40] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, said, err = run(["export", "--format", "parquet", "--out",
                           str(out), good, str(bad)], capsys)
    assert code == 1
    assert said.startswith("exported 4 records of 2 archives")
    (line,) = err.splitlines()
    assert line.startswith("shoebox-worker: %s" % bad)
    assert query("SELECT count(*) FROM read_parquet('%s')"
                 % glob(out, ".parquet")) == [(4,)]


def test_a_failed_export_leaves_no_file(tmp_path, capsys, monkeypatch):
    path = write_archive(tmp_path / "a.events", records(days=2))
    calls = []

    def fails_at_the_fifth(self, metadata, payload):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(self, metadata, payload)

    real = export.Exporter.add
    monkeypatch.setattr(export.Exporter, "add", fails_at_the_fifth)
    out = tmp_path / "out"
    code, _, err = run(["export", "--out", str(out), path], capsys)
    assert code == 1 and "No space left on device" in err
    assert os.listdir(out) == []  # no file, no empty date= folder


def test_the_readmes_query_finds_rows_on_any_day(tmp_path, monkeypatch):
    # the walk-through's DuckDB line, as written, on an export of records
    # of another day than the README's and today: it still finds them
    import pathlib
    import re
    readme = pathlib.Path(__file__).resolve().parents[3] / "README.md"
    (line,) = [line for line in readme.read_text().splitlines()
               if "duckdb.sql(" in line]
    sql = re.search(r'duckdb\.sql\(\\"(.*)\\"\)', line).group(1)
    assert "read_parquet('export/" in sql
    monkeypatch.chdir(tmp_path)
    export_all(tmp_path / "export", records(days=2), fmt="parquet")
    rows = duckdb.sql(sql).fetchall()
    assert sorted((event, n) for event, n, _ in rows) == [
        ("compute.instance.exists", 4), ("compute.instance.update", 4)]


def test_a_parquet_write_failing_midway_leaves_nothing(tmp_path, capsys,
                                                       monkeypatch):
    import pyarrow.parquet as pq
    monkeypatch.setattr(export, "PARQUET_ROWS", 5)
    path = write_archive(tmp_path / "a.events", records(days=2, per_day=6))
    real, calls = pq.write_table, []

    def fails_in_the_third(table, sink, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            sink.write(b"PAR1 half a file")
            sink.flush()
            raise OSError(5, "Input/output error")
        return real(table, sink, **kwargs)

    monkeypatch.setattr(pq, "write_table", fails_in_the_third)
    out = tmp_path / "out"
    code, said, err = run(["export", "--format", "parquet", "--out",
                           str(out), path], capsys)
    assert (code, said) == (1, "")
    assert err.startswith("shoebox-worker: ") and "Input/output" in err
    assert len(calls) == 3
    assert os.listdir(out) == []  # no .tmp, no part, no date= folder


def test_an_existing_out_keeps_its_other_files_when_an_export_fails(
        tmp_path, monkeypatch):
    out = tmp_path / "out"
    first, _ = export_all(out, records(days=1))
    before = listing(out)
    exporter = export.Exporter(str(out), "jsonl")
    for metadata, payload in records(days=2):
        exporter.add(metadata, payload)
    monkeypatch.setattr(os, "fsync", _raises(OSError(28, "No space")))
    with pytest.raises(OSError):
        exporter.close()
    exporter.abort()
    assert listing(out) == before
    assert os.listdir(out) == ["run=" + first.run.id]


def test_a_run_that_cannot_be_made_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(export, "_make_folder", _raises(
        PermissionError(13, "Permission denied", "there")))
    with pytest.raises(ToolError, match="^there: cannot create: Permission"):
        export.Exporter(str(out), "jsonl")
    assert os.listdir(out) == []  # nor its lock


def _raises(error):
    def raising(*args):
        raise error
    return raising


def _mount_tmpfs(folder, size):
    os.mkdir(folder)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size,
                             "tmpfs", str(folder)], capture_output=True)
    if result.returncode:
        pytest.skip("cannot mount a tmpfs: %s" % result.stderr.decode())


def noise_records(count, size=1024):
    """Records whose payloads do not compress."""
    return [({"timestamp": "2024-03-%02d 10:00:00" % (1 + n % 3)},
             json.dumps({"noise": base64.b64encode(os.urandom(size))
                         .decode()}).encode())
            for n in range(count)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_full_disk_leaves_nothing_and_frees_its_space(tmp_path, capsys,
                                                        fmt):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = write_archive(tmp_path / "a.events", noise_records(300))
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "96k")
    try:
        out = disk / "out"
        code, said, err = run(["export", "--format", fmt, "--out", str(out),
                               path], capsys)
        assert (code, said) == (1, "")
        assert "No space left on device" in err
        assert os.listdir(out) == []
        assert shutil.disk_usage(disk).used <= 8192  # what the folder holds
    finally:
        busy = subprocess.run(["umount", str(disk)]).returncode
        if busy:  # a file of the export still open: unmounted when closed
            subprocess.run(["umount", "-l", str(disk)], check=True)
    assert not busy


def _cli(*argv, strace=()):
    """The command in a process of its own (under strace when given)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*strace, sys.executable, "-m", "shoebox_worker.cli",
                           *map(str, argv)], capture_output=True, env=env,
                          timeout=60)


def _strace(*injections):
    """strace's command line for each ``(syscalls, what)`` injection."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    argv = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=" + ",".join(
        syscalls for syscalls, _ in injections)]
    for syscalls, what in injections:
        argv += ["-e", "inject=%s:%s" % (syscalls, what)]
    return argv


def visible(out):
    """The files a reader of ``out`` reads: none under a name that starts
    with a dot (Spark and Athena skip them; the README's pattern
    ``DIR/run=*`` never reaches them)."""
    return [name for name in listing(out)
            if not any(part.startswith(".") for part in name.split("/"))]


def rows_visible(out, ext):
    names = visible(out)
    if not names:
        return 0
    reader = "read_parquet" if ext == ".parquet" else "read_json"
    paths = ", ".join("'%s'" % os.path.join(out, name) for name in names)
    return query("SELECT count(*) FROM %s([%s], union_by_name = true)"
                 % (reader, paths))[0][0]


RENAMES = "rename,renameat,renameat2"


@pytest.mark.parametrize("when", [1, 2, 3])
def test_killed_at_a_rename_a_reader_sees_all_or_nothing(tmp_path, when):
    path = write_archive(tmp_path / "a.events", records(days=3))
    out = tmp_path / "out"
    result = _cli("export", "--out", out, path,
                  strace=_strace((RENAMES, "signal=KILL:when=%d" % when)))
    assert rows_visible(out, ".jsonl.gz") in (0, 12)
    left = [name for name in listing(out) if name not in visible(out)]
    if result.returncode == 0:  # no rename of that number: all there
        assert rows_visible(out, ".jsonl.gz") == 12 and left == []
        return
    assert rows_visible(out, ".jsonl.gz") == 0
    assert left and all(name.startswith(export.STAGING) for name in left)
    # the next export removes what the killed one left, and says so
    again = _cli("export", "--out", out, path)
    assert again.returncode == 0, again.stderr
    (lock,) = [name for name in left if name.endswith(".lock")]
    (line,) = again.stderr.decode().splitlines()
    assert line.endswith("%s: removed the hidden files of an export that "
                         "was killed (%s)" % (out, lock[:-len(".lock")]))
    assert [n for n in listing(out) if n not in visible(out)] == []
    assert rows_visible(out, ".jsonl.gz") == 12


def test_sigterm_while_writing_removes_everything(tmp_path):
    path = write_archive(tmp_path / "a.events", records(days=3))
    out = tmp_path / "out"
    # SIGTERM at the second file's fsync: the export is half written
    result = _cli("export", "--format", "parquet", "--out", out, path,
                  strace=_strace(("fsync", "signal=TERM:when=2")))
    assert os.listdir(out) == []
    assert result.returncode == 130
    assert result.stderr.decode() == (
        "shoebox-worker: export stopped: nothing was added to %s\n" % out)


def test_a_second_sigterm_does_not_cut_the_removal_short(tmp_path):
    path = write_archive(tmp_path / "a.events", records(days=3))
    out = tmp_path / "out"
    # SIGTERM at the second file's fsync, and again at the first file
    # the removal unlinks
    result = _cli("export", "--format", "parquet", "--out", out, path,
                  strace=_strace(("fsync", "signal=TERM:when=2"),
                                 ("unlinkat", "signal=TERM:when=1")))
    assert os.listdir(out) == []
    assert result.returncode == 130, result.stderr


def test_a_live_export_is_not_taken_for_a_killed_one(tmp_path):
    out = tmp_path / "out"
    running = export.Exporter(str(out), "jsonl")
    for metadata, payload in records(days=1):
        running.add(metadata, payload)
    export_all(out, records(days=2))  # meanwhile, another export
    running.close()
    assert query("SELECT count(*), count(DISTINCT run) FROM read_json('%s', "
                 "hive_partitioning = true)" % glob(out, ".jsonl.gz")
                 ) == [(12, 2)]
    assert listing(out) == visible(out)


def test_a_planted_lock_symlink_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (out / (export.STAGING + "x.lock")).symlink_to(tmp_path / "victim")
    (out / (export.STAGING + "x.tmp")).symlink_to(target)
    assert export.remove_stale_runs(str(out)) == []
    assert target.is_dir()


# -- modes --------------------------------------------------------------------

@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


def modes(out):
    """``{relative path: permission bits}`` of everything in ``out``."""
    found = {}
    for folder, folders, names in os.walk(out):
        for name in folders + names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, out)] = stat.S_IMODE(
                os.stat(path).st_mode)
    return found


@pytest.mark.parametrize("argv, mask, file_mode, folder_mode", [
    ([], 0o022, 0o600, 0o700),
    (["--mode", "0640"], 0o022, 0o640, 0o750),
    (["--mode", "644"], 0o077, 0o644, 0o755),
])
def test_files_and_folders_have_the_mode_whatever_the_umask(
        tmp_path, capsys, umask, argv, mask, file_mode, folder_mode):
    umask(mask)
    path = write_archive(tmp_path / "a.events", records(days=2))
    out = tmp_path / "new" / "out"
    for fmt in ("jsonl", "parquet"):
        code, _, err = run(["export", "--format", fmt, *argv, "--out",
                            str(out), path], capsys)
        assert (code, err) == (0, "")
    assert stat.S_IMODE(os.stat(out).st_mode) == folder_mode
    found = modes(out)
    assert len(found) == 2 + 2 * 2 + 2 * 2  # runs, days, files
    for name, bits in found.items():
        is_file = name.endswith((".gz", ".parquet"))
        assert bits == (file_mode if is_file else folder_mode), name


def test_an_existing_out_keeps_its_mode(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    export_all(out, records(days=1))
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_a_mode_without_0600_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    code, said, err = run(["export", "--mode", "0440", "--out", str(out),
                           str(tmp_path)], capsys)
    assert (code, said) == (2, "")
    assert err == ("shoebox-worker: --mode: expected file permission bits "
                   "with 0600 (the owner reads and writes), got 0440\n")
    assert not out.exists()


@pytest.mark.parametrize("mode", ["0700x", "4600", ""])
def test_a_mode_that_is_not_permission_bits_is_refused(tmp_path, capsys,
                                                       mode):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["export", "--mode", mode, "--out", str(tmp_path / "out"),
                  str(tmp_path)])
    assert stopped.value.code == 2
    assert "argument --mode: expected permission bits in octal" in \
        capsys.readouterr().err
