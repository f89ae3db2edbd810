"""A pruned read of the real Swift stays bounded in memory beside large
index bundles, with its listing read page by page.

Three archives written and uploaded as the worker does (each with its
``<object>.index``), and two index bundles of 4 MiB: one holding the three
archives' real indexes, both filled with the indexes of archives no longer
listed (as an old bundle keeps expired ones). ``cat --where`` runs in this
process under :mod:`tracemalloc`, with small ``sources.LIST_PAGE`` and
``sources.BUNDLE_MEMORY``, so that the bounds show at this size (the
full-size measurement, eight bundles of 32 MiB beside 1,000 archives, is
bench/select_memory.py). The same again tampered with: a hostile index
(no values, a time of 2000) for the archive holding the records selected,
as its own object and in the bundle, and forged time metadata on another
archive without an index: every record printed, one warning, the same
bound.

Needs ST_AUTH, ST_USER and ST_KEY; skipped without them, or failing when
CI=true.
"""

import os
import tracemalloc
import uuid

import orjson
import pytest

from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker.ship import swift as swift_step
from shoebox_worker.tools import simulator
from shoebox_worker.tools import sources

pytestmark = pytest.mark.functional

ARCHIVES = 3
RECORDS = 30
#: Bytes of each bundle (mostly the indexes of archives gone).
BUNDLE_BYTES = 4 << 20
GONE_ENTRY = 64 << 10


def _uploaded(ft, swift_env, tmp_path_factory):
    """The container, the local archives' folder, an instance id found in
    one archive, a connection, and ``[name, hash, index as uploaded]`` of
    each archive."""
    container = "shoebox-bounded-%s" % uuid.uuid4().hex[:12]
    directory = tmp_path_factory.mktemp("bounded")
    notes = simulator.notifications(ARCHIVES * RECORDS, seed=13)
    step = swift_step.SwiftUploadCallback(
        auth=swift_env["ST_AUTH"], user=swift_env["ST_USER"],
        key=swift_env["ST_KEY"], container=container)
    conn = ft.swift_connection(swift_env)
    try:
        real, ids = [], []
        for n in range(ARCHIVES):
            chunk = [next(notes) for _ in range(RECORDS)]
            path, report = ft.write_archive(chunk, directory,
                                            "m_%02d.events" % n)
            step.on_close(path, report=report)
            ids.append({(note.get("payload") or {}).get("instance_id")
                        for note in chunk})
            real.append([os.path.basename(path), None, None])
        hashes = {e["name"]: e["hash"]
                  for e in ft.swift_archives(conn, container)}
        for entry in real:
            # the index as uploaded: bound to its object
            entry[1] = hashes[entry[0]]
            entry[2] = conn.get_object(container,
                                       entry[0] + index.SUFFIX)[1]
        only = ids[1] - ids[0] - ids[2] - {None}
        yield {"container": container, "directory": str(directory),
               "iid": sorted(only)[0], "conn": conn, "real": real}
    finally:
        step.close()
        ft.delete_swift_container(conn, container)
        conn.close()


def _put_bundles(conn, container, real):
    """Two bundles of :data:`BUNDLE_BYTES`, the first with ``real``'s
    entries (name, hash, index bytes), the rest archives gone."""
    for number in range(2):
        entries = [tuple(e) for e in real] if number == 0 else []
        entries += [("gone/%d/%04d" % (number, n), "e%d" % n,
                     b"x" * GONE_ENTRY)
                    for n in range(BUNDLE_BYTES // GONE_ENTRY)]
        conn.put_object(container, "b%d/%s" % (number, index.BUNDLE_SUFFIX),
                        index.build_bundle(entries))


@pytest.fixture(scope="module")
def bundled(uploaded):
    _put_bundles(uploaded["conn"], uploaded["container"], uploaded["real"])
    return uploaded


#: An index claiming one record, no values, and a time in 2000.
HOSTILE = index.build([({"timestamp": "2000-01-01 00:00:00.000000"}, {})])


@pytest.fixture(scope="module")
def tampered(uploaded_too):
    """``bundled``'s archives in another container, m_01 (the one holding
    the id selected) with a :data:`HOSTILE` index as its object and in the
    bundle, m_02 without an index and with time metadata of 2000."""
    conn, container = uploaded_too["conn"], uploaded_too["container"]
    real = [list(e) for e in uploaded_too["real"]]
    real[1][2] = HOSTILE
    conn.put_object(container, real[1][0] + index.SUFFIX, HOSTILE)
    conn.delete_object(container, real[2][0] + index.SUFFIX)
    head = conn.head_object(container, real[2][0])
    meta = {k: v for k, v in head.items() if k.startswith("x-object-meta-")}
    meta.update({"x-object-meta-earliest-timestamp":
                 "2000-01-01T00:00:00.000000Z",
                 "x-object-meta-latest-timestamp":
                 "2000-01-01T00:00:01.000000Z"})
    conn.post_object(container, real[2][0], headers=meta)
    _put_bundles(conn, container, real[:2])
    return dict(uploaded_too, hostile=real[1][0])


@pytest.fixture
def pages(monkeypatch):
    """The ``limit`` of every listing request the tools send (None: the
    whole listing in one call, swiftclient's ``full_listing``)."""
    asked = []
    real = swift_step._Connection.get_container

    def get_container(self, container, *args, **kwargs):
        asked.append(None if kwargs.get("full_listing")
                     else kwargs.get("limit"))
        return real(self, container, *args, **kwargs)

    monkeypatch.setattr(swift_step._Connection, "get_container",
                        get_container)
    return asked


@pytest.fixture(scope="module")
def uploaded(ft, swift_env, tmp_path_factory):
    yield from _uploaded(ft, swift_env, tmp_path_factory)


@pytest.fixture(scope="module")
def uploaded_too(ft, swift_env, tmp_path_factory):
    yield from _uploaded(ft, swift_env, tmp_path_factory)


def _cat(argv, capsysbinary):
    capsysbinary.readouterr()
    code = cli.main(["cat"] + argv)
    out, err = capsysbinary.readouterr()
    return code, sorted(out.splitlines()), err.decode()


def _where(bundled):
    return ["--where", "payload.instance_id=" + bundled["iid"]]


def test_a_pruned_read_holds_neither_the_bundles_nor_the_listing(
        bundled, pages, monkeypatch, capsysbinary):
    spec = "swift://" + bundled["container"]
    code, expected, _ = _cat(_where(bundled) + [bundled["directory"]],
                             capsysbinary)
    assert code == 0 and expected
    assert all(orjson.loads(line)["payload"]["instance_id"] ==
               bundled["iid"] for line in expected)
    _cat(_where(bundled) + [spec], capsysbinary)  # imports, connections
    monkeypatch.setattr(sources, "LIST_PAGE", 2, raising=False)
    del pages[:]
    tracemalloc.start()
    try:
        code, lines, err = _cat(_where(bundled) + [spec], capsysbinary)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (code, lines, err) == (0, expected, "")
    # the two bundles are 8 MiB: none of them held (the readers' own
    # buffers take about 4 MiB, whatever the objects)
    assert peak < 6 << 20, peak
    # 3 archives, 3 indexes, 2 bundles: 4 pages of 2, then an empty one
    assert pages == [2] * 5


def test_past_the_cap_the_archives_own_indexes_are_read(
        bundled, swift_gets, monkeypatch, capsysbinary):
    monkeypatch.setattr(sources, "BUNDLE_MEMORY", 0, raising=False)
    code, expected, _ = _cat(_where(bundled) + [bundled["directory"]],
                             capsysbinary)
    code, lines, err = _cat(_where(bundled) + ["swift://" +
                                               bundled["container"]],
                            capsysbinary)
    assert (code, lines) == (0, expected)
    assert err.splitlines() == [
        "shoebox-worker: warning: swift://%s: the bundled indexes of %d "
        "archives left out (more than 0 bytes of them in all); reading "
        "their own indexes instead" % (bundled["container"], ARCHIVES)]
    gotten = {obj for _, obj in swift_gets}
    assert {"m_%02d.events.gz.index" % n for n in range(ARCHIVES)} <= gotten


@pytest.mark.parametrize("selection", ["--where", "--since"])
def test_hostile_indexes_and_forged_metadata_hide_nothing_and_stay_bounded(
        tampered, monkeypatch, capsysbinary, selection):
    if selection == "--where":
        argv = _where(tampered)
    else:  # from m_01's first record: m_00 is before, m_01 and m_02 in
        with open(index.sidecar(os.path.join(
                tampered["directory"], "m_01.events.gz")), "rb") as f:
            argv = ["--since", index.Index.from_bytes(f.read()).earliest]
    spec = "swift://" + tampered["container"]
    code, expected, _ = _cat(argv + [tampered["directory"]], capsysbinary)
    assert code == 0 and expected
    _cat(argv + [spec], capsysbinary)  # imports, connections
    monkeypatch.setattr(sources, "LIST_PAGE", 2, raising=False)
    tracemalloc.start()
    try:
        code, lines, err = _cat(argv + [spec], capsysbinary)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (code, lines) == (0, expected), err
    assert err.splitlines() == [
        "shoebox-worker: warning: %s/%s.index: index not bound to its "
        "archive (it names none: not shipped yet, or not the worker's); "
        "reading %s/%s in full"
        % (spec, tampered["hostile"], spec, tampered["hostile"])]
    assert peak < 6 << 20, peak
