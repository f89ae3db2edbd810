"""Tests for shoebox_worker.tools.sources: what a listing yields and in
which order, credentials from the environment, streams and read-ahead
(with a Swift of dicts here; tests/functional/test_swift_sources.py reads
the real one)."""

import errno
import functools
import os
import pathlib
import threading

import pytest
from swiftclient import exceptions as swift_exceptions

from shoebox_worker import archive
from shoebox_worker import index
from shoebox_worker import record
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import read
from shoebox_worker.tools import select
from shoebox_worker.tools import sources


class Body:
    """swiftclient's ``_ObjectBody``: chunks, then the end."""

    def __init__(self, data, chunk, fail_after=None):
        self.data, self.chunk = data, chunk
        self.fail_after = fail_after
        self.closed = False

    def __iter__(self):
        for number, start in enumerate(range(0, len(self.data),
                                             self.chunk)):
            if number == self.fail_after:
                raise ConnectionResetError(104, "Connection reset by peer")
            yield self.data[start:start + self.chunk]  # as it comes

    def close(self):
        self.closed = True


class FakeConnection:
    def __init__(self, swift):
        self.swift = swift
        self.url = "http://swift/v1/AUTH_test"
        self.token = "tk"

    def get_object(self, container, obj, resp_chunk_size=None):
        with self.swift.lock:
            self.swift.gets.append(obj)
        if obj not in self.swift.objects:
            raise swift_exceptions.ClientException(
                "Object GET failed", http_status=404, http_reason="Not Found")
        data = self.swift.objects[obj]
        if resp_chunk_size is None:
            return {}, data
        body = Body(data, resp_chunk_size, self.swift.fail.get(obj))
        self.swift.bodies.append(body)
        return {}, body

    def head_object(self, container, obj):
        return {"x-object-meta-records": str(len(self.swift.objects[obj])),
                "X-Object-Meta-First-Timestamp": "t", "etag": "x"}

    def get_container(self, container, prefix=None, marker="", limit=None,
                      full_listing=False):
        """A page of the listing, as Swift gives it: in name order, after
        ``marker``, each entry a dict of its own (parsed JSON); or, with
        ``full_listing``, every page at once, as swiftclient joins them."""
        with self.swift.lock:
            self.swift.pages += 1
        after = [e for e in sorted(self.swift.listing,
                                   key=lambda e: e["name"])
                 if e["name"].startswith(prefix or "")
                 and e["name"] > marker]
        if not full_listing:
            after = after[:limit]
        return {}, [dict(e) for e in after]


class FakeSwift(sources.Swift):
    """A :class:`sources.Swift` whose connections and listing are dicts."""

    def __init__(self, listing=(), objects=None):
        super().__init__()
        self.listing = list(listing)
        self.objects = dict(objects or {})
        self.gets = []
        self.bodies = []
        self.fail = {}
        self.pages = 0
        self.lock = threading.Lock()

    def connection(self):
        return FakeConnection(self)


def entry(name, last_modified, size=10, content_type="application/gzip"):
    return {"name": name, "bytes": size, "last_modified": last_modified,
            "content_type": content_type}


def archive_bytes(count, tag="x"):
    return b"".join(record.pack({"n": str(i)}, b'{"%s":%d}' % (
        tag.encode(), i)) for i in range(count))


# -- listing ----------------------------------------------------------------

class TestListing:
    def test_specs(self):
        assert sources.parse_spec("swift://c") == ("c", "")
        assert sources.parse_spec("swift://c/2026/01/") == ("c", "2026/01/")
        with pytest.raises(ToolError, match="no container"):
            sources.parse_spec("swift:///x")

    def test_what_is_never_an_archive_is_left_out(self):
        swift = FakeSwift([
            entry("a.events.gz", "2026-01-01T00:00:02"),
            entry("a.events.gz.index", "2026-01-01T00:00:03"),
            entry("b.events.gz/1000/100/00000000", "2026-01-01T00:00:01"),
            entry("empty.events", "2026-01-01T00:00:01", size=0),
            entry("dir", "2026-01-01T00:00:01",
                  content_type="application/directory", size=1),
            entry("notes.txt", "2026-01-01T00:00:04"),
        ])
        items = sources.find(["swift://c"], swift=swift)
        assert [i.name for i in items] == ["swift://c/a.events.gz",
                                           "swift://c/notes.txt"]
        assert items[0].index_name == "a.events.gz.index"
        assert items[1].index_name is None
        assert all(i.listed and i.meta is None for i in items)
        assert swift.gets == []  # a listing sends no GET

    def test_write_order_is_swift_time_then_counter_then_name(self):
        # the object prefix (the first record's day) and the name's own
        # time would order them otherwise
        swift = FakeSwift([
            entry("2026/01/02/shoebox_20260102T000000_h-1_t-0.events.gz",
                  "2026-03-01T00:00:01.000001"),
            entry("2026/01/01/shoebox_20260103T000000_h-1_t-1~2.events.gz",
                  "2026-03-01T00:00:02"),
            entry("2026/01/01/shoebox_20260103T000000_h-1_t-1~10.events.gz",
                  "2026-03-01T00:00:02"),
            entry("2026/01/01/late.events.gz", "2026-03-01T00:00:00.5"),
        ])
        names = [i.object for i in sources.find(["swift://c"], swift=swift)]
        assert names == [
            "2026/01/01/late.events.gz",
            "2026/01/02/shoebox_20260102T000000_h-1_t-0.events.gz",
            "2026/01/01/shoebox_20260103T000000_h-1_t-1~2.events.gz",
            "2026/01/01/shoebox_20260103T000000_h-1_t-1~10.events.gz"]

    def test_a_prefix_that_names_an_object_reads_it_alone(self):
        swift = FakeSwift([entry("a.events", "2"), entry("a.events.2", "1"),
                           entry("a.events.index", "3")])
        [item] = sources.find(["swift://c/a.events"], swift=swift)
        assert (item.object, item.listed) == ("a.events", False)
        assert item.index_name == "a.events.index"

    def test_nothing_there_is_one_line(self):
        swift = FakeSwift([entry("x.index", "1")])
        with pytest.raises(ToolError, match=r"^swift://c/y: no archives "
                                            r"there \(no objects\)$"):
            sources.find(["swift://c/y"], swift=swift)
        with pytest.raises(ToolError, match=r"^swift://c: no archives "
                                            r"there$"):
            sources.find(["swift://c"], swift=swift)

    def test_files_and_objects_mix_in_the_order_given(self, tmp_path):
        path = tmp_path / "a.events"
        path.write_bytes(archive_bytes(2))
        built = index.build([])
        (tmp_path / "a.events.index").write_bytes(built)
        swift = FakeSwift([entry("o", "1")])
        items = sources.find([str(path), "swift://c", str(path)],
                             swift=swift)
        assert [i.name for i in items] == [str(path), "swift://c/o",
                                           str(path)]
        assert items[0].meta == {} and items[0].size == path.stat().st_size
        assert items[0].read_index() == built
        assert items[0].salvage_to == str(path) + ".salvaged"
        assert items[1].salvage_to == "o.salvaged"

    def test_heads_fill_the_metadata(self):
        swift = FakeSwift([entry("a", "1"), entry("b", "2")],
                          {"a": b"12", "b": b"123"})
        items = sources.find(["swift://c"], swift=swift, heads=True, jobs=2)
        assert [i.meta for i in items] == [
            {"records": "2", "first-timestamp": "t"},
            {"records": "3", "first-timestamp": "t"}]


# -- index bundles -----------------------------------------------------------

class TestPagedListing:
    def listing(self, archives):
        """``archives`` archives, each with its index (every third
        without), in write order by time."""
        listing, objects = [], {}
        for n in range(archives):
            name = "a%03d" % n
            listing.append(entry(name, "2026-01-01T00:%02d:%02d" % divmod(
                archives - n, 60)))
            objects[name] = archive_bytes(1)
            if n % 3:
                listing.append(entry(name + ".index", "2026-01-02", 30))
        return listing, objects

    @pytest.mark.parametrize("page", [1, 2, 3, 7, 1000])
    def test_pages_of_any_size_find_the_same(self, monkeypatch, page):
        listing, objects = self.listing(20)
        monkeypatch.setattr(sources, "LIST_PAGE", page)
        swift = FakeSwift(listing, objects)
        items = sources.find(["swift://c"], swift=swift)
        assert [i.object for i in items] == ["a%03d" % n
                                             for n in reversed(range(20))]
        assert [(i.index_name, i.index_size) for i in items] == [
            ("a%03d.index" % n, 30) if n % 3 else (None, None)
            for n in reversed(range(20))]
        assert swift.pages == -(-len(listing) // page) + 1  # then empty

    def test_a_prefix_that_names_an_object_across_pages(self, monkeypatch):
        listing, objects = self.listing(20)
        monkeypatch.setattr(sources, "LIST_PAGE", 1)
        swift = FakeSwift(listing, objects)
        [item] = sources.find(["swift://c/a002"], swift=swift)
        assert (item.object, item.index_name, item.listed) == (
            "a002", "a002.index", False)
        assert swift.pages == 2  # a002, a002.index: no more asked

    def test_what_a_listing_holds_does_not_grow_with_the_objects(
            self, monkeypatch):
        """20,000 segments and indexes of archives listed elsewhere, three
        archives, pages of 500: a peak of about one page held (every
        entry at once, with the whole listing)."""
        import tracemalloc
        listing = [entry("seg/1000/10/%08d" % n, "2026-01-01", 10)
                   for n in range(10000)]
        listing += [entry("x%05d.index" % n, "2026-01-01", 10)
                    for n in range(10000)]
        listing += [entry(n, "2026-01-0%d" % i) for i, n in
                    enumerate(("a", "b", "c"), 1)]
        swift = FakeSwift(listing, {})
        monkeypatch.setattr(sources, "LIST_PAGE", 500, raising=False)
        tracemalloc.start()
        try:
            items = sources.find(["swift://c"], swift=swift)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [i.object for i in items] == ["a", "b", "c"]
        assert peak < 1 << 20, peak


@pytest.mark.parametrize("listed, etag", [
    ({"hash": "m"}, "m"), ({"hash": "m", "slo_etag": '"s"'}, "s"),
    ({}, None)])
def test_the_etag_an_index_is_bound_to(listed, etag):
    assert sources.bound_etag(listed) == etag


def instance_archive(name, ids):
    """A listing entry, the archive's bytes and its index's, for records of
    the instance ids ``ids``."""
    notes = [{"payload": {"instance_id": i}} for i in ids]
    data = b"".join(record.pack({}, b'{"payload":{"instance_id":"%s"}}'
                                % i.encode()) for i in ids)
    found = dict(entry(name, "2026-01-01T00:00:0%d" % len(ids)),
                 hash="etag-" + name)
    built = index.bind(index.build([({}, n) for n in notes]), found["hash"],
                       found["bytes"])
    return found, data, built


class TestBundles:
    def swift(self, bundled, stale=(), damaged=False, gone=0):
        """Archives a (i-1), b (i-2), c (i-1, i-3), d (i-4), each with its
        index; a bundle of ``bundled`` (names), the hashes of ``stale``
        wrong in it, and ``gone`` entries of 512 KiB for archives no
        longer listed."""
        listing, objects, bundle = [], {}, []
        for name, ids in (("a", ["i-1"]), ("b", ["i-2"]),
                          ("c", ["i-1", "i-3"]), ("d", ["i-4", "i-4"])):
            found, data, built = instance_archive(name, ids)
            listing += [found, entry(name + ".index", found["last_modified"])]
            objects[name], objects[name + ".index"] = data, built
            if name in bundled:
                etag = "old" if name in stale else found["hash"]
                bundle.append((name, etag, built))
        bundle += [("gone/%d" % n, "e", b"x" * (512 << 10))
                   for n in range(gone)]
        data = index.build_bundle(bundle)
        if damaged:
            data = data[:-1] + bytes([data[-1] ^ 1])
        listing.append(entry(index.BUNDLE_SUFFIX, "2026-01-02T00:00:00"))
        objects[index.BUNDLE_SUFFIX] = data
        return FakeSwift(listing, objects)

    def kept(self, swift, value):
        items = sources.find(["swift://c"], swift=swift, indexes=True)
        where = select.Selection(where=[select.parse_where(
            "payload.instance_id=" + value)],
            load_index=index.Index.from_bytes)
        return [i.object for i in sources.keep_where(items, where.may_hold)]

    def test_a_bundle_is_never_an_archive(self):
        swift = self.swift("abcd")
        names = [i.object for i in sources.find(["swift://c"], swift=swift)]
        assert names == ["a", "b", "c", "d"]
        assert swift.gets == []  # not needed, not fetched

    def test_indexes_come_from_the_bundle_with_one_get(self):
        swift = self.swift("abcd")
        assert self.kept(swift, "i-1") == ["a", "c"]
        assert swift.gets == [index.BUNDLE_SUFFIX]

    def test_a_stale_entry_or_one_missing_reads_the_own_index(self):
        swift = self.swift("abc", stale="c")
        assert self.kept(swift, "i-1") == ["a", "c"]
        assert sorted(swift.gets) == sorted([index.BUNDLE_SUFFIX, "c.index",
                                             "d.index"])
        swift = self.swift("abc", stale="c")
        assert self.kept(swift, "i-4") == ["d"]

    def test_a_damaged_bundle_is_one_warning_and_every_own_index(
            self, capsys):
        swift = self.swift("abcd", damaged=True)
        assert self.kept(swift, "i-3") == ["c"]
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "damaged index bundle" in err[0]
        assert err[0].startswith("shoebox-worker: warning: swift://c/")
        assert len(swift.gets) == 5

    def test_only_the_listings_entries_are_held(self):
        """A bundle of 8 MiB, nearly all of it for archives no longer
        listed: read as it comes, and only the listed archives' indexes
        held (the whole bundle, before)."""
        import tracemalloc
        swift = self.swift("abcd", gone=16)
        tracemalloc.start()
        try:
            items = sources.find(["swift://c"], swift=swift, indexes=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [i.read_index() == swift.objects[i.object + ".index"]
                for i in items] == [True] * 4
        assert swift.gets == [index.BUNDLE_SUFFIX]
        assert peak < 2 << 20, peak

    def test_a_bundle_longer_than_it_may_be_stops_as_it_comes(
            self, monkeypatch, capsys):
        swift = self.swift("abcd")  # listed as 10 bytes: GET all the same
        monkeypatch.setattr(index, "MAX_BUNDLE_BYTES", 100)
        assert self.kept(swift, "i-1") == ["a", "c"]
        err = capsys.readouterr().err.splitlines()
        assert err == ["shoebox-worker: warning: swift://c/%s: over 100 "
                       "bytes, more than a reader takes for it (100); "
                       "reading the indexes of its archives instead"
                       % index.BUNDLE_SUFFIX]
        assert all(body.closed for body in swift.bodies)

    def test_past_the_cap_the_own_indexes_are_read(self, monkeypatch,
                                                   capsys):
        swift = self.swift("abcd")
        sizes = {n: len(swift.objects[n + ".index"]) for n in "abcd"}
        monkeypatch.setattr(sources, "BUNDLE_MEMORY",
                            sizes["a"] + sizes["b"], raising=False)
        assert self.kept(swift, "i-1") == ["a", "c"]
        assert sorted(swift.gets) == [index.BUNDLE_SUFFIX, "c.index",
                                      "d.index"]
        err = capsys.readouterr().err.splitlines()
        assert err == ["shoebox-worker: warning: swift://c: the bundled "
                       "indexes of 2 archives left out (more than %d bytes "
                       "of them in all); reading their own indexes instead"
                       % (sizes["a"] + sizes["b"])]

    @pytest.mark.parametrize("bundled", ["", "abcd"])
    def test_an_index_not_bound_to_its_archive_prunes_nothing(
            self, bundled, capsys):
        """An index claiming no values, bound to nothing (version 1's
        way) or to another object, in the bundle or on its own: every
        archive is read, one warning line each."""
        swift = self.swift(bundled)
        empty = index.build([])
        forged = {"a": empty, "b": index.bind(empty, "etag-a", 10),
                  "c": index.bind(empty, "etag-c", 11), "d": empty}
        swift.objects.update({n + ".index": forged[n] for n in "abcd"})
        if bundled:
            swift.objects[index.BUNDLE_SUFFIX] = index.build_bundle(
                [(n, "etag-" + n, forged[n]) for n in bundled])
        items = sources.find(["swift://c"], swift=swift, indexes=True)
        where = select.Selection(where=[select.parse_where(
            "payload.instance_id=i-1")], load_index=index.Index.from_bytes)
        kept = sources.keep_where(items, functools.partial(
            read._may_hold, where))
        assert [i.object for i in kept] == ["a", "b", "c", "d"]
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 4, err
        assert err[0] == ("shoebox-worker: warning: swift://c/a.index: "
                          "index not bound to its archive (it names none: "
                          "not shipped yet, or not the worker's); reading "
                          "swift://c/a in full")
        assert "bound to the archive with ETag etag-a, not etag-b" in err[1]
        assert "bound to an archive of 11 bytes, not 10" in err[2]

    def test_a_file_s_index_is_bound_to_its_bytes(self, tmp_path, capsys):
        path = str(tmp_path / "a.events")
        with open(path, "wb") as f:
            f.write(record.pack({}, b'{"payload":{"instance_id":"i-1"}}'))
        index.write_file(index.sidecar(path), index.build([]))  # forged
        where = select.Selection(where=[select.parse_where(
            "payload.instance_id=i-1")], load_index=index.Index.from_bytes)
        (item,) = sources.find([str(tmp_path)])
        assert where.may_hold(item)  # unbound
        index.bind_file(path)
        assert not where.may_hold(item)  # bound: it prunes, as it says
        with open(path, "ab") as f:  # the archive grew since
            f.write(record.pack({}, b'{"payload":{"instance_id":"i-2"}}'))
        assert where.may_hold(item)
        with open(path, "r+b") as f:  # as long as the bound one, other bytes
            f.truncate(os.path.getsize(path) - 1)
            data = f.read()
        index.bind_file(path)
        with open(path, "wb") as f:
            f.write(bytes(len(data)))
        problem = item.binding_problem(index.read_file(path + ".index"))
        assert "index bound to the archive with ETag" in problem

    @pytest.mark.parametrize("bundled,stale", [
        ("abcd", ""), ("ab", ""), ("abcd", "abcd"), ("", ""), ("bd", "b")])
    def test_pruning_never_misses_a_record(self, bundled, stale):
        for value in ("i-1", "i-2", "i-3", "i-4"):
            swift = self.swift(bundled, stale)
            holding = [name for name in "abcd"
                       if value.encode() in swift.objects[name]]
            assert set(holding) <= set(self.kept(swift, value))


# -- bounded index reads ----------------------------------------------------

class SizedConnection(FakeConnection):
    """A connection whose GETs say a ``Content-Length`` (None: none)."""

    def __init__(self, swift, length=None):
        super().__init__(swift)
        self.length = length

    def get_object(self, container, obj, resp_chunk_size=None):
        headers, body = super().get_object(container, obj, resp_chunk_size)
        if self.length is not None:
            headers = {"content-length": str(self.length)}
        return headers, body


def _index_of(records):
    return index.build([({}, {"payload": {"instance_id": "i-%d" % n}})
                        for n in range(records)])


class TestBoundedReads:
    def test_an_index_within_its_limit_is_read_whole(self):
        data = _index_of(3)
        swift = FakeSwift(objects={"o.index": data})
        _, got = sources.get_bounded(SizedConnection(swift, len(data)), "c",
                                     "o.index", index.size_limit,
                                     listed=len(data))
        assert bytes(got) == data
        assert swift.bodies[0].closed

    def test_too_long_by_the_listing_is_not_even_got(self, monkeypatch):
        monkeypatch.setattr(index, "MAX_BYTES", 1000)
        swift = FakeSwift(objects={"o.index": _index_of(3)})
        with pytest.raises(index.exceptions.IndexError_,
                           match=r"^swift://c/o.index: 1001 bytes, more "
                                 r"than a reader takes for it \(1000\)$"):
            sources.get_bounded(FakeConnection(swift), "c", "o.index",
                                index.size_limit, listed=1001)
        assert swift.gets == []

    def test_too_long_for_its_header_by_content_length(self):
        # a header of 1 field and 1 record, then 10 MB: one chunk is read
        data = _index_of(1)[:index.HEAD_BYTES] + bytes(10 << 20)
        data = data[:4] + b"\x01\x00\x01\x00" + data[8:]
        swift = FakeSwift(objects={"o.index": data})
        limit = index.size_limit(data)
        assert limit < 100_000
        with pytest.raises(index.exceptions.IndexError_,
                           match="%d bytes, more than a reader takes for "
                                 "it \\(%d\\)" % (len(data), limit)):
            sources.get_bounded(SizedConnection(swift, len(data)), "c",
                                "o.index", index.size_limit)
        assert swift.bodies[0].closed

    def test_too_long_by_its_bytes_without_content_length(self,
                                                         monkeypatch):
        monkeypatch.setattr(index, "MAX_BYTES", sources.INDEX_CHUNK + 1)
        data = _index_of(50_000)
        assert len(data) > index.MAX_BYTES
        swift = FakeSwift(objects={"o.index": data})
        with pytest.raises(index.exceptions.IndexError_,
                           match="over %d bytes" % index.MAX_BYTES):
            sources.get_bounded(SizedConnection(swift), "c", "o.index",
                                index.size_limit)
        assert swift.bodies[0].closed

    def test_not_an_index_stops_at_its_first_chunk(self):
        swift = FakeSwift(objects={"o.index": b"<html>" * 100_000})
        with pytest.raises(index.exceptions.IndexError_,
                           match="not a shoebox index"):
            sources.get_bounded(SizedConnection(swift), "c", "o.index",
                                index.size_limit)

    def test_a_local_index_is_bounded_too(self, tmp_path, monkeypatch):
        path = tmp_path / "a.events"
        path.write_bytes(archive_bytes(1))
        (tmp_path / "a.events.index").write_bytes(_index_of(2000))
        monkeypatch.setattr(index, "MAX_BYTES", 1000)
        with pytest.raises(index.exceptions.IndexError_,
                           match="a.events.index: over 1000 bytes"):
            sources.FileItem(str(path)).read_index()


class TestSwiftClose:
    def test_a_context_manager_that_closes_what_it_made(self):
        closed = []

        class Conn:
            url = token = None

            def close(self):
                closed.append(self)

        class Callback:
            options = {"auth_version": "1"}

            def new_connection(self, **overrides):
                return Conn()

        with sources.Swift() as swift:
            swift._callback = Callback()
            made = [swift.connection()]
            thread = threading.Thread(
                target=lambda: made.append(swift.connection()))
            thread.start()
            thread.join()
            assert closed == []
        assert sorted(map(id, closed)) == sorted(map(id, made))
        with pytest.raises(OSError, match="closed"):
            swift.connection()  # none is made after


# -- credentials ------------------------------------------------------------

class TestEnvironment:
    def test_st_variables_are_v1(self):
        swift = sources.Swift(environ={
            "ST_AUTH": "http://s/auth/v1.0", "ST_USER": "a:b",
            "ST_KEY": "k", "OS_AUTH_URL": "http://keystone/v3"})
        options = swift.callback.options
        assert (options["auth_version"], options["auth"], options["user"],
                options["key"], options["os_auth_url"]) == (
            "1", "http://s/auth/v1.0", "a:b", "k", "")

    def test_os_variables_are_keystone_v3(self):
        swift = sources.Swift(environ={
            "OS_AUTH_URL": "http://keystone/v3", "OS_USERNAME": "u",
            "OS_PASSWORD": "pw", "OS_PROJECT_NAME": "p",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default", "OS_REGION_NAME": "R1"})
        options = swift.callback.options
        assert options["auth_version"] == "3"
        assert (options["os_username"], options["os_project_name"],
                options["os_region_name"]) == ("u", "p", "R1")
        kwargs = swift.callback.connection_kwargs()
        assert kwargs["os_options"] == {"region_name": "R1"}
        assert "session" in kwargs

    def test_missing_ones_are_named_as_variables(self):
        swift = sources.Swift(environ={"OS_AUTH_URL": "http://k/v3",
                                       "OS_USERNAME": "u",
                                       "OS_PASSWORD": "s3cr3t"})
        with pytest.raises(ToolError) as info:
            assert swift.callback is None
        text = str(info.value)
        assert text.startswith("Swift credentials from the environment: ")
        assert "OS_PROJECT_NAME" in text and "s3cr3t" not in text

    def test_none(self):
        with pytest.raises(ToolError, match="no Swift credentials"):
            assert sources.Swift(environ={}).callback is None

    def test_nothing_is_read_until_swift_is_needed(self, tmp_path):
        path = tmp_path / "a.events"
        path.write_bytes(archive_bytes(1))
        swift = sources.Swift(config_file=str(tmp_path / "missing.conf"))
        assert [i.name for i in sources.find([str(path)], swift=swift)] \
            == [str(path)]

    def test_a_config_without_a_swift_section(self, tmp_path):
        conf = tmp_path / "w.conf"
        conf.write_text("[broker]\nurl = amqp://guest:guest@localhost//\n"
                        "[consumer:q]\nexchange = nova\n")
        swift = sources.Swift(config_file=str(conf), environ={})
        with pytest.raises(ToolError) as info:
            assert swift.callback is None
        assert str(info.value) == (
            "no Swift credentials: %s has no [callback:swift] section, and "
            "neither ST_AUTH, ST_USER, ST_KEY nor OS_AUTH_URL, OS_USERNAME, "
            "OS_PASSWORD, ... are set" % conf)

    def test_the_samples_config_reads_swift_from_the_environment(
            self, monkeypatch):
        # replay --config etc/shoebox-worker.conf.sample swift://...: the
        # broker from the config, Swift as the swift CLI finds it
        root = pathlib.Path(__file__).resolve().parents[3]
        monkeypatch.chdir(root)
        swift = sources.Swift(
            config_file="etc/shoebox-worker.conf.sample",
            environ={"ST_AUTH": "http://127.0.0.1:8080/auth/v1.0",
                     "ST_USER": "test:tester", "ST_KEY": "testing"})
        callback = swift.callback
        assert callback.options["auth"] == "http://127.0.0.1:8080/auth/v1.0"
        assert callback.options["user"] == "test:tester"


# -- streams and read-ahead -------------------------------------------------

def swift_of(count, records=50, chunk=64):
    names = ["o%d" % i for i in range(count)]
    swift = FakeSwift([entry(n, str(i)) for i, n in enumerate(names)],
                      {n: archive_bytes(records, n) for n in names})
    return swift, names


class TestStreams:
    def test_an_object_reads_as_its_bytes(self, monkeypatch):
        monkeypatch.setattr(sources, "GET_CHUNK", 7)
        swift, names = swift_of(1)
        [item] = sources.find(["swift://c"], swift=swift)
        with item.open() as f:
            assert f.read(3) + f.read() == swift.objects["o0"]
        assert swift.bodies[0].closed

    def test_a_missing_object_is_enoent(self):
        swift, _ = swift_of(1)
        [item] = sources.find(["swift://c"], swift=swift)
        del swift.objects["o0"]
        with pytest.raises(OSError) as info:
            archive.ArchiveReader(item.open(), name=item.name)
        assert info.value.errno == errno.ENOENT
        assert "404" in info.value.strerror

    def test_a_broken_download_is_eio(self, monkeypatch):
        monkeypatch.setattr(sources, "GET_CHUNK", 16)
        swift, _ = swift_of(1)
        swift.fail["o0"] = 3
        [item] = sources.find(["swift://c"], swift=swift)
        with sources.read_ahead([item], 2) as ahead:
            for it in ahead:
                with pytest.raises(OSError) as info:
                    list(archive.ArchiveReader(it.open(), name=it.name))
        assert info.value.errno == errno.EIO
        assert "broke off" in info.value.strerror

    @pytest.mark.parametrize("jobs", [1, 2, 5])
    def test_read_ahead_keeps_the_order_and_gets_each_once(
            self, monkeypatch, jobs):
        monkeypatch.setattr(sources, "GET_CHUNK", 32)
        swift, names = swift_of(7)
        items = sources.find(["swift://c"], swift=swift)
        got = []
        with sources.read_ahead(items, jobs) as ahead:
            for item in ahead:
                with archive.ArchiveReader(item.open(),
                                           name=item.name) as reader:
                    got.append(b"".join(p for _, p in reader))
        assert got == [b"".join(b'{"%s":%d}' % (n.encode(), i)
                                for i in range(50)) for n in names]
        assert sorted(swift.gets) == names

    def test_read_ahead_starts_at_most_jobs_ahead(self):
        swift, names = swift_of(6)
        items = sources.find(["swift://c"], swift=swift)
        started = []
        with sources.read_ahead(items, 3) as ahead:
            for item in ahead:
                started.append(sum(1 for i in items
                                   if i._download is not None))
                with item.open() as f:
                    f.read()
        assert started == [3, 3, 3, 3, 2, 1]

    def test_leaving_cancels_what_was_not_read(self, monkeypatch):
        monkeypatch.setattr(sources, "GET_CHUNK", 8)
        swift, names = swift_of(4, records=400)
        items = sources.find(["swift://c"], swift=swift)
        with sources.read_ahead(items, 4) as ahead:
            for item in ahead:
                with item.open() as f:
                    f.read(10)
                break
        for thread in ahead._threads:
            thread.join(5)
            assert not thread.is_alive()
        assert all(i._download is None for i in items)

    def test_local_files_are_opened_in_place(self, tmp_path):
        path = tmp_path / "a.events"
        path.write_bytes(archive_bytes(3))
        items = sources.find([str(path)])
        with sources.read_ahead(items, 4) as ahead:
            [item] = list(ahead)
        assert ahead._threads == []
        with item.open() as f:
            assert f.read() == archive_bytes(3)

    def test_item_of(self, tmp_path):
        path = str(tmp_path / "x")
        item = sources.item_of(path)
        assert (item.name, item.listed, item.size) == (path, False, None)
        assert sources.item_of(item) is item
        assert os.fspath(item.path) == path
