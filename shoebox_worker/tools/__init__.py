"""The operator tools: ``cat``, ``verify``, ``replay``, ``generate``.

* :mod:`~shoebox_worker.tools.read`: finding and reading archives,
  ``cat`` and ``verify``;
* :mod:`~shoebox_worker.tools.publish`: the broker side, ``replay`` and
  ``generate``, and :func:`~shoebox_worker.tools.publish.publish`;
* :mod:`~shoebox_worker.tools.simulator`: synthetic nova notifications;
* :mod:`~shoebox_worker.tools.commands`: the subcommands' argparse wiring,
  which ``cli`` adds to ``shoebox-worker``.

Errors (a missing file, a damaged archive, a broker that is down or
refuses) are one line on stderr and a non-zero exit code, never a
traceback: they are raised as :class:`ToolError`, which ``cli.main``
prints (exit code 1), or :class:`UsageError` for a mistake in the command
line (exit code 2).
"""

from shoebox_worker import exceptions

__all__ = ["ToolError", "URL_VARIABLE", "UsageError"]

#: Where ``replay`` and ``generate`` read the broker URL when neither
#: ``--url`` nor ``--config`` gives it (out of ``ps``'s sight).
URL_VARIABLE = "SHOEBOX_BROKER_URL"


class ToolError(exceptions.ShoeboxError):
    """A tool cannot go on; ``str()`` is the one line shown."""


class UsageError(ToolError):
    """A mistake in the command line (an option's value, a PATH of the
    wrong kind, nothing given where something must be): exit code 2, as
    argparse's own and the config's mistakes."""

    exit_code = exceptions.EXIT_USAGE
