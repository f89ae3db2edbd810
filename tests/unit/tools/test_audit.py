"""Tests for shoebox_worker.tools.audit (``verify --chain``): the parts
that need no Swift: the pinned keys, the lines and the JSON."""

import argparse
import json

import pytest

from shoebox_worker.integrity import audit as audit_mod
from shoebox_worker.integrity import keys
from shoebox_worker.tools import UsageError
from shoebox_worker.tools import audit


def chain(**changes):
    value = {"chain": "c" * 32, "host": "host-12", "directory": "/w",
             "digests": 3, "first_seq": 0, "last_seq": 2, "archives": 6,
             "last_digest": "2026-12-07T00:15:00.000000Z",
             "age_seconds": 30, "final": False, "start": None,
             "head": "%s:2:%s" % ("c" * 32, "e" * 64)}
    value.update(changes)
    return value


def result(findings=(), chains=(), **counts):
    made = audit_mod.Audit(list(findings), list(chains))
    for name, value in counts.items():
        setattr(made, name, value)
    return made


MISSING = audit_mod.Finding("missing", "archives/a.events",
                            "listed in _digests/x, not in the store")
PENDING = audit_mod.Finding("pending", "archives/b.events", "stored later",
                            failure=False)


# -- the pinned keys ----------------------------------------------------------

@pytest.mark.parametrize("paths", [None, []])
def test_pinned_needs_a_key(paths):
    with pytest.raises(UsageError, match="--chain needs --public-key FILE"):
        audit._pinned(paths)


def test_pinned_reads_each_key_as_text(tmp_path):
    _, one = keys.keygen(str(tmp_path / "one"))
    _, two = keys.keygen(str(tmp_path / "two"))
    assert audit._pinned([one, two]) == [
        keys.public_text(keys.load_public(one)),
        keys.public_text(keys.load_public(two))]


@pytest.mark.parametrize("content", [None, b"not a key\n",
                                     b"ed25519:short\n"])
def test_pinned_refuses_a_file_that_is_no_public_key(tmp_path, content):
    _, good = keys.keygen(str(tmp_path / "keys"))
    bad = tmp_path / "bad.pub"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(UsageError) as info:
        audit._pinned([good, str(bad)])
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("paths", [[], ["a", "b"], ["/local/folder"],
                                   ["swift://c", "swift://d"]])
def test_verify_chain_takes_one_store(paths):
    args = argparse.Namespace(paths=paths, public_key=["k.pub"])
    with pytest.raises(UsageError, match="--chain takes one store"):
        audit.cmd_verify_chain(args)


def test_verify_chain_refuses_no_key_before_connecting():
    args = argparse.Namespace(paths=["swift://c"], public_key=[])
    with pytest.raises(UsageError, match="--public-key"):
        audit.cmd_verify_chain(args)


# -- what it prints -----------------------------------------------------------

def test_lines_say_each_finding_each_chain_and_a_summary():
    made = result([MISSING, PENDING], [
        chain(), chain(chain="d" * 32, first_seq=0, last_seq=0, digests=1,
                       archives=1, age_seconds=None, final=True,
                       start="a first start",
                       head="%s:0:%s" % ("d" * 32, "f" * 64))],
        digests=4, archives=7, archive_bytes=2000, bytes_read=100)
    assert list(audit._lines(made)) == [
        "MISSING archives/a.events: listed in _digests/x, not in the store",
        "PENDING archives/b.events: stored later",
        "CHAIN %s: host-12:/w, digests 0-2, 6 archive(s), last digest "
        "2026-12-07T00:15:00.000000Z (30 s ago); head %s:2:%s"
        % ("c" * 32, "c" * 32, "e" * 64),
        "CHAIN %s: host-12:/w, digests 0-0, 1 archive(s), last digest "
        "2026-12-07T00:15:00.000000Z (? ago), ended by a clean stop; "
        "started: a first start; head %s:0:%s" % ("d" * 32, "d" * 32,
                                                  "f" * 64),
        "FAILED: 2 chain(s), 4 digest(s), 7 archive(s) listed; 1 "
        "problem(s); read 100 bytes (5.00% of the archives' 2000)",
    ]


def test_lines_of_a_store_that_passes_end_in_ok():
    made = result([PENDING], [chain()], digests=3, archives=6)
    assert list(audit._lines(made))[-1] == (
        "OK: 1 chain(s), 3 digest(s), 6 archive(s) listed; 0 problem(s); "
        "read 0 bytes (0.00% of the archives' 0)")


@pytest.mark.parametrize("seconds, said", [
    (0, "0 s"), (119, "119 s"), (120, "2 min"), (7199, "119 min"),
    (7200, "2.0 h"), (172799, "48.0 h"), (172800, "2.0 days"),
])
def test_ages(seconds, said):
    assert audit._age(seconds) == said
    line = list(audit._lines(result([], [chain(age_seconds=seconds)])))[0]
    assert "(%s ago)" % said in line


def test_as_json_is_one_object_of_everything():
    made = result([MISSING, PENDING], [chain()], digests=3, archives=6,
                  archive_bytes=3000, bytes_read=1000)
    value = audit._as_json(made)
    assert value == {
        "ok": False,
        "findings": [
            {"kind": "missing", "name": "archives/a.events",
             "message": "listed in _digests/x, not in the store",
             "failure": True},
            {"kind": "pending", "name": "archives/b.events",
             "message": "stored later", "failure": False}],
        "chains": [chain()],
        "digests": 3, "archives": 6, "archive_bytes": 3000,
        "bytes_read": 1000, "read_percent": 33.3333,
    }
    assert json.loads(json.dumps(value)) == value


def test_as_json_of_a_store_that_passes_is_ok():
    value = audit._as_json(result([PENDING]))
    assert value["ok"] is True
    assert value["read_percent"] == 0.0
    assert value["chains"] == []
