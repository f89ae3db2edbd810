"""Tests for shoebox_worker.logs: two spellings of one format, UTC, and a
file that follows logrotate and SIGHUP."""

import json
import logging
import os
import re
import signal

import pytest

from shoebox_worker import logs

#: 2026-12-03T09:33:45.123Z
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def _record(message="hello %s", args=("world",), exc_info=None):
    record = logging.LogRecord("shoebox_worker.x", logging.WARNING, "f.py",
                               1, message, args, exc_info)
    record.created = 1796290425.1234  # 2026-12-03T09:33:45.123Z
    return record


def test_text_and_json_have_the_same_fields_in_utc():
    record = _record()
    text = logs.TextFormatter().format(record)
    data = json.loads(logs.JsonFormatter().format(record))
    assert data == {"time": "2026-12-03T09:33:45.123Z", "level": "WARNING",
                    "logger": "shoebox_worker.x", "pid": os.getpid(),
                    "message": "hello world"}
    assert text == "2026-12-03T09:33:45.123Z WARNING shoebox_worker.x [%d] " \
        "hello world" % os.getpid()


def test_a_traceback_keeps_json_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = _record("failed", (), sys.exc_info())
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed"
    assert data["traceback"].startswith("Traceback (most recent call last)")
    assert data["traceback"].endswith("ValueError: boom")
    text = logs.TextFormatter().format(record)
    assert text.splitlines()[0].endswith(" failed")
    assert text.endswith("ValueError: boom")


def test_the_time_is_utc_whatever_the_local_zone(monkeypatch):
    import time
    monkeypatch.setenv("TZ", "America/St_Johns")  # UTC-3:30
    time.tzset()
    try:
        line = logs.JsonFormatter().format(_record())
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert json.loads(line)["time"] == "2026-12-03T09:33:45.123Z"


def test_the_file_is_reopened_when_moved_and_on_sighup(tmp_path):
    path = tmp_path / "worker.log"
    previous = signal.getsignal(signal.SIGHUP)
    try:
        logs.setup("INFO", file=str(path), format="json")
        log = logging.getLogger("shoebox_worker.test")
        log.info("one")
        os.rename(path, tmp_path / "worker.log.1")   # what logrotate does
        log.info("two")                              # lands in a new file
        assert [json.loads(line)["message"] for line in
                (tmp_path / "worker.log.1").read_text().splitlines()] == [
            "one"]
        assert [json.loads(line)["message"] for line in
                path.read_text().splitlines()] == ["two"]
        assert all(UTC_TIME.match(json.loads(line)["time"])
                   for line in path.read_text().splitlines())
        # SIGHUP: marked as moved (nothing closed or written inside the
        # signal handler), reopened by name at the next line
        os.rename(path, tmp_path / "worker.log.2")
        assert signal.getsignal(signal.SIGHUP) is logs.reopen
        os.kill(os.getpid(), signal.SIGHUP)
        (handler,) = logs._handlers()
        assert (handler.dev, handler.ino) == (-1, -1)
        assert not path.exists()
        log.info("three")
        assert [json.loads(line)["message"] for line in
                path.read_text().splitlines()] == ["three"]
        assert [json.loads(line)["message"] for line in (
            tmp_path / "worker.log.2").read_text().splitlines()] == ["two"]
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("value, expected", [("json", "json"),
                                             ("JSON", "json"),
                                             ("", None), ("xml", None)])
def test_the_format_option(tmp_path, value, expected):
    from shoebox_worker import config
    path = tmp_path / "w.conf"
    path.write_text("[broker]\nurl = memory://\n[consumer:q]\n[archive]\n"
                    "working_directory = %s\n[logging]\nformat = %s\n"
                    % (tmp_path, value))
    if expected is None:
        with pytest.raises(config.ConfigError, match=r"\[logging\] format: "
                           r"expected one of text, json"):
            config.load(path, environ={})
    else:
        assert config.load(path, environ={}).logging.format == expected
