"""Tests for etc/shoebox-worker.conf.sample: it loads, it documents every
option, and every commented-out ``#key = value`` is the real default.

The defaults are read from the code: the option tables of
``shoebox_worker.config`` for the fixed sections, and for each
``[roll_checker:NAME]`` and ``[callback:NAME]`` section the keyword
defaults of the plugin that the entry point NAME loads.
"""

import dataclasses
import importlib.metadata
import inspect
import pathlib
import re

from shoebox_worker import config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "etc" / "shoebox-worker.conf.sample"

#: The entry point namespace of each plugin section prefix.
NAMESPACES = {"roll_checker": "shoebox.roll_checkers",
              "callback": "shoebox.callbacks"}

_HEADER = re.compile(r"^#?\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^(#?)([a-z_][a-z0-9_]*) =(?: (.*))?$")


def sample_sections(text=None):
    """{section: [(key, commented, value)]} of every section the sample
    shows, commented-out ones (``#[callback:swift]``) included.

    ``#key = value`` is a documented default; ``# text`` is prose.
    """
    text = SAMPLE.read_text() if text is None else text
    found, section = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            section = header.group(1)
            assert section not in found, "%s documented twice" % section
            found[section] = []
            continue
        match = _KEY.match(line)
        if match:
            assert section is not None, line
            found[section].append(
                (match.group(2), match.group(1) == "#", match.group(3) or ""))
    return found


def _fixed_sections():
    """The sample's fixed sections, ``[consumer:QUEUE]`` as ``consumer``."""
    found = {}
    for name, options in sample_sections().items():
        prefix = name.partition(":")[0]
        if name in config.SECTIONS or prefix == "consumer":
            found[prefix] = options
    return found


def _plugin_sections(text=None):
    """[(section, keyword parameters of its plugin, options)]."""
    result = []
    for name, options in sample_sections(text).items():
        prefix, colon, plugin = name.partition(":")
        if not colon or prefix not in NAMESPACES:
            continue
        points = importlib.metadata.entry_points(
            group=NAMESPACES[prefix], name=plugin)
        assert points, "[%s]: no %s entry point %r" % (
            name, NAMESPACES[prefix], plugin)
        factory = next(iter(points)).load()
        parameters = [
            p for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]
        result.append((name, parameters, options))
    return result


def as_written(default):
    """A plugin's keyword default as the INI file would say it."""
    if default is None:
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _wrong_plugin_defaults(text=None):
    wrong = []
    for name, parameters, options in _plugin_sections(text):
        defaults = {p.name: as_written(p.default) for p in parameters}
        for key, commented, value in options:
            assert key in defaults, "[%s] %s: the plugin takes no such " \
                "option" % (name, key)
            if commented and value != defaults[key]:
                wrong.append("[%s] #%s = %s, but the default is %r"
                             % (name, key, value, defaults[key]))
    return wrong


# -- it loads ---------------------------------------------------------------

def test_sample_loads_with_the_documented_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    conf = config.load("etc/shoebox-worker.conf.sample", environ={})
    assert conf.filename == "etc/shoebox-worker.conf.sample"
    assert conf.broker.url == "amqp://guest:guest@127.0.0.1:5672//"
    assert conf.broker.redacted_url() == "amqp://guest:***@127.0.0.1:5672//"
    # the archiver's own durable quorum queue, bound to the 14 exchanges
    # of Ceilometer's notification_control_exchanges (27.0.0) with both
    # topics
    exchanges = ("nova", "glance", "neutron", "cinder", "heat", "keystone",
                 "trove", "zaqar", "swift", "ceilometer", "magnum", "dns",
                 "ironic", "aodh")
    assert conf.consumers == (config.ConsumerConfig(
        queue="shoebox-archiver", exchange=exchanges,
        routing_key=("notifications.*", "versioned_notifications.*"),
        durable=True, exchange_durable=False,
        queue_arguments={"x-queue-type": "quorum"}),)
    assert len(conf.consumers[0].bindings) == 28
    assert conf.archive.working_directory == str(ROOT / "var" / "archive")
    # rolls at 256 MiB or after an hour, whichever comes first
    assert conf.archive.roll_checker == ("size", "time")
    assert {k: dict(v) for k, v in conf.roll_checker_options.items()} == {
        "size": {"roll_size_mb": "256"}, "time": {}}
    from shoebox_worker import plugins
    from shoebox_worker import roll_checker
    checker, _ = plugins.build(conf)
    assert isinstance(checker, roll_checker.FirstOfRollChecker)
    size, time = checker.checkers
    assert (size.roll_size, time.roll_minutes) == (256 << 20, 60)
    assert conf.archive.callbacks == ("gzip",)
    assert {k: dict(v) for k, v in conf.callback_options.items()} == {
        "gzip": {}}
    assert conf.archive == dataclasses.replace(
        config.ArchiveConfig(), working_directory=str(ROOT / "var/archive"),
        roll_checker=("size", "time"), callbacks=("gzip",))
    assert conf.worker == config.WorkerConfig()
    assert conf.metrics == config.MetricsConfig()
    assert conf.metrics.watch_queues == ()
    assert conf.logging == config.LoggingConfig()


# -- the fixed sections -----------------------------------------------------

def test_sample_asks_for_nothing_rabbitmq_4_refuses(monkeypatch):
    from shoebox_worker.consume import rabbitmq
    monkeypatch.chdir(ROOT)
    conf = config.load("etc/shoebox-worker.conf.sample", environ={})
    assert rabbitmq.config_warnings(conf) == []


def test_sample_documents_every_option_in_table_order():
    found = _fixed_sections()
    assert list(found) == list(config.SECTIONS)
    for section, table in config.SECTIONS.items():
        assert [key for key, _, _ in found[section]] == list(table), section


def test_sample_shows_the_real_defaults():
    for section, options in _fixed_sections().items():
        table = config.SECTIONS[section]
        for key, commented, value in options:
            if commented:
                assert value == table[key].default, (section, key)


# -- the plugin sections ----------------------------------------------------

def test_sample_shows_a_section_for_the_plugins_it_names():
    shown = [name for name, _, _ in _plugin_sections()]
    assert shown == [
        "roll_checker:size", "roll_checker:time", "roll_checker:count",
        "callback:gzip", "callback:change_extension", "callback:move",
        "callback:swift"]


def test_sample_plugin_sections_show_the_constructor_defaults():
    assert _wrong_plugin_defaults() == []


def test_a_commented_out_example_is_caught():
    # The check fails on the sample as it was: its swift section showed
    # examples as if they were the defaults.
    text = SAMPLE.read_text().replace(
        "#container = shoebox\n", "#container = notifications\n").replace(
        "#object_prefix =\n", "#object_prefix = %Y/%m/%d/\n").replace(
        "#destination_folder = .\n", "#destination_folder = ./var/done\n")
    assert _wrong_plugin_defaults(text) == [
        "[callback:move] #destination_folder = ./var/done, but the default "
        "is '.'",
        "[callback:swift] #container = notifications, but the default is "
        "'shoebox'",
        "[callback:swift] #object_prefix = %Y/%m/%d/, but the default is ''",
    ]


def test_sample_documents_every_plugin_option_in_signature_order():
    for name, parameters, options in _plugin_sections():
        assert [key for key, _, _ in options] == [
            p.name for p in parameters], name


def test_as_written():
    assert as_written(None) == ""
    assert as_written(100) == "100"
    assert as_written(False) == "false"
    assert as_written(".done") == ".done"


# -- the prose --------------------------------------------------------------

def test_sample_explains_every_option():
    # Above every option line (set or commented out) there is an
    # explanation, possibly shared with the options or the section header
    # just before it.
    lines = SAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if _KEY.match(line):
            above = number - 1
            while _KEY.match(lines[above]) or _HEADER.match(lines[above]):
                above -= 1
            assert lines[above].startswith("# "), line
