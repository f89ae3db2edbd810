"""What an operator meets before and while deploying, on the real servers:
``check-config --connect`` against the RabbitMQ on 127.0.0.1:5672, the
tests' Swift all-in-one (tempauth) and Keystone; oslo.messaging's
transport_url pasted as it is; secrets handed over as the unit file hands
them (``EnvironmentFile=``, ``LoadCredential=``).
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import uuid

import pytest
from swiftclient import client as swc

from shoebox_worker.ship import swift

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
pytestmark = pytest.mark.functional

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "shoebox-worker.service"
ROUTING_KEY = "notifications.info"


def check_config(path, env=None):
    """``shoebox-worker check-config --connect``: (exit code, stdout lines,
    stderr)."""
    result = subprocess.run(
        [WORKER, "check-config", "--connect", "--config", str(path)],
        capture_output=True, text=True, timeout=120, env=env,
        stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout.splitlines(), result.stderr


@pytest.fixture
def container(swift_env, ft):
    name = "shoebox-ft-checks-%s" % uuid.uuid4().hex[:10]
    yield name
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"])
    try:
        ft.delete_swift_container(conn, name)
    finally:
        conn.close()


# -- check-config --connect: the broker ---------------------------------------

def test_each_host_of_a_transport_url_is_logged_in_and_each_queue_checked(
        rabbit, names, tmp_path, ft):
    durable_mismatch = rabbit.track_queue(names + "-q")
    rabbit.declare(durable_mismatch, rabbit.track_exchange(names + "-x"),
                   ROUTING_KEY, durable=False)
    good = rabbit.track_queue(names + "-good")
    rabbit.declare(good, names + "-x", ROUTING_KEY, durable=False)
    url = ("rabbit://guest:guest@127.0.0.1:5672,guest:s3cr%2Fet@127.0.0.1:"
           "5672,guest:guest@127.0.0.1:1/")
    config = ft.write_config(tmp_path / "w.conf", {
        "broker": {"url": url, "connect_timeout": 5},
        "consumer:%s" % good: {"exchange": names + "-x",
                               "routing_key": ROUTING_KEY},
        "consumer:%s" % durable_mismatch: {"exchange": names + "-x",
                                           "routing_key": ROUTING_KEY,
                                           "durable": True},
        "consumer:%s-missing" % names: {"declare": False},
        "consumer:%s-new" % names: {"exchange": names + "-nx",
                                    "routing_key": ROUTING_KEY},
        "archive": {"working_directory": tmp_path / "archive"},
    })
    code, lines, stderr = check_config(config)
    assert code == 2, (lines, stderr)
    assert lines[:5] == [
        "%s: OK" % config,
        "working directory %s: OK: writable (a probe file written and "
        "removed)" % (tmp_path / "archive"),
        "broker amqp://guest:***@127.0.0.1:5672/ (URL 1 of 3): OK: logged "
        "in as guest (RabbitMQ %s)" % lines[2].rsplit(" ", 1)[1][:-1],
        "broker amqp://guest:***@127.0.0.1:5672/ (URL 2 of 3): FAILED: "
        "ACCESS_REFUSED - Login was refused using authentication mechanism "
        "PLAIN. For details see the broker logfile; this will not heal by "
        "retrying: check the user and password in [broker] url and the "
        "user's permissions on the vhost",
        "broker amqp://guest:***@127.0.0.1:1/ (URL 3 of 3): FAILED: "
        "[Errno 111] Connection refused",
    ]
    assert lines[5:] == [
        "queue %s: OK: exists, and the broker takes its declaration" % good,
        "queue %s: FAILED: %s [consumer:%s] durable: queue %r exists on the "
        "broker with durable = false, this config says durable = true "
        "(oslo.messaging declares non-durable unless amqp_durable_queues = "
        "true): set durable = false, or declare = false to use it as it is"
        % (durable_mismatch, config, durable_mismatch, durable_mismatch),
        "queue %s-missing: FAILED: %s [consumer:%s-missing] declare: no "
        "queue '%s-missing' on the broker (NOT_FOUND - no queue "
        "'%s-missing' in vhost '/'): with declare = false the worker only "
        "reads a queue that exists; have the services declare it first, "
        "or set declare = true" % ((names, config) + (names,) * 3),
        "queue %s-new: OK: not declared yet: a run declares it; "
        "exchange(s) %s-nx not declared yet: a run declares them"
        % (names, names),
    ]
    warning = (
        "shoebox-worker: warning: %s [consumer:%s] durable = false: set "
        "durable = true (RabbitMQ 4.3 and later refuse queues that are "
        "neither durable nor exclusive, unless "
        "deprecated_features.permit.transient_nonexcl_queues = true), and "
        "make it a quorum queue on a cluster\n")
    assert stderr == "".join(
        warning % (config, queue)
        for queue in (good, names + "-missing", names + "-new")) + (
        "shoebox-worker: %s: check-config --connect: 4 of 8 checks failed: "
        "broker amqp://guest:***@127.0.0.1:5672/ (URL 2 of 3); broker "
        "amqp://guest:***@127.0.0.1:1/ (URL 3 of 3); queue %s; queue "
        "%s-missing\n" % (config, durable_mismatch, names))
    assert "s3cr" not in "\n".join(lines) + stderr
    # nothing was created by the checks
    assert rabbit.depth(names + "-new") is None
    assert rabbit.depth(names + "-missing") is None


def test_all_good_exits_0(rabbit, names, tmp_path, ft):
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), ROUTING_KEY,
                   durable=True)
    config = ft.worker_config(tmp_path, queue, names,
                              routing_key=ROUTING_KEY, durable=True)
    code, lines, stderr = check_config(config)
    assert (code, stderr) == (0, "")
    assert [line.split(": ")[1] for line in lines[1:]] == ["OK"] * 3, lines


# -- check-config --connect: Swift --------------------------------------------

def _swift_step_config(ft, tmp_path, swift_options):
    """A config whose chain is the swift step with ``swift_options`` (on
    memory://: only Swift is checked)."""
    return ft.write_config(tmp_path / "w.conf", {
        "broker": {"url": "memory://"},
        "consumer:q": {"exchange": "x", "routing_key": "k"},
        "archive": {"working_directory": tmp_path / "archive",
                    "callbacks": "swift"},
        "callback:swift": swift_options,
    })


def test_swift_tempauth_authenticated_and_the_container_headed(
        swift_env, container, tmp_path, ft):
    def config(key):
        return _swift_step_config(ft, tmp_path, {
            "auth": swift_env["ST_AUTH"], "user": swift_env["ST_USER"],
            "key": key, "container": container})
    code, lines, _ = check_config(config(swift_env["ST_KEY"]))
    assert code == 0, lines
    assert re.fullmatch(
        r"callback swift: OK: authenticated at %s \(account \S+/AUTH_\w+\); "
        r"container %s does not exist yet: the first upload creates it"
        % (re.escape(swift_env["ST_AUTH"]), container), lines[-1]), lines
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"])
    conn.put_container(container)
    conn.put_object(container, "one", b"12345")
    conn.close()
    code, lines, _ = check_config(config(swift_env["ST_KEY"]))
    assert code == 0, lines
    assert lines[-1].endswith("container %s exists (1 objects, 5 bytes)"
                              % container), lines
    code, lines, stderr = check_config(config("wr0ng-key"))
    assert code == 2
    assert lines[-1].startswith("callback swift: FAILED: %s: "
                                % swift_env["ST_AUTH"]), lines
    assert lines[-1].endswith("this will not heal by retrying: check "
                              "[callback:swift] user and key"), lines
    assert stderr.endswith("1 of 4 checks failed: callback swift\n")
    assert "wr0ng" not in "\n".join(lines) + stderr


def test_swift_through_keystone(keystone, tmp_path, ft):
    import keystone_env
    env = keystone_env.keystone_env()
    container = "shoebox-ft-ks-checks-%s" % uuid.uuid4().hex[:8]

    def config(password):
        return _swift_step_config(ft, tmp_path, env.swift_options(
            os_password=password, container=container))
    code, lines, _ = check_config(config(env.values["os_password"]))
    assert code == 0, lines
    assert re.fullmatch(
        r"callback swift: OK: authenticated at %s \(account \S+/AUTH_\w+\); "
        r"container %s does not exist yet: the first upload creates it"
        % (re.escape(env.values["os_auth_url"]), container), lines[-1]), \
        lines
    code, lines, _ = check_config(config("not-the-password"))
    assert code == 2
    assert lines[-1].endswith(
        "this will not heal by retrying: check [callback:swift] os_username "
        "(or os_user_id), os_password, the domains and the project"), lines
    # a user without Swift's operator role: Swift's 403
    cb = swift.SwiftUploadCallback(**env.norole_options(container=container))
    with pytest.raises(Exception) as caught:
        cb.check_access()
    assert caught.value.permanent and "403" in str(caught.value)


# -- a transport_url and the unit's secrets, in a run -------------------------

def _unit_credentials():
    """The unit's ``LoadCredential=ID:NAME`` lines: ``{ID: NAME}``."""
    found = {}
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"LoadCredential=([^:]+):(\S+)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _unit_environment_file():
    (line,) = [line for line in UNIT.read_text().splitlines()
               if line.startswith("EnvironmentFile=")]
    return line.split("=", 1)[1]


def test_the_units_secrets_reach_a_run_on_a_transport_url(
        rabbit, names, tmp_path, ft):
    """What systemd does for the unit, played by the test: the credentials
    it names are copied from the credstore into $CREDENTIALS_DIRECTORY
    under their IDs, and its environment file's variables are set; the
    config, oslo's transport_url with both hosts, names them."""
    credentials = _unit_credentials()
    assert credentials["rabbit-password"] == "shoebox-worker.rabbit-password"
    assert _unit_environment_file() == "-/etc/shoebox-worker/env"
    credstore = tmp_path / "credstore"
    credstore.mkdir()
    (credstore / credentials["rabbit-password"]).write_text("guest\n")
    folder = tmp_path / "credentials"
    folder.mkdir()
    for cred_id, name in credentials.items():
        source = credstore / name
        if source.exists():  # systemd skips a missing one
            (folder / cred_id).write_bytes(source.read_bytes())
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), ROUTING_KEY,
                   durable=True)
    config = ft.worker_config(
        tmp_path, queue, names, routing_key=ROUTING_KEY, durable=True,
        url="rabbit://guest:${credential:rabbit-password}@127.0.0.1:5672,"
            "${RABBIT_USER}:${credential:rabbit-password}@127.0.0.1/",
        roll_checker="count", roll_options={"roll_count": 100})
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(folder),
               RABBIT_USER="guest")  # what EnvironmentFile= sets
    code, lines, stderr = check_config(config, env=env)
    assert code == 0, (lines, stderr)
    assert lines[2:4] == [
        "broker amqp://guest:***@127.0.0.1:5672/ (URL %d of 2): OK: logged "
        "in as guest (%s)" % (n, lines[2].split(" (")[-1][:-1])
        for n in (1, 2)]
    ids = ft.publish(ft.AMQP_URL, 250, names, ROUTING_KEY, durable=True)
    proc = ft.run_worker(config, env=env)
    assert proc.returncode == 0, proc.log_tail()
    got = [r.metadata["message_id"] for r in
           ft.read_archives(tmp_path / "archive")]
    assert sorted(got) == sorted(ids)
    # the log names the URL as written, passwords masked
    assert "broker rabbit://guest:***@127.0.0.1:5672,guest:***@127.0.0.1/" \
        in proc.log
    # without the credential: one line naming it, exit 2
    (folder / "rabbit-password").unlink()
    code, lines, stderr = check_config(config, env=env)
    assert code == 2 and lines == []
    assert stderr == (
        "shoebox-worker: %s [broker] url: ${credential:rabbit-password}: "
        "cannot read %s/rabbit-password: No such file or directory (is the "
        "unit's LoadCredential= for it set, and its file there?)\n"
        % (config, folder))


# -- health: /healthz, shoebox_up, --idle-exit --------------------------------

def test_a_refused_swift_key_is_unhealthy_and_idle_exit_exits_1(
        rabbit, names, swift_env, container, tmp_path, ft):
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), ROUTING_KEY)
    port = ft.free_port()
    config = ft.worker_config(
        tmp_path, queue, names, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": 20},
        callbacks={"gzip": {}, "swift": {
            "auth": swift_env["ST_AUTH"], "user": swift_env["ST_USER"],
            "key": "wr0ng", "container": container}, "delete": {}},
        broker={"connect_max_retries": 3})
    with open(config, "a") as f:
        f.write("[metrics]\nport = %d\n" % port)
    ft.publish(ft.AMQP_URL, 50, names, ROUTING_KEY)
    proc = ft.WorkerProcess(config, idle_exit=3)
    try:
        status, text = ft.wait_until(
            lambda: (lambda got: got if got[0] == 503 and "shipping" in
                     got[1] else None)(ft.http_get(port, "/healthz")),
            30, interval=0.05, message="/healthz saying shipping fails")
        assert text.startswith(
            "unhealthy: shipping fails in a way retrying will not fix, on "), \
            text
        assert "check [callback:swift] user and key" in text
        metrics_text = ft.http_get(port, "/metrics")[1]
        assert "\nshoebox_up 0.0\n" in metrics_text
        assert "\nshoebox_consuming 1.0\n" in metrics_text
        code = proc.wait(60)
    finally:
        if proc.alive():
            proc.kill()
    assert code == 1, proc.log_tail()
    assert re.search(r"idle: exiting 1: 3 archive\(s\) left whose shipping "
                     r"fails in a way retrying will not fix", proc.log), \
        proc.log_tail()
    assert "wr0ng" not in proc.log
    # nothing lost: the archives wait for the next start
    assert sum(1 for _ in ft.read_archives(tmp_path / "archive")) == 50


def test_healthy_while_consuming_and_one_sigint_is_said_once(
        rabbit, names, tmp_path, ft):
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), ROUTING_KEY)
    port = ft.free_port()
    config = ft.worker_config(tmp_path, queue, names,
                              routing_key=ROUTING_KEY,
                              callbacks={"gzip": {}})
    with open(config, "a") as f:
        f.write("[metrics]\nport = %d\n" % port)
    proc = ft.WorkerProcess(config)
    try:
        ft.wait_until(lambda: ft.http_get(port, "/healthz") == (
            200, "ok: consuming; shipping works\n"), 30,
            message="/healthz 200")
        status, text = ft.http_get(port, "/metrics")
        assert status == 200 and "\nshoebox_up 1.0\n" in text
        assert re.search(r'\nshoebox_build_info\{version="[^"]+"\} 1\.0\n',
                         text)
        assert ft.http_get(port, "/")[0] == 404
        proc.signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.log_tail()
    finally:
        if proc.alive():
            proc.kill()
    assert re.findall(r"got SIGINT[^\n]*", proc.log) == [
        "got SIGINT: stopping"]
