"""shoebox_worker.swift.layout: the names the swift step writes are the
ones the readers skip and the cleanup finds."""

import pytest

from shoebox_worker.swift import layout


def test_segments_live_in_their_own_container():
    assert layout.segment_container("archive") == "archive_segments"


@pytest.mark.parametrize("obj", ["a.arc", "2026/12/07/w-1.arc.gz",
                                 "dir/with.dots/x", "[re]+(chars)?.*"])
def test_every_segment_name_is_found_again(obj):
    names = [layout.segment_name(obj, 5 << 20, 1 << 20, i)
             for i in (0, 1, 99999999)]
    assert names[0] == "%s/%d/%d/00000000" % (obj, 5 << 20, 1 << 20)
    pattern = layout.segment_pattern(obj)
    for name in names:
        assert layout.is_segment(name), name
        assert pattern.match(name), name
    # another object's segments are not this one's, whatever it shares
    assert not pattern.match(layout.segment_name(obj + "x", 1, 1, 0))
    assert not pattern.match(layout.segment_name("x" + obj, 1, 1, 0))


@pytest.mark.parametrize("name", [
    "a.arc", "a.arc.index", "a.arc/5/1", "a.arc/5/1/0000000",
    "a.arc/5/1/000000001", "a.arc/x/1/00000000", "a.arc/5/1/00000000/",
    "prefix.shoebox-index-bundle"])
def test_other_names_are_not_segments(name):
    assert not layout.is_segment(name)
