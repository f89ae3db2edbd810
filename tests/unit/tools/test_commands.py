"""Tests for shoebox_worker.tools.commands: the subcommands' wiring."""

import argparse

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
    (["verify", "--salvage", "a", "b"], read.cmd_verify),
    (["replay", "--config", "c", "--exchange", "e", "--routing-key", "k",
      "a"], publish.cmd_replay),
    (["generate", "--url", "memory://", "--count", "3"],
     publish.cmd_generate),
])
def test_each_command_runs_its_function(parser, argv, func):
    assert parser.parse_args(argv).func is func


def test_match_is_parsed(parser):
    args = parser.parse_args(["cat", "--match", "event_type=compute.*",
                              "--metadata", "a"])
    (key, test), = args.match
    assert key == "event_type" and test("compute.instance.update")
    assert not test("image.update") and args.metadata
    with pytest.raises(SystemExit):
        parser.parse_args(["cat", "--match", "nokey", "a"])
