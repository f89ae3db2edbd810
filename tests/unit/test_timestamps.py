"""Tests for shoebox_worker.timestamps: the one shape of record times."""

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoebox_worker import timestamps


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
