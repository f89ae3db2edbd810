"""Index bundles on the real Swift: ``index-bundle``, then a pruned read.

Archives are written as the worker writes them (``ft.write_archive``: its
envelope, ``roll_manager`` with the default ``index_fields``, gzipped, the
index beside the ``.gz``) and uploaded with the real swift step (each with its
``<object>.index``). ``index-bundle`` puts their indexes into one object;
``cat --where`` must then GET that bundle and the archives whose index
may hold the value, no ``.index``, and print what a full read keeps. An
archive object replaced since (other bytes, so another ETag) is read
through its own index again, and its new records are found.

Needs ST_AUTH, ST_USER and ST_KEY; skipped without them, or failing when
CI=true.
"""

import collections
import os
import uuid

import orjson
import pytest
from swiftclient import client as swc

from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker.ship import swift as swift_step
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

ARCHIVES = 6
RECORDS = 40


def instance_of(line):
    body = orjson.loads(line).get("payload") or {}
    return body.get("instance_id") if isinstance(body, dict) else None


@pytest.fixture(scope="module")
def uploaded(ft, swift_env, tmp_path_factory):
    """The container, its archives (object names) and the local indexes."""
    container = "shoebox-bundle-%s" % uuid.uuid4().hex[:12]
    directory = tmp_path_factory.mktemp("bundle")
    notes = simulator.notifications(ARCHIVES * RECORDS, seed=5)
    step = swift_step.SwiftUploadCallback(
        auth=swift_env["ST_AUTH"], user=swift_env["ST_USER"],
        key=swift_env["ST_KEY"], container=container)
    conn = swc.Connection(authurl=swift_env["ST_AUTH"],
                          user=swift_env["ST_USER"], key=swift_env["ST_KEY"],
                          auth_version="1", retries=2, timeout=30)
    try:
        names = []
        for n in range(ARCHIVES):
            chunk = [next(notes) for _ in range(RECORDS)]
            path, report = ft.write_archive(chunk, directory,
                                            "b_%02d.events" % n)
            step.on_close(path, report=report)
            names.append(os.path.basename(path))
        listing = ft.swift_archives(conn, container)
        assert sorted(e["name"] for e in listing) == names
        yield {"container": container, "names": names, "conn": conn,
               "directory": directory}
    finally:
        step.close()
        ft.delete_swift_container(conn, container)
        conn.close()


def _main(argv, capsysbinary):
    capsysbinary.readouterr()
    code = cli.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def test_a_bundle_replaces_the_index_gets_and_a_replaced_archive_is_read(
        ft, uploaded, swift_gets, capsysbinary):
    container, names = uploaded["container"], uploaded["names"]
    spec = "swift://" + container
    code, out, err = _main(["index-bundle", spec], capsysbinary)
    assert code == 0, err
    bundle_name = index.BUNDLE_SUFFIX
    assert out.decode() == "%s/%s: the indexes of %d of %d archives\n" % (
        spec, bundle_name, ARCHIVES, ARCHIVES)

    code, full, err = _main(["cat", spec], capsysbinary)
    assert code == 0, err
    where = collections.defaultdict(set)
    for line in full.splitlines():
        where[instance_of(line)].add(line)
    holding = collections.defaultdict(set)  # instance -> archives
    _, bundle = uploaded["conn"].get_object(container, bundle_name)
    bundle = index.Bundle.from_bytes(bundle)
    indexes = {name: index.Index.from_bytes(data)
               for (name, _), data in bundle.entries.items()}
    assert sorted(indexes) == names
    for name in names:
        for iid in where:
            if iid and indexes[name].may_contain("payload.instance_id", iid):
                holding[iid].add(name)
    iid = min((i for i in holding if i), key=lambda i: len(holding[i]))
    assert len(holding[iid]) < ARCHIVES

    swift_gets.clear()
    argv = ["cat", "--where", "payload.instance_id=" + iid, spec]
    code, out, err = _main(argv, capsysbinary)
    assert code == 0, err
    assert sorted(out.splitlines()) == sorted(where[iid])
    assert sorted(o for _, o in swift_gets) == sorted(
        [bundle_name] + list(holding[iid]))

    # another archive object replaced by other records, those of iid
    # among them: its bundle entry is stale, its own index is read
    others = [n for n in names if n not in holding[iid]]
    replaced = others[0]
    notes = list(simulator.notifications(RECORDS, seed=6))
    notes[3]["payload"]["instance_id"] = iid
    os.makedirs(uploaded["directory"] / "new")
    path, _ = ft.write_archive(notes, uploaded["directory"] / "new",
                            "replaced.events")
    conn = uploaded["conn"]
    with open(path, "rb") as f:
        conn.put_object(container, replaced, f.read())
    with open(index.sidecar(path), "rb") as f:
        conn.put_object(container, replaced + index.SUFFIX, f.read())
    swift_gets.clear()
    code, out, err = _main(argv, capsysbinary)
    assert code == 0, err
    gets = [o for _, o in swift_gets]
    assert replaced + index.SUFFIX in gets
    assert [o for o in gets if o.endswith(index.SUFFIX)] == [
        replaced + index.SUFFIX]
    assert replaced in gets
    assert len(out.splitlines()) == len(where[iid]) + 1
    assert set(where[iid]) < set(out.splitlines())
