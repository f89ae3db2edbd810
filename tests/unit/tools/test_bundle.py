"""Tests for shoebox_worker.tools.bundle: what ``index-bundle`` puts in
the bundle (with a Swift of dicts here; tests/functional/
test_swift_index_bundle.py runs it on the real one)."""

import argparse
import hashlib

import pytest
from swiftclient import exceptions as swift_exceptions

from shoebox_worker import index
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import bundle
from shoebox_worker.tools import sources


class Body(list):
    """swiftclient's ``_ObjectBody``: the chunks, and close."""

    def __init__(self, data, chunk):
        super().__init__(data[i:i + chunk] for i in range(0, len(data),
                                                          chunk))

    def close(self):
        pass


def index_of(name):
    """A real index (one record holding ``name`` as its instance id)."""
    return index.build([({}, {"payload": {"instance_id": name}})])


class FakeSwift(sources.Swift):
    """Objects in a dict; the listing's ``hash`` is their MD5, as Swift's
    ETag; ``replaced`` objects changed after the listing."""

    def __init__(self, objects, times, replaced=()):
        super().__init__()
        self.objects = objects
        self.times = times
        self.replaced = set(replaced)
        self.puts = {}

    def connection(self):
        return self

    def list(self, container, prefix):
        return [{"name": name, "bytes": len(data),
                 "hash": hashlib.md5(data).hexdigest(),
                 "last_modified": self.times[name]}
                for name, data in sorted(self.objects.items())
                if name.startswith(prefix)]

    def get_object(self, container, name, resp_chunk_size=None):
        if name not in self.objects:
            raise swift_exceptions.ClientException("GET", http_status=404)
        data = self.objects[name]
        if name in self.replaced:
            data += b"new"
        headers = {"etag": hashlib.md5(data).hexdigest(),
                   "content-length": str(len(data))}
        if resp_chunk_size is None:
            return headers, data
        return headers, Body(data, resp_chunk_size)

    def put_object(self, container, name, data, content_type=None):
        self.puts[name] = (data, content_type)


def run(swift, spec, monkeypatch, capsys):
    monkeypatch.setattr(sources, "Swift", lambda config_file=None: swift)
    args = argparse.Namespace(spec=spec, config=None, jobs=2)
    assert bundle.cmd_index_bundle(args) == 0
    return capsys.readouterr().out


def test_the_indexes_that_describe_their_archives(monkeypatch, capsys):
    objects, times = {}, {}
    for name, when, index_when in (("day/a", "10", "11"), ("day/b", "10",
                                                           "10"),
                                   ("day/c", "12", "11"),  # index older
                                   ("day/d", "10", None),  # no index
                                   ("day/e", "10", "11")):  # replaced
        objects[name], times[name] = b"archive " + name.encode(), when
        if index_when:
            objects[name + ".index"] = index_of(name)
            times[name + ".index"] = index_when
    objects["day/.shoebox-index-bundle"] = b"an older bundle"
    times["day/.shoebox-index-bundle"] = "09"
    swift = FakeSwift(objects, times, replaced=["day/e.index"])
    out = run(swift, "swift://c/day/", monkeypatch, capsys)
    name = "day/" + index.BUNDLE_SUFFIX
    assert out == "swift://c/%s: the indexes of 2 of 5 archives\n" % name
    data, content_type = swift.puts[name]
    assert content_type == bundle.BUNDLE_CONTENT_TYPE
    found = index.Bundle.from_bytes(data).entries
    assert found == {
        (n, hashlib.md5(objects[n]).hexdigest()): objects[n + ".index"]
        for n in ("day/a", "day/b")}


def test_an_index_that_is_none_or_too_long_is_left_out(monkeypatch,
                                                       capsys):
    big = index.build([({}, {"payload": {"instance_id": str(n)}})
                       for n in range(500)])
    objects = {"day/a": b"archive a", "day/a.index": index_of("day/a"),
               "day/b": b"archive b", "day/b.index": b"not an index",
               "day/c": b"archive c", "day/c.index": big}
    times = dict.fromkeys(objects, "10")
    monkeypatch.setattr(index, "MAX_BYTES", len(big) - 1)
    swift = FakeSwift(objects, times)
    out = run(swift, "swift://c/day/", monkeypatch, capsys)
    assert out.endswith(": the indexes of 1 of 3 archives\n")
    found = index.Bundle.from_bytes(swift.puts["day/" + index.BUNDLE_SUFFIX]
                                    [0]).entries
    assert [name for name, _ in found] == ["day/a"]


def test_only_swift(monkeypatch, capsys):
    with pytest.raises(ToolError, match="expected swift://"):
        run(FakeSwift({}, {}), "/tmp/x", monkeypatch, capsys)
