"""The one rule, walked through every command as an operator types it.

An operational error is one line on stderr naming what failed and what to
do, exit code 1 (2 for a mistake in the command line or the config), and
never a traceback unless ``--debug`` asks for one. ``run`` logs to stderr:
there, every line before the error is one log line (no traceback, no
multi-line dump) and the error is the last line.

Each case is ``(command, setup)``: ``setup(ctx)`` prepares what the case
needs (files, broker objects) and returns the arguments after the command.
The broker cases use the real RabbitMQ (unique names, deleted afterwards).
"""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from shoebox_worker import archive

pytestmark = pytest.mark.functional

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: A line of the worker's log (shoebox_worker.logs.TextFormatter).
LOG_LINE = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
                      r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[\d+\] ")
#: Longest any case may take (a case that hangs fails at this bound).
TIMEOUT = 20

#: Marks for the cases another part of issue 12 makes pass.


@dataclasses.dataclass
class Ctx:
    tmp_path: object
    names: str
    ft: object
    rabbit: object = None

    def closed_port_url(self):
        return "amqp://guest:s3cret@127.0.0.1:%d//" % self.ft.closed_port()

    def config(self, url=AMQP_URL, **kwargs):
        return self.ft.worker_config(self.tmp_path, self.names + "-q",
                             self.names + "-ex", url=url, **kwargs)

    def archive(self, damaged=False):
        path = self.tmp_path / "a.events"
        with archive.ArchiveWriter(str(path)) as writer:
            for n in range(3):
                writer.write({"event_type": "e"},
                             b'{"event_type": "e", "n": %d}' % n)
        if damaged:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        return str(path)

    def text_file(self):
        path = self.tmp_path / "README.md"
        path.write_text("# not an archive\n" * 50)
        return str(path)


def _bad_value(ctx):
    return ["--config", ctx.config(archive_options={"fsync_every": "x"})]


def _workdir(where):
    def setup(ctx):
        (ctx.tmp_path / "f").write_text("x")
        path = where.format(tmp=ctx.tmp_path)
        return ["--config",
                ctx.config(archive_options={"working_directory": path})]
    return setup


def _broker_down(ctx):
    return ["--config", ctx.config(url=ctx.closed_port_url(),
                                   broker={"connect_max_retries": 1})]


def _missing_queue(ctx):
    return ["--config", ctx.config(consumer_options={"declare": False}),
            "--idle-exit", "1"]


def _durable_mismatch(ctx):
    ctx.rabbit.declare(ctx.names + "-q", ctx.names + "-ex", "",
                       durable=True)
    return ["--config", ctx.config(durable=False,
                                   consumer_options={
                                       "exchange_durable": True}),
            "--idle-exit", "1"]


def _replay(ctx, config, exchange):
    return ["--config", config, "--exchange", exchange,
            "--routing-key", "x", ctx.archive()]


def _generate_unbound(ctx):
    ctx.rabbit.track_exchange(ctx.names + "-ex")
    return ["--url", AMQP_URL, "--count", "3", "--exchange",
            ctx.names + "-ex", "--routing-key", ctx.names + "-unbound"]


#: (id, command, setup, exit code, text in the error line, --debug shows a
#: traceback, uses the broker, xfail reason)
CASES = [
    ("no-command", None, lambda ctx: [], 2, "required: COMMAND", False),
    ("unknown-command", "frob", lambda ctx: [], 2, "invalid choice", False),
    ("run-missing-config", "run",
     lambda ctx: ["--config", str(ctx.tmp_path / "nope.conf")], 2,
     "cannot read", True),
    ("run-unknown-option", "run",
     lambda ctx: ["--config", ctx.config(), "--bogus"], 2,
     "unrecognized arguments: --bogus", False),
    ("run-bad-value", "run", _bad_value, 2, "[archive] fsync_every", True),
    ("run-workdir-proc", "run", _workdir("/proc/nope"), 2,
     "[archive] working_directory: cannot create /proc/nope", True),
    ("run-workdir-under-a-file", "run", _workdir("{tmp}/f/sub"), 2,
     "[archive] working_directory: cannot create", True),
    ("run-broker-down", "run", _broker_down, 1,
     "cannot connect to the broker amqp://guest:***@127.0.0.1:", True),
    ("run-declare-false-missing-queue", "run", _missing_queue, 2,
     "-q", True, True),
    ("run-durable-mismatch", "run", _durable_mismatch, 2, "durable", True,
     True),
    ("check-config-missing", "check-config",
     lambda ctx: ["--config", str(ctx.tmp_path / "nope.conf")], 2,
     "cannot read", True),
    ("check-config-bad-value", "check-config", _bad_value, 2,
     "[archive] fsync_every", True),
    ("check-config-workdir-proc", "check-config", _workdir("/proc/nope"), 2,
     "[archive] working_directory", True),
    ("check-config-workdir-a-file", "check-config", _workdir("{tmp}/f"), 2,
     "[archive] working_directory", True),
    ("check-config-no-config", "check-config", lambda ctx: [], 2,
     "required: --config", False),
    ("cat-missing", "cat", lambda ctx: [str(ctx.tmp_path / "nope")], 1,
     "no such file or directory", True),
    ("cat-not-an-archive", "cat", lambda ctx: [ctx.text_file()], 1,
     "not a shoebox archive", True),
    ("cat-damaged", "cat", lambda ctx: [ctx.archive(damaged=True)], 1,
     "use --salvage", True),
    ("cat-unknown-option", "cat", lambda ctx: ["--bogus", ctx.archive()], 2,
     "unrecognized arguments: --bogus", False),
    ("cat-bad-match", "cat", lambda ctx: ["--match", "x", ctx.archive()], 2,
     "expected KEY=GLOB", False),
    ("verify-missing", "verify", lambda ctx: [str(ctx.tmp_path / "nope")],
     1, "no such file or directory", False),
    ("verify-not-an-archive", "verify", lambda ctx: [ctx.text_file()], 1,
     "not a shoebox archive", False),
    ("verify-no-path", "verify", lambda ctx: [], 2, "required: PATH",
     False),
    ("replay-broker-down", "replay",
     lambda ctx: _replay(ctx, _broker_down(ctx)[1], "nova"), 1,
     "amqp://guest:***@127.0.0.1:", True),
    ("replay-missing-exchange", "replay",
     lambda ctx: _replay(ctx, ctx.config(), ctx.names + "-none"), 1,
     "no exchange", True, True),
    ("replay-bad-config", "replay",
     lambda ctx: _replay(ctx, _bad_value(ctx)[1], "nova"), 2,
     "[archive] fsync_every", True),
    ("replay-not-an-archive", "replay",
     lambda ctx: _replay(ctx, ctx.config(), "amq.topic")[:-1] +
     [ctx.text_file()], 1, "not a shoebox archive", True, True),
    ("generate-broker-down", "generate",
     lambda ctx: ["--url", ctx.closed_port_url(), "--count", "1"], 1,
     "amqp://guest:***@127.0.0.1:", True),
    ("generate-bad-count", "generate",
     lambda ctx: ["--url", AMQP_URL, "--count", "x"], 2,
     "invalid int value", False),
    ("generate-unbound-routing-key", "generate", _generate_unbound, 1,
     "returned", True, True),
]


def _params():
    for case in CASES:
        case = case + (False, None)[len(case) - 6:]
        ident, command, setup, code, text, debug, uses_broker, xfail = case
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] \
            if xfail else []
        yield pytest.param(command, setup, code, text, debug, uses_broker,
                           id=ident, marks=marks)


def _run(argv):
    try:
        return subprocess.run([WORKER, *argv], capture_output=True,
                              text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("shoebox-worker %s did not exit within %d s" % (
            " ".join(argv), TIMEOUT))


def _error_line(result, code):
    """Assert the one rule; return the error line."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("shoebox-worker"), err
    # before it, only the worker's own log lines, one line each
    for line in lines[:-1]:
        assert LOG_LINE.match(line), "not a log line: %r in\n%s" % (line,
                                                                    err)
    assert "s3cret" not in err
    return lines[-1]


@pytest.mark.parametrize("command, setup, code, text, debug, uses_broker",
                         list(_params()))
def test_one_line(request, tmp_path, names, ft, command, setup, code, text,
                  debug, uses_broker):
    rabbit = request.getfixturevalue("rabbit") if uses_broker else None
    ctx = Ctx(tmp_path, names, ft, rabbit)
    argv = ([command] if command else []) + setup(ctx)
    line = _error_line(_run(argv), code)
    assert text in line, line
    if request.node.callspec.id == "run-durable-mismatch":
        # the flag that differs, not every flag it might be; and no
        # meaningless stats line before it
        assert "auto_delete" not in line and "queue_arguments" not in line
        assert "msg/s" not in _run(argv).stderr
    if debug:
        # --debug shows the traceback, typed after the command (odd-length
        # command lines) or before it (even)
        placed = [argv[0], "--debug"] + argv[1:] if len(argv) % 2 else \
            ["--debug"] + argv
        shown = _run(placed)
        assert shown.returncode == code, shown.stderr
        assert "Traceback (most recent call last)" in shown.stderr
        assert shown.stderr.rstrip("\n").endswith(line), shown.stderr
