"""Tests of the synthetic nova notification simulator."""

import collections
import datetime
import itertools
import json
import re
import statistics
import uuid

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from shoebox_worker.consume import envelope
from shoebox_worker.tools import simulator
from shoebox_worker.tools.simulator import notifications

START = datetime.datetime(2024, 3, 1, 12, 0, 0)

TOP_KEYS = {
    "_context_auth_token", "_context_glance_api_servers",
    "_context_instance_lock_checked", "_context_is_admin",
    "_context_project_id", "_context_project_name", "_context_quota_class",
    "_context_read_deleted", "_context_remote_address",
    "_context_request_id", "_context_roles", "_context_tenant",
    "_context_timestamp", "_context_user", "_context_user_id",
    "_context_user_name", "_unique_id", "event_type", "message_id",
    "payload", "priority", "publisher_id", "timestamp",
}

INSTANCE_KEYS = {
    "access_ip_v4", "access_ip_v6", "architecture", "availability_zone",
    "created_at", "deleted_at", "disk_gb", "display_name", "ephemeral_gb",
    "host", "hostname", "image_meta", "image_ref_url", "instance_flavor_id",
    "instance_id", "instance_type", "instance_type_id", "kernel_id",
    "launched_at", "memory_mb", "metadata", "node", "os_type", "ramdisk_id",
    "reservation_id", "root_gb", "state", "state_description", "tenant_id",
    "terminated_at", "user_id", "vcpus",
}

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
UUID4 = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _parse(text):
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")


def _instance_id(notification):
    payload = notification["payload"]
    if "instance_id" in payload:
        return payload["instance_id"]
    return payload["request_spec"]["instance_uuids"][0]


@pytest.fixture(scope="module")
def stream():
    return list(notifications(10000, seed=20240301, start=START))


def test_same_seed_same_stream():
    first = list(notifications(400, seed=7, start=START))
    again = list(notifications(400, seed=7, start=START))
    assert first == again
    assert [envelope.wrap(n) for n in first] == [
        envelope.wrap(n) for n in again]


def test_other_seed_other_stream():
    one = [n["message_id"] for n in notifications(50, seed=1, start=START)]
    two = [n["message_id"] for n in notifications(50, seed=2, start=START)]
    assert set(one).isdisjoint(two)


def test_count():
    assert list(notifications(0, seed=1)) == []
    assert len(list(notifications(123, seed=1))) == 123
    with pytest.raises(ValueError):
        notifications(-1)


def test_endless_without_count():
    endless = notifications(seed=3, start=START)
    assert len(list(itertools.islice(endless, 3000))) == 3000
    assert next(endless)["priority"] == "INFO"


def test_start_default_is_now_utc():
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    first = next(notifications(seed=1))
    after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert before <= _parse(first["timestamp"])
    assert _parse(first["timestamp"]) - after < datetime.timedelta(minutes=5)


def test_aware_start_is_converted_to_utc():
    tz = datetime.timezone(datetime.timedelta(hours=-6))
    aware = datetime.datetime(2024, 3, 1, 6, 0, 0, tzinfo=tz)
    naive = list(notifications(20, seed=5, start=START))
    converted = list(notifications(20, seed=5, start=aware))
    assert naive == converted


def test_top_level_keys_and_values(stream):
    for n in stream:
        assert set(n) == TOP_KEYS
        assert n["priority"] == "INFO"
        assert n["event_type"] in simulator.EVENT_TYPES
        assert UUID4.match(n["message_id"])
        assert re.fullmatch(r"[0-9a-f]{32}", n["_unique_id"])
        assert re.fullmatch(r"req-[0-9a-f-]{36}", n["_context_request_id"])
        assert TIMESTAMP.match(n["timestamp"])
        assert TIMESTAMP.match(n["_context_timestamp"])
        assert n["_context_timestamp"] <= n["timestamp"]
        assert n["_context_read_deleted"] == "no"
        assert isinstance(n["_context_roles"], list)
        assert n["_context_project_id"] == n["_context_tenant"]
        service, _, host = n["publisher_id"].partition(".")
        assert host
        if n["event_type"].startswith("scheduler."):
            assert service == "scheduler"
        else:
            assert service == "compute"


def test_event_types_present(stream):
    seen = collections.Counter(n["event_type"] for n in stream)
    assert set(seen) == simulator.EVENT_TYPES
    # Updates are the bulk of nova's traffic, as in a real cloud.
    assert seen["compute.instance.update"] == max(seen.values())


def test_payload_shapes(stream):
    for n in stream:
        payload = n["payload"]
        event_type = n["event_type"]
        if event_type.startswith("scheduler."):
            spec = payload["request_spec"]
            assert spec["num_instances"] == len(spec["instance_uuids"])
            assert spec["instance_properties"]["uuid"] in spec[
                "instance_uuids"]
            continue
        assert INSTANCE_KEYS <= set(payload)
        assert payload["tenant_id"] == n["_context_project_id"]
        assert payload["disk_gb"] == payload["root_gb"] + payload[
            "ephemeral_gb"]
        assert payload["image_ref_url"].endswith(
            "/images/" + payload["image_meta"]["base_image_ref"]
        ) or payload["image_meta"]["image_type"] == "snapshot"
        if event_type == "compute.instance.update":
            assert {"old_state", "old_task_state", "new_task_state",
                    "audit_period_beginning", "audit_period_ending",
                    "bandwidth"} <= set(payload)
            assert payload["state_description"] == (
                payload["new_task_state"] or "")
        if event_type == "compute.instance.exists":
            begin = _parse(payload["audit_period_beginning"])
            end = _parse(payload["audit_period_ending"])
            assert begin < end
            for network in ("public", "private"):
                assert {"bw_in", "bw_out"} == set(
                    payload["bandwidth"][network])
        if event_type == "compute.instance.create.end":
            assert payload["state"] == "active"
            assert payload["launched_at"]
            assert payload["fixed_ips"]
        if event_type == "compute.instance.delete.end":
            assert payload["state"] == "deleted"
            assert payload["deleted_at"] == payload["terminated_at"] != ""
        if event_type == "compute.instance.resize.prep.end":
            assert {"new_instance_type", "new_instance_type_id"} <= set(
                payload)


def test_timestamps_strictly_increase(stream):
    stamps = [n["timestamp"] for n in stream]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert _parse(stamps[0]) > START


def test_ids_unique(stream):
    assert len({n["message_id"] for n in stream}) == len(stream)
    assert len({n["_unique_id"] for n in stream}) == len(stream)


def test_request_id_shared_within_an_operation(stream):
    by_request = collections.defaultdict(list)
    for n in stream:
        by_request[n["_context_request_id"]].append(n)
    # Each request is about one instance, from one tenant.
    for events in by_request.values():
        assert len({_instance_id(n) for n in events}) == 1
        assert len({n["_context_project_id"] for n in events}) == 1
        assert len({n["_context_timestamp"] for n in events}) == 1
    # The start and end of one operation carry the same request id.
    pairs = (("compute.instance.create.start", "compute.instance.create.end"),
             ("compute.instance.delete.start", "compute.instance.delete.end"),
             ("compute.instance.resize.prep.start",
              "compute.instance.finish_resize.end"))
    for start, end in pairs:
        checked = 0
        for events in by_request.values():
            types = [n["event_type"] for n in events]
            if start in types and end in types:
                assert types.index(start) < types.index(end)
                checked += 1
        ends = sum(n["event_type"] == end for n in stream)
        # Only operations cut off by the start or end of the stream miss.
        assert checked >= ends - 6


def test_lifecycles(stream):
    by_instance = collections.defaultdict(list)
    for n in stream:
        by_instance[_instance_id(n)].append(n["event_type"])
    created = deleted = 0
    for types in by_instance.values():
        if "compute.instance.create.end" in types:
            created += 1
            # Nothing happens to an instance before it is built.
            first = types.index("compute.instance.create.start")
            assert all(t.startswith("scheduler.") or
                       t == "compute.instance.update"
                       for t in types[:first])
        if "compute.instance.delete.end" in types:
            deleted += 1
            assert types[-1] == "compute.instance.delete.end"
            assert types.count("compute.instance.delete.end") == 1
    assert created > 100
    assert deleted > 100


def test_sizes_realistic(stream):
    sizes = [len(envelope.wrap(n)) for n in stream]
    assert 2800 <= statistics.mean(sizes) <= 3400
    assert min(sizes) >= 2000
    assert max(sizes) <= 12000
    # Most are instance events of 2-3.5 KB; a few scheduler events are big.
    assert statistics.median(sizes) < 3200
    assert sum(size > 5000 for size in sizes) < len(sizes) * 0.2


def _scribble(value):
    """Change every dict and list inside ``value``, in place."""
    if isinstance(value, dict):
        for item in list(value.values()):
            _scribble(item)
        value["scribbled"] = True
    elif isinstance(value, list):
        for item in value:
            _scribble(item)
        value.append("scribbled")


def test_notifications_are_independent_copies():
    untouched = [envelope.wrap(n) for n in notifications(600, seed=11,
                                                    start=START)]
    scribbled = []
    for n in notifications(600, seed=11, start=START):
        scribbled.append(envelope.wrap(n))
        _scribble(n)
    assert scribbled == untouched


def test_yielded_notifications_do_not_change_later():
    kept = list(notifications(600, seed=12, start=START))
    assert [envelope.wrap(n) for n in kept] == [
        envelope.wrap(n) for n in notifications(600, seed=12, start=START)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2 ** 64),
       count=st.integers(min_value=1, max_value=300))
def test_any_seed_gives_valid_stream(seed, count):
    stream = list(notifications(count, seed=seed, start=START))
    assert len(stream) == count
    stamps = [n["timestamp"] for n in stream]
    assert stamps == sorted(stamps)
    for n in stream:
        assert set(n) == TOP_KEYS
        assert uuid.UUID(n["message_id"]).version == 4
        assert json.loads(json.loads(envelope.wrap(n))["oslo.message"]) == n
