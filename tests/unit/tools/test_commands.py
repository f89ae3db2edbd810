"""Tests for shoebox_worker.tools.commands: the subcommands' wiring."""

import argparse
import datetime
import subprocess
import sys

import pytest

from shoebox_worker.tools import commands
from shoebox_worker.tools import publish
from shoebox_worker.tools import read


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("argv,func", [
    (["cat", "a"], read.cmd_cat),
    (["verify", "--salvage", "a", "b"], commands.run_verify),
    (["replay", "--config", "c", "--exchange", "e", "--routing-key", "k",
      "a"], commands.run_replay),
    (["generate", "--url", "memory://", "--count", "3"],
     commands.run_generate),
])
def test_each_command_runs_its_function(parser, argv, func):
    assert parser.parse_args(argv).func is func


def test_verify_runs_read_s_verify_without_chain(parser, monkeypatch):
    calls = []
    monkeypatch.setattr(read, "cmd_verify", lambda args: calls.append(args)
                        or 5)
    args = parser.parse_args(["verify", "a"])
    assert commands.run_verify(args) == 5 and calls == [args]


@pytest.mark.parametrize("argv", [
    ["verify", "--deep", "a"], ["verify", "--json", "a"],
    ["verify", "--public-key", "k", "a"], ["verify", "--since", "1h", "a"],
    ["verify", "--expect", "%s:1:%s" % ("a" * 32, "b" * 64), "a"],
    ["verify", "--chain", "--salvage", "swift://c"]])
def test_verify_refuses_chain_options_that_do_not_go_together(parser, argv):
    from shoebox_worker import tools
    with pytest.raises(tools.UsageError, match="--chain"):
        commands.run_verify(parser.parse_args(argv))


@pytest.mark.parametrize("wrapper, name", [
    (commands.run_replay, "cmd_replay"),
    (commands.run_generate, "cmd_generate")])
def test_the_publishing_commands_run_publishs(monkeypatch, wrapper, name):
    calls = []
    monkeypatch.setattr(publish, name, lambda args: calls.append(args) or 7)
    assert wrapper("args") == 7 and calls == ["args"]


def test_cat_starts_without_the_broker_modules():
    code = ("import sys; from shoebox_worker import cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(("
            "'kombu', 'amqp', 'shoebox_worker.config', "
            "'shoebox_worker.tools.publish'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         check=True, text=True).stdout
    assert out.strip() == "[]"


def test_match_is_parsed(parser):
    args = parser.parse_args(["cat", "--match", "event_type=compute.*",
                              "--metadata", "a"])
    (key, test), = args.match
    assert key == "event_type" and test("compute.instance.update")
    assert not test("image.update") and args.metadata
    with pytest.raises(SystemExit):
        parser.parse_args(["cat", "--match", "nokey", "a"])


@pytest.mark.parametrize("command", [
    ["cat"], ["replay", "--exchange", "e", "--routing-key", "k"]])
def test_cat_and_replay_take_the_selection(parser, command):
    args = parser.parse_args(command + [
        "--since", "2024-03-01T12:00:00", "--until", "2h", "--where",
        "payload.instance_id=2f50*", "--dedup", "a"])
    assert args.since == datetime.datetime(2024, 3, 1, 12,
                                           tzinfo=datetime.UTC)
    assert args.until.tzinfo is not None
    assert [w[:2] for w in args.where] == [("payload.instance_id", "2f50*")]
    assert args.dedup and args.match == []


def test_generate_start_is_an_iso_time(parser):
    args = parser.parse_args(["generate", "--url", "memory://", "--count",
                              "3", "--seed", "4", "--start",
                              "2024-03-01T12:00:00"])
    assert args.seed == 4
    assert args.start == datetime.datetime(2024, 3, 1, 12)
    assert parser.parse_args(["generate", "--url", "memory://", "--count",
                              "3"]).start is None


def test_generate_bad_start_is_a_usage_error(parser, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["generate", "--url", "memory://", "--count", "3",
                           "--start", "yesterday"])
    assert info.value.code == 2
    assert "not an ISO 8601 time: 'yesterday'" in capsys.readouterr().err


def test_generate_help_says_what_seed_and_start_repeat(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random unless --seed" in text
    assert "--seed repeats all but their times" in text
    assert "--seed with --start repeats every byte" in text
