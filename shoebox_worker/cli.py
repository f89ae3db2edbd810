"""The ``shoebox-worker`` command.

``run`` the worker, ``check-config`` (without connecting, or with
``--connect``: :mod:`shoebox_worker.preflight`), and the operator tools
(``cat``, ``verify``, ``replay``, ``generate``).

Every error that reaches :func:`main` is one line on stderr naming what
failed and what to do (:func:`describe`), never a traceback unless
``--debug`` asks for one: exit code 2 for a mistake in the config or the
command line, 1 for anything else (a broker that is down, a damaged
archive, an unexpected error, which says to rerun with ``--debug``).
"""

import argparse
import logging
import os
import sys
import traceback

from shoebox_worker import __version__
from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.exceptions import EXIT_OK
from shoebox_worker.exceptions import EXIT_USAGE

__all__ = ["main", "check_working_directory"]

LOG = logging.getLogger(__name__)

def setup_logging(conf=None, level=None):
    """Log to stderr (or ``[logging] file``) at ``[logging] level``, in
    ``[logging] format`` (see :mod:`shoebox_worker.logs`)."""
    from shoebox_worker import logs
    logs.setup(level or (conf.level if conf is not None else "INFO"),
               file=conf.file if conf is not None else None,
               format=conf.format if conf is not None else "text")
    # kombu and swiftclient are chatty at INFO about things we log better
    logging.getLogger("swiftclient").setLevel(logging.WARNING)
    # kombu's ConsumerMixin says "Connected to ..." at each (re)connect,
    # next to the worker's own line
    logging.getLogger("kombu.mixins").setLevel(logging.WARNING)


def check_working_directory(conf):
    """Create ``[archive] working_directory`` if missing and prove that it
    takes a file.

    :raises ConfigError: it cannot be created or written, naming the
        option and the reason.
    """
    path = os.path.abspath(conf.archive.working_directory)
    try:
        files.ensure_writable_directory(path)
    except OSError as exc:
        if os.path.isdir(path):
            what = "cannot write in %s: %s" % (path, exc.strerror or exc)
        elif os.path.lexists(path):
            what = "%s is a file, not a folder" % path
        else:
            what = "cannot create %s: %s" % (path, exc.strerror or exc)
        raise exceptions.ConfigError(
            "%s; set it to a folder this user can create and write" % what,
            filename=conf.filename, section="archive",
            key="working_directory") from exc


def _load(path):
    """The config and its plugins, built once (building them checks their
    names and options), after checking the working directory.

    Sets the process umask from ``[archive] file_mode`` and ``dir_mode``
    first, before anything is created (the working directory, the log
    file, a plugin's folder): every file and folder the worker creates
    gets those modes, in a supervised child too (fork keeps the umask).

    :returns: ``(conf, (roll_checker, [(name, callback), ...]))``.
    """
    from shoebox_worker import config  # not for the tools that read
    conf = config.load(path)
    os.umask(conf.archive.umask)
    from shoebox_worker import plugins
    built = plugins.build(conf)
    if conf.integrity.signing_key is not None:
        from shoebox_worker.integrity import chain
        chain.check(conf, built[1])
    check_working_directory(conf)
    return conf, built


def cmd_check_config(args):
    conf, (_, callbacks) = _load(args.config)
    from shoebox_worker.consume import rabbitmq
    for line in rabbitmq.config_warnings(conf):
        print("shoebox-worker: warning: %s %s" % (args.config, line),
              file=sys.stderr)
    print("%s: OK" % args.config, flush=True)
    if not args.connect:
        return EXIT_OK
    from shoebox_worker import preflight
    checks = preflight.run(conf, callbacks,
                           lambda line: print(line, flush=True))
    failed = [check for check in checks if not check.ok]
    if failed:
        raise exceptions.ConfigError(
            "check-config --connect: %d of %d checks failed: %s"
            % (len(failed), len(checks), "; ".join(
                check.what for check in failed)), filename=args.config)
    return EXIT_OK


def cmd_keygen(args):
    from shoebox_worker.integrity import keys
    try:
        private, public = keys.keygen(args.directory)
    except FileExistsError as exc:
        raise exceptions.ConfigError(
            "%s exists: not written over (a key in use evolves; make a new "
            "pair in another folder)" % exc.filename) from None
    except OSError as exc:
        raise exceptions.ConfigError("cannot write in %s: %s" % (
            args.directory, exc.strerror or exc)) from None
    print("wrote %s (private, 0600) and %s (public: pin it)"
          % (private, public))
    return EXIT_OK


def cmd_run(args):
    conf, plugins = _load(args.config)
    setup_logging(conf.logging, level="DEBUG" if args.debug else None)
    if conf.worker.processes > 1:
        from shoebox_worker.consume import supervisor
        return supervisor.Supervisor(conf, plugins, args.idle_exit).run()
    from shoebox_worker.consume import runner
    return runner.run_worker(conf, plugins, args.idle_exit)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake on one line (exit code 2) instead of
    the usage text and the error."""

    def error(self, message):
        self.exit(EXIT_USAGE, "%s: %s (see %s --help)\n" % (
            self.prog, message, self.prog))


#: Help of ``--debug``, taken before or after the command.
DEBUG_HELP = "on an error, show the traceback (and log at DEBUG)"


def build_parser():
    parser = _Parser(
        prog="shoebox-worker",
        description="Archive OpenStack notifications from RabbitMQ.")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="consume, archive and ship")
    run.add_argument("--config", required=True, help="the INI file")
    run.add_argument("--idle-exit", type=float, metavar="SECONDS",
                     help="exit 0 once no message came for this long, "
                          "the queues are empty and every archive is "
                          "shipped; exit 1 when all that is left are "
                          "archives whose shipping fails in a way retrying "
                          "will not fix (a refused key)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a config (without connecting, unless --connect)",
        description="Read the config, build its plugins and prove that the "
                    "working directory takes a file. With --connect, also "
                    "log in to each broker URL, check each queue's "
                    "declaration against the broker, and authenticate to "
                    "Swift (or Keystone) and HEAD the container: one line "
                    "per check; exit 2 if any fails.")
    check.add_argument("--config", required=True, help="the INI file")
    check.add_argument("--connect", action="store_true",
                       help="also try the broker(s), the queues and Swift "
                            "with the config's credentials")
    check.set_defaults(func=cmd_check_config)

    keygen = sub.add_parser(
        "keygen", help="make the Ed25519 key pair of [integrity] "
                       "signing_key",
        description="Write a new private key DIR/signing.key (mode 0600) "
                    "and its public key DIR/signing.pub, never over a file. "
                    "Set [integrity] signing_key = DIR/signing.key (the "
                    "worker replaces that file with the next key at every "
                    "digest), and keep a copy of signing.pub away from this "
                    "host: it is the key an auditor pins (verify --chain "
                    "--public-key). See docs/integrity.md.")
    keygen.add_argument("directory", metavar="DIR",
                        help="the folder to write into (made, 0700, if "
                             "missing)")
    keygen.set_defaults(func=cmd_keygen)

    try:
        from shoebox_worker.tools import commands as tools
    except ImportError:  # pragma: no cover - tools ship with the package
        tools = None
    if tools is not None:
        tools.add_commands(sub)
    for command in sub.choices.values():
        # SUPPRESS: not given after the command, the value before it stays
        command.add_argument("--debug", action="store_true",
                             default=argparse.SUPPRESS, help=DEBUG_HELP)
        command.set_defaults(command_parser=command)
    return parser


def _logs_to_a_file():
    return any(isinstance(handler, logging.FileHandler)
               for handler in logging.getLogger().handlers)


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, which names its --help
        getattr(args, "command_parser", parser).error(
            "unrecognized arguments: %s" % " ".join(extra))
    if args.command != "run":
        setup_logging(level="DEBUG" if args.debug else "WARNING")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line, code = exceptions.describe(exc)
        if args.debug:
            traceback.print_exc()
        if _logs_to_a_file():  # run with [logging] file: say it there too
            LOG.critical("%s", line)
        print("shoebox-worker: %s" % line, file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
