"""Every error shoebox-worker raises on purpose, under one root.

Catch :class:`ShoeboxError` to catch them all. Errors about bad archive
bytes derive from :class:`RecordError` and carry the byte offset where the
problem starts, so an operator can find it with ``verify`` or ``dd``.
"""

__all__ = [
    "ShoeboxError",
    "RecordError",
    "EndOfFile",
    "OutOfSync",
    "InvalidVersion",
    "CorruptRecord",
    "TornRecord",
    "NoMoreFiles",
    "ConfigError",
    "PluginError",
    "CallbackError",
    "UploadError",
    "PermanentError",
    "IndexError_",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "describe",
    "duration",
]

#: Exit codes of every command: success; an operational failure (a broker
#: that is down, a damaged archive); a mistake in the command line or the
#: config (:class:`ConfigError`).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class ShoeboxError(Exception):
    """Root of every error this project raises on purpose."""


class RecordError(ShoeboxError):
    """Bad bytes in an archive.

    :param message: what is wrong.
    :param offset: byte offset in the (uncompressed) archive where the bad
        record starts, or None when unknown.
    :param filename: the archive, when known.
    """

    def __init__(self, message, offset=None, filename=None):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.filename = filename

    def __str__(self):
        where = []
        if self.filename:
            where.append(str(self.filename))
        if self.offset is not None:
            where.append("offset %d" % self.offset)
        if where:
            return "%s: %s" % (", ".join(where), self.message)
        return self.message


class EndOfFile(RecordError):
    """Clean end of an archive: no bytes left where a record would start."""


class OutOfSync(RecordError):
    """The bytes at this offset are not the start of a record."""


class InvalidVersion(RecordError):
    """A record (or a writer) names a format version this code lacks."""


class CorruptRecord(RecordError):
    """A record whose lengths or checksum do not hold."""


class TornRecord(RecordError):
    """The archive ends inside a record: a write cut short by a crash."""


class NoMoreFiles(ShoeboxError):
    """A ReadingRollManager has read the last record of the last file."""


class ConfigError(ShoeboxError):
    """A mistake in the configuration, found before anything starts.

    ``str()`` is the one line printed to the operator, naming the file,
    section and key.
    """

    def __init__(self, message, filename=None, section=None, key=None):
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.section = section
        self.key = key

    def __str__(self):
        where = []
        if self.filename:
            where.append(str(self.filename))
        if self.section:
            where.append("[%s]" % self.section)
        if self.key:
            where.append(self.key)
        if where:
            return "%s: %s" % (" ".join(where), self.message)
        return self.message


class PluginError(ConfigError):
    """A plugin that is not installed, fails to load or refuses options."""


class CallbackError(ShoeboxError):
    """An archive callback failed; the file stays where it was.

    :param callback: the callback's name (entry point name or class name).
    :param filename: the file the callback was given.
    :param permanent: retrying will not fix it (a refused key, a name
        Swift refuses) until an operator changes something; it is still
        retried, at the longest retry delay, so the fix heals the worker
        without a restart.
    :param hint: for a permanent error, what to check, e.g.
        ``"check [callback:swift] key"``.
    """

    def __init__(self, message, callback=None, filename=None,
                 permanent=False, hint=None):
        super().__init__(message)
        self.message = message
        self.callback = callback
        self.filename = filename
        self.permanent = permanent
        self.hint = hint

    def __str__(self):
        return "callback %s failed on %s: %s" % (
            self.callback, self.filename, self.message)


class UploadError(CallbackError):
    """An upload did not reach its destination intact."""


class PermanentError(ShoeboxError):
    """What a callback raises for a failure that retrying will not fix
    (see :mod:`shoebox_worker.contract`): credentials refused, a name the
    destination refuses. The shipper logs it as such at once and retries
    it at the longest retry delay only.

    :param message: what failed.
    :param hint: what the operator should check or change, e.g.
        ``"check [callback:tag] destination"``.
    """

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class IndexError_(ShoeboxError):
    """Bytes that are not an archive index of a version this reader knows,
    or a damaged one (see :mod:`shoebox_worker.index`); the message is one
    line naming the index. (The underscore keeps it apart from Python's
    own ``IndexError``.)"""


def _broker_errors():
    """The exception types of kombu, py-amqp and redis-py."""
    import amqp.exceptions
    import kombu.exceptions
    errors = (kombu.exceptions.KombuError, amqp.exceptions.AMQPError)
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        return errors
    return errors + (redis.exceptions.RedisError,)


def describe(exc):
    """The one line and the exit code for an error that stops a command
    (``cli.main``) or a supervised worker (``consume.runner.run_child``):
    the one place errors are worded for the shell.

    :returns: ``(line, exit_code)``; the line names what failed and what to
        do, without the ``shoebox-worker:`` prefix.
    """
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ShoeboxError):  # a usage error says it is one
        return str(exc), getattr(exc, "exit_code", EXIT_FAILURE)
    if isinstance(exc, OSError) and exc.strerror:
        where = "%s: " % exc.filename if exc.filename else ""
        return ("%s%s (rerun with --debug to see what was being done)" % (
            where, exc.strerror)), EXIT_FAILURE
    if isinstance(exc, _broker_errors()):
        return ("broker error: %s: %s; check the broker and [broker] url "
                "(rerun with --debug for details)" % (
                    type(exc).__name__, exc)), EXIT_FAILURE
    return ("unexpected error: %s: %s; this is a bug: rerun with --debug "
            "and report the traceback" % (type(exc).__name__, exc),
            EXIT_FAILURE)


def duration(seconds):
    """How long something has been failing, as error lines say it:
    ``45 s``, ``5 min``, ``3.2 h``."""
    if seconds < 120:
        return "%.0f s" % seconds
    if seconds < 7200:
        return "%.0f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)
