"""The worker's log: one format in two spellings, and a file that follows
logrotate.

``[logging] format = text`` (the default) writes one line a record::

    2026-12-03T09:33:45.123Z INFO shoebox_worker.consume.runner [22423]
        shoebox-worker 0.1.0 starting: ...

and ``format = json`` one JSON object a line, with the same fields, for a
log pipeline (Fluentd, Vector, Logstash, journald's JSON export)::

    {"time": "2026-12-03T09:33:45.123Z", "level": "INFO",
     "logger": "shoebox_worker.consume.runner", "pid": 22423,
     "message": "shoebox-worker 0.1.0 starting: ..."}

(each on one line).
Times are UTC with their zone (``Z``) in both, as the archives' and the
records' are. A record with a traceback (``--debug``) carries it: after
the message in text, as ``"traceback"`` in JSON (so one JSON object is
still one line).

``[logging] file`` is written through :class:`logging.handlers.
WatchedFileHandler`: when logrotate (or anyone) moves or removes the file,
the next line reopens it by name, so the rotation needs no
``copytruncate`` and no signal (etc/shoebox-worker.logrotate). After a
SIGHUP it is reopened too, at its next line (:func:`reopen`), as daemons
do; without a file
SIGHUP keeps its default meaning.

The formats are a few lines of a :class:`logging.Formatter` of our own,
not a package: the fields are these five, and the text and JSON spellings
share them.
"""

import datetime
import json
import logging
import logging.handlers
import signal
import sys

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "reopen", "setup"]

#: ``[logging] format`` values.
FORMATS = ("text", "json")


def _time(record):
    """The record's time, UTC, to the millisecond, with its zone."""
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (
        moment.microsecond // 1000)


def fields(record, formatter):
    """The fields of a record, in both spellings' order: time, level,
    logger, pid, message (and the traceback when there is one)."""
    found = {"time": _time(record), "level": record.levelname,
             "logger": record.name, "pid": record.process,
             "message": record.getMessage()}
    if record.exc_info:
        found["traceback"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        found["traceback"] = record.exc_text
    return found


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [PID] MESSAGE``, the traceback on the lines
    after."""

    def format(self, record):
        found = fields(record, self)
        line = "%(time)s %(level)s %(logger)s [%(pid)d] %(message)s" % found
        if "traceback" in found:
            line += "\n" + found["traceback"]
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``pid``,
    ``message`` (and ``traceback``)."""

    def format(self, record):
        return json.dumps(fields(record, self), ensure_ascii=False)


def _handlers():
    return [handler for handler in logging.getLogger().handlers
            if isinstance(handler, logging.handlers.WatchedFileHandler)]


def reopen(signum=None, frame=None):
    """Have the log file(s) reopened by name at their next line (the
    SIGHUP handler). It only marks them as moved: a signal handler runs
    between two bytecodes of the main thread, maybe inside the handler's
    own ``emit``, where closing its stream or logging would break the
    line being written."""
    for handler in _handlers():
        handler.dev = handler.ino = -1  # seen as moved: reopened


def setup(level, file=None, format="text"):
    """Log to ``file`` (or stderr) at ``level``, in ``format``; with a
    file, a SIGHUP has it reopened (from the main thread only: a signal
    handler is set there)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()
    if file:
        handler = logging.handlers.WatchedFileHandler(file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json"
                         else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    if file:
        try:
            signal.signal(signal.SIGHUP, reopen)
        except ValueError:  # not the main thread
            pass
    return handler
