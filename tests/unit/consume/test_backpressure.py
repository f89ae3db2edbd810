"""Tests for shoebox_worker.consume.backpressure: when consumption pauses
and resumes (the worker's side is in test_worker.py)."""

from shoebox_worker.consume import backpressure as bp

MB = 1024 * 1024


def free(mb):
    return lambda: mb * MB


def never():
    raise AssertionError("free space measured while not paused for it")


def test_runs_under_the_limit():
    pressure = bp.Backpressure(10 * MB)
    assert pressure.check((3, 10 * MB, 5.0), never) is None
    assert pressure.paused is None


def test_pauses_over_max_backlog_once():
    pressure = bp.Backpressure(10 * MB)
    change = pressure.check((4, 10 * MB + 1, 5.0), never)
    assert change == bp.Change(
        bp.PAUSE, "4 archive(s), 10.0 MB waiting to be shipped, over "
        "max_backlog_mb = 10", False)
    assert pressure.paused == bp.PAUSE_BACKLOG
    assert pressure.check((5, 20 * MB, 5.0), never) is None


def test_resumes_under_the_ratio_only():
    pressure = bp.Backpressure(10 * MB)
    pressure.check((4, 11 * MB, 0), never)
    # between 90 % and 100 %: still paused (no flapping)
    assert pressure.check((4, 9.5 * MB, 0), never) is None
    change = pressure.check((1, 9 * MB, 0), never)
    assert change == bp.Change(bp.RESUME, "backlog down to 9.0 MB", True)
    assert pressure.paused is None


def test_disk_full_pauses_and_needs_free_space_to_resume():
    pressure = bp.Backpressure(10 * MB, resume_free=64 * MB)
    change = pressure.disk_full("disk full under /var/x")
    assert change == bp.Change(bp.PAUSE, "disk full under /var/x", False)
    assert pressure.disk_full("again") is None
    # the backlog does not resume a disk-full pause
    assert pressure.check((0, 0, 0), free(63)) is None
    change = pressure.check((0, 0, 0), free(64))
    assert change == bp.Change(bp.RESUME, "disk has 64 MB free", True)
    assert pressure.paused is None


def test_disk_full_outranks_the_backlog():
    pressure = bp.Backpressure(1 * MB)
    assert pressure.check((2, 2 * MB, 0), never).action == bp.PAUSE
    change = pressure.disk_full("disk full")
    # already paused: the cause changes, the consumers stay cancelled
    assert change == bp.Change(bp.PAUSE, "disk full", True)
    assert pressure.paused == bp.PAUSE_DISK_FULL
    # a small backlog does not resume it
    assert pressure.check((0, 0, 0), free(0)) is None
    assert pressure.paused == bp.PAUSE_DISK_FULL


def test_default_resume_threshold():
    pressure = bp.Backpressure(MB)
    pressure.disk_full("full")
    assert pressure.check((0, 0, 0), lambda: bp.RESUME_FREE_BYTES - 1) \
        is None
    assert pressure.check((0, 0, 0), lambda: bp.RESUME_FREE_BYTES).action \
        == bp.RESUME


def test_resumes_at_90_percent_of_the_limit_not_before():
    # the promise in numbers: a 100 MB limit resumes at 90 MB, not 90 MB
    # and a byte, and not anywhere between
    pressure = bp.Backpressure(100 * MB)
    assert pressure.check((9, 100 * MB + 1, 0), never).action == bp.PAUSE
    assert pressure.check((9, 100 * MB, 0), never) is None
    assert pressure.check((9, 90 * MB + 1, 0), never) is None
    assert pressure.paused == bp.PAUSE_BACKLOG
    change = pressure.check((8, 90 * MB, 0), never)
    assert change == bp.Change(bp.RESUME, "backlog down to 90.0 MB", True)
    # and at the limit itself it runs on
    assert pressure.check((9, 100 * MB, 0), never) is None
    assert pressure.paused is None


def test_a_full_disk_resumes_with_64_mb_free_by_default():
    pressure = bp.Backpressure(MB)
    assert pressure.disk_full("full").action == bp.PAUSE
    for free_bytes in (0, 1, MB, 64 * MB - 1):
        assert pressure.check((0, 0, 0), lambda b=free_bytes: b) is None
    assert pressure.paused == bp.PAUSE_DISK_FULL
    change = pressure.check((0, 0, 0), free(64))
    assert change == bp.Change(bp.RESUME, "disk has 64 MB free", True)


def test_resume_free_zero_is_kept():
    # 0 is a threshold (resume at once), not "use the default"
    pressure = bp.Backpressure(MB, resume_free=0)
    pressure.disk_full("full")
    assert pressure.check((0, 0, 0), free(0)).action == bp.RESUME


def test_a_backlog_pause_never_measures_free_space():
    pressure = bp.Backpressure(10 * MB)
    pressure.check((2, 11 * MB, 0), never)
    # while paused for the backlog, free space is never measured
    assert pressure.check((2, 10 * MB, 0), never) is None
    assert pressure.check((1, 5 * MB, 0), never).action == bp.RESUME


def test_sizes_are_told_in_mebibytes():
    # 1.05 MiB and a byte: rounds up only when divided by 2**20 exactly
    size = 1101005
    pressure = bp.Backpressure(MB)
    assert pressure.check((1, size, 0), never).reason == (
        "1 archive(s), 1.1 MB waiting to be shipped, over "
        "max_backlog_mb = 1")
    pressure = bp.Backpressure(2 * MB)
    pressure.check((1, 3 * MB, 0), never)
    assert pressure.check((1, size, 0), never).reason == \
        "backlog down to 1.1 MB"
