"""Where the tools read archives from: local files, or objects in Swift.

:func:`find` turns the specs of a command line into :class:`Item` objects
in write order: a PATH as :func:`find_archives` finds it (a file as given,
a directory searched for archives), and ``swift://CONTAINER[/PREFIX]`` as
the objects of the container under the prefix. :func:`read_ahead` hands
them out in that order while the next ``jobs - 1`` objects are already
being downloaded, each into a bounded buffer.

**What a listing holds.** The listing of the container under the prefix,
read :data:`LIST_PAGE` entries at a time (:meth:`Swift.entries`: one page
held at once, never the whole listing), less what is never an archive:
``<object>.index``
(paired with its archive as :attr:`Item.index_name`), index bundles
(``<prefix>.shoebox-index-bundle``, ``shoebox-worker index-bundle``, and
the parts of period bundles), the
segments of a
Static Large Object (``<object>/<size>/<segment_size>/<index>``, the names
:mod:`shoebox_worker.swift.layout` gives them, wherever they are), directory
markers and empty objects. Whether the rest are archives is found out by
reading them, not by their names (a ``filename_template`` may make any
name): a listed object whose first bytes hold no record is skipped, as a
directory walk skips such a file; an object named by the spec itself is
always read, and one that is not an archive is an error. A PREFIX that is
the name of an object reads that object alone.

**Index bundles.** When the indexes will be read (``find(...,
indexes=True)``: a pruned read), the bundles in the listing are fetched
(a GET each, ``jobs`` at a time) and an archive whose name and listing
``hash`` (its ETag) a bundle holds takes its index from there, with no
GET of its own ``.index``; that index, like an archive's own, prunes only
when it is bound to the archive (:meth:`Item.binding_problem`: the
listing's ``bytes`` and :func:`bound_etag`, no request). An entry whose
hash is not the listing's (the archive object was replaced since) is
ignored, and so is a damaged bundle
(one line on stderr): those archives' own indexes are read, as are those
of archives no bundle holds. A bundle is parsed as its bytes come, and
only the entries of the listing's archives are kept, at most
:data:`BUNDLE_MEMORY` bytes of them in all (past that, one line on
stderr, and those archives' own indexes are read): the bundles' sizes do
not make a reader hold more.

**Period bundles.** When the indexes will be read, the parts of the
period bundles in the listing (``<prefix>.shoebox-index-bundles/<period>/
<part>-of-<parts>``, ``index-bundle --per``) are fetched first, one part
a period (:func:`load_period_parts`: the part holding the first exact
``--where`` value, else the first; every part names every archive of its
period with its time range): an archive whose name and ETag a part holds
is pruned by that entry (:attr:`Item.summary`), as by its own index,
with no GET of its ``.index``; the others as above.

**Indexes are bounded.** An index or a bundle is read with one GET,
:data:`INDEX_CHUNK` bytes at a time, and given up (one warning line, an
:class:`~shoebox_worker.exceptions.IndexError_`) as soon as its size, by
the listing, by its ``Content-Length`` or by the bytes that came, passes
what :func:`shoebox_worker.index.size_limit` allows for its header (or
:data:`~shoebox_worker.index.MAX_BUNDLE_BYTES`): a hostile or huge
``.index`` object is never held. An index not used proves nothing, so its
archive is read (:func:`get_bounded`).

**Write order.** Objects are ordered as :func:`roll_manager.sort_written_order`
orders files: by the time Swift last wrote them (the listing's
``last_modified``, the upload, which the shipper does in the order the
archives were closed), then by the ``~N`` counter of the name, then by the
name. The name alone would not do: ``object_prefix`` puts the first
record's time in front of the file name, and the file name starts with
whatever ``filename_template`` says.

**Connections.** A :class:`Swift` owns every connection made through it
(one per thread) and closes them when it is closed: use it as a context
manager around the whole command, so that an error or a reader that stops
early (``cat | head``) closes them too.

**Credentials.** ``--config FILE``'s ``[callback:swift]`` section, checked
as the worker checks it, else the environment as the swift CLI reads it:
``ST_AUTH``, ``ST_USER``, ``ST_KEY`` (v1), or ``OS_AUTH_URL``,
``OS_USERNAME``, ``OS_PASSWORD``, ``OS_PROJECT_NAME``, the domains...
(Keystone v3; :data:`ENVIRONMENT`). The connection is the swift step's own
(:meth:`SwiftUploadCallback.new_connection
<shoebox_worker.ship.swift.SwiftUploadCallback.new_connection>`): the same
auth code, the same secrets kept out of the logs. No password is ever in a
message.

**Streams.** An object is read with one GET, its body taken
:data:`GET_CHUNK` bytes at a time (a Static Large Object's manifest serves
the whole content) and decompressed as it comes
(:func:`~shoebox_worker.compression.open_read` on the stream): nothing is
written to disk and no object is held whole in memory. An object read
ahead waits, as stored (compressed), in a buffer of at most
:data:`READ_AHEAD_CHUNKS` chunks; the downloads stop when the buffers are
full, so they hold at most ``jobs * (READ_AHEAD_CHUNKS + 1) * GET_CHUNK``
bytes (20 MiB at ``--jobs 4``) whatever the objects' sizes, and the one
being read is decompressed through the readers' own bounded buffers. A
download that fails (404 because the object went since the listing, a
dropped connection) is an ``OSError`` of that object's stream: the tools
report it in one line and go on with the next.
"""

import collections
import concurrent.futures
import errno
import gc
import logging
import os
import queue
import re
import sys
import threading

from shoebox_worker import compression
from shoebox_worker import exceptions
from shoebox_worker import index as archive_index
from shoebox_worker import period_bundle
from shoebox_worker import plugins
from shoebox_worker import record
from shoebox_worker import roll_manager
from shoebox_worker.options import OptionError
from shoebox_worker.swift import layout
from shoebox_worker.tools import ToolError
from shoebox_worker.tools import UsageError

__all__ = [
    "Item",
    "FileItem",
    "SwiftItem",
    "Swift",
    "describe",
    "find",
    "find_archives",
    "is_index_file",
    "without_sidecars",
    "bound_etag",
    "get_bounded",
    "item_of",
    "looks_like_archive",
    "read_ahead",
    "warn",
    "SCHEME",
    "DEFAULT_JOBS",
]

LOG = logging.getLogger(__name__)

#: How a spec names Swift.
SCHEME = "swift://"
#: Objects read at a time unless ``--jobs`` says otherwise.
DEFAULT_JOBS = 4
#: Bytes of an object's body taken from the HTTP response at a time
#: (swiftclient's ``resp_chunk_size``).
GET_CHUNK = 1 << 20
#: Bytes of an index or bundle taken from the HTTP response at a time.
INDEX_CHUNK = 1 << 16
#: Objects a listing asks Swift for at a time (``limit``; Swift's own
#: default most, ``container_listing_limit``): the listing is read page by
#: page, never held whole.
LIST_PAGE = 10000
#: The most bytes of bundled indexes a listing keeps (:func:`load_bundles`),
#: all bundles together; the archives past it take their own ``.index``.
BUNDLE_MEMORY = 32 << 20
#: Chunks an object read ahead may hold before its download waits.
READ_AHEAD_CHUNKS = 4
#: How much of a file is looked at to decide whether it is an archive.
SNIFF_BYTES = 1 << 16
#: The name of an archive's index: the archive's name and this.
INDEX_SUFFIX = archive_index.SUFFIX
#: How often a download blocked on a full buffer looks whether it was
#: cancelled (seconds).
_CANCEL_POLL = 0.2

#: The environment, as the swift CLI reads it: ``(variable, option of
#: [callback:swift])``. ``ST_AUTH`` set means v1 (``ST_*`` only), else
#: Keystone v3 from the ``OS_*``.
ENVIRONMENT_V1 = (("ST_AUTH", "auth"), ("ST_USER", "user"),
                  ("ST_KEY", "key"))
ENVIRONMENT = (
    ("OS_AUTH_URL", "os_auth_url"), ("OS_AUTH_TYPE", "os_auth_type"),
    ("OS_USERNAME", "os_username"), ("OS_USER_ID", "os_user_id"),
    ("OS_PASSWORD", "os_password"),
    ("OS_USER_DOMAIN_NAME", "os_user_domain_name"),
    ("OS_USER_DOMAIN_ID", "os_user_domain_id"),
    ("OS_PROJECT_NAME", "os_project_name"),
    ("OS_PROJECT_ID", "os_project_id"),
    ("OS_PROJECT_DOMAIN_NAME", "os_project_domain_name"),
    ("OS_PROJECT_DOMAIN_ID", "os_project_domain_id"),
    ("OS_APPLICATION_CREDENTIAL_ID", "os_application_credential_id"),
    ("OS_APPLICATION_CREDENTIAL_NAME", "os_application_credential_name"),
    ("OS_APPLICATION_CREDENTIAL_SECRET",
     "os_application_credential_secret"),
    ("OS_REGION_NAME", "os_region_name"),
    ("OS_ENDPOINT_TYPE", "os_endpoint_type"),
    ("OS_SERVICE_TYPE", "os_service_type"),
    ("OS_STORAGE_URL", "os_storage_url"),
    ("OS_AUTH_TOKEN", "os_auth_token"),
)


# -- items ------------------------------------------------------------------

class Item:
    """One archive to read, local or in Swift.

    :ivar name: for messages: a path, or ``swift://CONTAINER/OBJECT``.
    :ivar size: stored bytes (the listing's, or ``os.stat``'s), or None.
    :ivar meta: Swift object metadata, keys lowercased without
        ``x-object-meta-`` (``{"records": "500", ...}``); ``{}`` for a
        file; None until fetched (:func:`find` with ``heads=True``).
    :ivar index_name: the object or file holding its index, or None.
    :ivar listed: found by a directory walk or a listing, not named by
        the spec itself (one that is not an archive is then skipped).
    :ivar salvage_to: where ``verify --salvage`` writes its good records.
    :ivar summary: its entry in a period bundle, which prunes as its
        index would (:class:`~shoebox_worker.period_bundle.Entry`), or
        None.
    """

    summary = None
    #: Whether its index (or period bundle entry) is read without a
    #: request or a file read.
    index_in_memory = False

    def __init__(self, name, *, size=None, meta=None, index_name=None,
                 listed=False, salvage_to=None):
        self.name = name
        self.size = size
        self.meta = meta
        self.index_name = index_name
        self.listed = listed
        self.salvage_to = salvage_to

    def open(self):
        """A binary file object of the stored bytes (raw: maybe gzip or
        zstd), read front to back, never held whole in memory."""
        raise NotImplementedError

    def read_index(self):
        """The bytes of the index, or None when there is none."""
        raise NotImplementedError

    def binding_problem(self, found):
        """Why the :class:`~shoebox_worker.index.Index` ``found`` may not
        prune this archive, or None when it is bound to it
        (:func:`shoebox_worker.index.binding_problem`).

        :raises OSError: the archive cannot be read (a file is hashed).
        """
        raise NotImplementedError

    @property
    def index_label(self):
        """The index, for messages (a path, ``swift://C/O.index``)."""
        return self.index_name

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.name)


class FileItem(Item):
    """A local archive file."""

    def __init__(self, path, *, listed=False):
        index = path + INDEX_SUFFIX
        try:
            size = os.stat(path).st_size
        except OSError:
            size = None  # opening it says why
        super().__init__(path, size=size, meta={},
                         index_name=index if os.path.isfile(index) else None,
                         listed=listed, salvage_to=path + ".salvaged")
        self.path = path

    def open(self):
        return open(self.path, "rb")

    def binding_problem(self, found):
        """The file's size (now) and MD5 against the binding: the MD5 is
        taken only when the sizes agree."""
        return archive_index.binding_problem(
            found, os.stat(self.path).st_size,
            lambda: archive_index.etag_of_file(self.path))

    def read_index(self):
        if self.index_name is None:
            return None
        with open(self.index_name, "rb") as f:
            head = f.read(archive_index.HEAD_BYTES)
            limit = _limit(archive_index.size_limit, head, self.index_name)
            data = head + f.read(max(0, limit - len(head)) + 1)
        if len(data) > limit:
            raise _too_big(self.index_name, limit)
        return data


class SwiftItem(Item):
    """An object in Swift; :meth:`open` streams it with one GET (or hands
    over the download :func:`read_ahead` started for it)."""

    def __init__(self, swift, container, obj, *, size=None,
                 last_modified="", etag=None, index_name=None,
                 index_size=None, index_data=None, listed=False,
                 summary=None):
        super().__init__("%s%s/%s" % (SCHEME, container, obj), size=size,
                         index_name=index_name, listed=listed,
                         salvage_to=os.path.basename(obj) + ".salvaged")
        self.swift = swift
        self.container = container
        self.object = obj
        self.last_modified = last_modified
        self.etag = etag  # the listing's hash
        self.index_size = index_size  # the listing's bytes of index_name
        self._index_data = index_data  # from a bundle: no GET
        #: its entry in a period bundle (:func:`load_period_parts`), which
        #: prunes as its index would: no GET
        self.summary = summary
        self._download = None  # started by read_ahead, not yet opened

    @property
    def index_in_memory(self):
        return self.summary is not None or self._index_data is not None

    def open(self):
        """The object's bytes as stored, from the download
        :func:`read_ahead` started, else from a GET sent now."""
        download, self._download = self._download, None
        if download is None:
            download = _Download(self)
            download.run(self.swift.connection())  # the body: as read
        return _ObjectStream(download)

    def read_index(self):
        """The index from its bundle (:func:`load_bundles`), else from a
        GET of its own ``.index`` object (:func:`get_bounded`).

        :raises IndexError_: the index is longer than an index may be.
        :raises OSError: the GET failed.
        """
        if self._index_data is not None:
            return self._index_data
        if self.index_name is None:
            return None
        try:
            _, data = get_bounded(self.swift.connection(), self.container,
                                  self.index_name, archive_index.size_limit,
                                  listed=self.index_size)
        except exceptions.IndexError_:
            raise
        except Exception as exc:
            raise _stream_error(self, exc) from None
        return data

    @property
    def index_label(self):
        if self.summary is not None:
            return "%s%s/%s (period bundle %s)" % (
                SCHEME, self.container, self.object, self.summary.period)
        if self.index_name is None:
            return None
        return "%s%s/%s" % (SCHEME, self.container, self.index_name)

    def binding_problem(self, found):
        """The listing's ``bytes`` and ``hash`` against the binding: no
        request."""
        return archive_index.binding_problem(found, self.size,
                                             lambda: self.etag)

    def head(self, conn):
        """Fill :attr:`meta` from a HEAD of the object."""
        try:
            headers = conn.head_object(self.container, self.object)
        except Exception as exc:
            raise _stream_error(self, exc) from None
        self.meta = object_meta(headers)


def object_meta(headers):
    """Swift's ``x-object-meta-*`` headers as ``{name: value}``, names
    lowercased without the prefix."""
    prefix = "x-object-meta-"
    return {key.lower()[len(prefix):]: value
            for key, value in headers.items()
            if key.lower().startswith(prefix)}


def get_bounded(conn, container, obj, limit_of, listed=None):
    """``(headers, bytes-like)`` of an object that may be at most
    ``limit_of(first bytes)`` long (:func:`shoebox_worker.index.
    size_limit`), read :data:`INDEX_CHUNK` bytes at a time; refused
    before the GET when the listing's ``listed`` bytes are more than
    ``limit_of(b"")``, and as soon as the ``Content-Length`` or the bytes
    that came are more than the limit (the rest is not read).

    :raises IndexError_: too long, or ``limit_of`` refuses its first
        bytes (not an index).
    :raises Exception: what swiftclient raises for a failed GET.
    """
    name = SCHEME + container + "/" + obj
    limit = _limit(limit_of, b"", name)
    if listed is not None and listed > limit:
        raise _too_big(name, limit, listed)
    headers, body = conn.get_object(container, obj,
                                    resp_chunk_size=INDEX_CHUNK)
    try:
        length = headers.get("content-length")
        length = int(length) if length is not None else None
        data = bytearray()
        known = False  # is the limit from the header yet?
        for chunk in body:
            data += chunk
            if not known and len(data) >= archive_index.HEAD_BYTES:
                limit, known = _limit(limit_of, data, name), True
            if length is not None and length > limit:
                raise _too_big(name, limit, length)
            if len(data) > limit:
                raise _too_big(name, limit)
        if not known:
            _limit(limit_of, data, name)  # shorter than a header
    finally:
        body.close()
    return headers, data  # a bytearray: no copy


def _limit(limit_of, head, name):
    try:
        return limit_of(head)
    except exceptions.IndexError_ as exc:
        raise exceptions.IndexError_("%s: %s" % (name, exc)) from None


def _too_big(name, limit, size=None):
    return exceptions.IndexError_("%s: %s bytes, more than a reader takes "
                                  "for it (%d)" % (
                                      name, size if size is not None
                                      else "over %d" % limit, limit))


_WARN_LOCK = threading.Lock()


def warn(text):
    """One warning line on stderr, whole even when threads warn at once
    (``print`` writes the text and its newline apart)."""
    with _WARN_LOCK:
        sys.stderr.write("shoebox-worker: warning: %s\n" % text)
        sys.stderr.flush()


def item_of(source):
    """``source`` as an :class:`Item`: an Item as it is, a path as the
    file it names (for callers that still pass paths)."""
    return source if isinstance(source, Item) else FileItem(os.fspath(source))


# -- local files ------------------------------------------------------------

def looks_like_archive(item):
    """True when the item's (uncompressed) first bytes hold a record
    marker: a damaged first record still counts, and so does a damaged
    compressed stream (the reader will say what is wrong)."""
    try:
        with compression.open_read(item_of(item).open()) as f:
            head = f.read(SNIFF_BYTES)
    except compression.DECOMPRESS_ERRORS:
        return True
    except (OSError, ValueError):
        return False
    if archive_index.looks_like_index(head):
        return False  # its filter bytes may hold anything
    return record.find_marker(head, 0) >= 0


def is_index_file(path):
    """Is ``path`` an archive's index sidecar (``x.events.gz.index``, its
    first bytes an index's)? Named among archives (a shell glob of an
    archive folder), such a file is skipped, not taken for a damaged
    archive."""
    if not path.endswith(archive_index.SUFFIX) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return archive_index.looks_like_index(f.read(8))
    except OSError:
        return False


def without_sidecars(paths):
    """``paths`` without the archives' index files among them
    (``var/archive/*`` names each archive's ``.index`` too), unless they
    are all index files (then each is said to be one)."""
    kept = [path for path in paths
            if path.startswith(SCHEME) or not is_index_file(path)]
    return kept or list(paths)


def find_archives(paths):
    """The archives named by ``paths``, in reading order.

    A file is taken as given (in the order given); a directory is searched
    recursively for archives, sorted into the order they were written.

    :raises ToolError: a path that does not exist, or a directory that
        holds no archive.
    """
    found = []
    for path in paths:
        if os.path.isdir(path):
            candidates = []
            for folder, dirs, names in os.walk(path, onerror=_walk_error):
                dirs.sort()
                for name in names:
                    full = os.path.join(folder, name)
                    if os.path.isfile(full) and looks_like_archive(full):
                        candidates.append(full)
            if not candidates:
                raise ToolError("%s: no archives in this directory" % path)
            found.extend(roll_manager.sort_written_order(candidates))
        elif os.path.exists(path):
            found.append(path)
        else:
            raise ToolError("%s: no such file or directory" % path)
    return found


def _walk_error(err):
    raise ToolError("%s: %s" % (err.filename, err.strerror))


def _find_files(path):
    """The :class:`FileItem` objects of one PATH."""
    paths = find_archives([path])
    listed = os.path.isdir(path)
    return [FileItem(p, listed=listed) for p in paths]


# -- Swift: credentials and connections -------------------------------------

class Swift:
    """How to reach Swift: from ``config_file``'s ``[callback:swift]``, else
    from ``environ`` (see the module documentation). Nothing is read or
    checked until a ``swift://`` spec needs it; connections are made one
    per thread (swiftclient's are not thread-safe) and closed by
    :meth:`close`, which leaving it as a context manager calls::

        with sources.Swift(config_file=args.config) as swift:
            items = sources.find(args.paths, swift=swift)
            ...

    A connection asked for once it is closed is an ``OSError``."""

    def __init__(self, config_file=None, environ=None):
        self.config_file = config_file
        self.environ = os.environ if environ is None else environ
        self._callback = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections = []
        self._closed = False
        self._auth = None  # (storage URL, token) of the first connection

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def callback(self):
        """The swift step built from the settings (it checks them)."""
        if self._callback is None:
            self._callback = (self._from_config() if self.config_file
                              else self._from_environment())
        return self._callback

    def _from_config(self):
        # the config module brings kombu: only when --config is given
        from shoebox_worker import config as config_mod
        conf = config_mod.load(self.config_file)  # ConfigError: one line
        options = conf.callback_options.get("swift")
        if options is None:
            # a config that ships nowhere (the sample's): the environment,
            # as without --config (replay needs --config for its broker)
            return self._from_environment(self.config_file)
        [(_, callback)] = plugins.load_callbacks(
            ["swift"], {"swift": options}, config_file=self.config_file)
        return callback

    def _from_environment(self, config_file=None):
        """The swift step from ``ST_*`` (or ``OS_*``), as the swift CLI
        reads them; also for a ``--config`` without ``[callback:swift]``
        (``config_file``, named when neither has credentials)."""
        env = self.environ
        table = ENVIRONMENT_V1 if env.get("ST_AUTH") else ENVIRONMENT
        options = {option: env[name] for name, option in table
                   if env.get(name)}
        if not options and config_file:
            raise ToolError(
                "no Swift credentials: %s has no [callback:swift] section, "
                "and neither ST_AUTH, ST_USER, ST_KEY nor OS_AUTH_URL, "
                "OS_USERNAME, OS_PASSWORD, ... are set" % config_file)
        if not options:
            raise ToolError(
                "no Swift credentials: give --config FILE (its "
                "[callback:swift] section) or set ST_AUTH, ST_USER and "
                "ST_KEY (or OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, "
                "OS_PROJECT_NAME and the domains for Keystone v3)")
        if table is ENVIRONMENT_V1:
            options["auth_version"] = env.get("ST_AUTH_VERSION", "1")
        else:
            options["auth_version"] = env.get("OS_IDENTITY_API_VERSION",
                                              "3")
        variable = {option: name for name, option in table}
        variable["auth_version"] = ("ST_AUTH_VERSION" if table is
                                    ENVIRONMENT_V1 else
                                    "OS_IDENTITY_API_VERSION")
        # imported here: swiftclient and keystoneauth1 take a tenth of a
        # second to import, which a cat of local files need not pay
        from shoebox_worker.ship import swift as swift_mod
        try:
            return swift_mod.SwiftUploadCallback(**options)
        except OptionError as err:
            names = re.sub(r"\w+", lambda m: variable.get(m.group(),
                                                          m.group()),
                           err.option or "?")
            raise ToolError("Swift credentials from the environment: %s: "
                            "%s" % (names, err.message)) from None

    def connection(self):
        """This thread's connection (made at the first call).

        :raises OSError: :meth:`close` was called.
        """
        if self._closed:
            raise OSError(errno.EBADF, "the Swift connections are closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            callback = self.callback
            overrides = {}
            with self._lock:
                auth = self._auth
            if auth is not None and callback.options["auth_version"] == "1":
                # a v1 token serves every thread: one auth request in all
                overrides = {"preauthurl": auth[0], "preauthtoken": auth[1]}
            conn = callback.new_connection(**overrides)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._connections.append(conn)
            if closed:  # closed meanwhile (by another thread)
                conn.close()
                raise OSError(errno.EBADF, "the Swift connections are closed")
            self._local.conn = conn
        return conn

    def _remember_auth(self, conn):
        with self._lock:
            if self._auth is None and conn.url and conn.token:
                self._auth = (conn.url, conn.token)

    def entries(self, container, prefix):
        """The listing of ``container`` under ``prefix``, entry by entry,
        in Swift's (name) order: asked :data:`LIST_PAGE` entries at a time
        (``marker``, ``limit``), one page held at once.

        :raises ToolError: a page could not be listed (one line).
        """
        conn = self.connection()
        marker = ""
        while True:
            try:
                _, page = conn.get_container(container,
                                             prefix=prefix or None,
                                             marker=marker, limit=LIST_PAGE)
            except Exception as exc:
                where = SCHEME + container + ("/" + prefix if prefix else "")
                raise ToolError("%s: %s" % (where,
                                            describe(exc, "container")))\
                    from None
            self._remember_auth(conn)
            if not page:
                return
            marker = page[-1]["name"]
            yield from page

    def list(self, container, prefix):
        """The whole listing of ``container`` under ``prefix``, as a list
        (:meth:`entries`)."""
        return list(self.entries(container, prefix))

    def close(self):
        """Close every connection made (idempotent); none is made after."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:  # closing a broken connection: nothing to do
                LOG.debug("closing a Swift connection failed", exc_info=True)
        self._local = threading.local()  # this thread's, closed above
        if connections:
            # the socket of swiftclient's auth request (its own HTTP
            # connection, closed by swiftclient) is left in a urllib3
            # pool, which closes it only when it is garbage, and a
            # reference cycle of swiftclient's response keeps it: one
            # collection closes it now (tests/functional/
            # test_swift_sources.py counts the sockets)
            gc.collect()


def describe(exc, what="object"):
    """A failed request in a few words (never a credential)."""
    status = getattr(exc, "http_status", None)
    if status == 404:
        return ("no such %s (404)" % what if what == "container" else
                "no such object (404: deleted since it was listed?)")
    if status in (401, 403):
        return ("refused (%d %s): check the credentials (--config FILE's "
                "[callback:swift], or ST_*/OS_*) and their rights on the "
                "container" % (status, getattr(exc, "http_reason", "") or ""))
    text = " ".join(str(getattr(exc, "msg", None) or exc).split())
    if status:
        text = "%s (%s %s)" % (text, status,
                               getattr(exc, "http_reason", "") or "")
    txn = getattr(exc, "transaction_id", None)
    if txn:
        text += " (txn %s)" % txn
    return text[:300]


def _stream_error(item, exc, obj=None):
    """An ``OSError`` for a failed GET or HEAD of ``item``: read.py reports
    it as ``NAME: cannot read: ...``."""
    if isinstance(exc, OSError) and not hasattr(exc, "http_status"):
        return exc
    code = errno.ENOENT if getattr(exc, "http_status", None) == 404 \
        else errno.EIO
    text = describe(exc)
    if obj is not None:
        text = "%s: %s" % (obj, text)
    return OSError(code, text)


# -- Swift: listing ---------------------------------------------------------

def parse_spec(spec):
    """``swift://CONTAINER[/PREFIX]`` -> ``(container, prefix)``.

    :raises ToolError: no container.
    """
    container, _, prefix = spec[len(SCHEME):].partition("/")
    if not container:
        raise UsageError("%s: no container (swift://CONTAINER[/PREFIX])"
                         % spec)
    return container, prefix


def _written_order_key(entry):
    match = roll_manager.name_counter(os.path.basename(entry["name"]))
    return (entry.get("last_modified", ""), match, entry["name"])


def is_archive_entry(entry):
    """Whether a listing entry may be an archive: not an index, an index
    bundle (or a part of a period bundle), an SLO segment, a directory
    marker nor an empty object."""
    name = entry["name"]
    return not (name.endswith(INDEX_SUFFIX) or layout.is_bundle(name)
                or layout.is_segment(name) or not entry.get("bytes")
                or entry.get("content_type") == "application/directory")


class _Listing:
    """What a listing's entries, taken one by one (:meth:`add`), leave to
    keep: the archive entries (name, bytes, time, hash: not what else
    swiftclient's entry holds), each with the bytes of its ``.index`` when
    one is listed (``index_bytes``), and the bundles' entries; not the
    indexes, segments and other objects themselves. An index is listed
    after its archive (its name is the archive's and a suffix), so an
    archive waits in :attr:`_waiting` only until its index is seen.

    When ``prefix`` names an object (the first entry under it is that
    name), only that object is kept (:attr:`named`), with its index."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.archives = []
        self.bundles = []
        self.period_parts = []
        self.named = None
        self.count = 0  # entries seen
        self._waiting = {}  # index name -> its archive's kept entry

    def add(self, entry):
        """Take the next entry; False once nothing after it matters."""
        name = entry["name"]
        self.count += 1
        if self.count == 1 and self.prefix and name == self.prefix and \
                not name.endswith((INDEX_SUFFIX, archive_index.BUNDLE_SUFFIX)):
            # the spec names an object: that one alone
            self.named = self._keep(entry)
            return True
        if self.named is not None:
            if name == self.prefix + INDEX_SUFFIX:
                self.named["index_bytes"] = entry.get("bytes")
            return name < self.prefix + INDEX_SUFFIX
        archive = self._waiting.pop(name, None)
        if archive is not None:
            archive["index_bytes"] = entry.get("bytes")
        if name.endswith(archive_index.BUNDLE_SUFFIX):
            self.bundles.append(entry)
        elif layout.period_bundle_of(name) is not None:
            self.period_parts.append({"name": name,
                                      "bytes": entry.get("bytes")})
        elif is_archive_entry(entry):
            self.archives.append(self._keep(entry))
        return True

    def _keep(self, entry):
        kept = {key: entry[key] for key in ("name", "bytes", "last_modified",
                                            "hash", "slo_etag")
                if key in entry}
        kept["index_bytes"] = None
        self._waiting[entry["name"] + INDEX_SUFFIX] = kept
        return kept


def _find_objects(swift, spec, indexes=False, jobs=DEFAULT_JOBS,
                  probes=()):
    """The :class:`SwiftItem` objects of one ``swift://`` spec (with
    ``indexes``, their period bundle entries, :func:`load_period_parts`,
    else their indexes from the listing's bundles where those have them,
    :func:`load_bundles`), from its listing read page by page
    (:class:`_Listing`)."""
    container, prefix = parse_spec(spec)
    listing = _Listing(prefix)
    for entry in swift.entries(container, prefix):
        if not listing.add(entry):
            break
    if listing.named is not None:
        return [_item_of(swift, container, listing.named, listed=False)]
    if not listing.archives:
        raise ToolError("%s: no archives there%s" % (
            spec, "" if listing.count else " (no objects)"))
    bundles, summaries = {}, {}
    if indexes and listing.period_parts:
        summaries = load_period_parts(
            swift, container, listing.period_parts, jobs,
            {(e["name"], bound_etag(e)) for e in listing.archives}, probes)
    if indexes and listing.bundles:
        wanted = {(e["name"], e.get("hash")) for e in listing.archives
                  if (e["name"], bound_etag(e)) not in summaries}
        if wanted:
            bundles = load_bundles(swift, container, listing.bundles, jobs,
                                   wanted=wanted)
    return [_item_of(swift, container, entry,
                     bundles.get((entry["name"], entry.get("hash"))),
                     summary=summaries.get((entry["name"],
                                            bound_etag(entry))))
            for entry in sorted(listing.archives, key=_written_order_key)]


def bound_etag(entry):
    """The ETag of a listing entry that an index of its object is bound
    to (:func:`shoebox_worker.index.binding_problem`): a Static Large
    Object's ``slo_etag`` (its segments' ETag, as a HEAD gives it; its
    ``hash`` is that of its manifest), else its ``hash`` (the MD5)."""
    slo = entry.get("slo_etag")
    return slo.strip('"') if slo else entry.get("hash")


def _item_of(swift, container, entry, bundled=None, listed=True,
             summary=None):
    """The :class:`SwiftItem` of an archive entry :class:`_Listing` kept."""
    has_index = entry["index_bytes"] is not None or bundled is not None
    return SwiftItem(swift, container, entry["name"], size=entry.get("bytes"),
                     last_modified=entry.get("last_modified", ""),
                     etag=bound_etag(entry),
                     index_name=(entry["name"] + INDEX_SUFFIX if has_index
                                 else None),
                     index_size=entry["index_bytes"], index_data=bundled,
                     listed=listed, summary=summary)


def load_period_parts(swift, container, parts, jobs=DEFAULT_JOBS,
                      wanted=None, probes=()):
    """``{(archive object name, ETag): period_bundle.Entry}`` from the
    period bundles whose parts (listing entries) are ``parts``: one part
    a period, read as :func:`_read_bundles` reads bundles.

    The part of each period is the one holding the first of ``probes``
    (``(field, value)``: the exact ``--where`` options), else the first:
    every part names every archive of its period with its time range.
    Only the entries of ``wanted`` (``(name, ETag)`` of the listing's
    archives) are kept. A part that cannot be read, is damaged or too
    long is one line on stderr: its archives are pruned by their own
    indexes instead."""
    cuts = collections.defaultdict(lambda: collections.defaultdict(dict))
    for entry in parts:
        prefix, period, part, count = layout.period_bundle_of(entry["name"])
        cuts[(prefix, period)][count][part] = entry
    value = probes[0][1] if probes else None
    chosen = []
    for found in cuts.values():
        count, got = period_bundle.choose_cut(found)
        want = period_bundle.part_of(value, count) if value is not None \
            else 0
        chosen.append(got.get(want) or got[min(got)])

    def read(conn, entry, keep):
        name = SCHEME + container + "/" + entry["name"]
        if entry.get("bytes") is not None and \
                entry["bytes"] > period_bundle.MAX_PART_BYTES:
            raise _too_big(name, period_bundle.MAX_PART_BYTES,
                           entry["bytes"])
        _, body = conn.get_object(container, entry["name"],
                                  resp_chunk_size=INDEX_CHUNK)
        try:
            return period_bundle.Part.from_chunks(body, name, keep).entries
        finally:
            body.close()

    found = {}
    for entries in _read_bundles(swift, container, chosen, read, jobs,
                                 wanted):
        for key, entry in entries.items():
            found.setdefault(key, entry)
    return found


def load_bundles(swift, container, listing, jobs=DEFAULT_JOBS, wanted=None):
    """``{(archive object name, listing hash): index bytes}`` from the
    index bundles in ``listing``, read as :func:`_read_bundles` reads
    bundles (:meth:`~shoebox_worker.index.Bundle.from_chunks`), each at
    most :data:`~shoebox_worker.index.MAX_BUNDLE_BYTES` long.

    Only the entries of ``wanted`` (``(name, hash)`` of the listing's
    archives; every entry when None) are kept. An archive whose entry is
    not kept takes its own ``.index``. A bundle that cannot be read, is
    damaged or is longer is left out, with one line on stderr: its
    archives' own indexes are read instead."""
    bundles = [entry for entry in listing
               if entry["name"].endswith(archive_index.BUNDLE_SUFFIX)]
    found = {}
    for entries in _read_bundles(
            swift, container, bundles,
            lambda conn, entry, keep: _get_bundle(conn, container, entry,
                                                  keep).entries,
            jobs, wanted):
        found.update(entries)
    return found


def _read_bundles(swift, container, objects, read, jobs, wanted):
    """Read the bundle objects ``objects`` (listing entries) ``jobs`` at
    a time, each with ``read(conn, entry, keep)``, which parses it as it
    comes and returns the entries ``keep(archive, etag, length)``
    accepted.

    One budget for them all: only the entries of ``wanted`` (``(name,
    hash)`` of the listing's archives; every entry when None) are kept,
    and of those at most :data:`BUNDLE_MEMORY` bytes in all, so that what
    is held does not grow with the bundles' sizes (past that, one line on
    stderr). A bundle that cannot be read, is damaged or too long gives
    back what it held and is one line on stderr: its archives' own indexes
    are read instead.

    :returns: the entries kept of each bundle, in the order of
        ``objects``.
    """
    lock = threading.Lock()
    room = [BUNDLE_MEMORY]  # bytes of entries that may still be kept
    past = [0]  # wanted entries left out for want of room

    def get(entry):
        held = 0

        def keep(archive, etag, length):
            nonlocal held
            if wanted is not None and (archive, etag) not in wanted:
                return False
            with lock:
                if length > room[0]:
                    past[0] += 1
                    return False
                room[0] -= length
            held += length
            return True

        try:
            return read(swift.connection(), entry, keep)
        except exceptions.IndexError_ as exc:
            problem = str(exc)
        except Exception as exc:
            problem = "%s%s/%s: %s" % (SCHEME, container, entry["name"],
                                       describe(exc))
        with lock:
            room[0] += held  # nothing of it is kept
        warn("%s; reading the indexes of its archives instead" % problem)
        return {}

    if not objects:
        return []
    with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(jobs, len(objects)),
            thread_name_prefix="shoebox-bundle") as pool:
        results = list(pool.map(get, objects))
    if past[0]:
        warn("%s%s: the bundled indexes of %d archive%s left out (more "
             "than %d bytes of them in all); reading their own indexes "
             "instead" % (SCHEME, container, past[0],
                          "" if past[0] == 1 else "s", BUNDLE_MEMORY))
    return results


def _get_bundle(conn, container, entry, keep):
    """The :class:`~shoebox_worker.index.Bundle` of a listing ``entry``,
    read :data:`INDEX_CHUNK` bytes at a time and parsed as they come, its
    entries those ``keep`` accepts; refused (as :func:`get_bounded` does)
    as soon as the listing, its ``Content-Length`` or its bytes say it is
    longer than :data:`~shoebox_worker.index.MAX_BUNDLE_BYTES`.

    :raises IndexError_: too long, or not an intact bundle.
    :raises Exception: what swiftclient raises for a failed GET.
    """
    name = SCHEME + container + "/" + entry["name"]
    limit = _limit(archive_index.bundle_size_limit, b"", name)
    if entry.get("bytes") is not None and entry["bytes"] > limit:
        raise _too_big(name, limit, entry["bytes"])
    headers, body = conn.get_object(container, entry["name"],
                                    resp_chunk_size=INDEX_CHUNK)
    try:
        length = headers.get("content-length")
        if length is not None and int(length) > limit:
            raise _too_big(name, limit, int(length))
        return archive_index.Bundle.from_chunks(
            _within(body, name, limit), name, keep)
    finally:
        body.close()


def _within(body, name, limit):
    """The chunks of ``body``; an :class:`IndexError_` once they pass
    ``limit`` bytes."""
    size = 0
    for chunk in body:
        size += len(chunk)
        if size > limit:
            raise _too_big(name, limit)
        yield chunk


def find(specs, *, swift=None, heads=False, jobs=DEFAULT_JOBS,
         indexes=False, probes=()):
    """The archives the specs name, in write order (see the module
    documentation).

    :param specs: local paths and ``swift://CONTAINER[/PREFIX]``.
    :param swift: the :class:`Swift` to read ``swift://`` specs with (the
        caller closes it); None when there are none.
    :param heads: HEAD each object (``jobs`` at a time) to fill
        :attr:`Item.meta`.
    :param indexes: the indexes will be read: take them from the period
        bundles (:func:`load_period_parts`) or the index bundles
        (:func:`load_bundles`) of each listing where they have them.
    :param probes: ``(field, value)`` pairs looked for (the exact
        ``--where`` options): which part of a period bundle to read.
    :raises ToolError: a path that does not exist, a directory or a
        listing without archives, a container that cannot be listed,
        credentials that cannot work (one line each).
    """
    items = []
    for spec in without_sidecars(specs):
        if spec.startswith(SCHEME):
            if swift is None:
                raise ValueError("%s: find() needs swift= for it" % spec)
            items.extend(_find_objects(swift, spec, indexes, jobs,
                                       probes))
        elif is_index_file(spec):
            raise ToolError("%s: an archive's index, not an archive: name "
                            "the archive (without %s) or its folder"
                            % (spec, archive_index.SUFFIX))
        else:
            items.extend(_find_files(spec))
    if heads:
        _head_all([i for i in items if isinstance(i, SwiftItem)], jobs)
    return items


def keep_where(items, wanted, jobs=DEFAULT_JOBS):
    """The items for which ``wanted(item)`` is true, in their order;
    ``wanted`` (which may HEAD an object or GET its index) runs for
    ``jobs`` items at a time, and in this thread for the items whose index
    is in memory already (:attr:`Item.index_in_memory`: a thread would
    only cost, about 50 us an item)."""
    flags = {}
    remote = []
    for n, item in enumerate(items):
        if getattr(item, "index_in_memory", False):
            flags[n] = wanted(item)
        else:
            remote.append(n)
    if len(remote) < 2:
        flags.update((n, wanted(items[n])) for n in remote)
    else:
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=min(jobs, len(remote)),
                thread_name_prefix="shoebox-select") as pool:
            flags.update(zip(remote, pool.map(lambda n: wanted(items[n]),
                                              remote), strict=True))
    return [item for n, item in enumerate(items) if flags[n]]


def _head_all(items, jobs):
    """HEAD ``items``, ``jobs`` at a time, to fill their ``meta``.

    :raises ToolError: the first HEAD that failed.
    """
    todo = queue.Queue()
    for item in items:
        todo.put(item)
    errors = []

    def work():
        while not errors:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                item.head(item.swift.connection())
            except OSError as exc:
                errors.append("%s: cannot read: %s" % (item.name,
                                                       exc.strerror or exc))

    threads = [threading.Thread(target=work, daemon=True,
                                name="shoebox-head-%d" % n)
               for n in range(max(1, min(jobs, len(items))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise ToolError(errors[0])


# -- Swift: streaming -------------------------------------------------------

_END = object()


class _Body:
    """The body of a GET as the reader takes it, chunk by chunk."""

    def __init__(self, item, body):
        self.item = item
        self._body = body
        self._chunks = iter(body)

    def next_chunk(self):
        try:
            return next(self._chunks, b"")
        except Exception as exc:
            raise _lost(self.item, exc) from None

    def cancel(self):
        self._body.close()


class _Download:
    """One GET of an object. Read ahead (:func:`read_ahead`'s threads),
    its body is put into a bounded buffer as it comes, at most
    :data:`READ_AHEAD_CHUNKS` chunks of :data:`GET_CHUNK` bytes: the
    download waits for the reader. Not read ahead, the reader takes the
    body itself. Either way the reader gets the bytes as stored, and
    decompresses them as it parses them: measured here, decompressing in
    the download threads instead made ``cat`` 20 % slower (the records
    then reach the parser cold in the cache, and the threads contend for
    the GIL)."""

    def __init__(self, item):
        self.item = item
        self.buffer = queue.Queue(READ_AHEAD_CHUNKS)
        self.cancelled = threading.Event()
        self.body = None  # a _Body, in direct mode

    def run(self, conn, feed=False):
        """Send the GET; with ``feed``, read the whole body into the
        buffer, else keep the body for the reader. An error (a failed
        request or download) goes to the reader, as an ``OSError``."""
        item = self.item
        try:
            _, body = conn.get_object(item.container, item.object,
                                      resp_chunk_size=GET_CHUNK)
            item.swift._remember_auth(conn)
        except Exception as exc:
            self._put(_stream_error(item, exc))
            return
        if not feed:
            self.body = _Body(item, body)
            return
        try:
            for chunk in body:
                if not self._put(chunk):
                    return
            self._put(_END)
        except Exception as exc:
            self._put(_lost(item, exc))
        finally:
            body.close()

    def _put(self, value):
        """Wait for room in the buffer; False once cancelled."""
        while not self.cancelled.is_set():
            try:
                self.buffer.put(value, timeout=_CANCEL_POLL)
                return True
            except queue.Full:
                continue
        return False

    def next_chunk(self):
        """The next bytes of the body; ``b""`` at its end.

        :raises OSError: the GET or the download failed.
        """
        if self.body is not None:
            return self.body.next_chunk()
        value = self.buffer.get()
        if value is _END:
            self.buffer.put(_END)  # the end stays the end
            return b""
        if isinstance(value, BaseException):
            self.buffer.put(value)  # so does an error
            raise value
        return value

    def cancel(self):
        self.cancelled.set()
        if self.body is not None:
            self.body.cancel()
            self.body = None


def _lost(item, exc):
    if isinstance(exc, OSError) and not hasattr(exc, "http_status"):
        text = " ".join(str(exc).split())[:300]
        return OSError(errno.EIO, "the download broke off: %s" % text)
    return _stream_error(item, exc)


class _ObjectStream:
    """A binary file object of an object's body, read front to back."""

    def __init__(self, download):
        self._download = download
        self._pending = memoryview(b"")
        self.name = download.item.name
        self.closed = False

    def readable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            parts = [bytes(self._pending)]
            self._pending = memoryview(b"")
            while chunk := self._download.next_chunk():
                parts.append(chunk)
            return b"".join(parts)
        if not self._pending:
            chunk = self._download.next_chunk()
            if not chunk:
                return b""
            self._pending = memoryview(chunk)
        data = self._pending[:size]
        self._pending = self._pending[size:]
        return bytes(data)

    read1 = read

    def close(self):
        if not self.closed:
            self.closed = True
            self._download.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class read_ahead:
    """Iterate over ``items`` in order, the objects among the next ``jobs``
    downloading meanwhile (the one being read and ``jobs - 1`` ahead), each
    in its own thread and connection, into its bounded buffer. Use it as a
    context manager: leaving it cancels what was not read::

        with sources.read_ahead(items, jobs) as ahead:
            for item in ahead:
                with item.open() as f: ...
    """

    def __init__(self, items, jobs=DEFAULT_JOBS):
        self.items = list(items)
        self.jobs = max(1, int(jobs))
        self._todo = queue.Queue()
        self._started = collections.deque()
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        ahead = 0  # items[:ahead] are started (or local)
        for index, item in enumerate(self.items):
            while ahead < min(len(self.items), index + self.jobs):
                self._start(self.items[ahead])
                ahead += 1
            yield item
            self._drop(item)

    def _start(self, item):
        if not isinstance(item, SwiftItem):
            return
        download = _Download(item)
        item._download = download
        self._started.append(download)
        self._todo.put(download)
        if len(self._threads) < self.jobs:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name="shoebox-get-%d"
                                      % len(self._threads))
            self._threads.append(thread)
            thread.start()

    def _work(self):
        while True:
            download = self._todo.get()
            if download is None:
                return
            if download.cancelled.is_set():
                continue
            try:
                conn = download.item.swift.connection()
            except Exception as exc:  # closed, or credentials refused
                download._put(_stream_error(download.item, exc))
                continue
            download.run(conn, feed=True)

    def _drop(self, item):
        """The reader is done with ``item``: a download not opened (the
        item skipped) or not read to its end stops."""
        while self._started and self._started[0].item is item:
            self._started.popleft().cancel()
        if isinstance(item, SwiftItem):
            item._download = None

    def close(self):
        """Cancel every download and wait for the threads to end (a
        cancelled download stops at its next chunk), so that none is
        using a connection when the :class:`Swift` closes them."""
        while self._started:
            self._started.popleft().cancel()
        for item in self.items:
            if isinstance(item, SwiftItem):
                item._download = None
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
