"""Tests for shoebox_worker.plugins.

The error paths run against fake entry points (real modules written to a
temporary directory, declared in stevedore's entry point cache), so they
need nothing installed; the last tests load the real built-ins.
"""

import importlib.metadata
import pathlib
import sys
import textwrap

import pytest
from stevedore import extension

from shoebox_worker import config
from shoebox_worker import plugins
from shoebox_worker.exceptions import ConfigError
from shoebox_worker.exceptions import PluginError
from shoebox_worker.ship import steps

FAKE_PLUGINS = '''
calls = []


class Checker:
    def __init__(self, *, roll_size_mb=100, label="x"):
        calls.append(("Checker", roll_size_mb, label))
        if float(roll_size_mb) <= 0:
            raise ValueError("roll_size_mb: must be greater than 0, got %r"
                             % roll_size_mb)
        self.roll_size_mb = roll_size_mb
        self.label = label


class Bare:
    def __init__(self):
        pass


class Anything:
    def __init__(self, **options):
        self.options = options


class Required:
    def __init__(self, *, container, prefix=""):
        self.container = container


class Picky:
    def __init__(self, *, a="1", b="2"):
        raise ValueError("these options do not go together")


class Quoting:
    def __init__(self, *, a="1", b="2"):
        int(b)


class Exploding:
    def __init__(self):
        raise OSError(13, "Permission denied")


class Strict:
    def __init__(self, *, mode="r"):
        from shoebox_worker.exceptions import ConfigError
        raise ConfigError("mode: not supported here")


class Tagged:
    def __init__(self, *, tag=""):
        self.tag = tag
'''

ROOT = pathlib.Path(__file__).resolve().parents[2]

BROKEN = "import shoebox_no_such_module\n"

MODULES = {"shoebox_fake_plugins": FAKE_PLUGINS,
           "shoebox_fake_broken": BROKEN}

ROLL_CHECKERS = {
    "checker": "shoebox_fake_plugins:Checker",
    "bare": "shoebox_fake_plugins:Bare",
    "anything": "shoebox_fake_plugins:Anything",
    "required": "shoebox_fake_plugins:Required",
    "picky": "shoebox_fake_plugins:Picky",
    "quoting": "shoebox_fake_plugins:Quoting",
    "exploding": "shoebox_fake_plugins:Exploding",
    "strict": "shoebox_fake_plugins:Strict",
    "broken": "shoebox_fake_broken:Checker",
    "missing": "shoebox_fake_plugins:Nope",
}
CALLBACKS = {
    "a": "shoebox_fake_plugins:Tagged",
    "b": "shoebox_fake_plugins:Tagged",
    "bare": "shoebox_fake_plugins:Bare",
    "broken": "shoebox_fake_broken:Callback",
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Replace both namespaces with the fake entry points above."""
    for name, source in MODULES.items():
        (tmp_path / (name + ".py")).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    groups = {
        plugins.ROLL_CHECKERS: [
            importlib.metadata.EntryPoint(name, value, plugins.ROLL_CHECKERS)
            for name, value in ROLL_CHECKERS.items()],
        plugins.CALLBACKS: [
            importlib.metadata.EntryPoint(name, value, plugins.CALLBACKS)
            for name, value in CALLBACKS.items()],
    }
    for group, eps in groups.items():
        monkeypatch.setitem(extension.ExtensionManager.ENTRY_POINT_CACHE,
                            group, eps)
    monkeypatch.setattr(plugins, "_entry_points",
                        lambda namespace: groups.get(namespace, []))
    yield sys.modules
    for name in MODULES:
        sys.modules.pop(name, None)


def error(function, *args, **kwargs):
    with pytest.raises(PluginError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ConfigError)
    return message


ROLL_INSTALLED = ("anything, bare, broken, checker, exploding, missing, "
                  "picky, quoting, required, strict")


# -- available --------------------------------------------------------------

def test_available_lists_names_without_importing(fake):
    assert ", ".join(plugins.available(plugins.ROLL_CHECKERS)) == (
        ROLL_INSTALLED)
    assert plugins.available(plugins.CALLBACKS) == ["a", "b", "bare",
                                                    "broken"]
    assert "shoebox_fake_plugins" not in sys.modules
    assert "shoebox_fake_broken" not in sys.modules


def test_available_unknown_namespace():
    assert plugins.available("shoebox.no_such_namespace") == []


# -- load_roll_checker ------------------------------------------------------

def test_roll_checker_gets_its_options(fake):
    checker = plugins.load_roll_checker(
        "checker", {"roll_size_mb": "5", "label": "L"})
    assert (checker.roll_size_mb, checker.label) == ("5", "L")
    assert type(checker).__name__ == "Checker"
    assert plugins.load_roll_checker("checker").roll_size_mb == 100


def test_roll_checker_with_kwargs_takes_anything(fake):
    checker = plugins.load_roll_checker("anything", {"x": "1", "y": "2"})
    assert checker.options == {"x": "1", "y": "2"}


def test_roll_checker_not_installed(fake):
    assert error(plugins.load_roll_checker, "sise", {},
                 config_file="worker.conf") == (
        "worker.conf [archive] roll_checker: no roll checker named 'sise' "
        "(installed: %s)" % ROLL_INSTALLED)
    assert error(plugins.load_roll_checker, "sise") == (
        "[archive] roll_checker: no roll checker named 'sise' "
        "(installed: %s)" % ROLL_INSTALLED)


def test_roll_checker_that_does_not_import(fake):
    assert error(plugins.load_roll_checker, "broken",
                 config_file="worker.conf") == (
        "worker.conf [archive] roll_checker: cannot load roll checker "
        "'broken' (shoebox_fake_broken:Checker): ModuleNotFoundError: No "
        "module named 'shoebox_no_such_module'")


def test_roll_checker_attribute_missing(fake):
    assert error(plugins.load_roll_checker, "missing",
                 config_file="worker.conf") == (
        "worker.conf [archive] roll_checker: cannot load roll checker "
        "'missing' (shoebox_fake_plugins:Nope): AttributeError: module "
        "'shoebox_fake_plugins' has no attribute 'Nope'")


def test_roll_checker_option_not_taken(fake):
    assert error(plugins.load_roll_checker, "checker",
                 {"roll_size_mb": "1", "roll_sise_mb": "1"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:checker] roll_sise_mb: option not taken "
        "by checker (takes: roll_size_mb, label)")
    # Refused on the signature: the constructor never ran.
    assert fake["shoebox_fake_plugins"].calls == []


def test_roll_checker_that_takes_no_options(fake):
    assert error(plugins.load_roll_checker, "bare", {"x": "1"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:bare] x: option not taken by bare (it "
        "takes no options)")


def test_roll_checker_required_option(fake):
    assert error(plugins.load_roll_checker, "required", {"prefix": "p"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:required] container: required by "
        "required, but not set")


def test_roll_checker_bad_value_named_by_its_key(fake):
    assert error(plugins.load_roll_checker, "checker",
                 {"roll_size_mb": "0"}, config_file="worker.conf") == (
        "worker.conf [roll_checker:checker] roll_size_mb: must be greater "
        "than 0, got '0'")


def test_roll_checker_bad_value_found_by_its_value(fake):
    assert error(plugins.load_roll_checker, "quoting",
                 {"a": "1", "b": "two"}, config_file="worker.conf") == (
        "worker.conf [roll_checker:quoting] b: invalid literal for int() "
        "with base 10: 'two'")


def test_roll_checker_bad_values_without_a_key(fake):
    assert error(plugins.load_roll_checker, "picky", {"a": "1", "b": "2"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:picky]: roll checker 'picky' refused its "
        "options: these options do not go together")
    # With a single option, that one is to blame.
    assert error(plugins.load_roll_checker, "picky", {"b": "2"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:picky] b: these options do not go "
        "together")


def test_roll_checker_that_fails_otherwise(fake):
    assert error(plugins.load_roll_checker, "exploding",
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:exploding]: roll checker 'exploding' "
        "failed to start: PermissionError: [Errno 13] Permission denied")


def test_roll_checker_raising_a_config_error(fake):
    assert error(plugins.load_roll_checker, "strict",
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:strict]: mode: not supported here")


# -- load_callbacks ---------------------------------------------------------

def test_callbacks_in_the_given_order_with_their_own_options(fake):
    callbacks = plugins.load_callbacks(
        ["b", "bare", "a"], {"a": {"tag": "A"}, "b": {"tag": "B"}})
    assert [name for name, _ in callbacks] == ["b", "bare", "a"]
    assert callbacks[0][1].tag == "B"
    assert callbacks[2][1].tag == "A"
    assert callbacks[0][1] is not callbacks[2][1]
    assert [name for name, _ in plugins.load_callbacks(["a", "b"])] == [
        "a", "b"]


def test_no_callbacks(fake):
    assert plugins.load_callbacks([], {}) == []


def test_only_named_callbacks_are_imported(fake):
    # "broken" is installed but not asked for: no error.
    assert len(plugins.load_callbacks(["a"])) == 1
    assert "shoebox_fake_broken" not in sys.modules


def test_callback_names_are_checked_by_the_config_alone(fake, tmp_path):
    # A name listed twice and a section for a name not listed are refused
    # by config.load (tests/unit/test_config.py), before any plugin loads.
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = memory://\n[consumer:q]\n"
                    "[archive]\nroll_checker = bare\ncallbacks = a, b, a\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert not isinstance(info.value, PluginError)
    assert str(info.value) == (
        "%s [archive] callbacks: 'a' is listed twice" % path)
    assert "shoebox_fake_plugins" not in sys.modules


def test_callback_not_installed(fake):
    assert error(plugins.load_callbacks, ["a", "gzp"],
                 config_file="worker.conf") == (
        "worker.conf [archive] callbacks: no callback named 'gzp' "
        "(installed: a, b, bare, broken)")
    assert error(plugins.load_callbacks, ["c", "a", "d"],
                 config_file="worker.conf") == (
        "worker.conf [archive] callbacks: no callbacks named 'c', 'd' "
        "(installed: a, b, bare, broken)")


def test_callback_that_does_not_import(fake):
    assert error(plugins.load_callbacks, ["a", "broken"],
                 config_file="worker.conf") == (
        "worker.conf [archive] callbacks: cannot load callback 'broken' "
        "(shoebox_fake_broken:Callback): ModuleNotFoundError: No module "
        "named 'shoebox_no_such_module'")


def test_callback_option_not_taken(fake):
    assert error(plugins.load_callbacks, ["a", "bare"],
                 {"a": {"tga": "x"}}, config_file="worker.conf") == (
        "worker.conf [callback:a] tga: option not taken by a (takes: tag)")
    assert error(plugins.load_callbacks, ["bare"],
                 {"bare": {"level": "9"}}, config_file="worker.conf") == (
        "worker.conf [callback:bare] level: option not taken by bare (it "
        "takes no options)")


# -- build ------------------------------------------------------------------

def test_build_from_a_config(fake, tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text(textwrap.dedent("""\
        [broker]
        url = memory://
        [consumer:q]
        [archive]
        roll_checker = checker
        callbacks = b, a
        [roll_checker:checker]
        label = ${LABEL}
        [callback:a]
        tag = A
        """))
    conf = config.load(path, environ={"LABEL": "from-env"})
    roll_checker, callbacks = plugins.build(conf)
    assert roll_checker.label == "from-env"
    assert [(name, cb.tag) for name, cb in callbacks] == [("b", ""),
                                                          ("a", "A")]


def test_build_names_the_config_file(fake, tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = memory://\n[consumer:q]\n"
                    "[archive]\nroll_checker = checker\n"
                    "[roll_checker:checker]\nroll_size = 5\n")
    conf = config.load(path, environ={})
    assert error(plugins.build, conf) == (
        "%s [roll_checker:checker] roll_size: option not taken by checker "
        "(takes: roll_size_mb, label)" % path)


# -- the real, installed built-ins -----------------------------------------

def test_installed_names():
    assert set(plugins.available(plugins.ROLL_CHECKERS)) >= {
        "never", "size", "time", "count"}
    assert set(plugins.available(plugins.CALLBACKS)) >= {
        "change_extension", "move", "delete", "gzip", "swift"}


def test_load_real_builtins():
    from shoebox_worker import roll_checker as builtin_roll_checkers

    checker = plugins.load_roll_checker("never", {})
    assert isinstance(checker, builtin_roll_checkers.NeverRollChecker)
    ((name, callback),) = plugins.load_callbacks(
        ["change_extension"], {"change_extension": {"new_extension": ".x"}})
    assert name == "change_extension"
    assert isinstance(callback, steps.ChangeExtensionCallback)
    assert callback.new_extension == ".x"


def test_real_builtin_option_errors():
    assert error(plugins.load_roll_checker, "size", {"roll_sise_mb": "1"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:size] roll_sise_mb: option not taken by "
        "size (takes: roll_size_mb)")
    assert error(plugins.load_roll_checker, "sise",
                 config_file="worker.conf").startswith(
        "worker.conf [archive] roll_checker: no roll checker named 'sise' "
        "(installed: count, never, size, time")


def test_builtin_options_are_named_by_their_key(monkeypatch):
    monkeypatch.delenv("ST_KEY", raising=False)
    assert error(plugins.load_callbacks, ["gzip"],
                 {"gzip": {"level": "99"}}, config_file="worker.conf") == (
        "worker.conf [callback:gzip] level: expected 1 to 9, got '99'")
    assert error(plugins.load_roll_checker, "count", {"roll_count": "0"},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:count] roll_count: expected a number > "
        "0, got '0'")
    # an option that is missing, not refused, is named all the same
    assert error(plugins.load_callbacks, ["swift"],
                 {"swift": {"auth": "http://a/auth/v1.0", "user": "u"}},
                 config_file="worker.conf") == (
        "worker.conf [callback:swift] key: required for auth_version 1 "
        "(key and os_password may also come from ST_KEY and OS_PASSWORD)")


def test_build_the_sample(monkeypatch):
    from shoebox_worker import roll_checker as builtin_roll_checkers

    monkeypatch.chdir(ROOT)
    conf = config.load("etc/shoebox-worker.conf.sample", environ={})
    roll_checker, callbacks = plugins.build(conf)
    assert isinstance(roll_checker,
                      builtin_roll_checkers.FirstOfRollChecker)
    size, time = roll_checker.checkers
    assert isinstance(size, builtin_roll_checkers.SizeRollChecker)
    assert isinstance(time, builtin_roll_checkers.TimeRollChecker)
    assert (size.roll_size_mb, time.roll_minutes) == (256, 60)
    ((name, callback),) = callbacks
    assert name == "gzip"
    assert isinstance(callback, steps.GzipCallback)


# -- several roll checkers --------------------------------------------------

def test_several_roll_checkers_each_with_its_options():
    from shoebox_worker import roll_checker as builtin
    checker = plugins.load_roll_checkers(
        ["size", "time"], {"size": {"roll_size_mb": "256"},
                           "time": {"roll_minutes": "30"}})
    assert isinstance(checker, builtin.FirstOfRollChecker)
    assert [type(c) for c in checker.checkers] == [builtin.SizeRollChecker,
                                                   builtin.TimeRollChecker]
    assert [checker.checkers[0].roll_size_mb,
            checker.checkers[1].roll_minutes] == [256, 30]
    # one name: that checker itself, as before
    assert isinstance(plugins.load_roll_checkers(["count"]),
                      builtin.CountRollChecker)


def test_a_wrong_option_names_its_own_section():
    assert error(plugins.load_roll_checkers, ["size", "time"],
                 {"size": {"roll_size_mb": "256"},
                  "time": {"roll_size_mb": "5"}},
                 config_file="worker.conf") == (
        "worker.conf [roll_checker:time] roll_size_mb: option not taken by "
        "time (takes: roll_minutes)")
