"""Tests for shoebox_worker.tools.select: the selection options, what a
record must be to be kept, and which archives may hold one."""

import argparse
import dataclasses
import datetime
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from shoebox_worker import archive
from shoebox_worker import exceptions
from shoebox_worker import index
from shoebox_worker import period_bundle
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker import timestamps
from shoebox_worker.consume import envelope
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import select
from shoebox_worker.tools import sources

UTC = datetime.UTC


def at(text):
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def selection(*argv, load_index=None):
    parser = argparse.ArgumentParser()
    select.add_arguments(parser)
    return select.from_args(parser.parse_args(list(argv)),
                            load_index=load_index)


def record(ts=None, message_id=None, event_type="compute.instance.exists",
           **note):
    metadata = {"event_type": event_type}
    if ts is not None:
        metadata["timestamp"] = ts
    if message_id is not None:
        metadata["message_id"] = message_id
    return metadata, json.dumps({"event_type": event_type, **note}).encode()


# -- the options --------------------------------------------------------------

class TestWhen:
    NOW = datetime.datetime(2024, 3, 9, 12, tzinfo=UTC)

    @pytest.mark.parametrize("text, back", [
        ("30m", datetime.timedelta(minutes=30)),
        ("2h", datetime.timedelta(hours=2)),
        ("7d", datetime.timedelta(days=7)),
        ("2w", datetime.timedelta(weeks=2)),
        ("45s", datetime.timedelta(seconds=45))])
    def test_relative_is_back_from_now(self, text, back):
        assert select.parse_when(text, now=self.NOW) == self.NOW - back

    def test_relative_without_now_is_from_the_clock(self):
        before = datetime.datetime.now(UTC)
        moment = select.parse_when("1h")
        after = datetime.datetime.now(UTC)
        hour = datetime.timedelta(hours=1)
        assert before - hour <= moment <= after - hour

    @pytest.mark.parametrize("text, expected", [
        ("2024-03-01T12:00:00", "2024-03-01T12:00:00"),
        ("2024-03-01 12:00:00.5", "2024-03-01T12:00:00.500000"),
        ("2024-03-01T12:00:00+01:00", "2024-03-01T11:00:00"),
        ("2024-03-01T12:00:00Z", "2024-03-01T12:00:00"),
        ("2024-03-01", "2024-03-01T00:00:00")])
    def test_iso_naive_is_utc(self, text, expected):
        assert select.parse_when(text) == at(expected)

    @pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "",
                                      "2024-13-01", "3m2"])
    def test_refused(self, text):
        with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
            select.parse_when(text)

    def test_too_far_back(self):
        with pytest.raises(argparse.ArgumentTypeError, match="too far"):
            select.parse_when("99999999999w")

    def test_since_must_be_before_until(self):
        with pytest.raises(ToolError, match="--since .* before --until"):
            selection("--since", "2024-03-02", "--until", "2024-03-01")
        with pytest.raises(ToolError):
            selection("--since", "2024-03-01", "--until", "2024-03-01")
        assert isinstance(ToolError("x"), exceptions.ShoeboxError)


class TestMatchAndWhereOptions:
    def test_parse_match(self):
        key, match = select.parse_match("event_type=compute.*")
        assert key == "event_type"
        assert match("compute.instance.exists")
        assert not match("scheduler.run")
        key, match = select.parse_match("a=b=c")
        assert key == "a" and match("b=c")

    @pytest.mark.parametrize("text", ["noequals", "=glob"])
    def test_match_refused(self, text):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=GLOB"):
            select.parse_match(text)

    def test_parse_where(self):
        path, glob, test = select.parse_where("payload.instance_id=2f50*")
        assert (path, glob) == ("payload.instance_id", "2f50*")
        assert test("2f50-aa") and not test("x2f50")

    @pytest.mark.parametrize("text", ["noequals", "=x", "a..b=x", ".a=x",
                                      "a.=x"])
    def test_where_refused(self, text):
        with pytest.raises(argparse.ArgumentTypeError, match="PATH=GLOB"):
            select.parse_where(text)

    def test_the_command_line_refuses_with_usage(self):
        for argv in (["--where", "nope"], ["--since", "soon"],
                     ["--match", "x"]):
            with pytest.raises(SystemExit):
                selection(*argv)


# -- keeping records ----------------------------------------------------------

class TestKeep:
    def test_nothing_given_keeps_everything(self):
        chosen = selection()
        assert not chosen.active and not chosen.windowed
        assert chosen.keep({}, b"not json")

    def test_window_is_half_open(self):
        chosen = selection("--since", "2024-03-09T10:00:00",
                           "--until", "2024-03-09T11:00:00")
        assert chosen.active and chosen.windowed
        kept = [ts for ts in ("2024-03-09 09:59:59.999999",
                              "2024-03-09 10:00:00", "2024-03-09 10:30:00",
                              "2024-03-09T11:30:00+01:00",  # 10:30 UTC
                              "2024-03-09 10:59:59.999999",
                              "2024-03-09 11:00:00")
                if chosen.keep(*record(ts))]
        assert kept == ["2024-03-09 10:00:00", "2024-03-09 10:30:00",
                        "2024-03-09T11:30:00+01:00",
                        "2024-03-09 10:59:59.999999"]
        assert chosen.untimed == 0

    def test_only_since_or_only_until(self):
        since = selection("--since", "2024-03-09T10:00:00")
        until = selection("--until", "2024-03-09T10:00:00")
        early, late = record("2024-03-09 09:00:00"), record("2024-03-09 "
                                                             "10:00:00")
        assert (since.keep(*early), since.keep(*late)) == (False, True)
        assert (until.keep(*early), until.keep(*late)) == (True, False)

    def test_a_record_without_a_usable_time_is_left_out_and_counted(self):
        chosen = selection("--since", "2020-01-01")
        for ts in (None, "garbage", "1960-01-01"):
            assert not chosen.keep(*record(ts))
        assert chosen.untimed == 3
        assert chosen.notes() == [
            "3 records without a usable timestamp left out by "
            "--since/--until"]
        # without a window they are kept and not counted
        anyway = selection("--match", "event_type=*")
        assert anyway.keep(*record("garbage")) and anyway.untimed == 0

    def test_where_on_the_notifications_json(self):
        chosen = selection("--where", "payload.instance_id=2f50*",
                           "--where", "_context_project_id=884691")
        yes = record(payload={"instance_id": "2f50-1"},
                     _context_project_id=884691)
        assert chosen.keep(*yes)
        assert not chosen.keep(*record(payload={"instance_id": "2f50-1"},
                                       _context_project_id=1))
        assert not chosen.keep(*record(payload={"instance_id": "aa"},
                                       _context_project_id=884691))
        # a missing path never matches, not even a glob of everything
        assert not selection("--where", "payload.nope=*").keep(*yes)
        # nor a null (the index holds none: it must not prune what matched)
        assert not selection("--where", "v=*").keep({}, b'{"v": null}')
        assert not selection("--where", "v=null").keep({}, b'{"v": null}')
        assert not selection("--where", "payload.instance_id.x=*").keep(*yes)
        # and a payload that is no JSON object matches no --where
        for payload in (b"not json", b"[1, 2]", b'"text"'):
            assert not selection("--where", "a=*").keep({}, payload)

    @pytest.mark.parametrize("value, glob", [
        (884691, "884691"), (884691, "8846*"), (True, "true"),
        (False, "false"), (1.5, "1.5"),
        ({"a": [1, 2]}, '{"a":[[]1,2]}'), ([1, "x"], '[[]1,"x"]')])
    def test_values_compare_as_json_text(self, value, glob):
        payload = json.dumps({"v": value}).encode()
        assert selection("--where", "v=" + glob).keep({}, payload)
        assert not selection("--where", "v=x" + glob).keep({}, payload)

    def test_a_key_holding_dots_is_found_as_the_index_finds_it(self):
        payload = json.dumps({"payload": {"nova_object.data": {
            "uuid": "2f50"}}}).encode()
        assert selection("--where", "payload.nova_object.data.uuid=2f50") \
            .keep({}, payload)

    def test_json_that_orjson_refuses_is_still_json(self):
        payload = b'{"id": "x-\\ud800", "n": 5}'  # a lone surrogate escape
        assert selection("--where", "n=5", "--where", "id=x-*").keep(
            {}, payload)

    PAYLOADS = [
        b'{"v": "2f50-abc"}', b'{"v": "\\u0032f50-abc"}',  # escaped: "2f50"
        b'{"v": "caf\xc3\xa9-1"}', b'{"v": "caf\\u00e9-1"}',
        b'{"v": true}', b'{"v": false}', b'{"v": null}', b'{"v": 1e400}',
        b'{"v": 8.84691e5}', b'{"v": 884691}', b'{"v": {"k": "2f50-abc"}}',
        b'{"v": ["caf\xc3\xa9-1", 2]}', b'{"2f50-abc": 1, "v": "x"}',
        b'{"v": "a/b"}', b'{"v": "a\\/b"}', b'not json 2f50-abc', b"[]"]
    GLOBS = ["2f50-abc", "2f50*", "*-abc", "caf\u00e9-1", "caf\u00e9*",
             "true", "tru*", "false", "null", "nul?", "884691", "884691.0",
             '{"k":"2f50-abc"}', "*2f50-abc*", "a/b", "x", "*", "?"]

    def test_skipping_the_parse_never_changes_the_answer(self, monkeypatch):
        with_needles = [[selection("--where", "v=" + glob).keep({}, p)
                         for p in self.PAYLOADS] for glob in self.GLOBS]
        monkeypatch.setattr(select, "_needle", lambda glob: None)
        parsed = [[selection("--where", "v=" + glob).keep({}, p)
                   for p in self.PAYLOADS] for glob in self.GLOBS]
        assert with_needles == parsed
        assert any(any(row) for row in parsed)  # some match at all
        # escaped "2f50" and "café" match, found by the parse
        assert parsed[0][:2] == [True, True] and parsed[3][2:4] == [True,
                                                                    True]

    @pytest.mark.parametrize("glob, needle", [
        ("2f50-abc", b"2f50-abc"), ("*-instance-*", b"-instance-"),
        ("caf\u00e9*", "caf\u00e9".encode()), ("true", b"true"),
        ("884691", None), ("1.5e3", None), ("null", None), ("nu*", None),
        ("ab", None), ("a[bc]def", None), ('{"a":1}', None), ("a,bcd", None),
        ("x\\y*", None)])
    def test_needles(self, glob, needle):
        assert select._needle(glob) == needle

    def test_where_parses_the_payload_once_and_only_when_given(
            self, monkeypatch):
        calls = []
        real = select._notification

        def counting(payload):
            calls.append(payload)
            return real(payload)

        monkeypatch.setattr(select, "_notification", counting)
        metadata, payload = record(message_id="m1", a=1, b=2)
        assert selection("--match", "event_type=*", "--since",
                         "2020-01-01").keep({**metadata,
                                             "timestamp": "2024-01-01"},
                                            payload)
        assert calls == []
        assert selection("--where", "a=1", "--where", "b=2",
                         "--dedup").keep(metadata, payload)
        assert calls == [payload]

    def test_dedup_by_message_id(self):
        chosen = selection("--dedup")
        got = [chosen.keep(*record(message_id=m))
               for m in ("a", "b", "a", None, None, "b", "c")]
        assert got == [True, True, False, True, True, False, True]
        assert chosen.duplicates == 2
        assert chosen.notes() == ["2 duplicates dropped by --dedup"]

    def test_dedup_falls_back_to_the_notifications_message_id(self):
        chosen = selection("--dedup")
        v1 = ({}, json.dumps({"message_id": "x"}).encode())  # no metadata
        assert chosen.keep(*v1)
        assert not chosen.keep(*v1)
        assert not chosen.keep({"message_id": "x"}, b"not json")
        assert chosen.keep({}, b'{"message_id": 7}')  # not an id: kept
        assert chosen.keep({}, b'{"message_id": 7}')

    def test_dedup_counts_only_what_was_output(self):
        chosen = selection("--dedup", "--match", "event_type=*.exists")
        assert not chosen.keep(*record(message_id="a", event_type="x.update"))
        assert chosen.keep(*record(message_id="a"))  # first output
        assert chosen.duplicates == 0

    def test_options_named_for_messages(self):
        assert selection("--match", "a=b", "--until", "2h",
                         "--dedup").options() == "--match, --until, --dedup"


# -- pruning archives ---------------------------------------------------------

@dataclasses.dataclass
class FakeItem:
    """An archive as sources' Item shows it (name, meta, index, whether
    the index is bound to it)."""

    name: str
    meta: dict | None = None
    index_name: str | None = None
    index: bytes | None = None
    problem: str | None = None  # binding_problem's answer
    reads: int = 0
    checks: int = 0

    def read_index(self):
        self.reads += 1
        return self.index

    def binding_problem(self, found):
        self.checks += 1
        if isinstance(self.problem, OSError):
            raise self.problem
        return self.problem

    @property
    def index_label(self):
        return self.index_name


class TimeIndex:
    """An index of no field that says its archive's time range."""

    fields = ()

    def __init__(self, data, name=None):
        earliest, _, latest = data.decode().partition(",")
        self.earliest, self.latest = earliest or None, latest or None

    def may_contain(self, field, value):
        return True


def item(earliest=None, latest=None, name="o", **more):
    """An archive whose (bound) index says this time range."""
    data = ("%s,%s" % (earliest or "", latest or "")).encode()
    more.setdefault("index_name", name + ".index")
    more.setdefault("index", data)
    return FakeItem(name, {}, **more)


class TestMayHold:
    WINDOW = ("--since", "2024-03-09T10:00:00", "--until",
              "2024-03-09T11:00:00")

    @pytest.mark.parametrize("earliest, latest, expected", [
        ("2024-03-09T08:00:00.000000Z", "2024-03-09T09:59:59.999999Z", False),
        ("2024-03-09T08:00:00.000000Z", "2024-03-09T10:00:00.000000Z", True),
        ("2024-03-09T10:30:00.000000Z", "2024-03-09T10:40:00.000000Z", True),
        ("2024-03-09T10:59:59.999999Z", "2024-03-09T12:00:00.000000Z", True),
        ("2024-03-09T11:00:00.000000Z", "2024-03-09T12:00:00.000000Z", False),
        ("2024-03-09T08:00:00.000000Z", "2024-03-09T12:00:00.000000Z", True),
    ])
    def test_the_time_range_against_the_window(self, earliest, latest,
                                               expected):
        assert selection(*self.WINDOW, load_index=TimeIndex).may_hold(
            item(earliest, latest)) is expected

    @pytest.mark.parametrize("earliest, latest", [
        (None, None), ("2024-03-09T08:00:00.000000Z", None),
        (None, "2024-03-09T08:00:00.000000Z"), ("garbage", "garbage"),
        # not a range (latest before earliest): proves nothing
        ("2024-03-09T12:00:00.000000Z", "2024-03-09T08:00:00.000000Z")])
    def test_unknown_is_true(self, earliest, latest):
        assert selection(*self.WINDOW, load_index=TimeIndex).may_hold(
            item(earliest, latest))

    def test_object_time_metadata_alone_prunes_nothing(self):
        # a POST sets it without changing the object: bound to nothing
        forged = FakeItem("o", {
            "earliest-timestamp": "2000-01-01T00:00:00.000000Z",
            "latest-timestamp": "2000-01-01T00:00:00.000000Z"})
        assert selection(*self.WINDOW, load_index=TimeIndex).may_hold(forged)

    def test_without_a_window_every_archive_may_hold(self):
        old = item("2000-01-01T00:00:00.000000Z", "2000-01-01T00:00:00Z")
        assert selection("--match", "a=b", load_index=TimeIndex).may_hold(
            old)
        assert selection(load_index=TimeIndex).may_hold(old)
        assert old.reads == 0

    @pytest.mark.parametrize("problem", [
        "index bound to the archive with ETag a, not b",
        OSError(5, "Input/output error")])
    def test_an_index_not_bound_to_its_archive_prunes_nothing(self,
                                                             problem):
        said = []
        old = item("2000-01-01T00:00:00.000000Z",
                   "2000-01-01T00:00:00.000000Z", problem=problem)
        chosen = selection(*self.WINDOW, load_index=TimeIndex)
        assert chosen.may_hold(old, on_unused=lambda i, e: said.append(
            (i, str(e))))
        assert [i for i, _ in said] == [old]  # one line
        assert str(problem) in said[0][1]
        if isinstance(problem, str):
            assert said[0][1].startswith("o.index: ")

    def test_the_binding_is_checked_only_to_prune(self):
        inside = item("2024-03-09T10:00:00.000000Z",
                      "2024-03-09T10:30:00.000000Z", problem="not bound")
        chosen = selection(*self.WINDOW, load_index=TimeIndex)
        assert chosen.may_hold(inside, on_unused=pytest.fail)
        assert inside.checks == 0

    def test_late_records_are_found(self):
        # written in this order; the middle one holds records archived
        # late (a backlog drained after an outage): older than both its
        # neighbours. Pruning by write order or by the first record's time
        # (what object_prefix gives) would skip it.
        archives = [
            item("2024-03-09T09:00:00.000000Z", "2024-03-09T09:59:00.000000Z",
                 name="a"),
            item("2024-03-09T06:10:00.000000Z", "2024-03-09T10:05:00.000000Z",
                 name="late"),
            item("2024-03-09T11:00:00.000000Z", "2024-03-09T11:59:00.000000Z",
                 name="c")]
        chosen = selection("--since", "2024-03-09T06:00:00", "--until",
                           "2024-03-09T07:00:00", load_index=TimeIndex)
        assert [a.name for a in archives if chosen.may_hold(a)] == ["late"]
        chosen = selection("--since", "2024-03-09T10:00:00", "--until",
                           "2024-03-09T10:30:00", load_index=TimeIndex)
        assert [a.name for a in archives if chosen.may_hold(a)] == ["late"]

    def test_an_exact_where_asks_the_index(self):
        class FakeIndex:
            fields = ("payload.instance_id",)
            earliest = latest = None

            def __init__(self, data):
                self.values = set(data.decode().split(","))

            def may_contain(self, field, value):
                return value in self.values

        def load(data, name):
            if data == b"damaged":
                raise exceptions.ShoeboxError("damaged index")
            return FakeIndex(data)

        chosen = selection("--where", "payload.instance_id=i-1",
                           load_index=load)
        assert chosen.exact == [("payload.instance_id", "i-1")]
        assert chosen.may_hold(item(index_name="o.index", index=b"i-1,i-2"))
        assert not chosen.may_hold(item(index_name="o.index", index=b"i-3"))
        assert chosen.may_hold(item(index_name="o.index", index=b"damaged"))
        assert chosen.may_hold(item(index_name=None))  # no index: unknown
        # a glob, or a field the index does not hold, is not looked up
        for argv in (["--where", "payload.instance_id=i-*"],
                     ["--where", "payload.user_id=u"]):
            lookup = item(index_name="o.index", index=b"i-3")
            assert selection(*argv, load_index=load).may_hold(lookup)
        glob = item(index_name="o.index", index=b"i-3")
        selection("--where", "payload.instance_id=i-*",
                  load_index=load).may_hold(glob)
        assert glob.reads == 0

    def test_the_index_time_range_prunes_too(self):
        class FakeIndex:
            fields = ()
            earliest = "2024-03-09T08:00:00.000000Z"
            latest = "2024-03-09T08:30:00.000000Z"

            def may_contain(self, field, value):
                return True

        chosen = selection(*self.WINDOW,
                           load_index=lambda data, name: FakeIndex())
        assert not chosen.may_hold(item(index_name="o.index", index=b"x"))


# -- the index and --where agree ----------------------------------------------

_VALUES = st.one_of(
    st.text(max_size=8), st.integers(),
    st.booleans(), st.none(), st.floats(allow_nan=False,
                                        allow_infinity=False),
    st.integers(min_value=2 ** 63, max_value=2 ** 70),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=2))


class _Archive:
    """An item whose index is the given bytes."""

    meta = {}
    index_name = index_label = "x.index"

    def __init__(self, data):
        self._data = data

    def read_index(self):
        return self._data

    def binding_problem(self, found):
        return None  # bound: the index alone decides


@settings(max_examples=150, deadline=None)
@given(st.lists(_VALUES, min_size=1, max_size=5),
       st.sampled_from(["payload.instance_id",
                        "payload.nova_object.data.uuid"]),
       st.booleans())
def test_an_exact_where_that_selects_a_record_is_never_pruned(
        values, field, other_keys):
    # the index the worker writes (its own envelope parse) against what
    # --where selects in the records it wrote: for every value a record
    # holds, the archive may hold it
    unwrap = envelope.Unwrapper(index_fields=(field,))
    builder = index.Builder((field,))
    written = []
    for value in values:
        inner = {"uuid": value, "x": 1} if other_keys else {"uuid": value}
        payload = ({"nova_object.data": inner} if "nova_object" in field
                   else {"instance_id": value})
        body = envelope.wrap(json.dumps({"event_type": "e",
                                         "payload": payload,
                                         "message_id": "m"}))
        record_payload, metadata, found = unwrap(body, "q", "rk")
        builder.add(metadata.get("timestamp"), found)
        written.append((metadata, record_payload))
    data = builder.to_bytes()
    for metadata, payload in written:
        value = index.lookup(select._notification(payload), field.split("."))
        if value is None:
            continue  # matches no --where: nothing to find
        text = select.value_text(value)
        if set(text) & set("*?["):
            continue  # a glob: never pruned by the index
        chosen = selection("--where", "%s=%s" % (field, text),
                           load_index=index.Index.from_bytes)
        assert chosen.keep(metadata, payload), text
        assert chosen.may_hold(_Archive(data)), text


# -- a key that no record has: one warning -----------------------------------

class TestKeysFoundInNoRecord:
    def test_a_misspelled_match_key_is_said_once(self):
        chosen = selection("--match", "event-type=compute.*")
        kept = [chosen.keep(*record(message_id=str(n))) for n in range(5)]
        assert kept == [False] * 5
        assert chosen.notes() == [
            "--match event-type: no record read has the key 'event-type' in "
            "its metadata (5 read): a misspelled key finds nothing (did you "
            "mean event_type?)"]

    def test_a_misspelled_where_path_is_said_once(self):
        chosen = selection("--where", "payload.instanceid=2f50*")
        for _ in range(3):
            assert not chosen.keep(*record(payload={"instance_id": "2f50"}))
        assert chosen.notes() == [
            "--where payload.instanceid: no record read has a value at "
            "'payload.instanceid' in its notification (3 read): a "
            "misspelled key finds nothing"]

    def test_keys_that_some_record_has_are_not_said(self):
        chosen = selection("--where", "payload.instance_id=nope",
                           "--match", "message_id=nope")
        records = [record(), record(payload={"instance_id": "2f50"}),
                   record(message_id="m1")]
        assert [chosen.keep(*r) for r in records] == [False] * 3
        assert chosen.notes() == []
        # once every key was seen, nothing more is looked for
        assert chosen.unseen == {} and chosen.looked_at == 3

    def test_nothing_read_nothing_said(self):
        assert selection("--match", "nope=x").notes() == []

    def test_a_key_in_an_escaped_payload_is_found(self):
        chosen = selection("--where", "payload.na\u00efve=x")
        metadata = {"event_type": "e"}
        payload = b'{"payload": {"na\\u00efve": "y"}}'
        assert not chosen.keep(metadata, payload)
        assert chosen.notes() == []


# -- issue 20: what --where/--since selects, the index never prunes -----------

#: Texts of JSON values, hostile ones among them: what only json reads (a
#: lone surrogate escape, a number past a double, an integer past 64
#: bits), escapes, nesting.
_VALUE_TEXTS = st.one_of(
    st.sampled_from(['"AAA"', '"BBB"', '"\\ud800"', '"B\\u0042B"', "1e400",
                     "-1e400", "123456789012345678901234567890", "-0",
                     "1.0", "1E2", "true", "null", '"\\/x"', "[1, \"a\"]",
                     '{"a": {"b": 1}}', '"\\u00e9"', '""', "0.1e-400"]),
    st.text(max_size=6).map(json.dumps),
    st.integers(-2 ** 70, 2 ** 70).map(str))
#: The keys of a payload, repeated ones and escaped ones among them.
_KEYS = st.sampled_from(['"instance_id"', '"instance\\u005fid"',
                         '"nova_object.data"', '"nova_object"', '"x"'])


def _object(pairs):
    return "{" + ", ".join("%s: %s" % pair for pair in pairs) + "}"


@st.composite
def _payloads(draw):
    """A payload object's JSON text: keys may repeat, a nova_object may
    nest one, values are hostile."""
    pairs = []
    for key in draw(st.lists(_KEYS, max_size=4)):
        if "nova_object" in key:
            inner = [('"uuid"', draw(_VALUE_TEXTS))
                     for _ in range(draw(st.integers(1, 2)))]
            value = _object(inner)
            if key == '"nova_object"':
                value = _object([('"data"', value)])
        else:
            value = draw(_VALUE_TEXTS)
        pairs.append((key, value))
    return _object(pairs)


#: Timestamps in every form timestamps.py reads, and some it does not.
_STAMPS = st.one_of(
    st.builds(
        lambda moment, sep, digits, zone: (
            moment.strftime("%Y-%m-%d" + sep + "%H:%M:%S")
            + (("." + moment.strftime("%f")[:digits]) if digits else "")
            + zone),
        st.datetimes(datetime.datetime(1970, 1, 2),
                     datetime.datetime(2999, 12, 30)),
        st.sampled_from([" ", "T"]), st.integers(0, 6),
        st.sampled_from(["", "Z", "+00:00", "-12:00", "+0530", "-1200",
                         "+14:00", "-00:30"])),
    st.sampled_from(["2024-03-01 12:00:00.1-1200", "2024-03-01",
                     "2024-02-30 12:00:00.000000", " 2024-03-01 12:00:00 ",
                     "yesterday", "", "2024-03-01 12:00:00.000000+"]),
    st.text(max_size=30), st.none())


@st.composite
def _bodies(draw):
    """A message body as the worker takes it: v1, v2, or broken."""
    stamp = draw(_STAMPS)
    head = [('"event_type"', '"e"'), ('"message_id"', '"m"')]
    if stamp is not None:
        head.append(('"timestamp"', json.dumps(stamp)))
    text = _object(head + [('"payload"', draw(_payloads()))])
    shape = draw(st.sampled_from(["v1", "v2", "v2", "envelope without "
                                  "version", "bom"]))
    if shape == "v2":
        return envelope.wrap(text)
    if shape == "envelope without version":  # malformed, read as it is
        return _object([('"oslo.message"', json.dumps(text))] + head + [
            ('"payload"', draw(_payloads()))]).encode()
    if shape == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    return text.encode()


def _items(path):
    """The archive at ``path`` as a local read and a Swift read see it:
    its index bound to it as the shipper binds the file beside it and as
    the swift step binds what it uploads (the listing's hash and bytes).
    Both bindings must hold: an unbound index prunes nothing, and the
    test would then show nothing."""
    assert index.bind_file(path)
    with open(index.sidecar(path), "rb") as f:
        data = f.read()
    local = sources.FileItem(path)
    remote = sources.SwiftItem(None, "c", "o", size=os.path.getsize(path),
                               etag=index.etag_of_file(path),
                               index_name="o.index", index_data=data)
    for item in (local, remote):
        assert item.binding_problem(index.Index.from_bytes(data)) is None
    return (local, remote) + _bundled(path)


def _bundled(path):
    """The archive as a reader of period bundles sees it: its entry in
    each of the four parts of a bundle that ``index-bundle --per`` makes
    of it (its records read as the bundler reads them), bound to it."""
    size, etag = os.path.getsize(path), index.etag_of_file(path)
    with archive.ArchiveReader(path) as reader:
        summary = period_bundle.Summary.of_records(
            "o", etag, size, reader, index.DEFAULT_FIELDS)
    items = []
    for _, _, data in period_bundle.build_parts(
            "2026-01", index.DEFAULT_FIELDS, [summary], parts=4):
        entry = period_bundle.Part.from_bytes(data).entries[("o", etag)]
        item = sources.SwiftItem(None, "c", "o", size=size, etag=etag,
                                 summary=entry)
        assert item.binding_problem(entry) is None
        items.append(item)
    return tuple(items)


@pytest.mark.slow  # about 10 s: started first (tests/conftest.py)
@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(bodies=st.lists(_bodies(), min_size=1, max_size=4))
def test_what_where_or_since_selects_is_never_pruned(tmp_path, monkeypatch,
                                                     bodies):
    # through the worker's own write path: its envelope reading, the
    # archive and the index beside it (not its fsyncs: two thirds of the
    # time, and nothing this test is about)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    directory = tempfile.mkdtemp(dir=tmp_path)
    unwrap = envelope.Unwrapper(index_fields=index.DEFAULT_FIELDS)
    manager = roll_manager.WritingRollManager(
        "prop.events", roll_checker.NeverRollChecker(), directory=directory,
        index_fields=index.DEFAULT_FIELDS)
    for body in bodies:
        payload, metadata, values = unwrap(body, "q", "rk")
        manager.write(metadata, payload, values)
    path = manager.active_filename
    manager.close()
    items = _items(path)
    for metadata, payload in archive.ArchiveReader(path):
        selections = []
        note = index.notification_of(payload) or {}
        for field in ("payload.instance_id", "payload.nova_object.data.uuid"):
            text = index.value_text(index.lookup(note, field.split(".")))
            if text is not None and not set(text) & set("*?["):
                selections.append(select.Selection(
                    where=[select.parse_where("%s=%s" % (field, text))],
                    load_index=index.Index.from_bytes))
        moment = timestamps.record_time(metadata)
        if moment is not None:
            tick = datetime.timedelta(microseconds=1)
            selections += [
                select.Selection(since=moment,
                                 load_index=index.Index.from_bytes),
                select.Selection(until=moment + tick,
                                 load_index=index.Index.from_bytes),
                select.Selection(since=moment, until=moment + tick,
                                 load_index=index.Index.from_bytes)]
        for chosen in selections:
            assert chosen.keep(metadata, payload)  # it selects the record
            for item in items:
                assert chosen.may_hold(item), (item, chosen.options())
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
