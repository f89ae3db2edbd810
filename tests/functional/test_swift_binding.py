"""Pruning bound to the archive, on the real Swift: what a user with write
access to the container writes beside an archive (its ``.index`` object,
its ``Earliest-``/``Latest-Timestamp`` metadata) makes no reader miss its
records.

One container of archives written as the worker writes them
(``ft.write_archive``) and uploaded with the real ``swift`` step (its
object metadata, its ``.index`` beside the object), then tampered with
through Swift's own API:

* ``forged``: holds ``TARGET`` on DAY; its ``.index`` replaced by one
  claiming no values and a time range of 2000;
* ``copied``: holds ``TARGET`` on DAY; its ``.index`` replaced by
  ``other``'s (an index, intact, of another object);
* ``posted``: holds ``TARGET`` on DAY; no ``.index``, its time metadata
  POSTed to say 2000;
* ``other``: no ``TARGET``, a day before DAY; its index as uploaded (the
  pruning that must still work);
* ``large``: holds ``TARGET`` on DAY, uploaded as a Static Large Object
  (its listing ETag is its segments', not its MD5); its index as
  uploaded.

``cat --where payload.instance_id=TARGET`` and ``cat --since DAY --until
DAY+1`` must print every ``TARGET`` record, say one warning per index
that would have pruned but is not its archive's, and GET no byte of
``other`` (``--where``, ``--since``) nor of ``large`` when the value is
absent.

Needs ST_AUTH, ST_USER and ST_KEY; skipped without them, or failing when
CI=true.
"""

import datetime
import os
import uuid

import orjson
import pytest

from shoebox_worker import cli
from shoebox_worker import index
from shoebox_worker.ship import swift as swift_step
from shoebox_worker.tools import simulator

pytestmark = pytest.mark.functional

TARGET = "binding-target-instance"
RECORDS = 40
DAY = datetime.datetime(2026, 10, 5, tzinfo=datetime.UTC)
#: Every archive holds TARGET but ``other``.
KINDS = ("copied", "forged", "large", "other", "posted")


def _notes(seed, target, start):
    notes = list(simulator.notifications(RECORDS, seed=seed, start=start))
    if target:
        for note in notes[::5]:
            note["payload"]["instance_id"] = TARGET
    return notes


def _step(env, container, **options):
    return swift_step.SwiftUploadCallback(
        auth=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"],
        container=container, **options)


@pytest.fixture(scope="module")
def tampered(ft, swift_env, tmp_path_factory):
    container = "shoebox-binding-%s" % uuid.uuid4().hex[:12]
    directory = tmp_path_factory.mktemp("binding")
    conn = ft.swift_connection(swift_env, timeout=60)
    plain = _step(swift_env, container)
    large = _step(swift_env, container, segment_size="4096")
    try:
        wanted, names = 0, {}
        for seed, kind in enumerate(KINDS):
            start = DAY - datetime.timedelta(days=1) if kind == "other" \
                else DAY + datetime.timedelta(hours=1)
            notes = _notes(200 + seed, kind != "other", start)
            wanted += sum(n["payload"].get("instance_id") == TARGET
                          for n in notes)
            path, report = ft.write_archive(notes, directory,
                                            kind + ".events")
            step = large if kind == "large" else plain
            step.on_close(path, report=report)
            names[kind] = os.path.basename(path)
        assert conn.head_object(container, names["large"]).get(
            "x-static-large-object") == "True"
        _, other_index = conn.get_object(container,
                                         names["other"] + index.SUFFIX)
        old = index.build([({"timestamp": "2000-01-01 00:00:00.000000"},
                            {})])  # one record: no values, in 2000
        conn.put_object(container, names["forged"] + index.SUFFIX, old)
        conn.put_object(container, names["copied"] + index.SUFFIX,
                        other_index)
        conn.delete_object(container, names["posted"] + index.SUFFIX)
        head = conn.head_object(container, names["posted"])
        meta = {k: v for k, v in head.items()
                if k.startswith("x-object-meta-")}
        meta["x-object-meta-earliest-timestamp"] = \
            "2000-01-01T00:00:00.000000Z"
        meta["x-object-meta-latest-timestamp"] = "2000-01-01T00:00:01.000000Z"
        conn.post_object(container, names["posted"], headers=meta)
        yield {"container": container, "conn": conn, "wanted": wanted,
               "names": names}
    finally:
        plain.close()
        large.close()
        ft.delete_swift_container(conn, container)
        conn.close()


def _cat(tampered, capsysbinary, *argv):
    capsysbinary.readouterr()
    code = cli.main(["cat", *argv, "swift://" + tampered["container"]])
    out, err = capsysbinary.readouterr()
    assert code == 0, err
    return out, err.decode()


def _targets(out):
    return sum(orjson.loads(line)["payload"].get("instance_id") == TARGET
               for line in out.splitlines())


def _warned(tampered, err):
    """The archives whose indexes the warnings name, each once."""
    container = tampered["container"]
    by_object = {name: kind for kind, name in tampered["names"].items()}
    said = []
    for line in err.splitlines():
        assert line.startswith("shoebox-worker: warning: swift://%s/"
                               % container), line
        obj = line.split(" in full")[0].rsplit("/", 1)[1]
        assert line.endswith("; reading swift://%s/%s in full"
                             % (container, obj)), line
        said.append(by_object[obj])
    return sorted(said)


def _archives_got(tampered, swift_gets):
    by_object = {name: kind for kind, name in tampered["names"].items()}
    return sorted(by_object[o] for _, o in swift_gets if o in by_object)


def test_a_forged_or_copied_index_hides_no_record_of_where(
        tampered, swift_gets, capsysbinary):
    out, err = _cat(tampered, capsysbinary,
                    "--where", "payload.instance_id=" + TARGET)
    assert _targets(out) == tampered["wanted"], err
    assert _warned(tampered, err) == ["copied", "forged"]
    # the uploaded indexes still prune: other's (plain), not large's (SLO)
    assert _archives_got(tampered, swift_gets) == [
        "copied", "forged", "large", "posted"]


def test_forged_time_metadata_or_index_hides_no_record_of_since(
        tampered, swift_gets, capsysbinary):
    since = DAY.strftime("%Y-%m-%dT%H:%M:%S")
    until = (DAY + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    out, err = _cat(tampered, capsysbinary, "--since", since,
                    "--until", until)
    assert _targets(out) == tampered["wanted"], err
    assert len(out.splitlines()) == RECORDS * (len(KINDS) - 1)
    # copied: other's index says the day before: it would prune
    assert _warned(tampered, err) == ["copied", "forged"]
    assert _archives_got(tampered, swift_gets) == [
        "copied", "forged", "large", "posted"]


def test_an_slo_s_index_prunes_by_its_listing_etag(tampered, swift_gets,
                                                   capsysbinary):
    out, err = _cat(tampered, capsysbinary,
                    "--where", "payload.instance_id=absent-instance")
    assert out == b""
    # every index that says "absent" is checked: the uploaded ones hold,
    # the forged one and the copy of other's do not
    assert _warned(tampered, err) == ["copied", "forged"]
    assert _archives_got(tampered, swift_gets) == [
        "copied", "forged", "posted"]
