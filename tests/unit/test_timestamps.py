"""Tests for shoebox_worker.timestamps: which record timestamps are
moments, and their UTC text."""

import datetime

import pytest

from shoebox_worker import timestamps


@pytest.mark.parametrize("value, expected", [
    ("2024-03-09 10:00:00", "2024-03-09T10:00:00.000000Z"),  # oslo: naive
    ("2024-03-09 10:00:00.123456", "2024-03-09T10:00:00.123456Z"),
    ("2024-03-09T10:00:00+01:00", "2024-03-09T09:00:00.000000Z"),
    (" 2024-03-09T10:00:00Z ", "2024-03-09T10:00:00.000000Z"),
])
def test_plausible_timestamps_are_utc_moments(value, expected):
    moment = timestamps.record_time({"timestamp": value})
    assert moment.tzinfo is datetime.UTC
    assert timestamps.utc_text(moment) == expected


@pytest.mark.parametrize("metadata", [
    None, {}, {"timestamp": 5}, {"timestamp": "yesterday"},
    {"timestamp": "0001-01-01T00:00:00+01:00"},   # OverflowError in UTC
    {"timestamp": "1969-12-31T23:59:59Z"}, {"timestamp": "3000-01-01"},
    {"timestamp": "2024-03-09\x0010:00"}, {"timestamp": "2024-03-09 10:00é"},
    {"timestamp": "2024-03-09 10:00:00".rjust(41)},
])
def test_anything_else_is_none_never_an_error(metadata):
    assert timestamps.record_time(metadata) is None


def test_the_length_limit_is_inclusive():
    stamp = "2024-03-09 10:00:00"
    assert timestamps.record_time({"timestamp": stamp.rjust(40)})


def test_utc_text_sorts_as_the_moments_do():
    moments = [datetime.datetime(2024, 3, 9, 10, tzinfo=datetime.UTC),
               datetime.datetime(2024, 3, 9, 10, 0, 0, 1,
                                 tzinfo=datetime.UTC),
               datetime.datetime(2024, 3, 10, tzinfo=datetime.UTC)]
    texts = [timestamps.utc_text(m) for m in moments]
    assert texts == sorted(texts)
