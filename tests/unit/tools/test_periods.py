"""Tests for shoebox_worker.tools.periods: ``index-bundle --per`` keeps
the period bundles up to date, reading each archive once (with a Swift of
dicts here; tests/functional/test_swift_period_bundles.py runs it on the
real one)."""

import argparse
import hashlib
import threading

import orjson
import pytest
from swiftclient import exceptions as swift_exceptions

from shoebox_worker import index
from shoebox_worker import period_bundle
from shoebox_worker import record
from shoebox_worker.swift import layout
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import bundle
from shoebox_worker.tools import periods
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools import sources

FIELD = "payload.instance_id"


def archive_of(stamps_ids):
    """An archive's bytes: a record for each ``(timestamp, instance id)``.
    """
    return b"".join(record.pack({"timestamp": stamp}, orjson.dumps(
        {"payload": {"instance_id": iid}})) for stamp, iid in stamps_ids)


def hour(day, h, *ids):
    return archive_of([("2026-%s %02d:%02d:00.000000" % (day, h, n), iid)
                       for n, iid in enumerate(ids)])


class Body(list):
    def close(self):
        pass


class FakeSwift(sources.Swift):
    """Objects in a dict, their ETag the MD5 of their bytes; every GET,
    PUT and DELETE counted."""

    url, token = "http://swift/v1/AUTH_test", "tk"

    def __init__(self, objects):
        super().__init__()
        self.objects = dict(objects)
        self.gets, self.puts, self.deletes = [], [], []
        self.lock = threading.Lock()

    def connection(self):
        return self

    def entries(self, container, prefix):
        return [{"name": name, "bytes": len(data),
                 "hash": hashlib.md5(data).hexdigest(),
                 "last_modified": "2026-03-09T12:00:00.%06d" % n}
                for n, (name, data) in enumerate(sorted(self.objects.items()))
                if name.startswith(prefix)]

    def get_object(self, container, name, resp_chunk_size=None):
        with self.lock:
            self.gets.append(name)
        if name not in self.objects:
            raise swift_exceptions.ClientException("GET", http_status=404)
        data = self.objects[name]
        chunk = resp_chunk_size or len(data) or 1
        return ({"etag": hashlib.md5(data).hexdigest()},
                Body(data[i:i + chunk] for i in range(0, len(data), chunk)))

    def put_object(self, container, name, data, content_type=None):
        assert content_type == periods.PART_CONTENT_TYPE
        self.puts.append(name)
        self.objects[name] = data

    def delete_object(self, container, name):
        self.deletes.append(name)
        del self.objects[name]

    def parts(self):
        return sorted(n for n in self.objects if layout.period_bundle_of(n))

    def clear(self):
        self.gets.clear()
        self.puts.clear()
        self.deletes.clear()


@pytest.fixture
def swift(monkeypatch):
    found = FakeSwift({
        "2026/03/09/10/a.events": hour("03-09", 10, "i1", "i2"),
        "2026/03/09/11/b.events": hour("03-09", 11, "i2", "i3"),
        "2026/04/01/00/c.events": hour("04-01", 0, "i4"),
        # filed under April, but its earliest record is of March
        "2026/04/01/01/late.events": archive_of([
            ("2026-04-01 01:00:00.000000", "i5"),
            ("2026-03-31 23:00:00.000000", "i6")]),
        "2026/04/01/02/a.events.index": b"an index: never an archive",
        "2026/README": b"no records here",
        "2026/04/01/03/damaged.events": hour("04-01", 3, "i7")[:-3],
    })
    monkeypatch.setattr(sources, "Swift", lambda config_file=None: found)
    return found


def run(capsys, spec="swift://c", per="month", field=(), code=0):
    args = argparse.Namespace(spec=spec, config=None, jobs=2, per=per,
                              field=list(field))
    assert bundle.cmd_index_bundle(args) == code
    return capsys.readouterr().out.splitlines()


def entries(swift, period):
    """``{archive: Entry}`` of the whole bundle of ``period`` (every
    part), the parts' fingerprints joined."""
    got = {}
    for name in swift.parts():
        if layout.period_bundle_of(name)[1] != period:
            continue
        part = period_bundle.Part.from_bytes(swift.objects[name])
        for (archive_name, _), entry in part.entries.items():
            fps = got.setdefault(archive_name, set())
            fps.update(entry.fingerprints[0])
    return got


def test_each_archive_is_read_once_and_filed_under_its_period(swift, capsys):
    out = run(capsys)
    folder = "swift://c/" + layout.PERIOD_FOLDER
    assert out == [
        folder + "2026-03/: 3 archives (3 read now), 1 part",
        folder + "2026-04/: 1 archives (1 read now), 1 part",
        folder + "untimed/: 2 archives (2 read now, 1 left out), 1 part",
        folder + ": 6 archives, 6 read now, 3 periods written, 0 unchanged"]
    # every object once, the index aside
    assert sorted(swift.gets) == sorted(
        n for n in swift.objects if not layout.is_bundle(n)
        and not n.endswith(index.SUFFIX))
    march = entries(swift, "2026-03")
    assert sorted(march) == ["2026/03/09/10/a.events",
                             "2026/03/09/11/b.events",
                             "2026/04/01/01/late.events"]
    assert march["2026/04/01/01/late.events"] == {
        period_bundle.fingerprint("i5"), period_bundle.fingerprint("i6")}

    swift.clear()
    assert run(capsys) == [folder + ": 6 archives, 0 read now, 0 periods "
                           "written, 3 unchanged"]
    assert swift.puts == swift.deletes == []
    assert sorted(swift.gets) == sorted(swift.parts())  # one a period


def test_a_new_archive_rewrites_its_period_alone(swift, capsys):
    run(capsys)
    swift.objects["2026/03/10/00/d.events"] = hour("03-10", 0, "i9")
    swift.clear()
    out = run(capsys)
    assert out[0] == ("swift://c/%s2026-03/: 4 archives (1 read now), 1 "
                      "part" % layout.PERIOD_FOLDER)
    assert [n for n in swift.gets if not layout.is_bundle(n)] == [
        "2026/03/10/00/d.events"]
    assert [layout.period_bundle_of(n)[1] for n in swift.puts] == [
        "2026-03"]
    march = entries(swift, "2026-03")
    assert march["2026/03/09/10/a.events"] == {
        period_bundle.fingerprint("i1"), period_bundle.fingerprint("i2")}
    assert march["2026/03/10/00/d.events"] == {
        period_bundle.fingerprint("i9")}


def test_an_archive_gone_or_replaced_leaves_its_period(swift, capsys):
    run(capsys)
    del swift.objects["2026/03/09/10/a.events"]
    swift.objects["2026/03/09/11/b.events"] = hour("03-09", 11, "i8")
    swift.clear()
    out = run(capsys)
    assert out[:-1] == ["swift://c/%s2026-03/: 2 archives (1 read now), 1 "
                        "part" % layout.PERIOD_FOLDER]
    march = entries(swift, "2026-03")
    assert march["2026/03/09/11/b.events"] == {
        period_bundle.fingerprint("i8")}
    assert "2026/03/09/10/a.events" not in march


def test_more_parts_as_a_period_grows_and_nothing_is_lost(
        swift, capsys, monkeypatch):
    run(capsys)
    monkeypatch.setattr(period_bundle, "PART_TARGET", 8)
    ids = ["many-%d" % n for n in range(12)]
    swift.objects["2026/03/10/00/d.events"] = hour("03-10", 0, *ids)
    swift.clear()
    run(capsys)
    cut = [layout.period_bundle_of(n) for n in swift.parts()
           if "2026-03" in n]
    assert {parts for _, _, _, parts in cut} == {16}  # 72 bytes: 9 parts
    assert len(cut) == 16
    # the old cut (one part) is deleted once the new one is written
    assert swift.deletes == [layout.period_bundle_name("", "2026-03", 0, 1)]
    march = entries(swift, "2026-03")
    assert march["2026/03/09/10/a.events"] == {
        period_bundle.fingerprint("i1"), period_bundle.fingerprint("i2")}
    assert march["2026/03/10/00/d.events"] == {
        period_bundle.fingerprint(i) for i in ids}


def test_an_archive_missing_from_a_part_is_read_again(
        swift, capsys, monkeypatch):
    monkeypatch.setattr(period_bundle, "PART_TARGET", 4)
    run(capsys)
    names = [n for n in swift.parts() if "2026-03" in n]
    assert len(names) > 1
    # a part written by another run, which did not have a.events yet
    part = period_bundle.Part.from_bytes(swift.objects[names[-1]])
    others = [e.summary() for key, e in part.entries.items()
              if key[0] != "2026/03/09/10/a.events"]
    _, _, data = period_bundle.build_parts(
        "2026-03", index.DEFAULT_FIELDS, others, part.parts)[part.part]
    swift.objects[names[-1]] = data
    swift.objects["2026/03/10/00/d.events"] = hour("03-10", 0, "i9")
    swift.clear()
    run(capsys)
    assert sorted(n for n in swift.gets if not layout.is_bundle(n)) == [
        "2026/03/09/10/a.events", "2026/03/10/00/d.events"]
    assert entries(swift, "2026-03")["2026/03/09/10/a.events"] == {
        period_bundle.fingerprint("i1"), period_bundle.fingerprint("i2")}


def test_a_damaged_part_or_other_fields_rebuild_from_the_archives(
        swift, capsys):
    run(capsys)
    [name] = [n for n in swift.parts() if "2026-03" in n]
    swift.objects[name] = b"garbage"
    swift.clear()
    out = run(capsys)
    assert "2026-03/: 3 archives (3 read now)" in out[0]
    swift.clear()
    run(capsys, field=[FIELD, "_context_project_id"])
    assert len([n for n in swift.gets if not layout.is_bundle(n)]) == 6
    part = period_bundle.Part.from_bytes(swift.objects[name])
    assert part.fields == (FIELD, "_context_project_id")


def test_field_goes_with_per(swift):
    args = argparse.Namespace(spec="swift://c", config=None, jobs=2,
                              per=None, field=[FIELD])
    with pytest.raises(UsageError, match="--field goes with --per"):
        bundle.cmd_index_bundle(args)


def test_a_read_takes_one_part_a_period_and_prunes_as_a_full_read(
        swift, capsys):
    run(capsys)
    everything = list(read.read_all(
        sources.find(["swift://c"], swift=swift), False, 2,
        lambda err: None))
    for iid in ["i1", "i2", "i5", "i6", "i7", "nowhere"]:
        chosen = select.Selection(where=[select.parse_where(FIELD + "=" +
                                                            iid)],
                                  load_index=index.Index.from_bytes)
        swift.clear()
        items = sources.find(["swift://c"], swift=swift, indexes=True,
                             probes=chosen.exact)
        kept = [item for item in items if chosen.may_hold(item)]
        # one part a period; no .index; the damaged archive is read
        assert sorted(swift.gets) == sorted(swift.parts())
        assert "2026/04/01/03/damaged.events" in [i.object for i in kept]
        assert "2026/README" not in [i.object for i in kept]
        got = [r for r in read.read_all(kept, False, 2, lambda err: None)
               if chosen.keep(*r)]
        assert got == [r for r in everything if chosen.keep(*r)]


def test_a_read_takes_the_part_of_the_value_looked_for(
        swift, capsys, monkeypatch):
    monkeypatch.setattr(period_bundle, "PART_TARGET", 4)
    run(capsys)
    march = [n for n in swift.parts() if "2026-03" in n]
    parts = layout.period_bundle_of(march[0])[3]
    assert parts > 1
    swift.clear()
    items = sources.find(["swift://c"], swift=swift, indexes=True,
                         probes=[(FIELD, "i2")])
    wanted = layout.period_bundle_name(
        "", "2026-03", period_bundle.part_of("i2", parts), parts)
    assert wanted in swift.gets
    assert not [n for n in swift.gets if n in march and n != wanted]
    by_name = {item.object: item for item in items}
    assert by_name["2026/03/09/10/a.events"].summary.may_contain(FIELD, "i2")
    assert not by_name["2026/04/01/01/late.events"].summary.may_contain(
        FIELD, "i2")


def test_a_damaged_part_is_one_warning_and_the_own_indexes_serve(
        swift, capsys):
    run(capsys)
    [name] = [n for n in swift.parts() if "2026-03" in n]
    swift.objects[name] = swift.objects[name][:-2]
    items = sources.find(["swift://c"], swift=swift, indexes=True)
    err = capsys.readouterr().err
    assert err == ("shoebox-worker: warning: swift://c/%s: period bundle cut "
                   "short; reading the indexes of its archives instead\n"
                   % name)
    by_name = {item.object: item for item in items}
    assert by_name["2026/03/09/10/a.events"].summary is None
    assert by_name["2026/04/01/00/c.events"].summary is not None


def test_past_the_cap_the_parts_entries_are_left_to_the_own_indexes(
        swift, capsys, monkeypatch):
    """Period parts share the single bundles' budget: past
    ``BUNDLE_MEMORY`` bytes of entries, what is left out is said in one
    line and pruned by the archive's own index."""
    run(capsys)
    monkeypatch.setattr(sources, "BUNDLE_MEMORY", 1)
    items = sources.find(["swift://c"], swift=swift, indexes=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("shoebox-worker: warning: swift://c: the "
                             "bundled indexes of ")
    assert err[0].endswith("left out (more than 1 bytes of them in all); "
                           "reading their own indexes instead")
    assert all(item.summary is None for item in items)


def test_an_object_with_records_past_its_first_bytes_is_not_taken_for_none(
        swift, capsys):
    # no record marker in its first bytes (a first record over 64 KiB
    # whose marker is damaged): a full read skips it, but --salvage
    # prints the records after it, and so must a pruned --salvage read
    swift.objects["2026/03/09/12/odd.events"] = \
        b"x" * (sources.SNIFF_BYTES + 10) + hour("03-09", 12, "i1")
    run(capsys)
    full = list(read.read_all(sources.find(["swift://c"], swift=swift),
                              True, 2, lambda err: None))
    for chosen in (
            select.Selection(where=[select.parse_where(FIELD + "=i1")],
                             load_index=index.Index.from_bytes),
            select.Selection(since=select.parse_when("2026-03-09T12:00"),
                             until=select.parse_when("2026-03-09T13:00"),
                             load_index=index.Index.from_bytes)):
        items = sources.find(["swift://c"], swift=swift, indexes=True,
                             probes=chosen.exact)
        kept = [item for item in items if chosen.may_hold(item)]
        got = [r for r in read.read_all(kept, True, 2, lambda err: None)
               if chosen.keep(*r)]
        assert got == [r for r in full if chosen.keep(*r)] != []
    # an object without a record marker anywhere is still skipped unread
    assert "2026/README" not in [item.object for item in kept]


def test_parts_that_disagree_on_an_archive_have_it_read_again(
        swift, capsys, monkeypatch):
    # two runs at once, one of which could not read a.events whole (left
    # out) and one that could: their parts mixed in one cut
    monkeypatch.setattr(period_bundle, "PART_TARGET", 4)
    run(capsys)
    names = [n for n in swift.parts() if "2026-03" in n]
    assert len(names) > 1
    part = period_bundle.Part.from_bytes(swift.objects[names[0]])
    a = "2026/03/09/10/a.events"
    summaries = [e.summary() if key[0] != a else period_bundle.Summary.
                 left_out(*key, e.archive_size)
                 for key, e in part.entries.items()]
    _, _, data = period_bundle.build_parts(
        "2026-03", index.DEFAULT_FIELDS, summaries, part.parts)[part.part]
    swift.objects[names[0]] = data
    swift.objects["2026/03/10/00/d.events"] = hour("03-10", 0, "i9")
    swift.clear()
    run(capsys)
    assert sorted(n for n in swift.gets if not layout.is_bundle(n)) == [
        a, "2026/03/10/00/d.events"]
    assert entries(swift, "2026-03")[a] == {
        period_bundle.fingerprint("i1"), period_bundle.fingerprint("i2")}


@pytest.mark.parametrize("fields, problem", [
    ([FIELD, FIELD], "listed twice"),
    (["payload..instance_id"], "expected dotted paths")])
def test_field_is_checked_as_index_fields_is(swift, fields, problem):
    # a field named twice would make parts every reader refuses, and
    # every run would read every archive again
    args = argparse.Namespace(spec="swift://c", config=None, jobs=2,
                              per="month", field=fields)
    with pytest.raises(UsageError, match="--field: .*" + problem):
        bundle.cmd_index_bundle(args)
    assert swift.gets == swift.puts == []


def test_an_archive_replaced_since_the_listing_is_one_line_and_exit_1(
        swift, capsys, monkeypatch):
    name = "2026/03/09/10/a.events"
    get = swift.get_object

    def replaced(container, obj, resp_chunk_size=None):
        headers, body = get(container, obj, resp_chunk_size)
        if obj == name:  # another object's bytes than the listing's
            headers = {"etag": hashlib.md5(b"other").hexdigest()}
        return headers, body

    monkeypatch.setattr(swift, "get_object", replaced)
    args = argparse.Namespace(spec="swift://c", config=None, jobs=2,
                              per="month", field=[])
    assert bundle.cmd_index_bundle(args) == 1
    out, err = capsys.readouterr()
    assert err == (
        "shoebox-worker: warning: swift://c/%s: replaced since the listing "
        "(ETag %s, not %s); left for the next run\n" % (
            name, hashlib.md5(b"other").hexdigest(),
            hashlib.md5(swift.objects[name]).hexdigest()))
    assert "2026-03/: 2 archives (2 read now)" in out.splitlines()[0]
