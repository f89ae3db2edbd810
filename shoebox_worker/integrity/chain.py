"""The worker's side of the chain: every archive the store verified is
recorded, and at least every ``digest_interval`` a signed digest lists
them, in the container the archives went to.

**State.** A chain belongs to one worker identity (host, working
directory) and lives in the working directory, in ``.integrity/``:

- ``chain.json``: the chain's id, host and directory, the next digest's
  ``seq``, the last digest's name and SHA-256 (``previous``), when it was
  made and whether it was a clean stop's (``final``), the public key the
  next digest is signed with (``key``), and the archives recorded since
  (``pending``). Replaced atomically (temporary file, fsync, rename,
  directory fsync) at every change.
- ``outgoing/<chain>-<seq>.json``: a digest signed and not yet confirmed
  in the store, byte for byte (named by its chain too: a new chain's
  never takes the place of an older chain's still waiting).
- ``lock``: every change happens under a ``flock`` on it, so the
  processes of ``[worker] processes = N`` (one identity) share the chain.

**Recording** (:meth:`Chain.record`) happens in the shipping thread right
after a storing step returned a :class:`~shoebox_worker.contract.Stored`,
before the archive's state file moves on: a crash in between runs the
step again, which finds the object there and returns the same, and an
archive is recorded once whatever the number of attempts (by name).

**A digest** (:meth:`Chain.tick`, :meth:`Chain.close`) is made under the
lock, in this order, each step durable before the next:

1. the next key is written to ``<signing_key>.next``
   (:func:`~shoebox_worker.integrity.keys.write_next`);
2. the digest, listing the pending archives and announcing that key, is
   signed with the current one and written to ``outgoing/``;
3. ``chain.json`` moves on (``seq`` + 1, ``previous`` = this digest,
   ``key`` = the next one, the listed archives out of ``pending``);
4. the next key replaces the current one, whose bytes are then written
   over (:func:`~shoebox_worker.integrity.keys.install_next`: the old
   key keeps a second name, ``<signing_key>.old``, until they are);
5. the digest is put in the store (never over an object; checked), then
   removed from ``outgoing/``.

A crash between any two steps is finished at the next start (and by any
process that takes the lock): a digest in ``outgoing/`` that
``chain.json`` does not know yet moves it on (3), a key announced and not
installed is installed (4), an old key whose bytes were not written over
yet (``.old``) is written over (4), a ``.next`` key that no digest
announced is removed, and what is in ``outgoing/`` is put. So the key on
disk can sign only what comes after the last digest it announced.

**A new chain** starts when there is no ``chain.json`` (a first start, or
a working directory lost), when it was made for another host or
directory, when its digests went elsewhere (another container or
``digest_prefix``: a chain lives in one place), or when the key at
``signing_key`` is not the one the chain announced: its first digest
(``seq`` 0) says why (``start``), lists what the old chain recorded and
did not list yet, and is signed with the key at ``signing_key``, which a
verifier accepts only when it is pinned or was announced by another
chain's digest reached from a pinned key.

**Failures.** A digest that cannot be put stays in ``outgoing/`` and is
tried again at the next tick (at most every ``digest_interval``, at least
every :data:`RETRY_MIN` seconds): it holds no archive back. Failures are
counted (``stats.digest_failed()``) and logged once per episode, and once
more when a digest is stored again. A disk that refuses the chain's own
files fails :meth:`Chain.record`, which the shipper retries as it does a
state file.
"""

import datetime
import json
import logging
import os
import re
import secrets
import socket
import time

from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.integrity import digest as digest_mod
from shoebox_worker.integrity import keys

__all__ = ["Chain", "STATE_DIR", "check", "entry_for", "store_of"]

LOG = logging.getLogger(__name__)

#: The chain's folder in the working directory.
STATE_DIR = ".integrity"
STATE_FILE = "chain.json"
OUTGOING = "outgoing"
LOCK_FILE = "lock"
#: The record metadata key of a stream offset (the consumer's
#: ``stream.METADATA_KEY``; integrity sits below consume/).
OFFSET_KEY = "stream_offset"
#: A digest that failed to go out is tried again at least this often.
RETRY_MIN = 5.0
#: ``_<run token>-<sequence>`` in a worker's archive names
#: (:mod:`shoebox_worker.roll_manager`).
_UNIQUE = re.compile(r"_(?P<run>[0-9a-f]{12})-(?P<seq>[0-9]+)(?=[.~]|$)")

E_DIGEST = ("cannot store digest %s (%s): it is kept in %s and tried again; "
            "archives keep shipping")
I_DIGEST_AGAIN = "digests are stored again, after %d failed attempt(s) in %s"
W_NEW_CHAIN = "integrity: a new chain %s starts in %s: %s"


def _utc(moment):
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _offsets(report):
    """``{queue: [first, last]}`` of the stream offsets the archive
    holds, from its first and last records (None when it holds none)."""
    first = report.first_metadata or {}
    last = report.last_metadata or {}
    key = OFFSET_KEY
    try:
        low, high = int(first[key]), int(last[key])
    except (KeyError, TypeError, ValueError):
        return None
    queue = first.get("queue") or last.get("queue") or ""
    return {queue: [low, high]}


def entry_for(stored, report, origin):
    """What a digest lists of one stored archive.

    :param stored: the :class:`~shoebox_worker.contract.Stored` a step
        returned.
    :param report: the archive's
        :class:`~shoebox_worker.archive.ArchiveReport`, or None.
    :param origin: the path the worker wrote it under (its name holds the
        run and sequence).
    """
    entry = {"name": stored.name, "size": int(stored.size),
             "sha256": stored.sha256, "etag": stored.etag}
    if report is not None:
        entry["records"] = report.records
        entry["earliest"] = report.earliest
        entry["latest"] = report.latest
        offsets = _offsets(report)
        if offsets is not None:
            entry["offsets"] = offsets
    match = _UNIQUE.search(os.path.basename(origin))
    if match is not None:
        entry["run"] = match.group("run")
        entry["sequence"] = int(match.group("seq"))
    return entry


def check(config, steps):
    """What the worker (``run``, ``check-config``) needs of
    ``[integrity]``, which the tools that read the same config do not: a
    key it can read, a storing step, and a key folder it can write (the
    key is replaced there at every digest).

    :raises ConfigError: one of them is missing.
    """
    try:
        keys.load_private(config.integrity.signing_key)
    except keys.KeyError_ as err:
        raise exceptions.ConfigError(
            "%s (shoebox-worker keygen DIR makes one)" % err,
            config.filename, "integrity", "signing_key") from None
    store_of(config, steps)
    folder = os.path.dirname(config.integrity.signing_key)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise exceptions.ConfigError(
            "the worker replaces this file with the next key at every "
            "digest, and cannot write in %s" % folder, config.filename,
            "integrity", "signing_key")


def store_of(config, steps):
    """Where ``[integrity]`` digests go: the first step of the chain
    that stores them (has ``put_digest``: ``swift``).

    :param steps: ``[(name, callback), ...]``.
    :raises ConfigError: none does.
    """
    store = next((callback for _, callback in steps
                  if callable(getattr(callback, "put_digest", None))), None)
    if store is None:
        raise exceptions.ConfigError(
            "needs a step that stores archives and digests in [archive] "
            "callbacks (swift); it has: %s" % (
                ", ".join(name for name, _ in steps) or "none"),
            config.filename, "integrity", "signing_key")
    return store


class Chain:
    """One worker identity's chain of signed digests.

    :param directory: the working directory (the chain's state goes in
        its ``.integrity/``).
    :param signing_key: ``[integrity] signing_key``: the key file, which
        is replaced at every digest.
    :param store: where digests go: an object with ``put_digest(name,
        data)`` (the ``swift`` step).
    :param prefix: ``[integrity] digest_prefix``.
    :param interval: ``[integrity] digest_interval`` (seconds).
    :param stats: optional, with ``digest_stored()`` and
        ``digest_failed()``.
    :param host: the identity's host (default: this host's name).
    """

    def __init__(self, *, directory, signing_key, store,
                 prefix=digest_mod.DEFAULT_PREFIX, interval=300, stats=None,
                 host=None, clock=time.time, monotonic=time.monotonic):
        self.directory = os.path.abspath(directory)
        self.signing_key = os.path.abspath(signing_key)
        self.store = store
        self.prefix = prefix
        #: where the digests go: a chain lives in one place (a store
        #: that says where it is, as ``location``, and the prefix)
        self.location = "%s/%s" % (getattr(store, "location", "?"), prefix)
        self.interval = int(interval)
        self.stats = stats
        self.host = host or socket.gethostname()
        self._clock = clock
        self._monotonic = monotonic
        self.root = os.path.join(self.directory, STATE_DIR)
        self.state_path = os.path.join(self.root, STATE_FILE)
        self.outgoing = os.path.join(self.root, OUTGOING)
        self._last_digest = monotonic()
        self._retry_at = 0.0
        self._failing = None  # (attempts, since) while digests fail

    # -- what the shipper calls ---------------------------------------

    def open(self):
        """Check the key, finish what a crash left, start a chain if
        there is none. What ``outgoing/`` holds is put by the first
        :meth:`tick`, in the shipping thread: a store that is down never
        holds the worker's start.

        :raises KeyError_: the signing key cannot be read.
        """
        os.makedirs(self.outgoing, mode=0o700, exist_ok=True)
        with self._locked():
            self._recover()

    def record(self, stored, report, origin):
        """Record one archive the store verified (durably, under the lock;
        once per object name)."""
        entry = entry_for(stored, report, origin)
        with self._locked():
            state = self._recover()
            if any(e["name"] == entry["name"] for e in state["pending"]):
                return
            state["pending"].append(entry)
            self._write_state(state)

    def tick(self):
        """Make a digest when archives wait and ``digest_interval`` has
        passed since the last; put what is not stored yet."""
        now = self._monotonic()
        if now - self._last_digest >= self.interval:
            with self._locked():
                state = self._recover()
                if state["pending"]:
                    self._make(state, final=False)
            self._last_digest = now
        if now >= self._retry_at:
            self._flush()

    def close(self):
        """At a clean stop: a final digest of what is pending (of nothing,
        when the chain's last digest is not final: a tick listed it all,
        and the chain must still say that it ended with a clean stop),
        and one attempt to put what is not stored yet."""
        with self._locked():
            state = self._recover()
            if state["pending"] or (state["previous"] is not None
                                    and not state.get("final")):
                self._make(state, final=True)
        self._flush()

    # -- state ---------------------------------------------------------

    def _locked(self):
        return files.FileLock(os.path.join(self.root, LOCK_FILE),
                              blocking=True)

    def _read_state(self):
        try:
            data = files.read_regular(self.state_path)
        except FileNotFoundError:
            return None
        try:
            state = json.loads(data)
            if not (isinstance(state, dict) and isinstance(state.get("seq"),
                                                           int)
                    and isinstance(state.get("pending"), list)
                    and isinstance(state.get("chain"), str)
                    and isinstance(state.get("key"), str)):
                raise ValueError("not a chain state")
        except ValueError as exc:
            LOG.error("%s does not parse (%s): a new chain starts",
                      self.state_path, exc)
            return None
        return state

    def _write_state(self, state):
        files.write_atomic(self.state_path,
                           json.dumps(state, sort_keys=True).encode())

    def _new_chain(self, reason, pending=()):
        """Start a chain (``pending``: archives the old one recorded and
        listed in no digest yet: the new one lists them)."""
        chain = secrets.token_hex(16)
        key = keys.load_private(self.signing_key)
        state = {"chain": chain, "host": self.host,
                 "directory": self.directory, "location": self.location,
                 "seq": 0, "previous": None,
                 "created": _utc(self._clock()), "key": keys.public_text(key),
                 "start": {"reason": reason}, "pending": list(pending)}
        LOG.warning(W_NEW_CHAIN, chain, self.directory, reason)
        self._write_state(state)
        return state

    def _outgoing(self):
        """``[(seq, path)]`` of the digests not confirmed stored, in
        order."""
        found = []
        for name in os.listdir(self.outgoing):
            stem, dot, ext = name.partition(".")
            _, dash, seq = stem.partition("-")
            if dot and ext == "json" and dash and seq.isdigit():
                found.append((int(seq), os.path.join(self.outgoing, name)))
        return sorted(found)

    def _recover(self):
        """The chain's state, once whatever a crash left is finished (see
        the module documentation); under the lock."""
        state = self._read_state()
        for seq, path in self._outgoing():
            if state is None or seq != state["seq"]:
                continue
            data = files.read_regular(path)
            body, _ = digest_mod.parse(data)
            if body["chain"] != state["chain"]:
                continue
            state = self._advanced(state, body, data)
            self._write_state(state)
        keys.wipe_old(self.signing_key)  # step 4's zeros, cut short
        public = keys.public_text(keys.load_private(self.signing_key))
        nxt = self.signing_key + keys.NEXT_SUFFIX
        if state is not None and public != state["key"] and \
                os.path.exists(nxt) and keys.public_text(
                    keys.load_private(nxt)) == state["key"]:
            keys.install_next(self.signing_key)  # step 4, cut short
            public = state["key"]
        if os.path.exists(nxt):
            os.unlink(nxt)  # made, never announced
            files.fsync_directory(nxt)
        if state is None:
            return self._new_chain(
                "no chain state in %s (a first start, or the working "
                "directory was lost)" % self.root
                if not os.path.exists(self.state_path)
                else "the chain state in %s did not parse" % self.state_path)
        if (state.get("host"), state.get("directory")) != (self.host,
                                                           self.directory):
            return self._new_chain("the chain state was made for %s:%s" % (
                state.get("host"), state.get("directory")), state["pending"])
        if state.get("location", self.location) != self.location:
            return self._new_chain(
                "digests now go to %s; chain %s went to %s"
                % (self.location, state["chain"], state["location"]),
                state["pending"])
        if public != state["key"]:
            return self._new_chain(
                "the key at %s is not the one chain %s announced at seq %d"
                % (self.signing_key, state["chain"], state["seq"] - 1),
                state["pending"])
        return state

    def _advanced(self, state, body, data):
        listed = {e["name"] for e in body["archives"]}
        return dict(state, seq=body["seq"] + 1, previous={
            "name": digest_mod.name(self.prefix, body["chain"], body["seq"]),
            "sha256": digest_mod.sha256(data)},
            created=body["created"], key=body["next_public_key"],
            final=bool(body.get("final")), start=None,
            pending=[e for e in state["pending"] if e["name"] not in listed])

    def _make(self, state, final):
        """Steps 1 to 4 of a digest (module documentation)."""
        key = keys.load_private(self.signing_key)
        nxt = keys.write_next(self.signing_key)
        created = _utc(self._clock())
        body = {
            "format": digest_mod.FORMAT, "chain": state["chain"],
            "seq": state["seq"], "host": state["host"],
            "directory": state["directory"], "created": created,
            "range": {"from": state["created"], "to": created},
            "previous": state["previous"], "public_key": state["key"],
            "next_public_key": keys.public_text(nxt),
            "interval": self.interval, "final": bool(final),
            "archives": state["pending"],
        }
        if state.get("start"):
            body["start"] = state["start"]
        data = digest_mod.sign(body, key)
        path = os.path.join(self.outgoing, "%s-%012d.json" % (
            state["chain"], state["seq"]))
        files.write_atomic(path, data)
        self._write_state(self._advanced(state, body, data))
        keys.install_next(self.signing_key)
        LOG.info("integrity: digest %s lists %d archive(s)",
                 digest_mod.name(self.prefix, state["chain"], state["seq"]),
                 len(state["pending"]))

    def _flush(self):
        """Put every digest of ``outgoing/`` in the store, in order;
        stop at the first failure (tried again later). Under the lock:
        the processes sharing the chain put each digest once."""
        with self._locked():
            self._flush_locked()

    def _flush_locked(self):
        for seq, path in self._outgoing():
            try:
                data = files.read_regular(path)
                body, _ = digest_mod.parse(data)
            except (OSError, digest_mod.DigestError) as exc:
                LOG.error("integrity: %s cannot be read (%s): left there",
                          path, exc)
                return
            name = digest_mod.name(self.prefix, body["chain"], seq)
            try:
                self.store.put_digest(name, data)
            except exceptions.ShoeboxError as exc:
                self._failed(name, exc)
                return
            os.unlink(path)
            files.fsync_directory(path)
            self._stored()

    def _failed(self, name, exc):
        now = self._monotonic()
        self._retry_at = now + max(RETRY_MIN, min(self.interval, 60))
        if self.stats is not None:
            self.stats.digest_failed()
        if self._failing is None:
            self._failing = [0, now]
            LOG.error(E_DIGEST, name, exc, self.outgoing)
        self._failing[0] += 1

    def _stored(self):
        if self.stats is not None:
            self.stats.digest_stored()
        if self._failing is not None:
            attempts, since = self._failing
            self._failing = None
            LOG.info(I_DIGEST_AGAIN, attempts, exceptions.duration(
                self._monotonic() - since))

