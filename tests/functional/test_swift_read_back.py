"""Reading back from the real Swift, pruned and deduplicated, end to end:
``cat``, ``export`` and ``replay`` on ``swift://CONTAINER`` with
``--where``, ``--since``/``--until`` and ``--dedup``, over archives that
real worker runs shipped.

One container, filled once for the module:

1. ``gzip, swift, delete`` writing v1 records, killed with SIGKILL while
   its first archive holds more than the writer's buffer of records that
   were handed to the system but never fsynced, so never acked; started
   again, it ships that archive (those records survive a kill) and
   archives all the messages once more: the records of the first archive
   are in Swift twice. The notifications start at 23:58:30 on 8 March
   2024 and go on past midnight.
2. ``zstd, swift, delete`` writing v2 records, ROLL an archive, of three
   batches: 70 notifications of 10 March, 40 *late* ones of 06:00 on 9
   March, 90 of 11 March. The late batch cuts two archives: the second
   begins on 10 March and goes on at 06:00 on 9 March (it is filed under
   ``2024/03/10/`` by ``object_prefix``: its first record is not its
   earliest), the third goes on from there to 11 March.

What the tools print is compared with the records of the objects
downloaded and read locally (``ArchiveReader``), filtered in the test; the
GETs the tools send are counted (``swift_gets``: archives and their
``.index`` objects). test_swift_sources.py checks plain reads (every
record, SLOs, damage, credentials), test_tools_select.py the selection on
local files.

Needs ST_AUTH, ST_USER, ST_KEY (the Swift all-in-one) and RabbitMQ; skips
without them, or fails when CI=true.
"""

import collections
import datetime
import os
import signal
import uuid

import orjson
import pytest
from swiftclient import client as swc

from shoebox_worker import archive
from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker.tools import publish as publish_mod
from shoebox_worker.tools import read
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"
PREFIX = "%Y/%m/%d/"
#: The killed run: notifications, seed, first timestamp. Their records
#: (about 2.8 KB each) are more than archive.WRITE_BUFFER.
KILLED = (600, 41, datetime.datetime(2024, 3, 8, 23, 58, 30))
#: The second run's batches (count, seed, start), in publishing order.
BATCHES = [(70, 51, datetime.datetime(2024, 3, 10, 10)),
           (40, 52, datetime.datetime(2024, 3, 9, 6)),
           (90, 53, datetime.datetime(2024, 3, 11, 8))]
#: Records per archive of the second run.
ROLL = 50
#: The window around the late batch.
SINCE, UNTIL = "2024-03-09T06:00:00", "2024-03-09T07:00:00"


def utc(text):
    """A metadata ``timestamp`` (the simulator's, naive UTC) as UTC."""
    return datetime.datetime.fromisoformat(text).replace(
        tzinfo=datetime.UTC)


def _ids(count, seed, start):
    return [n["message_id"] for n in simulator.notifications(
        count, seed=seed, start=start)]


def _publish(url, queue, count, seed, start):
    publish_mod.publish(url, count, exchange=queue, routing_key=ROUTING_KEY,
                        seed=seed, start=start)
    return _ids(count, seed, start)


def _swift_options(env, container):
    return {"auth": env["ST_AUTH"], "user": env["ST_USER"],
            "key": env["ST_KEY"], "container": container,
            "object_prefix": PREFIX, "retries": 0, "timeout": 20}


def _on_disk(directory):
    """Bytes of the archives in ``directory`` (the OS's, not the
    writer's buffer)."""
    return sum(os.path.getsize(path) for path in
               _archive_files(directory))


def _archive_files(directory):
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, name) for name in os.listdir(directory)
            if ".events" in name]


def _killed_run(ft, rabbit, queue, env, container, directory):
    """Publish KILLED, start a worker, SIGKILL it once its archive holds
    records on disk and none was acked, start it again until idle; returns
    the message_ids published."""
    published = _publish(ft.AMQP_URL, queue, *KILLED)

    def config(name, **archive_options):
        return ft.worker_config(
            directory, queue, queue, routing_key=ROUTING_KEY,
            roll_checker="count", roll_options={"roll_count": 1000},
            callbacks={"gzip": {}, "swift": _swift_options(env, container),
                       "delete": {}},
            archive_options={"version": 1, **archive_options}, name=name)

    work = directory / "archive"
    # no ack point (fsync) before the kill: not 1000 records, not 30 s
    worker = ft.WorkerProcess(config("killed.conf", fsync_every=1000,
                                     fsync_interval=30))
    try:
        ft.wait_until(lambda: rabbit.depth(queue) == 0 and _on_disk(work)
                      >= archive.WRITE_BUFFER, 30, interval=0.01,
                      message="records handed to the system")
    finally:
        worker.kill()
    assert worker.proc.returncode == -signal.SIGKILL
    # nothing was acked: every message is back in the queue
    ft.wait_until(lambda: rabbit.depth(queue) == KILLED[0], 20,
                  message="the unacked messages back in the queue")
    # the same working directory and chain; an ack point every 0.2 s, so
    # that --idle-exit does not wait 30 s for the last one
    again = ft.run_worker(config("restart.conf"), timeout=90)
    assert again.returncode == 0, again.log_tail()
    assert _archive_files(work) == [], again.log_tail()
    return published


def _second_run(ft, queue, env, container, directory):
    published = []
    for batch in BATCHES:
        published += _publish(ft.AMQP_URL, queue, *batch)
    config = ft.worker_config(
        directory, queue, queue, routing_key=ROUTING_KEY,
        roll_checker="count", roll_options={"roll_count": ROLL},
        callbacks={"zstd": {}, "swift": _swift_options(env, container),
                   "delete": {}})
    worker = ft.run_worker(config, timeout=90)
    assert worker.returncode == 0, worker.log_tail()
    assert _archive_files(directory / "archive") == [], worker.log_tail()
    return published


@pytest.fixture(scope="module")
def shipped(ft, swift_env, rabbit_available, tmp_path_factory):
    """The container of both runs, and what is in it, read locally:
    ``records`` (object name -> ``[(metadata, payload)]``), ``indexes``
    (object name -> :class:`index.Index`), ``versions`` (object name ->
    its record versions), ``order`` (the objects in
    write order), ``killed`` and ``published`` (message_ids of the killed
    run, of both runs)."""
    container = "shoebox-readback-%s" % uuid.uuid4().hex[:12]
    queue = "shoebox-ft-readback-%s" % uuid.uuid4().hex[:8]
    rabbit = ft.Rabbit()
    rabbit.declare(queue, queue, ROUTING_KEY)
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    try:
        killed = _killed_run(ft, rabbit, queue, swift_env, container,
                             tmp_path_factory.mktemp("killed"))
        later = _second_run(ft, queue, swift_env, container,
                            tmp_path_factory.mktemp("late"))
        listing = ft.swift_archives(conn, container)  # each with its index
        downloads = tmp_path_factory.mktemp("downloads")
        records, indexes, versions = {}, {}, {}
        for entry in listing:
            name = entry["name"]
            _, body = conn.get_object(container, name)
            path = downloads / name.replace("/", "_")
            path.write_bytes(body)
            with archive.ArchiveReader(str(path)) as reader:
                records[name] = list(reader)
            versions[name] = archive.inspect_file(str(path)).versions
            _, data = conn.get_object(container, name + index.SUFFIX)
            indexes[name] = index.Index.from_bytes(data, name)
        with sources.Swift() as swift:
            order = [item.object for item in sources.find(
                ["swift://" + container], swift=swift)]
        assert sorted(order) == sorted(records)
        yield {"container": container, "records": records,
               "indexes": indexes, "versions": versions, "order": order,
               "killed": killed, "published": killed + later}
    finally:
        rabbit.cleanup()
        ft.delete_swift_container(conn, container)
        conn.close()


def _main(argv, capsysbinary):
    capsysbinary.readouterr()
    code = cli.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def _lines(shipped, keep):
    """What ``cat --metadata`` prints of the records ``keep(metadata,
    note)`` selects, in write order."""
    return b"".join(
        read.render_record(metadata, payload, with_metadata=True)
        for name in shipped["order"]
        for metadata, payload in shipped["records"][name]
        if keep(metadata, orjson.loads(payload)))


def _gets(swift_gets):
    """The archives GET, and the indexes GET (each sorted)."""
    indexes = sorted(o for _, o in swift_gets if o.endswith(index.SUFFIX))
    archives = sorted(o for _, o in swift_gets
                      if not o.endswith(index.SUFFIX))
    return archives, indexes


def test_the_runs_left_v1_gzip_and_v2_zstd_archives_with_duplicates(
        shipped):
    records = shipped["records"]
    gz = [n for n in records if n.endswith(".gz")]
    zst = [n for n in records if n.endswith(".zst")]
    assert len(zst) == sum(c for c, _, _ in BATCHES) // ROLL
    # the archive the killed worker left, and the restart's of them all
    assert len(gz) == 2
    assert {v for n in gz for v in shipped["versions"][n]} == {1}
    assert {v for n in zst for v in shipped["versions"][n]} == {2}
    killed = collections.Counter(m["message_id"] for n in gz
                                 for m, _ in records[n])
    assert set(killed) == set(shipped["killed"])
    twice = [i for i, c in killed.items() if c == 2]
    assert max(killed.values()) == 2
    # at least the writer's buffer of records, not all of them
    assert 300 < len(twice) < KILLED[0], len(twice)


def test_an_exact_where_gets_only_the_archives_its_index_points_at(
        shipped, swift_gets, capsysbinary):
    records, indexes = shipped["records"], shipped["indexes"]
    holding = collections.defaultdict(set)
    for name, rows in records.items():
        for _, payload in rows:
            instance = orjson.loads(payload)["payload"].get("instance_id")
            if instance is not None:
                holding[instance].add(name)
    pointed = {value: {name for name, got in indexes.items()
                       if got.may_contain("payload.instance_id", value)}
               for value in holding}
    for value, names in holding.items():
        assert names <= pointed[value], value  # no archive missed
    # an instance of one archive of the late run (the fewest archives)
    value = min((v for v, names in holding.items() if len(names) == 1
                 and next(iter(names)).endswith(".zst")),
                key=lambda v: (len(pointed[v]), v))
    assert len(pointed[value]) < len(records) / 2

    code, out, err = _main(["cat", "--metadata", "--where",
                            "payload.instance_id=%s" % value,
                            "swift://" + shipped["container"]],
                           capsysbinary)

    assert (code, err) == (0, "")
    archives, index_gets = _gets(swift_gets)
    assert archives == sorted(pointed[value])
    assert index_gets == sorted(n + index.SUFFIX for n in records)
    expected = _lines(shipped, lambda m, note: note["payload"].get(
        "instance_id") == value)
    assert out == expected and expected


def test_since_until_gets_only_the_archives_of_the_window(
        shipped, swift_gets, capsysbinary):
    records, indexes = shipped["records"], shipped["indexes"]
    since, until = utc(SINCE), utc(UNTIL)

    def within(metadata, note=None):
        return since <= utc(metadata["timestamp"]) < until

    holding = sorted(n for n, rows in records.items()
                     if any(within(m) for m, _ in rows))
    # the late batch is in two archives, which it cuts: each has records
    # outside the window, and begins on another day
    assert len(holding) == 2
    for name in holding:
        assert not all(within(m) for m, _ in records[name])
    # one is filed under 10 March: its first record is not its earliest
    (filed,) = [n for n in holding if n.startswith("2024/03/10/")]
    assert not within(records[filed][0][0])
    # the indexes' ranges say the same
    ranged = sorted(n for n, got in indexes.items()
                    if got.latest >= since.strftime("%Y-%m-%dT%H:%M:%S")
                    and got.earliest < until.strftime("%Y-%m-%dT%H:%M:%S"))
    assert ranged == holding

    code, out, err = _main(["cat", "--metadata", "--since", SINCE,
                            "--until", UNTIL,
                            "swift://" + shipped["container"]],
                           capsysbinary)

    assert (code, err) == (0, "")
    archives, index_gets = _gets(swift_gets)
    assert archives == holding
    assert index_gets == sorted(n + index.SUFFIX for n in records)
    expected = _lines(shipped, within)
    assert out == expected
    late = BATCHES[1]
    assert [orjson.loads(line)["metadata"]["message_id"]
            for line in out.splitlines()] == _ids(*late)


def test_dedup_after_kill_9_gives_each_message_once(shipped, capsysbinary):
    url = "swift://" + shipped["container"]
    code, out, err = _main(["cat", "--metadata", "--dedup", url],
                           capsysbinary)
    assert code == 0
    ids = collections.Counter(orjson.loads(line)["metadata"]["message_id"]
                              for line in out.splitlines())
    assert ids == collections.Counter(shipped["published"])

    code, every, _ = _main(["cat", "--metadata", url], capsysbinary)
    assert code == 0
    stored = sum(len(rows) for rows in shipped["records"].values())
    assert every.count(b"\n") == stored > len(ids)
    assert err == "shoebox-worker: %d duplicates dropped by --dedup\n" % (
        stored - len(ids))
    # the first of each kept, in write order
    firsts = {}
    for line in every.splitlines():
        firsts.setdefault(orjson.loads(line)["metadata"]["message_id"], line)
    assert out.splitlines() == list(firsts.values())


def _expected_counts(shipped, dedup):
    """``{(day, event_type): records}`` of a local read."""
    counts = collections.Counter()
    seen = set()
    for name in shipped["order"]:
        for metadata, _ in shipped["records"][name]:
            if dedup and metadata["message_id"] in seen:
                continue
            seen.add(metadata["message_id"])
            day = utc(metadata["timestamp"]).strftime("%Y-%m-%d")
            counts[day, metadata["event_type"]] += 1
    return counts


@pytest.mark.parametrize("fmt, options", [("jsonl", []),
                                          ("parquet", ["--dedup"])])
def test_export_is_read_by_duckdb_with_the_counts_of_a_local_read(
        shipped, tmp_path, capsysbinary, fmt, options):
    duckdb = pytest.importorskip("duckdb")
    out_dir = tmp_path / "export"
    code, out, err = _main(["export", "--format", fmt, "--out",
                            str(out_dir), *options,
                            "swift://" + shipped["container"]],
                           capsysbinary)
    assert code == 0, err
    expected = _expected_counts(shipped, dedup=bool(options))
    assert out.decode().startswith("exported %d records of %d archives" % (
        sum(expected.values()), len(shipped["records"])))
    days = sorted({day for day, _ in expected})
    assert days == ["2024-03-08", "2024-03-09", "2024-03-10", "2024-03-11"]
    (run,) = os.listdir(out_dir)  # one run, nothing hidden left
    assert run.startswith("run=")
    assert sorted(os.listdir(out_dir / run)) == ["date=" + d for d in days]
    if fmt == "jsonl":
        source = ("read_json('%s/run=*/date=*/*.jsonl.gz', "
                  "hive_partitioning = true, union_by_name = true)"
                  % out_dir)
    else:
        source = ("read_parquet('%s/run=*/date=*/*.parquet', "
                  "hive_partitioning = true, union_by_name = true)"
                  % out_dir)
    got = duckdb.sql("SELECT date, event_type, count(*) FROM %s GROUP BY "
                     "ALL" % source).fetchall()
    assert {(str(d), e): c for d, e, c in got} == dict(expected)
    by_type = collections.Counter()
    for (_, event_type), count in expected.items():
        by_type[event_type] += count
    got = duckdb.sql("SELECT event_type, count(*) FROM %s GROUP BY ALL"
                     % source).fetchall()
    assert dict(got) == dict(by_type)
    # one day pruned by its partition, the notification's own fields
    day = duckdb.sql("SELECT count(*), count(DISTINCT message_id) FROM %s "
                     "WHERE date = '2024-03-09'" % source).fetchall()[0]
    on_day = sum(c for (d, _), c in expected.items() if d == "2024-03-09")
    assert day[0] == on_day
    (mismatch,) = duckdb.sql(
        "SELECT count(*) FROM %s WHERE json_extract_string(notification, "
        "'$.message_id') IS DISTINCT FROM message_id" % source).fetchall()[0]
    assert mismatch == 0


def test_replay_with_where_and_since_sends_exactly_the_selected(
        shipped, ft, capsysbinary):
    records = shipped["records"]
    since, until = "2024-03-09T00:00:00", "2024-03-10T00:00:00"
    # a project of the late batch, which the killed run's records of 9
    # March (some of them twice) may share
    late = [orjson.loads(p) for n in shipped["order"]
            for m, p in records[n] if m["timestamp"].startswith(
                "2024-03-09 06")]
    project = late[0]["_context_project_id"]
    expected, seen = 0, set()
    for name in shipped["order"]:
        for metadata, payload in records[name]:
            note = orjson.loads(payload)
            if (utc(since) <= utc(metadata["timestamp"]) < utc(until)
                    and str(note.get("_context_project_id")) == str(project)
                    and metadata["message_id"] not in seen):
                seen.add(metadata["message_id"])
                expected += 1
    assert 0 < expected < sum(len(rows) for rows in records.values()) / 4
    rabbit = ft.Rabbit()
    target = "shoebox-ft-readback-replay-%s" % uuid.uuid4().hex[:8]
    try:
        rabbit.declare(target, target, "k")
        code, out, err = _main(
            ["replay", "--url", ft.AMQP_URL, "--exchange", target,
             "--routing-key", "k", "--since", since, "--until", until,
             "--where", "_context_project_id=%s" % project, "--dedup",
             "swift://" + shipped["container"]], capsysbinary)
        assert code == 0, err
        assert b"%d published, %d confirmed" % (expected, expected) in out
        assert ft.wait_until(lambda: rabbit.depth(target) == expected, 10,
                             message="the replayed messages in the queue")
    finally:
        rabbit.cleanup()
