"""The ``shoebox-worker`` command.

``run`` the worker, ``check-config`` without connecting, and the operator
tools (``cat``, ``verify``, ``replay``, ``generate``). A mistake in the
config or the command line is one line on stderr and exit code 2, never a
traceback.
"""

import argparse
import logging
import sys

from shoebox_worker import __version__
from shoebox_worker import config as config_mod
from shoebox_worker import exceptions
from shoebox_worker.exceptions import EXIT_FAILURE
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.exceptions import EXIT_USAGE

__all__ = ["main"]

LOG = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def setup_logging(conf=None, level=None):
    """Log to stderr (or ``[logging] file``) at ``[logging] level``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if conf is not None and conf.file:
        handler = logging.FileHandler(conf.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level or (conf.level if conf is not None else "INFO"))
    # kombu and swiftclient are chatty at INFO about things we log better
    logging.getLogger("swiftclient").setLevel(logging.WARNING)


def _load(path):
    """The config and its plugins, built once: building them checks their
    names and options.

    :returns: ``(conf, (roll_checker, [(name, callback), ...]))``.
    """
    conf = config_mod.load(path)
    from shoebox_worker import plugins
    return conf, plugins.build(conf)


def cmd_check_config(args):
    _load(args.config)
    print("%s: OK" % args.config)
    return EXIT_OK


def cmd_run(args):
    conf, plugins = _load(args.config)
    setup_logging(conf.logging)
    if conf.worker.processes > 1:
        from shoebox_worker.consume import supervisor
        return supervisor.Supervisor(conf, plugins, args.idle_exit).run()
    from shoebox_worker.consume import runner
    return runner.run_worker(conf, plugins, args.idle_exit)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="shoebox-worker",
        description="Archive OpenStack notifications from RabbitMQ.")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="consume, archive and ship")
    run.add_argument("--config", required=True, help="the INI file")
    run.add_argument("--idle-exit", type=float, metavar="SECONDS",
                     help="exit 0 once no message came for this long and "
                          "every archive is shipped")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config",
                           help="validate a config without connecting")
    check.add_argument("--config", required=True, help="the INI file")
    check.set_defaults(func=cmd_check_config)

    try:
        from shoebox_worker.tools import commands as tools
    except ImportError:  # pragma: no cover - tools ship with the package
        tools = None
    if tools is not None:
        tools.add_commands(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging(level="WARNING")
    try:
        return args.func(args)
    except exceptions.ConfigError as exc:
        print("shoebox-worker: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    except exceptions.ShoeboxError as exc:
        print("shoebox-worker: %s" % exc, file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
