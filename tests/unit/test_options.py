"""Tests for shoebox_worker.options: the one set of coercers."""

import os

import pytest

from shoebox_worker import options
from shoebox_worker.options import OptionError


def refused(coercer, value):
    with pytest.raises(OptionError) as info:
        coercer(value)
    assert isinstance(info.value, ValueError)
    assert info.value.option is None
    return str(info.value)


# -- the error ----------------------------------------------------------------

def test_option_error_names_the_option():
    err = OptionError("expected a number, got 'x'", "timeout")
    assert str(err) == "timeout: expected a number, got 'x'"
    assert (err.message, err.option) == ("expected a number, got 'x'",
                                         "timeout")
    assert str(OptionError("must not be empty")) == "must not be empty"


def test_coerce_names_the_option():
    assert options.coerce("retries", " 3 ", options.integer()) == 3
    with pytest.raises(OptionError) as info:
        options.coerce("retries", "three", options.integer())
    assert info.value.option == "retries"
    assert str(info.value) == "retries: expected an integer, got 'three'"


# -- numbers ------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("5", 5), (" -2 ", -2), ("+7", 7), (12, 12)])
def test_integer(value, expected):
    assert options.integer()(value) == expected


@pytest.mark.parametrize("coercer, value, message", [
    (options.integer(), "ten", "expected an integer, got 'ten'"),
    (options.integer(), "2.5", "expected an integer, got '2.5'"),
    (options.integer(), 2.0, "expected an integer, got 2.0"),
    (options.integer(), True, "expected an integer, got True"),
    (options.integer(), "", "expected an integer, got ''"),
    (options.integer(minimum=1), "0", "expected an integer >= 1, got '0'"),
    (options.integer(maximum=9), "10", "expected an integer <= 9, got '10'"),
    (options.integer(minimum=1, maximum=65535), "70000",
     "expected an integer from 1 to 65535, got '70000'"),
    (options.integer(minimum=1, maximum=65535), 0,
     "expected an integer from 1 to 65535, got 0"),
])
def test_integer_refused(coercer, value, message):
    assert refused(coercer, value) == message


def test_integer_in():
    assert options.integer_in(1, 9)("9") == 9
    assert options.integer_in(1, 9, empty=6)("") == 6
    assert options.integer_in(1, 9, empty=6)(None) == 6
    assert refused(options.integer_in(1, 9), "99") == (
        "expected 1 to 9, got '99'")
    assert refused(options.integer_in(1, 9), "fast") == (
        "expected 1 to 9, got 'fast'")
    assert refused(options.integer_in(1, 2), "3") == (
        "expected 1 or 2, got '3'")


@pytest.mark.parametrize("value, expected", [
    ("1.5", 1.5), (" 2 ", 2.0), (3, 3.0), (0.25, 0.25), ("1e3", 1000.0)])
def test_number(value, expected):
    result = options.number()(value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("coercer, value, message", [
    (options.number(), "soon", "expected a number, got 'soon'"),
    (options.number(), "nan", "expected a number, got 'nan'"),
    (options.number(), "inf", "expected a number, got 'inf'"),
    (options.number(), float("-inf"), "expected a number, got -inf"),
    (options.number(), None, "expected a number, got None"),
    (options.number(), False, "expected a number, got False"),
    (options.number(minimum=0), "-1", "expected a number >= 0, got '-1'"),
    (options.number(minimum=0, exclusive=True), "0",
     "expected a number > 0, got '0'"),
    (options.number(minimum=0.5, exclusive=True), 0.5,
     "expected a number > 0.5, got 0.5"),
    (options.number(whole=True), "0.5",
     "expected a whole number, got '0.5'"),
])
def test_number_refused(coercer, value, message):
    assert refused(coercer, value) == message


def test_whole_number():
    whole = options.number(minimum=0, exclusive=True, whole=True)
    assert whole("100") == 100 and type(whole("100")) is int
    assert whole(70) == 70
    assert whole(3.0) == 3
    assert refused(whole, "1e2") == "expected a whole number, got '1e2'"
    assert refused(whole, "ten") == "expected a number, got 'ten'"


# -- booleans, sizes, choices -------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("true", True), ("Yes", True), (" on ", True), ("1", True), (True, True),
    ("false", False), ("NO", False), ("off", False), ("0", False),
    (False, False)])
def test_boolean(value, expected):
    assert options.boolean()(value) is expected


def test_boolean_refused_and_empty():
    message = "expected true or false (or yes/no, on/off, 1/0), got %r"
    assert refused(options.boolean(), "maybe") == message % "maybe"
    assert refused(options.boolean(), "") == message % ""
    assert options.boolean(empty=None)("") is None
    assert options.boolean(empty=False)(" ") is False
    assert set(options.BOOLEANS.values()) == {True, False}


@pytest.mark.parametrize("value, expected", [
    ("1048576", 1 << 20), ("256K", 256 << 10), ("100M", 100 << 20),
    ("1G", 1 << 30), ("1g", 1 << 30), ("5GiB", 5 << 30), ("2 MB", 2 << 20),
    (" 2 M ", 2 << 20), ("1T", 1 << 40), (4096, 4096)])
def test_size(value, expected):
    assert options.size()(value) == expected


@pytest.mark.parametrize("coercer, value, message", [
    (options.size(), "abc",
     "expected a size like 1073741824, 100M or 1G, got 'abc'"),
    (options.size(), "1.5G",
     "expected a size like 1073741824, 100M or 1G, got '1.5G'"),
    (options.size(), "-1",
     "expected a size like 1073741824, 100M or 1G, got '-1'"),
    (options.size(), "", "expected a size like 1073741824, 100M or 1G, "
     "got ''"),
    (options.size(), "0", "expected a size >= 1 bytes, got '0'"),
    (options.size(maximum=5 << 30), "6G",
     "expected a size from 1 to 5368709120 bytes, got '6G'"),
])
def test_size_refused(coercer, value, message):
    assert refused(coercer, value) == message


def test_choice():
    level = options.choice("DEBUG", "INFO", upper=True)
    assert level("info") == "INFO"
    assert options.choice("round-robin", "shuffle")("Shuffle") == "shuffle"
    assert refused(level, "verbose") == (
        "expected one of DEBUG, INFO, got 'verbose'")
    assert refused(level, "inf") == (
        "expected one of DEBUG, INFO, got 'inf' (did you mean INFO?)")


# -- text, names, paths -------------------------------------------------------

def test_text():
    assert options.text()(" nova ") == "nova"
    assert options.text()(5) == "5"
    assert refused(options.text(), " ") == "must not be empty"
    assert refused(options.text(), None) == "must not be empty"
    assert options.text(empty=None)("") is None
    assert options.text(empty="")(None) == ""


def test_name():
    assert options.name()(" logs ") == "logs"
    assert refused(options.name(), "a/b") == (
        "expected a name without '/', got 'a/b'")
    assert refused(options.name(), "") == "must not be empty"


def test_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert options.path()("var/archive") == str(tmp_path / "var/archive")
    assert options.path()("~/x") == str(tmp_path / "home" / "x")
    assert options.path()(tmp_path) == str(tmp_path)
    assert os.path.isabs(options.path()("."))
    assert refused(options.path(), "") == "must not be empty"
    assert options.path(empty=None)("") is None


# -- lists --------------------------------------------------------------------

def test_items():
    assert options.items(" a, b ,,\n c ") == ["a", "b", "c"]
    assert options.items("") == []


def test_names():
    def lower(item):
        if not item.islower():
            raise OptionError("expected lower case, got %r" % item)
        return item

    names = options.names(lower)
    assert names("gzip, swift") == ("gzip", "swift")
    assert names("") == ()
    assert refused(names, "gzip, Swift") == "expected lower case, got 'Swift'"
    assert refused(names, "gzip, swift, gzip") == "'gzip' is listed twice"


def test_pairs():
    pairs = options.pairs(int)
    result = pairs("a=1, b = 2")
    assert dict(result) == {"a": 1, "b": 2}
    with pytest.raises(TypeError):
        result["c"] = 3  # read-only
    assert dict(options.pairs()("")) == {}
    assert refused(pairs, "a") == "expected key=value, got 'a'"
    assert refused(pairs, "=1") == "expected key=value, got '=1'"
    assert refused(pairs, "a=1, a=2") == "'a' is set twice"


@pytest.mark.parametrize("value, expected", [
    ("0640", 0o640), ("640", 0o640), ("0o750", 0o750), ("0", 0),
    (" 0600 ", 0o600), (0o700, 0o700),
])
def test_mode(value, expected):
    assert options.mode()(value) == expected


@pytest.mark.parametrize("value", ["0800", "rw-r-----", "04755", "0x1ff",
                                   "", 0o1000, "-1"])
def test_mode_refused(value):
    with pytest.raises(options.OptionError) as caught:
        options.mode()(value)
    assert str(caught.value).startswith(
        "expected permission bits in octal, from 0000 to 0777")
