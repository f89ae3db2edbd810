"""The one reading of a record's ``timestamp``."""

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# -- normalise: to_text(parse(...)), with oslo's form fast ----------------

@pytest.mark.parametrize("value, normal", [
    ("2026-11-26 16:11:12.000000", "2026-11-26T16:11:12.000000Z"),
    ("2026-11-26T16:11:12.123456", "2026-11-26T16:11:12.123456Z"),
    ("2026-11-26T16:11:12+02:00", "2026-11-26T14:11:12.000000Z"),
    ("2026-11-26T23:11:12-02:00", "2026-11-27T01:11:12.000000Z"),
    ("2026-11-26 16:11:12.5", "2026-11-26T16:11:12.500000Z"),
    ("2026-11-26", "2026-11-26T00:00:00.000000Z"),
    ("2024-02-29 00:00:00.000000", "2024-02-29T00:00:00.000000Z"),
    (" 2026-11-26T16:11:12Z ", "2026-11-26T16:11:12.000000Z"),
])
def test_normalised(value, normal):
    assert timestamps.normalise(value) == normal


@pytest.mark.parametrize("value", [
    None, 5, "", "yesterday", "2026-02-30 16:11:12.000000",
    "2026-13-01 00:00:00.000000", "2026-11-26 24:00:00.000000",
    "1969-12-31 23:59:59.000000", "3000-01-01 00:00:00.000000",
    "2026-11-26T16:11:12" + "0" * 40])
def test_not_a_timestamp_is_none(value):
    assert timestamps.normalise(value) is None


@given(st.datetimes(min_value=datetime.datetime(1970, 1, 2),
                    max_value=datetime.datetime(2999, 12, 30)),
       st.sampled_from([" ", "T"]))
def test_fast_path_agrees_with_the_calendar(moment, sep):
    text = moment.strftime("%Y-%m-%d" + sep + "%H:%M:%S.%f")
    assert timestamps.normalise(text) == moment.strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    # and text order is time order
    later = moment + datetime.timedelta(microseconds=1)
    assert timestamps.normalise(later.isoformat(sep)) > \
        timestamps.normalise(text)


@given(st.one_of(st.text(max_size=45), st.from_regex(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}",
    fullmatch=True)))
def test_normalise_is_to_text_of_parse_for_any_text(value):
    assert timestamps.normalise(value) == timestamps.to_text(
        timestamps.parse(value))
