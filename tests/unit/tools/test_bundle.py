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

    def get_object(self, container, name):
        if name not in self.objects:
            raise swift_exceptions.ClientException("GET", http_status=404)
        data = self.objects[name]
        if name in self.replaced:
            data += b"new"
        return {"etag": hashlib.md5(data).hexdigest()}, data

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
            objects[name + ".index"] = b"index of " + name.encode()
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


def test_only_swift(monkeypatch, capsys):
    with pytest.raises(ToolError, match="expected swift://"):
        run(FakeSwift({}, {}), "/tmp/x", monkeypatch, capsys)
