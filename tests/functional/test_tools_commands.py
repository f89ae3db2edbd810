"""The operator tools as a user runs them: the venv's ``shoebox-worker``
as a subprocess, on real files, against the real RabbitMQ (127.0.0.1:5672,
guest/guest) for ``replay``, ``generate`` and the metrics endpoint; the
example plugin installed as a third party would (conftest's
``example_plugin``).

Without RabbitMQ the broker tests skip, or fail when CI=true.
"""

import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
STANDARD = ("event_type", "message_id", "timestamp", "publisher_id",
            "priority")


def sh(*argv, timeout=120, **kwargs):
    """Run ``shoebox-worker ARGV``; returns the CompletedProcess (bytes)."""
    return subprocess.run([WORKER, *map(str, argv)], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          **kwargs)


def one_line_error(result, code=1):
    """The command failed with ``code`` and said why in one line."""
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("shoebox-worker"), err
    return err


def write_notifications(path, count, seed, version=2, malformed=()):
    """An archive of synthetic notifications, as the worker writes them;
    ``malformed`` indexes get a malformed record instead. Returns the
    payloads of the notifications (bytes), in order."""
    payloads = []
    with archive.ArchiveWriter(str(path), version=version) as writer:
        for index, note in enumerate(simulator.notifications(count,
                                                             seed=seed)):
            if index in malformed:
                writer.write({"malformed": "not JSON", "queue": "q"},
                             b"\xff not json %d" % index)
                continue
            payload = orjson.dumps(note)
            metadata = {key: str(note[key]) for key in STANDARD}
            metadata["request_id"] = note["_context_request_id"]
            writer.write(metadata, payload)
            payloads.append(payload)
    return payloads


def lines(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


# -- cat ---------------------------------------------------------------------

class TestCat:
    def test_directory_of_mixed_archives(self, tmp_path):
        top = tmp_path / "archives"
        (top / "old").mkdir(parents=True)
        expected = []
        specs = [("old/a.events", 1, None), ("b.events", 2, "gzip"),
                 ("c.events", 2, "zstd"), ("old/d.events", 1, "gzip")]
        for index, (name, version, codec) in enumerate(specs):
            path = str(top / name)
            expected += write_notifications(path, 20, seed=index,
                                            version=version)
            if codec:
                compressed = compression.compress_file(
                    path, compression.CODECS[codec])
                os.unlink(path)
                path = compressed
            os.utime(path, ns=(0, (index + 1) * 10**9))
        (top / "README.txt").write_text("not an archive\n")

        result = sh("cat", top)
        assert result.returncode == 0 and result.stderr == b""
        got = result.stdout.splitlines()
        assert got == expected  # written order, payloads as archived

        result = sh("cat", "--metadata", "--match",
                    "event_type=compute.instance.*", "--match",
                    "publisher_id=compute.*", top)
        assert result.returncode == 0
        records = lines(result.stdout)
        assert records and len(records) < len(expected)
        for item in records:
            assert set(item) == {"metadata", "payload"}
            assert item["metadata"]["event_type"].startswith(
                "compute.instance.")
            assert item["payload"]["event_type"] == \
                item["metadata"]["event_type"]

    def test_jq_reads_every_line(self, tmp_path):
        if shutil.which("jq") is None:
            pytest.skip("jq is not installed")
        write_notifications(tmp_path / "a.events", 30, seed=3,
                            malformed=(4, 9))
        result = subprocess.run(
            "%s cat --metadata %s | jq -c .metadata.event_type" % (
                WORKER, tmp_path / "a.events"), shell=True,
            capture_output=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(b"\n") == 30
        assert result.stdout.count(b"null") == 2

    def test_head_closes_the_pipe_quietly(self, tmp_path):
        write_notifications(tmp_path / "a.events", 500, seed=4)
        proc = subprocess.Popen([WORKER, "cat", str(tmp_path / "a.events")],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(30) == 141
        assert json.loads(first)["event_type"]
        assert err == b""

    def test_errors(self, tmp_path):
        err = one_line_error(sh("cat", tmp_path / "missing.events"))
        assert "missing.events: no such file or directory" in err

        (tmp_path / "notes.txt").write_text("hello\n")
        err = one_line_error(sh("cat", tmp_path / "notes.txt"))
        assert "notes.txt: not a shoebox archive" in err
        assert "--salvage" not in err

        (tmp_path / "empty").mkdir()
        err = one_line_error(sh("cat", tmp_path / "empty"))
        assert "no archives" in err

        path = tmp_path / "damaged.events"
        write_notifications(path, 10, seed=5)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        result = sh("cat", path)
        err = one_line_error(result)
        assert "damaged.events, offset " in err and "--salvage" in err
        good = len(result.stdout.splitlines())
        assert 0 < good < 10

        result = sh("cat", "--salvage", path)
        assert result.returncode == 0
        assert len(result.stdout.splitlines()) == 9
        assert b"skipped damaged bytes" in result.stderr

        result = sh("cat", "--match", "no-equals-sign", path)
        assert result.returncode == 2
        assert b"expected KEY=GLOB" in result.stderr


# -- verify ------------------------------------------------------------------

class TestVerify:
    def test_ok_damaged_torn_and_salvage(self, tmp_path):
        good = tmp_path / "good.events"
        write_notifications(good, 10, seed=1, version=1)
        gz = compression.compress_file(str(good), compression.CODECS["gzip"])
        bad = tmp_path / "bad.events"
        write_notifications(bad, 10, seed=2)
        data = bytearray(bad.read_bytes())
        with archive.ArchiveReader(str(bad)) as reader:
            offsets = [0]
            for _ in reader:
                offsets.append(reader.good_offset)
        data[offsets[3] + 100] ^= 0xFF            # record 3: checksum
        data = data[:offsets[9] + 50]             # record 9: torn
        bad.write_bytes(bytes(data))

        result = sh("verify", tmp_path)
        assert result.returncode == 1
        out = result.stdout.decode().splitlines()
        assert "%s: OK: 10 records, %d bytes, version 1" % (
            good, good.stat().st_size) in out
        assert any(line.startswith(gz + ": OK: 10 records") for line in out)
        (damaged,) = [line for line in out if "DAMAGED" in line]
        assert damaged.startswith("%s: DAMAGED: 8 records, %d bytes, "
                                  "version 2; " % (bad, len(data)))
        assert "bad bytes %d-%d (record checksum mismatch)" % (
            offsets[3], offsets[4]) in damaged
        assert "torn tail at offset %d (50 bytes" % offsets[9] in damaged

        assert sh("verify", good, gz).returncode == 0

        result = sh("verify", "--salvage", bad)
        assert result.returncode == 1
        assert result.stdout.decode().rstrip().endswith(
            "; 8 good records written to %s.salvaged" % bad)
        salvaged = "%s.salvaged" % bad
        assert sh("verify", salvaged).returncode == 0
        before = sh("cat", "--salvage", bad).stdout
        assert sh("cat", salvaged).stdout == before

    def test_missing_file(self, tmp_path):
        err = one_line_error(sh("verify", tmp_path / "nope"))
        assert "no such file" in err


# -- replay and generate -----------------------------------------------------

def broker_config(ft, tmp_path, queue, exchange, url=AMQP_URL,
                  durable=False):
    return ft.worker_config(tmp_path, queue, exchange, url=url,
                            routing_key="notifications.info",
                            durable=durable, roll_checker="count",
                            roll_options={"roll_count": 100})


class TestReplay:
    @pytest.mark.both_brokers
    def test_worker_archives_replayed_payloads_identically(
            self, tmp_path, rabbit, broker, names, ft):
        source = tmp_path / "source"
        source.mkdir()
        expected = write_notifications(source / "a.events", 150, seed=11,
                                       version=1, malformed=(7, 70))
        expected += write_notifications(source / "b.events", 100, seed=12)
        gz = compression.compress_file(str(source / "b.events"),
                                       compression.CODECS["gzip"])
        os.unlink(source / "b.events")
        os.utime(gz, ns=(0, 2 * 10**9))
        os.utime(source / "a.events", ns=(0, 10**9))

        queue = exchange = names
        rabbit.declare(queue, exchange, "notifications.info", durable=True)
        config = broker_config(ft, tmp_path, queue, exchange,
                               url=broker.url, durable=True)
        result = sh("replay", "--config", config, "--exchange", exchange,
                    "--routing-key", "notifications.info", source)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == (
            "replayed to exchange %s with routing key notifications.info: "
            "248 published, 248 confirmed, 2 skipped (malformed)"
            % exchange)
        assert rabbit.depth(queue) == 248

        worker = ft.run_worker(config)
        assert worker.returncode == 0, worker.log_tail()
        records = ft.read_archives(tmp_path / "archive")
        assert [r.payload for r in records] == expected
        for item in records:
            note = json.loads(item.payload)
            assert item.metadata["event_type"] == note["event_type"]
            assert item.metadata["message_id"] == note["message_id"]
            assert "malformed" not in item.metadata

    def test_match_and_rate(self, tmp_path, rabbit, names, ft):
        write_notifications(tmp_path / "a.events", 60, seed=13)
        rabbit.declare(names, names, "notifications.info")
        config = broker_config(ft, tmp_path, names, names)
        started = time.monotonic()
        result = sh("replay", "--config", config, "--exchange", names,
                    "--routing-key", "notifications.info", "--rate", 20,
                    "--match", "event_type=compute.instance.exists",
                    tmp_path / "a.events")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        summary = result.stdout.decode()
        published = int(summary.split(": ")[1].split()[0])
        assert 0 < published < 60
        assert "not selected by --match" in summary
        assert rabbit.depth(names) == published
        assert elapsed >= (published - 1) / 20.0

    def test_errors(self, tmp_path, rabbit, names, ft):
        write_notifications(tmp_path / "a.events", 5, seed=14)
        rabbit.declare(names, names, "notifications.info")
        config = broker_config(ft, tmp_path, names, names)

        err = one_line_error(sh("replay", "--config", config, "--exchange",
                                names + "-missing", "--routing-key", "k",
                                tmp_path / "a.events"))
        assert "NOT_FOUND" in err and "retrying will not help" in err
        assert "check --exchange" in err

        result = sh("replay", "--config", config, "--exchange", names,
                    "--routing-key", "nobody.listens", tmp_path / "a.events")
        err = one_line_error(result)
        assert b": 5 published, 0 confirmed, 5 returned, 0 skipped" in (
            result.stdout)
        assert ("5 of 5 returned: no queue is bound to exchange %s with "
                "routing key nobody.listens" % names) in err

        down = ft.worker_config(tmp_path, names, names, name="down.conf",
                                url="amqp://guest:guest@127.0.0.1:%d//"
                                % ft.closed_port())
        started = time.monotonic()
        err = one_line_error(sh("replay", "--config", down, "--exchange",
                                names, "--routing-key", "k",
                                tmp_path / "a.events"))
        assert time.monotonic() - started < 10
        assert "Connection refused" in err and "guest:***@" in err

        refused = ft.worker_config(
            tmp_path, names, names, name="refused.conf",
            url="amqp://guest:wrong@127.0.0.1:5672//")
        err = one_line_error(sh("replay", "--config", refused, "--exchange",
                                names, "--routing-key", "k",
                                tmp_path / "a.events"))
        assert "ACCESS_REFUSED" in err and "wrong" not in err
        assert "retrying will not help" in err

        bad = tmp_path / "bad.conf"
        bad.write_text("[broker]\nurl = amqp://x//\nbogus = 1\n"
                       "[consumer:q]\n")
        err = one_line_error(sh("replay", "--config", bad, "--exchange",
                                names, "--routing-key", "k",
                                tmp_path / "a.events"), code=2)
        assert "bogus" in err

        err = one_line_error(sh("replay", "--config", config, "--exchange",
                                names, "--routing-key", "k",
                                tmp_path / "missing"))
        assert "no such file" in err
        assert rabbit.depth(names) == 0

        damaged = tmp_path / "damaged.events"
        write_notifications(damaged, 10, seed=15)
        with archive.ArchiveReader(str(damaged)) as reader:
            offsets = [0] + [reader.good_offset for _ in reader]
        data = bytearray(damaged.read_bytes())
        data[offsets[6] + 40] ^= 0xFF
        damaged.write_bytes(bytes(data))
        replay = ("replay", "--config", config, "--exchange", names,
                  "--routing-key", "notifications.info", damaged)
        result = sh(*replay)
        err = one_line_error(result)
        assert "offset %d" % offsets[6] in err and "--salvage" in err
        assert b": 6 published, 6 confirmed" in result.stdout
        result = sh("replay", "--salvage", *replay[1:])
        assert result.returncode == 0
        assert b": 9 published, 9 confirmed" in result.stdout
        assert rabbit.depth(names) == 15


class TestGenerate:
    @pytest.mark.both_brokers
    def test_publishes_into_the_queue(self, rabbit, broker, names):
        # --durable: RabbitMQ 4.3 refuses a transient queue
        rabbit.track_queue(names)
        rabbit.track_exchange(names)
        result = sh("generate", "--url", broker.url, "--count", 120,
                    "--exchange", names, "--queue", names, "--seed", 5,
                    "--durable")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == (
            "published 120 notifications to exchange %s with routing key "
            "notifications.info on amqp://guest:***@127.0.0.1:%d//: "
            "120 confirmed" % (names, broker.port))
        assert result.stderr == b""  # no progress bar without a terminal
        channel = rabbit.channel()
        ids = []
        while (message := channel.basic_get(names, no_ack=True)):
            outer = json.loads(message.body)
            ids.append(json.loads(outer["oslo.message"])["message_id"])
        assert ids == [n["message_id"] for n in
                       simulator.notifications(120, seed=5)]

    @pytest.mark.parametrize("broker", ["rabbitmq4"], indirect=True)
    def test_a_transient_queue_refused_by_rabbitmq_4_says_durable(
            self, rabbit, broker, names):
        rabbit.track_exchange(names)
        err = one_line_error(sh("generate", "--url", broker.url, "--count",
                                1, "--exchange", names, "--queue", names))
        assert "deprecated feature, transient_nonexcl_queues" in err, err
        assert "give --durable" in err, err

    def test_errors(self, rabbit, names, ft):
        started = time.monotonic()
        err = one_line_error(sh("generate", "--url",
                                "amqp://guest:guest@127.0.0.1:%d//"
                                % ft.closed_port(), "--count", 5))
        assert time.monotonic() - started < 10
        assert "Connection refused" in err

        err = one_line_error(sh("generate", "--url",
                                "amqp://guest:nope@127.0.0.1:5672//",
                                "--count", 5))
        assert "ACCESS_REFUSED" in err and "nope" not in err

        rabbit.track_exchange(names)
        assert sh("generate", "--url", AMQP_URL, "--count", 1, "--exchange",
                  names, "--queue", rabbit.track_queue(names)).returncode == 0
        err = one_line_error(sh("generate", "--url", AMQP_URL, "--count", 1,
                                "--exchange", names, "--durable"))
        assert "PRECONDITION_FAILED" in err
        assert "retrying will not help" in err and "--durable" in err

        err = one_line_error(sh("generate", "--url", AMQP_URL, "--count", 1,
                                "--exchange", "amq.%s" % names))
        assert "NOT_FOUND" in err and "retrying will not help" in err

        err = one_line_error(sh("generate", "--url", AMQP_URL + names,
                                "--count", 1, "--exchange", names))
        assert "NOT_ALLOWED" in err and "retrying will not help" in err

        err = one_line_error(sh("generate", "--url", AMQP_URL, "--count",
                                -1), code=2)  # a usage mistake
        assert "--count" in err


    def test_returned_messages_fail_the_command(self, rabbit, names):
        rabbit.track_exchange(names)
        result = sh("generate", "--url", AMQP_URL, "--count", 5,
                    "--exchange", names, "--routing-key", "nobody.listens")
        err = one_line_error(result)
        assert result.stdout.decode().strip() == (
            "published 5 notifications to exchange %s with routing key "
            "nobody.listens on amqp://guest:***@127.0.0.1:5672//: "
            "0 confirmed, 5 returned" % names)
        assert ("5 of 5 returned: no queue is bound to exchange %s with "
                "routing key nobody.listens" % names) in err
        assert "--queue" in err

    def test_access_refused_says_retrying_will_not_help(self, rabbit, names,
                                                        ft):
        user = "shoebox-ft-denied-" + names[-8:]
        created = ft.rabbitmqctl("add_user", user, "pw")
        assert created.returncode == 0, created.stderr
        try:
            denied = ft.rabbitmqctl("set_permissions", "-p", "/", user,
                                    "^$", "^$", "^$")
            assert denied.returncode == 0, denied.stderr
            err = one_line_error(sh(
                "generate", "--url",
                "amqp://%s:pw@127.0.0.1:5672//" % user, "--count", 1,
                "--exchange", names))
        finally:
            ft.rabbitmqctl("delete_user", user)
        assert "ACCESS_REFUSED" in err and "retrying will not help" in err
        assert "permissions" in err

    def test_seed_and_start_repeat_every_byte(self, rabbit, names):
        queue = rabbit.track_queue(names)
        rabbit.track_exchange(names)

        def run(*extra):
            result = sh("generate", "--url", AMQP_URL, "--count", 30,
                        "--exchange", names, "--queue", queue, "--seed", 8,
                        *extra)
            assert result.returncode == 0, result.stderr
            channel = rabbit.channel()
            bodies = []
            while (message := channel.basic_get(queue, no_ack=True)):
                bodies.append(message.body)
            assert len(bodies) == 30
            return bodies

        first = run("--start", "2024-03-01T12:00:00")
        assert run("--start", "2024-03-01T12:00:00") == first
        now = run()  # the seed alone: all but the times
        assert now != first
        assert [_message_id(b) for b in now] == [
            _message_id(b) for b in first]


def _message_id(body):
    return json.loads(json.loads(body)["oslo.message"])["message_id"]


# -- metrics -----------------------------------------------------------------

def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += "{%s}" % ",".join(
                    "%s=%s" % item for item in sorted(sample.labels.items())
                    if item[0] != "le")
                if "le" in sample.labels:
                    key += "[%s]" % sample.labels["le"]
            values[key] = sample.value
    return values


def test_metrics_of_a_running_worker(tmp_path, rabbit, names, ft,
                                     worker_procs):
    queue = exchange = names
    good, bad, per_file = 593, 7, 100
    total = good + bad
    rabbit.declare(queue, exchange, "notifications.info")
    port = ft.free_port()
    config = ft.worker_config(
        tmp_path, queue, exchange, routing_key="notifications.info",
        roll_checker="count", roll_options={"roll_count": per_file},
        callbacks={"gzip": {}}, archive_options={"fsync_every": 50})
    with open(config, "a") as f:
        f.write("\n[metrics]\nport = %d\n" % port)
    worker = worker_procs(config)
    consumed = "shoebox_messages_consumed_total{queue=%s}" % queue
    at_start = ft.wait_until(lambda: _try_scrape(port), 30,
                             message="the metrics endpoint")
    assert at_start[consumed] == 0
    assert at_start["shoebox_unacked_messages"] == 0

    def send():
        ft.publish(AMQP_URL, good, exchange, "notifications.info", seed=21)
        rabbit.publish_raw(exchange, "notifications.info",
                           [(b"not json %d" % n, {}) for n in range(bad)])

    sender = threading.Thread(target=send)
    sender.start()
    during = [scrape(port)]
    while sender.is_alive():
        during.append(scrape(port))
        time.sleep(0.05)
    sender.join()
    counts = [s[consumed] for s in during]
    assert counts == sorted(counts)  # counters only go up
    for sample in during:
        assert sample["shoebox_messages_acked_total"] <= sample[consumed]

    def settled():
        now = scrape(port)
        return now if (now["shoebox_messages_acked_total"] == total and
                       now["shoebox_unshipped_files"] == 0) else None

    after = ft.wait_until(settled, 60, interval=0.2,
                          message="every message acked and shipped")
    files = total // per_file
    assert after[consumed] == total
    assert after["shoebox_messages_malformed_total{queue=%s}" % queue] == bad
    assert after["shoebox_unacked_messages"] == 0
    assert after["shoebox_unshipped_bytes"] == 0
    assert after["shoebox_oldest_unshipped_age_seconds"] == 0
    assert after["shoebox_paused"] == 0
    assert after["shoebox_rolls_total"] == files
    assert after["shoebox_callback_successes_total{callback=gzip}"] == files
    assert after["shoebox_callback_failures_total{callback=gzip}"] == 0
    assert after["shoebox_upload_seconds_count{callback=gzip}"] == files
    assert after["shoebox_upload_seconds_bucket{callback=gzip}[+Inf]"] == \
        files
    gz = [name for name in os.listdir(tmp_path / "archive")
          if name.endswith(".events.gz")]
    assert len(gz) == files
    records = ft.read_archives(tmp_path / "archive")
    assert len(records) == total
    assert after["shoebox_bytes_written_total"] == sum(
        os.path.getsize(p) for p in _uncompressed_sizes(tmp_path, gz))

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def _try_scrape(port):
    try:
        return scrape(port)
    except OSError:
        return None


def _uncompressed_sizes(tmp_path, names):
    """Decompress each archive into tmp_path/plain; returns the paths."""
    out = tmp_path / "plain"
    out.mkdir()
    paths = []
    for name in names:
        target = out / name[:-3]
        with compression.open_read(str(tmp_path / "archive" / name)) as f:
            target.write_bytes(f.read())
        paths.append(str(target))
    return paths


def test_metrics_port_in_use(tmp_path, rabbit, names, ft):
    rabbit.declare(names, names, "notifications.info")
    config = ft.worker_config(tmp_path, names, names,
                              routing_key="notifications.info")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with open(config, "a") as f:
            f.write("\n[metrics]\nport = %d\n" % busy.getsockname()[1])
        result = subprocess.run([WORKER, "run", "--config", config,
                                 "--idle-exit", "1"], capture_output=True,
                                timeout=60)
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("shoebox-worker: [metrics] cannot listen on "
                           "127.0.0.1:")
    assert "Traceback" not in result.stderr.decode()


def test_metrics_one_port_per_process(tmp_path, rabbit, names, ft,
                                      worker_procs):
    rabbit.declare(names, names, "notifications.info")
    port = ft.free_port()
    while not _port_free(port + 1):
        port = ft.free_port()
    config = ft.worker_config(tmp_path, names, names,
                              routing_key="notifications.info",
                              worker={"processes": 2})
    with open(config, "a") as f:
        f.write("\n[metrics]\nport = %d\n" % port)
    worker = worker_procs(config)
    ft.publish(AMQP_URL, 50, names, "notifications.info", seed=41)

    def both_counted():
        first, second = _try_scrape(port), _try_scrape(port + 1)
        if first is None or second is None:
            return None
        key = "shoebox_messages_acked_total"
        return first[key] + second[key] == 50

    ft.wait_until(both_counted, 60, interval=0.2,
                  message="both workers' endpoints counting every message")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def _port_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

# -- the example plugin ------------------------------------------------------

def test_example_plugin_selected_by_name(tmp_path, rabbit, names, ft,
                                         example_plugin):
    import hashlib

    rabbit.declare(names, names, "notifications.info")
    config = ft.worker_config(
        tmp_path, names, names, routing_key="notifications.info",
        roll_checker="count", roll_options={"roll_count": 40},
        callbacks={"gzip": {}, "sha256": {}})
    check = sh("check-config", "--config", config, env=example_plugin)
    assert check.returncode == 0, check.stderr

    ft.publish(AMQP_URL, 100, names, "notifications.info", seed=31)
    worker = ft.run_worker(config, env=example_plugin)
    assert worker.returncode == 0, worker.log_tail()
    directory = tmp_path / "archive"
    archives = sorted(n for n in os.listdir(directory)
                      if n.endswith(".events.gz"))
    assert len(archives) == 3
    for name in archives:
        sidecar = (directory / (name + ".sha256")).read_text()
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        assert sidecar == "%s  %s\n" % (digest, name)

    bad = tmp_path / "typo.conf"
    bad.write_text(open(config).read().replace("[callback:sha256]\n",
                                               "[callback:sha256]\nsufix = "
                                               ".x\n"))
    err = one_line_error(sh("check-config", "--config", bad,
                            env=example_plugin), code=2)
    assert "sufix" in err and "suffix" in err


# -- the progress bar ---------------------------------------------------------

def _on_a_terminal(argv, cwd):
    """Run the command with stderr on a pseudo-terminal (100 columns) and
    stdout piped: ``(exit code, stdout, what the terminal showed)``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run([WORKER, *map(str, argv)],
                              stdout=subprocess.PIPE, stderr=slave,
                              stdin=subprocess.DEVNULL, cwd=cwd, timeout=120)
    finally:
        os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.returncode, proc.stdout, shown.decode("utf-8", "replace")


class TestProgress:
    def test_a_bar_of_archives_and_bytes_on_a_terminal_none_when_piped(
            self, tmp_path):
        paths = []
        for n in range(3):
            path = tmp_path / ("a%d.events" % n)
            write_notifications(path, 300, seed=n)
            paths.append(path)
        total = sum(os.path.getsize(p) for p in paths)
        code, out, shown = _on_a_terminal(
            ["export", "--out", tmp_path / "out", *paths], tmp_path)
        assert code == 0 and out.startswith(b"exported 900 records")
        last = shown.replace("\r", "\n").strip().splitlines()[-1]
        assert last.startswith("3/3 archives: 100%"), shown
        size = tqdm.format_sizeof(total, divisor=1024)  # the files' bytes
        assert "| %s/%s [" % (size, size) in last, last
        # cat prints records: a bar only when they do not go to the terminal
        code, out, shown = _on_a_terminal(["cat", *paths], tmp_path)
        assert code == 0 and out.count(b"\n") == 900
        assert "3/3 archives: 100%" in shown.replace("\r", "\n")
        # piped (the test's own pipes): nothing but the output
        result = sh("export", "--out", tmp_path / "out2", *paths)
        assert result.returncode == 0 and result.stderr == b""
        result = sh("cat", *paths)
        assert result.stderr == b""
