"""Tests for shoebox_worker.integrity.chain: the worker's chain of
signed digests, its state, its failures, crash by crash."""

import datetime
import hashlib
import json
import logging
import os
import shutil

import pytest

from shoebox_worker import archive
from shoebox_worker import contract
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.integrity import chain as chain_mod
from shoebox_worker.integrity import digest as digest_mod
from shoebox_worker.integrity import keys

LOGGER = "shoebox_worker.integrity.chain"
INTERVAL = 300
HOST = "host-12"


class Crash(BaseException):
    """The process dies here (nothing catches it, as nothing catches a
    SIGKILL)."""


def state_of(world):
    with open(os.path.join(world.work, ".integrity", "chain.json")) as f:
        return json.load(f)


def outgoing(world):
    return sorted(os.listdir(os.path.join(world.work, ".integrity",
                                          "outgoing")))


def bodies(world):
    return [body for _, body in world.store.digests()]


def failures(result):
    return [f for f in result.findings if f.failure]


def messages(caplog, level):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == level]


@pytest.fixture
def opened(world):
    chain = world.chain()
    chain.open()
    return chain


# -- a chain's start ----------------------------------------------------------

def test_the_first_open_starts_a_chain(world, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    world.chain().open()
    state = state_of(world)
    assert len(state["chain"]) == 32
    int(state["chain"], 16)
    assert state["seq"] == 0
    assert state["previous"] is None
    assert state["host"] == HOST
    assert state["directory"] == world.work
    assert state["key"] == world.pinned[0]
    assert state["pending"] == []
    assert "a first start" in state["start"]["reason"]
    assert world.store.objects == {}
    [warning] = messages(caplog, logging.WARNING)
    assert warning.startswith("integrity: a new chain %s starts in %s: "
                              % (state["chain"], world.work))


def test_open_again_keeps_the_chain(world, opened):
    first = state_of(world)["chain"]
    world.chain().open()
    assert state_of(world)["chain"] == first


def test_open_refuses_a_key_it_cannot_read(world):
    os.unlink(world.private)
    with pytest.raises(keys.KeyError_):
        world.chain().open()


# -- recording ----------------------------------------------------------------

def test_record_is_durable_and_once_per_object_name(world, opened):
    stored, report, origin = world.archive()
    opened.record(stored, report, origin)
    opened.record(stored, report, origin)
    again = contract.Stored(origin + ".gz", name=stored.name, size=1,
                            sha256="0" * 64, etag="1" * 32)
    world.chain().record(again, None, origin)
    pending = state_of(world)["pending"]
    assert [entry["name"] for entry in pending] == [stored.name]
    assert pending[0]["sha256"] == stored.sha256


def test_a_digest_lists_each_archive_as_the_store_verified_it(world, opened):
    stored, report, origin = world.archive(sequence=7)
    opened.record(stored, report, origin)
    world.digest(opened)
    [body] = bodies(world)
    assert body["archives"] == [{
        "name": "archives/shoebox_20261207T000000_host-12_0123456789ab-"
                "7.events",
        "size": stored.size, "sha256": stored.sha256, "etag": stored.etag,
        "records": 10, "earliest": report.earliest, "latest": report.latest,
        "run": "0123456789ab", "sequence": 7, "offsets": {"q": [700, 799]},
    }]


@pytest.mark.parametrize("base, run, sequence", [
    ("shoebox_20261207T000000_host-12_0123456789ab-7.events",
     "0123456789ab", 7),
    ("shoebox_20261207T000000_host-12_0123456789ab-12.events.gz",
     "0123456789ab", 12),
    ("shoebox_20261207T000000_host-12_0123456789ab-3~2.events",
     "0123456789ab", 3),
    ("shoebox_20261207T000000_host-12_0123456789ab-3", "0123456789ab", 3),
    ("shoebox_20261207T000000_host-12.events", None, None),
    ("shoebox_20261207T000000_host-12_0123456789AB-7.events", None, None),
    ("shoebox_20261207T000000_host-12_0123456789a-7.events", None, None),
])
def test_entry_for_takes_run_and_sequence_from_the_workers_file_name(
        base, run, sequence):
    stored = contract.Stored("/w/x", name="o", size=3, sha256="s", etag="e")
    entry = chain_mod.entry_for(stored, None, os.path.join("/w", base))
    assert entry.get("run") == run
    assert entry.get("sequence") == sequence
    if run is None:
        assert set(entry) == {"name", "size", "sha256", "etag"}


def test_entry_for_without_a_report_lists_what_the_store_holds():
    stored = contract.Stored("/w/x", name="o", size="3", sha256="s",
                             etag="e")
    assert chain_mod.entry_for(stored, None, "/w/x.events") == {
        "name": "o", "size": 3, "sha256": "s", "etag": "e"}


@pytest.mark.parametrize("first, last, offsets", [
    ({"stream_offset": "5", "queue": "q"}, {"stream_offset": "9"},
     {"q": [5, 9]}),
    ({"stream_offset": "5"}, {"stream_offset": "9", "queue": "r"},
     {"r": [5, 9]}),
    ({"stream_offset": "5"}, {"stream_offset": "9"}, {"": [5, 9]}),
    ({"stream_offset": "5"}, {}, None),
    ({}, {"stream_offset": "9"}, None),
    ({"stream_offset": "x"}, {"stream_offset": "9"}, None),
    (None, None, None),
])
def test_entry_for_takes_offsets_from_the_first_and_last_records(
        first, last, offsets):
    stored = contract.Stored("/w/x", name="o", size=3, sha256="s", etag="e")
    report = archive.ArchiveReport("/w/x", records=2, first_metadata=first,
                                   last_metadata=last)
    entry = chain_mod.entry_for(stored, report, "/w/x")
    assert entry.get("offsets") == offsets
    assert entry["records"] == 2


# -- digests ------------------------------------------------------------------

def test_tick_makes_a_digest_only_once_the_interval_has_passed(world,
                                                               opened):
    world.ship(opened)
    world.clock.advance(INTERVAL - 2)  # ship() took a second
    opened.tick()
    assert world.store.objects.keys() == set(world.shipped)
    assert outgoing(world) == []
    world.clock.advance(1)
    opened.tick()
    assert [body["seq"] for body in bodies(world)] == [0]


def test_tick_makes_no_digest_when_nothing_waits(world, opened):
    key = world.key_text()
    world.clock.advance(3 * INTERVAL)
    opened.tick()
    opened.close()
    assert world.store.objects == {}
    assert outgoing(world) == []
    assert world.key_text() == key
    assert state_of(world)["seq"] == 0


def test_a_digest_says_what_its_chain_is(world, opened):
    start = state_of(world)
    world.ship(opened, 2)
    world.digest(opened)
    [(name, body)] = world.store.digests()
    created = world.clock.datetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert name == "_digests/%s/000000000000.json" % start["chain"]
    assert {k: v for k, v in body.items() if k != "archives"} == {
        "format": "shoebox-digest/1", "chain": start["chain"], "seq": 0,
        "host": HOST, "directory": world.work, "created": created,
        "range": {"from": start["created"], "to": created},
        "previous": None, "public_key": world.pinned[0],
        "next_public_key": world.key_text(), "interval": INTERVAL,
        "final": False, "start": start["start"],
    }
    assert [e["name"] for e in body["archives"]] == world.shipped
    assert state_of(world)["pending"] == []
    assert world.stats.stored == 1


def test_the_key_file_is_replaced_at_every_digest(world, opened):
    announced = []
    for _ in range(3):
        before = world.key_text()
        world.ship(opened)
        world.digest(opened)
        body = bodies(world)[-1]
        assert body["public_key"] == before
        assert body["next_public_key"] == world.key_text() != before
        assert state_of(world)["key"] == world.key_text()
        assert not os.path.lexists(world.private + keys.NEXT_SUFFIX)
        announced.append(body["next_public_key"])
    assert len(set(announced)) == 3


def test_each_digest_links_the_previous_by_its_sha256(world, opened):
    for _ in range(3):
        world.ship(opened)
        world.digest(opened)
    found = world.store.digests()
    assert [body["seq"] for _, body in found] == [0, 1, 2]
    for (name, _), (_, body) in zip(found, found[1:], strict=False):
        assert body["previous"] == {
            "name": name,
            "sha256": hashlib.sha256(world.store.objects[name]).hexdigest()}
        assert "start" not in body
        assert body["range"]["from"] == digest_mod.parse(
            world.store.objects[name])[0]["created"]


def test_every_digest_is_signed_by_the_key_the_one_before_announced(
        world, opened):
    for _ in range(3):
        world.ship(opened)
        world.digest(opened)
    found = world.store.digests()
    expected = world.pinned[0]
    for name, body in found:
        _, signature = digest_mod.parse(world.store.objects[name])
        assert body["public_key"] == expected
        assert digest_mod.signed_by(body, signature,
                                    keys.parse_public(expected))
        expected = body["next_public_key"]


def test_close_makes_a_final_digest_of_what_waits(world, opened):
    world.ship(opened)
    opened.close()
    [body] = bodies(world)
    assert body["final"] is True
    assert [e["name"] for e in body["archives"]] == world.shipped
    opened.close()
    assert len(bodies(world)) == 1


def test_close_after_a_tick_listed_everything_still_says_it_stopped(
        world, opened):
    world.ship(opened)
    world.digest(opened)
    opened.close()
    found = bodies(world)
    assert [(b["seq"], b["final"], len(b["archives"])) for b in found] == [
        (0, False, 1), (1, True, 0)]
    world.chain().close()
    assert len(bodies(world)) == 2
    assert world.audit().chains[0]["final"] is True


def test_two_processes_of_one_identity_share_the_chain(world):
    one, two = world.chain(), world.chain()
    one.open()
    two.open()
    world.ship(one)
    world.ship(two)
    world.digest(one)
    two.tick()
    [body] = bodies(world)
    assert [e["name"] for e in body["archives"]] == world.shipped
    world.ship(two)
    world.digest(two)
    assert [b["seq"] for b in bodies(world)] == [0, 1]
    assert not failures(world.audit())


# -- failures to store a digest -----------------------------------------------

def test_a_digest_the_store_refuses_waits_in_outgoing_and_goes_later(
        world, opened, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    world.store.fail = 3
    world.ship(opened)
    world.digest(opened)
    assert bodies(world) == []
    [kept] = outgoing(world)
    assert kept == "%s-000000000000.json" % state_of(world)["chain"]
    path = os.path.join(world.work, ".integrity", "outgoing", kept)
    data = open(path, "rb").read()
    assert digest_mod.parse(data)[0]["archives"][0]["name"] == \
        world.shipped[0]
    assert world.stats.failed == 1
    [error] = messages(caplog, logging.ERROR)
    assert error.startswith("cannot store digest _digests/%s/000000000000."
                            "json (" % state_of(world)["chain"])
    assert "archives keep shipping" in error

    # not again before the retry delay; the archives keep being digested
    world.ship(opened)
    world.clock.advance(10)
    opened.tick()
    assert len(world.store.puts) == 1
    world.clock.advance(chain_mod.RETRY_MIN + 60)
    opened.tick()
    world.clock.advance(60)
    opened.tick()
    assert world.stats.failed == 3
    assert len(messages(caplog, logging.ERROR)) == 1
    assert messages(caplog, logging.INFO) == [
        m for m in messages(caplog, logging.INFO) if "lists" in m]

    world.clock.advance(60)
    opened.tick()
    assert world.store.objects[digest_mod.name(
        "_digests/", state_of(world)["chain"], 0)] == data
    assert outgoing(world) == []
    assert world.stats.stored == 1
    again = [m for m in messages(caplog, logging.INFO) if "again" in m]
    assert again == ["digests are stored again, after 3 failed attempt(s) "
                     "in 3 min"]

    # a new episode is said again
    world.store.fail = 1
    world.ship(opened)
    world.digest(opened)
    assert len(messages(caplog, logging.ERROR)) == 2
    world.clock.advance(60)
    opened.tick()
    assert [b["seq"] for b in bodies(world)] == [0, 1]
    assert not failures(world.audit())
    assert world.listed() == {name: 1 for name in world.shipped}


def test_digests_waiting_go_out_in_order(world, opened):
    world.store.fail = 2
    world.ship(opened)
    world.digest(opened)
    world.ship(opened)
    world.digest(opened)  # the retry before it fails: both wait
    chain = state_of(world)["chain"]
    assert outgoing(world) == ["%s-000000000000.json" % chain,
                               "%s-000000000001.json" % chain]
    world.clock.advance(60)
    opened.tick()
    assert outgoing(world) == []
    assert world.store.puts[-2:] == [
        digest_mod.name("_digests/", chain, 0),
        digest_mod.name("_digests/", chain, 1)]


def test_close_tries_once_to_put_what_waits(world, opened):
    world.store.fail = 1
    world.ship(opened)
    world.digest(opened)
    assert len(outgoing(world)) == 1
    opened.close()
    assert outgoing(world) == []
    assert [(b["seq"], b["final"]) for b in bodies(world)] == [(0, False),
                                                              (1, True)]


def test_the_first_tick_puts_what_a_previous_run_left_in_outgoing(
        world, opened):
    world.store.fail = 1
    world.ship(opened)
    world.digest(opened)
    again = world.chain()
    again.open()  # never the store: one that is down holds no start
    assert len(outgoing(world)) == 1 and bodies(world) == []
    again.tick()
    assert outgoing(world) == []
    assert len(bodies(world)) == 1


# -- crash by crash -----------------------------------------------------------

def crash_in_write_next(monkeypatch, world, after):
    real = keys.write_next

    def write_next(path):
        if after:
            real(path)
        raise Crash()
    monkeypatch.setattr(keys, "write_next", write_next)


def crash_in_write_atomic(monkeypatch, world, where, after):
    real = files.write_atomic
    root = os.path.join(world.work, ".integrity")
    target = os.path.join(root, "outgoing") if where == "digest" else \
        os.path.join(root, "chain.json")
    armed = {"on": where == "digest"}

    def write_atomic(path, data, *args, **kwargs):
        if os.path.join(root, "outgoing") in path:
            armed["on"] = True  # the state written after the digest only
        if armed["on"] and path.startswith(target):
            if after:
                real(path, data, *args, **kwargs)
            raise Crash()
        return real(path, data, *args, **kwargs)
    monkeypatch.setattr(files, "write_atomic", write_atomic)


def crash_in_install_next(monkeypatch, world, mid):
    real = keys.install_next

    def install_next(path):
        if mid:  # renamed, not yet written over
            os.replace(path + keys.NEXT_SUFFIX, path)
        else:
            real(path)
        raise Crash()
    monkeypatch.setattr(keys, "install_next", install_next)


def crash_in_put(monkeypatch, world):
    real = world.store.put_digest

    def put_digest(name, data):
        real(name, data)
        raise Crash()
    monkeypatch.setattr(world.store, "put_digest", put_digest)


CRASHES = {
    "before the next key": lambda m, w: crash_in_write_next(m, w, False),
    "after the next key": lambda m, w: crash_in_write_next(m, w, True),
    "before the digest is written": lambda m, w: crash_in_write_atomic(
        m, w, "digest", False),
    "after the digest is written": lambda m, w: crash_in_write_atomic(
        m, w, "digest", True),
    "before the state moves on": lambda m, w: crash_in_write_atomic(
        m, w, "state", False),
    "after the state moves on": lambda m, w: crash_in_write_atomic(
        m, w, "state", True),
    "while the next key is installed": lambda m, w: crash_in_install_next(
        m, w, True),
    "after the next key is installed": lambda m, w: crash_in_install_next(
        m, w, False),
    "after the digest is stored": crash_in_put,
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_a_crash_anywhere_in_a_digest_is_finished_at_the_next_start(
        world, monkeypatch, where):
    chain = world.chain()
    chain.open()
    world.ship(chain, 2)
    world.digest(chain)
    first = state_of(world)["chain"]
    world.ship(chain, 2)
    CRASHES[where](monkeypatch, world)
    with pytest.raises(Crash):
        world.digest(chain)
    monkeypatch.undo()

    again = world.chain()
    again.open()
    again.tick()  # puts what outgoing/ holds
    assert not os.path.lexists(world.private + keys.NEXT_SUFFIX)
    assert outgoing(world) == []
    assert state_of(world)["key"] == world.key_text()
    world.digest(again)
    result = world.audit()
    assert failures(result) == []
    assert world.listed() == {name: 1 for name in world.shipped}

    # and the chain goes on
    world.ship(again, 2)
    world.digest(again)
    result = world.audit()
    assert failures(result) == []
    assert result.findings == []
    assert world.listed() == {name: 1 for name in world.shipped}
    assert [c["chain"] for c in result.chains] == [first]
    assert result.archives == len(world.shipped) == 6


def test_a_crash_while_recording_keeps_what_was_recorded(world, monkeypatch):
    chain = world.chain()
    chain.open()
    world.ship(chain)
    monkeypatch.setattr(files, "write_atomic", lambda *a, **k: (_ for _ in
                                                                ()).throw(
        Crash()))
    with pytest.raises(Crash):
        world.ship(chain)
    monkeypatch.undo()
    assert [e["name"] for e in state_of(world)["pending"]] == world.shipped


def test_a_next_key_no_digest_announced_is_removed(world, opened):
    key = world.key_text()
    keys.write_next(world.private)
    world.chain().open()
    assert not os.path.lexists(world.private + keys.NEXT_SUFFIX)
    assert world.key_text() == key


# -- new chains ---------------------------------------------------------------

def test_a_lost_working_directory_starts_a_chain_the_old_one_vouches_for(
        world, opened, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    world.ship(opened)
    world.digest(opened)
    old = state_of(world)
    shutil.rmtree(os.path.join(world.work, ".integrity"))

    again = world.chain()
    again.open()
    new = state_of(world)
    assert new["chain"] != old["chain"]
    assert new["seq"] == 0
    assert new["key"] == old["key"] == world.key_text()
    assert "the working directory was lost" in new["start"]["reason"]
    assert "working directory was lost" in messages(
        caplog, logging.WARNING)[-1]
    world.ship(again)
    world.digest(again)
    [(_, last_old), (_, first_new)] = sorted(
        world.store.digests(), key=lambda d: d[1]["chain"] != old["chain"])
    assert first_new["seq"] == 0
    assert first_new["public_key"] == last_old["next_public_key"]

    result = world.audit()
    assert failures(result) == []
    assert world.listed() == {name: 1 for name in world.shipped}
    starts = {c["chain"]: c["start"] for c in result.chains}
    assert "working directory was lost" in starts[new["chain"]]


def test_a_key_not_the_one_announced_starts_a_chain_naming_the_key(
        world, opened, tmp_path):
    world.ship(opened)
    world.digest(opened)
    old = state_of(world)
    other, other_public = keys.keygen(str(tmp_path / "other"))
    os.replace(other, world.private)

    again = world.chain()
    again.open()
    new = state_of(world)
    assert new["chain"] != old["chain"]
    assert new["start"]["reason"] == (
        "the key at %s is not the one chain %s announced at seq 0"
        % (world.private, old["chain"]))
    world.ship(again)
    world.digest(again)
    new_first = digest_mod.name("_digests/", new["chain"], 0)

    result = world.audit()
    assert [(f.kind, f.name) for f in result.findings] == [
        ("untrusted-key", new_first)]
    assert result.failed

    pinned = world.pinned + [keys.public_text(keys.load_public(
        other_public))]
    assert failures(world.audit(pinned)) == []


def test_a_state_made_for_another_host_starts_a_chain(world, opened):
    world.ship(opened)
    world.digest(opened)
    old = state_of(world)
    again = world.chain(host="host-13")
    again.open()
    new = state_of(world)
    assert new["chain"] != old["chain"]
    assert new["host"] == "host-13"
    assert new["start"]["reason"] == "the chain state was made for " \
        "host-12:%s" % world.work
    world.ship(again)
    world.digest(again)
    assert {b["host"] for b in bodies(world)} == {"host-12", "host-13"}
    assert failures(world.audit()) == []


def test_a_new_chain_never_takes_the_place_of_a_digest_still_waiting(
        world, opened):
    world.store.fail = 100  # the store is down across the new start
    world.ship(opened)
    world.digest(opened)
    old = state_of(world)["chain"]
    again = world.chain(host="host-13")
    again.open()
    world.ship(again)
    world.digest(again)
    assert len(outgoing(world)) == 2
    world.store.fail = 0
    world.clock.advance(60)
    again.tick()
    assert outgoing(world) == []
    assert sorted(b["chain"] for b in bodies(world)) == sorted(
        [old, state_of(world)["chain"]])
    assert failures(world.audit()) == []
    assert world.listed() == {name: 1 for name in world.shipped}


def test_a_state_that_does_not_parse_starts_a_chain(world, opened, caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)
    old = state_of(world)
    path = os.path.join(world.work, ".integrity", "chain.json")
    with open(path, "w") as f:
        f.write('{"seq": "0"}')
    world.chain().open()
    new = state_of(world)
    assert new["chain"] != old["chain"]
    assert new["start"]["reason"] == "the chain state in %s did not parse" \
        % path
    [error] = messages(caplog, logging.ERROR)
    assert error.startswith("%s does not parse" % path)


def test_store_of_is_the_first_step_that_puts_digests(world):
    class Plain:
        pass

    class Stores:
        def put_digest(self, name, data):
            pass

    first, second = Stores(), Stores()
    steps = [("gzip", Plain()), ("swift", first), ("other", second)]
    assert chain_mod.store_of(None, steps) is first


def test_store_of_without_one_is_a_config_error_naming_signing_key():
    class Config:
        filename = "worker.conf"

    with pytest.raises(exceptions.ConfigError) as info:
        chain_mod.store_of(Config(), [("gzip", object()),
                                      ("memory", object())])
    assert str(info.value) == (
        "worker.conf [integrity] signing_key: needs a step that stores "
        "archives and digests in [archive] callbacks (swift); it has: "
        "gzip, memory")


def test_utc_times_are_iso_with_microseconds_and_z():
    moment = datetime.datetime(2026, 12, 7, 1, 2, 3, 4,
                               tzinfo=datetime.UTC).timestamp()
    assert chain_mod._utc(moment) == "2026-12-07T01:02:03.000004Z"


def test_a_new_chain_lists_what_the_old_one_recorded_and_never_listed(
        world, opened):
    world.ship(opened)
    world.digest(opened)
    pending = world.ship(opened)  # recorded, in no digest yet
    assert [e["name"] for e in state_of(world)["pending"]] == pending
    again = world.chain(host="host-13")
    again.open()
    assert [e["name"] for e in state_of(world)["pending"]] == pending
    world.digest(again)
    assert failures(world.audit()) == []


def test_digests_that_go_elsewhere_start_a_chain_there(world):
    world.store.location = "swift://first"
    first = world.chain()
    first.open()
    world.ship(first)
    world.digest(first)
    pending = world.ship(first)
    old = state_of(world)["chain"]
    world.store.location = "swift://second"
    again = world.chain()
    again.open()
    new = state_of(world)
    assert new["chain"] != old
    assert new["start"]["reason"] == (
        "digests now go to swift://second/_digests/; chain %s went to "
        "swift://first/_digests/" % old)
    assert [e["name"] for e in new["pending"]] == pending
    world.store.location = "swift://first"
    assert state_of(world)["chain"] == new["chain"]


def test_two_processes_of_one_worker_share_its_chain(world):
    # [worker] processes = 2: one identity, two Chain objects, one lock
    one, two = world.chain(), world.chain()
    one.open()
    two.open()
    shipped = []
    for turn in range(6):
        chain = (one, two)[turn % 2]
        shipped += world.ship(chain)
        world.digest(chain)
    one.close()
    two.close()
    bodies_ = bodies(world)
    assert {b["chain"] for b in bodies_} == {state_of(world)["chain"]}
    assert [b["seq"] for b in bodies_] == list(range(len(bodies_)))
    listed = [e["name"] for b in bodies_ for e in b["archives"]]
    assert sorted(listed) == sorted(shipped)
    assert failures(world.audit()) == []
