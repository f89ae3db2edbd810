"""Reading archives back from the real Swift: ``cat``, ``verify`` and
``replay`` on ``swift://CONTAINER[/PREFIX]``.

The archives are made by two real worker runs into one container: one
with ``gzip, swift, delete`` writing v1 records, then one with ``zstd,
swift, delete`` writing v2 records, both with a ``segment_size`` small
enough that some objects are Static Large Objects. What ``cat swift://``
prints must be, byte for byte, what a local ``cat`` prints of the same
objects downloaded. A second container holds what goes wrong: a truncated
archive, an object that disappears between the listing and its GET, a
file that is not an archive. Every command closes the connections it
made to the proxy, however it ends (an error, a closed pipe).

Needs ST_AUTH, ST_USER, ST_KEY (the Swift all-in-one) and RabbitMQ; skips
without them, or fails when CI=true.
"""

import io
import os
import re
import subprocess
import sys
import types
import urllib.parse
import uuid

import orjson
import pytest
from kombu import Connection
from kombu import Exchange
from kombu import Queue
from swiftclient import client as swc

from shoebox_worker import cli
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

pytestmark = pytest.mark.functional

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PREFIX = "%Y/%m/%d/"
#: Per run: notifications, and how many go in one archive.
COUNT, ROLL = 1200, 300
#: The gzipped archives (about 80 KB) go as SLOs of two segments, the
#: zstd ones (about 63 KB) as plain objects (the all-in-one serves a
#: manifest's GET at one segment a second after the tenth: keep it few).
SEGMENT_SIZE = "70K"


def _connection(env):
    return swc.Connection(authurl=env["ST_AUTH"], user=env["ST_USER"],
                          key=env["ST_KEY"], auth_version="1", retries=2,
                          timeout=30)


def _config(path, queue, env, container, codec, version):
    path.write_text("\n".join([
        "[broker]", "url = %s" % AMQP_URL, "connect_timeout = 5", "",
        "[consumer:%s]" % queue, "exchange = %s" % queue,
        "routing_key = %s" % queue, "durable = false", "",
        "[archive]", "working_directory = %s" % (path.parent / "archive"),
        "roll_checker = count", "callbacks = %s, swift, delete" % codec,
        "version = %d" % version, "fsync_interval = 0.2",
        "retry_initial = 0.2", "retry_max = 2", "",
        "[roll_checker:count]", "roll_count = %d" % ROLL, "",
        "[callback:swift]", "auth = %s" % env["ST_AUTH"],
        "user = %s" % env["ST_USER"], "key = %s" % env["ST_KEY"],
        "container = %s" % container, "object_prefix = %s" % PREFIX,
        "segment_size = %s" % SEGMENT_SIZE, "retries = 0", "timeout = 20",
        "",
        "[logging]", "level = INFO", ""]))
    return str(path)


def _run_worker(config):
    result = subprocess.run([WORKER, "run", "--config", config,
                             "--idle-exit", "2"], capture_output=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()[-3000:]


def _publish(queue, count, seed):
    publish_mod.publish(AMQP_URL, count, exchange=queue, routing_key=queue,
                        seed=seed, declare_queue=queue, confirm=True)
    return [n["message_id"] for n in simulator.notifications(count,
                                                             seed=seed)]


def _delete_amqp(names):
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in names:
            for delete in (channel.queue_delete, channel.exchange_delete):
                try:
                    delete(name)
                except Exception:
                    channel = conn.channel()


@pytest.fixture(scope="module")
def shipped(ft, swift_env, rabbit_available, tmp_path_factory):
    """A container filled by two real worker runs (v1 gzip, v2 zstd)."""
    container = "shoebox-read-%s" % uuid.uuid4().hex[:12]
    queue = "shoebox-read-%s" % uuid.uuid4().hex[:12]
    conn = _connection(swift_env)
    published = []
    try:
        for run, (codec, version) in enumerate((("gzip", 1), ("zstd", 2))):
            directory = tmp_path_factory.mktemp("run%d" % run)
            published += _publish(queue, COUNT, seed=30 + run)
            config = _config(directory / "worker.conf", queue, swift_env,
                             container, codec, version)
            _run_worker(config)
            assert not [n for n in os.listdir(directory / "archive")
                        if ".events" in n]  # all shipped and deleted
        listing = conn.get_container(container, full_listing=True)[1]
        indexes = {e["name"] for e in listing if e["name"].endswith(".index")}
        listing = [e for e in listing if e["name"] not in indexes]
        assert {e["name"] + ".index" for e in listing} == indexes
        yield {"container": container, "published": published,
               "listing": listing, "env": swift_env, "conn": conn,
               "config": config}
    finally:
        _delete_amqp([queue])
        ft.delete_swift_container(conn, container)
        conn.close()


def _main(argv, capsysbinary):
    code = cli.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def _download(conn, container, names, directory):
    """Each object as a local file, in the order given."""
    paths = []
    for number, name in enumerate(names):
        _, body = conn.get_object(container, name)
        path = directory / ("%03d-%s" % (number, os.path.basename(name)))
        path.write_bytes(body)
        paths.append(str(path))
    return paths


def _is_slo(conn, container, name):
    head = conn.head_object(container, name)
    return head.get("x-static-large-object", "").lower() == "true"


# -- the tests ----------------------------------------------------------------

def test_cat_prints_what_a_local_cat_of_the_objects_prints(
        shipped, tmp_path, capsysbinary, swift_gets, monkeypatch):
    container, conn = shipped["container"], shipped["conn"]
    names = [e["name"] for e in shipped["listing"]]
    assert len(names) == 2 * COUNT // ROLL
    assert any(_is_slo(conn, container, n) for n in names)
    assert not all(_is_slo(conn, container, n) for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"gz", "zst"}

    code, out, err = _main(["cat", "--metadata", "swift://" + container],
                           capsysbinary)

    assert (code, err) == (0, "")
    # every object GET once, nothing else GET
    assert sorted(swift_gets) == sorted((container, n) for n in names)
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert len(lines) == len(shipped["published"])
    assert [m["metadata"]["message_id"] for m in lines] == \
        shipped["published"]  # write order: the first run's, then the rest
    with sources.Swift() as swift:
        read = [item.object for item in sources.find(
            ["swift://" + container], swift=swift)]
    assert sorted(read) == sorted(names)
    local = subprocess.run(
        [WORKER, "cat", "--metadata",
         *_download(conn, container, read, tmp_path)],
        capture_output=True, timeout=60)
    assert local.returncode == 0, local.stderr
    assert out == local.stdout


def test_cat_of_a_prefix_and_of_one_object(shipped, capsysbinary):
    container = shipped["container"]
    first = shipped["listing"][0]["name"]
    day = first.rsplit("/", 1)[0]
    code, out, err = _main(["cat", "swift://%s/%s/" % (container, day)],
                           capsysbinary)
    assert (code, err) == (0, "")
    assert out.count(b"\n") == len(shipped["published"])
    code, out, err = _main(["cat", "--jobs", "1",
                            "swift://%s/%s" % (container, first)],
                           capsysbinary)
    assert (code, err) == (0, "")
    assert out.count(b"\n") == ROLL


def test_verify_says_each_object_and_its_versions(shipped, capsysbinary):
    container = shipped["container"]
    code, out, err = _main(["verify", "swift://" + container], capsysbinary)
    assert (code, err) == (0, "")
    lines = out.decode().splitlines()
    assert len(lines) == len(shipped["listing"])
    versions = set()
    for line in lines:
        match = re.fullmatch(r"swift://%s/(\S+): OK: (\d+) records, \d+ "
                             r"bytes, version (\d)" % container, line)
        assert match, line
        assert int(match.group(2)) == ROLL
        versions.add(match.group(3))
    assert versions == {"1", "2"}


def test_find_heads_fill_the_metadata(shipped):
    with sources.Swift() as swift:
        items = sources.find(["swift://" + shipped["container"]],
                             swift=swift, heads=True, jobs=3)
    assert [i.meta["records"] for i in items] == [str(ROLL)] * len(items)
    assert {i.meta["format-versions"] for i in items} == {"1", "2"}


def test_replay_from_swift_to_a_queue(shipped, capsysbinary):
    name = "shoebox-replay-%s" % uuid.uuid4().hex[:12]
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        exchange = Exchange(name, type="topic", durable=False)
        Queue(name, exchange, routing_key="k", durable=False)(
            conn.channel()).declare()
        try:
            code, out, err = _main(
                ["replay", "--url", AMQP_URL, "--exchange", name,
                 "--routing-key", "k", "--jobs", "2",
                 "swift://" + shipped["container"]], capsysbinary)
            assert (code, err) == (0, ""), err
            assert b"%d published" % len(shipped["published"]) in out
            _, depth, _ = conn.channel().queue_declare(name, passive=True)
            assert depth == len(shipped["published"])
        finally:
            _delete_amqp([name])


def test_credentials_from_config_and_from_st_env(shipped, monkeypatch):
    container = shipped["container"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ST_", "OS_"))}

    def cat(*argv, environ):
        return subprocess.run([WORKER, "cat", *argv], capture_output=True,
                              timeout=60, env=environ)

    by_config = cat("--config", shipped["config"], "swift://" + container,
                    environ=env)
    assert by_config.returncode == 0, by_config.stderr
    by_env = cat("swift://" + container, environ=dict(env, **{
        k: shipped["env"][k] for k in ("ST_AUTH", "ST_USER", "ST_KEY")}))
    assert by_env.returncode == 0, by_env.stderr
    assert by_config.stdout == by_env.stdout
    assert by_env.stdout.count(b"\n") == len(shipped["published"])

    nothing = cat("swift://" + container, environ=env)
    assert nothing.returncode == 1
    assert nothing.stderr.decode().startswith(
        "shoebox-worker: no Swift credentials: give --config FILE")
    wrong = cat("swift://" + container, environ=dict(
        env, ST_AUTH=shipped["env"]["ST_AUTH"], ST_USER="test:tester",
        ST_KEY="not-the-key-s3cr3t"))
    err = wrong.stderr.decode()
    assert wrong.returncode == 1 and err.count("\n") == 1, err
    assert "Traceback" not in err and "s3cr3t" not in err


@pytest.fixture
def troubled(ft, shipped):
    """A container of three good archives, a truncated one, one that is
    not an archive, and the name of one to delete after the listing."""
    conn, env = shipped["conn"], shipped["env"]
    container = "shoebox-trouble-%s" % uuid.uuid4().hex[:12]
    source = shipped["container"]
    names = [e["name"] for e in shipped["listing"]][:5]
    conn.put_container(container)
    try:
        bodies = [conn.get_object(source, n)[1] for n in names]
        put = []
        for number, body in enumerate(bodies):
            name = "a%d-%s" % (number, os.path.basename(names[number]))
            if number == 2:  # cut: the first records survive
                body = body[:len(body) // 2]
            conn.put_object(container, name, body)
            put.append(name)
        conn.put_object(container, "zz-notes.txt", b"not an archive\n" * 9)
        yield {"container": container, "names": put, "env": env,
               "conn": conn}
    finally:
        ft.delete_swift_container(conn, container)


def test_a_missing_and_a_damaged_object_are_one_line_each(
        troubled, capsysbinary, monkeypatch):
    container, conn = troubled["container"], troubled["conn"]
    names = troubled["names"]
    gone = names[3]
    real_find = sources.find

    def find_then_delete(*args, **kwargs):
        items = real_find(*args, **kwargs)
        conn.delete_object(container, gone)  # after the listing
        return items

    monkeypatch.setattr(sources, "find", find_then_delete)
    code, out, err = _main(["cat", "swift://" + container], capsysbinary)

    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert re.fullmatch(r"shoebox-worker: swift://%s/%s.*damaged.*"
                        % (container, re.escape(names[2])), lines[0],
                        re.IGNORECASE), lines[0]
    assert lines[1] == ("shoebox-worker: swift://%s/%s: cannot read: no "
                        "such object (404: deleted since it was listed?)"
                        % (container, gone))
    printed = out.count(b"\n")
    # a0, a1, a4 whole, and what a2 held before the cut
    assert 3 * ROLL < printed < 4 * ROLL

    monkeypatch.setattr(sources, "find", real_find)
    code, out, err = _main(["cat", "--salvage", "swift://" + container],
                           capsysbinary)
    assert code == 0 and out.count(b"\n") == printed, err
    assert err.count("\n") == 1 and "skipped damaged bytes" in err

    code, out, err = _main(["verify", "swift://" + container], capsysbinary)
    assert code == 1 and err == ""
    verdicts = [line.split(": ")[1] for line in out.decode().splitlines()]
    assert verdicts == ["OK", "OK", "DAMAGED", "OK"]

    code, out, err = _main(["cat", "swift://%s/zz-notes.txt" % container],
                           capsysbinary)
    assert code == 1 and out == b""
    assert err == ("shoebox-worker: swift://%s/zz-notes.txt: not a shoebox "
                   "archive (no record in it); check the path: cat, verify "
                   "and replay read the worker's archives (plain, .gz or "
                   ".zst)\n" % container)


def test_reading_ahead_is_bounded(shipped, monkeypatch, capsysbinary):
    """Each object read ahead waits with at most READ_AHEAD_CHUNKS chunks
    of GET_CHUNK bytes in its buffer."""
    monkeypatch.setattr(sources, "GET_CHUNK", 4096)
    held = []
    real_put = sources._Download._put

    def put(self, value):
        held.append(sum(len(v) for v in list(self.buffer.queue)
                        if isinstance(v, bytes)))
        return real_put(self, value)

    monkeypatch.setattr(sources._Download, "_put", put)
    code, out, _ = _main(["cat", "--jobs", "3",
                          "swift://" + shipped["container"]], capsysbinary)
    assert code == 0
    assert out.count(b"\n") == len(shipped["published"])
    assert held and max(held) <= sources.READ_AHEAD_CHUNKS * 4096
    assert io.BytesIO(out).readline().startswith(b"{")


def test_replay_goes_on_past_a_damaged_object(troubled, capsysbinary):
    container = troubled["container"]
    name = "shoebox-replay-%s" % uuid.uuid4().hex[:12]
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        exchange = Exchange(name, type="topic", durable=False)
        Queue(name, exchange, routing_key="k", durable=False)(
            conn.channel()).declare()
        try:
            code, out, err = _main(
                ["replay", "--url", AMQP_URL, "--exchange", name,
                 "--routing-key", "k", "swift://" + container],
                capsysbinary)
            assert code == 1
            assert err.count("\n") == 1 and troubled["names"][2] in err
            published = int(re.search(rb"(\d+) published", out).group(1))
            assert 4 * ROLL < published < 5 * ROLL  # 4 whole, a part
            _, depth, _ = conn.channel().queue_declare(name, passive=True)
            assert depth == published
        finally:
            _delete_amqp([name])


# -- connections --------------------------------------------------------------

@pytest.fixture
def proxy_sockets(ft, swift_env, monkeypatch):
    """``count()``: the local ports of this process's sockets to the Swift
    proxy; ``at_close``: those open when each ``sources.Swift`` the
    commands made was closed. Every Swift made is kept alive here, so that
    only its close() can close its sockets, not the garbage collector."""
    port = urllib.parse.urlsplit(swift_env["ST_AUTH"]).port
    made, at_close = [], []

    def count():
        return ft.local_ports(os.getpid(), port)

    class Kept(sources.Swift):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self):
            at_close.append(count())
            super().close()

    monkeypatch.setattr(sources, "Swift", Kept)
    return types.SimpleNamespace(count=count, at_close=at_close, made=made)


def _closed_after(proxy_sockets, run):
    """Run ``run()`` (a command); its sockets to the proxy were open when
    its Swift was closed, and none of them is open after."""
    before = proxy_sockets.count()
    result = run()
    after = proxy_sockets.count()
    assert len(proxy_sockets.made) == 1
    assert proxy_sockets.at_close, "the command's Swift was never closed"
    opened = proxy_sockets.at_close[0] - before
    assert opened, "no connection to the proxy when it was closed"
    assert not (after - before), "left open: %s" % sorted(after - before)
    return result


def _command(name, container, tmp_path):
    """``(argv, exit code)`` of each command the test runs."""
    spec = "swift://" + container
    exchange = "shoebox-no-such-%s" % uuid.uuid4().hex[:8]
    return {
        "cat": (["cat", spec], 0),
        "cat --where": (["cat", "--where", "payload.instance_id=none",
                         spec], 0),
        "cat of a missing container": (["cat", spec + "-missing"], 1),
        "verify": (["verify", spec], 0),
        "export": (["export", "--out", str(tmp_path / "out"), spec], 0),
        "replay --where": (["replay", "--url", AMQP_URL, "--exchange",
                            "amq.topic", "--routing-key", "k", "--where",
                            "payload.instance_id=none", spec], 0),
        "replay to a missing exchange": (
            ["replay", "--url", AMQP_URL, "--exchange", exchange,
             "--routing-key", "k", spec], 1),
    }[name]


@pytest.mark.parametrize("name", [
    "cat", "cat --where", "cat of a missing container", "verify", "export",
    "replay --where", "replay to a missing exchange"])
def test_every_command_closes_its_connections(
        shipped, proxy_sockets, tmp_path, capsysbinary, name):
    argv, expected = _command(name, shipped["container"], tmp_path)
    code, _, err = _closed_after(proxy_sockets,
                                 lambda: _main(argv, capsysbinary))
    assert code == expected, err


def test_cat_into_a_closed_pipe_closes_its_connections(
        shipped, proxy_sockets, monkeypatch):
    # cat | head: the reader of stdout is gone while downloads are ahead
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")))
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = _closed_after(proxy_sockets, lambda: cli.main(
            ["cat", "--jobs", "4", "swift://" + shipped["container"]]))
    finally:
        monkeypatch.undo()
        stdout.close()
    assert code == 141


def test_index_bundle_closes_its_connections(troubled, proxy_sockets,
                                             capsysbinary):
    code, out, err = _closed_after(proxy_sockets, lambda: _main(
        ["index-bundle", "swift://" + troubled["container"]], capsysbinary))
    assert code == 0, err
    # the objects of the listing (zz-notes.txt too: it is not read), none
    # with an index
    assert out.endswith(b"the indexes of 0 of %d archives\n" % (
        len(troubled["names"]) + 1))
