"""Tests for shoebox_worker.tools.export: the rows, the day partitions,
the files' names and their all-or-nothing rename, read back by DuckDB."""

import json
import os

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


def query(sql):
    return duckdb.sql(sql).fetchall()


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_jsonl_rows_by_day_read_by_duckdb(tmp_path, codec):
    out = tmp_path / "out"
    exporter, written = export_all(out, records(), codec=codec)
    assert written == 3 and exporter.rows == 12
    names = listing(out)
    assert [n.split("/")[0] for n in names] == [
        "date=2024-03-01", "date=2024-03-02", "date=2024-03-03"]
    suffix = ".jsonl.gz" if codec == "gzip" else ".jsonl.zst"
    assert all(n.split("/")[1].startswith("part-") and n.endswith(suffix)
               for n in names)
    glob = "%s/*/*%s" % (out, suffix)
    got = query(
        "SELECT date, event_type, count(*) FROM read_json('%s', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY ALL" % glob)
    assert [(str(d), e, c) for d, e, c in got] == [
        ("2024-03-0%d" % day, "compute.instance.%s" % kind, 2)
        for day in (1, 2, 3) for kind in ("exists", "update")]
    (row,) = query(
        "SELECT timestamp, notification.payload.instance_id, message_id "
        "FROM read_json('%s', hive_partitioning = true) "
        "WHERE message_id = 'm-1-3'" % glob)
    assert str(row[0]).startswith("2024-03-02 23:59:03.000001")
    assert row[1:] == ("i-3", "m-1-3")


def test_parquet_has_a_real_timestamp_and_metadata_columns(tmp_path):
    out = tmp_path / "out"
    export_all(out, records(), fmt="parquet")
    glob = "%s/*/*.parquet" % out
    types = dict(query("SELECT column_name, column_type FROM (DESCRIBE "
                       "SELECT * FROM read_parquet('%s', hive_partitioning "
                       "= true))" % glob))
    assert types["timestamp"] == "TIMESTAMP WITH TIME ZONE"
    assert types["event_type"] == types["message_id"] == "VARCHAR"
    assert types["notification"] == "VARCHAR"
    got = query(
        "SELECT count(*), count(DISTINCT date), min(timestamp) AT TIME ZONE "
        "'UTC', max(json_extract_string(notification, '$.payload."
        "instance_id')) FROM read_parquet('%s', hive_partitioning = true)"
        % glob)
    assert [(c, d, str(t), i) for c, d, t, i in got] == [
        (12, 3, "2024-03-01 23:59:00.000001", "i-3")]


def test_a_day_is_the_utc_day_of_the_timestamp(tmp_path):
    rows = [({"timestamp": "2024-03-01T23:30:00-02:00"}, b"{}"),
            ({"timestamp": "2024-03-02T00:30:00+02:00"}, b"{}")]
    out = tmp_path / "out"
    export_all(out, rows)
    assert [n.split("/")[0] for n in listing(out)] == [
        "date=2024-03-01", "date=2024-03-02"]


def test_records_without_a_usable_timestamp_are_kept_apart(tmp_path):
    rows = [({"timestamp": "yesterday"}, b'{"a": 1}'),
            ({}, b"not json \xff"),
            ({"timestamp": "2024-03-01 10:00:00"}, b"{}")]
    out = tmp_path / "out"
    exporter, _ = export_all(out, rows)
    assert exporter.days == {"unknown", "2024-03-01"}
    got = query("SELECT date, timestamp, notification FROM read_json('%s/*/"
                "*.jsonl.gz', hive_partitioning = true, union_by_name = "
                "true, columns = {timestamp: 'VARCHAR', notification: "
                "'JSON'}) ORDER BY ALL" % out)
    assert [(str(d), t, n) for d, t, n in got] == [
        ("2024-03-01", "2024-03-01T10:00:00.000000Z", "{}"),
        ("unknown", None, '"not json \\\\xff"'),
        ("unknown", None, '{"a":1}')]


def test_metadata_keys_that_clash_are_renamed(tmp_path):
    rows = [({"timestamp": "2024-03-01 10:00:00", "date": "d",
              "notification": "n"}, b"{}")]
    out = tmp_path / "out"
    export_all(out, rows, fmt="parquet")
    got = query("SELECT date, metadata_date, metadata_notification, "
                "notification FROM read_parquet('%s/*/*.parquet', "
                "hive_partitioning = true)" % out)
    assert [tuple(map(str, row)) for row in got] == [
        ("2024-03-01", "d", "n", "{}")]


def test_nothing_is_visible_before_close_and_nothing_after_abort(tmp_path):
    out = tmp_path / "out"
    exporter = export.Exporter(str(out), "jsonl")
    for metadata, payload in records():
        exporter.add(metadata, payload)
    assert all(os.path.basename(n).startswith(".") and n.endswith(".tmp")
               for n in listing(out))
    exporter.abort()
    assert listing(out) == []


def test_two_exports_into_one_folder_keep_both(tmp_path):
    out = tmp_path / "out"
    export_all(out, records(days=1))
    export_all(out, records(days=1))
    assert len(listing(out)) == 2
    assert query("SELECT count(*) FROM read_json('%s/*/*.jsonl.gz')"
                 % out) == [(8,)]


def test_more_days_than_open_files_are_all_written(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "OPEN_FILES", 2)
    rows = records(days=4, per_day=3)
    rows = rows[0::3] + rows[1::3] + rows[2::3]  # the days interleaved
    out = tmp_path / "out"
    exporter, written = export_all(out, rows)
    assert written > 4  # days came back after their file was finished
    got = query("SELECT date, count(*) FROM read_json('%s/*/*.jsonl.gz', "
                "hive_partitioning = true) GROUP BY ALL ORDER BY ALL" % out)
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
                "'%s/*/*.parquet', union_by_name = true)" % out)
    assert got == [(12, 1)]


def test_parquet_buffers_are_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARQUET_BUFFER", 2000)
    out = tmp_path / "out"
    _, written = export_all(out, records(days=2, per_day=10),
                            fmt="parquet")
    assert written > 2
    assert query("SELECT count(*) FROM read_parquet('%s/*/*.parquet')"
                 % out) == [(20,)]


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
    got = query("SELECT date, message_id FROM read_json('%s/*/*.jsonl.gz', "
                "hive_partitioning = true) ORDER BY ALL" % out)
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
    assert query("SELECT count(*) FROM read_parquet('%s/*/*.parquet')"
                 % out) == [(4,)]


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
    assert listing(out) == []
