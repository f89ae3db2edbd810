"""Load the roll checker and the archive callbacks named in the config.

Plugins are stevedore entry points, picked by cardinality: exactly one
roll checker (``shoebox.roll_checkers``, a stevedore *driver*) and an
ordered set of callbacks (``shoebox.callbacks``, a
``NamedExtensionManager`` with ``name_order=True``, because ``gzip`` must
run before ``swift`` and ``swift`` before ``delete``). A third-party
package adds a plugin by declaring an entry point in one of them.

Options come from ``[roll_checker:NAME]`` / ``[callback:NAME]`` as strings
and are passed to the plugin's constructor as keyword arguments. Every
failure (a name that is not installed, a module that does not import, an
option the constructor does not take or refuses) becomes a
:class:`~shoebox_worker.exceptions.PluginError`: one line naming the file,
section and key, like every other config mistake.
"""

import importlib.metadata
import inspect
import logging
import re

from stevedore import driver
from stevedore import exception as stevedore_exception
from stevedore import named

from shoebox_worker.exceptions import ConfigError
from shoebox_worker.exceptions import PluginError

__all__ = [
    "CALLBACKS",
    "ROLL_CHECKERS",
    "available",
    "build",
    "load_callbacks",
    "load_roll_checker",
]

LOG = logging.getLogger(__name__)

#: Entry point namespace of roll checkers (one per archive).
ROLL_CHECKERS = "shoebox.roll_checkers"
#: Entry point namespace of archive callbacks (an ordered chain).
CALLBACKS = "shoebox.callbacks"

_KINDS = {
    ROLL_CHECKERS: ("roll checker", "roll_checker", "roll_checker"),
    CALLBACKS: ("callback", "callbacks", "callback"),
}


def _one_line(text):
    return " ".join(str(text).split())


def _entry_points(namespace):
    return importlib.metadata.entry_points(group=namespace)


def available(namespace):
    """Names installed in an entry point namespace, sorted.

    Reads entry point metadata only: no plugin module is imported.
    """
    return sorted({ep.name for ep in _entry_points(namespace)})


def _not_installed(namespace, names, config_file):
    kind, key, _ = _KINDS[namespace]
    installed = ", ".join(available(namespace)) or "none"
    if len(names) == 1:
        message = "no %s named %r" % (kind, names[0])
    else:
        message = "no %ss named %s" % (kind, ", ".join(map(repr, names)))
    return PluginError("%s (installed: %s)" % (message, installed),
                       config_file, "archive", key)


def _load_error(namespace, ep, err, config_file):
    kind, key, _ = _KINDS[namespace]
    return PluginError("cannot load %s %r (%s): %s: %s" % (
        kind, ep.name, ep.value, type(err).__name__, _one_line(err)),
        config_file, "archive", key)


def _check_options(namespace, name, plugin, options, config_file):
    """Refuse options the constructor would not take, before calling it.

    :raises PluginError: an option it does not take, or one it requires
        that is missing.
    """
    section = "%s:%s" % (_KINDS[namespace][2], name)
    try:
        signature = inspect.signature(plugin)
    except (TypeError, ValueError):
        return
    params = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in takes:
            if takes:
                what = "takes: %s" % ", ".join(takes)
            else:
                what = "it takes no options"
            raise PluginError("option not taken by %s (%s)" % (name, what),
                              config_file, section, key)
    for p in params:
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty and p.name not in options):
            raise PluginError("required by %s, but not set" % name,
                              config_file, section, p.name)


def _construction_error(namespace, name, options, err, config_file):
    """A PluginError for a constructor that raised."""
    kind, _, prefix = _KINDS[namespace]
    section = "%s:%s" % (prefix, name)
    message = _one_line(err)
    if isinstance(err, ConfigError):
        return PluginError(_one_line(err.message),
                           err.filename or config_file,
                           err.section or section, err.key)
    if not isinstance(err, (ValueError, TypeError)):
        return PluginError("%s %r failed to start: %s: %s" % (
            kind, name, type(err).__name__, message), config_file, section)
    # Which option? The one the message starts with or names, else the
    # one whose value it quotes, else the only one given.
    for key in options:
        if message.startswith(key + ": "):
            return PluginError(message[len(key) + 2:], config_file, section,
                               key)
    for key in options:
        if re.search(r"\b%s\b" % re.escape(key), message):
            return PluginError(message, config_file, section, key)
    for key, value in options.items():
        if repr(value) in message:
            return PluginError(message, config_file, section, key)
    if len(options) == 1:
        return PluginError(message, config_file, section, next(iter(options)))
    return PluginError("%s %r refused its options: %s" % (
        kind, name, message), config_file, section)


def load_roll_checker(name, options=None, *, config_file=None):
    """The roll checker ``name``, built with ``options``.

    :param name: entry point name in ``shoebox.roll_checkers``.
    :param options: keyword arguments (strings) for its constructor.
    :param config_file: named in errors.
    :raises PluginError: see the module docstring.
    """
    options = dict(options or {})
    if name not in available(ROLL_CHECKERS):
        raise _not_installed(ROLL_CHECKERS, [name], config_file)

    def on_load_failure(manager, ep, err):
        # Called for a failed import and for a failed constructor alike:
        # loading the entry point again tells which (a module that failed
        # to import is not left in sys.modules, so it fails again).
        try:
            plugin = ep.load()
        except Exception as load_err:
            raise _load_error(ROLL_CHECKERS, ep, load_err,
                              config_file) from load_err
        _check_options(ROLL_CHECKERS, name, plugin, options, config_file)
        raise _construction_error(ROLL_CHECKERS, name, options, err,
                                  config_file) from err

    try:
        manager = driver.DriverManager(
            ROLL_CHECKERS, name,
            invoke_on_load=True,
            invoke_kwds=options,
            on_load_failure_callback=on_load_failure,
        )
    except stevedore_exception.NoMatches:
        raise _not_installed(ROLL_CHECKERS, [name], config_file) from None
    except stevedore_exception.MultipleMatches as err:
        raise PluginError("several packages install a roll checker named "
                          "%r: %s" % (name, _one_line(err)),
                          config_file, "archive", "roll_checker") from None
    LOG.debug("roll checker %s: %r", name, manager.driver)
    return manager.driver


def load_callbacks(names, options_by_name=None, *, config_file=None):
    """The callbacks ``names``, in that order, each built with its options.

    :param names: entry point names in ``shoebox.callbacks``.
    :param options_by_name: ``{name: {option: string}}``; a name without
        an entry gets no options.
    :param config_file: named in errors.
    :returns: ``[(name, callback), ...]`` in the order of ``names``.
    :raises PluginError: see the module docstring; also for a name given
        twice, or options for a name not in ``names``.
    """
    names = list(names)
    options_by_name = dict(options_by_name or {})
    for index, name in enumerate(names):
        if name in names[:index]:
            raise PluginError("%r is listed twice" % name, config_file,
                              "archive", "callbacks")
    for name in options_by_name:
        if name not in names:
            raise PluginError("callback %r is not listed in [archive] "
                              "callbacks" % name, config_file,
                              "callback:%s" % name)
    if not names:
        return []
    installed = available(CALLBACKS)
    missing = [name for name in names if name not in installed]
    if missing:
        raise _not_installed(CALLBACKS, missing, config_file)

    def on_load_failure(manager, ep, err):
        raise _load_error(CALLBACKS, ep, err, config_file) from err

    def on_missing(missing_names):
        raise _not_installed(CALLBACKS, sorted(missing_names), config_file)

    manager = named.NamedExtensionManager(
        CALLBACKS, names,
        name_order=True,
        invoke_on_load=False,
        on_load_failure_callback=on_load_failure,
        on_missing_entrypoints_callback=on_missing,
    )
    callbacks = []
    for ext in manager:
        options = dict(options_by_name.get(ext.name, {}))
        _check_options(CALLBACKS, ext.name, ext.plugin, options, config_file)
        try:
            callback = ext.plugin(**options)
        except Exception as err:
            raise _construction_error(CALLBACKS, ext.name, options, err,
                                      config_file) from err
        LOG.debug("callback %s: %r", ext.name, callback)
        callbacks.append((ext.name, callback))
    return callbacks


def build(config):
    """The roll checker and the callbacks a :class:`Config` names.

    :returns: ``(roll_checker, [(name, callback), ...])``.
    :raises PluginError: as :func:`load_roll_checker` and
        :func:`load_callbacks`.
    """
    roll_checker = load_roll_checker(
        config.archive.roll_checker, config.roll_checker_options,
        config_file=config.filename)
    callbacks = load_callbacks(
        config.archive.callbacks, config.callback_options,
        config_file=config.filename)
    return roll_checker, callbacks
