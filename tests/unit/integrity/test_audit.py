"""Tests for shoebox_worker.integrity.audit (``verify --chain``): stores
made by the real chain, then one tampering at a time."""

import base64
import datetime
import hashlib
import json

import pytest

from shoebox_worker.integrity import audit as audit_mod
from shoebox_worker.integrity import digest as digest_mod
from shoebox_worker.integrity import keys

OTHER_CHAIN = "f" * 32


@pytest.fixture
def shipped(world):
    """Three digests of two archives each; the chain, still open."""
    chain = world.chain()
    chain.open()
    for _ in range(3):
        world.ship(chain, 2)
        world.digest(chain)
    return chain


def kinds(result):
    return [(f.kind, f.name) for f in result.findings]


def failures(result):
    return [f for f in result.findings if f.failure]


def digest_names(world):
    return [name for name, _ in world.store.digests()]


def rewrite(world, name, change, key=None):
    """Edit the body of digest ``name`` with ``change(body)``; keep its
    signature, or sign it again with ``key``."""
    body, signature = digest_mod.parse(world.store.objects[name])
    change(body)
    if key is not None:
        data = digest_mod.sign(body, key)
    else:
        data = digest_mod.canonical({"body": body, "signature": base64.
                                     b64encode(signature).decode()}) + b"\n"
    world.store.put(name, data, world.store.modified[name])


def test_an_untouched_store_passes(world, shipped):
    result = world.audit()
    assert result.findings == []
    assert not result.failed
    assert result.digests == 3
    assert result.archives == 6
    assert result.archive_bytes == sum(
        len(world.store.objects[name]) for name in world.shipped)
    assert result.bytes_read == sum(
        len(world.store.objects[name]) for name in digest_names(world))
    [name, _, last] = digest_names(world)
    first, last_body = (digest_mod.parse(world.store.objects[n])[0]
                        for n in (name, last))
    assert result.chains == [{
        "chain": first["chain"], "host": "host-12",
        "directory": world.work, "digests": 3, "first_seq": 0,
        "last_seq": 2, "archives": 6, "last_digest": last_body["created"],
        "head": "%s:2:%s" % (first["chain"], hashlib.sha256(
            world.store.objects[last]).hexdigest()),
        "age_seconds": 0, "final": False,
        "next_public_key": last_body["next_public_key"],
        "start": first["start"]["reason"],
    }]


def test_a_clean_stop_is_in_the_chains_summary(world, shipped):
    world.ship(shipped)
    shipped.close()
    result = world.audit(now=world.clock.datetime()
                         + datetime.timedelta(seconds=90))
    assert result.findings == []
    assert result.chains[0]["final"] is True
    assert result.chains[0]["age_seconds"] == 90


def test_a_deleted_archive_is_missing(world, shipped):
    gone = world.shipped[2]
    world.store.delete(gone)
    result = world.audit()
    assert kinds(result) == [("missing", gone)]
    assert result.failed


def test_an_archive_gone_between_the_listing_and_its_head_is_missing(
        world, shipped):
    gone = world.shipped[2]
    listing = world.store.listing()
    world.store.delete(gone)
    result = audit_mod.audit(listing, world.store.get, world.store.head,
                             world.pinned, now=world.clock.datetime())
    assert kinds(result) == [("missing", gone)]


@pytest.mark.parametrize("data", [b"forged", b"x" * 230])
def test_an_archive_replaced_with_its_etag_and_sha256_is_changed(
        world, shipped, data):
    name = world.shipped[3]
    assert len(world.store.objects[name]) == 230
    world.store.put(name, data)  # a new ETag and X-Object-Meta-Sha256
    result = world.audit()
    assert {kind for kind, _ in kinds(result)} == {"changed"}
    assert {found for _, found in kinds(result)} == {name}
    assert len(result.findings) == (3 if len(data) != 230 else 2)
    assert result.failed


def test_an_archive_whose_sha256_metadata_changed_is_changed(world,
                                                             shipped):
    name = world.shipped[0]
    world.store.sha256[name] = "0" * 64
    result = world.audit()
    assert kinds(result) == [("changed", name)]
    assert "SHA-256 %s (metadata)" % ("0" * 64) in result.findings[0].message


def test_an_unlisted_archive_stored_before_the_newest_digest_is_inserted(
        world, shipped):
    between = world.clock.datetime() - datetime.timedelta(seconds=400)
    world.store.put("archives/forged.events", b"forged", between)
    result = world.audit()
    assert kinds(result) == [("inserted", "archives/forged.events")]
    assert result.failed


def test_an_unlisted_archive_stored_before_any_chain_is_unchained(
        world, shipped):
    before = datetime.datetime.fromtimestamp(
        world.clock.now - 10 * 86400, datetime.UTC)
    world.store.put("archives/old.events", b"old", before)
    result = world.audit()
    assert kinds(result) == [("unchained", "archives/old.events")]
    assert not result.failed


def test_an_archive_newer_than_the_newest_digest_is_pending_for_a_while(
        world, shipped):
    [name] = world.ship(shipped)
    result = world.audit()
    assert kinds(result) == [("pending", name)]
    assert not result.failed
    grace = audit_mod.PENDING_INTERVALS * 300 + audit_mod.PENDING_SLACK
    stored = world.clock.datetime()
    result = world.audit(now=stored + datetime.timedelta(seconds=grace - 1))
    assert kinds(result) == [("pending", name)]
    result = world.audit(now=stored + datetime.timedelta(seconds=grace))
    assert kinds(result) == [("inserted", name)]
    assert result.failed


def test_a_deleted_middle_digest_is_missing_and_named(world, shipped):
    first, middle, last = digest_names(world)
    world.store.delete(middle)
    result = world.audit()
    found = kinds(result)
    assert ("digest-missing", middle) in found
    assert ("unchecked", last) in found
    assert [k for k in found if k[0] == "digest-missing"] == [
        ("digest-missing", middle)]
    # what it listed is in no digest now
    assert sorted(n for k, n in found if k == "inserted") == \
        world.shipped[2:4]
    assert result.failed


def test_a_deleted_first_digest_is_missing(world, shipped):
    first, middle, last = digest_names(world)
    world.store.delete(first)
    found = kinds(world.audit())
    assert ("digest-missing", first) in found
    assert ("unchecked", middle) in found


def test_an_edited_digest_is_altered_and_its_signature_fails(world,
                                                             shipped):
    first, middle, last = digest_names(world)

    def shrink(body):
        body["archives"][0]["size"] += 1
    rewrite(world, first, shrink)
    found = kinds(world.audit())
    assert ("altered", first) in found
    assert ("bad-signature", first) in found
    # and what it listed is vouched for by no digest
    assert {name for _, name in found} == {first} | set(world.shipped[:2])


def test_an_edited_last_digest_has_a_bad_signature(world, shipped):
    last = digest_names(world)[-1]

    def drop(body):
        del body["archives"][1]
    rewrite(world, last, drop)
    found = kinds(world.audit())
    assert ("bad-signature", last) in found
    assert ("altered", last) not in found


def test_a_past_digest_signed_again_with_the_current_key_fails(world,
                                                               shipped):
    middle = digest_names(world)[1]
    current = keys.load_private(world.private)

    def drop(body):
        del body["archives"][0]
    rewrite(world, middle, drop, key=current)
    found = kinds(world.audit())
    assert ("bad-signature", middle) in found


def test_a_past_digest_naming_the_current_key_fails(world, shipped):
    middle = digest_names(world)[1]
    current = keys.load_private(world.private)

    def claim(body):
        body["public_key"] = keys.public_text(current)
    rewrite(world, middle, claim, key=current)
    result = world.audit()
    [finding] = [f for f in result.findings if f.kind == "bad-signature"]
    assert finding.name == middle
    assert finding.message.startswith("signed with %s; this place calls "
                                      "for" % keys.public_text(current))


def test_a_chain_whose_first_key_is_not_pinned_is_untrusted(world,
                                                            shipped):
    first = digest_names(world)[0]
    result = world.audit(pinned=[keys.public_text(keys.generate())])
    assert kinds(result) == [("untrusted-key", first)]
    assert result.failed


def test_no_pinned_key_trusts_no_chain(world, shipped):
    first = digest_names(world)[0]
    assert kinds(world.audit(pinned=[])) == [("untrusted-key", first)]


def test_a_gap_in_a_runs_sequence_is_found(world):
    chain = world.chain()
    chain.open()
    world.ship(chain, sequence=1)
    world.ship(chain, sequence=3)
    world.ship(chain, run="ba9876543210", sequence=1)
    world.digest(chain)
    result = world.audit()
    assert kinds(result) == [("sequence-gap", "run 0123456789ab"),
                             ("stream-gap", "queue q")]
    gap, stream = result.findings
    assert gap.message == "archives 2 to 2 of this run are in no digest"
    assert gap.failure
    assert stream.message.startswith("offsets 200 to 299 are in no archive")
    assert not stream.failure


def test_since_and_until_limit_the_archives_checked(world, shipped):
    early, late = world.shipped[0], world.shipped[-1]
    world.store.delete(early)
    world.store.delete(late)
    middle = datetime.datetime.fromtimestamp(world.clock.now - 400,
                                             datetime.UTC)
    assert kinds(world.audit(since=middle)) == [("missing", late)]
    assert kinds(world.audit(until=middle)) == [("missing", early)]
    assert sorted(kinds(world.audit())) == [("missing", early),
                                            ("missing", late)]


def test_since_and_until_limit_the_unlisted_archives_checked(world,
                                                             shipped):
    between = world.clock.datetime() - datetime.timedelta(seconds=400)
    world.store.put("archives/forged.events", b"forged", between)
    after = between + datetime.timedelta(seconds=1)
    assert kinds(world.audit(since=after)) == []
    assert kinds(world.audit(until=between)) == []
    assert kinds(world.audit(since=between, until=after)) == [
        ("inserted", "archives/forged.events")]


def test_deep_reads_every_archive_and_counts_the_bytes(world, shipped):
    read = []

    def deep(name):
        read.append(name)
        return audit_mod.sha256_of_stream([world.store.objects[name][:7],
                                           world.store.objects[name][7:]])
    result = world.audit(deep=deep)
    assert result.findings == []
    assert sorted(read) == sorted(world.shipped)
    digests = sum(len(world.store.objects[n]) for n in digest_names(world))
    assert result.bytes_read == digests + result.archive_bytes


def test_deep_finds_bytes_that_differ_from_what_the_digest_lists(world,
                                                                  shipped):
    name = world.shipped[1]

    def deep(found):
        data = world.store.objects[found]
        if found == name:
            data = b"y" * len(data)
        return len(data), hashlib.sha256(data).hexdigest()
    result = world.audit(deep=deep)
    assert kinds(result) == [("changed", name)]
    assert result.findings[0].message.startswith("its bytes: 230, SHA-256 ")


def test_a_failing_head_is_one_unreadable_line(world, shipped):
    def head(name):
        raise OSError("connection reset")
    result = audit_mod.audit(world.store.listing(), world.store.get, head,
                             world.pinned, now=world.clock.datetime())
    assert sorted(kinds(result)) == sorted(("unreadable", name)
                                           for name in world.shipped)
    assert result.findings[0].message == "connection reset"


def test_a_digest_that_does_not_parse_is_unreadable(world, shipped):
    first = digest_names(world)[0]
    world.store.put(first, b"not a digest", world.store.modified[first])
    found = kinds(world.audit())
    assert ("unreadable", first) in found


@pytest.mark.parametrize("change", [
    pytest.param(lambda body: body.pop("range"), id="no range"),
    pytest.param(lambda body: body.update(created="garbage"),
                 id="created not a time"),
    pytest.param(lambda body: body.update(start="why"), id="start text"),
    pytest.param(lambda body: body.update(public_key="garbage"),
                 id="key not a key"),
    pytest.param(lambda body: body["archives"][0].update(offsets=[1, 2]),
                 id="offsets a list"),
    pytest.param(lambda body: body["archives"][0].update(offsets={"q": 5}),
                 id="offsets not spans"),
    pytest.param(lambda body: body["archives"][0].update(run=["x"]),
                 id="run a list"),
    pytest.param(lambda body: body["archives"][0].update(earliest=5,
                                                         latest=5),
                 id="times numbers"),
])
def test_a_forged_chain_of_the_wrong_shape_is_unreadable_not_a_crash(
        world, shipped, change):
    body = digest_mod.parse(world.store.objects[digest_names(world)[0]])[0]
    attacker = keys.generate()
    body.update(chain=OTHER_CHAIN, public_key=keys.public_text(attacker))
    change(body)
    name = digest_mod.name("_digests/", OTHER_CHAIN, 0)
    world.store.put(name, digest_mod.sign(body, attacker))
    result = world.audit()
    assert kinds(result) == [("unreadable", name)]


def test_a_digest_that_cannot_be_read_is_unreadable(world, shipped):
    last = digest_names(world)[-1]

    def get(name):
        if name == last:
            raise OSError("timed out")
        return world.store.get(name)
    result = audit_mod.audit(world.store.listing(), get, world.store.head,
                             world.pinned, now=world.clock.datetime())
    assert ("unreadable", last) in kinds(result)


def test_a_digest_under_another_name_is_altered(world, shipped):
    first = digest_names(world)[0]
    chain = digest_mod.parse_name("_digests/", first)[0]
    moved = digest_mod.name("_digests/", chain, 3)
    world.store.put(moved, world.store.objects[first])
    result = world.audit()
    [finding] = [f for f in result.findings if f.name == moved]
    assert finding.kind == "altered"
    assert finding.message == "says it is seq 0 of chain %s" % chain


def test_an_object_under_the_digest_prefix_not_named_as_one_is_unknown(
        world, shipped):
    world.store.put("_digests/notes.txt", b"hello")
    assert kinds(world.audit()) == [("unknown", "_digests/notes.txt")]


def test_a_key_signing_two_places_is_a_fork(world, shipped):
    current = keys.load_private(world.private)
    last = digest_mod.parse(world.store.objects[digest_names(world)[-1]])[0]
    forged = dict(last, chain=OTHER_CHAIN, seq=0, previous=None,
                  public_key=keys.public_text(current),
                  next_public_key=keys.public_text(keys.generate()),
                  archives=[])
    name = digest_mod.name("_digests/", OTHER_CHAIN, 0)
    world.store.put(name, digest_mod.sign(forged, current))
    world.ship(shipped)
    world.digest(shipped)  # the real chain signs with that key too
    result = world.audit()
    real = digest_names(world)[3]
    assert [f.kind for f in result.findings] == ["fork"]
    assert result.findings[0].name in (name, real)
    assert result.failed


def test_prefix_and_is_archive_choose_the_archives(world, shipped):
    world.store.put("archives/x.events.index", b"index")
    world.store.put("other/x.events", b"other")
    result = world.audit(prefix="archives/", is_archive=lambda entry:
                         not entry["name"].endswith(".index"))
    assert result.findings == []


def test_every_finding_names_an_object(world, shipped):
    first, middle, last = digest_names(world)
    world.store.delete(world.shipped[0])
    world.store.put(world.shipped[5], b"forged")
    world.store.put("archives/forged.events", b"forged",
                    world.clock.datetime() - datetime.timedelta(seconds=400))
    world.store.delete(middle)
    names = set(world.store.objects) | {middle, world.shipped[0]}
    result = world.audit()
    objects = [f for f in result.findings
               if f.kind not in ("sequence-gap", "stream-gap")]
    assert {f.kind for f in objects} == {"missing", "changed", "inserted",
                                         "digest-missing", "unchecked"}
    assert {f.name for f in objects} <= names
    assert {f.name for f in result.findings} - names == {
        "run 0123456789ab", "queue q"}


def test_failed_is_whether_any_finding_is_a_failure():
    def audit(*findings):
        return audit_mod.Audit(list(findings), [])
    info = audit_mod.Finding("pending", "a", "later", failure=False)
    bad = audit_mod.Finding("missing", "b", "gone")
    assert not audit().failed
    assert not audit(info).failed
    assert audit(info, bad).failed
    assert bad.line() == "MISSING b: gone"


def test_sha256_of_stream():
    assert audit_mod.sha256_of_stream([b"a", b"", b"bc"]) == (
        3, hashlib.sha256(b"abc").hexdigest())


def test_the_digests_the_chain_writes_parse_as_json_lines(world, shipped):
    for name in digest_names(world):
        data = world.store.objects[name]
        assert json.loads(data)["body"]["format"] == digest_mod.FORMAT


def test_a_head_seen_before_and_gone_is_truncated(world, shipped):
    before = world.audit()
    [head] = [chain["head"] for chain in before.chains]
    expect = [audit_mod.parse_head(head)]
    assert failures(world.audit(expect=expect)) == []
    # the newest digest and what it listed deleted: nothing else shows it
    last = digest_names(world)[-1]
    body = digest_mod.parse(world.store.objects[last])[0]
    world.store.delete(last)
    for entry in body["archives"]:
        world.store.delete(entry["name"])
    assert failures(world.audit()) == []
    assert kinds(world.audit(expect=expect)) == [("truncated", last)]


def test_a_head_seen_before_with_other_bytes_is_altered(world, shipped):
    [head] = [chain["head"] for chain in world.audit().chains]
    chain, seq, _ = audit_mod.parse_head(head)
    expect = [(chain, seq, "0" * 64)]
    name = digest_mod.name(digest_mod.DEFAULT_PREFIX, chain, seq)
    assert kinds(world.audit(expect=expect)) == [("altered", name)]


@pytest.mark.parametrize("text", [
    "", "a:1", "%s:x:%s" % ("a" * 32, "b" * 64), "%s:1:%s" % ("a" * 31,
                                                            "b" * 64),
    "%s:1:%s" % ("a" * 32, "B" * 64), "%s:1:%s:1" % ("a" * 32, "b" * 64)])
def test_a_head_of_another_form_is_refused(text):
    with pytest.raises(ValueError, match="CHAIN:SEQ:SHA256"):
        audit_mod.parse_head(text)
