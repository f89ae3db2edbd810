"""Running under systemd: the unit file, and the notify protocol end to end.

systemd is not PID 1 here, so the service manager's side is played by the
test: ``systemd-analyze verify`` checks ``etc/shoebox-worker.service`` in a
root of its own (the machine's system units, and an executable where the
unit's ``ExecStart`` points), and a notify socket owned by the test (in the
abstract namespace, with the senders' pids from the kernel, as systemd
reads them) receives what a real worker sends, with ``processes = 1`` and
``= 2``. A consume loop that hangs must stop the watchdog pings: the main
thread of a single worker is held in its socket read by strace's syscall
delay injection (the shipping thread runs on), and a supervised child is
stopped with SIGSTOP.
"""

import configparser
import inspect
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from shoebox_worker.consume import worker as worker_mod

pytestmark = pytest.mark.functional

UNIT = pathlib.Path(__file__).resolve().parents[2] / "etc" / \
    "shoebox-worker.service"
ROUTING_KEY = "notifications.info"
#: The watchdog timeout the tests give the worker: pings every 1 s.
WATCHDOG_USEC = 2_000_000
WATCHDOG = WATCHDOG_USEC / 1e6


def _unavailable(message):
    """Skip, or fail when CI=true: CI must not pass by skipping."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


# -- the unit file ------------------------------------------------------------

def _unit():
    parser = configparser.RawConfigParser(strict=False,
                                          interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _system_units():
    for folder in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isfile(os.path.join(folder, "multi-user.target")):
            return folder
    _unavailable("no systemd system units (install the systemd package: "
                 "scripts/debian-packages)")


def _verify(tmp_path, *units):
    """``systemd-analyze verify`` of ``units`` (``(name, text)``), in a
    root holding the machine's system units and the worker unit's
    ExecStart binary."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        _unavailable("systemd-analyze is missing (install the systemd "
                     "package: scripts/debian-packages)")
    root = tmp_path / "root"
    system = _system_units()
    shutil.copytree(system, root / system.lstrip("/"), symlinks=True)
    binary = root / _unit()["Service"]["ExecStart"].split()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    folder = root / "etc" / "systemd" / "system"
    folder.mkdir(parents=True)
    written = []
    for name, text in units:
        (folder / name).write_text(text)
        written.append(str(folder / name))
    return subprocess.run([analyze, "--root=%s" % root, "verify"] + written,
                          capture_output=True, text=True, timeout=60)


def test_the_unit_verifies_without_a_word(tmp_path):
    result = _verify(tmp_path, (UNIT.name, UNIT.read_text()))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("mistake", [
    ("WatchdogSec=", "WatchdogSecs="),   # an unknown key: only a warning
    ("KillMode=mixed", "KillMode=mixd"),  # a bad value: only a warning
])
def test_verify_would_tell_a_mistake(tmp_path, mistake):
    # what the test above relies on: verify speaks up, even with exit 0
    result = _verify(tmp_path,
                     (UNIT.name, UNIT.read_text().replace(*mistake)))
    assert result.stdout + result.stderr != ""


def test_the_unit_says_what_the_worker_needs():
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed"
    assert service["ExecStart"].split()[1:3] == ["run", "--config"]
    assert int(service["WatchdogSec"].rstrip("s")) > 0
    # a stop may take the shipping grace plus the wait for the step that
    # runs (Worker.shutdown's ship_timeout): within TimeoutStopSec
    ship_timeout = inspect.signature(
        worker_mod.Worker.shutdown).parameters["ship_timeout"].default
    assert int(service["TimeoutStopSec"].rstrip("s")) > \
        worker_mod.SHUTDOWN_SHIP_GRACE + ship_timeout
    assert service["User"] not in ("", "root")
    state, keys = service["StateDirectory"].split()
    assert service["WorkingDirectory"] == "/var/lib/%s" % state
    # [integrity] signing_key: a writable folder apart from the working
    # directory (the worker replaces the key file at every digest)
    assert keys != state and "/var/lib/%s/signing.key" % keys in \
        UNIT.read_text()
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    # secrets the systemd way: an optional environment file (root's), and
    # credentials for ${credential:NAME}, each optional in the credstore
    assert service["EnvironmentFile"] == "-/etc/shoebox-worker/env"
    credentials = [line.split("=", 1)[1] for line in
                   UNIT.read_text().splitlines()
                   if line.startswith("LoadCredential=")]
    assert credentials == ["%s:shoebox-worker.%s" % (name, name) for name in
                           ("rabbit-password", "swift-key", "os-password")]
    # a log file may go where logrotate finds it
    assert service["LogsDirectory"] == "shoebox-worker"


# -- the index bundles' timer ----------------------------------------------

BUNDLE_SERVICE = UNIT.with_name("shoebox-index-bundle.service")
BUNDLE_TIMER = UNIT.with_name("shoebox-index-bundle.timer")


def _verify_pair(tmp_path, service_text, timer_text):
    """``systemd-analyze verify`` of the bundles' service and timer."""
    return _verify(tmp_path, (BUNDLE_SERVICE.name, service_text),
                   (BUNDLE_TIMER.name, timer_text))


def test_the_bundles_timer_and_service_verify_without_a_word(tmp_path):
    result = _verify_pair(tmp_path, BUNDLE_SERVICE.read_text(),
                          BUNDLE_TIMER.read_text())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_would_tell_a_mistake_in_the_timer(tmp_path):
    result = _verify_pair(tmp_path, BUNDLE_SERVICE.read_text(),
                          BUNDLE_TIMER.read_text().replace(
                              "OnUnitActiveSec=", "OnUnitActivSec="))
    assert result.stdout + result.stderr != ""


def test_the_bundles_service_runs_index_bundle_as_the_worker():
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(BUNDLE_SERVICE.read_text())
    service, worker = parser["Service"], _unit()["Service"]
    assert service["Type"] == "oneshot"
    argv = service["ExecStart"].split()
    assert argv[0] == worker["ExecStart"].split()[0]
    assert argv[1:4] == ["index-bundle", "--per", "month"]
    assert argv[argv.index("--config") + 1] == \
        worker["ExecStart"].split()[3]
    assert argv[-1].startswith("swift://")
    assert (service["User"], service["Group"]) == (worker["User"],
                                                   worker["Group"])
    assert service["EnvironmentFile"] == worker["EnvironmentFile"]
    assert service["ProtectSystem"] == "strict"
    timer = configparser.RawConfigParser(strict=False, interpolation=None)
    timer.optionxform = str
    timer.read_string(BUNDLE_TIMER.read_text())
    assert timer["Timer"]["Unit"] == BUNDLE_SERVICE.name


def _credentials(text):
    return sorted(line.partition("=")[2] for line in text.splitlines()
                  if line.startswith("LoadCredential="))


def test_the_bundles_service_has_the_credentials_the_worker_has():
    # it reads the worker's config, which config.load expands whole: a
    # ${credential:rabbit-password} (README, "Secrets, the systemd way")
    # that the unit does not load stops every run
    assert _credentials(BUNDLE_SERVICE.read_text()) == \
        _credentials(UNIT.read_text()) != []


# -- the notify protocol ------------------------------------------------------

class NotifySocket:
    """What systemd listens on: every datagram with its sender's pid and
    the time it came, read by a thread."""

    _UCRED = struct.Struct("3i")

    def __init__(self):
        self.address = "@shoebox-ft-notify/%d/%s" % (os.getpid(),
                                                      os.urandom(4).hex())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.05)
        #: [(monotonic time, pid, kind, {key: value})]
        self.messages = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(self._UCRED.size))
            except (TimeoutError, OSError):
                continue
            pid = None
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET,
                                     socket.SCM_CREDENTIALS):
                    pid = self._UCRED.unpack(value[:self._UCRED.size])[0]
            fields = dict(line.split("=", 1)
                          for line in data.decode().splitlines())
            kind = next((k for k in ("READY", "WATCHDOG", "STOPPING")
                         if fields.get(k) == "1"), None)
            self.messages.append((time.monotonic(), pid, kind, fields))

    def kinds(self, since=0.0):
        return [m[2] for m in list(self.messages) if m[0] >= since]

    def pings(self, since=0.0):
        return [m[0] for m in list(self.messages)
                if m[2] == "WATCHDOG" and m[0] >= since]

    def wait_for(self, predicate, timeout, what, worker):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not worker.alive():
                break
            time.sleep(0.05)
        pytest.fail("no %s within %.0f s; got %s; log:\n%s" % (
            what, timeout, self.kinds(), worker.log_tail()))

    def close(self):
        self._closed = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch):
    """A notify socket, passed to the workers the test starts as systemd
    would (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``)."""
    listener = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


def _collapse(kinds):
    """Repeats of one kind in a row, once."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def _start(rabbit, names, tmp_path, worker_procs, ft, processes):
    rabbit.declare(names, names, ROUTING_KEY)
    config = ft.worker_config(tmp_path, names, names,
                              routing_key=ROUTING_KEY,
                              worker={"processes": processes})
    return worker_procs(config)


def _stop(worker, notify_socket):
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_tail()
    assert notify_socket.kinds()[-1] == "STOPPING"


@pytest.mark.parametrize("processes", [1, 2])
def test_ready_watchdog_stopping_in_order_from_the_main_pid(
        rabbit, names, tmp_path, worker_procs, ft, notify_socket,
        processes):
    worker = _start(rabbit, names, tmp_path, worker_procs, ft, processes)
    notify_socket.wait_for(lambda: "READY" in notify_socket.kinds(), 60,
                           "READY=1", worker)
    # ready means consuming: every worker is a consumer of the queue by now
    assert rabbit.consumers(names) == processes
    notify_socket.wait_for(lambda: len(notify_socket.pings()) >= 4,
                           4 * WATCHDOG + 10, "4 watchdog pings", worker)
    _stop(worker, notify_socket)
    assert _collapse(notify_socket.kinds()) == [
        "READY", "WATCHDOG", "STOPPING"]
    # NotifyAccess=main: only the main process (the worker, or the
    # supervisor of N) talks to systemd
    assert {m[1] for m in notify_socket.messages} == {worker.pid}
    pings = notify_socket.pings()
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    # every half of WATCHDOG_USEC: not more often, and well within it
    assert min(gaps) >= WATCHDOG / 2 * 0.9, gaps
    assert max(gaps) < WATCHDOG, gaps


def _silent(notify_socket, seconds):
    """True when no ping came in the last ``seconds``."""
    pings = notify_socket.pings()
    return not pings or time.monotonic() - pings[-1] >= seconds


def test_a_hung_consume_loop_stops_the_pings(
        rabbit, names, tmp_path, worker_procs, ft, notify_socket):
    strace = shutil.which("strace")
    if strace is None:
        _unavailable("strace is missing (scripts/debian-packages)")
    worker = _start(rabbit, names, tmp_path, worker_procs, ft, 1)
    notify_socket.wait_for(lambda: len(notify_socket.pings()) >= 2,
                           60, "2 watchdog pings", worker)
    # hold the consume loop (the main thread, whose tid is the pid) in its
    # next socket read for a minute; the other threads run on
    tracer = subprocess.Popen(
        [strace, "-qq", "-o", "/dev/null", "-p", str(worker.pid),
         "-e", "trace=recvfrom", "-e", "inject=recvfrom:delay_enter=60s"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        notify_socket.wait_for(lambda: _silent(notify_socket, 2 * WATCHDOG),
                               15, "silence", worker)
        assert worker.alive()
        threads = os.listdir("/proc/%d/task" % worker.pid)
        assert len(threads) > 1  # the shipping thread still runs
    finally:
        tracer.terminate()
        tracer.wait(10)
    # the loop goes on: so do the pings
    resumed = time.monotonic()
    notify_socket.wait_for(lambda: notify_socket.pings(since=resumed), 15,
                           "pings once the loop runs again", worker)
    _stop(worker, notify_socket)


def test_a_hung_child_stops_the_supervisors_pings(
        rabbit, names, tmp_path, worker_procs, ft, notify_socket):
    worker = _start(rabbit, names, tmp_path, worker_procs, ft, 2)
    notify_socket.wait_for(lambda: len(notify_socket.pings()) >= 2,
                           60, "2 watchdog pings", worker)
    hung, other = ft.child_pids(worker.pid)
    os.kill(hung, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        # the supervisor pings on while the child has WATCHDOG_USEC left...
        notify_socket.wait_for(
            lambda: notify_socket.pings(since=stopped + WATCHDOG / 2) or
            _silent(notify_socket, 2 * WATCHDOG), 15, "a verdict", worker)
        # ...then stops, though it and the other child run on
        notify_socket.wait_for(lambda: _silent(notify_socket, 2 * WATCHDOG),
                               15, "silence", worker)
        assert worker.alive()
        os.kill(other, 0)
        assert worker.wait_for_log(
            r"worker \d \(pid %d\) sent no watchdog ping" % hung, 5)
    finally:
        os.kill(hung, signal.SIGCONT)
    resumed = time.monotonic()
    notify_socket.wait_for(lambda: notify_socket.pings(since=resumed), 15,
                           "pings once the child runs again", worker)
    _stop(worker, notify_socket)


def test_a_worker_waiting_for_the_broker_pings_on(
        tmp_path, worker_procs, ft, notify_socket, names):
    # a broker outage is not a hang: kombu's retries ping too (here at the
    # start, where nothing answers on the broker's port)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        url="amqp://guest:guest@127.0.0.1:%d//" % port)
    worker = worker_procs(config)
    notify_socket.wait_for(lambda: len(notify_socket.pings()) >= 3,
                           3 * WATCHDOG + 15, "3 watchdog pings", worker)
    assert "READY" not in notify_socket.kinds()
    _stop(worker, notify_socket)
