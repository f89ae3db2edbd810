"""The one reading of a record's ``timestamp``."""

import datetime

import pytest

from shoebox_worker import timestamps

UTC = datetime.UTC


@pytest.mark.parametrize("value, expected", [
    ("2024-03-09 10:00:00.123456", datetime.datetime(2024, 3, 9, 10, 0, 0,
                                                     123456, tzinfo=UTC)),
    ("2024-03-09T10:00:00+01:00", datetime.datetime(2024, 3, 9, 9,
                                                    tzinfo=UTC)),
    ("2024-03-09T10:00:00Z", datetime.datetime(2024, 3, 9, 10, tzinfo=UTC)),
    (" 2024-03-09 ", datetime.datetime(2024, 3, 9, tzinfo=UTC)),
])
def test_plausible_times_parse_as_utc(value, expected):
    assert timestamps.parse(value) == expected
    assert timestamps.parse(value).utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize("value", [
    None, 7, "", "yesterday", "2024-13-45T99:99:99", "1969-12-31T23:59:59",
    "1970-01-01T00:59:59+01:00", "3000-01-01", "2024-03-09\x0010:00",
    "2024-03-09 \u00e9t\u00e9", "2024-03-09T10:00:00" + "0" * 30])
def test_anything_else_is_none(value):
    assert timestamps.parse(value) is None
    assert timestamps.record_time({"timestamp": value}) is None


def test_record_time_of_odd_metadata_is_none():
    for metadata in (None, "timestamp", ["a"], {}, {"timestamp": None}):
        assert timestamps.record_time(metadata) is None


def test_to_text_is_fixed_width_utc_and_sorts_as_time():
    moments = [timestamps.parse(v) for v in (
        "2024-03-09T10:00:00+05:00", "2024-03-09 06:00:00.5",
        "2024-03-09T07:00:00-01:00", "2025-01-01")]
    texts = [timestamps.to_text(m) for m in moments]
    assert texts[0] == "2024-03-09T05:00:00.000000Z"
    assert texts[2] == "2024-03-09T08:00:00.000000Z"
    assert {len(t) for t in texts} == {27}
    assert sorted(texts) == [timestamps.to_text(m) for m in sorted(moments)]
    assert all(timestamps.parse(t) == m
               for t, m in zip(texts, moments, strict=True))
    assert timestamps.to_text(None) is None


def test_span_is_min_and_max_of_every_record_not_first_and_last():
    span = timestamps.Span()
    assert span.texts() == (None, None)
    for value in ("2024-03-09 10:00:00", "not a time", "2024-03-09 08:00:00",
                  "2024-03-09 12:00:00", "2024-03-09 09:00:00"):
        span.add({"timestamp": value})
    span.add({})
    span.add(None)
    assert span.texts() == ("2024-03-09T08:00:00.000000Z",
                            "2024-03-09T12:00:00.000000Z")
    copy = span.copy()
    span.add({"timestamp": "2020-01-01"})
    assert copy.earliest == timestamps.parse("2024-03-09 08:00")
    assert span.earliest == timestamps.parse("2020-01-01")
