"""Secrets, file modes and signals, with the real worker and RabbitMQ.

- A broker password holding ``/ # @ % ; ?`` (as written, and
  percent-encoded) never shows in ``check-config``, in a ``run`` that
  cannot connect (``--debug``, a log at DEBUG), and works with a broker
  user of that password (its own user and vhost, removed at the end).
- ``generate`` and ``replay`` take the URL from ``--config`` or
  ``$SHOEBOX_BROKER_URL``: the password is not on their command line.
- Under umask 022, with two processes, every file and folder the worker
  creates is 0600/0700 (or ``[archive] file_mode``/``dir_mode``).
- Ctrl-C twice in quick succession to the whole process group of a
  supervised worker still ships in the grace.
"""

import os
import re
import signal
import stat
import subprocess
import threading
import time
import uuid

import pytest

from shoebox_worker import files as files_mod
from shoebox_worker.consume import signals
from shoebox_worker.tools import publish as publish_mod

WORKER = os.path.join(os.path.dirname(os.sys.executable), "shoebox-worker")

#: (as written in the URL, as the broker knows it); each holds one
#: character that ends a part of a URL for urllib or kombu.
PASSWORDS = [
    *[("kqzw%svxjy" % char, "kqzw%svxjy" % char) for char in "/#@%;?"],
    *[("kqzw%%%02Xvxjy" % ord(char), "kqzw%svxjy" % char)
      for char in "/#@%;?"],
]
#: Both halves of every password: a message naming part of one names one.
FRAGMENTS = ("kqzw", "vxjy")


def _config(ft, tmp_path, url, queue, exchange, logging=None, **kwargs):
    path = ft.worker_config(tmp_path, queue, exchange, url=url,
                            routing_key=queue, **kwargs)
    if logging:
        text = open(path).read().replace(
            "[logging]\nlevel = INFO\n",
            "[logging]\n%s\n" % "\n".join("%s = %s" % item
                                          for item in logging.items()))
        open(path, "w").write(text)
    return path


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    pytest.fail("timed out waiting for %s" % what)


def _no_secret(*texts):
    for text in texts:
        for fragment in FRAGMENTS:
            assert fragment not in text, text


# -- passwords ----------------------------------------------------------------

def test_passwords_never_shown_by_check_config_or_a_run_that_cannot_connect(
        ft, tmp_path):
    port = ft.closed_port()
    runs = []
    for number, (written, _) in enumerate(PASSWORDS):
        where = tmp_path / str(number)
        where.mkdir()
        url = "amqp://shoebox:%s@127.0.0.1:%d//" % (written, port)
        log = where / "worker.log"
        config = _config(ft, where, url, "q", "x",
                         broker={"connect_max_retries": 1,
                                 "connect_timeout": 1},
                         logging={"level": "DEBUG", "file": log})
        runs.append((written, log, *(subprocess.Popen(
            [WORKER, *argv, "--config", config],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
            for argv in (["check-config"], ["--debug", "run"]))))
    for written, log, checked, run in runs:
        out, err = checked.communicate(timeout=90)
        assert checked.returncode == 0, (written, err)
        _no_secret(out, err)
        out, err = run.communicate(timeout=90)
        assert run.returncode == 1, (written, err)
        assert "cannot connect to the broker amqp://shoebox:" in err, err
        assert "Connection refused" in log.read_text(), written
        _no_secret(out, err, log.read_text())


@pytest.fixture
def broker_user(ft, rabbit_available):
    """A RabbitMQ user of its own, with a password holding every special
    character as it is, on a vhost of its own; both removed at the end."""
    name = "shoebox-ft-%s" % uuid.uuid4().hex[:10]
    password = "kqzw/#@%;?:vxjy"
    # each rabbitmqctl starts an Erlang VM (seconds): two at a time
    for result in _rabbitmqctl_together(("add_vhost", name),
                                        ("add_user", name, password)):
        assert result.returncode == 0, result.stderr
    result = ft.rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*",
                            ".*")
    assert result.returncode == 0, result.stderr
    yield name, password
    _rabbitmqctl_together(("delete_user", name), ("delete_vhost", name))


def _rabbitmqctl_together(*commands):
    procs = [subprocess.Popen(["rabbitmqctl", *argv], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(proc.args,
                                                   proc.returncode, out, err))
    return results


def _not_on_the_command_line(argv, env=None):
    """Run ``shoebox-worker ARGV``; while it runs, its /proc cmdline (what
    ``ps`` shows every local user) must not hold the password."""
    proc = subprocess.Popen([WORKER, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    def cmdline():  # once exec'd (before: empty, or the test's own)
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            text = f.read().decode("utf-8", "replace").replace("\0", " ")
        return text if WORKER in text and argv[0] in text else None

    shown = wait_for(cmdline, 30, "the command's /proc cmdline")
    out, err = proc.communicate(timeout=60)
    _no_secret(shown)
    _no_secret(out, err)
    assert proc.returncode == 0, err
    return out


def test_a_password_of_special_characters_archives_generates_and_replays(
        ft, tmp_path, rabbit, names, broker_user):
    user, password = broker_user
    # as written in the config: the '%' and ';' may stay as they are
    url = "amqp://%s:%s@127.0.0.1:5672/%s" % (user, password, user)
    config = _config(ft, tmp_path, url, names, names,
                     roll_checker="count", roll_options={"roll_count": 5},
                     logging={"level": "DEBUG", "file": tmp_path / "w.log"})
    env = dict(os.environ, **{publish_mod.URL_VARIABLE: url})
    # generate with the URL from the environment, then from the config
    _not_on_the_command_line(["generate", "--count", 6, "--seed", 1,
                              "--exchange", names, "--routing-key", names,
                              "--queue", names, "--rate", 20], env=env)
    _not_on_the_command_line(["generate", "--config", config, "--count", 6,
                              "--seed", 2, "--exchange", names,
                              "--routing-key", names, "--rate", 20])
    run = ft.run_worker(config, timeout=60)
    assert run.returncode == 0, run.log_tail()
    records = ft.read_archives(tmp_path / "archive")
    assert len(records) == 12
    _no_secret(run.log, (tmp_path / "w.log").read_text())
    # replay them, with the URL from the config, then from the environment
    for argv, environ in ((["--config", config], None), ([], env)):
        out = _not_on_the_command_line(
            ["replay", *argv, "--exchange", names, "--routing-key", names,
             "--rate", 20, tmp_path / "archive"], env=environ)
        assert "12 published, 12 confirmed" in out, out
    run = ft.run_worker(config, timeout=60)
    assert run.returncode == 0, run.log_tail()
    assert len(ft.read_archives(tmp_path / "archive")) == 36
    # a wrong password of such characters: refused, in one line without it
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = _config(ft, wrong, url.replace("vxjy", "vxjy;#x"), names,
                     names, broker={"connect_max_retries": 0},
                     logging={"level": "DEBUG", "file": wrong / "w.log"})
    refused = subprocess.run([WORKER, "--debug", "run", "--config", config],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "refused the connection" in refused.stderr
    _no_secret(refused.stdout, refused.stderr,
               (wrong / "w.log").read_text())


# -- file modes ---------------------------------------------------------------

class Watcher(threading.Thread):
    """The mode of every path under ``roots`` seen while the worker runs
    (the transient ones too, when caught: ``.ship``, ``.gz.tmp``...)."""

    def __init__(self, *roots):
        super().__init__(daemon=True)
        self.roots = roots
        self.seen = {}
        self.done = threading.Event()

    def scan(self):
        for root in self.roots:
            for folder, dirs, files in os.walk(root):
                for name in [".", *dirs, *files]:
                    path = os.path.normpath(os.path.join(folder, name))
                    try:
                        mode = os.lstat(path).st_mode
                    except FileNotFoundError:
                        continue
                    self.seen.setdefault(path, mode)

    def run(self):
        while not self.done.is_set():
            self.scan()
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.join()
        self.scan()


def _run_under_umask_022(config, idle_exit=1.5):
    proc = subprocess.run(
        [WORKER, "run", "--config", config, "--idle-exit", str(idle_exit)],
        capture_output=True, text=True, timeout=90,
        preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("modes, file_mode, dir_mode", [
    ({}, 0o600, 0o700),
    ({"file_mode": "0640", "dir_mode": "0750"}, 0o640, 0o750),
])
def test_everything_the_worker_creates_has_the_modes_under_umask_022(
        ft, tmp_path, rabbit, names, modes, file_mode, dir_mode):
    rabbit.declare(names, names, names)
    ft.publish(ft.AMQP_URL, 40, names, names)
    moved = tmp_path / "moved" / "deep"
    log = tmp_path / "worker.log"
    config = _config(
        ft, tmp_path, ft.AMQP_URL, names, names, roll_checker="count",
        roll_options={"roll_count": 5},
        callbacks={"gzip": {}, "move": {"destination_folder": moved}},
        archive_options=modes, worker={"processes": 2},
        logging={"level": "INFO", "file": log})
    watcher = Watcher(tmp_path / "archive", tmp_path / "moved")
    watcher.start()
    try:
        _run_under_umask_022(config)
        # and an archive the chain leaves where it was written, listed in
        # .finished.ship
        ft.publish(ft.AMQP_URL, 3, names, names)
        plain = _config(ft, tmp_path, ft.AMQP_URL, names, names,
                        roll_checker="count", roll_options={"roll_count": 2},
                        archive_options=modes, name="plain.conf",
                        logging={"level": "INFO", "file": log})
        _run_under_umask_022(plain)
    finally:
        watcher.stop()
    seen = {**watcher.seen, str(log): os.lstat(log).st_mode}
    # the working directory's write probe: empty, mkstemp's 0600, removed
    # at once
    seen = {path: mode for path, mode in seen.items() if not
            os.path.basename(path).startswith(files_mod.PROBE_PREFIX)}
    wrong = {path: oct(stat.S_IMODE(mode)) for path, mode in seen.items()
             if stat.S_IMODE(mode) != (dir_mode if stat.S_ISDIR(mode)
                                       else file_mode)}
    assert not wrong, wrong
    names_seen = {os.path.basename(path) for path in seen}
    assert {"archive", "moved", "deep", ".finished.ship"} <= names_seen
    gz = [path for path in seen if path.startswith(str(moved))
          and path.endswith(".events.gz")]
    plain_archives = [path for path in seen if path.endswith(".events")]
    assert len(gz) >= 8 and plain_archives, sorted(seen)
    assert len(ft.read_archives(moved)) == 40


# -- signals ------------------------------------------------------------------

def test_ctrl_c_twice_to_the_group_still_ships_in_the_grace(
        ft, tmp_path, rabbit, names):
    rabbit.declare(names, names, names)
    ft.publish(ft.AMQP_URL, 60, names, names)
    config = _config(ft, tmp_path, ft.AMQP_URL, names, names,
                     callbacks={"gzip": {}}, worker={"processes": 2})
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([WORKER, "run", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # every message written and acked (so in an open archive)
        ft.wait_until(lambda: rabbit.depth(names) == 0, 30,
                      message="the queue drained")
        ft.wait_until(lambda: _unacked(ft, names) == 0, 30,
                      message="every message acked")
        # Ctrl-C, twice: the terminal signals the whole group each time
        before = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
        gap = time.monotonic() - before
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    said = "\n".join(line for line in text.splitlines()
                     if " got SIG" in line or "shipped" in line)
    left = sorted(os.listdir(tmp_path / "archive"))
    assert len(ft.read_archives(tmp_path / "archive")) == 60
    # each child heard one stop, from the supervisor, however the
    # terminal's two signals and the supervisor's one interleaved
    assert len(re.findall(r"runner \[\d+\] got SIGTERM: stopping$", text,
                          re.M)) == 2, said
    assert "runner" not in "".join(re.findall(r".*got SIGINT.*", text)), said
    if gap >= signals.REPEAT:
        # this test process stalled between the two: a second stop, which
        # may skip the grace; what is left is resumed by the next start
        assert all(name + ".ship" in left for name in left
                   if name.endswith(".events")), (left, said)
        return
    assert "stopping now" not in text, said
    assert all(name.endswith((".events.gz", ".events.gz.index"))
               or name == ".finished.ship" for name in left), (left, said)


def _unacked(ft, queue):
    listing = ft.rabbitmqctl("list_queues", "-q", "name",
                             "messages_unacknowledged")
    for line in listing.stdout.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    return None


# -- signals that keep coming -------------------------------------------------

def test_signals_twenty_times_a_second_do_not_hold_off_the_idle_exit(
        ft, tmp_path, rabbit, names):
    """SIGHUP (the log file's reopen) every 0.05 s at an idle worker: each
    one interrupted its blocking read, which the kernel then started over
    with its whole 0.5 s timeout, so the read never ended and ``--idle-exit
    1`` waited until the signals stopped (seen: 16 s of them, exit 1 s
    after the last). Now the read ends on time and the worker exits while
    the signals still come."""
    rabbit.declare(names, names, names)
    log_path = tmp_path / "w.log"
    # fsync_interval 2 s: the reads' timeout is the longest, 0.5 s
    config = _config(ft, tmp_path, ft.AMQP_URL, names, names,
                     logging={"level": "INFO", "file": log_path},
                     archive_options={"fsync_interval": 2})
    proc = subprocess.Popen([WORKER, "run", "--config", config,
                             "--idle-exit", "1"],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    sent = 0
    try:
        # the handler is set once the log file is: no signal before it
        wait_for(lambda: log_path.exists() and "starting" in
                 log_path.read_text(), 60, "the worker's first line")
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                "no message for" not in log_path.read_text():
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.05)
        # the idle exit came while the signals still came (at most 120 s
        # of them; a read that waits them out exits only after)
        assert time.monotonic() < deadline, "no idle exit in 120 s of " \
            "SIGHUP every 0.05 s (%d sent)" % sent
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent >= 5, sent  # the signals came while it waited
    text = log_path.read_text()
    assert "no message for 1 s: stopping" in text, text[-2000:]
    # a signal sent just before the line showed may reach the process once
    # Python has given SIGHUP back to the system for its exit (this test
    # stalled between reading the log and signalling): only after the
    # worker said it stopped
    assert code == 0 or (code == -signal.SIGHUP and re.search(
        r"runner \[\d+\] stopped\n\Z", text)), (code, text[-2000:])
