"""The worker's log file under logrotate, as etc/shoebox-worker.logrotate
rotates it: moved while the worker runs (on the real RabbitMQ), the next
line lands in the new file; JSON lines with UTC times in both."""

import json
import pathlib
import re
import shutil
import signal
import subprocess

import pytest

pytestmark = pytest.mark.functional

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "shoebox-worker.logrotate"
ROUTING_KEY = "notifications.info"


def _lines(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logrotate_moves_the_file_and_the_next_line_lands_in_the_new_one(
        rabbit, names, tmp_path, ft):
    logrotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if pathlib.Path(
            "/usr/sbin/logrotate").exists() else None)
    if logrotate is None:
        ft.unavailable("logrotate is not installed (Debian package logrotate)")
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), ROUTING_KEY)
    log = tmp_path / "log" / "worker.log"
    log.parent.mkdir(mode=0o700)
    config = ft.worker_config(tmp_path, queue, names,
                              routing_key=ROUTING_KEY,
                              worker={"stats_interval": 0.3})
    with open(config, "a") as f:
        f.write("file = %s\nformat = json\n" % log)
    # the example, for this file and this (root) user
    text = EXAMPLE.read_text()
    assert "/var/log/shoebox-worker/worker.log {" in text
    rotate = tmp_path / "logrotate.conf"
    rotate.write_text(text.replace("/var/log/shoebox-worker/worker.log",
                                   str(log)).replace(
        "create 0600 shoebox-worker shoebox-worker", "create 0600 root root"))
    proc = ft.WorkerProcess(config)
    try:
        ft.wait_until(lambda: any("consuming from" in line["message"]
                                  for line in _lines(log)), 30,
                      message="the worker consuming")
        ft.publish(ft.AMQP_URL, 20, names, ROUTING_KEY)
        result = subprocess.run(
            [logrotate, "--force", "--state", str(tmp_path / "state"),
             str(rotate)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        moved = tmp_path / "log" / "worker.log.1"
        assert moved.exists()  # delaycompress: not compressed yet
        before = len(_lines(moved))
        # the next lines (the stats line every 0.3 s) land in the new file
        ft.wait_until(lambda: any("msg/s" in line["message"]
                                  for line in _lines(log)), 30,
                      message="a line in the new file")
        assert len(_lines(moved)) == before  # nothing more in the old one
        assert log.stat().st_mode & 0o777 == 0o600
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.log_tail()
    finally:
        if proc.alive():
            proc.kill()
    for line in _lines(moved) + _lines(log):
        assert list(line)[:5] == ["time", "level", "logger", "pid",
                                  "message"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
                            line["time"]), line
    assert any(line["message"] == "stopped" for line in _lines(log))
    # one mask for a password wherever the URL is logged
    messages = " ".join(line["message"] for line in _lines(moved))
    assert "guest:***@" in messages and ":**@" not in messages
