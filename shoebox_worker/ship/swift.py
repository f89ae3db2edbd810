"""The ``swift`` callback: upload each closed archive to OpenStack Swift.

Options (``[callback:swift]``, all strings, named like python-swiftclient's
``SwiftService`` options):

==========================  ==================================================
``auth``, ``user``, ``key``  v1 (tempauth/swauth) URL and credentials
``auth_version``             ``1`` or ``3``; default ``3`` when
                             ``os_auth_url`` is set, else ``1``
``os_auth_url``              Keystone v3 (through a keystoneauth1 session)
``os_auth_type``             ``password`` (default; ``v3password`` too) or
                             ``v3applicationcredential``
``os_username``,             the user, by name (with
``os_user_id``               ``os_user_domain_name`` or ``_id``) or by id
``os_user_domain_name``,
``os_user_domain_id``
``os_password``
``os_project_name``,         the project, by name (with
``os_project_id``            ``os_project_domain_name`` or ``_id``) or id
``os_project_domain_name``,
``os_project_domain_id``
``os_application_credential_id``, ``_name``, ``_secret``: with
                             ``v3applicationcredential`` (a name needs the
                             user; no project options: it has its project)
``os_region_name``,          which ``object-store`` endpoint of the
``os_endpoint_type``,        catalog (default interface ``public``)
``os_service_type``
``os_storage_url``,          skip auth: storage URL and token
``os_auth_token``
``insecure``                 do not check TLS certificates (default false)
``container``                default ``shoebox``
``object_prefix``            strftime template (UTC) applied to the first
                             record's ``timestamp``, or the file's mtime
``segment_size``             bytes, or ``100M``/``1G`` (binary units);
                             default ``1G``; larger files go as a Static Large
                             Object with segments in ``<container>_segments``
``delete_after``             seconds until Swift deletes the object; empty:
                             keep it forever
``retries``                  swiftclient's own retries (default 2)
``timeout``                  seconds per HTTP request (default 60)
==========================  ==================================================

An empty ``key`` is read from ``ST_KEY``, an empty ``os_password`` from
``OS_PASSWORD`` and an empty ``os_application_credential_secret`` from
``OS_APPLICATION_CREDENTIAL_SECRET`` when the callback is built. Nothing
else comes from the environment: swiftclient's own defaults (read from
``OS_*``/``ST_*`` when it is imported) are never used. The options are
checked when the callback is built: a combination Keystone cannot accept
(a user name without its domain, no project, ...) is one line naming the
option(s).

**What is in the archive.** The object metadata says how many records it
holds, the timestamps of its first and last, the earliest and latest
timestamps of all its records (``Earliest-Timestamp``,
``Latest-Timestamp``, UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: what readers
prune by, see docs/reading.md), and its format versions. They
come from the :class:`~shoebox_worker.archive.ArchiveReport` the chain
passes to :meth:`SwiftUploadCallback.on_close` (the writer's, made at roll
time, or the one read once when a crashed run's archive was recovered), so
the file is not read for them. Called without one (library use), the
callback reads it with :func:`~shoebox_worker.archive.inspect_file`. They
are best effort: a value that is not what it should be (a ``timestamp``
that does not parse, is out of range, before 1970 or after 2999, not a
string, longer than 40 characters or not printable ASCII; a count that is
not one) is left out, never an error, so no record's content can stop an
upload. Every value is at most 256 bytes of printable ASCII.

**Integrity.** The file is read once, as it is sent (its first 4 bytes
before that, for the content type): the MD5 of the bytes of each request
(the whole object, or each segment) and the SHA-256 of the whole file are
computed on the bytes as the HTTP layer reads them (:data:`SEND_BLOCK` at
a time). Swift answers every PUT with the MD5 of
what it received (its ETag); a PUT whose ETag is not the MD5 of what was
sent fails the upload. A plain object is then given its
``X-Object-Meta-Sha256`` by a POST (which replaces the object's metadata,
so it carries all of it again, ``X-Delete-After`` included); for a Static
Large Object the segments are PUT first and the manifest, carrying the
SHA-256, last, and Swift checks each segment's size and ETag against it.
So an object with a SHA-256 passed the ETag checks. Finally a HEAD must
show the local size, the MD5 (plain) or the SLO ETag (the MD5 of the
segments' MD5s, in quotes), and the SHA-256. Until that HEAD passed, the
upload has failed and the local file is kept.

**Never over another object.** Every PUT (object, segment, manifest)
carries ``If-None-Match: *``, so Swift refuses (412) to replace an object
that exists. A manifest name is looked at (HEAD) before its segments are
sent. When the name exists, its HEAD decides: the same size and SHA-256
(or, for a plain object without one yet, the same MD5: an earlier attempt
cut before its POST) is this very file, uploaded before (a retry after a
crash): done, once verified, and nothing is sent again. Other content is
never touched: the file goes under another name (:func:`_other_name`,
``x~<16 hex of its SHA-256>.events``), with a WARNING naming both. The
file names the worker makes never repeat (see
:mod:`shoebox_worker.roll_manager`), so this happens only when something
else wrote there. Segment names are
``<object>/<size>/<segment_size>/<index>``: a segment already there with
the same bytes is used (its expiry renewed), one with other bytes sends
the whole file under another name, and segments under a name this upload
created that its manifest does not use (an earlier attempt with another
``segment_size``) are deleted once it is verified. Both containers are
created (when missing) at the first upload.

**The index.** When the archive has an index beside it
(``<file>.index``, see :mod:`shoebox_worker.index`), it is uploaded once
the archive object is verified, as ``<object>.index`` (beside the object
the archive went under, another name included), in the same container,
with the same ``X-Delete-After``, and also with ``If-None-Match: *``; its
ETag must be the MD5 of its bytes. It is bound first
(:func:`shoebox_worker.index.bind`) to the archive object: the ETag the
verifying HEAD gave (the listing's ``hash``: the MD5, or an SLO's ETag)
and its size, which a reader checks against the listing before it lets
the index prune (an index file that cannot be bound, damaged, is not
uploaded: a WARNING). A 412 whose object has the same size
and MD5 is done (an earlier attempt). One with other bytes is replaced,
with a WARNING: the archive object is this file, and an index that does
not describe it could hide its records from a reader. A failed index
upload fails the step (retried; the archive, there already, is not sent
again); no index file: nothing more is sent.

**Expiry.** ``delete_after`` is sent as ``X-Delete-After``, counted by
Swift's clock, not the worker's; segments get :data:`SEGMENT_EXPIRY_MARGIN`
seconds more than their manifest, so that no manifest outlives them.

**Keystone tokens expire.** swiftclient keeps the token it got until a
request with it is refused (401); then it asks the session for a new one
and sends the request again, once, whatever ``retries`` says (a segment
from its first byte, hashed once). A token with less than
:data:`TOKEN_MARGIN` seconds left is renewed before each upload and each
segment, so that a large body is not sent with a token about to expire.

**Secrets in logs.** swiftclient logs every failed request (at INFO, and
every request at DEBUG) with the first characters of ``X-Auth-Key`` and
``X-Auth-Token``. The first connection adds a filter to the ``swiftclient``
logger that blanks those header values; swiftclient's own
``logger_settings`` are left as they are.

**Redirects.** A credential goes to its own origin only: a redirect to
another host or port (or from https to http: requests'
``should_strip_auth``) is followed without ``X-Auth-Token``,
``X-Auth-Key`` and the other :data:`CREDENTIAL_HEADERS` (Swift's requests
and a v1 auth's: :class:`_Session`), and the Keystone session follows no
redirect (it would send the password again wherever it points).
"""

import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
import urllib.parse
import weakref

import requests.adapters
from swiftclient import client as swiftclient
from swiftclient import exceptions as swift_exceptions
from swiftclient import requests_compat

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import contract
from shoebox_worker import exceptions
from shoebox_worker import index as archive_index
from shoebox_worker import options as coercers
from shoebox_worker import timestamps
from shoebox_worker.broker_url import MASK
from shoebox_worker.swift import layout

__all__ = ["SwiftUploadCallback"]

LOG = logging.getLogger(__name__)

#: Swift's default limit on one object (and so on one segment).
MAX_SEGMENT_SIZE = 5 * (1 << 30)
#: Swift refuses metadata values longer than this.
_MAX_META_VALUE = 256
_SAFE_HEADER = re.compile(r"[\x20-\x7e]*\Z")
#: HTTP statuses of a request Swift refuses for good: a bad name (400),
#: a method it does not allow there (405), too large (413), too long a
#: name (414).
_REFUSED = frozenset((400, 405, 413, 414))
#: Bytes the HTTP layer reads from a request body (and hashes, and sends)
#: at a time; urllib3's default, 16 KiB, costs a 200 MB upload 12,000
#: rounds of Python code.
SEND_BLOCK = 1 << 20
#: A Keystone token with less than this many seconds left is renewed
#: before a request (each upload, each segment) instead of being sent to
#: expire on the way: a large body sent with an expired token may be cut
#: off (a connection error) rather than answered 401.
TOKEN_MARGIN = 10
#: Request headers that carry a credential: never sent on a redirect to
#: another origin (see :class:`_Session`).
CREDENTIAL_HEADERS = ("X-Auth-Token", "X-Auth-Key", "X-Auth-User",
                      "X-Storage-Token", "X-Service-Token", "Authorization")
#: How many other names (:func:`_other_name`) an upload tries when Swift
#: holds other content under the first.
_MAX_OTHER_NAMES = 3
#: Segments of a Static Large Object expire this many seconds after their
#: manifest (``delete_after``), each counted from its own PUT: never a
#: manifest whose segments are gone.
SEGMENT_EXPIRY_MARGIN = 86400
#: The loud line when a name is taken (both names in it).
W_NAME_TAKEN = ("object %s/%s holds other content (%s): NOT overwriting it; "
                "uploading %s as %s/%s instead")
#: The index object beside an archive object holds other bytes: replaced.
W_INDEX_REPLACED = ("index object %s/%s holds other content (%s): replacing "
                    "it with the index of %s, which that archive object is")
#: The index file cannot be bound (damaged): not uploaded.
W_INDEX_DAMAGED = "%s: not uploaded; %s/%s is read in full by pruned reads"
#: The content type of index objects.
INDEX_CONTENT_TYPE = "application/vnd.shoebox-index"
#: What a digest (:mod:`shoebox_worker.integrity`) is stored as.
DIGEST_CONTENT_TYPE = "application/vnd.shoebox-digest+json"
#: ``os_auth_type`` values (keystoneauth1's plugin names) and what they
#: mean here.
_AUTH_TYPES = {"": "password", "password": "password",
               "v3password": "password",
               "v3applicationcredential": "v3applicationcredential"}
#: What an application credential must not be given: it has its project.
_PROJECT_OPTIONS = ("os_project_name", "os_project_id",
                    "os_project_domain_name", "os_project_domain_id")


# -- option coercion (shoebox_worker.options) --------------------------------

_TEXT = coercers.text(empty="")
_INSECURE = coercers.boolean(empty=False)
_RETRIES = coercers.integer(minimum=0)
_TIMEOUT = coercers.number(minimum=0, exclusive=True, empty=None)
_SEGMENT_SIZE = coercers.size(minimum=1, maximum=MAX_SEGMENT_SIZE)
_DELETE_AFTER = coercers.integer(minimum=1, empty=None)


# -- what is in the archive -------------------------------------------------

def _inspect(filename):
    """Read an archive for its report when none was passed; never raises:
    an archive nothing could be made of is uploaded without record
    metadata (None)."""
    try:
        return archive.inspect_file(filename)
    except Exception as exc:  # the records, or the compressed stream
        LOG.warning("%s: cannot read its records (%s); uploading it without "
                    "record metadata", filename, exc)
        return None


def _timestamp_value(metadata):
    """What goes into ``First-``/``Last-Timestamp``: the record's own
    ``timestamp`` when it is a plausible one
    (:func:`~shoebox_worker.timestamps.record_time`), else None (left
    out)."""
    if timestamps.record_time(metadata) is None:
        return None
    return metadata["timestamp"].strip()


def _time_text(value):
    """An ``Earliest-``/``Latest-Timestamp`` value: a report's normalised
    time (:func:`~shoebox_worker.timestamps.to_text`) when it parses, else
    None (left out)."""
    moment = timestamps.parse(value)
    return timestamps.to_text(moment) if moment is not None else None


def _count(value):
    """A count for the metadata: a non-negative int, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _versions(values):
    """``2`` or ``1,2`` from a report's format versions; None when there
    are none or any is not a small int."""
    try:
        versions = sorted(values)
    except TypeError:
        return None
    if not versions or any(_count(v) is None or v > 255 for v in versions):
        return None
    return ",".join(str(v) for v in versions)


def _header_value(value):
    """A metadata value Swift accepts: printable ASCII, at most 256 bytes."""
    value = str(value)
    if not _SAFE_HEADER.match(value):
        value = urllib.parse.quote(value[:_MAX_META_VALUE],
                                   safe=" !#$&'()*+,/:;=?@[]~")
    return value[:_MAX_META_VALUE]


# -- hashing while sending --------------------------------------------------

class _FileHash:
    """The SHA-256 of a whole file, fed by the :class:`_Part` readers as
    they send it, in order. Bytes sent again (swiftclient retrying a
    request) are not hashed twice."""

    def __init__(self, filename):
        self.filename = filename
        self._sha256 = hashlib.sha256()
        self._hashed = 0  # bytes of the file hashed so far

    def update(self, offset, data):
        skip = self._hashed - offset
        if skip < 0:
            raise RuntimeError("%s: bytes %d-%d were never sent"
                               % (self.filename, self._hashed, offset))
        if skip < len(data):
            self._sha256.update(memoryview(data)[skip:])
            self._hashed = offset + len(data)

    def hexdigest(self, size):
        """The SHA-256, once all ``size`` bytes went through."""
        if self._hashed != size:
            raise _Mismatch("%s: %d of %d bytes were sent"
                            % (self.filename, self._hashed, size))
        return self._sha256.hexdigest()


class _Part:
    """``length`` bytes of an open file from ``offset``, as a request body:
    the HTTP layer reads it as it sends, and the bytes are hashed on the
    way (:attr:`md5` of this request, and the file's :class:`_FileHash`).
    swiftclient calls :meth:`reset` before it retries the request."""

    def __init__(self, fd, offset, length, file_hash):
        self._fd = fd
        self._offset = offset
        self._length = length
        self._file_hash = file_hash
        self.reset()

    def __len__(self):
        return self._length

    def reset(self, *args, **kwargs):
        """Start again from the first byte (swiftclient's retry hook)."""
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sent = 0

    def drain(self):
        """Read (and hash) what was not sent yet: a PUT refused before it
        read the whole body still knows the body's MD5."""
        while self.read(SEND_BLOCK):
            pass

    def read(self, size=-1):
        left = self._length - self.sent
        if size is not None and size >= 0:
            left = min(left, size)
        if left <= 0:  # all sent, or read(0)
            return b""
        position = self._offset + self.sent
        data = os.pread(self._fd, left, position)
        if not data:
            raise OSError("%s shrank while being sent"
                          % self._file_hash.filename)
        self.md5.update(data)
        self._file_hash.update(position, data)
        self.sent += len(data)
        return data


class _BlockAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, reading request bodies :data:`SEND_BLOCK` bytes
    at a time, whose :meth:`close` closes its sockets."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs.setdefault("blocksize", SEND_BLOCK)
        super().init_poolmanager(*args, **kwargs)

    def close(self):
        """requests' close, then every pool's idle sockets: urllib3 2's
        ``PoolManager.clear`` forgets its pools without closing them (a
        pool's sockets close when it is garbage, and a response kept in a
        reference cycle, as swiftclient's are, keeps its pool), so they
        would stay open until the garbage collector runs."""
        pools = self.poolmanager.pools
        held = []
        for key in list(pools.keys()):
            pool = pools.get(key)
            if pool is not None:
                held.append(pool)
        super().close()
        for pool in held:
            pool.close()


class _Session(requests_compat.SwiftClientRequestsSession):
    """swiftclient's requests session, whose redirects to another origin
    carry no credential: requests itself drops only ``Authorization``
    there (:meth:`~requests.Session.should_strip_auth`: another host, or
    another scheme or port than an upgrade to https), and would send
    ``X-Auth-Token`` (Swift) and ``X-Auth-Key`` (the tempauth password)
    to whatever a 302 names. A redirect within the origin keeps them."""

    def __init__(self):
        super().__init__()
        self.headers = None  # as swiftclient: no default headers

    def rebuild_auth(self, prepared_request, response):
        super().rebuild_auth(prepared_request, response)
        if self.should_strip_auth(response.request.url, prepared_request.url):
            for name in CREDENTIAL_HEADERS:
                prepared_request.headers.pop(name, None)


def _http_connection(url, **kwargs):
    """swiftclient's ``http_connection``, through a :class:`_Session`."""
    parsed, conn = swiftclient.http_connection(url, **kwargs)
    conn.request_session.close()
    conn.request_session = _Session()
    return parsed, conn


def _auth_v1(url, user, key, **kwargs):
    """``(storage URL, token)`` from a v1 (tempauth, swauth) auth URL:
    swiftclient's ``get_auth_1_0`` through :func:`_http_connection`, so
    that a redirect elsewhere does not carry ``X-Auth-Key``.

    :raises ClientException: refused, or no storage URL in the answer.
    """
    parsed, conn = _http_connection(url, **kwargs)
    headers = {"X-Auth-User": user, "X-Auth-Key": key}
    try:
        conn.request("GET", parsed.path, "", headers)
        resp = conn.getresponse()
        body = resp.read()
        resp.close()
    finally:
        conn.close()
    # logged as swiftclient logs it (the key blanked: _RedactSecrets)
    swiftclient.http_log((url, "GET"), headers, resp, body)
    storage_url = resp.getheader("x-storage-url")
    if resp.status < 200 or resp.status >= 300 or (body and
                                                   not storage_url):
        raise swift_exceptions.ClientException.from_response(
            resp, "Auth GET failed", body)
    return storage_url, resp.getheader("x-storage-token",
                                       resp.getheader("x-auth-token"))


class _Connection(swiftclient.Connection):
    """swiftclient's Connection, sending bodies in :data:`SEND_BLOCK`
    reads, its credentials never sent on a redirect to another origin
    (:class:`_Session`, for Swift's requests and a v1 auth's);
    :meth:`close` closes the sockets of every HTTP connection it
    made that is still alive (swiftclient drops one without closing it
    when it retries: held weakly, so that a long-lived connection's
    retries do not pile up)."""

    def get_auth(self):
        if self.session is not None or \
                self.auth_version not in swiftclient.AUTH_VERSIONS_V1:
            return super().get_auth()  # Keystone: keystone_session's
        self.url, self.token = _auth_v1(
            self.authurl, self.user, self.key, cacert=self.cacert,
            insecure=self.insecure, cert=self.cert, cert_key=self.cert_key,
            timeout=self.timeout)
        return self.url, self.token

    def http_connection(self, url=None):
        parsed, conn = _http_connection(
            url or self.url, cacert=self.cacert, insecure=self.insecure,
            cert=self.cert, cert_key=self.cert_key,
            ssl_compression=self.ssl_compression, timeout=self.timeout)
        adapter = _BlockAdapter()
        for prefix in ("http://", "https://"):
            conn.request_session.mount(prefix, adapter)
        self.__dict__.setdefault("_adapters", weakref.WeakSet()).add(adapter)
        return parsed, conn

    def close(self):
        super().close()
        adapters = list(self.__dict__.get("_adapters", ()))
        self._adapters = weakref.WeakSet()
        for adapter in adapters:
            adapter.close()

    def put_object(self, container, obj, contents, **kwargs):
        """swiftclient's, except that a :class:`_Part` body is sent again
        from its first byte whenever the request is: after a 401 (with a
        new token) even when ``retries = 0``, where swiftclient's own
        wrapper would refuse to resend a body."""
        if not isinstance(contents, _Part):
            return super().put_object(container, obj, contents, **kwargs)
        return self._retry(contents.reset, swiftclient.put_object, container,
                           obj, contents, **kwargs)


# -- errors and logs --------------------------------------------------------

class _Mismatch(Exception):
    """Swift's copy is not the local file."""

    def __init__(self, message, transaction_id=None):
        super().__init__(message)
        self.transaction_id = transaction_id


class _Exists(Exception):
    """A PUT with ``If-None-Match: *`` met an object of that name (412)."""

    def __init__(self, container, obj):
        super().__init__("%s/%s exists" % (container, obj))


class _NameTaken(Exception):
    """Swift holds other content under the object's name."""


def _same_content(head, size, sha256, md5):
    """Whether Swift's object (``head``: its HEAD headers) holds the bytes
    whose ``size``, SHA-256 and MD5 are given: the same size, and the same
    SHA-256 where Swift has one (our uploads set it), and the same ETag for
    a plain object (an SLO's is that of its segments)."""
    length = head.get("content-length")
    if not (isinstance(length, str) and length.isdigit()
            and int(length) == size):
        return False
    theirs = head.get("x-object-meta-sha256")
    if sha256 is not None and theirs is not None:
        return theirs == sha256
    if _is_slo(head) or md5 is None:
        return False  # nothing left to compare the content with
    return head.get("etag", "").strip('"') == md5


def _is_slo(head):
    """Whether HEAD headers are those of a Static Large Object."""
    return head.get("x-static-large-object", "").lower() == "true"


def _what_is_there(head):
    """An existing object in a few words, for a log line."""
    return "%s bytes, ETag %s, SHA-256 %s" % (
        head.get("content-length", "?"), head.get("etag", "?"),
        head.get("x-object-meta-sha256", "none"))


def _file_sha256(fd, size):
    """The SHA-256 of an open file's first ``size`` bytes, read again."""
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        data = os.pread(fd, min(SEND_BLOCK, size - offset), offset)
        if not data:
            raise OSError("the file shrank while being read")
        digest.update(data)
        offset += len(data)
    return digest.hexdigest()


def _other_name(obj, sha256, attempt):
    """Where a file goes when its object name holds other content:
    ``~`` and 16 hex digits of its SHA-256 after the first part of the
    base name (``x~0123456789abcdef.events.gz``), ``-2``, ``-3``... on
    later attempts. The same file always gets the same name, so that a
    retry finds its own upload."""
    head, slash, base = obj.rpartition("/")
    stem, dot, rest = base.partition(".")
    mark = "~" + sha256[:16] + ("" if attempt == 1 else "-%d" % attempt)
    return head + slash + stem + mark + dot + rest


def _trans_id(headers):
    headers = headers or {}
    for name in ("x-trans-id", "x-openstack-request-id"):
        if headers.get(name):
            return headers[name]
    return None


def _describe(exc):
    """One line about a failure, with Swift's transaction id if any."""
    if isinstance(exc, swift_exceptions.ClientException):
        parts = [exc.msg]
        if exc.http_status:
            parts.append("%s %s" % (exc.http_status, exc.http_reason or ""))
        text = ": ".join(p.strip() for p in parts if p)
        txn = exc.transaction_id
    else:
        text = "%s: %s" % (type(exc).__name__, exc)
        txn = getattr(exc, "transaction_id", None)
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:297] + "..."
    if txn:
        text += " (txn %s)" % txn
    return text


#: A secret header and its value, as swiftclient logs them: ``-H "Name:
#: value"`` in a request line, ``'Name': 'value'`` in a header dict.
_SECRET_HEADER = re.compile(
    r"(?i)\b(%s)(['\"]?\s*:\s*['\"]?)[^'\"\s,}]*"
    % "|".join(re.escape(name)
               for name in swiftclient.LOGGER_SENSITIVE_HEADERS))


class _RedactSecrets(logging.Filter):
    """Mask the value of every secret header (``X-Auth-Key``,
    ``X-Auth-Token``, ...) in a log record, with the one mask of every
    secret (:data:`shoebox_worker.broker_url.MASK`)."""

    def filter(self, record):
        message = record.getMessage()
        redacted = _SECRET_HEADER.sub(
            lambda m: m.group(1) + m.group(2) + MASK, message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _redact_swiftclient_logs():
    """Put a :class:`_RedactSecrets` on the ``swiftclient`` logger (once)."""
    logger = logging.getLogger("swiftclient")
    if not any(isinstance(f, _RedactSecrets) for f in logger.filters):
        logger.addFilter(_RedactSecrets())


# -- Keystone -----------------------------------------------------------------

def keystone_session(options):
    """A keystoneauth1 session for Keystone v3 from the callback's checked
    ``os_*`` options (a reader of ``swift://`` uses the same). Building it
    sends nothing; it authenticates at the first token asked, and again
    after :meth:`~keystoneauth1.session.Session.invalidate`.

    keystoneauth1 is imported here, when Keystone is used: a tempauth
    upload, or a ``cat swift://`` pruned by indexes, does not pay the tenth
    of a second its import takes."""
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3 as identity_v3
    o = options

    def given(name):
        return o.get(name) or None

    user = {"user_id": given("os_user_id"),
            "username": given("os_username"),
            "user_domain_id": given("os_user_domain_id"),
            "user_domain_name": given("os_user_domain_name")}
    if o.get("os_auth_type") == "v3applicationcredential":
        plugin = identity_v3.ApplicationCredential(
            auth_url=o["os_auth_url"],
            application_credential_id=given("os_application_credential_id"),
            application_credential_name=given(
                "os_application_credential_name"),
            application_credential_secret=o[
                "os_application_credential_secret"], **user)
    else:
        plugin = identity_v3.Password(
            auth_url=o["os_auth_url"], password=o["os_password"],
            project_id=given("os_project_id"),
            project_name=given("os_project_name"),
            project_domain_id=given("os_project_domain_id"),
            project_domain_name=given("os_project_domain_name"), **user)
    # keystoneauth1 asks for a new token whenever the one it holds has
    # less than MIN_TOKEN_LIFE_SECONDS (120) left: with tokens that live
    # two minutes or less, every request authenticated again. Renew at
    # this module's own margin instead.
    plugin.MIN_TOKEN_LIFE_SECONDS = TOKEN_MARGIN
    # keystoneauth1 follows a redirect with the same headers and body (the
    # password, a token) wherever it leads: follow none (getting a token
    # from a 3xx answer then fails)
    return ks_session.Session(auth=plugin, verify=not o.get("insecure"),
                              timeout=o.get("timeout"), redirect=False)


# -- the callback -----------------------------------------------------------

class SwiftUploadCallback:
    """Upload each archive to Swift; returns the file name unchanged.

    See the module documentation for the options. Building one never
    connects; the first :meth:`on_close` does, and the connection is reused
    until :meth:`close` (or a failure, after which the next call
    reconnects).
    """

    name = "swift"

    def __init__(self, *, auth="", user="", key="", auth_version="",
                 os_auth_url="", os_username="", os_user_id="",
                 os_password="", os_user_domain_name="",
                 os_user_domain_id="", os_project_name="", os_project_id="",
                 os_project_domain_name="", os_project_domain_id="",
                 os_auth_type="", os_application_credential_id="",
                 os_application_credential_name="",
                 os_application_credential_secret="", os_region_name="",
                 os_endpoint_type="", os_service_type="",
                 os_storage_url="", os_auth_token="",
                 insecure="false", container="shoebox", object_prefix="",
                 segment_size="1G", delete_after="", retries="2",
                 timeout="60"):
        def text(name, value):  # "" when not set
            return coercers.coerce(name, value, _TEXT)

        key = text("key", key) or os.environ.get("ST_KEY", "")
        os_password = (text("os_password", os_password)
                       or os.environ.get("OS_PASSWORD", ""))
        os_application_credential_secret = (
            text("os_application_credential_secret",
                 os_application_credential_secret)
            or os.environ.get("OS_APPLICATION_CREDENTIAL_SECRET", ""))
        os_auth_url = text("os_auth_url", os_auth_url)
        version = text("auth_version", auth_version).lower().lstrip("v")
        if not version:
            version = "3" if os_auth_url else "1"
        version = {"1": "1", "1.0": "1", "3": "3", "3.0": "3"}.get(version)
        if version is None:
            raise coercers.OptionError(
                "expected 1 or 3, got %r" % (auth_version,), "auth_version")
        #: SwiftService-style options; every value explicit (the keys are
        #: python-swiftclient's, so nothing falls back to its env defaults).
        self.options = {
            "auth_version": version,
            "auth": text("auth", auth),
            "user": text("user", user),
            "key": key,
            "os_auth_url": os_auth_url,
            "os_auth_type": text("os_auth_type", os_auth_type).lower(),
            "os_password": os_password,
            "os_application_credential_secret":
                os_application_credential_secret,
            **{name: text(name, value) for name, value in (
                ("os_username", os_username), ("os_user_id", os_user_id),
                ("os_project_name", os_project_name),
                ("os_project_id", os_project_id),
                ("os_user_domain_name", os_user_domain_name),
                ("os_user_domain_id", os_user_domain_id),
                ("os_project_domain_name", os_project_domain_name),
                ("os_project_domain_id", os_project_domain_id),
                ("os_application_credential_id",
                 os_application_credential_id),
                ("os_application_credential_name",
                 os_application_credential_name),
                ("os_region_name", os_region_name),
                ("os_endpoint_type", os_endpoint_type),
                ("os_service_type", os_service_type))},
            "os_storage_url": text("os_storage_url", os_storage_url),
            "os_auth_token": text("os_auth_token", os_auth_token),
            "insecure": coercers.coerce("insecure", insecure, _INSECURE),
            "retries": coercers.coerce("retries", retries, _RETRIES),
            "timeout": self._timeout(timeout),
            "segment_size": coercers.coerce("segment_size", segment_size,
                                            _SEGMENT_SIZE),
        }
        self._check_credentials()
        self.container = coercers.coerce("container", container,
                                         coercers.name())
        self.segment_container = layout.segment_container(self.container)
        self.segment_size = self.options["segment_size"]
        self.object_prefix = "" if object_prefix is None else str(
            object_prefix)
        try:  # a template strftime cannot render fails now, not later
            datetime.datetime(2000, 1, 2, tzinfo=datetime.UTC).strftime(
                self.object_prefix)
        except ValueError as exc:
            raise coercers.OptionError(str(exc), "object_prefix") from None
        self.delete_after = coercers.coerce("delete_after", delete_after,
                                            _DELETE_AFTER)
        self._conn = None
        self._containers = set()

    @staticmethod
    def _timeout(value):
        """Seconds per HTTP request; None (no limit) when empty."""
        return coercers.coerce("timeout", value, _TIMEOUT)

    def _check_credentials(self):
        """One line naming the option(s) when the credentials cannot
        work, before anything connects."""
        o = self.options
        if o["os_storage_url"] and o["os_auth_token"]:
            return
        if o["auth_version"] == "1":
            missing = [name for name in ("auth", "user", "key")
                       if not o[name]]
            if missing:
                raise coercers.OptionError(
                    "required for auth_version 1 (key and os_password may "
                    "also come from ST_KEY and OS_PASSWORD)",
                    ", ".join(missing))
            return
        auth_type = _AUTH_TYPES.get(o["os_auth_type"])
        if auth_type is None:
            raise coercers.OptionError(
                "expected password or v3applicationcredential, got %r"
                % o["os_auth_type"], "os_auth_type")
        o["os_auth_type"] = auth_type

        def need(names, why):
            if not any(o[name] for name in names):
                raise coercers.OptionError(why, " or ".join(names))

        need(("os_auth_url",), "required for auth_version 3")
        if auth_type == "v3applicationcredential":
            need(("os_application_credential_secret",),
                 "required for os_auth_type v3applicationcredential (may "
                 "also come from OS_APPLICATION_CREDENTIAL_SECRET)")
            need(("os_application_credential_id",
                  "os_application_credential_name"),
                 "required for os_auth_type v3applicationcredential")
            if not o["os_application_credential_id"]:
                need(("os_user_id", "os_username"), "required with "
                     "os_application_credential_name")
            scoped = [name for name in _PROJECT_OPTIONS if o[name]]
            if scoped:
                raise coercers.OptionError(
                    "not used with an application credential, which "
                    "carries its project: remove it", ", ".join(scoped))
        else:
            need(("os_password",), "required for auth_version 3 (may also "
                 "come from OS_PASSWORD)")
            need(("os_username", "os_user_id"),
                 "required for auth_version 3")
            need(("os_project_name", "os_project_id"),
                 "required for auth_version 3")
            if o["os_project_name"] and not o["os_project_id"]:
                need(("os_project_domain_name", "os_project_domain_id"),
                     "required with os_project_name")
        if o["os_username"] and not o["os_user_id"]:
            need(("os_user_domain_name", "os_user_domain_id"),
                 "required with os_username")

    def __repr__(self):
        return "<%s %s container=%s>" % (
            type(self).__name__,
            self.options["auth"] or self.options["os_auth_url"]
            or self.options["os_storage_url"], self.container)

    # -- connection ----------------------------------------------------------

    def connection_kwargs(self):
        """The keyword arguments for ``swiftclient.client.Connection``.

        Keystone v3 goes through a keystoneauth1 session
        (:func:`keystone_session`): swiftclient asks it for the token and
        the ``object-store`` endpoint, and on a 401 to a request with a
        token it invalidates it, gets a new token and sends the request
        again (once per request).
        """
        o = self.options
        kwargs = {
            "auth_version": o["auth_version"],
            "os_options": {},
            "preauthurl": o["os_storage_url"] or None,
            "preauthtoken": o["os_auth_token"] or None,
            "insecure": o["insecure"],
            "retries": o["retries"],
            "timeout": o["timeout"],
            "retry_on_ratelimit": True,
            "starting_backoff": 1,
            "max_backoff": 16,
        }
        if o["auth_version"] == "1":
            kwargs.update(authurl=o["auth"] or None, user=o["user"] or None,
                          key=o["key"] or None)
        elif not (o["os_storage_url"] and o["os_auth_token"]):
            kwargs["session"] = keystone_session(o)
            kwargs["os_options"] = {
                name: value for name, value in (
                    ("region_name", o["os_region_name"]),
                    ("service_type", o["os_service_type"]),
                    ("endpoint_type", o["os_endpoint_type"]),
                    ("object_storage_url", o["os_storage_url"])) if value}
        return kwargs

    def new_connection(self, **overrides):
        """A connection of its own, built from :meth:`connection_kwargs`
        with ``overrides`` (a reader of ``swift://`` makes one per thread,
        with the first one's ``preauthurl`` and ``preauthtoken``), secrets
        blanked in swiftclient's logs."""
        _redact_swiftclient_logs()
        return _Connection(**dict(self.connection_kwargs(), **overrides))

    def _connection(self):
        if self._conn is None:
            self._conn = self.new_connection()
        return self._conn

    @staticmethod
    def _renew_token_if_expiring(conn):
        """Forget a Keystone token that expires within
        :data:`TOKEN_MARGIN`; swiftclient gets a new one at the next
        request. (An expired one is also renewed on the 401 it gets.)"""
        session = getattr(conn, "session", None)
        auth_ref = getattr(getattr(session, "auth", None), "auth_ref", None)
        if auth_ref is not None and auth_ref.will_expire_soon(TOKEN_MARGIN):
            session.invalidate()
            conn.url = conn.token = None

    def _drop_connection(self):
        conn, self._conn = self._conn, None
        self._containers.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection: nothing to do
                LOG.debug("closing the Swift connection failed",
                          exc_info=True)

    def close(self):
        """Release the connection (idempotent)."""
        self._drop_connection()

    def check_access(self):
        """Authenticate and HEAD the container, for ``check-config
        --connect`` (a connection of its own, closed after).

        :returns: one line saying what was found.
        :raises UploadError: it failed; ``permanent`` (with a ``hint``)
            when retrying will not fix it (credentials refused, no
            endpoint, no right on the container).
        """
        conn = self.new_connection(retries=0)
        where = self.options["auth"] or self.options["os_auth_url"] or \
            self.options["os_storage_url"]
        try:
            try:
                head = conn.head_container(self.container)
            except swift_exceptions.ClientException as exc:
                if exc.http_status != 404:
                    raise
                head = None
            account = conn.url
        except Exception as exc:
            hint = self._permanent(exc)
            raise exceptions.UploadError(
                "%s: %s" % (where, _describe(exc)), callback=self.name,
                filename=self.container, permanent=hint is not None,
                hint=hint) from exc
        finally:
            conn.close()
        if head is None:
            return ("authenticated at %s (account %s); container %s does not "
                    "exist yet: the first upload creates it"
                    % (where, account, self.container))
        return ("authenticated at %s (account %s); container %s exists (%s "
                "objects, %s bytes)" % (
                    where, account, self.container,
                    head.get("x-container-object-count", "?"),
                    head.get("x-container-bytes-used", "?")))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- naming --------------------------------------------------------------

    def object_name(self, filename, moment):
        """``object_prefix`` rendered for ``moment`` (UTC) + the basename."""
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        prefix = moment.astimezone(datetime.UTC).strftime(self.object_prefix)
        name = (prefix + os.path.basename(filename)).lstrip("/")
        if not name:
            raise ValueError("empty object name for %r" % (filename,))
        return name

    def segment_name(self, obj, size, index):
        """Deterministic: the same file and settings give the same names."""
        return layout.segment_name(obj, size, self.segment_size, index)

    # -- upload --------------------------------------------------------------

    def on_open(self, filename):
        """Nothing to do when an archive is opened."""

    def on_close(self, filename, *, report=None):
        """Upload ``filename``; return it unchanged.

        :param report: the archive's
            :class:`~shoebox_worker.archive.ArchiveReport` (records, first
            and last metadata, versions) for the object metadata and name;
            None: read from the file.
        :raises UploadError: anything went wrong; the file is untouched.
        """
        filename = os.fspath(filename)
        target = self.container + "/?"
        started = time.monotonic()
        try:
            with open(filename, "rb", buffering=0) as f:
                stat = os.fstat(f.fileno())
                size = stat.st_size
                if report is None:
                    report = _inspect(filename)
                first = report.first_metadata if report is not None else None
                moment = (timestamps.record_time(first)
                          or datetime.datetime.fromtimestamp(stat.st_mtime,
                                                             datetime.UTC))
                obj = self.object_name(filename, moment)
                target = "%s/%s" % (self.container, obj)
                headers = self._headers(filename, report)
                content_type = self._content_type(f.fileno())
                count = max(1, math.ceil(size / self.segment_size))
                conn = self._connection()
                self._renew_token_if_expiring(conn)
                # both, so that the segment listing never meets a 404
                self._ensure_container(conn, self.container)
                self._ensure_container(conn, self.segment_container)
                obj, stale, etag, sha256 = self._upload(
                    conn, f.fileno(), filename, obj, size, count, headers,
                    content_type)
                target = "%s/%s" % (self.container, obj)
                self._put_index(conn, filename, obj, etag, size)
        except Exception as exc:
            self._drop_connection()  # the next call starts afresh
            hint = self._permanent(exc)
            raise exceptions.UploadError(
                "upload to %s failed: %s" % (target, _describe(exc)),
                callback=self.name, filename=filename,
                permanent=hint is not None, hint=hint) from exc
        self._delete_segments(conn, obj, stale)
        seconds = max(time.monotonic() - started, 1e-6)
        LOG.info("uploaded %s to %s/%s: %d bytes in %.2f s (%.1f MB/s)",
                 filename, self.container, obj, size, seconds,
                 size / seconds / 1e6)
        return contract.Stored(filename, name=obj, size=size, sha256=sha256,
                               etag=etag)

    def _permanent(self, exc):
        """What the operator must fix when retrying cannot fix ``exc``
        (credentials or rights refused, a name Swift refuses); None for
        a failure that may pass (network, 5xx, a checksum mismatch)."""
        # only a Keystone session raises keystoneauth1's errors, and it
        # imported them (see keystone_session)
        ks = sys.modules.get("keystoneauth1.exceptions")
        if ks is not None and isinstance(exc, ks.EndpointNotFound):
            return ("check [callback:swift] os_region_name, "
                    "os_endpoint_type and os_service_type (no such endpoint "
                    "in the Keystone catalog)")
        if ks is not None and isinstance(exc, ks.HttpError) and \
                exc.http_status in (400, 401, 403, 404):
            # Keystone refused the credentials, or the scope
            return self._credentials_hint()
        if not isinstance(exc, swift_exceptions.ClientException):
            return None
        status = exc.http_status
        # keystoneauth's 401 comes without a status (swiftclient rewords it)
        if status == 401 or (status is None and
                             str(exc.msg).startswith("Unauthorized")):
            return self._credentials_hint()
        if status == 403:
            return ("check that the [callback:swift] user may write to "
                    "containers %s and %s (with Keystone: an operator role "
                    "of Swift's keystoneauth in the project)"
                    % (self.container, self.segment_container))
        if status in _REFUSED:
            # /v1/<account>/<container>[/<object>]
            parts = (exc.http_path or "").strip("/").split("/", 3)
            if len(parts) == 3:
                return "check [callback:swift] container"
            return ("check [callback:swift] object_prefix and segment_size "
                    "(Swift refuses the object's name or size)")
        return None

    def _credentials_hint(self):
        o = self.options
        if o["os_storage_url"] and o["os_auth_token"]:
            return "check [callback:swift] os_auth_token"
        if o["auth_version"] == "1":
            return "check [callback:swift] user and key"
        if o["os_auth_type"] == "v3applicationcredential":
            return ("check [callback:swift] os_application_credential_id "
                    "(or _name) and os_application_credential_secret")
        return ("check [callback:swift] os_username (or os_user_id), "
                "os_password, the domains and the project")

    def _headers(self, filename, report):
        """The object's headers: its metadata (best effort: a value that
        does not parse is left out, never an error) and expiry."""
        meta = {"Filename": os.path.basename(filename)}
        if report is None:  # nothing could be read
            meta["Damaged-Ranges"] = 1
        else:
            meta["Records"] = _count(report.records)
            meta["Format-Versions"] = _versions(report.versions or ())
            meta["First-Timestamp"] = _timestamp_value(report.first_metadata)
            meta["Last-Timestamp"] = _timestamp_value(report.last_metadata)
            # the time range of all records, for readers that prune
            meta["Earliest-Timestamp"] = _time_text(report.earliest)
            meta["Latest-Timestamp"] = _time_text(report.latest)
            skipped = _count(len(report.skipped or ()))
            meta["Damaged-Ranges"] = skipped or None
        headers = {"X-Object-Meta-" + name: _header_value(value)
                   for name, value in meta.items() if value is not None}
        if self.delete_after is not None:
            # relative: Swift counts it from its own clock, not ours
            headers["X-Delete-After"] = str(self.delete_after)
        return headers

    @staticmethod
    def _content_type(fd):
        head = os.pread(fd, 4, 0)
        for codec in compression.CODECS.values():
            if head.startswith(codec.magic):
                return {"gzip": "application/gzip",
                        "zstd": "application/zstd"}.get(codec.name)
        return "application/octet-stream"

    def _ensure_container(self, conn, container):
        if container not in self._containers:
            conn.put_container(container)
            self._containers.add(container)

    def _upload(self, conn, fd, filename, obj, size, count, headers,
                content_type):
        """Upload under ``obj``, or, when Swift holds other content under
        that name, under :func:`_other_name` (logged as a WARNING naming
        both). Nothing is ever overwritten: every PUT carries
        ``If-None-Match: *``.

        :returns: ``(name, stale, etag, sha256)``: the object name the
            file is now under, the segments of earlier attempts at it to
            delete, and the object's ETag and SHA-256 as the verifying
            HEAD gave them.
        """
        name = obj
        for attempt in range(1, _MAX_OTHER_NAMES + 2):
            file_hash = _FileHash(filename)
            try:
                if count == 1:
                    created, (etag, sha256) = self._put_plain(
                        conn, fd, name, size, file_hash, headers,
                        content_type)
                else:
                    created, (etag, sha256) = self._put_slo(
                        conn, fd, name, size, count, file_hash, headers,
                        content_type)
            except _NameTaken as taken:
                if attempt > _MAX_OTHER_NAMES:
                    raise
                other = _other_name(obj, _file_sha256(fd, size), attempt)
                LOG.warning(W_NAME_TAKEN, self.container, name, taken,
                            filename, self.container, other)
                name = other
                continue
            if not created:
                LOG.info("%s/%s already holds %s (an earlier upload); not "
                         "sent again", self.container, name, filename)
                return name, [], etag, sha256
            return (name, self._stale_segments(conn, name, size, count),
                    etag, sha256)
        raise AssertionError("unreachable")

    def _put(self, conn, container, obj, part, headers, content_type):
        """PUT one body, never over an existing object
        (``If-None-Match: *``); check that Swift got what was sent.

        :returns: its MD5 (hex), which is Swift's ETag for it.
        :raises _Exists: Swift holds an object of that name already; the
            rest of ``part`` was read (and hashed) all the same.
        """
        response = {}
        self._renew_token_if_expiring(conn)
        try:
            returned = conn.put_object(
                container, obj, part, content_length=len(part),
                headers=dict(headers, **{"If-None-Match": "*"}),
                content_type=content_type, response_dict=response)
        except swift_exceptions.ClientException as exc:
            if exc.http_status == 404:  # the container went away
                self._containers.discard(container)
            if exc.http_status == 412:
                part.drain()
                raise _Exists(container, obj) from exc
            raise
        md5 = part.md5.hexdigest()
        if part.sent != len(part) or returned != md5:
            raise _Mismatch("PUT %s/%s returned ETag %s; MD5 of the %d of "
                            "%d bytes sent: %s" % (
                                container, obj, returned, part.sent,
                                len(part), md5),
                            _trans_id(response.get("headers")))
        return md5

    def _put_index(self, conn, filename, obj, etag, size):
        """Upload the archive's index, if it has one, as ``<obj>.index``,
        bound to the archive object (its ``etag`` and ``size``: see the
        module documentation)."""
        path = archive_index.sidecar(filename)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        try:
            data = archive_index.bind(data, etag, size, path)
        except exceptions.IndexError_ as exc:
            LOG.warning(W_INDEX_DAMAGED, exc, self.container, obj)
            return
        name = obj + archive_index.SUFFIX
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        headers = {"If-None-Match": "*"}
        if self.delete_after is not None:
            headers["X-Delete-After"] = str(self.delete_after)
        response = {}
        try:
            returned = conn.put_object(
                self.container, name, io.BytesIO(data),
                content_length=len(data), headers=headers,
                content_type=INDEX_CONTENT_TYPE, response_dict=response)
        except swift_exceptions.ClientException as exc:
            if exc.http_status != 412:
                raise
            head = self._existing(conn, self.container, name) or {}
            if head.get("etag", "").strip('"') == md5 and \
                    int(head.get("content-length", -1)) == len(data):
                return  # sent before a crash or a failure
            LOG.warning(W_INDEX_REPLACED, self.container, name,
                        _what_is_there(head), filename)
            del headers["If-None-Match"]
            returned = conn.put_object(
                self.container, name, io.BytesIO(data),
                content_length=len(data), headers=headers,
                content_type=INDEX_CONTENT_TYPE, response_dict=response)
        if returned != md5:
            raise _Mismatch("PUT %s/%s returned ETag %s; MD5 of the %d bytes "
                            "sent: %s" % (self.container, name, returned,
                                          len(data), md5),
                            _trans_id(response.get("headers")))

    @property
    def location(self):
        """Where :meth:`put_digest` puts digests: ``swift://CONTAINER``
        (what ``verify --chain`` is given)."""
        return "swift://" + self.container

    def put_digest(self, name, data):
        """Store a signed digest (:mod:`shoebox_worker.integrity`) as
        ``name`` in the container, never over an object
        (``If-None-Match: *``), and check it: its ETag must be the MD5 of
        ``data``, as must a HEAD's. A name that holds these very bytes
        already (a retry after a crash) is done; one that holds other
        bytes is an error: a digest is never replaced. No
        ``X-Delete-After``: digests outlive the archives they list.

        :raises UploadError: it is not stored, and why.
        """
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        target = "%s/%s" % (self.container, name)
        try:
            conn = self._connection()
            self._renew_token_if_expiring(conn)
            self._ensure_container(conn, self.container)
            response = {}
            try:
                returned = conn.put_object(
                    self.container, name, io.BytesIO(data),
                    content_length=len(data),
                    headers={"If-None-Match": "*"},
                    content_type=DIGEST_CONTENT_TYPE, response_dict=response)
            except swift_exceptions.ClientException as exc:
                if exc.http_status != 412:
                    raise
                returned = md5  # there already: the HEAD tells whose
            else:
                if returned != md5:
                    raise _Mismatch("PUT %s returned ETag %s; MD5 of the %d "
                                    "bytes sent: %s" % (target, returned,
                                                        len(data), md5),
                                    _trans_id(response.get("headers")))
            head = conn.head_object(self.container, name)
            if head.get("etag", "").strip('"') != md5 or \
                    int(head.get("content-length", -1)) != len(data):
                raise _Mismatch("%s holds other content (%s): a digest is "
                                "never replaced" % (target,
                                                    _what_is_there(head)),
                                _trans_id(head))
        except Exception as exc:
            self._drop_connection()
            hint = self._permanent(exc)
            raise exceptions.UploadError(
                "digest upload to %s failed: %s" % (target, _describe(exc)),
                callback=self.name, filename=name,
                permanent=hint is not None, hint=hint) from exc

    def _head(self, conn, obj, size, etag, sha256, slo):
        """HEAD the object uploaded: ``size`` bytes, ``etag`` (None: any),
        ``sha256``, and an SLO when ``slo``: its ETag (what a listing
        gives as ``hash``) and SHA-256."""
        head = conn.head_object(self.container, obj)
        txn = _trans_id(head)
        got_size = int(head.get("content-length", -1))
        got_etag = head.get("etag", "").strip('"')
        if got_size != size or (etag is not None and got_etag != etag):
            raise _Mismatch("HEAD %s/%s: %d bytes, ETag %s; expected %d "
                            "bytes, ETag %s" % (self.container, obj, got_size,
                                                got_etag, size, etag), txn)
        got_sha256 = head.get("x-object-meta-sha256")
        if got_sha256 != sha256:
            raise _Mismatch("HEAD %s/%s: SHA-256 %s; expected %s"
                            % (self.container, obj, got_sha256, sha256), txn)
        if slo and not _is_slo(head):
            raise _Mismatch("HEAD %s/%s: not a Static Large Object"
                            % (self.container, obj), txn)
        return got_etag, got_sha256

    def _existing(self, conn, container, obj):
        """Swift's headers of ``container/obj``, or None when there is
        none."""
        try:
            return conn.head_object(container, obj)
        except swift_exceptions.ClientException as exc:
            if exc.http_status == 404:
                return None
            raise

    def _put_plain(self, conn, fd, obj, size, file_hash, headers,
                   content_type):
        """PUT, then POST the metadata with the SHA-256 known only now
        (the POST replaces all of it), then HEAD.

        :returns: ``(created, (etag, sha256))``: whether this call
            created the object (False: Swift held this very file already,
            from an earlier attempt), and its ETag and SHA-256 as the HEAD
            verified them.
        :raises _NameTaken: Swift holds other content under ``obj``.
        """
        part = _Part(fd, 0, size, file_hash)
        created = True
        try:
            etag = self._put(conn, self.container, obj, part, headers,
                             content_type)
        except _Exists:
            created = False
            etag = part.md5.hexdigest()
        sha256 = file_hash.hexdigest(size)
        if not created:
            head = self._existing(conn, self.container, obj) or {}
            if not _same_content(head, size, sha256, etag):
                raise _NameTaken(_what_is_there(head)) from None
            if head.get("x-object-meta-sha256") == sha256:
                # this file, uploaded before: as a plain object, or as an
                # SLO (other settings), whose ETag is its segments'
                return False, self._head(conn, obj, size,
                                         None if _is_slo(head) else etag,
                                         sha256, slo=False)
            # an earlier attempt stopped before its metadata POST
        conn.post_object(self.container, obj, headers=dict(
            headers, **{"X-Object-Meta-Sha256": sha256}))
        return created, self._head(conn, obj, size, etag, sha256, slo=False)

    def _put_slo(self, conn, fd, obj, size, count, file_hash, headers,
                 content_type):
        """The segments in order, then the manifest (with the SHA-256 of
        them all), then HEAD. A manifest already there is looked at first
        (the file hashed for it), so that no segment is sent for it.

        :returns: ``(created, etag)``, as :meth:`_put_plain`.
        :raises _NameTaken: Swift holds other content under ``obj`` (or
            under one of its segment names).
        """
        head = self._existing(conn, self.container, obj)
        if head is not None:
            return self._slo_exists(conn, fd, obj, size, head)
        segment_headers = {}
        if self.delete_after is not None:
            # later than the manifest: never a manifest without segments
            segment_headers["X-Delete-After"] = str(
                self.delete_after + SEGMENT_EXPIRY_MARGIN)
        manifest = []
        for index in range(count):
            offset = index * self.segment_size
            length = min(self.segment_size, size - offset)
            name = self.segment_name(obj, size, index)
            part = _Part(fd, offset, length, file_hash)
            try:
                etag = self._put(conn, self.segment_container, name, part,
                                 segment_headers, "application/octet-stream")
            except _Exists:
                etag = self._reuse_segment(conn, name, part, segment_headers)
            manifest.append({"path": "/%s/%s" % (self.segment_container,
                                                 name),
                             "etag": etag, "size_bytes": length})
        sha256 = file_hash.hexdigest(size)
        try:
            conn.put_object(self.container, obj, json.dumps(manifest),
                            headers=dict(headers, **{
                                "X-Object-Meta-Sha256": sha256,
                                "If-None-Match": "*"}),
                            content_type=content_type,
                            query_string="multipart-manifest=put")
        except swift_exceptions.ClientException as exc:
            if exc.http_status != 412:
                raise
            # another upload of this name came first: what is it?
            return self._slo_exists(
                conn, fd, obj, size,
                self._existing(conn, self.container, obj) or {})
        slo_etag = hashlib.md5("".join(m["etag"] for m in manifest).encode(
            "ascii"), usedforsecurity=False).hexdigest()
        return True, self._head(conn, obj, size, slo_etag, sha256, slo=True)

    def _slo_exists(self, conn, fd, obj, size, head):
        """``obj`` exists already: done if it holds this file (its size and
        SHA-256, whatever its segments), else :class:`_NameTaken`."""
        sha256 = _file_sha256(fd, size)
        if not _same_content(head, size, sha256, None):
            raise _NameTaken(_what_is_there(head))
        # its ETag is that of its own segments, which may be cut otherwise
        return False, self._head(conn, obj, size, None, sha256, slo=False)

    def _reuse_segment(self, conn, name, part, segment_headers):
        """A segment already there (an earlier attempt's): its MD5 if it
        holds these bytes, with its expiry renewed; else
        :class:`_NameTaken`."""
        etag = part.md5.hexdigest()
        head = self._existing(conn, self.segment_container, name) or {}
        if not _same_content(head, len(part), None, etag):
            raise _NameTaken("segment %s/%s: %s" % (
                self.segment_container, name, _what_is_there(head)))
        if segment_headers:
            conn.post_object(self.segment_container, name,
                             headers=segment_headers)
        return etag

    def _stale_segments(self, conn, obj, size, count):
        """Segments of earlier attempts at ``obj`` that this upload will
        not use (listed before it, deleted after it is verified)."""
        keep = (set() if count == 1 else
                {self.segment_name(obj, size, i) for i in range(count)})
        pattern = layout.segment_pattern(obj)
        try:
            _, listing = conn.get_container(self.segment_container,
                                            prefix=obj + "/",
                                            full_listing=True)
        except Exception as exc:
            LOG.warning("cannot list the segments of %s/%s; any of an "
                        "earlier attempt stay: %s", self.container, obj,
                        _describe(exc))
            return []
        return [item["name"] for item in listing
                if pattern.match(item["name"]) and item["name"] not in keep]

    def _delete_segments(self, conn, obj, names):
        """Best effort: a failure is logged, the upload stands."""
        for name in names:
            try:
                conn.delete_object(self.segment_container, name)
            except Exception as exc:
                LOG.warning("cannot delete stale segment %s/%s of %s/%s: %s",
                            self.segment_container, name, self.container,
                            obj, _describe(exc))
                return
            LOG.debug("deleted stale segment %s/%s", self.segment_container,
                      name)
