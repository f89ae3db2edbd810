"""Tests for shoebox_worker.roll_checker."""

import os

import pytest
from stevedore import driver

from shoebox_worker import contract
from shoebox_worker import roll_checker
from shoebox_worker import roll_manager
from shoebox_worker.ship import steps


class FakeArchive:
    def __init__(self, size=0, records=0):
        self.size = size
        self.records = records

    def tell(self):
        return self.size


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(roll_checker, "clock", lambda: now[0])
    return now


def test_never():
    checker = roll_checker.NeverRollChecker()
    archive = FakeArchive(size=10**12, records=10**9)
    checker.start(archive)
    assert checker.check(archive) is False


def test_base_class():
    checker = roll_checker.RollChecker()
    assert checker.start(FakeArchive()) is None
    assert checker.check(FakeArchive()) is False


@pytest.mark.parametrize("value,limit", [
    ("100", 100 * 1024 * 1024), ("0.5", 512 * 1024), (2, 2 * 1024 * 1024),
    (" 1 ", 1024 * 1024)])
def test_size(value, limit):
    checker = roll_checker.SizeRollChecker(roll_size_mb=value)
    assert checker.roll_size == limit
    assert not checker.check(FakeArchive(size=limit - 1))
    assert checker.check(FakeArchive(size=limit))
    assert roll_checker.SizeRollChecker().roll_size == 100 * 1024 * 1024


def test_time(clock):
    checker = roll_checker.TimeRollChecker(roll_minutes="0.5")
    assert checker.roll_minutes == 0.5
    assert not checker.check(FakeArchive())  # not started: no archive yet
    checker.start(FakeArchive())
    clock[0] += 29.9
    assert not checker.check(FakeArchive())
    clock[0] += 0.1
    assert checker.check(FakeArchive())
    checker.start(FakeArchive())  # a new archive starts a new period
    assert not checker.check(FakeArchive())
    assert roll_checker.TimeRollChecker().roll_minutes == 60


def test_count():
    checker = roll_checker.CountRollChecker(roll_count="100")
    assert checker.roll_count == 100
    assert not checker.check(FakeArchive(records=99))
    assert checker.check(FakeArchive(records=100))


@pytest.mark.parametrize("cls,option", [
    (roll_checker.SizeRollChecker, "roll_size_mb"),
    (roll_checker.TimeRollChecker, "roll_minutes"),
    (roll_checker.CountRollChecker, "roll_count"),
])
@pytest.mark.parametrize("value", [
    "0", 0, "-1", -0.5, "", "abc", None, "nan", "inf", "-inf",
    float("nan")])
def test_invalid_values(cls, option, value):
    with pytest.raises(ValueError, match=option):
        cls(**{option: value})


def test_count_must_be_whole():
    with pytest.raises(ValueError):
        roll_checker.CountRollChecker(roll_count="0.5")


@pytest.mark.parametrize("cls", [roll_checker.SizeRollChecker,
                                 roll_checker.TimeRollChecker,
                                 roll_checker.CountRollChecker])
def test_keyword_only_and_no_unknown_options(cls):
    with pytest.raises(TypeError):
        cls(5)
    with pytest.raises(TypeError):
        cls(roll_size_mbb=5)


def test_time_rolls_an_idle_archive(tmp_path, clock):
    checker = roll_checker.TimeRollChecker(roll_minutes="1")
    memory = steps.MemoryCallback()
    manager = roll_manager.WritingRollManager(
        "idle_%Y.events", checker, directory=str(tmp_path),
        archive_callback=memory)
    assert manager.maybe_roll() is None  # nothing open yet
    manager.write({"a": "b"}, "one")
    first = manager.active_filename
    clock[0] += 59
    assert manager.maybe_roll() is None
    clock[0] += 1
    closed = manager.maybe_roll()  # no write needed
    assert (closed.filename, closed.records) == (first, 1)
    assert manager.active_archive is None
    assert memory.events == [("open", first), ("close", first)]
    assert manager.maybe_roll() is None
    manager.write({"a": "b"}, "two")  # the next write opens a new file
    assert manager.active_filename != first
    manager.close()
    assert len(list(tmp_path.iterdir())) == 2


def test_size_rolls_through_manager(tmp_path):
    checker = roll_checker.SizeRollChecker(roll_size_mb="0.01")  # ~10 KB
    with roll_manager.WritingRollManager(
            "size_%Y.events", checker, directory=str(tmp_path)) as manager:
        for i in range(100):
            manager.write({"i": str(i)}, "x" * 1000)
    paths = roll_manager.sort_written_order(
        str(p) for p in tmp_path.iterdir())
    sizes = [os.path.getsize(p) for p in paths]
    assert len(sizes) == 10
    assert all(size >= checker.roll_size for size in sizes[:-1])
    assert sizes[-1] < checker.roll_size


@pytest.mark.parametrize("name,kwargs,cls", [
    ("never", {}, roll_checker.NeverRollChecker),
    ("size", {"roll_size_mb": "5"}, roll_checker.SizeRollChecker),
    ("time", {"roll_minutes": "0.5"}, roll_checker.TimeRollChecker),
    ("count", {"roll_count": "100"}, roll_checker.CountRollChecker),
])
def test_load_by_name(name, kwargs, cls):
    manager = driver.DriverManager("shoebox.roll_checkers", name,
                                   invoke_on_load=True, invoke_kwds=kwargs)
    assert type(manager.driver) is cls
    assert isinstance(manager.driver, contract.RollCheckerSpec)


# -- several checkers: the first that fires -----------------------------------

def test_first_of_rolls_on_size_or_time_whichever_comes_first(clock):
    checker = roll_checker.FirstOfRollChecker([
        roll_checker.SizeRollChecker(roll_size_mb=1),
        roll_checker.TimeRollChecker(roll_minutes=60)])
    checker.start(FakeArchive())
    assert not checker.check(FakeArchive(size=1024))
    assert checker.check(FakeArchive(size=1 << 20))      # busy: by size
    checker.start(FakeArchive())                          # a new archive
    clock[0] += 3599
    assert not checker.check(FakeArchive(size=10))
    clock[0] += 1
    assert checker.check(FakeArchive(size=10))            # quiet: by time
    checker.start(FakeArchive())                          # the clock restarts
    assert not checker.check(FakeArchive(size=10))


class StackTachStyleChecker:
    """A roll checker as StackTach shoebox's API has it (no base class):
    ``start(archive)`` and ``check(archive)``."""

    def __init__(self):
        self.started = 0

    def start(self, archive):
        self.started += 1

    def check(self, archive):
        return archive.records >= 3


def test_several_checkers_through_the_roll_manager(tmp_path, clock):
    # the library's API: a combined checker is a roll checker like any other
    third_party = StackTachStyleChecker()
    checker = roll_checker.FirstOfRollChecker([
        roll_checker.TimeRollChecker(roll_minutes=1), third_party])
    manager = roll_manager.WritingRollManager(
        "test_%Y%m%d%H%M%S.events", checker, directory=str(tmp_path),
        unique_names=True)
    closed = [manager.write({"i": str(i)}, b"x") for i in range(7)]
    assert [c is not None for c in closed] == [False, False, True] * 2 + [
        False]
    clock[0] += 61
    assert manager.maybe_roll() is not None   # the 7th record, by time
    assert third_party.started == 3
    manager.close()
    reader = roll_manager.ReadingRollManager(str(tmp_path / "test_*.events"))
    got = []
    while True:
        try:
            got.append(reader.read()[0]["i"])
        except roll_manager.NoMoreFiles:
            break
    assert got == [str(i) for i in range(7)]


def test_first_of_needs_a_checker():
    with pytest.raises(ValueError):
        roll_checker.FirstOfRollChecker([])
