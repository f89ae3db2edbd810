"""Fixtures of every unit test."""

import logging

import pytest

#: The loggers whose level ``cli.setup_logging`` sets.
TOUCHED = ("swiftclient", "kombu.mixins")


def _own(handlers):
    """The handlers that are not pytest's (it adds and removes its own
    around each phase of a test)."""
    return [handler for handler in handlers
            if not type(handler).__module__.startswith("_pytest")]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Give back the logging set-up a test found.

    ``cli.main`` (and ``cli.setup_logging``) replace the root logger's
    handlers with one on ``sys.stderr``, which under pytest is the test's
    capture stream, closed when the test ends: every later log line would
    then end in "--- Logging error --- ValueError: I/O operation on closed
    file" on the terminal.
    """
    root = logging.getLogger()
    handlers, level = _own(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in TOUCHED}
    yield
    for handler in _own(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
