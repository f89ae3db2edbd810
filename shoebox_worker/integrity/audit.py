"""``verify --chain``: walk every chain of digests in a store and say what
does not hold.

What it is given: the store's listing (name, bytes, hash, last modified,
as Swift lists them), a way to read an object whole (for the digests),
one to HEAD one (an archive's ``X-Object-Meta-Sha256``) and, for
``--deep``, one to hash one as it is read. What it trusts: the public
keys pinned on its command line, nothing else. What it finds
(:class:`Finding`, one line each; ``failure`` ones make the command exit
1):

- a digest that cannot be read or parsed, missing from the middle of its
  chain (a ``seq`` not there between two that are), or altered (its
  SHA-256 is not what the next digest of its chain says);
- a digest whose signature does not verify with the key the previous
  digest of its chain announced (``re-signed``: a later key cannot sign
  an earlier place), or a chain whose first digest is signed by a key
  neither pinned nor announced by a digest of another chain that is
  itself reached from a pinned key (two chains cannot vouch for each
  other); a key that signs two digests (a fork);
- an archive listed in a digest and missing, or whose size, ETag (from
  the listing) or SHA-256 (HEAD; with ``--deep``, its bytes) differs;
- an archive in the store that no digest lists (``inserted``), unless it
  is newer than the newest digest and younger than twice its chain's
  ``interval`` (``pending``, not a failure: the next digest lists it), or
  was stored before the first chain started (``unchained``, not a
  failure: an archive shipped before ``[integrity]`` was on);
- a gap in an archive sequence (a worker run's archives are numbered);
- a head seen at an earlier audit (``expect``) that is gone
  (``truncated``: the chain's newest digests deleted) or changed;
- and, not as failures, each chain's state (digests, archives, time since
  its last digest, whether it ended with a clean stop), why each chain
  that is not the first started, and gaps in a stream's offsets (a
  stream has gaps of its own: :mod:`shoebox_worker.consume.stream`).

The archives are checked from the listing and one HEAD each: the bytes
read are the digests' (:attr:`Audit.bytes_read`), unless ``deep``.
"""

import concurrent.futures
import dataclasses
import datetime
import hashlib
import re

from shoebox_worker.integrity import digest as digest_mod
from shoebox_worker.integrity import keys

__all__ = ["Finding", "Audit", "audit"]

#: An archive newer than the newest digest is ``pending``, not
#: ``inserted``, for this many chain intervals after it was stored (plus
#: :data:`PENDING_SLACK` seconds).
PENDING_INTERVALS = 2
PENDING_SLACK = 60
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class Finding:
    """One line of the report."""

    kind: str
    name: str
    message: str
    failure: bool = True

    def line(self):
        return "%s %s: %s" % (self.kind.upper(), self.name, self.message)


@dataclasses.dataclass
class _Digest:
    name: str
    chain: str
    seq: int
    data: bytes
    body: dict = None
    signature: bytes = None
    sha256: str = ""
    trusted: bool = False  # signed with the key its place calls for
    # trusted, and reached from a pinned key through trusted digests only:
    # only such a digest vouches for the first key of another chain
    anchored: bool = False


@dataclasses.dataclass
class Audit:
    """What :func:`audit` found."""

    findings: list
    chains: list          # one dict per chain (the summary lines)
    digests: int = 0
    archives: int = 0     # archives listed in trusted digests
    archive_bytes: int = 0
    bytes_read: int = 0

    @property
    def failed(self):
        return any(f.failure for f in self.findings)


def _time(text):
    """A UTC time from a digest (``...Z``) or a Swift listing (naive),
    or None."""
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.rstrip("Z"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment


def _overlaps(entry_from, entry_to, since, until):
    low, high = _time(entry_from), _time(entry_to)
    if since is not None and high is not None and high < since:
        return False
    if until is not None and low is not None and low >= until:
        return False
    return True


def audit(listing, get, head, pinned, *, digest_prefix=
          digest_mod.DEFAULT_PREFIX, prefix="", deep=None, since=None,
          until=None, now=None, jobs=8, is_archive=lambda entry: True,
          expect=()):
    """Check every chain in a store.

    :param listing: the container's entries (dicts with ``name``,
        ``bytes``, ``hash``, ``last_modified``), archives and digests.
    :param get: ``get(name) -> bytes``, a digest object's bytes.
    :param head: ``head(name) -> headers`` (lower-case names), or None
        when the object is gone.
    :param pinned: the trusted public keys (``ed25519:...`` text).
    :param prefix: only archives under it are looked at.
    :param deep: None, or ``deep(name) -> (size, sha256)`` of its bytes.
    :param since: datetime (UTC) or None: archives and digests before it
        are not checked (chains are walked whole all the same).
    :param until: likewise, after it.
    :param now: datetime (UTC) for ages (default: now).
    :param jobs: HEADs (or reads) at a time.
    :param is_archive: ``is_archive(entry)``: whether a listing entry (not
        under ``digest_prefix``) is an archive (not an index, a segment,
        a bundle...).
    :param expect: heads seen before, ``(chain, seq, sha256)``: each
        digest must still be there with those bytes (a chain whose
        newest digests were deleted, with what they listed, is found so).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    pinned = set(pinned)
    findings = []
    digests, archives = [], {}
    for entry in listing:
        name = entry["name"]
        parsed = digest_mod.parse_name(digest_prefix, name)
        if parsed is not None:
            digests.append(_Digest(name, parsed[0], parsed[1], b""))
        elif name.startswith(digest_prefix):
            findings.append(Finding("unknown", name, "under the digest "
                                    "prefix, not named as a digest"))
        elif name.startswith(prefix) and is_archive(entry):
            archives[name] = entry
    result = Audit(findings, [], digests=len(digests))

    def load(d):
        d.data = get(d.name)
        return d

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for d, outcome in zip(digests, pool.map(_try(load), digests),
                              strict=True):
            if isinstance(outcome, Exception):
                findings.append(Finding("unreadable", d.name, str(outcome)))
                continue
            result.bytes_read += len(d.data)
            d.sha256 = digest_mod.sha256(d.data)
            try:
                d.body, d.signature = digest_mod.parse(d.data)
            except digest_mod.DigestError as exc:
                findings.append(Finding("unreadable", d.name, str(exc)))
                continue
            if (d.body["chain"], d.body["seq"]) != (d.chain, d.seq):
                findings.append(Finding(
                    "altered", d.name, "says it is seq %d of chain %s"
                    % (d.body["seq"], d.body["chain"])))
                d.body = None

    readable = [d for d in digests if d.body is not None]
    chains = {}
    for d in sorted(readable, key=lambda d: (d.chain, d.seq)):
        chains.setdefault(d.chain, []).append(d)
    # every key a digest announces, and where
    announced = {}
    for d in readable:
        announced.setdefault(d.body["next_public_key"], []).append(d)
    signers = {}
    waiting = dict(chains)

    def deferred(chain, first):
        """A chain that starts with a key no anchored digest announced
        yet, but a chain still to walk does: walked after it (chains
        cannot vouch for each other)."""
        key = first.body["public_key"]
        if first.seq != 0 or key in pinned:
            return False
        others = [a for a in announced.get(key, ()) if a.chain != chain]
        return not any(a.anchored for a in others) and \
            any(a.chain in waiting for a in others)

    while waiting:
        ready = [chain for chain, links in waiting.items()
                 if not deferred(chain, links[0])] or list(waiting)
        for chain in ready:
            _walk(chain, waiting.pop(chain), pinned, announced, findings,
                  signers)
    for users in signers.values():
        if len(users) > 1:
            for d in users[1:]:
                findings.append(Finding(
                    "fork", d.name, "signed with the key that also signed "
                    "%s: one key, two places" % users[0].name))

    listed = {}
    for d in readable:
        if not d.trusted:
            continue
        for entry in d.body["archives"]:
            listed.setdefault(entry["name"], (entry, d))
    result.archives = len(listed)
    result.archive_bytes = sum(e.get("size", 0) for e, _ in listed.values())
    wanted = [(entry, d) for entry, d in listed.values()
              if entry["name"].startswith(prefix)
              and _overlaps(entry.get("earliest") or d.body["range"]["from"],
                            entry.get("latest") or d.body["range"]["to"],
                            since, until)]
    _check_archives(wanted, archives, head, deep, findings, result, jobs)
    _check_unlisted(archives, listed, readable, since, until, now, findings)
    _check_sequences(listed, findings)
    _check_heads(expect, digests, digest_prefix, findings)
    for chain, links in chains.items():
        result.chains.append(_summary(chain, links, now))
    return result


def _try(function):
    def call(arg):
        try:
            return function(arg)
        except Exception as exc:  # reported as a finding, one line
            return exc
    return call


def _walk(chain, links, pinned, announced, findings, signers):
    """Check one chain's links in order: no seq missing, each previous
    hash, each signature with the key its place calls for."""
    previous = None
    anchored = False  # the places so far are reached from a pinned key
    for d in links:
        body = d.body
        expected = None  # the key this place calls for
        if previous is not None and d.seq == previous.seq + 1:
            expected = previous.body["next_public_key"]
            link = body.get("previous") or {}
            if link.get("name") != previous.name or \
                    link.get("sha256") != previous.sha256:
                findings.append(Finding(
                    "altered", previous.name, "its SHA-256 is %s; the next "
                    "digest, %s, says %s" % (previous.sha256, d.name,
                                            link.get("sha256"))))
        elif previous is not None or d.seq != 0:
            start = 0 if previous is None else previous.seq + 1
            for seq in range(start, d.seq):
                findings.append(Finding(
                    "digest-missing", digest_mod.name(
                        d.name[:d.name.index(chain)], chain, seq),
                    "seq %d of chain %s is not in the store" % (seq, chain)))
            # checked with the key it names: nothing before it vouches
            # for that key
            expected = body["public_key"]
            anchored = False
            findings.append(Finding(
                "unchecked", d.name, "its key cannot be reached through the "
                "chain: the digest before it is missing"))
        else:
            if body["public_key"] in pinned:
                expected = body["public_key"]
                anchored = True
            else:
                before = [a for a in announced.get(body["public_key"], ())
                          if a.chain != chain and a.anchored]
                if before:
                    expected = body["public_key"]
                    anchored = True
                else:
                    findings.append(Finding(
                        "untrusted-key", d.name, "chain %s starts with key "
                        "%s, neither pinned (--public-key) nor announced by "
                        "another chain reached from a pinned key"
                        % (chain, body["public_key"])))
                    # walked on with the key it names (the failure is
                    # said), so that its archives are not each reported
                    # as inserted too
                    expected = body["public_key"]
        if expected is not None:
            if body["public_key"] != expected:
                findings.append(Finding(
                    "bad-signature", d.name, "signed with %s; this place "
                    "calls for %s (announced by the digest before it)"
                    % (body["public_key"], expected)))
            elif not digest_mod.signed_by(body, d.signature,
                                          keys.parse_public(expected)):
                findings.append(Finding(
                    "bad-signature", d.name, "the signature does not verify "
                    "with the key this place calls for (edited, or signed "
                    "again with another key)"))
            else:
                d.trusted = True
                d.anchored = anchored
                signers.setdefault(expected, []).append(d)
        if not d.trusted:
            anchored = False
        previous = d


def _check_archives(wanted, archives, head, deep, findings, result, jobs):
    def check(item):
        entry, d = item
        name = entry["name"]
        found = archives.get(name)
        if found is None:
            return [Finding("missing", name, "listed in %s, not in the store"
                            % d.name)], 0
        out = []
        if int(found.get("bytes", -1)) != entry["size"]:
            out.append(Finding("changed", name, "%s bytes; %s lists %d"
                               % (found.get("bytes"), d.name,
                                  entry["size"])))
        etag = (found.get("hash") or "").strip('"')
        if entry.get("etag") and etag != entry["etag"]:
            out.append(Finding("changed", name, "ETag %s; %s lists %s"
                               % (etag, d.name, entry["etag"])))
        headers = head(name)
        if headers is None:
            return [Finding("missing", name, "listed in %s, gone (HEAD 404)"
                            % d.name)], 0
        got = headers.get("x-object-meta-sha256")
        if got != entry.get("sha256"):
            out.append(Finding("changed", name, "SHA-256 %s (metadata); %s "
                               "lists %s" % (got, d.name,
                                             entry.get("sha256"))))
        read = 0
        if deep is not None:
            size, sha256 = deep(name)
            read = size
            if (size, sha256) != (entry["size"], entry.get("sha256")):
                out.append(Finding("changed", name, "its bytes: %d, SHA-256 "
                                   "%s; %s lists %d, %s" % (
                                       size, sha256, d.name, entry["size"],
                                       entry.get("sha256"))))
        return out, read

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for item, outcome in zip(wanted, pool.map(_try(check), wanted),
                                 strict=True):
            if isinstance(outcome, Exception):
                findings.append(Finding("unreadable", item[0]["name"],
                                        str(outcome)))
                continue
            found, read = outcome
            findings.extend(found)
            result.bytes_read += read


def _check_unlisted(archives, listed, readable, since, until, now, findings):
    # any digest whose signature holds: a later one (forged or not) only
    # leaves fewer archives pending
    newest = max((_time(d.body["created"]) for d in readable
                  if d.trusted), default=None)
    # the earliest start of a chain whose first digest is there: Swift
    # sets last_modified, so nothing stored before it can be made to look
    # older, and no digest could list it
    start = min((_time(d.body["range"]["from"]) for d in readable
                 if d.anchored and d.seq == 0), default=None)
    # from digests reached from a pinned key only: a forged one must not
    # stretch the grace
    interval = max((d.body["interval"] for d in readable if d.anchored),
                   default=300)
    grace = datetime.timedelta(seconds=PENDING_INTERVALS * interval
                               + PENDING_SLACK)
    for name, entry in sorted(archives.items()):
        if name in listed:
            continue
        stored = _time(entry.get("last_modified"))
        if stored is not None and ((since is not None and stored < since) or
                                   (until is not None and stored >= until)):
            continue
        if stored is not None and start is not None and stored < start:
            findings.append(Finding(
                "unchained", name, "stored %s, before the first chain "
                "started: no digest can list it" % entry.get("last_modified"),
                failure=False))
            continue
        if stored is not None and (newest is None or stored > newest) and \
                datetime.timedelta(0) <= now - stored < grace:
            findings.append(Finding(
                "pending", name, "stored %s, after the newest digest: the "
                "next one should list it" % entry.get("last_modified"),
                failure=False))
            continue
        findings.append(Finding("inserted", name, "in the store, listed in "
                                "no digest"))


def _check_sequences(listed, findings):
    runs = {}
    for entry, _ in listed.values():
        if "run" in entry and isinstance(entry.get("sequence"), int):
            runs.setdefault(entry["run"], set()).add(entry["sequence"])
    for run, seen in sorted(runs.items()):
        ordered = sorted(seen)
        for low, high in zip(ordered, ordered[1:], strict=False):
            if high > low + 1:
                findings.append(Finding(
                    "sequence-gap", "run %s" % run, "archives %d to %d of "
                    "this run are in no digest" % (low + 1, high - 1)))
    streams = {}
    for entry, _ in listed.values():
        for queue, span in (entry.get("offsets") or {}).items():
            streams.setdefault(queue, []).append(span)
    for queue, spans in sorted(streams.items()):
        spans.sort()
        reach = spans[0][1]
        for low, high in spans[1:]:
            if low > reach + 1:
                findings.append(Finding(
                    "stream-gap", "queue %s" % queue, "offsets %d to %d are "
                    "in no archive (a stream has gaps of its own)"
                    % (reach + 1, low - 1), failure=False))
            reach = max(reach, high)


def parse_head(text):
    """``CHAIN:SEQ:SHA256`` (a chain's ``head`` in a report) as
    ``(chain, seq, sha256)``.

    :raises ValueError: not that form.
    """
    parts = text.split(":")
    if len(parts) != 3 or not (_HEX32.fullmatch(parts[0])
                               and parts[1].isdigit()
                               and _HEX64.fullmatch(parts[2])):
        raise ValueError("expected CHAIN:SEQ:SHA256 (a head verify "
                         "printed), got %r" % text)
    return parts[0], int(parts[1]), parts[2]


def _check_heads(expect, digests, digest_prefix, findings):
    """Each head seen before must still be there, with its bytes."""
    held = {(d.chain, d.seq): d for d in digests}
    for chain, seq, sha256 in expect:
        name = digest_mod.name(digest_prefix, chain, seq)
        found = held.get((chain, seq))
        if found is None:
            newest = max((s for c, s in held if c == chain), default=None)
            findings.append(Finding(
                "truncated", name, "seen before (--expect), not in the "
                "store: chain %s %s" % (chain, "is gone" if newest is None
                                        else "ends at seq %d" % newest)))
        elif found.sha256 != sha256:
            findings.append(Finding(
                "altered", name, "its SHA-256 is %s; --expect says %s"
                % (found.sha256 or "unreadable", sha256)))


def _summary(chain, links, now):
    last = links[-1]
    created = _time(last.body["created"])
    first = links[0]
    return {
        "chain": chain,
        "host": last.body.get("host"),
        "directory": last.body.get("directory"),
        "digests": len(links),
        "first_seq": first.seq,
        "last_seq": last.seq,
        # what an auditor keeps for next time (--expect)
        "head": "%s:%d:%s" % (chain, last.seq, last.sha256),
        "archives": sum(len(d.body["archives"]) for d in links),
        "last_digest": last.body["created"],
        "age_seconds": None if created is None else
        int((now - created).total_seconds()),
        "final": bool(last.body.get("final")),
        # what a chain that follows it elsewhere starts with (pin it there)
        "next_public_key": last.body["next_public_key"],
        "start": (first.body.get("start") or {}).get("reason")
        if first.seq == 0 else None,
    }


def sha256_of_stream(chunks):
    """``(size, sha256)`` of an iterable of byte chunks."""
    h, size = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()
