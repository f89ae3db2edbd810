"""Load the roll checker and the archive callbacks named in the config.

Plugins are stevedore entry points, picked by cardinality: roll checkers
(``shoebox.roll_checkers``, each name a stevedore *driver*; several names
are combined: the archive rolls on the first that fires,
:class:`~shoebox_worker.roll_checker.FirstOfRollChecker`) and an
ordered set of callbacks (``shoebox.callbacks``, a
``NamedExtensionManager`` with ``name_order=True``, because ``gzip`` must
run before ``swift`` and ``swift`` before ``delete``). A third-party
package adds a plugin by declaring an entry point in one of them.

Both kinds are loaded without being invoked and built the same way
(:func:`_construct`): options come from ``[roll_checker:NAME]`` /
``[callback:NAME]`` as strings, are checked against the constructor's
signature, and are passed to it as keyword arguments. Every failure (a
name that is not installed, a module that does not import, an option the
constructor does not take or refuses) becomes a
:class:`~shoebox_worker.exceptions.PluginError`: one line naming the file,
section and key, like every other config mistake. A constructor names the
option it refuses with :func:`shoebox_worker.options.coerce` (or, for a
third-party plugin, a ``ValueError("option: message")``).

Which names are asked for is the config's business:
:func:`shoebox_worker.config.load` refuses a callback listed twice and a
plugin section nobody selected; this module checks only that each name is
installed and builds.
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
from shoebox_worker.options import OptionError

__all__ = [
    "CALLBACKS",
    "ROLL_CHECKERS",
    "available",
    "build",
    "load_callbacks",
    "load_roll_checker",
    "load_roll_checkers",
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


def _require_installed(namespace, names, config_file):
    """Refuse names not installed, from entry point metadata alone (no
    plugin is imported when one of them is a typo).

    :raises PluginError: one line listing the missing names and what is
        installed.
    """
    installed = available(namespace)
    _not_installed(namespace, config_file)(
        [name for name in names if name not in installed])


def _not_installed(namespace, config_file):
    """Raise for missing names; stevedore's
    ``on_missing_entrypoints_callback`` too."""
    kind, key, _ = _KINDS[namespace]

    def on_missing(names):
        names = list(names)
        if not names:
            return
        installed = ", ".join(available(namespace)) or "none"
        if len(names) == 1:
            message = "no %s named %r" % (kind, names[0])
        else:
            message = "no %ss named %s" % (kind, ", ".join(map(repr, names)))
        raise PluginError("%s (installed: %s)" % (message, installed),
                          config_file, "archive", key)
    return on_missing


def _load_failed(namespace, config_file):
    """stevedore's ``on_load_failure_callback``: a module that does not
    import, or an entry point that names nothing, becomes a PluginError."""
    kind, key, _ = _KINDS[namespace]

    def on_load_failure(manager, ep, err):
        raise PluginError("cannot load %s %r (%s): %s: %s" % (
            kind, ep.name, ep.value, type(err).__name__, _one_line(err)),
            config_file, "archive", key) from err
    return on_load_failure


def _check_options(name, plugin, options, config_file, section):
    """Refuse options the constructor would not take, before calling it.

    :raises PluginError: an option it does not take, or one it requires
        that is missing.
    """
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


def _construction_error(kind, name, options, err, config_file, section):
    """A PluginError for a constructor that raised."""
    message = _one_line(err)
    if isinstance(err, ConfigError):
        return PluginError(_one_line(err.message),
                           err.filename or config_file,
                           err.section or section, err.key)
    if isinstance(err, OptionError) and err.option:
        # the built-ins name the option (shoebox_worker.options.coerce)
        return PluginError(_one_line(err.message), config_file, section,
                           err.option)
    if not isinstance(err, (ValueError, TypeError)):
        return PluginError("%s %r failed to start: %s: %s" % (
            kind, name, type(err).__name__, message), config_file, section)
    # A third-party plugin: which option? The one the message starts with
    # or names, else the one whose value it quotes, else the only one given.
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


def _construct(namespace, ext, options, config_file):
    """Build one loaded plugin with its options: the one way both kinds
    are built.

    :param ext: the stevedore extension (loaded, not yet invoked).
    :param options: ``{option: string}`` from its config section.
    :raises PluginError: an option it does not take, one it requires that
        is missing, or any exception from its constructor, named by its
        section (and key, when it can be told).
    """
    kind, _, prefix = _KINDS[namespace]
    section = "%s:%s" % (prefix, ext.name)
    options = dict(options or {})
    _check_options(ext.name, ext.plugin, options, config_file, section)
    try:
        plugin = ext.plugin(**options)
    except Exception as err:
        raise _construction_error(kind, ext.name, options, err, config_file,
                                  section) from err
    LOG.debug("%s %s: %r", kind, ext.name, plugin)
    return plugin


def load_roll_checker(name, options=None, *, config_file=None):
    """The roll checker ``name``, built with ``options``.

    :param name: entry point name in ``shoebox.roll_checkers``.
    :param options: keyword arguments (strings) for its constructor.
    :param config_file: named in errors.
    :raises PluginError: see the module docstring; also when several
        packages install a roll checker of that name.
    """
    _require_installed(ROLL_CHECKERS, [name], config_file)
    try:
        manager = driver.DriverManager(
            ROLL_CHECKERS, name,
            invoke_on_load=False,
            on_load_failure_callback=_load_failed(ROLL_CHECKERS,
                                                       config_file),
        )
    except stevedore_exception.NoMatches:  # uninstalled since the check
        _not_installed(ROLL_CHECKERS, config_file)([name])
    except stevedore_exception.MultipleMatches as err:
        raise PluginError("several packages install a roll checker named "
                          "%r: %s" % (name, _one_line(err)),
                          config_file, "archive", "roll_checker") from None
    (ext,) = manager.extensions
    return _construct(ROLL_CHECKERS, ext, options, config_file)


def load_callbacks(names, options_by_name=None, *, config_file=None):
    """The callbacks ``names``, in that order, each built with its options.

    The names are taken as given: :func:`shoebox_worker.config.load` is
    where a name listed twice, or a ``[callback:NAME]`` section for a
    name not listed, is refused.

    :param names: entry point names in ``shoebox.callbacks``.
    :param options_by_name: ``{name: {option: string}}``; a name without
        an entry gets no options.
    :param config_file: named in errors.
    :returns: ``[(name, callback), ...]`` in the order of ``names``.
    :raises PluginError: see the module docstring.
    """
    names = list(names)
    options_by_name = options_by_name or {}
    if not names:
        return []
    _require_installed(CALLBACKS, names, config_file)
    manager = named.NamedExtensionManager(
        CALLBACKS, names,
        name_order=True,
        invoke_on_load=False,
        on_load_failure_callback=_load_failed(CALLBACKS, config_file),
        on_missing_entrypoints_callback=_not_installed(CALLBACKS,
                                                       config_file),
    )
    return [(ext.name, _construct(CALLBACKS, ext,
                                  options_by_name.get(ext.name), config_file))
            for ext in manager]


def load_roll_checkers(names, options_by_name=None, *, config_file=None):
    """The roll checkers ``names``, each built with its options: the one
    checker when there is one, else a
    :class:`~shoebox_worker.roll_checker.FirstOfRollChecker` of them, in
    that order.

    :param options_by_name: ``{name: {option: string}}``; a name without
        an entry gets no options.
    :raises PluginError: as :func:`load_roll_checker`.
    """
    options_by_name = options_by_name or {}
    checkers = [load_roll_checker(name, options_by_name.get(name),
                                  config_file=config_file)
                for name in names]
    if len(checkers) == 1:
        return checkers[0]
    from shoebox_worker import roll_checker
    return roll_checker.FirstOfRollChecker(checkers)


def build(config):
    """The roll checker and the callbacks a :class:`Config` names.

    :returns: ``(roll_checker, [(name, callback), ...])``.
    :raises PluginError: as :func:`load_roll_checker` and
        :func:`load_callbacks`.
    """
    roll_checker = load_roll_checkers(
        config.archive.roll_checker, config.roll_checker_options,
        config_file=config.filename)
    callbacks = load_callbacks(
        config.archive.callbacks, config.callback_options,
        config_file=config.filename)
    return roll_checker, callbacks
