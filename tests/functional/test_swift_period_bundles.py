"""Period bundles on the real Swift: ``index-bundle --per month``, then
pruned reads that must print what a full read keeps.

Archives are written as the worker writes them (``ft.write_archive``) and
uploaded with the real swift step with an hourly ``object_prefix``: hours
across a month's end, one archive whose records go back into the month
before (late records: it is filed under its earliest record's month), and
an object that is no archive. ``index-bundle --per month`` makes one
bundle a month; ``cat --where`` must then GET one part a month and the
archives that hold the id (no ``.index``), ``cat --since/--until`` one part
a month and the archives of the window, and both print what a full read
filtered by the same options prints. A second run changes nothing; an
archive added, or one replaced by other records, is read through its own
index until the next run takes it in, and that run rewrites only its
month.

Needs ST_AUTH, ST_USER and ST_KEY; skipped without them, or failing when
CI=true.
"""

import collections
import datetime
import os
import uuid

import orjson
import pytest

from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker import timestamps
from shoebox_worker.ship import swift as swift_step
from shoebox_worker.swift import layout
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

RECORDS = 30
#: The first hour of the archives: two hours before February.
HOUR0 = datetime.datetime(2026, 1, 31, 22, tzinfo=datetime.UTC)
HOURS = 5


def notes_of(hour, seed, late=None):
    """RECORDS notifications spread over ``hour`` (from HOUR0); ``late``:
    the time of one more, added last."""
    start = HOUR0 + datetime.timedelta(hours=hour)
    notes = list(simulator.notifications(RECORDS + (late is not None),
                                         seed=seed, start=start))
    for i, note in enumerate(notes):
        moment = start + datetime.timedelta(seconds=100 * i + 7)
        if late is not None and i == RECORDS:
            moment = late
        note["timestamp"] = moment.strftime("%Y-%m-%d %H:%M:%S.%f")
    return notes


def instance_of(line):
    body = orjson.loads(line).get("payload") or {}
    return body.get("instance_id") if isinstance(body, dict) else None


@pytest.fixture(scope="module")
def year(ft, swift_env, tmp_path_factory):
    container = "shoebox-periods-%s" % uuid.uuid4().hex[:12]
    directory = tmp_path_factory.mktemp("periods")
    step = swift_step.SwiftUploadCallback(
        auth=swift_env["ST_AUTH"], user=swift_env["ST_USER"],
        key=swift_env["ST_KEY"], container=container,
        object_prefix="%Y/%m/%d/%H/")
    conn = ft.swift_connection(swift_env)
    try:
        names, held = [], {}
        for hour in range(HOURS):
            # the last hour's archive holds a record of the month before
            late = HOUR0 + datetime.timedelta(minutes=5) \
                if hour == HOURS - 1 else None
            notes = notes_of(hour, hour, late)
            path, report = ft.write_archive(notes, directory,
                                            "h%02d.events" % hour)
            step.on_close(path, report=report)
            name = step.object_name(path, timestamps.record_time(
                report.first_metadata))
            names.append(name)
            held[name] = notes
        conn.put_object(container, "2026/README.txt", b"not an archive\n")
        yield {"container": container, "names": names, "conn": conn,
               "step": step, "directory": directory, "held": held}
    finally:
        step.close()
        ft.delete_swift_container(conn, container)
        conn.close()


def _main(argv, capsysbinary):
    capsysbinary.readouterr()
    code = cli.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out.decode(), err.decode()


def _full(spec, capsysbinary, metadata=False):
    code, out, err = _main(["cat"] + (["--metadata"] if metadata else [])
                           + [spec], capsysbinary)
    assert code == 0, err
    return out.splitlines()


def _in_window(line, since, until):
    moment = timestamps.record_time(orjson.loads(line)["metadata"])
    return moment is not None and since <= moment < until


def _parts(conn, container):
    return sorted(entry["name"] for entry in
                  conn.get_container(container, full_listing=True)[1]
                  if layout.period_bundle_of(entry["name"]))


def _holding(held, test):
    """The archives some of whose notifications pass ``test``."""
    return sorted(name for name, notes in held.items()
                  if any(test(note) for note in notes))


def test_pruned_reads_print_what_a_full_read_keeps(
        ft, year, swift_gets, capsysbinary):
    container, conn = year["container"], year["conn"]
    spec = "swift://" + container
    folder = spec + "/" + layout.PERIOD_FOLDER
    code, out, err = _main(["index-bundle", "--per", "month", spec],
                           capsysbinary)
    assert code == 0, err
    # the last archive (filed under February) holds a January record
    assert out.splitlines() == [
        folder + "2026-01/: 3 archives (3 read now), 1 part",
        folder + "2026-02/: 2 archives (2 read now), 1 part",
        folder + "untimed/: 1 archives (1 read now), 1 part",
        folder + ": 6 archives, 6 read now, 3 periods written, 0 unchanged"]
    parts = _parts(conn, container)
    assert [layout.period_bundle_of(p)[1] for p in parts] == [
        "2026-01", "2026-02", "untimed"]

    full = _full(spec, capsysbinary)
    lines = collections.defaultdict(set)
    for line in full:
        lines[instance_of(line)].add(line)
    ids = sorted(i for i in lines if i)
    assert len(ids) > 3
    for iid in ids[:3] + ["not-an-id"]:
        swift_gets.clear()
        code, out, err = _main(["cat", "--where", "payload.instance_id="
                                + iid, spec], capsysbinary)
        assert code == 0, err
        assert sorted(out.splitlines()) == sorted(lines.get(iid, ()))
        gets = [o for _, o in swift_gets]
        # one part a period; the archives holding the id; no .index
        assert sorted(o for o in gets if layout.is_bundle(o)) == parts
        assert sorted(o for o in gets if not layout.is_bundle(o)) == \
            _holding(year["held"], lambda n, i=iid: (
                n.get("payload") or {}).get("instance_id") == i)

    metadata = _full(spec, capsysbinary, metadata=True)
    for since, until in (
            (HOUR0, HOUR0 + datetime.timedelta(hours=1)),
            (HOUR0 + datetime.timedelta(hours=2),
             HOUR0 + datetime.timedelta(hours=3)),
            (HOUR0 + datetime.timedelta(minutes=4),
             HOUR0 + datetime.timedelta(minutes=6))):
        swift_gets.clear()
        code, out, err = _main([
            "cat", "--metadata", "--since", since.isoformat(), "--until",
            until.isoformat(), spec], capsysbinary)
        assert code == 0, err
        assert out.splitlines() == [line for line in metadata
                                    if _in_window(line, since, until)]
        gets = [o for _, o in swift_gets]
        assert sorted(o for o in gets if layout.is_bundle(o)) == parts
        # the archives whose range meets the window (the late one too)
        spans = {name: (min(timestamps.parse(n["timestamp"]) for n in notes),
                        max(timestamps.parse(n["timestamp"]) for n in notes))
                 for name, notes in year["held"].items()}
        assert sorted(o for o in gets if not layout.is_bundle(o)) == sorted(
            name for name, (first, last) in spans.items()
            if first < until and last >= since)

    # nothing changed: nothing read, nothing written
    code, out, err = _main(["index-bundle", "--per", "month", spec],
                           capsysbinary)
    assert code == 0, err
    assert out.splitlines() == [
        folder + ": 6 archives, 0 read now, 0 periods written, 3 unchanged"]
    assert _parts(conn, container) == parts


def test_an_archive_added_or_replaced_is_read_until_bundled(
        ft, year, swift_gets, capsysbinary):
    container, conn, step = year["container"], year["conn"], year["step"]
    spec = "swift://" + container
    code, _, err = _main(["index-bundle", "--per", "month", spec],
                         capsysbinary)
    assert code == 0, err
    new_id = "added-%s" % uuid.uuid4().hex
    os.makedirs(year["directory"] / "more", exist_ok=True)
    notes = notes_of(3, 99)
    notes[5]["payload"]["instance_id"] = new_id
    path, report = ft.write_archive(notes, year["directory"] / "more",
                                    "added.events")
    step.on_close(path, report=report)
    added = step.object_name(path, timestamps.record_time(
        report.first_metadata))
    replaced = year["names"][0]  # January: its entry goes stale
    notes = notes_of(0, 98)
    notes[2]["payload"]["instance_id"] = new_id
    path, _ = ft.write_archive(notes, year["directory"] / "more",
                               "replaced.events")
    with open(path, "rb") as f:
        conn.put_object(container, replaced, f.read())
    with open(index.sidecar(path), "rb") as f:
        conn.put_object(container, replaced + index.SUFFIX, f.read())

    argv = ["cat", "--where", "payload.instance_id=" + new_id, spec]
    swift_gets.clear()
    code, out, err = _main(argv, capsysbinary)
    assert code == 0, err
    assert len(out.splitlines()) == 2
    gets = [o for _, o in swift_gets]
    assert sorted(o for o in gets if o.endswith(index.SUFFIX)) == sorted(
        [added + index.SUFFIX, replaced + index.SUFFIX])

    folder = spec + "/" + layout.PERIOD_FOLDER
    code, out, err = _main(["index-bundle", "--per", "month", spec],
                           capsysbinary)
    assert code == 0, err
    assert out.splitlines() == [
        folder + "2026-01/: 3 archives (1 read now), 1 part",
        folder + "2026-02/: 3 archives (1 read now), 1 part",
        folder + ": 7 archives, 2 read now, 2 periods written, 1 unchanged"]
    swift_gets.clear()
    code, out, err = _main(argv, capsysbinary)
    assert code == 0, err
    assert len(out.splitlines()) == 2
    gets = [o for _, o in swift_gets]
    assert not [o for o in gets if o.endswith(index.SUFFIX)]
    assert sorted(o for o in gets if not layout.is_bundle(o)) == sorted(
        [added, replaced])
