"""Tests for shoebox_worker.consume.envelope: unwrapping bodies, building
metadata."""

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from shoebox_worker import index
from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator

# The inner string keeps its own key order and spacing: the payload must be
# these bytes, not a re-serialisation of them.
INNER = ('{"message_id":  "m-1", "event_type": "compute.instance.create.end",'
         ' "priority": "INFO", "publisher_id": "compute.host1", '
         '"timestamp": "2026-01-02 03:04:05.678",\n "_context_request_id": '
         '"req-1", "payload": {"z": 1, "a": "\u00e9t\u00e9"}}')


def v2(inner, version="2.0"):
    return json.dumps({"oslo.version": version,
                       "oslo.message": inner}).encode()


class TestWrap:
    def test_round_trip(self):
        for note in simulator.notifications(500, seed=2):
            body = envelope.wrap(note)
            outer = json.loads(body.decode("utf-8"))
            assert set(outer) == {"oslo.version", "oslo.message"}
            assert outer["oslo.version"] == "2.0"
            assert json.loads(outer["oslo.message"]) == note
            parsed = envelope.parse(body)
            assert parsed.malformed is None and parsed.notification == note

    def test_json_text_is_kept_as_given(self):
        body = envelope.wrap(INNER.encode("utf-8"))
        assert envelope.wrap(INNER) == body
        assert envelope.parse(body).payload == INNER.encode("utf-8")
        assert body == orjson.dumps({"oslo.version": "2.0",
                                     "oslo.message": INNER})


class TestParse:
    def test_v2_payload_is_the_inner_string_as_received(self):
        parsed = envelope.parse(v2(INNER))
        assert parsed.malformed is None
        assert parsed.payload == INNER.encode("utf-8")
        assert parsed.notification == json.loads(INNER)

    def test_v2_with_non_ascii_outer_escapes(self):
        # the outer JSON escapes non-ASCII (ensure_ascii); the payload is
        # the decoded inner string in UTF-8
        body = json.dumps({"oslo.message": INNER, "oslo.version": "2.0"},
                          ensure_ascii=True).encode()
        assert b"\\u00e9" in body
        assert envelope.parse(body).payload == INNER.encode("utf-8")

    def test_v2_minor_version_accepted(self):
        assert envelope.parse(v2(INNER, "2.1")).malformed is None

    def test_v1_body_as_is(self):
        body = INNER.encode("utf-8")
        parsed = envelope.parse(body)
        assert parsed.malformed is None
        assert parsed.payload is body
        assert parsed.notification["message_id"] == "m-1"

    @pytest.mark.parametrize("body, reason", [
        (b"not json", "not JSON"),
        (b'{"a": 1', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": "\xc3"}', "not UTF-8"),
        (b"", "empty body"),
        (b"  \n\t", "empty body"),
        (b"[1, 2]", "not a JSON object"),
        (b"42", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 2000, "JSON nested too deep"),
        (b"[" * 2000 + b"]" * 2000, "JSON nested too deep"),
        (b'{"oslo.version": "2.0"}', "broken envelope: missing oslo.message"),
        (b'{"oslo.message": "{}"}', "broken envelope: missing oslo.version"),
        (v2("{}", "3.0"), "unknown envelope version '3.0'"),
        (b'{"oslo.version": 2, "oslo.message": "{}"}',
         "unknown envelope version 2"),
        (b'{"oslo.version": "2.0", "oslo.message": {"a": 1}}',
         "broken envelope: oslo.message is not a string"),
        (b'{"oslo.version": "2.0", "oslo.message": null}',
         "broken envelope: oslo.message is not a string"),
        (v2("nope"), "broken envelope: not JSON"),
        (v2(""), "broken envelope: empty body"),
        (v2("[1]"), "broken envelope: not a JSON object"),
        (v2('"s"'), "broken envelope: not a JSON object"),
        (v2("[" * 2000), "broken envelope: JSON nested too deep"),
        # a lone surrogate escaped inside the inner JSON text
        (v2('{"a": "\\ud800"}'), "broken envelope: not JSON"),
        # a lone surrogate in the oslo.message string itself: orjson
        # refuses the envelope already
        (b'{"oslo.version": "2.0", '
         b'"oslo.message": "{\\"a\\": \\"\\ud800\\"}"}', "not JSON"),
    ])
    def test_malformed_kept_verbatim_with_reason(self, body, reason):
        parsed = envelope.parse(body)
        assert parsed.malformed == reason
        assert parsed.payload is body
        assert parsed.notification is None

    def test_nesting_under_the_depth_limit_parses(self):
        assert envelope.parse(b"[" * 1000 + b"]" * 1000).malformed == \
            "not a JSON object"

    @settings(max_examples=300, deadline=None)
    @given(body=st.binary(max_size=300))
    def test_any_bytes_never_raise(self, body):
        parsed = envelope.parse(body)
        assert isinstance(parsed.payload, bytes)
        assert (parsed.malformed is None) == (parsed.notification is not None)
        if parsed.malformed is not None:
            assert parsed.payload == body

    @settings(max_examples=200, deadline=None)
    @given(inner=st.text(max_size=200), version=st.text(max_size=5))
    def test_any_envelope_never_raises(self, inner, version):
        body = json.dumps({"oslo.version": version, "oslo.message": inner})
        parsed = envelope.parse(body.encode())
        if parsed.malformed is None:
            assert parsed.payload == inner.encode("utf-8")
        else:
            assert parsed.payload == body.encode()

    @settings(max_examples=200, deadline=None)
    @given(notification=st.dictionaries(
        st.text(max_size=10),
        # orjson decodes integers beyond 64 bits as floats; the payload
        # bytes are stored as received either way
        st.recursive(st.none() | st.booleans() |
                     st.integers(-2**63, 2**64 - 1) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=3) |
                     st.dictionaries(st.text(max_size=5), children,
                                     max_size=3), max_leaves=10),
        max_size=5))
    def test_round_trip_of_any_v2_notification(self, notification):
        inner = json.dumps(notification, indent=1)
        parsed = envelope.parse(v2(inner))
        if "oslo.version" in notification or "oslo.message" in notification:
            return  # still a valid v2 envelope around it
        assert parsed.malformed is None
        assert parsed.payload == inner.encode("utf-8")
        assert parsed.notification == notification


class TestToBytes:
    def test_bytes_as_is(self):
        body = b"\xff raw"
        assert envelope.to_bytes(body) is body

    def test_str_in_its_encoding(self):
        assert envelope.to_bytes("\u00e9") == b"\xc3\xa9"
        assert envelope.to_bytes("\u00e9", "utf-8") == b"\xc3\xa9"
        assert envelope.to_bytes("\u00e9", "latin-1") == b"\xe9"

    def test_str_with_undecodable_bytes_round_trips(self):
        # a str carrying surrogate-escaped bytes goes back to those bytes
        body = b"\xff\xfe{}"
        text = body.decode("utf-8", "surrogateescape")
        assert envelope.to_bytes(text) == body

    def test_bytearray_and_memoryview(self):
        assert envelope.to_bytes(bytearray(b"ab")) == b"ab"
        assert envelope.to_bytes(memoryview(b"ab")) == b"ab"

    def test_decoded_json(self):
        assert orjson.loads(envelope.to_bytes({"a": [1]})) == {"a": [1]}


class TestMetadataExtractor:
    def test_standard_fields(self):
        metadata = envelope.MetadataExtractor()(
            envelope.parse(v2(INNER)), "notifications.info",
            "notifications.info", exchange="nova")
        assert metadata == {
            "event_type": "compute.instance.create.end",
            "message_id": "m-1",
            "timestamp": "2026-01-02 03:04:05.678",
            "publisher_id": "compute.host1",
            "priority": "INFO",
            "request_id": "req-1",
            "queue": "notifications.info",
            "routing_key": "notifications.info",
            "exchange": "nova",
        }
        assert all(isinstance(v, str) for v in metadata.values())

    def test_absent_standard_fields_are_left_out(self):
        parsed = envelope.parse(b'{"event_type": "x", "priority": null}')
        metadata = envelope.MetadataExtractor()(parsed, "q", None)
        assert metadata == {"event_type": "x", "queue": "q",
                            "routing_key": "", "exchange": ""}

    def test_non_string_standard_fields_become_json_text(self):
        parsed = envelope.parse(
            b'{"event_type": "x", "timestamp": 17, "priority": true}')
        metadata = envelope.MetadataExtractor()(parsed, "q", "rk")
        assert metadata["timestamp"] == "17"
        assert metadata["priority"] == "true"

    def test_dotted_paths(self):
        body = orjson.dumps({
            "event_type": "x",
            "payload": {"instance_id": "i-1", "count": 3, "flag": False,
                        "nested": {"deep": {"k": "v"}}, "list": [1, "a"],
                        "null": None, "text": "t"},
        })
        extract = envelope.MetadataExtractor([
            "payload.instance_id", "payload.count", "payload.flag",
            "payload.nested.deep", "payload.nested.deep.k", "payload.list",
            "payload.null", "payload.missing", "payload.text.sub",
            "payload.list.0", "nothing.at.all"])
        metadata = extract(envelope.parse(body), "q", "rk")
        assert metadata["payload.instance_id"] == "i-1"
        assert metadata["payload.count"] == "3"
        assert metadata["payload.flag"] == "false"
        assert metadata["payload.nested.deep"] == '{"k":"v"}'
        assert metadata["payload.nested.deep.k"] == "v"
        assert metadata["payload.list"] == '[1,"a"]'
        for missing in ("payload.null", "payload.missing",
                        "payload.text.sub", "payload.list.0",
                        "nothing.at.all"):
            assert missing not in metadata
        assert "malformed" not in metadata

    def test_static_metadata_added_to_every_record(self):
        extract = envelope.MetadataExtractor(
            static={"region": "dfw", "cell": "c1"})
        good = extract(envelope.parse(v2(INNER)), "q", "rk")
        bad = extract(envelope.parse(b"junk"), "q", "rk")
        for metadata in (good, bad):
            assert metadata["region"] == "dfw"
            assert metadata["cell"] == "c1"

    def test_malformed_takes_id_and_content_type_from_properties(self):
        extract = envelope.MetadataExtractor(["payload.x"])
        metadata = extract(envelope.parse(b"\xff junk"), "q", "rk", {
            "message_id": "amqp-id", "content_type": "application/json",
            "content_encoding": "utf-8", "delivery_mode": 2,
            "priority": 0})
        assert metadata == {
            "malformed": "not UTF-8", "message_id": "amqp-id",
            "content_type": "application/json",
            "content_encoding": "utf-8", "queue": "q", "routing_key": "rk",
            "exchange": ""}

    def test_malformed_without_properties(self):
        for properties in (None, {}, {"message_id": "", "content_type": None}):
            metadata = envelope.MetadataExtractor()(
                envelope.parse(b"[]"), "q", "rk", properties)
            assert metadata == {"malformed": "not a JSON object",
                                "queue": "q", "routing_key": "rk",
                                "exchange": ""}

    def test_exchange_for_malformed_and_default_exchange(self):
        extract = envelope.MetadataExtractor()
        assert extract(envelope.parse(b"junk"), "q", "rk",
                       exchange="glance")["exchange"] == "glance"
        # the default exchange ("") and a transport that does not tell
        for exchange in ("", None):
            assert extract(envelope.parse(v2(INNER)), "q", "rk",
                           exchange=exchange)["exchange"] == ""

    def test_properties_ignored_for_a_notification(self):
        metadata = envelope.MetadataExtractor()(
            envelope.parse(v2(INNER)), "q", "rk",
            {"message_id": "amqp-id", "content_type": "x"})
        assert metadata["message_id"] == "m-1"
        assert "content_type" not in metadata

    def test_no_event_type_is_flagged(self):
        parsed = envelope.parse(b'{"message_id": "m-2", "payload": {}}')
        assert parsed.malformed is None
        metadata = envelope.MetadataExtractor()(parsed, "q", "rk")
        assert metadata["malformed"] == "no event_type"
        assert metadata["message_id"] == "m-2"
        assert parsed.payload == b'{"message_id": "m-2", "payload": {}}'


def read_as_where_does(payload):
    """The payload's JSON object as --where reads it (orjson; json for
    what orjson refuses, but NaN/Infinity), or {}."""
    try:
        note = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            note = json.loads(payload.decode("utf-8"),
                              parse_constant=lambda name: {}[name])
        except (ValueError, KeyError, RecursionError):
            return {}
    return note if isinstance(note, dict) else {}


class TestUnwrapper:
    """The fast path gives what parse() + MetadataExtractor give."""

    FIELDS = ("payload.instance_id", "payload.tenant_id", "payload.nested",
              "payload.missing.deeper", "n")

    #: indexed: dotted keys (nova_object.data) and JSON values too
    INDEXED = FIELDS + ("payload.nova_object.data.uuid", "payload")

    def make(self):
        return envelope.Unwrapper(self.FIELDS, {"region": "r1"},
                                  index_fields=self.INDEXED)

    def reference(self, body, properties=None):
        parsed = envelope.parse(body)
        extract = envelope.MetadataExtractor(self.FIELDS, {"region": "r1"})
        # the values --where reads in the payload, a malformed one's too
        note = parsed.notification
        if note is None:
            note = read_as_where_does(parsed.payload)
        values = tuple(index.value_text(index.lookup(note, path.split(".")))
                       for path in self.INDEXED)
        return parsed.payload, extract(parsed, "q", "rk", properties,
                                       exchange="nova"), values

    def check(self, unwrap, body, properties=None):
        result = unwrap(body, "q", "rk", properties, exchange="nova")
        assert result == self.reference(body, properties)
        assert result[1]["exchange"] == "nova"

    def test_real_notifications_v1_and_v2(self):
        unwrap = self.make()
        for note in simulator.notifications(300, seed=3):
            note["payload"]["nested"] = {"a": [1, 2.5, None, "x"]}
            note["payload"]["nova_object.data"] = {"uuid": "u-1"}
            self.check(unwrap, envelope.wrap(note))
            self.check(unwrap, json.dumps(note).encode())

    def test_fast_path_is_taken_for_well_formed_bodies(self, monkeypatch):
        unwrap = self.make()
        monkeypatch.setattr(envelope, "parse", None)  # would fail if used
        note = next(simulator.notifications(1, seed=1))
        payload, metadata, values = unwrap(envelope.wrap(note), "q", "rk")
        assert metadata["event_type"] == note["event_type"]
        assert values[0] == note["payload"]["instance_id"]

    @pytest.mark.parametrize("body", [
        b"", b"  ", b"\xff\xfe", b"[1, 2]", b'"x"', b"12", b"null",
        b"{" * 3000, b"[" * 5000 + b"]" * 5000,
        b'{"n": 123456789012345678901234567890, "event_type": "e"}',
        b'{"oslo.version": "2.0"}', b'{"oslo.message": "{}"}',
        b'{"oslo.version": null, "oslo.message": "{}"}',
        b'{"oslo.version": "3.0", "oslo.message": "{}"}',
        b'{"oslo.version": 2, "oslo.message": "{}"}',
        b'{"oslo.version": "2.0", "oslo.message": 5}',
        b'{"oslo.version": "2.0", "oslo.message": "[1]"}',
        b'{"oslo.version": "2.0", "oslo.message": "not json"}',
        b'{"oslo.version": "2.0", "oslo.message": "{\\"a\\": \\"\\ud800\\"}"}',
        b'{"a": "\\ud800"}',
        # a byte order mark: simdjson takes it, orjson refuses it
        b'\xef\xbb\xbf{"event_type": "e"}',
        b'{"oslo.version": "2.0", "oslo.message": "\\ufeff{}"}',
        # read by json alone: indexed as --where reads it
        b'{"event_type": "e", "payload": {"instance_id": "i", "n": 1e400}}',
        b'{"oslo.message": "{}", "payload": {"instance_id": "i"}}',
        b'{"event_type": "\\u00e9\\ud83d\\ude00", "payload": {"x": 1}}',
    ])
    def test_odd_bodies(self, body):
        unwrap = self.make()
        props = {"message_id": "m1", "content_type": "text/plain"}
        self.check(unwrap, body, props)
        # and the parser is still usable afterwards
        self.check(unwrap, b'{"event_type": "e"}')

    def test_duplicate_keys_keep_the_payload(self):
        # JSON leaves duplicate keys undefined: simdjson reads the first,
        # orjson the last; the record's payload is the body either way
        body = b'{"event_type": "e", "event_type": "f"}'
        payload, metadata, _ = envelope.Unwrapper()(body, "q", "rk")
        assert payload == body
        assert metadata["event_type"] in ("e", "f")

    @settings(max_examples=300, deadline=None)
    @given(note=st.dictionaries(
        st.sampled_from(["event_type", "message_id", "timestamp",
                         "publisher_id", "priority", "_context_request_id",
                         "payload", "n", "oslo.version", "other"]),
        st.recursive(st.none() | st.booleans() |
                     st.integers(-2**70, 2**70) |
                     st.floats(allow_nan=False, allow_infinity=False) |
                     st.text(max_size=10),
                     lambda children: st.lists(children, max_size=3) |
                     st.dictionaries(st.sampled_from(
                         ["instance_id", "tenant_id", "nested", "missing",
                          "deeper"]), children, max_size=3),
                     max_leaves=8), max_size=6),
        wrap=st.booleans())
    def test_any_notification(self, note, wrap):
        unwrap = self.make()
        inner = json.dumps(note)
        body = v2(inner) if wrap else inner.encode()
        self.check(unwrap, body)


class TestBounded:
    """What a message copies into metadata (and so into logs) is bounded."""

    def test_huge_version_gives_a_short_reason(self):
        body = orjson.dumps({"oslo.version": "9" * 1_000_000,
                             "oslo.message": "{}"})
        reason = envelope.parse(body).malformed
        assert reason.startswith("unknown envelope version '999")
        assert len(reason) <= len("unknown envelope version ") + \
            envelope.MAX_SHOWN
        assert reason.endswith(envelope.ELLIPSIS)
        metadata = envelope.Unwrapper()(body, "q", "r")[1]
        assert metadata["malformed"] == reason

    def test_control_characters_are_escaped_in_reasons(self):
        body = orjson.dumps({"oslo.version": "1\n\x1b[31mred\x00",
                             "oslo.message": "{}"})
        reason = envelope.parse(body).malformed
        assert reason == "unknown envelope version '1\\n\\x1b[31mred\\x00'"
        assert not any(ord(c) < 32 for c in reason)

    def test_escapes_are_cut_too(self):
        body = orjson.dumps({"oslo.version": "\x00" * 150,
                             "oslo.message": "{}"})
        shown = envelope.parse(body).malformed[
            len("unknown envelope version "):]
        assert len(shown) == envelope.MAX_SHOWN
        assert shown.endswith(envelope.ELLIPSIS)

    @pytest.mark.parametrize("version, shown", [
        ([1, 2], "(a JSON array)"),
        ({"a": 1}, "(a JSON object)"),
        (1.5, "1.5"),
        (None, "None"),
        (True, "True"),
    ])
    def test_other_versions(self, version, shown):
        body = orjson.dumps({"oslo.version": version, "oslo.message": "{}"})
        assert envelope.parse(body).malformed == \
            "unknown envelope version " + shown

    @pytest.mark.parametrize("depth", [300, 1000])
    def test_deeply_nested_version_never_raises(self, depth):
        body = (b'{"oslo.version": ' + b"[" * depth + b"]" * depth +
                b', "oslo.message": "{}"}')
        assert envelope.parse(body).malformed == \
            "unknown envelope version (a JSON array)"
        assert envelope.Unwrapper()(body, "q", "r")[1]["malformed"] == \
            "unknown envelope version (a JSON array)"

    def test_huge_values_are_cut(self):
        note = {"event_type": "e" * 5000, "message_id": "m",
                "payload": {"big": list(range(3000))}}
        extract = envelope.MetadataExtractor(fields=["payload.big"])
        for metadata in (extract(envelope.parse(orjson.dumps(note)), "q",
                                 "r"),
                         envelope.Unwrapper(fields=["payload.big"])(
                             orjson.dumps(note), "q", "r")[1]):
            assert metadata["event_type"] == \
                "e" * (envelope.MAX_VALUE - 1) + envelope.ELLIPSIS
            assert len(metadata["payload.big"]) == envelope.MAX_VALUE
            assert metadata["payload.big"].startswith("[0,1,2,")
            assert metadata["message_id"] == "m"

    def test_values_at_the_limit_are_kept(self):
        value = "v" * envelope.MAX_VALUE
        note = orjson.dumps({"event_type": value})
        assert envelope.Unwrapper()(note, "q", "r")[1]["event_type"] == value

    def test_value_too_deep_to_write_back_never_raises(self):
        deep = b"[" * 300 + b"]" * 300
        body = b'{"event_type": ' + deep + b', "message_id": "m"}'
        for metadata in (
                envelope.MetadataExtractor()(envelope.parse(body), "q", "r"),
                envelope.Unwrapper()(body, "q", "r")[1]):
            assert metadata["event_type"] == envelope._TOO_DEEP
            assert metadata["message_id"] == "m"
