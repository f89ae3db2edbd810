"""Tests for shoebox_worker.cli: check-config, run, and one-line errors."""

import importlib.metadata
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import uuid

import kombu
import kombu.exceptions
import pytest

from shoebox_worker import archive
from shoebox_worker import cli
from shoebox_worker import config
from shoebox_worker import roll_manager
from shoebox_worker.integrity import keys
from shoebox_worker.ship import steps

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = pathlib.Path(sys.executable).parent / "shoebox-worker"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else \
    [sys.executable, "-m", "shoebox_worker.cli"]

GOOD = """\
[broker]
url = memory://

[consumer:notifications.info]
exchange = nova
durable = true

[archive]
working_directory = {work}
roll_checker = count
callbacks = gzip, memory

[roll_checker:count]
roll_count = 10

[callback:gzip]
level = 1
"""


@pytest.fixture
def write(tmp_path):
    def write(text, name="worker.conf"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).format(work=tmp_path / "w"))
        return str(path)
    return write


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(COMMAND + list(args), capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)


def test_check_config_ok(write, capsys):
    path = write(GOOD)
    assert cli.main(["check-config", "--config", path]) == 0
    out, err = capsys.readouterr()
    assert out == "%s: OK\n" % path
    assert err == ""


def test_check_config_warns_of_what_rabbitmq_4_refuses(write, capsys):
    # OK for RabbitMQ 3, one line each for what 4.3 refuses
    path = write(GOOD.replace("durable = true", "durable = false")
                 + "\n[consumer:other]\nexchange = nova\ndurable = true\n"
                 "queue_arguments = x-queue-master-locator=min-masters\n")
    assert cli.main(["check-config", "--config", path]) == 0
    out, err = capsys.readouterr()
    assert out == "%s: OK\n" % path
    assert err.splitlines() == [
        "shoebox-worker: warning: %s [consumer:notifications.info] "
        "durable = false: set durable = true (RabbitMQ 4.3 and later refuse "
        "queues that are neither durable nor exclusive, unless "
        "deprecated_features.permit.transient_nonexcl_queues = true), and "
        "make it a quorum queue on a cluster" % path,
        "shoebox-worker: warning: %s [consumer:other] queue_arguments: use "
        "x-queue-leader-locator instead of x-queue-master-locator "
        "(deprecated since RabbitMQ 4.0)" % path]


def test_check_config_ok_in_a_subprocess(write):
    path = write(GOOD)
    result = run_cli("check-config", "--config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "%s: OK\n" % path


NO_ROLL_SECTION = ("[roll_checker:count]\nroll_count = 10\n", "")


@pytest.mark.parametrize("changes, expected", [
    ([("[archive]", "[archiv]")],
     "{path} [archiv]: unknown section (did you mean [archive]?)"),
    ([("[consumer:notifications.info]", "[consumers:notifications.info]")],
     "{path} [consumers:notifications.info]: unknown section (did you mean "
     "[consumer:notifications.info]?)"),
    ([("roll_count = 10", "roll_count = ten")],
     "{path} [roll_checker:count] roll_count: expected a number, got "
     "'ten'"),
    ([("callbacks = gzip, memory", "callbacks = gzip, memory\n"
       "fsync_every = x")],
     "{path} [archive] fsync_every: expected an integer, got 'x'"),
    ([("durable = true", "durable = maybe")],
     "{path} [consumer:notifications.info] durable: expected true or false "
     "(or yes/no, on/off, 1/0), got 'maybe'"),
    ([("level = 1", "level = 99")],
     "{path} [callback:gzip] level: expected 1 to 9, got '99'"),
    ([("callbacks = gzip, memory", "callbacks = gzip, swfit")],
     "{path} [archive] callbacks: no callback named 'swfit' (installed: "
     "{callbacks})"),
    ([("roll_checker = count", "roll_checker = sise"), NO_ROLL_SECTION],
     "{path} [archive] roll_checker: no roll checker named 'sise' "
     "(installed: count, never, size, time)"),
    ([("roll_checker = count", "roll_checker = size")],
     "{path} [roll_checker:count]: roll checker 'count' is not listed "
     "in [archive] roll_checker (size)"),
    ([("level = 1", "levle = 1")],
     "{path} [callback:gzip] levle: option not taken by gzip (takes: "
     "level)"),
    ([("roll_count = 10", "roll_count = 10\nroll_size_mb = 5")],
     "{path} [roll_checker:count] roll_size_mb: option not taken by count "
     "(takes: roll_count)"),
    ([("url = memory://", "url = amqq://guest:secret@host//")],
     "{path} [broker] url: unknown transport 'amqq' (did you mean amqp?)"),
])
def test_config_errors_are_one_line(write, changes, expected):
    text = GOOD
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    path = write(text)
    installed = ", ".join(sorted(
        ep.name for ep in importlib.metadata.entry_points(
            group="shoebox.callbacks")))
    result = run_cli("check-config", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == "shoebox-worker: %s\n" % expected.format(
        path=path, callbacks=installed)
    assert "secret" not in result.stderr


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.conf")
    result = run_cli("check-config", "--config", path)
    assert result.returncode == 2
    assert result.stderr == \
        "shoebox-worker: %s: cannot read: No such file or directory\n" % path


def test_run_with_a_bad_config_is_one_line(write):
    path = write(GOOD.replace("[archive]", "[archives]"))
    result = run_cli("run", "--config", path, "--idle-exit", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "[archives]: unknown section" in result.stderr


def test_errors_in_process(write, capsys):
    path = write(GOOD.replace("level = 1", "level = 0"))
    assert cli.main(["check-config", "--config", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("shoebox-worker: %s [callback:gzip] level: " % path)
    assert err.count("\n") == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_plugins_built_once_and_passed_down(write, monkeypatch, processes,
                                            quiet_process):
    from shoebox_worker import plugins
    from shoebox_worker.consume import runner
    from shoebox_worker.consume import supervisor

    built, ran = [], []
    build = plugins.build

    def counting_build(conf):
        built.append(build(conf))
        return built[-1]

    def fake_run_worker(conf, plugins, idle_exit=None):
        ran.append(("runner", plugins, idle_exit))
        return 0

    def fake_supervisor_run(self):
        ran.append(("supervisor", self.plugins, self.idle_exit))
        return 0

    monkeypatch.setattr(plugins, "build", counting_build)
    monkeypatch.setattr(runner, "run_worker", fake_run_worker)
    monkeypatch.setattr(supervisor.Supervisor, "run", fake_supervisor_run)
    path = write(GOOD + "\n[worker]\nprocesses = %d\n" % processes)
    assert cli.main(["check-config", "--config", path]) == 0
    assert len(built) == 1
    assert cli.main(["run", "--config", path, "--idle-exit", "3"]) == 0
    assert len(built) == 2  # once per command
    checker, callbacks = built[1]
    assert [name for name, _ in callbacks] == ["gzip", "memory"]
    kind = "runner" if processes == 1 else "supervisor"
    assert ran == [(kind, built[1], 3.0)]


@pytest.fixture
def quiet_process(monkeypatch):
    """run installs signal handlers and replaces the root log handlers:
    keep both to this test."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_run_idle_exit_ships_everything(write, tmp_path, quiet_process):
    queue = "q-" + uuid.uuid4().hex[:10]
    exchange = kombu.Exchange("ex-" + queue, type="topic", durable=False)
    bound = kombu.Queue(queue, exchange, routing_key=queue, durable=False)
    path = write(GOOD.replace("notifications.info", queue).replace(
        "exchange = nova", "exchange = ex-%s\nrouting_key = %s" % (
            queue, queue)).replace("durable = true", "durable = false")
        + "\n[logging]\nlevel = WARNING\n")
    bodies = [json.dumps({"event_type": "x", "message_id": str(n)}).encode()
              for n in range(25)]
    memory = steps.MemoryCallback.all_events
    del memory[:]
    with kombu.Connection("memory://") as conn:
        with conn.Producer() as producer:
            for body in bodies:
                producer.publish(body, exchange=exchange, routing_key=queue,
                                 declare=[bound], serializer=None,
                                 content_type="application/json",
                                 content_encoding="utf-8")
        try:
            assert cli.main(["run", "--config", path,
                             "--idle-exit", "0.2"]) == 0
            assert conn.default_channel._size(queue) == 0
        finally:
            bound(conn.default_channel).unbind_from(exchange,
                                                   routing_key=queue)
            bound(conn.default_channel).delete()
    shipped = [f for event, f in memory if event == "close"]
    assert len(shipped) == 3 and all(f.endswith(".gz") for f in shipped)
    records = list(roll_manager.ReadingRollManager(
        "*.gz", directory=str(tmp_path / "w")))
    assert sorted(p for _, p in records) == sorted(bodies)


def test_run_exits_with_the_workers_code(write, tmp_path, quiet_process,
                                        monkeypatch, capsys):
    # the archive directory refuses writes: the worker stops, run says 1
    import errno
    queue = "q-" + uuid.uuid4().hex[:10]
    exchange = kombu.Exchange("ex-" + queue, type="topic", durable=False)
    bound = kombu.Queue(queue, exchange, routing_key=queue, durable=False)
    path = write(GOOD.replace("notifications.info", queue).replace(
        "exchange = nova", "exchange = ex-%s\nrouting_key = %s" % (
            queue, queue)) + "\n[logging]\nlevel = ERROR\n")

    def refused(self, metadata, payload):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(archive.ArchiveWriter, "write", refused)
    with kombu.Connection("memory://") as conn:
        with conn.Producer() as producer:
            producer.publish(b'{"event_type": "x"}', exchange=exchange,
                             routing_key=queue, declare=[bound],
                             serializer=None, content_type="application/json",
                             content_encoding="utf-8")
        try:
            assert cli.main(["run", "--config", path]) == 1
            assert conn.default_channel._size(queue) == 1  # requeued
        finally:
            bound(conn.default_channel).unbind_from(exchange,
                                                   routing_key=queue)
            bound(conn.default_channel).delete()


def test_leftovers_ship_while_the_broker_is_unreachable(write, tmp_path):
    # a previous run left an archive; the broker is down (a closed port):
    # shipping must not wait for it, and SIGTERM still stops the worker
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(GOOD.replace("memory://", "amqp://guest:guest@127.0.0.1:%d//"
                              % port).replace("gzip, memory", "gzip"))
    work = tmp_path / "w"
    work.mkdir()
    left = work / "shoebox_20260101T000000_gone-1.events"
    with archive.ArchiveWriter(str(left)) as writer:
        writer.write({"event_type": "e"}, b"{}")
    proc = subprocess.Popen(COMMAND + ["run", "--config", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        gz = work / (left.name + ".gz")
        while not gz.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gz.exists(), "the leftover was not shipped"
        assert proc.poll() is None  # still waiting for the broker
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert list(archive.ArchiveReader(str(gz))) == [({"event_type": "e"},
                                                     b"{}")]


def _run_with_a_failing_archive(write, tmp_path, idle_exit):
    """``run --idle-exit IDLE_EXIT`` on memory:// with one archive left in
    its working directory whose step fails every time (retried after 30
    s); returns the process and the archive's path."""
    path = write("""\
        [broker]
        url = memory://

        [consumer:notifications.info]
        exchange = nova

        [archive]
        working_directory = {work}
        roll_checker = never
        callbacks = memory
        retry_initial = 30
        retry_max = 60

        [callback:memory]
        fail_times = 1000000
        """)
    work = tmp_path / "w"
    work.mkdir()
    left = work / "shoebox_20260101T000000_gone-1.events"
    with archive.ArchiveWriter(str(left)) as writer:
        writer.write({"event_type": "e"}, b"{}")
    proc = subprocess.Popen(COMMAND + ["run", "--config", path,
                                       "--idle-exit", idle_exit],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    return proc, left


def test_sigterm_with_idle_exit_does_not_wait_for_a_failing_upload(
        write, tmp_path):
    # --idle-exit ships everything only when idleness stopped the worker; a
    # signal leaves a failing archive to its state file for the next start
    import time
    proc, left = _run_with_a_failing_archive(write, tmp_path, "600")
    state = left.parent / (left.name + ".ship")
    deadline = time.monotonic() + 20
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 15
    assert left.exists() and state.exists()  # resumed at the next start


def test_the_first_sigint_while_idle_exit_ships_is_not_again(write,
                                                             tmp_path):
    # --idle-exit stopped the worker and it waits for a failing step; the
    # first SIGINT stops that wait, and is said to be the first
    import time
    proc, _ = _run_with_a_failing_archive(write, tmp_path, "0.2")
    err = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # stderr, line by line
        line = proc.stderr.readline()
        err.append(line)
        if "before exiting" in line or not line:
            break
    assert "idle: shipping 1 archive(s) before exiting" in err[-1], err
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    log = "".join(err) + rest
    assert proc.returncode == 0, log
    assert "got SIGINT: stopping now, shipping left to the next start" \
        in log
    assert "again" not in log


# -- the one rule: one line, exit 1 or 2, a traceback only with --debug ----

def _read_only_folder(tmp_path):
    """A folder that refuses new files: chmod 555, or /sys for root."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


@pytest.mark.parametrize("where, expected", [
    ("/proc/shoebox-nope", "cannot create /proc/shoebox-nope: No such file "
                           "or directory"),
    ("{tmp}/f/sub", "cannot create {tmp}/f/sub: Not a directory"),
    ("{tmp}/f", "{tmp}/f is a file, not a folder"),
    ("read-only", "cannot write in {ro}: "),
])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_working_directory_checked_before_anything(
        write, tmp_path, capsys, command, where, expected, quiet_process):
    (tmp_path / "f").write_text("x")
    ro = _read_only_folder(tmp_path) if where == "read-only" else None
    folder = ro or where.format(tmp=tmp_path)
    path = write(GOOD.replace("{work}", folder))
    bounded = ["--idle-exit", "0.2"] if command == "run" else []
    assert cli.main([command, "--config", path] + bounded) == 2
    out, err = capsys.readouterr()
    assert out == ""
    prefix = "shoebox-worker: %s [archive] working_directory: %s" % (
        path, expected.format(tmp=tmp_path, ro=ro))
    assert err.startswith(prefix), err
    assert err.endswith("; set it to a folder this user can create and "
                        "write\n")
    assert err.count("\n") == 1


def test_check_config_creates_the_working_directory(write, tmp_path):
    path = write(GOOD)
    assert cli.main(["check-config", "--config", path]) == 0
    assert list((tmp_path / "w").iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["--debug", "cat", "{missing}"],
    ["cat", "--debug", "{missing}"],
    ["cat", "{missing}", "--debug"],
])
def test_debug_shows_the_traceback_wherever_it_is_typed(tmp_path, argv):
    missing = str(tmp_path / "missing.events")
    result = run_cli(*[arg.format(missing=missing) for arg in argv])
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith(
        "shoebox-worker: %s: no such file or directory\n" % missing)


def test_without_debug_one_line(tmp_path):
    missing = str(tmp_path / "missing.events")
    result = run_cli("cat", missing)
    assert (result.returncode, result.stderr) == (
        1, "shoebox-worker: %s: no such file or directory\n" % missing)


@pytest.mark.parametrize("argv, expected", [
    (["index-bundle", "var/archive"],
     "var/archive: expected swift://CONTAINER[/PREFIX]"),
    (["index-bundle", "swift://"],
     "swift://: no container (swift://CONTAINER[/PREFIX])"),
    (["cat", "--since", "2024-03-02", "--until", "2024-03-01", "x.events"],
     "--since (2024-03-02T00:00:00.000000Z) must be before --until "
     "(2024-03-01T00:00:00.000000Z)"),
    (["generate", "--url", "memory://", "--count", "-1"],
     "--count must be >= 0, got -1"),
    (["generate", "--url", "memory://", "--count", "1", "--rate", "0"],
     "--rate must be > 0, got 0"),
    (["replay", "--url", "memory://", "--exchange", "x", "--routing-key",
      "k", "--rate", "0", "x.events"], "--rate must be > 0, got 0"),
    (["generate", "--url", "amqp://u:s3cret@h:5x//", "--count", "1"],
     "--url: bad port in 'amqp://u:***@h:5x//'"),
])
def test_usage_mistakes_of_the_tools_exit_2(capsys, monkeypatch, argv,
                                            expected):
    monkeypatch.delenv("SHOEBOX_BROKER_URL", raising=False)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "shoebox-worker: %s\n" % expected)


def test_no_broker_url_is_a_usage_mistake(capsys, monkeypatch):
    monkeypatch.delenv("SHOEBOX_BROKER_URL", raising=False)
    assert cli.main(["generate", "--count", "1"]) == 2
    assert capsys.readouterr().err.startswith(
        "shoebox-worker: no broker URL: give --config FILE")


@pytest.mark.parametrize("argv, expected", [
    (["frob"], "shoebox-worker: argument COMMAND: invalid choice: 'frob'"),
    ([], "shoebox-worker: the following arguments are required: COMMAND"),
    (["cat", "--bogus", "x"], "shoebox-worker cat: unrecognized arguments: "
                              "--bogus (see shoebox-worker cat --help)"),
    (["generate", "--url", "memory://", "--count", "x"],
     "shoebox-worker generate: argument --count: invalid int value: 'x'"),
    (["check-config"], "shoebox-worker check-config: the following "
                       "arguments are required: --config"),
])
def test_usage_mistakes_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(expected) and err.count("\n") == 1, err


class _Weird(Exception):
    pass


def _raises(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, code, expected", [
    (_Weird("no"), 1, "unexpected error: _Weird: no; this is a bug: rerun "
                      "with --debug and report the traceback"),
    (PermissionError(13, "Permission denied", "/x/y"), 1,
     "/x/y: Permission denied (rerun with --debug to see what was being "
     "done)"),
    (kombu.exceptions.OperationalError("[Errno 111] Connection refused"), 1,
     "broker error: OperationalError: [Errno 111] Connection refused; check "
     "the broker and [broker] url (rerun with --debug for details)"),
    (cli.exceptions.ConfigError("bad", "f.conf", "archive", "k"), 2,
     "f.conf [archive] k: bad"),
    (cli.exceptions.UploadError("401", "swift", "a.gz"), 1,
     "callback swift failed on a.gz: 401"),
])
def test_every_error_reaching_main_is_one_line(monkeypatch, capsys, exc,
                                               code, expected,
                                               quiet_process):
    from shoebox_worker.tools import read
    monkeypatch.setattr(read, "cmd_cat", _raises(exc))
    assert cli.main(["cat", "x"]) == code
    out, err = capsys.readouterr()
    assert err == "shoebox-worker: %s\n" % expected
    assert cli.main(["cat", "--debug", "x"]) == code
    out, err = capsys.readouterr()
    assert err.startswith("Traceback") and err.endswith(expected + "\n")


# -- the runner: a broker that cannot be reached ----------------------------

@pytest.mark.parametrize("log_file", [False, True])
def test_broker_gone_is_one_error_naming_it(write, tmp_path, monkeypatch,
                                           quiet_process, capsys, log_file):
    from shoebox_worker.consume import broker
    log = tmp_path / "worker.log"
    path = write(GOOD.replace(
        "memory://", "amqp://guest:s3cret@127.0.0.1:1//\n"
        "connect_max_retries = 2") +
        ("\n[logging]\nfile = %s\n" % log if log_file else ""))

    message = ("cannot connect to the broker amqp://guest:***@127.0.0.1:1//: "
               "[Errno 111] Connection refused (gave up after 3 failed "
               "attempt(s), 3 s, as [broker] connect_max_retries = 2 says); "
               "check that it runs and that [broker] url points to it")

    def refused(worker):  # what broker.declare raises once kombu gave up
        raise broker.BrokerError(message)

    monkeypatch.setattr(broker, "declare", refused)
    assert cli.main(["run", "--config", path]) == 1
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert line == "shoebox-worker: " + message
    assert "Traceback" not in err and "s3cret" not in err
    if log_file:  # said in the log too, once, without a traceback
        logged = log.read_text()
        assert logged.count(line[len("shoebox-worker: "):]) == 1
        assert "Traceback" not in logged and "s3cret" not in logged


@pytest.mark.parametrize("level, traceback", [("INFO", False),
                                              ("DEBUG", True)])
def test_a_supervised_child_logs_one_line(write, monkeypatch, caplog, level,
                                          traceback):
    from shoebox_worker.consume import runner
    conf = config.load(write(GOOD))

    def broken(conf, plugins, idle_exit=None, stop_signals=()):
        raise _Weird("boom")

    monkeypatch.setattr(runner, "run_worker", broken)
    caplog.set_level(level)
    assert runner.run_child(conf, None) == 1
    records = [r for r in caplog.records if r.name == runner.__name__]
    assert [r.getMessage() for r in records] == [
        "worker stopped: unexpected error: _Weird: boom; this is a bug: "
        "rerun with --debug and report the traceback"]
    assert bool(records[0].exc_info) == traceback


def test_a_supervised_child_with_a_config_error_exits_2(write, monkeypatch):
    from shoebox_worker.consume import runner
    conf = config.load(write(GOOD))
    monkeypatch.setattr(runner, "run_worker",
                        lambda *args, **kwargs: (_ for _ in ())
                        .throw(cli.exceptions.ConfigError("bad")))
    assert runner.run_child(conf, None) == 2


# -- keygen, and [integrity] in check-config ----------------------------------

def test_keygen_writes_the_pair(tmp_path, capsys):
    folder = tmp_path / "keys"
    assert cli.main(["keygen", str(folder)]) == 0
    out, err = capsys.readouterr()
    private, public = folder / "signing.key", folder / "signing.pub"
    assert out == "wrote %s (private, 0600) and %s (public: pin it)\n" % (
        private, public)
    assert err == ""
    assert oct(private.stat().st_mode & 0o777) == oct(0o600)
    assert keys.public_text(keys.load_private(str(private))) == \
        keys.public_text(keys.load_public(str(public)))


def test_keygen_never_writes_over_a_pair(tmp_path, capsys):
    folder = tmp_path / "keys"
    assert cli.main(["keygen", str(folder)]) == 0
    before = {name: (folder / name).read_bytes()
              for name in ("signing.key", "signing.pub")}
    capsys.readouterr()
    assert cli.main(["keygen", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("shoebox-worker: %s exists: not written over (a key in "
                   "use evolves; make a new pair in another folder)\n"
                   % (folder / "signing.key"))
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_keygen_where_no_folder_can_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["keygen", str(tmp_path / "file" / "keys")]) == 2
    out, err = capsys.readouterr()
    assert err == "shoebox-worker: cannot write in %s: Not a directory\n" \
        % (tmp_path / "file" / "keys")


def test_check_config_refuses_integrity_without_a_storing_step(
        write, tmp_path, capsys):
    private, _ = keys.keygen(str(tmp_path / "keys"))
    path = write(GOOD + "\n[integrity]\nsigning_key = %s\n" % private)
    assert cli.main(["check-config", "--config", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "shoebox-worker: %s [integrity] signing_key: needs a step that "
        "stores archives and digests in [archive] callbacks (swift); it "
        "has: gzip, memory\n" % path)


def test_check_config_refuses_a_signing_key_that_is_none(write, tmp_path,
                                                         capsys):
    path = write(GOOD + "\n[integrity]\nsigning_key = %s\n"
                 % (tmp_path / "nope"))
    assert cli.main(["check-config", "--config", path]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("shoebox-worker: %s [integrity] signing_key: "
                          "cannot read the signing key " % path)
    assert err.count("\n") == 1


def test_check_config_refuses_a_signing_key_the_worker_cannot_replace(
        write, tmp_path, capsys, monkeypatch):
    private, _ = keys.keygen(str(tmp_path / "keys"))
    folder = os.path.dirname(private)
    path = write(GOOD.replace("callbacks = gzip, memory",
                              "callbacks = gzip, swift")
                 + "\n[callback:swift]\nauth = http://127.0.0.1:9/auth/v1.0"
                 "\nuser = a:b\nkey = k\n"
                 "\n[integrity]\nsigning_key = %s\n" % private)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False
                        if p == folder else real(p, mode, **kw))
    assert cli.main(["check-config", "--config", path]) == 2
    _, err = capsys.readouterr()
    assert err == ("shoebox-worker: %s [integrity] signing_key: the worker "
                   "replaces this file with the next key at every digest, "
                   "and cannot write in %s\n" % (path, folder))


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the signing key {path}: No such file or directory "
           "(shoebox-worker keygen DIR makes one)"),
    (b"not a key\n", "{path} is not a PEM private key without a passphrase"),
])
def test_a_signing_key_that_is_not_one_is_refused(write, tmp_path, content,
                                                  message, capsys):
    path = tmp_path / "signing.key"
    if content is not None:
        path.write_bytes(content)
    config = write(GOOD + "\n[integrity]\nsigning_key = %s\n" % path)
    assert cli.main(["check-config", "--config", config]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("shoebox-worker: %s [integrity] signing_key: %s"
                          % (config, message.format(path=path)))


def test_the_tools_read_a_config_whose_signing_key_they_cannot(tmp_path):
    # a reader (cat --config, an index-bundle timer) needs no key
    path = tmp_path / "worker.conf"
    path.write_text(textwrap.dedent(GOOD).format(work=tmp_path / "w")
                    + "\n[integrity]\nsigning_key = %s\n"
                    % (tmp_path / "missing.key"))
    from shoebox_worker import config
    assert config.load(str(path)).integrity.signing_key == str(
        tmp_path / "missing.key")
