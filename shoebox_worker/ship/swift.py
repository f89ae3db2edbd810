"""The ``swift`` callback: upload each closed archive to OpenStack Swift.

Options (``[callback:swift]``, all strings, named like python-swiftclient's
``SwiftService`` options):

==========================  ==================================================
``auth``, ``user``, ``key``  v1 (tempauth/swauth) URL and credentials
``auth_version``             ``1`` or ``3``; default ``3`` when
                             ``os_auth_url`` is set, else ``1``
``os_auth_url``,             Keystone v3 (through keystoneauth1)
``os_username``,
``os_password``,
``os_project_name``,
``os_project_id``,
``os_user_domain_name``,
``os_project_domain_name``,
``os_region_name``
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

An empty ``key`` is read from ``ST_KEY`` and an empty ``os_password`` from
``OS_PASSWORD`` when the callback is built. Nothing else comes from the
environment: swiftclient's own defaults (read from ``OS_*``/``ST_*`` when it
is imported) are never used.

**Integrity.** Before sending, the file is read once: MD5 (of the whole
file, or of each segment) and SHA-256 in two threads, and the record headers
are walked for the count, the first and last metadata and the format
versions. A plain object is PUT with ``ETag: <md5>``, so Swift refuses
(422) bytes that do not match; then a HEAD must show the local size and
MD5. For a Static Large Object every segment is PUT with its own MD5 ETag,
the manifest PUT makes Swift check each segment's size and ETag, and a HEAD
must show the local size and the SLO ETag (the MD5 of the segments' MD5s,
in quotes).

**Idempotence.** The object name depends only on the file (its first
record, or its mtime, and its name), so an upload after a crash replaces
the same object. Segment names are ``<object>/<size>/<segment_size>/<index>``:
a re-upload overwrites them, and segments of an earlier attempt with other
sizes are deleted once the new object is verified. Both containers are
created (when missing) at the first upload.
"""

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.parse

from swiftclient import client as swiftclient
from swiftclient import exceptions as swift_exceptions
from swiftclient import utils as swift_utils

from shoebox_worker import archive
from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import options as coercers
from shoebox_worker import record

__all__ = ["SwiftUploadCallback", "ArchiveSummary", "summarize"]

LOG = logging.getLogger(__name__)

_CHUNK = 1 << 20
#: Swift's default limit on one object (and so on one segment).
MAX_SEGMENT_SIZE = 5 * (1 << 30)
#: Swift refuses metadata values longer than this.
_MAX_META_VALUE = 256
_SAFE_HEADER = re.compile(r"[\x20-\x7e]*\Z")


# -- option coercion (shoebox_worker.options) --------------------------------

_TEXT = coercers.text(empty="")
_INSECURE = coercers.boolean(empty=False)
_RETRIES = coercers.integer(minimum=0)
_TIMEOUT = coercers.number(minimum=0, exclusive=True, empty=None)
_SEGMENT_SIZE = coercers.size(minimum=1, maximum=MAX_SEGMENT_SIZE)
_DELETE_AFTER = coercers.integer(minimum=1, empty=None)


# -- what is in the archive -------------------------------------------------

@dataclasses.dataclass
class ArchiveSummary:
    """What the object metadata says about an archive.

    :ivar records: records found (None: unreadable).
    :ivar first_metadata: metadata of the first record (or None).
    :ivar last_metadata: metadata of the last record (or None).
    :ivar versions: record format versions seen.
    :ivar damaged: damaged ranges (0 for a clean archive; at least 1 when
        the records could not all be read).
    """

    records: int = 0
    first_metadata: dict | None = None
    last_metadata: dict | None = None
    versions: set = dataclasses.field(default_factory=set)
    damaged: int = 0


def _walk(filename):
    """Walk record headers only (payload checksums are not checked).

    :raises RecordError: at the first damage.
    """
    summary = ArchiveSummary()
    last = None
    with compression.open_read(filename) as stream:
        buf = b""
        pos = 0
        while True:
            if len(buf) - pos < record.HEADER_SIZE:
                buf = buf[pos:] + stream.read(_CHUNK)
                pos = 0
                if not buf:
                    break
                if len(buf) < record.HEADER_SIZE:
                    raise exceptions.TornRecord("torn record header")
            size = record.record_size(buf, pos)
            have = len(buf) - pos
            if have < size:
                parts = [buf[pos:]]
                while have < size:
                    chunk = stream.read(max(_CHUNK, size - have))
                    if not chunk:
                        raise exceptions.TornRecord("torn record")
                    parts.append(chunk)
                    have += len(chunk)
                buf = b"".join(parts)
                pos = 0
            summary.versions.add(buf[pos + 4] | buf[pos + 5] << 8)
            if summary.records == 0:
                summary.first_metadata = record.unpack_from(buf, pos)[0]
            last = (buf, pos)
            summary.records += 1
            pos += size
    if last is not None:
        summary.last_metadata = record.unpack_from(*last)[0]
    return summary


def _marker_versions(filename):
    """Versions of every valid record header in a (damaged) archive."""
    versions = set()
    with compression.open_read(filename) as stream:
        tail = b""
        while chunk := stream.read(_CHUNK):
            buf = tail + chunk
            pos = record.find_marker(buf, 0)
            while 0 <= pos <= len(buf) - record.HEADER_SIZE:
                try:
                    record.record_size(buf, pos)
                    versions.add(buf[pos + 4] | buf[pos + 5] << 8)
                except exceptions.RecordError:
                    pass
                pos = record.find_marker(buf, pos + 1)
            tail = buf[max(0, len(buf) - record.HEADER_SIZE + 1):]
    return versions


def summarize(filename):
    """Count the records of an archive (plain or compressed) and take its
    first and last metadata and its format versions.

    A clean archive is read by its record headers alone (fast); a damaged
    one falls back to :func:`~shoebox_worker.archive.inspect_file`. Damage
    never raises: what could not be read is uploaded all the same, and an
    archive nothing could be made of gives ``records = None``.

    :returns: an :class:`ArchiveSummary`.
    """
    try:
        return _walk(filename)
    except Exception as exc:  # damage: records, or the compressed stream
        LOG.debug("%s: fast record walk stopped (%s); inspecting it",
                  filename, exc)
    try:
        report = archive.inspect_file(filename)
        versions = _marker_versions(filename)
    except Exception as exc:
        LOG.warning("%s: cannot read its records (%s); uploading it without "
                    "record metadata", filename, exc)
        return ArchiveSummary(records=None, damaged=1)
    return ArchiveSummary(records=report.records,
                          first_metadata=report.first_metadata,
                          last_metadata=report.last_metadata,
                          versions=versions,
                          damaged=max(len(report.skipped), 1))


def _record_time(metadata):
    """The ``timestamp`` of a record as an aware UTC datetime, or None."""
    value = (metadata or {}).get("timestamp")
    if not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def _header_value(value):
    """A metadata value Swift accepts: printable ASCII, at most 256 bytes."""
    value = str(value)
    if not _SAFE_HEADER.match(value):
        value = urllib.parse.quote(value, safe=" !#$&'()*+,/:;=?@[]~")
    return value[:_MAX_META_VALUE]


# -- hashing ----------------------------------------------------------------

def _hash_range(filename, algorithm, offset, length):
    digest = hashlib.new(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(filename, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            n = f.readinto(view[:min(_CHUNK, left)])
            if not n:
                raise OSError("%s shrank while being read" % filename)
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


class _Mismatch(Exception):
    """Swift's copy is not the local file."""

    def __init__(self, message, transaction_id=None):
        super().__init__(message)
        self.transaction_id = transaction_id


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
                 os_auth_url="", os_username="", os_password="",
                 os_project_name="", os_project_id="",
                 os_user_domain_name="", os_project_domain_name="",
                 os_region_name="", os_storage_url="", os_auth_token="",
                 insecure="false", container="shoebox", object_prefix="",
                 segment_size="1G", delete_after="", retries="2",
                 timeout="60"):
        def text(name, value):  # "" when not set
            return coercers.coerce(name, value, _TEXT)

        key = text("key", key) or os.environ.get("ST_KEY", "")
        os_password = (text("os_password", os_password)
                       or os.environ.get("OS_PASSWORD", ""))
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
            "os_username": text("os_username", os_username),
            "os_password": os_password,
            "os_project_name": text("os_project_name", os_project_name),
            "os_project_id": text("os_project_id", os_project_id),
            "os_user_domain_name": text("os_user_domain_name",
                                        os_user_domain_name),
            "os_project_domain_name": text("os_project_domain_name",
                                           os_project_domain_name),
            "os_region_name": text("os_region_name", os_region_name),
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
        self.segment_container = self.container + "_segments"
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
        self._pool = None
        self._containers = set()

    @staticmethod
    def _timeout(value):
        """Seconds per HTTP request; None (no limit) when empty."""
        return coercers.coerce("timeout", value, _TIMEOUT)

    def _check_credentials(self):
        o = self.options
        if o["os_storage_url"] and o["os_auth_token"]:
            return
        if o["auth_version"] == "1":
            need = ("auth", "user", "key")
        else:
            need = ("os_auth_url", "os_username", "os_password")
        missing = [name for name in need if not o[name]]
        if missing:
            raise coercers.OptionError(
                "required for auth_version %s (key and os_password may "
                "also come from ST_KEY and OS_PASSWORD)"
                % o["auth_version"], ", ".join(missing))
        if o["auth_version"] == "3" and not (o["os_project_name"]
                                             or o["os_project_id"]):
            raise coercers.OptionError("required for auth_version 3",
                                       "os_project_name or os_project_id")

    def __repr__(self):
        return "<%s %s container=%s>" % (
            type(self).__name__,
            self.options["auth"] or self.options["os_auth_url"]
            or self.options["os_storage_url"], self.container)

    # -- connection ----------------------------------------------------------

    def connection_kwargs(self):
        """The keyword arguments for ``swiftclient.client.Connection``."""
        o = self.options
        if o["auth_version"] == "1":
            authurl, user, key = o["auth"], o["user"], o["key"]
            os_options = {}
        else:
            authurl, user, key = (o["os_auth_url"], o["os_username"],
                                  o["os_password"])
            os_options = {
                name: o["os_" + name] or None
                for name in ("project_name", "project_id",
                             "user_domain_name", "project_domain_name",
                             "region_name")
            }
        return {
            "authurl": authurl or None,
            "user": user or None,
            "key": key or None,
            "auth_version": o["auth_version"],
            "os_options": os_options,
            "preauthurl": o["os_storage_url"] or None,
            "preauthtoken": o["os_auth_token"] or None,
            "insecure": o["insecure"],
            "retries": o["retries"],
            "timeout": o["timeout"],
            "retry_on_ratelimit": True,
            "starting_backoff": 1,
            "max_backoff": 16,
        }

    def _connection(self):
        if self._conn is None:
            # swiftclient logs failed requests at INFO with the first
            # characters of X-Auth-Key/X-Auth-Token; log none of them
            swiftclient.logger_settings["reveal_sensitive_prefix"] = 0
            self._conn = swiftclient.Connection(**self.connection_kwargs())
        return self._conn

    def _executor(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="swift-hash")
        return self._pool

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
        """Release the connection and the hashing threads (idempotent)."""
        self._drop_connection()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

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
        return "%s/%d/%d/%08d" % (obj, size, self.segment_size, index)

    def _segment_pattern(self, obj):
        return re.compile(re.escape(obj) + r"/[0-9]+/[0-9]+/[0-9]{8}\Z")

    # -- upload --------------------------------------------------------------

    def on_open(self, filename):
        """Nothing to do when an archive is opened."""

    def on_close(self, filename):
        """Upload ``filename``; return it unchanged.

        :raises UploadError: anything went wrong; the file is untouched.
        """
        filename = os.fspath(filename)
        target = self.container + "/?"
        futures = []
        started = time.monotonic()
        try:
            stat = os.stat(filename)
            size = stat.st_size
            if size > self.segment_size:
                step = self.segment_size
                ranges = [(i * step, min(step, size - i * step))
                          for i in range(math.ceil(size / step))]
            else:
                ranges = [(0, size)]
            pool = self._executor()
            sha256 = pool.submit(_hash_range, filename, "sha256", 0, size)
            md5s = [pool.submit(_hash_range, filename, "md5", offset, length)
                    for offset, length in ranges]
            futures = [sha256] + md5s
            # while the threads hash: walk the records, connect, list the
            # segments of earlier attempts
            summary = summarize(filename)
            moment = (_record_time(summary.first_metadata)
                      or datetime.datetime.fromtimestamp(stat.st_mtime,
                                                         datetime.UTC))
            obj = self.object_name(filename, moment)
            target = "%s/%s" % (self.container, obj)
            headers = self._headers(filename, summary)
            conn = self._connection()
            # both, so that the segment listing never meets a 404
            self._ensure_container(conn, self.container)
            self._ensure_container(conn, self.segment_container)
            stale = self._stale_segments(conn, obj, size, len(ranges))
            if len(ranges) == 1:
                self._put_plain(conn, filename, obj, size, md5s[0], sha256,
                                headers)
            else:
                self._put_slo(conn, filename, obj, size, ranges, md5s,
                              sha256, headers)
        except Exception as exc:
            for future in futures:
                future.cancel()
            self._drop_connection()  # the next call starts afresh
            raise exceptions.UploadError(
                "upload to %s failed: %s" % (target, _describe(exc)),
                callback=self.name, filename=filename) from exc
        self._delete_segments(conn, obj, stale)
        seconds = max(time.monotonic() - started, 1e-6)
        LOG.info("uploaded %s to %s/%s: %d bytes in %.2f s (%.1f MB/s)",
                 filename, self.container, obj, size, seconds,
                 size / seconds / 1e6)
        return filename

    def _headers(self, filename, summary):
        first = summary.first_metadata or {}
        last = summary.last_metadata or {}
        meta = {"Filename": os.path.basename(filename)}
        if summary.records is not None:
            meta["Records"] = summary.records
        if summary.versions:
            meta["Format-Versions"] = ",".join(
                str(v) for v in sorted(summary.versions))
        if first.get("timestamp"):
            meta["First-Timestamp"] = first["timestamp"]
        if last.get("timestamp"):
            meta["Last-Timestamp"] = last["timestamp"]
        if summary.damaged:
            meta["Damaged-Ranges"] = summary.damaged
        headers = {"X-Object-Meta-" + name: _header_value(value)
                   for name, value in meta.items()}
        if self.delete_after is not None:
            # one absolute time for segments and manifest alike
            headers["X-Delete-At"] = str(int(time.time())
                                         + self.delete_after)
        return headers

    def _content_type(self, filename):
        with open(filename, "rb") as f:
            head = f.read(4)
        for codec in compression.CODECS.values():
            if head.startswith(codec.magic):
                return {"gzip": "application/gzip",
                        "zstd": "application/zstd"}.get(codec.name)
        return "application/octet-stream"

    def _ensure_container(self, conn, container):
        if container not in self._containers:
            conn.put_container(container)
            self._containers.add(container)

    def _put(self, conn, container, obj, f, offset, length, etag, headers,
             content_type):
        f.seek(offset)
        response = {}
        try:
            returned = conn.put_object(
                container, obj, swift_utils.LengthWrapper(f, length),
                content_length=length, etag=etag, headers=headers,
                content_type=content_type, response_dict=response)
        except swift_exceptions.ClientException as exc:
            if exc.http_status == 404:  # the container went away
                self._containers.discard(container)
            raise
        if returned != etag:
            raise _Mismatch("PUT %s/%s returned ETag %s, local MD5 %s"
                            % (container, obj, returned, etag),
                            _trans_id(response.get("headers")))

    def _head(self, conn, obj, size, etag, slo):
        head = conn.head_object(self.container, obj)
        txn = _trans_id(head)
        got_size = int(head.get("content-length", -1))
        got_etag = head.get("etag", "").strip('"')
        if got_size != size or got_etag != etag:
            raise _Mismatch("HEAD %s/%s: %d bytes, ETag %s; expected %d "
                            "bytes, ETag %s" % (self.container, obj, got_size,
                                                got_etag, size, etag), txn)
        if slo and head.get("x-static-large-object", "").lower() != "true":
            raise _Mismatch("HEAD %s/%s: not a Static Large Object"
                            % (self.container, obj), txn)

    def _put_plain(self, conn, filename, obj, size, md5, sha256, headers):
        content_type = self._content_type(filename)
        etag = md5.result()
        headers = dict(headers, **{"X-Object-Meta-Sha256": sha256.result()})
        with open(filename, "rb") as f:
            self._put(conn, self.container, obj, f, 0, size, etag, headers,
                      content_type)
        self._head(conn, obj, size, etag, slo=False)

    def _put_slo(self, conn, filename, obj, size, ranges, md5s, sha256,
                 headers):
        content_type = self._content_type(filename)
        segment_headers = {k: v for k, v in headers.items()
                           if k == "X-Delete-At"}
        manifest = []
        with open(filename, "rb") as f:
            pairs = enumerate(zip(ranges, md5s, strict=True))
            for index, ((offset, length), md5) in pairs:
                etag = md5.result()
                name = self.segment_name(obj, size, index)
                self._put(conn, self.segment_container, name, f, offset,
                          length, etag, segment_headers,
                          "application/octet-stream")
                manifest.append({"path": "/%s/%s" % (self.segment_container,
                                                     name),
                                 "etag": etag, "size_bytes": length})
        headers = dict(headers, **{"X-Object-Meta-Sha256": sha256.result()})
        conn.put_object(self.container, obj, json.dumps(manifest),
                        headers=headers, content_type=content_type,
                        query_string="multipart-manifest=put")
        slo_etag = hashlib.md5("".join(m["etag"] for m in manifest).encode(
            "ascii")).hexdigest()
        self._head(conn, obj, size, slo_etag, slo=True)

    def _stale_segments(self, conn, obj, size, count):
        """Segments of earlier attempts at ``obj`` that this upload will
        not use (listed before it, deleted after it is verified)."""
        keep = (set() if count == 1 else
                {self.segment_name(obj, size, i) for i in range(count)})
        pattern = self._segment_pattern(obj)
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
