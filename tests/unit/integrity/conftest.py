"""Fixtures of the integrity tests: a store in memory, a clock the test
moves, a key pair, and the chain of a worker on them (``world``)."""

import collections
import datetime
import hashlib
import os

import pytest

from shoebox_worker import archive
from shoebox_worker import contract
from shoebox_worker import exceptions
from shoebox_worker.integrity import audit as audit_mod
from shoebox_worker.integrity import chain as chain_mod
from shoebox_worker.integrity import digest as digest_mod
from shoebox_worker.integrity import keys

#: 2026-12-07T00:00:00Z
EPOCH = 1796601600.0
HOST = "host-12"
#: The run token of a worker's archive names.
RUN = "0123456789ab"
INTERVAL = 300


def _utc(moment):
    return datetime.datetime.fromtimestamp(moment, datetime.UTC)


class Clock:
    """Both the wall clock and the monotonic one of a chain."""

    def __init__(self, now=EPOCH):
        self.now = now

    def time(self):
        return self.now

    def monotonic(self):
        return self.now

    def datetime(self):
        return _utc(self.now)

    def advance(self, seconds):
        self.now += seconds


class Store:
    """A container in memory: ``put_digest`` as the swift step has it
    (never over other bytes; told to fail ``fail`` times), and what an
    audit reads (listing, GET, HEAD)."""

    def __init__(self, clock):
        self.clock = clock
        self.objects = {}    # name -> bytes
        self.sha256 = {}     # name -> X-Object-Meta-Sha256
        self.modified = {}   # name -> datetime (UTC)
        self.fail = 0
        self.puts = []       # every put_digest name, failed or not

    def put_digest(self, name, data):
        self.puts.append(name)
        if self.fail:
            self.fail -= 1
            raise exceptions.UploadError("the store refused it",
                                         callback="swift", filename=name)
        if name in self.objects:
            if self.objects[name] != data:
                raise exceptions.UploadError("holds other bytes: a digest "
                                             "is never replaced")
            return
        self.put(name, data)

    def put(self, name, data, modified=None):
        self.objects[name] = data
        self.sha256[name] = hashlib.sha256(data).hexdigest()
        self.modified[name] = modified or self.clock.datetime()

    def delete(self, name):
        for table in (self.objects, self.sha256, self.modified):
            del table[name]

    def listing(self):
        return [{"name": name, "bytes": len(data),
                 "hash": hashlib.md5(data).hexdigest(),
                 "last_modified": self.modified[name].replace(
                     tzinfo=None).isoformat(timespec="microseconds")}
                for name, data in sorted(self.objects.items())]

    def get(self, name):
        return self.objects[name]

    def head(self, name):
        if name not in self.objects:
            return None
        return {"etag": hashlib.md5(self.objects[name]).hexdigest(),
                "x-object-meta-sha256": self.sha256[name]}

    def digests(self):
        """``[(name, body)]`` of the digests, in name order."""
        return [(name, digest_mod.parse(data)[0])
                for name, data in sorted(self.objects.items())
                if digest_mod.parse_name(digest_mod.DEFAULT_PREFIX, name)]


class Stats:
    def __init__(self):
        self.stored = 0
        self.failed = 0

    def digest_stored(self):
        self.stored += 1

    def digest_failed(self):
        self.failed += 1


class World:
    """A worker's working directory, key and store, and its archives."""

    def __init__(self, root):
        self.work = str(root / "work")
        os.makedirs(self.work)
        self.private, self.public = keys.keygen(str(root / "keys"))
        self.pinned = [keys.public_text(keys.load_public(self.public))]
        self.clock = Clock()
        self.store = Store(self.clock)
        self.stats = Stats()
        self.sequence = 0
        self.shipped = []    # the names of the archives recorded

    def chain(self, **changes):
        options = dict(directory=self.work, signing_key=self.private,
                       store=self.store, interval=INTERVAL, stats=self.stats,
                       host=HOST, clock=self.clock.time,
                       monotonic=self.clock.monotonic)
        options.update(changes)
        return chain_mod.Chain(**options)

    def key_text(self):
        """The public key of the key file now."""
        return keys.public_text(keys.load_private(self.private))

    def archive(self, run=RUN, sequence=None, data=None):
        """An archive put in the store a second after the last thing that
        happened: ``(stored, report, origin)``."""
        self.clock.advance(1)
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        base = "shoebox_20261207T000000_%s_%s-%d.events" % (HOST, run,
                                                            sequence)
        origin = os.path.join(self.work, base)
        name = "archives/" + base
        data = data or b"archive %s %d\n" % (run.encode(), sequence) * 10
        self.store.put(name, data)
        stored = contract.Stored(
            origin, name=name, size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            etag=hashlib.md5(data).hexdigest())
        first = 100 * sequence
        report = archive.ArchiveReport(
            origin, records=10, size=len(data),
            first_metadata={"queue": "q", "stream_offset": str(first)},
            last_metadata={"queue": "q", "stream_offset": str(first + 99)},
            earliest=(self.clock.datetime() - datetime.timedelta(
                minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            latest=self.clock.datetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        return stored, report, origin

    def ship(self, chain, count=1, **kwargs):
        """``count`` archives stored and recorded; their names."""
        names = []
        for _ in range(count):
            stored, report, origin = self.archive(**kwargs)
            chain.record(stored, report, origin)
            names.append(stored.name)
        self.shipped.extend(names)
        return names

    def digest(self, chain):
        """Let an interval pass and tick."""
        self.clock.advance(INTERVAL)
        chain.tick()

    def audit(self, pinned=None, **kwargs):
        kwargs.setdefault("now", self.clock.datetime())
        return audit_mod.audit(
            self.store.listing(), self.store.get, self.store.head,
            self.pinned if pinned is None else pinned, **kwargs)

    def listed(self):
        """How many times each archive is listed in the stored digests."""
        return collections.Counter(
            entry["name"] for _, body in self.store.digests()
            for entry in body["archives"])


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)
