"""``cat`` and ``replay`` with ``--since``/``--until``, ``--where`` and
``--dedup`` on archives a real worker wrote (from the real RabbitMQ), and
the time range a real worker gives each object in the real Swift.

The worker archives four batches: 60 notifications from 10:00, 60 *late*
ones from 06:00 (older than those before and after them, as after a
drained backlog), 60 from 11:00, then the first 20 of the 10:00 batch
again (the same message_ids: at-least-once delivery). Archives roll every
50 records, so the second archive starts at 10:00 and goes on at 06:00:
its first record is not its earliest.
"""

import datetime
import json
import os
import sys

import orjson
import pytest

from shoebox_worker import index
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import select
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

pytestmark = pytest.mark.functional

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
DAY = datetime.datetime(2024, 3, 9)
#: (count, seed, start) of each batch, in the order they are published.
BATCHES = [(60, 1, DAY.replace(hour=10)), (60, 2, DAY.replace(hour=6)),
           (60, 3, DAY.replace(hour=11)), (20, 1, DAY.replace(hour=10))]
ROUTING_KEY = "notifications.info"
#: Records per archive.
ROLL = 50


def notes():
    """Every notification published, in order."""
    out = []
    for count, seed, start in BATCHES:
        out += simulator.notifications(count, seed=seed, start=start)
    return out


def utc(note):
    return datetime.datetime.fromisoformat(note["timestamp"]).replace(
        tzinfo=datetime.UTC)


def at(text):
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC)


def run(*argv):
    import subprocess
    return subprocess.run([WORKER, *map(str, argv)], capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def archive_by_worker(ft, rabbit, names, tmp_path, callbacks=None):
    """Publish the batches, let a worker archive them; returns its
    config."""
    rabbit.declare(names, names, ROUTING_KEY)
    for count, seed, start in BATCHES:
        publish_mod.publish(ft.AMQP_URL, count, exchange=names,
                            routing_key=ROUTING_KEY, seed=seed, start=start)
    config = ft.worker_config(tmp_path, names, names, routing_key=ROUTING_KEY,
                              roll_checker="count",
                              roll_options={"roll_count": ROLL},
                              callbacks=callbacks or {"gzip": {}})
    worker = ft.run_worker(config)
    assert worker.returncode == 0, worker.log_tail()
    return config


@pytest.fixture
def worked(ft, rabbit, names, tmp_path):
    config = archive_by_worker(ft, rabbit, names, tmp_path)
    top = tmp_path / "archive"
    files = ft.archive_files(top)
    assert len(files) == 4 and all(f.endswith(".gz") for f in files)
    return config, top


def test_a_window_cuts_an_archive_in_the_middle(worked):
    _, top = worked
    since, until = at("2024-03-09T10:00:05"), at("2024-03-09T10:00:10")
    result = run("cat", "--since", "2024-03-09T10:00:05", "--until",
                 "2024-03-09 10:00:10", top)
    assert result.returncode == 0, result.stderr
    expected = [orjson.dumps(n) for n in notes() if since <= utc(n) < until]
    got = result.stdout.splitlines()
    # part of the first archive, and the same part of the repeated batch
    assert got == expected and 0 < len(got) < 40
    assert result.stderr == b""


def test_late_records_are_found(worked):
    _, top = worked
    result = run("cat", "--metadata", "--since", "2024-03-09T06:00:00Z",
                 "--until", "2024-03-09T08:00:00+01:00", top)  # 07:00 UTC
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    late = list(simulator.notifications(60, seed=2, start=BATCHES[1][2]))
    assert [item["payload"] for item in lines] == late
    assert {item["metadata"]["timestamp"][:13] for item in lines} == {
        "2024-03-09 06"}


def test_where_on_the_notification(worked):
    _, top = worked
    every = notes()
    project = every[70]["_context_project_id"]
    instance = every[5]["payload"]["instance_id"]
    result = run("cat", "--where", "_context_project_id=%s" % project,
                 "--where", "payload.instance_id=%s*" % instance[:6], top)
    assert result.returncode == 0, result.stderr
    expected = [orjson.dumps(n) for n in every
                if str(n.get("_context_project_id")) == str(project)
                and str(n.get("payload", {}).get("instance_id", "")
                        ).startswith(instance[:6])]
    assert result.stdout.splitlines() == expected
    assert len(expected) < len(every)
    # a path no notification has matches none
    nothing = run("cat", "--where", "payload.no_such_key=*", top)
    assert (nothing.returncode, nothing.stdout) == (0, b"")


def test_dedup_drops_the_repeated_batch(worked):
    _, top = worked
    result = run("cat", "--dedup", top)
    assert result.returncode == 0, result.stderr
    expected = [orjson.dumps(n) for n in notes()[:180]]
    assert result.stdout.splitlines() == expected
    assert result.stderr == b"shoebox-worker: 20 duplicates dropped by " \
                            b"--dedup\n"
    assert len(run("cat", top).stdout.splitlines()) == 200


def test_replay_selects_the_same_way(worked, rabbit, names):
    config, top = worked
    target = names + "-replayed"
    rabbit.declare(target, target, ROUTING_KEY)
    result = run("replay", "--config", config, "--exchange", target,
                 "--routing-key", ROUTING_KEY, "--since",
                 "2024-03-09T10:00:00", "--until", "2024-03-09T11:00:00",
                 "--dedup", top)
    assert result.returncode == 0, result.stderr
    # the 10:00 batch once: its repeat is dropped, 06:00 and 11:00 are out
    assert "60 published, 60 confirmed" in result.stdout.decode()
    assert "140 not selected by --since, --until, --dedup" in \
        result.stdout.decode()
    assert b"20 duplicates dropped by --dedup" in result.stderr
    assert rabbit.depth(target) == 60


def test_swift_objects_carry_the_time_range_of_all_records(
        ft, rabbit, names, tmp_path, swift_env):
    from swiftclient import client as swc
    container = "select11-" + names
    swift = {"auth": swift_env["ST_AUTH"], "user": swift_env["ST_USER"],
             "key": swift_env["ST_KEY"], "container": container,
             "retries": 0, "timeout": 20}
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    try:
        archive_by_worker(ft, rabbit, names, tmp_path,
                          callbacks={"gzip": {}, "swift": swift,
                                     "delete": {}})
        objects = [obj for obj in conn.get_container(
            container, full_listing=True)[1]
            if not obj["name"].endswith(".index")]  # each one's index
        assert len(objects) == 4
        ranges = []
        for obj in objects:
            headers = conn.head_object(container, obj["name"])
            meta = {key[len("x-object-meta-"):]: value
                    for key, value in headers.items()
                    if key.startswith("x-object-meta-")}
            ranges.append((meta["earliest-timestamp"],
                           meta["latest-timestamp"]))
        expected = []
        every = notes()
        for first in range(0, len(every), ROLL):
            times = [utc(n) for n in every[first:first + ROLL]]
            expected.append((min(times).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                             max(times).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
        assert sorted(ranges) == sorted(expected)
        # pruning by the indexes the worker uploaded (the same ranges,
        # bound to the objects: the metadata is not, and prunes nothing)
        # finds the two archives holding late records (the first starts
        # at 10:00) and only them
        chosen = select.Selection(since=at("2024-03-09T06:00:00"),
                                  until=at("2024-03-09T07:00:00"),
                                  load_index=index.Index.from_bytes)
        with sources.Swift() as reader:
            items = sources.find(["swift://" + container], swift=reader,
                                 indexes=True)
            held = [item for item in items
                    if chosen.may_hold(item, on_unused=pytest.fail)]
        by_name = dict(zip((obj["name"] for obj in objects), ranges,
                           strict=True))
        assert sorted(by_name[item.object][0] for item in held) == \
            sorted([expected[1][0], expected[2][0]])
        assert expected[1][0].startswith("2024-03-09T06:00")
    finally:
        ft.delete_swift_container(conn, container)
        conn.close()

