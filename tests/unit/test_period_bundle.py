"""Tests for shoebox_worker.period_bundle: the parts of a period bundle,
what they answer, and what a reader refuses."""

import struct
import tracemalloc
import zlib

import orjson
import pytest

from shoebox_worker import exceptions
from shoebox_worker import index
from shoebox_worker import period_bundle as pb

FIELDS = ("payload.instance_id", "_context_project_id")


def summary(name, ids, projects=(), **kwargs):
    kwargs.setdefault("earliest", "2026-03-09T10:00:00.000000Z")
    kwargs.setdefault("latest", "2026-03-09T10:59:00.000000Z")
    return pb.Summary(name, "etag-" + name, 100, records=len(ids),
                      values=[{pb.fingerprint(i) for i in ids},
                              {pb.fingerprint(p) for p in projects}],
                      **kwargs)


def parts_of(summaries, parts=None, period="2026-03"):
    return [pb.Part.from_bytes(data, "p%d" % part) for part, _, data in
            pb.build_parts(period, FIELDS, summaries, parts)]


class TestParts:
    def test_each_value_is_found_in_its_part_and_only_there(self):
        ids = ["id-%d" % n for n in range(40)]
        got = parts_of([summary("a", ids[:20], ["p1"]),
                        summary("b", ids[20:])], parts=4)
        assert [(p.part, p.parts, p.period, p.fields) for p in got] == [
            (n, 4, "2026-03", FIELDS) for n in range(4)]
        for part in got:  # every part names every archive, with its range
            assert sorted(part.entries) == [("a", "etag-a"),
                                            ("b", "etag-b")]
            a = part.entries[("a", "etag-a")]
            assert (a.earliest, a.latest, a.records, a.archive_size) == (
                "2026-03-09T10:00:00.000000Z", "2026-03-09T10:59:00.000000Z",
                20, 100)
        for value in ids + ["absent-%d" % n for n in range(40)]:
            home = pb.part_of(value, 4)
            for part in got:
                a = part.entries[("a", "etag-a")]
                b = part.entries[("b", "etag-b")]
                if part.part != home:  # not its part: it cannot tell
                    assert a.may_contain(FIELDS[0], value)
                    continue
                assert a.may_contain(FIELDS[0], value) == (value in ids[:20])
                assert b.may_contain(FIELDS[0], value) == (value in ids[20:])
        home = got[pb.part_of("p1", 4)]
        assert home.entries[("a", "etag-a")].may_contain(FIELDS[1], "p1")
        assert not home.entries[("b", "etag-b")].may_contain(FIELDS[1], "p1")
        # a field not summarised: nothing known
        assert home.entries[("b", "etag-b")].may_contain("payload.x", "p1")

    def test_a_left_out_archive_is_named_but_prunes_nothing(self):
        [part] = parts_of([summary("a", ["x"]),
                           pb.Summary.left_out("bad", "e", 7)])
        assert part.left_out == {("bad", "e"): 7}
        assert list(part.entries) == [("a", "etag-a")]

    def test_keep_chooses_the_entries_held(self):
        seen = []

        def keep(name, etag, length):
            seen.append((name, etag))
            return name == "b"

        data = pb.build_parts("2026", FIELDS, [summary("a", ["x"]),
                                               summary("b", ["y"])])[0][2]
        part = pb.Part.from_chunks([data[:3], data[3:10], data[10:]],
                                   "p", keep)
        assert seen == [("a", "etag-a"), ("b", "etag-b")]
        assert list(part.entries) == [("b", "etag-b")]

    def test_an_entry_is_bound_to_the_etag_and_size_it_names(self):
        [part] = parts_of([summary("a", ["x"])])
        entry = part.entries[("a", "etag-a")]
        assert index.binding_problem(entry, 100, lambda: "etag-a") is None
        assert "not 101" in index.binding_problem(entry, 101,
                                                  lambda: "etag-a")
        assert "not other" in index.binding_problem(entry, 100,
                                                    lambda: "other")

    def test_parts_grow_by_powers_of_two_with_the_values(self, monkeypatch):
        monkeypatch.setattr(pb, "PART_TARGET", 100)
        assert pb.parts_for([summary("a", [])]) == 1
        assert pb.parts_for([summary("a", ["x%d" % n for n in range(25)])]) \
            == 1
        assert pb.parts_for([summary("a", ["x%d" % n for n in range(26)])]) \
            == 2
        assert pb.parts_for([summary("a", ["x%d" % n for n in range(500)])]) \
            == 32
        monkeypatch.setattr(pb, "PART_TARGET", 1)
        assert pb.parts_for([summary("a", ["x%d" % n for n in range(500)])]) \
            == pb.MAX_PARTS

    def test_period_of(self):
        stamp = "2026-03-09T10:00:00.000000Z"
        assert [pb.period_of(stamp, per) for per in ("year", "month", "day")] \
            == ["2026", "2026-03", "2026-03-09"]
        assert pb.period_of(None, "month") == "untimed"


class TestWhatAReaderRefuses:
    def data(self):
        return pb.build_parts("2026-03", FIELDS, [summary("a", ["x"])])[0][2]

    def refused(self, data):
        with pytest.raises(exceptions.IndexError_) as info:
            pb.Part.from_bytes(data, "swift://c/p")
        return str(info.value)

    def test_damage(self):
        body = zlib.decompress(self.data())
        flipped = bytearray(body)
        flipped[30] ^= 1
        assert "checksum mismatch" in self.refused(zlib.compress(flipped))
        assert "cut short" in self.refused(self.data()[:-5])
        assert "damaged period bundle" in self.refused(b"not zlib at all")
        assert "no b'SBXP' magic" in self.refused(zlib.compress(b"SBXI" +
                                                                body[4:]))
        assert "version 9" in self.refused(zlib.compress(
            body[:4] + b"\x09" + body[5:]))

    def test_a_length_past_the_end_or_bytes_after_the_last_entry(self):
        body = zlib.decompress(self.data())[:-4]
        longer = body + b"extra"
        assert "bytes after the last entry" in self.refused(zlib.compress(
            longer + struct.pack("<I", zlib.crc32(longer))))
        cut = body[:-6]
        assert "malformed" in self.refused(zlib.compress(
            cut + struct.pack("<I", zlib.crc32(cut))))

    def test_a_bomb_costs_a_chunk_not_its_size(self, monkeypatch):
        monkeypatch.setattr(pb, "MAX_PART_BYTES", 1 << 20)
        bomb = zlib.compress(b"SBXP\x01" + bytes(8 << 20))
        assert len(bomb) < 1 << 20
        assert "more than a reader takes" in self.refused(bomb)
        assert "more than a reader takes" in self.refused(bytes(2 << 20))


class TestSummaryOfRecords:
    def test_what_where_and_the_index_read(self):
        records = [
            ({"timestamp": "2026-03-09 10:00:00.000001"},
             orjson.dumps({"payload": {"instance_id": "a"},
                           "_context_project_id": 7})),
            ({"timestamp": "2026-03-09T09:00:00+00:00"},  # late, other form
             b'{"payload": {"instance_id": "first", "instance_id": "last"}}'),
            ({"timestamp": "garbage"}, b"not json"),
        ]
        got = pb.Summary.of_records("o", "e", 9, iter(records), FIELDS)
        builder = index.Builder(FIELDS)
        for metadata, payload in records:
            builder.add(metadata["timestamp"],
                        index.payload_values(payload, builder.compiled))
        assert (got.earliest, got.latest) == builder.time_range() == (
            "2026-03-09T09:00:00.000000Z", "2026-03-09T10:00:00.000001Z")
        assert got.records == 3
        # a repeated key's last value, a number as its JSON text
        assert got.values == ({pb.fingerprint("a"), pb.fingerprint("last")},
                              {pb.fingerprint("7")})


def _hostile(fingerprints, left_out=0):
    """A part (well formed, its checksum right) of one archive ``o``
    listing ``fingerprints`` at one field, and ``left_out`` archives left
    out: what a user who may write the container can PUT."""
    body = [struct.pack("<4sBBHH", b"SBXP", 1, 0, 0, 1), b"\x07" + b"2026-03",
            struct.pack("<H", 1), struct.pack("<H", 1) + b"f",
            struct.pack("<I", 1 + left_out)]
    body += [struct.pack("<H", 1) + b"o", struct.pack("<B", 1) + b"e",
             struct.pack("<QBQ", 5, pb.SUMMARISED, 1), b"\x00\x00",
             struct.pack("<I", len(fingerprints)),
             struct.pack("<%dI" % len(fingerprints), *fingerprints)]
    for n in range(left_out):
        name = b"gone-%d" % n
        body += [struct.pack("<H", len(name)) + name, b"\x01e",
                 struct.pack("<QBQ", 5, pb.LEFT_OUT, 1), b"\x00\x00",
                 struct.pack("<I", 0)]
    data = b"".join(body)
    return zlib.compress(data + struct.pack("<I", zlib.crc32(data)), 9)


class TestWhatAReaderHolds:
    """A reader holds what it keeps, at the bytes it counts: a part's
    size, not Python objects per value, nor entries it does not keep."""

    def peak(self, data, keep):
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        tracemalloc.start()
        try:
            part = pb.Part.from_chunks(chunks, "p", keep)
            return part, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def test_fingerprints_cost_four_bytes_each(self, monkeypatch):
        monkeypatch.setattr(pb, "MAX_PART_BYTES", 8 << 20)
        many = range(0, 3 << 20, 2)  # 1.5 M distinct values, 6 MiB
        data = _hostile(many)
        size = 4 * len(many)
        part, peak = self.peak(data, lambda *_: False)
        assert part.entries == {}
        assert peak < 3 * size
        part, peak = self.peak(data, lambda *_: True)
        entry = part.entries[("o", "e")]
        assert peak < 4 * size
        assert entry.may_contain("f", "anything") == (
            pb.fingerprint("anything") in many)
        assert sorted(entry.summary().values[0]) == list(many)

    def test_entries_not_kept_are_not_held_left_out_ones_either(self):
        data = _hostile([1, 2], left_out=1000)
        seen = []

        def keep(name, etag, length):
            seen.append(name)
            return name == "gone-7"

        part = pb.Part.from_chunks([data], "p", keep)
        assert len(seen) == 1001
        assert (part.entries, part.left_out) == ({}, {("gone-7", "e"): 5})
        assert len(pb.Part.from_bytes(data).left_out) == 1000
