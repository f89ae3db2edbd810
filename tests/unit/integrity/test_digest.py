"""Tests for shoebox_worker.integrity.digest: a digest's bytes, signature
and name."""

import base64
import json

import pytest

from shoebox_worker.integrity import digest
from shoebox_worker.integrity import keys

CHAIN = "0123456789abcdef0123456789abcdef"


def body(**changes):
    """A digest body of the format, with ``changes``."""
    key, nxt = keys.generate(), keys.generate()
    value = {
        "format": digest.FORMAT, "chain": CHAIN, "seq": 3,
        "host": "host-12", "directory": "/var/lib/shoebox-worker",
        "created": "2026-12-07T00:05:00.000000Z",
        "range": {"from": "2026-12-07T00:00:00.000000Z",
                  "to": "2026-12-07T00:05:00.000000Z"},
        "previous": {"name": digest.name("_digests/", CHAIN, 2),
                     "sha256": "ab" * 32},
        "public_key": keys.public_text(key),
        "next_public_key": keys.public_text(nxt), "interval": 300,
        "final": False,
        "archives": [{"name": "a.events", "size": 10, "sha256": "cd" * 32,
                      "etag": "ef" * 16, "records": 2}],
    }
    value.update(changes)
    return value


def outer(body_value, signature=b"s" * 64):
    return json.dumps({"body": body_value, "signature": base64.b64encode(
        signature).decode() if isinstance(signature, bytes)
        else signature}).encode()


def parse_error(data):
    with pytest.raises(digest.DigestError) as info:
        digest.parse(data)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_sign_then_parse_gives_the_body_and_its_signature():
    key = keys.generate()
    value = body()
    data = digest.sign(value, key)
    parsed, signature = digest.parse(data)
    assert parsed == value
    assert len(signature) == 64
    assert digest.signed_by(parsed, signature, key.public_key())


def test_a_digest_is_one_line_of_json():
    data = digest.sign(body(), keys.generate())
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert set(json.loads(data)) == {"body", "signature"}


def test_signed_by_another_key_is_false():
    key = keys.generate()
    value = body()
    parsed, signature = digest.parse(digest.sign(value, key))
    assert not digest.signed_by(parsed, signature,
                                keys.generate().public_key())


def test_signed_by_is_false_for_a_body_changed_after_signing():
    key = keys.generate()
    parsed, signature = digest.parse(digest.sign(body(), key))
    parsed["archives"][0]["size"] += 1
    assert not digest.signed_by(parsed, signature, key.public_key())


def test_the_signature_is_over_the_canonical_bytes_of_the_body():
    key = keys.generate()
    value = body()
    _, signature = digest.parse(digest.sign(value, key))
    assert keys.verify(key.public_key(), signature, digest.canonical(value))


@pytest.mark.parametrize("data", [
    b"", b"not json", b"\xff\xfe{}", b"{\"body\": ",
])
def test_parse_refuses_what_is_not_json(data):
    assert parse_error(data).startswith("not JSON: ")


@pytest.mark.parametrize("value", [
    [], "text", 3, {"body": {}}, {"signature": ""},
    {"body": {}, "signature": "", "more": 1},
])
def test_parse_refuses_other_json(value):
    assert parse_error(json.dumps(value).encode()) == \
        "not {body, signature}"


@pytest.mark.parametrize("value", [
    "body", [], None, body(format="shoebox-digest/2"),
    {k: v for k, v in body().items() if k != "format"},
])
def test_parse_refuses_another_format(value):
    assert parse_error(outer(value)) == \
        "body is not of format shoebox-digest/1"


@pytest.mark.parametrize("signature", ["not base64!", "AAA", 7, None])
def test_parse_refuses_a_signature_not_in_base64(signature):
    assert parse_error(outer(body(), signature)) == \
        "signature is not base64"


@pytest.mark.parametrize("field", ["chain", "seq", "created", "public_key",
                                   "next_public_key", "archives",
                                   "interval"])
def test_parse_refuses_a_missing_field(field):
    value = body()
    del value[field]
    assert parse_error(outer(value)).startswith("field %r is missing" % field)


@pytest.mark.parametrize("field, value", [
    ("seq", True), ("interval", False), ("seq", "3"), ("seq", 3.0),
    ("interval", None), ("chain", 1), ("public_key", None),
    ("archives", {}), ("created", 0),
])
def test_parse_refuses_a_field_of_the_wrong_type(field, value):
    message = parse_error(outer(body(**{field: value})))
    assert message.startswith("field %r is missing or not a" % field)


@pytest.mark.parametrize("previous", [
    "name", [], {"name": "x"}, {"sha256": "x"}, {"name": 1, "sha256": "x"},
])
def test_parse_refuses_a_previous_that_is_not_name_and_sha256(previous):
    assert parse_error(outer(body(previous=previous))) == \
        "field 'previous' is not {name, sha256}"


def test_parse_takes_previous_null_on_the_first_digest():
    value = body(seq=0, previous=None)
    assert digest.parse(outer(value))[0] == value


@pytest.mark.parametrize("entry", [
    "a.events", {"size": 1}, {"name": "a", "size": "1"}, {"name": 1,
                                                        "size": 1},
    {"name": "a"},
])
def test_parse_refuses_an_archive_entry_without_name_or_size(entry):
    assert parse_error(outer(body(archives=[entry]))) == \
        "an archive entry has no name or size"


@pytest.mark.parametrize("field, value", [
    ("public_key", "garbage"), ("public_key", "ed25519:AAAA"),
    ("next_public_key", "ed25519:" + "A" * 43),
])
def test_parse_refuses_a_key_that_is_not_one(field, value):
    assert parse_error(outer(body(**{field: value}))) == \
        "field %r is not an ed25519: key" % field


@pytest.mark.parametrize("changes", [
    {"created": "yesterday"}, {"created": ""}, {"range": None},
    {"range": {"from": "2026-12-07T00:00:00Z"}},
    {"range": {"from": 5, "to": "2026-12-07T00:00:00Z"}},
    {"range": {"from": "2026-12-07T00:00:00Z", "to": "later"}},
])
def test_parse_refuses_times_that_are_not_times(changes):
    value = body(**changes)
    if "range" in changes and changes["range"] is None:
        del value["range"]
    assert parse_error(outer(value)) == \
        "field 'created' or 'range' is not a time"


@pytest.mark.parametrize("start", ["a first start", [], 1])
def test_parse_refuses_a_start_that_is_not_an_object(start):
    assert parse_error(outer(body(start=start))) == \
        "field 'start' is not an object"


@pytest.mark.parametrize("changes", [
    {"earliest": 5}, {"latest": []}, {"run": ["0123456789ab"]},
    {"run": 7}, {"sequence": "7"}, {"offsets": [1, 2]},
    {"offsets": {"q": 5}}, {"offsets": {"q": [1]}},
    {"offsets": {"q": [1, "2"]}},
])
def test_parse_refuses_an_entry_field_of_the_wrong_type(changes):
    value = body()
    value["archives"][0].update(changes)
    assert parse_error(outer(value)) == \
        "the entry of 'a.events' has a field of the wrong type"


def test_parse_takes_every_optional_entry_field_of_its_type():
    value = body()
    value["archives"].append({
        "name": "b.events", "size": 0, "earliest": None, "latest": None,
        "run": "0123456789ab", "sequence": 3, "offsets": {"q": [1, 9]}})
    assert digest.parse(outer(value))[0] == value


def test_canonical_does_not_depend_on_key_order():
    one = {"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": None}}
    two = {"a": {"x": None, "y": [1, {"c": 3, "d": 2}]}, "b": 1}
    assert digest.canonical(one) == digest.canonical(two)
    assert digest.canonical(one) == \
        b'{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}'


def test_canonical_is_ascii_and_refuses_nan():
    assert digest.canonical({"h": "h\u00e9"}) == b'{"h":"h\\u00e9"}'
    with pytest.raises(ValueError):
        digest.canonical({"n": float("nan")})


def test_name_and_parse_name_round_trip():
    name = digest.name("_digests/", CHAIN, 42)
    assert name == "_digests/%s/000000000042.json" % CHAIN
    assert digest.parse_name("_digests/", name) == (CHAIN, 42)
    assert digest.parse_name("", digest.name("", CHAIN, 0)) == (CHAIN, 0)


@pytest.mark.parametrize("obj", [
    "other/%s/000000000042.json" % CHAIN,
    "_digests/%s/000000000042.json" % CHAIN.upper(),
    "_digests/%s/000000000042.json" % CHAIN[:-1],
    "_digests/%s0/000000000042.json" % CHAIN,
    "_digests/%s/42.json" % CHAIN,
    "_digests/%s/000000000042.json.tmp" % CHAIN,
    "_digests/%s/000000000042.txt" % CHAIN,
    "_digests/x/%s/000000000042.json" % CHAIN,
    "_digests/", "shoebox_20261207T000000_host-12.events",
])
def test_parse_name_refuses_other_names(obj):
    assert digest.parse_name("_digests/", obj) is None


def test_sha256_is_hex_of_the_bytes():
    assert digest.sha256(b"abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a"
                                     "396177a9cb410ff61f20015ad")
