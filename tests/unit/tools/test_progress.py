"""Tests for shoebox_worker.tools.progress: when a bar shows, and what the
read's bar counts."""

import io
import types

import pytest

from shoebox_worker.tools import progress


class Terminal(io.StringIO):
    def isatty(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return True


def test_a_bar_shows_whole_counts():
    out = io.StringIO()
    bar = progress.bar(1000, file=out, enabled=True)
    bar.update(31)
    bar.refresh()
    bar.close()
    assert "31/1000" in out.getvalue()
    assert "1.00k" not in out.getvalue()


def test_a_bar_is_hidden_off_a_terminal():
    assert progress.bar(10, file=io.StringIO()).disable
    assert not progress.bar(10, file=Terminal()).disable


@pytest.mark.parametrize("stderr, stdout, prints_lines, shown", [
    (Terminal(), io.StringIO(), True, True),    # cat > file
    (Terminal(), Terminal(), True, False),      # cat on the terminal
    (Terminal(), Terminal(), False, True),      # replay, export
    (io.StringIO(), io.StringIO(), False, False),  # all piped
    (io.StringIO(), Terminal(), True, False),
])
def test_wanted_only_on_a_terminal_and_never_across_output(
        stderr, stdout, prints_lines, shown):
    assert progress.wanted(prints_lines, stderr=stderr,
                           stdout=stdout) is shown


def test_a_closed_stream_is_no_terminal():
    closed = Terminal()
    closed.close()
    assert not progress.wanted(False, stderr=closed)


def test_reading_counts_archives_and_their_stored_bytes():
    items = [types.SimpleNamespace(size=2048), types.SimpleNamespace(
        size=None), types.SimpleNamespace(size=1024)]
    out = io.StringIO()
    reading = progress.Reading(items, True, file=out)
    seen = []
    for item in reading.track(iter(items)):
        seen.append((reading.done, item.size))
    assert seen == [(0, 2048), (1, None), (2, 1024)]  # counted once done
    assert reading.done == 3
    text = out.getvalue()
    assert "3/3 archives" in text and "3.00k/3.00k" in text


def test_reading_closes_its_bar_when_the_read_stops_early():
    items = [types.SimpleNamespace(size=10)] * 3
    reading = progress.Reading(items, False)
    tracked = reading.track(iter(items))
    next(tracked)
    tracked.close()  # a reader that stopped (| head)
    assert reading.done == 0
    assert reading._bar.disable
