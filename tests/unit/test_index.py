"""Tests for shoebox_worker.index: the bytes of an archive's field index,
its Bloom filters and what it says of the archive."""

import itertools
import os
import pathlib
import random
import stat
import struct
import uuid
import zlib

import orjson
import pytest
import simdjson

from shoebox_worker import exceptions
from shoebox_worker import index
from shoebox_worker.tools import simulator

FIELDS = ("payload.instance_id", "_context_project_id")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def ids(count, seed):
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4))
            for _ in range(count)]


def built(values, fields=FIELDS, timestamps=None):
    """An index of one record per tuple of ``values``."""
    builder = index.Builder(fields)
    for i, row in enumerate(values):
        stamp = None if timestamps is None else timestamps[i]
        builder.add(stamp, row)
    return builder.to_bytes()


class TestRoundTrip:
    def test_what_was_written_is_read(self):
        present = ids(2000, 1)
        data = built([(v, str(i % 7)) for i, v in enumerate(present)],
                     timestamps=["2026-11-26 16:11:%02d.000000" % (59 - i % 60)
                                 for i in range(2000)])
        got = index.Index.from_bytes(data)
        assert got.fields == FIELDS
        assert got.records == 2000
        assert got.distinct == {"payload.instance_id": 2000,
                                "_context_project_id": 7}
        assert all(got.may_contain("payload.instance_id", v)
                   for v in present)
        assert all(got.may_contain("_context_project_id", str(i))
                   for i in range(7))
        assert got.earliest == "2026-11-26T16:11:00.000000Z"
        assert got.latest == "2026-11-26T16:11:59.000000Z"

    def test_time_range_is_min_and_max_not_first_and_last(self):
        stamps = ["2026-11-26 12:00:00.000000",
                  "2026-11-25T23:00:00+00:00",    # the earliest, not first
                  "2026-11-27 01:00:00.000000",   # the latest, not last
                  "2026-11-26T20:00:00-05:00"]    # 2026-11-27 01:00 UTC too
        got = index.Index.from_bytes(built([(None, None)] * 4,
                                           timestamps=stamps))
        assert (got.earliest, got.latest) == (
            "2026-11-25T23:00:00.000000Z", "2026-11-27T01:00:00.000000Z")

    @pytest.mark.parametrize("odd, normal", [
        ("2024-03-01 12:00:00.1-1200", "2024-03-02T00:00:00.100000Z"),
        ("2024-03-01 23:59:59+00:00", "2024-03-01T23:59:59.000000Z"),
        ("2024-03-02T00:00:00.000001", "2024-03-02T00:00:00.000001Z"),
        ("2024-03-01 12:00:00.000000+", None),  # no time: left out
        ("2024-03-01 10:00:00.000000 ", "2024-03-01T10:00:00.000000Z")])
    def test_every_form_is_normalised_before_min_and_max(self, odd, normal):
        # oslo's own length, a space at 10: not oslo's form for all that
        stamps = ["2024-03-01 10:00:00.000000", odd,
                  "2024-03-01 13:00:00.000000"]
        got = index.Index.from_bytes(built([(None, None)] * 3,
                                           timestamps=stamps))
        times = [t for t in ("2024-03-01T10:00:00.000000Z", normal,
                             "2024-03-01T13:00:00.000000Z") if t]
        assert (got.earliest, got.latest) == (min(times), max(times))

    def test_records_without_a_time_are_left_out(self):
        stamps = [None, "2026-11-26 12:00:00.000000", "yesterday", 5,
                  "2026-11-26T13:00:00Z"]
        got = index.Index.from_bytes(built([(None, None)] * 5,
                                           timestamps=stamps))
        assert (got.earliest, got.latest) == (
            "2026-11-26T12:00:00.000000Z", "2026-11-26T13:00:00.000000Z")

    @pytest.mark.parametrize("stamps", [
        [], [None], ["yesterday"],
        ["2026-11-26 12:00:00.000000", "2026-02-30 12:00:00.000000"]])
    def test_an_unknown_time_claims_no_range(self, stamps):
        got = index.Index.from_bytes(built([(None, None)] * len(stamps),
                                           timestamps=stamps))
        assert (got.earliest, got.latest) == (None, None)

    def test_a_field_without_values_contains_nothing(self):
        got = index.Index.from_bytes(built([("a", None)]))
        assert not got.may_contain("_context_project_id", "a")
        assert got.may_contain("payload.instance_id", "a")

    def test_a_field_not_indexed_may_contain_anything(self):
        got = index.Index.from_bytes(built([("a", None)]))
        assert got.may_contain("payload.user_id", "whatever")

    def test_the_same_values_give_the_same_bytes(self):
        rows = [(v, "p") for v in ids(100, 2)]
        assert built(rows) == built(list(reversed(rows)))

    def test_bytes_as_documented(self):
        """The layout of the module docstring, read here by hand."""
        data = built([("x", None)], fields=("f", "g"),
                     timestamps=["2026-11-26 12:00:00.000000"])
        assert data[:8] == b"SBXI\x02\x00\x02\x00"
        assert struct.unpack_from("<Q", data, 8) == (1,)
        stamp = b"2026-11-26T12:00:00.000000Z"
        assert data[16] == len(stamp) and data[17:44] == stamp
        assert data[44] == len(stamp) and data[45:72] == stamp
        assert data[72:81] == bytes(9)  # unbound: no ETag, size 0
        pos = 81
        assert data[pos:pos + 3] == b"\x01\x00f"
        distinct, hashes, size = struct.unpack_from("<IBI", data, pos + 3)
        assert (distinct, hashes, size) == (1, index.HASHES, 8)  # 64 bits
        mask = data[pos + 12:pos + 12 + size]
        digest = index.hashlib.blake2b(b"x", digest_size=16).digest()
        h1 = int.from_bytes(digest[:8], "little")
        h2 = int.from_bytes(digest[8:], "little") | 1
        want = bytearray(8)
        for i in range(index.HASHES):
            j = (h1 + i * h2) % 64
            want[j >> 3] |= 1 << (j & 7)
        assert mask == bytes(want)
        pos += 12 + size
        assert data[pos:pos + 3] == b"\x01\x00g"
        assert struct.unpack_from("<IBI", data, pos + 3) == (0, index.HASHES,
                                                             0)
        pos += 12
        assert len(data) == pos + 4
        assert struct.unpack_from("<I", data, pos) == (
            zlib.crc32(data[:pos]),)


def test_the_worked_example_of_docs_format_md():
    text = (ROOT / "docs" / "format.md").read_text()
    section = text[text.index("## Index files"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    shown = bytes.fromhex("".join(line[10:59] for line in
                                  block.splitlines()))
    builder = index.Builder(("payload.instance_id",))
    builder.add("2026-11-26 16:11:12.000000", ("i-1",))
    builder.add("2026-11-26 16:11:10.500000", ("i-2",))
    assert builder.to_bytes() == shown


class TestFalsePositives:
    @pytest.mark.parametrize("count", [3, 10, 100, 1000, 20000])
    def test_at_most_one_percent_over_100k_absent_values(self, count):
        present = ids(count, count)
        got = index.Index.from_bytes(built([(v, None) for v in present]))
        absent = ids(100_000, "absent %d" % count)  # not abs(seed)
        hits = sum(got.may_contain("payload.instance_id", v)
                   for v in absent)
        assert hits / len(absent) <= 0.01, hits
        assert all(got.may_contain("payload.instance_id", v)
                   for v in present)

    def test_size_is_bits_per_distinct_value(self):
        data = built([(v, "p") for v in ids(10_000, 3)])
        filters = 10_000 * index.BITS_PER_VALUE // 8 + index.MIN_BITS // 8
        assert len(data) <= filters + 200


class TestDamage:
    DATA = built([(v, "p") for v in ids(50, 4)],
                 timestamps=["2026-11-26 12:00:00.000000"] * 50)

    def test_every_flipped_byte_is_one_line(self):
        for pos in range(len(self.DATA)):
            damaged = bytearray(self.DATA)
            damaged[pos] ^= 0x40
            with pytest.raises(exceptions.IndexError_) as caught:
                index.Index.from_bytes(bytes(damaged), "x.index")
            assert "\n" not in str(caught.value)
            assert str(caught.value).startswith("x.index: ")

    def test_every_cut_is_one_line(self):
        for end in range(len(self.DATA)):
            with pytest.raises(exceptions.IndexError_):
                index.Index.from_bytes(self.DATA[:end])

    def test_another_version_is_named(self):
        data = bytearray(self.DATA)
        data[4] = 3
        with pytest.raises(exceptions.IndexError_,
                           match="version 3; this reader knows 1 and 2"):
            index.Index.from_bytes(bytes(data))

    def test_a_good_checksum_over_bad_lengths(self):
        body = self.DATA[:-4] + b"junk"
        with pytest.raises(exceptions.IndexError_, match="malformed"):
            index.Index.from_bytes(body + struct.pack("<I",
                                                      zlib.crc32(body)))

    def test_it_is_a_shoebox_error(self):
        assert issubclass(exceptions.IndexError_, exceptions.ShoeboxError)


class TestValues:
    def test_dotted_paths_and_keys_with_dots(self):
        note = {"payload": {"instance_id": "i-1",
                            "nova_object.data": {"uuid": "u-1"},
                            "a.b": {"c": 1}, "a": {"b": {"c": 2}}},
                "_context_project_id": 884691}
        assert index.lookup(note, ("payload", "instance_id")) == "i-1"
        assert index.lookup(note, ("payload", "nova_object", "data",
                                   "uuid")) == "u-1"
        # the shortest key first
        assert index.lookup(note, ("payload", "a", "b", "c")) == 2
        assert index.lookup(note, ("payload", "missing")) is None
        assert index.lookup(note, ("payload", "instance_id", "x")) is None

    @pytest.mark.parametrize("value, text", [
        ("884691", "884691"), (884691, "884691"), (True, "true"),
        (2.5, "2.5"), (None, None), ({"a": [1]}, '{"a":[1]}'),
        ("\u00e9", "\u00e9")])
    def test_value_text(self, value, text):
        assert index.value_text(value) == text

    def test_a_number_is_found_by_its_text(self):
        fields = ("_context_project_id",)
        data = index.build([({}, {"_context_project_id": 884691})], fields)
        got = index.Index.from_bytes(data)
        assert got.may_contain("_context_project_id", "884691")

    def test_build_from_simulated_notifications(self):
        notes = list(simulator.notifications(300, seed=5))
        data = index.build(((n, n) for n in notes))
        got = index.Index.from_bytes(data)
        assert got.fields == index.DEFAULT_FIELDS
        assert got.records == 300
        for note in notes:
            for field in ("payload.instance_id", "_context_request_id",
                          "_context_project_id", "_context_user_id"):
                value = index.lookup(note, field.split("."))
                if value is not None:
                    assert got.may_contain(field, index.value_text(value))
        assert got.earliest == min(
            index.timestamps.normalise(n["timestamp"]) for n in notes)

    def test_malformed_records_count_but_index_nothing(self):
        got = index.Index.from_bytes(index.build([({}, None)]))
        assert got.records == 1
        assert got.distinct["payload.instance_id"] == 0


class TestReading:
    """notification_of and value_text: what --where and the index read."""

    @pytest.mark.parametrize("payload, note", [
        (b'{"a": 1, "a": 2}', {"a": 2}),
        (b'{"a": "\\ud800"}', {"a": "\ud800"}),     # orjson refuses these
        (b'{"a": 1e400}', {"a": float("inf")}),
        (b'{"a": 123456789012345678901234567890}',
         {"a": 1.2345678901234568e+29}),  # orjson: a float
        ('{"a": "\u00e9"}', {"a": "\u00e9"}),        # str as well
        (b'{"a": NaN}', None), (b"[1]", None), (b"\xff", None),
        (b"\xef\xbb\xbf{}", None), (b"[" * 5000 + b"]" * 5000, None)])
    def test_notification_of(self, payload, note):
        assert index.notification_of(payload) == note

    def test_value_text_of_what_only_json_reads(self):
        assert index.value_text(2 ** 70) == str(2 ** 70)
        assert index.value_text({"a": 2 ** 70}) == '{"a":%d}' % 2 ** 70
        deep = []
        for _ in range(300):  # deeper than orjson writes
            deep = [deep]
        assert index.value_text(deep) == "[" * 301 + "]" * 301


class TestReader:
    """The worker's reader gives what values_of gives, in any order of
    notifications (its shortcuts depend on the one before)."""

    FIELDS = ("payload.instance_id", "payload.nova_object.data.uuid",
              "_context_project_id", "payload.a.b", "payload.x", "n")

    NOTES = [
        {"payload": {"instance_id": "i-1", "x": {"y": 1}}, "n": 5},
        {"payload": {"nova_object.data": {"uuid": "u-1"}},
         "_context_project_id": "p"},
        {"payload": {"nova_object": {"data": {"uuid": "u-2"}},
                     "a.b": "dotted", "a": None}},
        {"payload": {"a": {"b": "nested"}, "a.b": "dotted"}},
        {"payload": {"instance_id": None, "x": [1, "\u00e9"]}},
        {"payload": {"instance\u005fid": "escaped"}},
        {"payload": {"instance_id": "i/\\/2"}, "n": True},
        {"payload": "not an object", "n": None},
        {},
    ]

    def reader_values(self, reader, note, text=None):
        raw = text if text is not None else orjson.dumps(note)
        parsed = simdjson.Parser().parse(raw)
        return reader(parsed, raw)

    def test_same_values_in_every_order(self):
        reference = {i: index.values_of(note, index.compile_fields(
            self.FIELDS)) for i, note in enumerate(self.NOTES)}
        for order in itertools.islice(itertools.permutations(
                range(len(self.NOTES))), 0, 2000, 7):
            reader = index.Reader(self.FIELDS, (dict, simdjson.Object))
            for i in order * 2:
                assert self.reader_values(reader, self.NOTES[i]) == \
                    reference[i], (order, i)

    def test_escaped_keys_are_found(self):
        reader = index.Reader(("payload.instance_id",),
                              (dict, simdjson.Object))
        missing = b'{"payload": {"other": 1}}'
        escaped = b'{"payload": {"instance\\u005fid": "i-1"}}'
        assert self.reader_values(reader, None, missing) == (None,)
        assert self.reader_values(reader, None, escaped) == ("i-1",)

    @pytest.mark.parametrize("text", [
        b'{"payload": {"instance_id": "AAA", "instance_id": "BBB"}}',
        b'{"payload": {"instance_id": null, "instance_id": "BBB"}}',
        b'{"payload": {"instance\\u005fid": "AAA", "instance_id": "BBB"}}',
        b'{"payload": {"instance_id": "AAA"}, "payload": {"x": 1}}',
        b'{"payload": {"nova_object.data": {"uuid": "u1", "uuid": "u2"}}}',
        b'{"payload": {"nova_object": {"data": {"uuid": 1, "uuid": 2}}}}',
        b'{"payload.nova_object": {"data": {"uuid": 1, "uuid": 2}}}',
        b'{"payload": {"instance_id": "AAA"}, "other": 1, "other": 2}'])
    def test_a_repeated_key_reads_as_where_does(self, text):
        # JSON leaves a repeated key undefined: simdjson's object gives
        # its first value, --where's reading (orjson) the last
        reader = index.Reader(index.DEFAULT_FIELDS, (dict, simdjson.Object))
        compiled = index.compile_fields(index.DEFAULT_FIELDS)
        where = index.values_of(orjson.loads(text), compiled)
        assert self.reader_values(reader, None, text) == where
        assert index.payload_values(text, compiled) == where

    def test_simulated_stream(self):
        compiled = index.compile_fields(index.DEFAULT_FIELDS)
        reader = index.Reader(index.DEFAULT_FIELDS, (dict, simdjson.Object))
        for note in simulator.notifications(500, seed=9):
            assert self.reader_values(reader, note) == index.values_of(
                note, compiled)


class TestFiles:
    def test_write_and_read_file(self, tmp_path):
        path = str(tmp_path / "a.events.index")
        data = built([("x", None)])
        index.write_file(path, data, mode=0o640)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert index.read_file(path).may_contain("payload.instance_id", "x")
        assert os.listdir(tmp_path) == ["a.events.index"]

    def test_read_file_names_the_file(self, tmp_path):
        path = tmp_path / "a.events.index"
        path.write_bytes(orjson.dumps({"not": "an index"}))
        with pytest.raises(exceptions.IndexError_, match="a.events.index"):
            index.read_file(path)

    def test_sidecar(self):
        assert index.sidecar("/w/x.events.gz") == "/w/x.events.gz.index"


class TestBundle:
    def entries(self):
        first = index.build([({"timestamp": "2026-11-26 16:11:12.000000"},
                              {"payload": {"instance_id": "i-1"}})])
        second = index.build([({}, {"payload": {"instance_id": "i-2"}})])
        return [("day/a.events.gz", "0123abcd", first),
                ("day/b.events.gz", "4567ef01", second)]

    def test_round_trip(self):
        entries = self.entries()
        bundle = index.Bundle.from_bytes(index.build_bundle(entries))
        assert len(bundle) == 2
        for name, etag, data in entries:
            assert bundle.index_of(name, etag) == data
        found = index.Index.from_bytes(
            bundle.index_of("day/a.events.gz", "0123abcd"))
        assert found.may_contain("payload.instance_id", "i-1")

    def test_another_hash_is_not_the_archive_bundled(self):
        bundle = index.Bundle.from_bytes(index.build_bundle(self.entries()))
        assert bundle.index_of("day/a.events.gz", "4567ef01") is None
        assert bundle.index_of("day/c.events.gz", "0123abcd") is None

    def test_empty(self):
        assert len(index.Bundle.from_bytes(index.build_bundle([]))) == 0

    def test_damage_is_one_line_naming_it(self):
        data = index.build_bundle(self.entries())
        flipped = bytearray(data)
        flipped[40] ^= 1
        bad_version = data[:4] + b"\x02" + data[5:]
        # a count larger than the entries, with a checksum that matches
        body = bytearray(data[:-4])
        struct.pack_into("<I", body, 6, 3)
        too_many = bytes(body) + struct.pack("<I", zlib.crc32(body))
        for bad, says in ((bytes(flipped), "checksum mismatch"),
                          (data[:len(data) // 2], "checksum mismatch"),
                          (b"SBXI" + data[4:], "not a shoebox index bundle"),
                          (bad_version, "format version 2"),
                          (too_many, "malformed index bundle")):
            with pytest.raises(exceptions.IndexError_, match=says) as err:
                index.Bundle.from_bytes(bad, "swift://c/x")
            assert "\n" not in str(err.value)
            assert str(err.value).startswith("swift://c/x: ")


def pieces(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


class TestBundleInPieces:
    entries = TestBundle.entries

    @pytest.mark.parametrize("size", [1, 3, 4, 5, 7, 64, 1 << 20])
    def test_any_pieces_read_as_the_whole(self, size):
        data = index.build_bundle(self.entries())
        whole = index.Bundle.from_bytes(data).entries
        assert index.Bundle.from_chunks(pieces(data, size)).entries == whole

    def test_only_the_entries_kept_are_held(self):
        data = index.build_bundle(self.entries())
        asked = []

        def keep(name, etag, length):
            asked.append((name, etag, length))
            return name == "day/b.events.gz"

        bundle = index.Bundle.from_chunks(pieces(data, 5), keep=keep)
        assert list(bundle.entries) == [("day/b.events.gz", "4567ef01")]
        assert [a[:2] for a in asked] == [(n, e) for n, e, _ in
                                          self.entries()]
        assert [a[2] for a in asked] == [len(d) for _, _, d in
                                         self.entries()]

    def test_what_is_held_does_not_grow_with_the_bundle(self):
        """16 MiB of entries not kept, read 64 KiB at a time: a peak of a
        few pieces (the whole bundle, before)."""
        import tracemalloc
        filler = [("gone/%d" % n, "e%d" % n, b"x" * (1 << 20))
                  for n in range(16)]
        data = index.build_bundle(self.entries() + filler)
        chunks = pieces(data, 1 << 16)
        del data, filler
        tracemalloc.start()
        try:
            bundle = index.Bundle.from_chunks(
                iter(chunks), keep=lambda name, etag, length:
                not name.startswith("gone/"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(bundle) == 2
        assert peak < 1 << 20, peak

    @pytest.mark.parametrize("size", [1, 7, 64])
    def test_damage_says_the_same_in_pieces(self, size):
        data = index.build_bundle(self.entries())
        flipped = bytearray(data)
        flipped[40] ^= 1
        for bad, says in ((bytes(flipped), "checksum mismatch"),
                          (data[:len(data) // 2], "checksum mismatch"),
                          (data + b"more", "checksum mismatch"),
                          (b"SBXI" + data[4:], "not a shoebox index "
                                               "bundle")):
            with pytest.raises(exceptions.IndexError_, match=says):
                index.Bundle.from_chunks(pieces(bad, size), "swift://c/x")

class TestSizeLimit:
    @pytest.mark.parametrize("records", [0, 1, 7, 300, 5000])
    def test_what_the_writer_makes_is_within_it(self, records):
        # every record with its own value in every default field: the
        # largest filters the writer makes for that many records
        notes = [({"timestamp": "2026-11-26T16:11:12"}, {
            "_context_project_id": "p-%d" % n, "_context_user_id": "u-%d" % n,
            "_context_request_id": "req-%d" % n,
            "payload": {"instance_id": "i-%d" % n, "tenant_id": "t-%d" % n,
                        "nova_object.data": {"uuid": "v-%d" % n}}})
            for n in range(records)]
        data = index.build(notes)
        assert len(data) <= index.size_limit(data) <= index.MAX_BYTES
        assert index.size_limit(data[:index.HEAD_BYTES]) == \
            index.size_limit(data)

    def test_a_header_cannot_raise_it_past_the_most(self):
        head = struct.pack("<4sBBHQ", index.MAGIC, index.VERSION, 0, 0xFFFF,
                           (1 << 64) - 1)
        assert index.size_limit(head) == index.MAX_BYTES
        assert index.size_limit(b"SB") == index.MAX_BYTES  # not known yet

    @pytest.mark.parametrize("head", [b"<html>", b"SBXB" + bytes(12),
                                      b"SBXI\x03" + bytes(11)])
    def test_what_is_no_index_of_this_version_is_refused(self, head):
        with pytest.raises(exceptions.IndexError_):
            index.size_limit(head)


def version_1(data):
    """``data`` (an unbound index of this version) in version 1's layout:
    no ETag, no size."""
    body = bytearray(data[:-4])
    body[4] = 1
    pos = 16 + 1 + body[16]
    pos += 1 + body[pos]
    assert body[pos:pos + 9] == bytes(9)
    del body[pos:pos + 9]
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


class TestBinding:
    ETAG = "0123456789abcdef0123456789abcdef"
    DATA = built([(v, "p") for v in ids(20, 9)],
                 timestamps=["2026-11-26 12:00:%02d.000000" % i
                             for i in range(20)])

    def test_written_unbound(self):
        got = index.Index.from_bytes(self.DATA)
        assert (got.etag, got.archive_size, got.version) == (None, None, 2)
        assert "it names none" in index.binding_problem(
            got, 10, lambda: self.ETAG)

    def test_bound_it_says_what_it_said_and_the_archive(self):
        bound = index.Index.from_bytes(index.bind(self.DATA, self.ETAG, 77))
        plain = index.Index.from_bytes(self.DATA)
        assert (bound.etag, bound.archive_size) == (self.ETAG, 77)
        assert (bound.fields, bound.records, bound.earliest, bound.latest,
                bound.distinct) == (plain.fields, plain.records,
                                    plain.earliest, plain.latest,
                                    plain.distinct)
        assert bound._filters == plain._filters
        assert index.binding_problem(bound, 77, lambda: self.ETAG) is None

    def test_bound_again_to_another(self):
        once = index.bind(self.DATA, self.ETAG, 77)
        twice = index.Index.from_bytes(index.bind(once, "f" * 32, 78))
        assert (twice.etag, twice.archive_size) == ("f" * 32, 78)

    @pytest.mark.parametrize("size, etag, problem", [
        (78, ETAG, "an archive of 77 bytes, not 78"),
        (None, ETAG, "not unknown"),
        (77, "f" * 32, "ETag %s, not %s" % (ETAG, "f" * 32))])
    def test_another_archive_is_a_problem(self, size, etag, problem):
        bound = index.Index.from_bytes(index.bind(self.DATA, self.ETAG, 77))
        assert problem in index.binding_problem(bound, size, lambda: etag)

    def test_the_etag_is_asked_only_when_the_sizes_agree(self):
        bound = index.Index.from_bytes(index.bind(self.DATA, self.ETAG, 77))

        def never():
            raise AssertionError("hashed")
        assert index.binding_problem(bound, 76, never) is not None

    def test_version_1_is_read_and_never_bound(self):
        old = version_1(self.DATA)
        got = index.Index.from_bytes(old)
        plain = index.Index.from_bytes(self.DATA)
        assert (got.version, got.etag) == (1, None)
        assert (got.records, got.earliest, got._filters) == (
            plain.records, plain.earliest, plain._filters)
        assert "format version 1" in index.binding_problem(
            got, 77, lambda: self.ETAG)
        assert len(old) <= index.size_limit(old[:index.HEAD_BYTES])
        bound = index.Index.from_bytes(index.bind(old, self.ETAG, 77))
        assert (bound.version, bound.etag) == (2, self.ETAG)

    @pytest.mark.parametrize("etag", ["", "é" * 4, "x" * 256])
    def test_no_etag_binds(self, etag):
        with pytest.raises(ValueError):
            index.bind(self.DATA, etag, 1)

    def test_bind_file(self, tmp_path):
        archive = tmp_path / "a.events.gz"
        archive.write_bytes(b"the archive's bytes")
        path = index.sidecar(archive)
        index.write_file(path, self.DATA, mode=0o640)
        assert index.bind_file(archive)
        got = index.read_file(path)
        assert (got.etag, got.archive_size) == (
            index.hashlib.md5(b"the archive's bytes").hexdigest(), 19)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert not index.bind_file(archive)  # bound already
        archive.write_bytes(b"other bytes, as many")
        assert index.bind_file(archive)
        assert index.read_file(path).etag == index.etag_of_file(archive)

    def test_bind_file_without_an_index(self, tmp_path):
        archive = tmp_path / "a.events"
        archive.write_bytes(b"x")
        assert not index.bind_file(archive)
        assert not os.path.exists(index.sidecar(archive))
