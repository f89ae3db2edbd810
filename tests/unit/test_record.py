"""Tests for shoebox_worker.record: the byte format, pinned."""

import io
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from shoebox_worker import exceptions
from shoebox_worker import record

_MARKER = struct.pack("<i", record.MAGIC)

MAGIC = 0x69867884
METADATA = {"key": "value", "ünï": "cödé"}
PAYLOAD = '{"a": 1}'

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
metadata_st = st.dictionaries(text, text, max_size=8)
payload_st = st.one_of(st.binary(max_size=300), text)


def v1_by_hand(pairs, payload):
    """StackTach shoebox 0.7's v1 layout, written out with struct."""
    pairs = [(k.encode("utf-8"), v.encode("utf-8")) for k, v in pairs]
    lengths = []
    strings = b""
    for key, value in pairs:
        lengths += [len(key), len(value)]
        strings += key + value
    meta = struct.pack("<i", 4 * len(pairs))
    meta += struct.pack("<%di" % len(lengths), *lengths) + strings
    raw = struct.pack("<i%ds" % len(payload), len(payload), payload)
    return (struct.pack("<ih", MAGIC, 1)
            + struct.pack("<iii", len(meta), len(raw), 0) + meta + raw)


class TestGoldenV1:
    def test_metadata_and_payload(self):
        expected = (
            struct.pack("<ih", MAGIC, 1)
            + struct.pack("<iii", 4 + 16 + 19, 4 + 8, 0)
            # metadata block: 4 x pairs, then the lengths interleaved
            + struct.pack("<i", 8)
            + struct.pack("<iiii", 3, 5, 5, 6)
            # then the strings interleaved
            + b"key" + b"value" + b"\xc3\xbcn\xc3\xaf" + b"c\xc3\xb6d\xc3\xa9"
            # raw block
            + struct.pack("<i8s", 8, b'{"a": 1}'))
        assert len(expected) == 6 + 12 + 39 + 12
        assert expected == v1_by_hand(METADATA.items(), b'{"a": 1}')
        assert record.pack(METADATA, PAYLOAD, version=1) == expected
        assert record.pack(METADATA, PAYLOAD.encode(), version=1) == expected
        assert expected.hex() == (
            "84788669" "0100" "27000000" "0c000000" "00000000"
            "08000000" "03000000" "05000000" "05000000" "06000000"
            "6b6579" "76616c7565" "c3bc6ec3af" "63c3b664c3a9"
            "08000000" "7b2261223a20317d")
        metadata, payload, size = record.unpack_from(expected)
        assert metadata == METADATA
        assert list(metadata) == ["key", "ünï"]
        assert payload == b'{"a": 1}'
        assert size == len(expected)

    def test_empty_metadata(self):
        expected = (struct.pack("<ih", MAGIC, 1)
                    + struct.pack("<iii", 4, 4 + 8, 0)
                    + struct.pack("<i", 0)
                    + struct.pack("<i8s", 8, b'{"a": 1}'))
        assert record.pack({}, PAYLOAD, version=1) == expected
        assert record.unpack_from(expected) == ({}, b'{"a": 1}',
                                                len(expected))

    def test_empty_payload(self):
        data = record.pack({"a": ""}, b"", version=1)
        assert data == v1_by_hand([("a", "")], b"")
        assert record.unpack_from(data) == ({"a": ""}, b"", len(data))

    def test_native_order_is_the_same_on_little_endian(self):
        # what shoebox 0.7 wrote with native "ih" / "iii" on x86
        if struct.pack("=i", 1) != struct.pack("<i", 1):
            pytest.skip("big-endian host")
        data = record.pack(METADATA, PAYLOAD, version=1)
        assert data[:6] == struct.pack("ih", MAGIC, 1)
        assert data[6:18] == struct.pack("iii", 39, 12, 0)


class TestGoldenV2:
    HEX = ("84788669" "0200" "27000000" "0c000000" "a0d060b2"
           "08000000" "03000000" "05000000" "05000000" "06000000"
           "6b657976616c7565c3bc6ec3af63c3b664c3a9"
           "08000000" "7b2261223a20317d"
           "d9f1ad51")
    EMPTY_HEX = ("84788669" "0200" "04000000" "0c000000" "15b599c5"
                 "00000000" "08000000" "7b2261223a20317d" "8dbc5a97")

    def test_pinned_bytes(self):
        data = record.pack(METADATA, PAYLOAD, version=2)
        assert data.hex() == self.HEX
        assert record.pack(METADATA, PAYLOAD) == data  # v2 is the default
        assert record.pack({}, PAYLOAD, version=2).hex() == self.EMPTY_HEX

    @pytest.mark.parametrize("hexdata", [HEX, EMPTY_HEX])
    def test_layout(self, hexdata):
        # the pinned bytes are v1's blocks, a header CRC over the 14 bytes
        # before it and a record CRC over everything before the trailer
        data = bytes.fromhex(hexdata)
        magic, version, meta_len, raw_len, hcrc = struct.unpack_from(
            "<ihIII", data)
        assert (magic, version) == (MAGIC, 2)
        assert hcrc == zlib.crc32(data[:14])
        assert len(data) == 18 + meta_len + raw_len + 4
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        assert crc == zlib.crc32(data[:-4])
        v1 = record.pack(METADATA if meta_len > 4 else {}, PAYLOAD, 1)
        assert data[18:-4] == v1[18:]

    def test_read_back(self):
        data = bytes.fromhex(self.HEX)
        assert record.unpack_from(data) == (METADATA, b'{"a": 1}', len(data))


class TestPack:
    def test_unknown_version(self):
        for version in (0, 3, "2", None):
            with pytest.raises(exceptions.InvalidVersion):
                record.pack({}, b"", version=version)

    def test_bad_types(self):
        with pytest.raises(TypeError):
            record.pack({"a": 1}, b"")
        with pytest.raises(TypeError):
            record.pack({}, 12)

    def test_bytes_keys_and_values_accepted(self):
        data = record.pack({b"k": b"v"}, bytearray(b"x"))
        assert record.unpack_from(data)[:2] == ({"k": "v"}, b"x")

    def test_header_size(self):
        assert record.HEADER_SIZE == 18
        assert record.CURRENT_VERSION == 2


class TestUnpack:
    @pytest.mark.parametrize("version", [1, 2])
    def test_offset_and_end(self, version):
        one = record.pack({"n": "1"}, b"one", version)
        two = record.pack({"n": "2"}, b"two", version)
        buf = b"junk" + one + two
        assert record.unpack_from(buf, 4)[:2] == ({"n": "1"}, b"one")
        assert record.unpack_from(buf, 4 + len(one))[2] == len(two)
        with pytest.raises(exceptions.TornRecord) as info:
            record.unpack_from(buf, 4 + len(one), end=len(buf) - 1)
        assert info.value.offset == 4 + len(one)
        assert record.record_size(buf, 4) == len(one)
        assert record.find_marker(buf, 0) == 4
        assert record.find_marker(buf, 5) == 4 + len(one)
        assert record.find_marker(buf, 5 + len(one)) == -1
        assert record.is_record_start(buf, 4)
        assert not record.is_record_start(buf, 5)

    @pytest.mark.parametrize("version", [1, 2])
    def test_every_truncation_is_torn(self, version):
        data = record.pack(METADATA, PAYLOAD, version)
        for cut in range(len(data)):
            with pytest.raises(exceptions.TornRecord):
                record.unpack_from(data[:cut])

    def test_not_a_record(self):
        with pytest.raises(exceptions.OutOfSync):
            record.unpack_from(b"x" * 40)

    def test_unknown_version_in_file(self):
        data = bytearray(record.pack({}, b"x", 1))
        data[4:6] = struct.pack("<h", 7)
        with pytest.raises(exceptions.InvalidVersion):
            record.unpack_from(bytes(data))

    def test_v1_nonzero_end_of_header(self):
        data = bytearray(record.pack({}, b"x", 1))
        data[14:18] = struct.pack("<i", 5)
        with pytest.raises(exceptions.CorruptRecord):
            record.unpack_from(bytes(data))

    @pytest.mark.parametrize("field,value", [
        (6, -1), (10, -1),       # negative block lengths
        (6, 2), (10, 3),         # blocks shorter than their length field
        (18, 3),                 # metadata count not a multiple of 4
        (18, -4),
        (18, 400),               # more lengths than the block holds
        (22, 2),                 # lengths do not add up
        (30, 9),                 # payload length != raw block
    ])
    def test_v1_inconsistent_lengths(self, field, value):
        data = bytearray(record.pack({"a": "b"}, b"payload!", 1))
        data[field:field + 4] = struct.pack("<i", value)
        with pytest.raises(exceptions.RecordError):
            record.unpack_from(bytes(data))

    def test_v2_every_bit_flip_is_detected(self):
        data = record.pack(METADATA, PAYLOAD, 2)
        for bit in range(len(data) * 8):
            bad = bytearray(data)
            bad[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(exceptions.RecordError):
                record.unpack_from(bytes(bad))

    @pytest.mark.parametrize("version", [1, 2])
    def test_huge_length_is_not_trusted(self, version):
        fmt = "<ihIII" if version == 2 else "<ihiii"
        head = struct.pack(fmt, MAGIC, version, 4, record.MAX_BLOCK, 0)
        if version == 2:
            head = head[:14] + struct.pack("<I", zlib.crc32(head[:14]))
        tracemalloc.start()
        try:
            with pytest.raises(exceptions.TornRecord):
                record.unpack_from(head + b"\0" * 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20

    def test_invalid_utf8_does_not_raise(self):
        # shoebox 0.7 (Python 2) could store any bytes
        meta = struct.pack("<iii", 4, 1, 1) + b"\xff\xfe"
        data = (struct.pack("<ihiii", MAGIC, 1, len(meta), 4, 0) + meta
                + struct.pack("<i", 0))
        metadata, payload, _ = record.unpack_from(data)
        assert metadata == {"\udcff": "\udcfe"}
        # and it goes back out as the same bytes
        assert record.pack(metadata, payload, 1) == data


def test_layout_cache_is_bounded():
    for i in range(record._MAX_LAYOUTS + 10):
        data = record.pack({"k": "v" * i}, b"")
        assert record.unpack_from(data)[0] == {"k": "v" * i}
        assert len(record._LAYOUTS) <= record._MAX_LAYOUTS


@settings(max_examples=150, deadline=None)
@given(metadata=metadata_st, payload=payload_st,
       version=st.sampled_from([1, 2]))
def test_round_trip(metadata, payload, version):
    data = record.pack(metadata, payload, version)
    expected = payload.encode("utf-8") if isinstance(payload, str) else payload
    assert record.unpack_from(data) == (metadata, expected, len(data))
    if version == 1:
        assert data == v1_by_hand(metadata.items(), expected)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_record_errors(data):
    for prefix in (b"", struct.pack("<ih", MAGIC, 1),
                   struct.pack("<ih", MAGIC, 2)):
        try:
            record.unpack_from(prefix + data)
        except exceptions.RecordError:
            pass


class _Trickle(io.RawIOBase):
    """A stream handing out at most ``step`` bytes a read, then maybe
    raising ``error`` where its bytes end (a damaged compressed stream)."""

    def __init__(self, data, step=5, error=None):
        self.data, self.pos, self.step, self.error = data, 0, step, error
        self.asked = []

    def readable(self):
        return True

    def read1(self, size=-1):
        self.asked.append(size)
        if self.pos >= len(self.data) and self.error is not None:
            raise self.error
        chunk = self.data[self.pos:self.pos + min(size, self.step)]
        self.pos += len(chunk)
        return chunk


class TestWalk:
    def test_yields_offset_version_size_metadata_payload(self):
        one = record.pack({"n": "1"}, b"one", 1)
        two = record.pack({"n": "2"}, b"two", 2)
        got = list(record.walk(io.BytesIO(one + two)))
        assert got == [(0, 1, len(one), {"n": "1"}, b"one"),
                       (len(one), 2, len(two), {"n": "2"}, b"two")]
        assert all(type(r[4]) is bytes for r in got)

    @pytest.mark.parametrize("step", [1, 7, 1000])
    def test_chunk_boundaries(self, step):
        data = b"".join(record.pack({"i": str(i)}, b"x" * i, 1 + i % 2)
                        for i in range(30))
        got = list(record.walk(_Trickle(data, step), chunk_size=step))
        assert [r[3]["i"] for r in got] == [str(i) for i in range(30)]
        assert [r[1] for r in got] == [1 + i % 2 for i in range(30)]
        assert got[-1][0] + got[-1][2] == len(data)

    def test_strict_raises_with_the_offset(self):
        one = record.pack({"n": "1"}, b"one")
        data = one + b"junk" + record.pack({"n": "2"}, b"two")
        walker = record.walk(io.BytesIO(data))
        assert next(walker)[4] == b"one"
        with pytest.raises(exceptions.OutOfSync) as info:
            next(walker)
        assert info.value.offset == len(one)

    def test_strict_torn_tail(self):
        one = record.pack({"n": "1"}, b"one")
        data = one + record.pack({"n": "2"}, b"two")[:-3]
        with pytest.raises(exceptions.TornRecord) as info:
            list(record.walk(io.BytesIO(data)))
        assert info.value.offset == len(one)

    def test_salvage_reports_ranges_and_resyncs(self):
        one = record.pack({"n": "1"}, b"one")
        two = record.pack({"n": "2"}, b"two", 1)
        torn = record.pack({"n": "3"}, b"three")[:-1]
        data = one + b"junk" + two + torn
        skips = []
        got = list(record.walk(_Trickle(data, 3), salvage=True,
                               on_skip=lambda *s: skips.append(s),
                               chunk_size=3))
        assert [(r[0], r[1], r[4]) for r in got] == [
            (0, 2, b"one"), (len(one) + 4, 1, b"two")]
        end = len(one) + 4 + len(two)
        assert skips == [
            (len(one), len(one) + 4, "no record marker"),
            (end, len(data), "archive ends inside a record (%d of %d bytes)"
             % (len(torn), len(torn) + 1))]

    def test_hostile_length_reads_only_what_the_stream_has(self):
        head = struct.pack("<ihIII", MAGIC, 2, 4, record.MAX_BLOCK, 0)
        head = head[:14] + struct.pack("<I", zlib.crc32(head[:14]))
        # a start that holds (no metadata, the payload's length = R - 4)
        head += struct.pack("<ii", 0, record.MAX_BLOCK - 4)
        stream = _Trickle(head + b"\0" * 100, 1 << 20)
        with pytest.raises(exceptions.TornRecord):
            list(record.walk(stream, chunk_size=64))
        assert max(stream.asked) <= 1 << 24

    def test_damaged_stream_keeps_records_then_reports_once(self):
        one = record.pack({"n": "1"}, b"one")
        data = one + record.pack({"n": "2"}, b"two")[:10]
        walker = record.walk(_Trickle(data, 4, EOFError("cut")),
                             stream_errors=(EOFError,))
        assert next(walker)[4] == b"one"
        with pytest.raises(exceptions.CorruptRecord) as info:
            next(walker)
        assert info.value.offset == len(one)
        assert "compressed stream is damaged: cut" in str(info.value)

        skips = []
        got = list(record.walk(_Trickle(one, 4, EOFError("cut")),
                               salvage=True, stream_errors=(EOFError,),
                               on_skip=lambda *s: skips.append(s)))
        assert [r[4] for r in got] == [b"one"]
        assert skips == [(len(one), len(one),
                          "compressed stream is damaged: cut")]


def v2_header(meta_len, raw_len):
    pre = struct.pack("<ihII", MAGIC, 2, meta_len, raw_len)
    return pre + struct.pack("<I", zlib.crc32(pre))


class TestLimits:
    @pytest.mark.parametrize("version", [1, 2])
    @pytest.mark.parametrize("field", ["M", "R"])
    def test_block_lengths_capped_at_what_writers_make(self, version,
                                                       field):
        def head(length):
            lengths = (length, 8) if field == "M" else (8, length)
            if version == 2:
                return v2_header(*lengths)
            return struct.pack("<ihiii", MAGIC, 1, *lengths, 0)

        with pytest.raises(exceptions.TornRecord):  # accepted, not there
            record.unpack_from(head(record.MAX_BLOCK) + bytes(64))
        assert record.record_size(head(record.MAX_BLOCK)) > record.MAX_BLOCK
        for length in (record.MAX_BLOCK + 1, 0x7FFFFFFF, 0xFFFFFFFF):
            if version == 1 and length > 0x7FFFFFFF:
                continue
            with pytest.raises(exceptions.CorruptRecord,
                               match="longer than any writer makes"):
                record.unpack_from(head(length) + bytes(64))

    def test_the_cap_is_what_pack_writes_at_most(self):
        assert record.MAX_BLOCK == record._MAX_LEN + 4 < 1 << 31

    def test_header_checksum_is_checked(self):
        """A header whose HCRC is wrong while the record's own CRC holds
        (recomputed over the wrong HCRC): only the header check sees it."""
        data = bytearray(record.pack(METADATA, PAYLOAD))
        for pos in range(14, 18):  # each byte of HCRC
            bad = bytearray(data)
            bad[pos] ^= 0x01
            bad[-4:] = struct.pack("<I", zlib.crc32(bytes(bad[:-4])))
            with pytest.raises(exceptions.CorruptRecord,
                               match="header checksum mismatch"):
                record.unpack_from(bytes(bad))
            assert not record.is_record_start(bytes(bad), 0)
            with pytest.raises(exceptions.CorruptRecord):
                record.record_size(bytes(bad))

    def test_header_checksum_guards_the_lengths(self):
        """A length changed in the header, the record's CRC made to hold:
        the header check refuses it before the length is used."""
        data = bytearray(record.pack(METADATA, PAYLOAD + " " * 40))
        data[10] -= 20  # R: 20 bytes shorter
        size = len(data) - 20
        fake = bytearray(data[:size])
        fake[-4:] = struct.pack("<I", zlib.crc32(bytes(fake[:-4])))
        with pytest.raises(exceptions.CorruptRecord,
                           match="header checksum mismatch"):
            record.unpack_from(bytes(fake))

    def test_big_metadata_tables_are_not_cached(self):
        record._LAYOUTS.clear()
        many = {"k%d" % i: "v" for i in range(200)}  # 400 lengths
        data = record.pack(many, b"x")
        assert record.unpack_from(data)[0] == many
        assert len(record._LAYOUTS) == 0
        few = {"k%d" % i: "v" for i in range(100)}
        assert record.unpack_from(record.pack(few, b"x"))[0] == few
        assert len(record._LAYOUTS) == 1

    def test_lengths_that_do_not_add_up_are_not_cached(self):
        record._LAYOUTS.clear()
        meta = struct.pack("<iii", 4, 1, 5) + b"ab"  # 1 + 5 != 2
        raw = struct.pack("<i", 0)
        data = struct.pack("<ihiii", MAGIC, 1, len(meta), len(raw), 0) + \
            meta + raw
        with pytest.raises(exceptions.CorruptRecord, match="add up"):
            record.unpack_from(data)
        assert len(record._LAYOUTS) == 0
        meta = struct.pack("<iii", 4, -1, 3) + b"ab"  # adds up, negative
        data = struct.pack("<ihiii", MAGIC, 1, len(meta), len(raw), 0) + \
            meta + raw
        with pytest.raises(exceptions.CorruptRecord, match="add up"):
            record.unpack_from(data)
        assert len(record._LAYOUTS) == 0


class _CountingZlib:
    """Stands in for zlib in record: counts the bytes checksummed."""

    def __init__(self):
        self.bytes = 0

    def crc32(self, data, value=0):
        self.bytes += len(data)
        return zlib.crc32(data, value)


class TestSalvage:
    def walk(self, data, chunk_size=record.READ_CHUNK):
        skips = []
        got = list(record.walk(io.BytesIO(data), salvage=True,
                               on_skip=lambda *s: skips.append(s),
                               chunk_size=chunk_size))
        return got, skips

    def test_forged_headers_cost_linear_checksum_work(self, monkeypatch):
        """Headers each claiming a 64 KiB record with a bad checksum, one
        after another: every claimed range was checksummed again from
        every header (quadratic); now each byte about once."""
        good = record.pack({"n": "1"}, b"one")
        forged = v2_header(4, 64 << 10) * ((512 << 10) // 18)
        data = good + forged + good
        counter = _CountingZlib()
        monkeypatch.setattr(record, "crc32", counter.crc32)
        got, skips = self.walk(data)
        assert [r[4] for r in got] == [b"one"]
        assert skips[0][:2] == (len(good), len(data))
        assert counter.bytes < 3 * len(data)

    def test_record_inside_an_intact_headers_range_is_not_returned(self):
        """A payload kept verbatim holds a whole valid record; its own
        record is damaged elsewhere: the record inside stays payload."""
        before = record.pack({"n": "before"}, b"1")
        inner = record.pack({"event_type": "fake"}, b"forged")
        outer = bytearray(record.pack({"malformed": "not UTF-8"},
                                      b"\xff" + inner + b"\xfe" * 30))
        outer[-10] ^= 0xFF  # damage the payload after the inner record
        after = record.pack({"n": "after"}, b"2")
        data = before + bytes(outer) + after
        got, skips = self.walk(data)
        assert [r[3] for r in got] == [{"n": "before"}, {"n": "after"}]
        assert [s[:2] for s in skips] == [(len(before),
                                          len(before) + len(outer))]
        # small chunks: the range is passed over across reads too
        got, skips = self.walk(data, chunk_size=7)
        assert [r[3] for r in got] == [{"n": "before"}, {"n": "after"}]

    def test_torn_record_holding_a_record_is_a_torn_tail(self):
        before = record.pack({"n": "before"}, b"1")
        inner = record.pack({"event_type": "fake"}, b"forged")
        outer = record.pack({"malformed": "not UTF-8"},
                            b"\xff" + inner + b"\xfe" * 30)
        data = before + outer[:-20]  # cut after the inner record
        got, skips = self.walk(data)
        assert [r[3] for r in got] == [{"n": "before"}]
        assert skips == [(len(before), len(data),
                          "archive ends inside a record (%d of %d bytes)"
                          % (len(outer) - 20, len(outer)))]

    def test_intact_header_then_garbage_resyncs_at_its_end(self):
        """The next record right at the claimed end is found, whatever
        lies between (the resync starts at the end, not past it)."""
        damaged = bytearray(record.pack({"n": "x"}, b"y" * 50))
        damaged[30] ^= 1
        after = record.pack({"n": "after"}, b"2")
        got, skips = self.walk(bytes(damaged) + after)
        assert [r[3] for r in got] == [{"n": "after"}]
        assert skips[0][:2] == (0, len(damaged))

    @staticmethod
    def nested(outer_version, inner_version):
        """``(before, outer, after)``: an outer record whose payload (a
        body archived as malformed, kept verbatim) holds a whole valid
        record, between two records."""
        inner = record.pack({"event_type": "forged"}, b'{"forged": 1}',
                            inner_version)
        outer = record.pack({"malformed": "not UTF-8"},
                            b"\xff" + inner + b"\xfe" * 7, outer_version)
        return (record.pack({"n": "before"}, b"1"), outer,
                record.pack({"n": "after"}, b"2"))

    @pytest.mark.parametrize("outer_version,inner_version",
                             [(1, 1), (1, 2), (2, 1), (2, 2)])
    def test_no_record_inside_a_header_one_bit_damaged(
            self, outer_version, inner_version):
        """Each of the 144 bits of the header flipped in turn: the record
        its payload holds is never returned, the damaged record is one
        skipped range, the records around it are returned."""
        before, outer, after = self.nested(outer_version, inner_version)
        for bit in range(record.HEADER_SIZE * 8):
            damaged = bytearray(outer)
            damaged[bit // 8] ^= 1 << (bit % 8)
            data = before + bytes(damaged) + after
            for chunk in (record.READ_CHUNK, 7):
                got, skips = self.walk(data, chunk_size=chunk)
                assert [r[3] for r in got] == [{"n": "before"},
                                               {"n": "after"}], bit
                assert [s[:2] for s in skips] == [
                    (len(before), len(before) + len(outer))], bit

    @pytest.mark.parametrize("outer_version", [1, 2])
    def test_no_record_inside_a_record_damaged_at_its_end(self,
                                                          outer_version):
        """Its header, or its last record's, one bit off: the damaged
        record runs to the end of the stream, nothing inside it is
        returned."""
        before, outer, _ = self.nested(outer_version, outer_version)
        for bit in (0, 50, 8 * 6 + 3, 8 * 10, 8 * 14 + 1):
            damaged = bytearray(outer)
            damaged[bit // 8] ^= 1 << (bit % 8)
            got, skips = self.walk(before + bytes(damaged))
            assert [r[3] for r in got] == [{"n": "before"}], bit
            assert [s[:2] for s in skips] == [
                (len(before), len(before) + len(outer))], bit

    def test_v1_body_damaged_under_a_header_that_holds(self):
        """v1 has no header checksum: a v1 record whose header passes but
        whose body fails claims its extent by its header, taken because a
        whole record follows it: the record its payload holds stays
        payload."""
        before, outer, after = self.nested(1, 1)
        bad = bytearray(outer)
        bad[record.HEADER_SIZE] = 8  # the metadata count: 2 pairs, not 1
        got, skips = self.walk(before + bytes(bad) + after)
        assert [r[3] for r in got] == [{"n": "before"}, {"n": "after"}]
        assert [s[:2] for s in skips] == [(len(before),
                                          len(before) + len(bad))]

    def test_a_header_with_many_bits_damaged_before_a_whole_record(self):
        """More than one bit of a v2 header damaged (no repair): the
        lengths in its metadata table and payload field tell its extent,
        taken because a whole record follows it."""
        before, outer, after = self.nested(2, 2)
        bad = bytearray(outer)
        bad[6:14] = b"\xff" * 8  # M and R
        got, skips = self.walk(before + bytes(bad) + after)
        assert [r[3] for r in got] == [{"n": "before"}, {"n": "after"}]
        assert [s[:2] for s in skips] == [(len(before),
                                          len(before) + len(bad))]

    def test_failed_header_resyncs_at_the_next_byte(self):
        """A header that fails its checks where no extent can be told (its
        claimed sizes do not end where a record starts, or run past the
        look ahead): resync at the next byte, and the record there is
        found."""
        inner = record.pack({"n": "inner"}, b"2")
        for version in (1, 2):
            bad = bytearray(record.pack({"n": "x"}, b"y" + inner, version))
            bad[6:18] = b"\x01" * 12  # no checks hold, nor any repair
            bad[record.HEADER_SIZE:record.HEADER_SIZE + 4] = b"\x07\0\0\0"
            got, skips = self.walk(b"junk" + bytes(bad))
            assert [r[3] for r in got] == [{"n": "inner"}]
        # a record claimed past the look ahead is not read ahead for
        big = bytearray(record.pack({}, b"y" * record._WRITTEN_LOOKAHEAD))
        big[6] ^= 3  # two bits of M: no repair
        data = bytes(big) + inner
        got, skips = self.walk(data)
        assert [r[3] for r in got] == [{"n": "inner"}]
        assert skips[0][:2] == (0, len(big))  # the next record found

    def test_repaired_size_is_the_writers(self):
        written = record.pack({"k": "v"}, b"x" * 70000)
        assert record.repaired_size(written) == len(written)
        for bit in range(record.HEADER_SIZE * 8):
            damaged = bytearray(written)
            damaged[bit // 8] ^= 1 << (bit % 8)
            assert record.repaired_size(bytes(damaged)) == len(written)
        damaged = bytearray(written)
        damaged[7] ^= 0x11  # two bits: not repaired, never guessed
        assert record.repaired_size(bytes(damaged)) is None
        v1 = bytearray(record.pack({"k": "v"}, b"x", 1))
        v1[14] ^= 1
        assert record.repaired_size(bytes(v1)) is None

    def test_a_record_too_big_for_memory_stops_salvage_too(self):
        class Huge(_Trickle):
            def read1(self, size=-1):
                if self.pos >= 100:
                    raise MemoryError
                return super().read1(size)

        good = record.pack({"n": "1"}, b"one")
        data = good + v2_header(4, 1 << 30) + struct.pack(
            "<ii", 0, (1 << 30) - 4) + bytes(200)
        for salvage in (False, True):
            walker = record.walk(Huge(data, 50), salvage=salvage,
                                 chunk_size=50)
            assert next(walker)[4] == b"one"
            with pytest.raises(exceptions.RecordError,
                               match="more than this process can hold"
                               ) as info:
                next(walker)
            assert info.value.offset == len(good)

    def test_memory_running_out_while_resyncing_says_where(self):
        # the error comes from a read of _skip's scan, past _next's own
        # offset: the offset is where the scan had got to, in the bytes read
        class Scarce(_Trickle):
            def read1(self, size=-1):
                if self.pos >= len(good) + 120:
                    raise MemoryError
                return super().read1(size)

        good = record.pack({"n": "1"}, b"one")
        data = good + b"\x01" + b"x" * 400 + good
        stream = Scarce(data, 40)
        walker = record.walk(stream, salvage=True, chunk_size=40)
        assert next(walker)[4] == b"one"
        with pytest.raises(exceptions.RecordError,
                           match="more than this process can hold") as info:
            next(walker)
        # where the scan had got to: all the bytes read (it keeps the last
        # ones only when they may begin a marker that straddles two reads;
        # "xxx" cannot)
        assert info.value.offset == stream.pos > len(good)
        assert "offset %d" % info.value.offset in str(info.value)

    def test_memory_running_out_passing_a_damaged_record_says_where(self):
        # a record refuted by its first bytes while still in the buffer
        # (no read, so no rebase); passing the range its header claims
        # then reads, and memory runs out there: the offset is where
        # reading stopped, the end of the bytes read
        class Scarce(_Trickle):
            def read1(self, size=-1):
                if self.pos >= 100:
                    raise MemoryError
                return super().read1(size)

        good = record.pack({"n": "1"}, b"one")
        forged = v2_header(8, 1 << 20) + struct.pack("<ii", -4, 0)
        data = good + forged + bytes(200)
        stream = Scarce(data, 100)
        walker = record.walk(stream, salvage=True, chunk_size=100)
        assert next(walker)[4] == b"one"
        with pytest.raises(exceptions.RecordError,
                           match="more than this process can hold") as info:
            next(walker)
        assert info.value.offset == stream.pos == 100


class _Zeros(io.RawIOBase):
    """An endless stream of zeros (a decompression bomb), counting."""

    def __init__(self, head):
        self.head, self.given = head, 0

    def readable(self):
        return True

    def read1(self, size=-1):
        chunk = self.head[:size] or bytes(size)
        self.head = self.head[len(chunk):]
        self.given += len(chunk)
        return chunk


class TestLongRecordStart:
    """A record longer than the buffer: its first bytes are checked before
    the rest is read (a forged header before gigabytes of zeros)."""

    @pytest.mark.parametrize("lengths, reason", [
        ((4, 64 << 20), "payload length does not match block"),
        ((64 << 20, 8), "metadata lengths do not add up"),
    ])
    def test_forged_header_before_zeros(self, lengths, reason):
        good = record.pack({"n": "1"}, b"one")
        stream = _Zeros(good + v2_header(*lengths))
        walker = record.walk(stream, chunk_size=1 << 16)
        assert next(walker)[4] == b"one"
        with pytest.raises(exceptions.CorruptRecord, match=reason) as info:
            next(walker)
        assert info.value.offset == len(good)
        assert stream.given < 1 << 20  # not the 64 MiB claimed

    @pytest.mark.parametrize("start, reason", [
        (struct.pack("<i", -4), "add up"),
        (struct.pack("<i", 6), "add up"),
        (struct.pack("<i", 1 << 20), "add up"),    # 2 * count > M
        (struct.pack("<iiii", 4, 0, 0, 99), "payload length"),
    ])
    def test_each_early_check(self, start, reason):
        data = v2_header(12, 1 << 20) + start + bytes(1 << 16)
        with pytest.raises(exceptions.CorruptRecord, match=reason):
            list(record.walk(io.BytesIO(data), chunk_size=1 << 10))

    def test_valid_long_records_pass(self):
        data = b"".join(record.pack({"k": "v" * (3 << 10)}, b"x" * (5 << 10),
                                    v) for v in (1, 2, 1))
        got = list(record.walk(_Trickle(data, 100), chunk_size=100))
        assert [r[1] for r in got] == [1, 2, 1]
        blank = record.pack({"": ""}, b"z" * 5000)  # 4 + 2 * count = M
        assert list(record.walk(_Trickle(blank, 64),
                                chunk_size=64))[0][3] == {"": ""}
        empty = record.pack({}, b"y" * 5000)
        assert list(record.walk(_Trickle(empty, 64),
                                chunk_size=64))[0][4] == b"y" * 5000


class _Skips(list):
    """An on_skip callback keeping what it is given."""

    def __call__(self, *skip):
        self.append(skip)


class TestSmallPromises:
    """Details the mutation check found untested."""

    def test_one_junk_byte_before_a_record(self):
        one = record.pack({"n": "1"}, b"one")
        two = record.pack({"n": "2"}, b"two")
        got = list(record.walk(io.BytesIO(one + b"\0" + two), salvage=True))
        assert [r[0] for r in got] == [0, len(one) + 1]
        # a candidate that fails is passed by one byte too
        fake = b"\x84\x78\x86\x69\x07\x00" + two  # marker, bad version
        got = list(record.walk(io.BytesIO(one + fake), salvage=True))
        assert [r[3] for r in got] == [{"n": "1"}, {"n": "2"}]

    def test_long_garbage_is_one_skipped_range(self):
        one = record.pack({"n": "1"}, b"one")
        junk = bytes(range(1, 128)) * 20  # no marker, many chunks
        skips = []
        got = list(record.walk(_Trickle(one + junk + one, 50), salvage=True,
                               chunk_size=50,
                               on_skip=lambda *s: skips.append(s)))
        assert len(got) == 2
        assert [s[:2] for s in skips] == [(len(one), len(one) + len(junk))]

    def test_torn_header_at_the_end(self):
        one = record.pack({"n": "1"}, b"one")
        for tail in (b"\x84\x78\x86\x69\x02", one[:17]):
            skips = _Skips()
            got = list(record.walk(io.BytesIO(one + tail), salvage=True,
                                   on_skip=skips))
            assert len(got) == 1
            assert skips == [(len(one), len(one) + len(tail),
                              "archive ends inside a record header")]

    def test_end_is_honoured(self):
        one = record.pack({"n": "1"}, b"one")
        data = one + one
        assert record.is_record_start(data, len(one))
        assert not record.is_record_start(data, len(one), len(data) - 1)
        assert record.find_marker(data, 1) == len(one)
        assert record.find_marker(data, 1, len(one) + 3) == -1
        assert record.find_marker(data, 1, len(one) + 4) == len(one)

    def test_bad_types_are_named(self):
        with pytest.raises(TypeError) as info:
            record.pack({"k": 1}, b"")
        assert str(info.value) == (
            "metadata and payload must be str or bytes, not int")

    def test_layouts_are_cached_as_layouts(self):
        record._LAYOUTS.clear()
        record.unpack_from(record.pack({"k": "v"}, b""))
        ((table, layout),) = record._LAYOUTS.items()
        # keyed by the length table's bytes: two int32 lengths of 1
        assert table == struct.pack("<ii", 1, 1) and layout[0] == 2


class TestJumpAcrossReads:
    """An intact header whose record fails its early checks: its claimed
    range is passed over read by read, to the exact byte."""

    @pytest.mark.parametrize("chunk", [64, 1000, 1 << 16])
    def test_resumes_exactly_at_the_claimed_end(self, chunk):
        one = record.pack({"n": "1"}, b"one")
        claimed = 5000
        size = record.HEADER_SIZE + 4 + claimed + 4
        inside = record.pack({"n": "inside"}, b"not a record")
        # L = 0: refused early; a valid record inside, at a few places
        forged = (v2_header(4, claimed) + bytes(100) + inside +
                  bytes(2000) + inside).ljust(size, b"\0")
        assert len(forged) == size
        data = one + forged + one
        skips = _Skips()
        got = list(record.walk(_Trickle(data, chunk), salvage=True,
                               chunk_size=chunk, on_skip=skips))
        assert [r[0] for r in got] == [0, len(one) + size]
        assert [s[:2] for s in skips] == [(len(one), len(one) + size)]

    def test_a_stream_without_read1(self):
        class ReadOnly:
            def __init__(self, data):
                self.file = io.BytesIO(data)

            def read(self, size):
                return self.file.read(size)

        one = record.pack({"n": "1"}, b"one")
        assert [r[4] for r in record.walk(ReadOnly(one * 3))] == [b"one"] * 3


class TestPassDamaged:
    """Stepping over a damaged record where the buffer holds it only in
    part (found by the mutation check)."""

    def test_a_claimed_range_past_the_buffer_from_mid_buffer(self):
        """A record refused early starts mid-buffer and claims a few bytes
        past the buffer's end: those bytes are still its own, so the
        record its payload holds is not surfaced, and resync goes on at
        the claimed end."""
        one = record.pack({}, b"x" * 10)
        inner = record.pack({}, b"in")
        damaged = bytearray(record.pack({}, inner))
        damaged[record.HEADER_SIZE] = 3  # the metadata count: refused early
        after = record.pack({"n": "after"}, b"2")
        data = one + bytes(damaged) + after
        # the damaged record starts inside the first read and ends in the
        # second one
        chunk = len(one) + 24
        assert len(one) < chunk < len(one) + len(damaged) < 2 * chunk
        for stream in (io.BytesIO(data), _Trickle(data, chunk)):
            skips = _Skips()
            got = list(record.walk(stream, salvage=True, chunk_size=chunk,
                                   on_skip=skips))
            assert [r[3] for r in got] == [{}, {"n": "after"}]
            assert [r[0] for r in got] == [0, len(one) + len(damaged)]
            assert skips == [(len(one), len(one) + len(damaged),
                              "metadata lengths do not add up")]

    def test_a_torn_header_after_junk_at_the_end(self):
        """Junk, then the first bytes of a header where the stream ends:
        one skipped range to the end, never an error of another kind."""
        one = record.pack({"n": "1"}, b"one")
        tail = bytes(range(1, 13)) + b"\x84\x78\x86\x69\x02\x00"
        assert len(tail) == record.HEADER_SIZE
        for stream in (io.BytesIO(one + tail), _Trickle(one + tail, 100)):
            skips = _Skips()
            got = list(record.walk(stream, salvage=True, on_skip=skips))
            assert [r[4] for r in got] == [b"one"]
            assert skips == [(len(one), len(one) + len(tail),
                              "no record marker")]


class TestEarlyChecksAtTheirFirstBytes:
    """The early checks need only the 4 bytes they read: a forged header
    fails as soon as those are in, whatever the chunk size (found by the
    mutation check: a buffer ending right after them)."""

    claimed = 8 << 20

    @pytest.mark.parametrize("lengths, start, reason", [
        ((claimed, 8), struct.pack("<i", 6),
         "metadata lengths do not add up"),
        ((4, claimed), struct.pack("<ii", 0, 99),
         "payload length does not match block"),
    ])
    def test_refused_with_only_those_bytes_read(self, lengths, start,
                                                reason):
        head = v2_header(*lengths) + start
        stream = _Zeros(head)
        walker = record.walk(stream, chunk_size=len(head))
        with pytest.raises(exceptions.CorruptRecord) as info:
            next(walker)
        assert info.value.message == reason
        assert info.value.offset == 0
        assert stream.given < 1 << 20  # not the 8 MiB claimed
        # salvaging: the same reason, not a torn record at the end
        data = head + bytes(1000)
        skips = _Skips()
        assert list(record.walk(_Trickle(data, len(head)), salvage=True,
                                chunk_size=len(head), on_skip=skips)) == []
        assert skips == [(0, len(data), reason)]


class TestSmallReads:
    """Reads that hand over a few bytes at a time (a pipe, a decompressor's
    read1): found by the mutation check (``_fill``)."""

    @pytest.mark.parametrize("chunk", [1, 2, 3, 4, record.READ_CHUNK])
    def test_long_junk_is_one_range_at_any_chunk_size(self, chunk):
        one = record.pack({"n": "1"}, b"one")
        two = record.pack({"n": "2"}, b"two")
        junk = b"j" * 100  # no marker, longer than a header and a chunk
        skips = _Skips()
        got = list(record.walk(_Trickle(one + junk + two, 3), salvage=True,
                               on_skip=skips, chunk_size=chunk))
        assert [r[4] for r in got] == [b"one", b"two"]
        assert skips == [(len(one), len(one) + len(junk),
                          "no record marker")]

    def test_a_record_is_yielded_before_the_rest_is_read(self):
        one = record.pack({"n": "1"}, b"one")
        rest = b"".join(record.pack({"i": str(i)}, b"x" * 50)
                        for i in range(40))
        stream = _Trickle(one + rest, 3)
        walker = record.walk(stream, chunk_size=64)
        assert next(walker)[4] == b"one"
        # the bytes of that record and at most one chunk more
        assert stream.pos <= len(one) + 64
        assert len(list(walker)) == 40


def test_the_checksum_is_zlibs_crc32_whichever_computes_it():
    # record.crc32 is isal's when installed: the same function as zlib's
    data = bytes(range(256)) * 40
    for piece in (b"", data[:14], data, memoryview(data)[3:3000]):
        assert record.crc32(piece) == zlib.crc32(piece)
    packed = record.pack({"k": "v"}, data)
    assert int.from_bytes(packed[-4:], "little") == zlib.crc32(packed[:-4])


def v1_header(meta_len, raw_len, third=0):
    return struct.pack("<ihiii", MAGIC, 1, meta_len, raw_len, third)


class TestHeaderErrors:
    """Each check of a header, its class, reason and offset (the offset
    given to :func:`record.unpack_from`): what salvage and verify report.
    (Survivors of the mutation check, docs/mutation.md.)"""

    @pytest.mark.parametrize("header,error,reason", [
        (b"x" * 18, exceptions.OutOfSync, "no record marker"),
        (v2_header(8, 12)[:14] + b"\0\0\0\0", exceptions.CorruptRecord,
         "header checksum mismatch"),
        (v1_header(8, 12, third=1), exceptions.CorruptRecord,
         "end-of-header marker is not 0"),
        (v1_header(-2 ** 31, 12), exceptions.CorruptRecord,
         "negative block length"),
        (v1_header(8, -2 ** 31), exceptions.CorruptRecord,
         "negative block length"),
        (v1_header(-1, 12), exceptions.CorruptRecord,
         "negative block length"),
        (struct.pack("<ihiii", MAGIC, 7, 8, 12, 0),
         exceptions.InvalidVersion, "unknown format version 7"),
        (v2_header(3, 12), exceptions.CorruptRecord,
         "block shorter than its length field"),
        (v1_header(8, 3), exceptions.CorruptRecord,
         "block shorter than its length field"),
        (v2_header(8, record.MAX_BLOCK + 1), exceptions.CorruptRecord,
         "block longer than any writer makes (%d bytes)"
         % (record.MAX_BLOCK + 1)),
    ])
    def test_reason_and_offset(self, header, error, reason):
        with pytest.raises(error) as info:
            record.unpack_from(b"junk" + header + bytes(64), 4)
        assert (info.value.message, info.value.offset) == (reason, 4)
        with pytest.raises(error) as info:
            record.record_size(b"junk" + header, 4)
        assert info.value.offset == 4


class TestPackLimits:
    def test_blocks_longer_than_the_format_holds_are_refused(
            self, monkeypatch):
        monkeypatch.setattr(record, "_MAX_LEN", 64)
        record.pack({}, b"x" * 64)  # at the limit: written
        record.pack({"k": "v" * 51}, b"")  # a 64-byte metadata block
        for metadata, payload in (({}, b"x" * 65), ({"k": "v" * 52}, b"")):
            with pytest.raises(ValueError) as info:
                record.pack(metadata, payload)
            assert str(info.value) == "record too large for the format " \
                "(2 GiB)"

    def test_unknown_version_is_named(self):
        with pytest.raises(exceptions.InvalidVersion) as info:
            record.pack({}, b"", version=3)
        assert str(info.value) == "cannot write format version 3"


class TestTornReasons:
    @pytest.mark.parametrize("version", [1, 2])
    def test_a_whole_header_is_a_torn_record_not_a_torn_header(
            self, version):
        data = record.pack({"k": "v"}, b"payload", version)
        for cut, reason in (
                (17, "archive ends inside a record header"),
                (18, "archive ends inside a record (18 of %d bytes)"
                 % len(data))):
            with pytest.raises(exceptions.TornRecord) as info:
                record.unpack_from(b"junk" + data[:cut], 4)
            assert (info.value.message, info.value.offset) == (reason, 4)


class TestBodyErrors:
    """The checks past the header: reason and offset, as for the header."""

    @staticmethod
    def changed(version, field, value):
        data = bytearray(record.pack({"a": "b"}, b"payload!", version))
        data[field:field + 4] = struct.pack("<i", value)
        return bytes(data)

    @pytest.mark.parametrize("data,reason", [
        (changed(2, 30, 9), "record checksum mismatch"),
        (changed(1, 18, 3), "bad metadata count 3"),
        (changed(1, 30, 9), "payload length does not match block"),
        (changed(1, 18, 0), "metadata lengths do not add up"),
        (changed(1, 18, 400), "metadata lengths overrun"),
        (changed(1, 22, 2), "metadata lengths do not add up"),
    ])
    def test_reason_and_offset(self, data, reason):
        with pytest.raises(exceptions.CorruptRecord) as info:
            record.unpack_from(b"junk" + data, 4)
        assert (info.value.message, info.value.offset) == (reason, 4)


@settings(max_examples=200, deadline=None)
@given(buf=st.lists(st.sampled_from([b"\0", _MARKER[:1], _MARKER[:2],
                                     _MARKER[:3], _MARKER, _MARKER[1:]]),
                    max_size=30).map(b"".join),
       start=st.integers(0, 60), end=st.one_of(st.none(), st.integers(0, 60)))
def test_find_marker_finds_what_a_search_for_all_four_bytes_finds(buf, start,
                                                                  end):
    """find_marker looks for the marker's first byte first: lone first
    bytes, partial markers, markers cut by ``end`` and ``start`` inside a
    marker find what ``bytes.find`` of the whole marker finds."""
    want = buf.find(_MARKER, start, len(buf) if end is None else end)
    assert record.find_marker(buf, start, end) == want
    assert record.find_marker(bytearray(buf), start, end) == want


@pytest.mark.parametrize("end,kept", [
    (b"", 0), (b"\0\0\0", 0), (_MARKER, 0), (_MARKER[:1], 1),
    (_MARKER[:2], 2), (_MARKER[:3], 3), (b"\0" + _MARKER[:3], 3),
    (_MARKER[:1] * 3, 1), (_MARKER[1:], 0), (_MARKER[:2] + b"\0", 0)])
def test_a_scan_keeps_only_the_last_bytes_a_marker_may_start_with(end,
                                                                  kept):
    """Salvage's scan keeps, of a buffer with no marker, only the last
    bytes that are a marker's first ones (they may straddle the next
    read); zeros and other bytes go, so that the next read is not
    copied."""
    assert record._marker_start_at_end(b"x" * 8 + end) == kept


@pytest.mark.parametrize("chunk", [16, 25, 64])
def test_salvage_finds_a_marker_split_between_two_reads(chunk):
    """Junk of every length before a record, read ``chunk`` bytes at a
    time: the record's marker is cut by a read at each of its three
    places in turn, and salvage keeps its first bytes for the next read
    (dropping them loses the record)."""
    good = record.pack({"n": "after"}, b"2")
    for junk in range(1, 3 * chunk + 1):
        data = b"\0" * junk + good
        skips = []
        got = list(record.walk(_Trickle(data, chunk), salvage=True,
                               on_skip=lambda *s, skips=skips: skips.append(s),
                               chunk_size=chunk))
        assert [r[3] for r in got] == [{"n": "after"}], junk
        assert [s[:2] for s in skips] == [(0, junk)], junk
