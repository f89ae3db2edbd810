"""Shared fixtures of the functional tests: real servers, real processes.

The worker tests run the venv's ``shoebox-worker run`` console script as a
subprocess against the RabbitMQ on 127.0.0.1:5672 (guest/guest) and the
Redis on 127.0.0.1:6379. A server that does not answer skips the tests
that need it, or fails them when ``CI=true``.

The Keystone tests take the project's own Keystone (scripts/keystone) from
the ``SHOEBOX_TEST_OS_*`` and ``SHOEBOX_TEST_KS_*`` variables it exports
(``keystone`` fixture); when they are missing the tests skip, or fail when
``CI=true``.

Every test uses its own queue and exchange names (``names`` fixture) and
deletes them at the end (``rabbit.track_queue``/``track_exchange``).
"""

import contextlib
import dataclasses
import fcntl
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import uuid

import orjson
import pytest
import swiftclient.client as swc
from kombu import Connection
from kombu import Exchange
from kombu import Queue

from shoebox_worker import archive
from shoebox_worker import index
from shoebox_worker import timestamps
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import simulator

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
#: The worker's console script, next to the interpreter running the tests.
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")

#: Names of archive files (written, or compressed by a callback).
ARCHIVE_NAME = re.compile(r"\.events(\.gz|\.zst)?\Z")


def unavailable(message):
    """Skip, or fail when CI=true: CI must not pass by skipping."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def strace():
    """strace's path, for the tests that kill at system calls
    (kill_points.py)."""
    path = shutil.which("strace")
    if path is None:
        unavailable("strace is not installed (scripts/debian-packages)")
    return path


#: Where the tests find the Swift all-in-one (``scripts/swift-saio start``).
SWIFT_ENV_VARS = ("ST_AUTH", "ST_USER", "ST_KEY")


def swift_connection(env, retries=2, timeout=30):
    """A swiftclient connection to the Swift of ``env`` (tempauth)."""
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1",
                          retries=retries, timeout=timeout)


@pytest.fixture(scope="session")
def swift_env():
    """``ST_AUTH``, ``ST_USER``, ``ST_KEY`` of a Swift that answers (the
    tests' Swift all-in-one, from ``scripts/swift-saio start``)."""
    missing = [name for name in SWIFT_ENV_VARS if not os.environ.get(name)]
    if missing:
        unavailable("%s not set; run: env=\"$(scripts/swift-saio start)\" "
                    "&& eval \"$env\"" % ", ".join(missing))
    env = {name: os.environ[name] for name in SWIFT_ENV_VARS}
    conn = swift_connection(env, retries=0)
    try:
        conn.head_account()
    except Exception as exc:
        unavailable("Swift at %s does not answer: %s" % (env["ST_AUTH"], exc))
    finally:
        conn.close()
    return env


def _port_open(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


# -- RabbitMQ ---------------------------------------------------------------

class Rabbit:
    """A connection to the test broker, and what the test must delete."""

    def __init__(self, url=AMQP_URL):
        self.url = url
        self.conn = Connection(url, connect_timeout=5)
        self.conn.connect()
        self.queues = []
        self.exchanges = []

    def channel(self):
        """A fresh channel (reconnecting if a test cut the connection)."""
        try:
            return self.conn.channel()
        except Exception:
            self.conn.release()
            self.conn = Connection(self.url, connect_timeout=5)
            self.conn.connect()
            return self.conn.channel()

    def track_queue(self, name):
        self.queues.append(name)
        return name

    def track_exchange(self, name):
        self.exchanges.append(name)
        return name

    def depth(self, queue):
        """Messages ready in ``queue`` (unacked ones are not counted), or
        None when the queue does not exist (or the broker is away)."""
        try:
            channel = self.channel()
        except Exception:
            return None
        try:
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
            return count
        except Exception:
            return None
        finally:
            try:
                channel.close()
            except Exception:
                pass

    def consumers(self, queue):
        channel = self.channel()
        try:
            return channel.queue_declare(queue=queue, passive=True)[2]
        finally:
            channel.close()

    def declare(self, queue, exchange, routing_key, durable=False,
                exchange_type="topic", queue_arguments=None):
        """Declare an exchange and a queue bound to it (tracked)."""
        self.track_exchange(exchange)
        self.track_queue(queue)
        channel = self.channel()
        try:
            ex = Exchange(exchange, type=exchange_type, durable=durable)
            Queue(queue, ex, routing_key=routing_key, durable=durable,
                  queue_arguments=queue_arguments)(channel).declare()
        finally:
            channel.close()

    def publish_raw(self, exchange, routing_key, messages):
        """Publish ``(body, properties)`` pairs as they are (persistent,
        with publisher confirms); properties may set content_type,
        content_encoding, message_id..."""
        with Connection(self.url, transport_options={
                "confirm_publish": True}) as conn:
            producer = conn.Producer(exchange=Exchange(exchange),
                                     auto_declare=False)
            for body, properties in messages:
                properties = dict(properties)
                content_type = properties.pop("content_type",
                                              "application/json")
                content_encoding = properties.pop("content_encoding",
                                                  "binary")
                producer.publish(body, routing_key=routing_key,
                                 content_type=content_type,
                                 content_encoding=content_encoding,
                                 delivery_mode=2, retry=False,
                                 **properties)

    def cleanup(self):
        channel = self.channel()
        for name in self.queues:
            try:
                channel.queue_delete(name)
            except Exception:
                channel = self.channel()
        for name in self.exchanges:
            try:
                channel.exchange_delete(name)
            except Exception:
                channel = self.channel()
        try:
            channel.close()
        except Exception:
            pass
        self.conn.release()


@pytest.fixture(scope="session")
def rabbit_available():
    try:
        Rabbit().conn.release()
    except Exception as exc:
        unavailable("RabbitMQ not reachable at %s: %s" % (AMQP_URL, exc))


#: The brokers a test marked ``both_brokers`` runs against, by id: the
#: machine's RabbitMQ (Debian 12's 3.10, 127.0.0.1:5672) and the tests'
#: own RabbitMQ 4.0 (scripts/rabbitmq4, which scripts/test starts; it
#: refuses what 4.3 refuses: transient non-exclusive queues, global QoS).
BROKERS = ("rabbitmq3", "rabbitmq4")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_brokers") is not None:
        metafunc.parametrize("broker", BROKERS, indirect=True)


@dataclasses.dataclass
class Broker:
    """One RabbitMQ the tests use: its id (:data:`BROKERS`), AMQP URL
    (guest) and version, as the server tells it."""

    name: str
    url: str
    version: tuple

    @property
    def is_4(self):
        return self.version >= (4, 0)

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def ctl(self, *args, timeout=120):
        """rabbitmqctl ARGS on this broker's node (the machine's, or
        scripts/rabbitmq4's in its root)."""
        if self.name == "rabbitmq3":
            return rabbitmqctl(*args, timeout=timeout)
        return subprocess.run([RABBIT4_SCRIPT, "ctl", *args],
                              capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def _version_of(url):
    from shoebox_worker.consume import rabbitmq as rabbitmq_mod
    with Connection(url, connect_timeout=5) as conn:
        conn.connect()
        return rabbitmq_mod.server_version(conn)


@pytest.fixture(scope="session")
def brokers():
    """``{id: Broker}`` of the brokers that answer (checked when a test
    asks for one)."""
    return {}


@pytest.fixture
def broker(request, brokers):
    """The broker of this test: the machine's, or, for a test marked
    ``both_brokers``, each of :data:`BROKERS` in turn. A RabbitMQ 4 that
    is not there skips the test, or fails it when CI=true."""
    which = getattr(request, "param", "rabbitmq3")
    if which not in brokers:
        if which == "rabbitmq3":
            url = AMQP_URL
        else:
            url = os.environ.get("SHOEBOX_TEST_RABBIT4_URL")
            if not url:
                unavailable("SHOEBOX_TEST_RABBIT4_URL not set; run: "
                            "env=\"$(scripts/rabbitmq4 start)\" && "
                            "eval \"$env\"")
        try:
            brokers[which] = Broker(which, url, _version_of(url))
        except Exception as exc:
            unavailable("RabbitMQ not reachable at %s: %s" % (url, exc))
    return brokers[which]


@pytest.fixture
def rabbit(rabbit_available, broker):
    """A connection to this test's broker (:func:`broker`), and what the
    test declared on it, deleted at the end."""
    connection = Rabbit(broker.url)
    connection.broker = broker
    yield connection
    connection.cleanup()


@pytest.fixture
def names(request):
    """A unique base name for this test's queues and exchanges."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:30]
    return "shoebox-ft-%s-%s" % (test.strip("-"), uuid.uuid4().hex[:8])


@pytest.fixture(scope="session")
def redis_available():
    if not _port_open("127.0.0.1", 6379):
        unavailable("Redis not reachable at 127.0.0.1:6379")
    import redis
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        unavailable("Redis not answering at %s: %s" % (REDIS_URL, exc))


@pytest.fixture
def redis_names(redis_available, names):
    """``names``, and every Redis key holding it deleted at the end."""
    yield names
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter("*%s*" % names):
        client.delete(key)


def publish(url, count, exchange, routing_key, queue=None, seed=1,
            durable=False, confirm=True):
    """Publish ``count`` synthetic notifications (v2 envelope) with
    :func:`shoebox_worker.tools.publish.publish`; returns their
    message_ids."""
    publish_mod.publish(url, count, exchange=exchange,
                        routing_key=routing_key, durable=durable, seed=seed,
                        declare_queue=queue, confirm=confirm)
    return [n["message_id"] for n in simulator.notifications(count,
                                                             seed=seed)]


# -- the project's own RabbitMQ cluster --------------------------------------

#: scripts/rabbitmq4, the tests' RabbitMQ 4 (Broker.ctl runs its ctl).
RABBIT4_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "scripts", "rabbitmq4")
#: scripts/rabbit-cluster, which the ``cluster`` fixture runs.
CLUSTER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "scripts", "rabbit-cluster")


@dataclasses.dataclass
class Cluster:
    """The 3-node cluster of ``scripts/rabbit-cluster`` (see its
    docstring), from the ``export`` lines its ``start`` printed."""

    env: dict

    @property
    def urls(self):
        """The three nodes' AMQP URLs (guest), node 1 first."""
        return self.env["SHOEBOX_TEST_CLUSTER_URLS"].split(";")

    @property
    def nodes(self):
        return self.env["SHOEBOX_TEST_CLUSTER_NODES"].split()

    def url_of(self, node):
        return self.urls[self.nodes.index(node)]

    @property
    def tls_urls(self):
        """The three nodes' amqps URLs (guest, host 127.0.0.1), node 1
        first."""
        return self.env["SHOEBOX_TEST_CLUSTER_TLS_URLS"].split(";")

    def tls_url_of(self, node):
        return self.tls_urls[self.nodes.index(node)]

    def __getattr__(self, name):
        # tls_url (node 1's), tls_node, ca, client_cert, client_key
        try:
            return self.__dict__["env"]["SHOEBOX_TEST_CLUSTER_"
                                        + name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def run(self, *args, timeout=300, check=True):
        result = subprocess.run(
            [CLUSTER_SCRIPT, *args], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
            env=dict(os.environ,
                     RABBIT_CLUSTER_DIR=self.env["SHOEBOX_TEST_CLUSTER_DIR"]))
        if check:
            assert result.returncode == 0, (args, result.stderr)
        return result

    def kill(self, node):
        """SIGKILL one node."""
        self.run("kill", node)

    def restart(self, node):
        """Start a node again (with its data: it rejoins); waits until it
        serves."""
        self.run("restart", node)

    def leader(self, queue):
        """The node holding quorum queue ``queue``'s leader."""
        return self.run("leader", queue).stdout.strip()

    def ctl(self, node, *args, timeout=300):
        """rabbitmqctl ARGS on ``node`` (with the cluster's cookie)."""
        return self.run("ctl", node, *args, timeout=timeout, check=False)


def _exports(text):
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"export (\w+)=(.*)", line)
        if match:
            values[match.group(1)] = shlex.split(match.group(2))[0]
    return values


#: Held while ``scripts/rabbit-cluster start`` runs: each pytest-xdist
#: worker has its own session, and two starts at once would race.
CLUSTER_LOCK = os.path.join(os.path.dirname(CLUSTER_SCRIPT), os.pardir,
                            ".rabbit-cluster.lock")


@pytest.fixture(scope="session")
def cluster():
    """The project's own 3-node RabbitMQ cluster. ``scripts/test`` starts it
    before pytest and exports its ``SHOEBOX_TEST_CLUSTER_*`` variables,
    which are used as they are (asking the nodes again takes seconds of
    Erlang CLI on a machine busy with the other tests). Without them (a
    run without scripts/test), ``scripts/rabbit-cluster start`` runs
    once per pytest-xdist worker, under a lock: a no-op when the cluster
    runs, a fresh start otherwise. It is left running, as Keystone and
    the Swift all-in-ones are: other workers may still use it, and the
    next run finds it up. A start that fails skips the tests, or fails
    them when CI=true."""
    exported = {name: value for name, value in os.environ.items()
                if name.startswith("SHOEBOX_TEST_CLUSTER_")}
    if "SHOEBOX_TEST_CLUSTER_URLS" in exported:
        return Cluster(exported)
    started = time.monotonic()
    with open(CLUSTER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run([CLUSTER_SCRIPT, "start"],
                                    capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, timeout=900)
        except subprocess.TimeoutExpired:
            unavailable("scripts/rabbit-cluster start did not finish in "
                        "900 s")
    if result.returncode != 0:
        unavailable("scripts/rabbit-cluster start failed (rc %d): %s" % (
            result.returncode, result.stderr[-3000:]))
    if "already running" not in result.stderr:
        print("\nscripts/rabbit-cluster start: %.1f s" % (
            time.monotonic() - started))
    return Cluster(_exports(result.stdout))


# -- Keystone ---------------------------------------------------------------

#: What scripts/keystone exports (see its docstring), by field name.  No
#: plain OS_* name: python-swiftclient reads those at import time.
KEYSTONE_VARS = {
    "auth_url": "SHOEBOX_TEST_OS_AUTH_URL",
    "username": "SHOEBOX_TEST_OS_USERNAME",
    "user_id": "SHOEBOX_TEST_OS_USER_ID",
    "password": "SHOEBOX_TEST_OS_PASSWORD",
    "project_name": "SHOEBOX_TEST_OS_PROJECT_NAME",
    "project_id": "SHOEBOX_TEST_OS_PROJECT_ID",
    "user_domain_name": "SHOEBOX_TEST_OS_USER_DOMAIN_NAME",
    "user_domain_id": "SHOEBOX_TEST_OS_USER_DOMAIN_ID",
    "project_domain_name": "SHOEBOX_TEST_OS_PROJECT_DOMAIN_NAME",
    "project_domain_id": "SHOEBOX_TEST_OS_PROJECT_DOMAIN_ID",
    "region_name": "SHOEBOX_TEST_OS_REGION_NAME",
    "application_credential_name":
        "SHOEBOX_TEST_OS_APPLICATION_CREDENTIAL_NAME",
    "application_credential_id": "SHOEBOX_TEST_OS_APPLICATION_CREDENTIAL_ID",
    "application_credential_secret":
        "SHOEBOX_TEST_OS_APPLICATION_CREDENTIAL_SECRET",
    "norole_username": "SHOEBOX_TEST_KS_NOROLE_USERNAME",
    "norole_password": "SHOEBOX_TEST_KS_NOROLE_PASSWORD",
    "token_expiration": "SHOEBOX_TEST_KS_TOKEN_EXPIRATION",
    "swift_conf": "SHOEBOX_TEST_KS_SWIFT_CONF",
}


@pytest.fixture(scope="session")
def keystone():
    """The project's Keystone, as a namespace of the fields of
    KEYSTONE_VARS (``token_expiration`` an int, in seconds); it answers.
    Skips, or fails when CI=true, when a variable is missing or Keystone
    does not answer."""
    missing = [var for var in KEYSTONE_VARS.values()
               if not os.environ.get(var)]
    if missing:
        unavailable("%s not set; run: env=\"$(scripts/keystone start)\" "
                    "&& eval \"$env\"" % ", ".join(missing))
    values = {field: os.environ[var] for field, var in KEYSTONE_VARS.items()}
    values["token_expiration"] = int(values["token_expiration"])
    import requests
    try:
        requests.get(values["auth_url"], timeout=10).raise_for_status()
    except requests.RequestException as exc:
        unavailable("Keystone not answering at %s: %s"
                    % (values["auth_url"], exc))
    return types.SimpleNamespace(**values)


# -- the example plugin -------------------------------------------------------

#: examples/shoebox-example-plugin: a third-party callback package.
EXAMPLE_PLUGIN = os.path.join(os.path.dirname(CLUSTER_SCRIPT), os.pardir,
                              "examples", "shoebox-example-plugin")


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory):
    """The environment in which ``shoebox-worker`` finds the example
    plugin: it is pip-installed (from a copy, so that the source tree
    stays clean) into a folder of this session's own, put first on
    ``PYTHONPATH``; its entry points are found there. The venv itself is
    never changed, so tests running beside these do not see the plugin
    come and go."""
    base = tmp_path_factory.mktemp("example-plugin")
    source, target = base / "src", base / "site"
    shutil.copytree(EXAMPLE_PLUGIN, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    try:
        import wheel  # noqa: F401 - needed to build without isolation
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    installed = subprocess.run(
        [*pip, "install", "--no-deps", *isolation, "--target", str(target),
         str(source)], capture_output=True, text=True, timeout=300)
    if installed.returncode != 0:
        pytest.fail("pip install of the example plugin failed:\n%s"
                    % installed.stderr)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(target)] + ([path] if path else [])))


# -- configs ----------------------------------------------------------------

def write_config(path, sections):
    """Write ``{section: {key: value}}`` as an INI file; returns the path."""
    lines = []
    for section, options in sections.items():
        lines.append("[%s]" % section)
        for key, value in options.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            lines.append("%s = %s" % (key, value))
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


def worker_config(tmp_path, queue, exchange, *, url=AMQP_URL,
                  routing_key="", durable=False, roll_checker="never",
                  roll_options=None, callbacks=None, broker=None,
                  archive_options=None, worker=None, consumers=None,
                  consumer_options=None, name="worker.conf"):
    """A worker config in ``tmp_path``; archives go to tmp_path/archive.

    :param callbacks: ``{name: {option: value}}`` in chain order.
    :param consumer_options: more options of ``[consumer:queue]``.
    :param consumers: extra ``{queue: {option: value}}`` sections.
    """
    callbacks = callbacks or {}
    sections = {
        "broker": {"url": url, "heartbeat": 10, "connect_timeout": 5,
                   **(broker or {})},
        "consumer:%s" % queue: {"exchange": exchange,
                                "routing_key": routing_key,
                                "durable": durable,
                                **(consumer_options or {})},
    }
    for extra, options in (consumers or {}).items():
        sections["consumer:%s" % extra] = options
    sections["archive"] = {
        "working_directory": tmp_path / "archive",
        "roll_checker": roll_checker,
        "callbacks": ", ".join(callbacks),
        "fsync_interval": 0.2,
        "retry_initial": 0.2,
        "retry_max": 1,
        **(archive_options or {}),
    }
    if roll_options:
        sections["roll_checker:%s" % roll_checker] = roll_options
    for cb, options in callbacks.items():
        sections["callback:%s" % cb] = options
    sections["worker"] = {"stats_interval": 5, **(worker or {})}
    sections["logging"] = {"level": "INFO"}
    return write_config(tmp_path / name, sections)


# -- running the worker -----------------------------------------------------

class WorkerProcess:
    """``shoebox-worker run`` as a subprocess; its log goes to a file."""

    def __init__(self, config, idle_exit=None, log_path=None, env=None):
        self.config = config
        self.log_path = log_path or "%s.%s.log" % (config,
                                                   uuid.uuid4().hex[:6])
        argv = [WORKER, "run", "--config", str(config)]
        if idle_exit is not None:
            argv += ["--idle-exit", str(idle_exit)]
        self.argv = argv
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self.elapsed = None

    def wait(self, timeout):
        """Wait for the exit; kill and fail the test after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("shoebox-worker did not exit within %.0f s; log:\n%s"
                        % (timeout, self.log_tail()))
        self.elapsed = time.monotonic() - self.started
        self._log.close()
        return code

    def signal(self, signum):
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def alive(self):
        return self.proc.poll() is None

    @property
    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines=60):
        return "\n".join(self.log.splitlines()[-lines:])

    def wait_for_log(self, pattern, timeout):
        """Wait until the log matches ``pattern`` (a regex)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log):
                return True
            if not self.alive():
                break
            time.sleep(0.05)
        return bool(re.search(pattern, self.log))


@pytest.fixture
def worker_procs():
    """Start workers with ``worker_procs(config, idle_exit=...)``; any still
    running at the end of the test are killed (with their children)."""
    started = []

    def start(config, idle_exit=None):
        proc = WorkerProcess(config, idle_exit)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            for child in child_pids(proc.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()


def run_worker(config, idle_exit=0.5, timeout=90, env=None):
    """Run the worker until it exits; returns the finished WorkerProcess
    (``.returncode``, ``.log``, ``.elapsed``). ``--idle-exit`` waits for
    the consumed queues to be empty too (but a stream's): half a second
    of quiet after that is enough, however busy the machine.

    :param env: its environment (default: the test's).
    """
    proc = WorkerProcess(config, idle_exit, env=env)
    proc.returncode = proc.wait(timeout)
    return proc


def child_pids(pid):
    """The pids of ``pid``'s children (``pgrep -P``)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                         text=True).stdout
    return sorted(int(line) for line in out.split())


def _socket_inodes(pid):
    inodes = set()
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def amqp_local_ports(pid, broker_port=5672):
    """Local TCP ports of ``pid``'s connections to the broker."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and \
                    int(remote.rsplit(":", 1)[1], 16) == broker_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def rabbitmqctl(*args, timeout=60):
    return subprocess.run(["rabbitmqctl", *args], capture_output=True,
                          text=True, timeout=timeout)


def close_amqp_connections(pid, reason="test", ctl=rabbitmqctl,
                           broker_port=5672):
    """Close (broker side) only ``pid``'s AMQP connections, so other users
    of the broker are left alone; returns how many were closed.

    :param ctl: runs rabbitmqctl with the given arguments on the broker
        (default: the machine's node).
    :param broker_port: the AMQP port the worker connected to.
    """
    ports = amqp_local_ports(pid, broker_port)
    listing = ctl("list_connections", "-q", "pid", "peer_port")
    closed = 0
    for line in listing.stdout.splitlines():
        conn_pid, _, port = line.rpartition("\t")
        if port.strip().isdigit() and int(port) in ports:
            result = ctl("close_connection", conn_pid, reason)
            assert result.returncode == 0, result.stderr
            closed += 1
    return closed


@contextlib.contextmanager
def paused(proc):
    """``proc`` (a WorkerProcess) stopped with SIGSTOP for the body, and
    continued after it: what the body does to its connections happens at
    this point of its run, however long the body takes."""
    proc.signal(signal.SIGSTOP)
    try:
        yield proc
    finally:
        proc.signal(signal.SIGCONT)


def wait_until(predicate, timeout, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail("timed out after %.0f s waiting for %s" % (timeout, message))


# -- reading archives -------------------------------------------------------

@dataclasses.dataclass
class Record:
    filename: str
    metadata: dict
    payload: bytes


def archive_files(directory):
    """Archive files in ``directory`` (plain and compressed), sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, name)
                  for name in os.listdir(directory)
                  if ARCHIVE_NAME.search(name))


def read_archives(directory):
    """Every record of every archive in ``directory``, strictly: a damaged
    archive raises (a RecordError naming file and offset)."""
    records = []
    for path in archive_files(directory):
        with archive.ArchiveReader(path) as reader:
            for metadata, payload in reader:
                records.append(Record(os.path.basename(path), metadata,
                                      payload))
    return records


def worker_ids(filenames):
    """The ``{worker_id}`` (host-pid) part of default archive names
    (followed by the roll manager's ``_<token>-<sequence>``)."""
    ids = set()
    for name in filenames:
        match = re.search(r"_\d{8}T\d{6}_(.+?-\d+)_[0-9a-f]{12}-\d+"
                          r"(~\d+)?\.events", os.path.basename(name))
        assert match, name
        ids.add(match.group(1))
    return ids


def swift_archives(conn, container, prefix=None):
    """The archive objects of ``container`` (listing entries), once every
    one of them is checked to have its index object ``<name>.index``
    beside it, and every index object its archive."""
    listing = conn.get_container(container, prefix=prefix,
                                 full_listing=True)[1]
    names = {item["name"] for item in listing}
    archives = [item for item in listing
                if not item["name"].endswith(index.SUFFIX)]
    missing = sorted(item["name"] for item in archives
                     if item["name"] + index.SUFFIX not in names)
    assert not missing, "archive objects without an index: %s" % missing[:5]
    orphans = sorted(name for name in names if name.endswith(index.SUFFIX)
                     and name[:-len(index.SUFFIX)] not in names)
    assert not orphans, "index objects without an archive: %s" % orphans[:5]
    return archives


def check_index(data, records, name):
    """The index ``data`` describes ``records`` (``(metadata, payload)``
    of one archive): their count, time range, and may contain each
    record's value of every indexed field."""
    got = index.Index.from_bytes(data, name)
    assert got.records == len(records), name
    stamps = [timestamps.normalise(m.get("timestamp")) for m, _ in records]
    stamps = [s for s in stamps if s is not None]
    if stamps:
        assert (got.earliest, got.latest) == (min(stamps), max(stamps)), name
    compiled = index.compile_fields(got.fields)
    seen = 0
    for _, payload in records:
        try:
            note = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(note, dict):
            continue
        for field, value in zip(got.fields, index.values_of(note, compiled),
                                strict=True):
            if value is not None:
                assert got.may_contain(field, value), (name, field, value)
                seen += 1
    return got, seen


def write_archive(notes, directory, name):
    """``(path of the .gz, report)`` of ``notes`` as one archive, written
    as the worker writes it (its envelope, ``roll_manager`` with the
    default ``index_fields``), gzipped, its index beside the ``.gz``."""
    from shoebox_worker import compression
    from shoebox_worker import roll_checker
    from shoebox_worker import roll_manager
    from shoebox_worker.consume import envelope
    unwrap = envelope.Unwrapper(index_fields=index.DEFAULT_FIELDS)
    manager = roll_manager.WritingRollManager(
        name, roll_checker.NeverRollChecker(), directory=str(directory),
        index_fields=index.DEFAULT_FIELDS)
    for note in notes:
        payload, metadata, values = unwrap(envelope.wrap(note), "q", "rk")
        manager.write(metadata, payload, values)
    report = manager.close()
    gz = compression.compress_file(report.filename,
                                   compression.get_codec("gzip"))
    os.unlink(report.filename)
    os.replace(index.sidecar(report.filename), index.sidecar(gz))
    return gz, report


def local_ports(pid, port):
    """Local TCP ports of ``pid``'s connections to ``port``."""
    return amqp_local_ports(pid, port)


#: Where :func:`free_ports` picks: below Linux's ephemeral range
#: (32768-60999), which the kernel draws the tests' own client
#: connections from. A port the kernel gave (a bind to port 0) was taken
#: by a client connection before the private Swift that was to listen on
#: it started (seen in CI, 8 tests at once).
SERVER_PORTS = range(20000, 32000)


def free_ports(count):
    """``count`` TCP ports that nothing holds at 127.0.0.1 now, for a
    server a test starts (a private Swift, a worker's [metrics] port)."""
    ports = []
    while len(ports) < count:
        port = random.choice(SERVER_PORTS)
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def free_port():
    """One of :func:`free_ports`."""
    return free_ports(1)[0]


def closed_port():
    """A port nothing listens on at 127.0.0.1, for a connection that must
    be refused: one the kernel gives (its ephemeral range), where no
    server of the tests listens (they take :func:`free_ports`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port, path, timeout=5):
    """``(status, body)`` of a GET of http://127.0.0.1:PORT/PATH (an HTTP
    error's too); ``(None, "")`` while nothing answers there."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path),
                                    timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return None, ""


def delete_swift_container(conn, name):
    """Delete a container, its ``_segments`` twin and every object in them
    (a swiftclient Connection); missing ones are fine."""
    from swiftclient import client as swc
    for cont in (name, name + "_segments"):
        try:
            for obj in conn.get_container(cont, full_listing=True)[1]:
                conn.delete_object(cont, obj["name"])
            conn.delete_container(cont)
        except swc.ClientException as exc:
            if exc.http_status != 404:
                raise


@pytest.fixture
def swift_gets(monkeypatch):
    """The ``(container, object)`` of every GET the tools send through the
    swift step's connection (archives and indexes alike), in the order
    sent; each still goes through to Swift."""
    from shoebox_worker.ship import swift as swift_mod
    gets = []
    real = swift_mod._Connection.get_object

    def get_object(self, container, obj, *args, **kwargs):
        gets.append((container, obj))
        return real(self, container, obj, *args, **kwargs)

    monkeypatch.setattr(swift_mod._Connection, "get_object", get_object)
    return gets


@pytest.fixture(scope="session")
def ft():
    """The helpers above, for the test modules (conftest is not imported);
    session-scoped, so that module fixtures can use them too."""
    return types.SimpleNamespace(
        AMQP_URL=AMQP_URL, REDIS_URL=REDIS_URL, publish=publish,
        worker_config=worker_config, write_config=write_config,
        run_worker=run_worker, WorkerProcess=WorkerProcess,
        read_archives=read_archives,
        archive_files=archive_files, worker_ids=worker_ids,
        swift_archives=swift_archives, check_index=check_index,
        child_pids=child_pids, wait_until=wait_until, paused=paused,
        unavailable=unavailable, WORKER=WORKER,
        rabbitmqctl=rabbitmqctl, Rabbit=Rabbit,
        close_amqp_connections=close_amqp_connections,
        write_archive=write_archive, local_ports=local_ports,
        free_port=free_port, free_ports=free_ports, closed_port=closed_port,
        http_get=http_get,
        swift_connection=swift_connection,
        delete_swift_container=delete_swift_container)
