"""Tests for shoebox_worker.callbacks: the chain (the built-in steps are in
tests/unit/ship/test_steps.py)."""

import os

import pytest

from shoebox_worker import CallbackError
from shoebox_worker import archive
from shoebox_worker import callbacks
from shoebox_worker import exceptions
from shoebox_worker.ship import steps

RECORDS = [({"n": str(i)}, b"payload %d" % i) for i in range(100)]
MTIME_NS = 1_600_000_000_123_456_789


@pytest.fixture
def events_file(tmp_path):
    path = tmp_path / "x.events"
    with archive.ArchiveWriter(path) as writer:
        for metadata, payload in RECORDS:
            writer.write(metadata, payload)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return str(path)


def read(path):
    with archive.ArchiveReader(path) as reader:
        return list(reader)


class Boom(callbacks.ArchiveCallback):
    def on_close(self, filename):
        raise OSError("disk on fire")


class TestChain:
    def test_order_and_path_passing(self, events_file, tmp_path):
        first, last = steps.MemoryCallback(), steps.MemoryCallback()
        dest = tmp_path / "shipped"
        chain = callbacks.CallbackChain([
            ("first", first),
            steps.ChangeExtensionCallback(new_extension="closed"),
            ("gzip", steps.GzipCallback()),
            ("move", steps.MoveFileCallback(destination_folder=dest)),
            ("last", last),
        ])
        assert len(chain) == 5
        assert chain.steps[1][0] == "ChangeExtensionCallback"
        chain.on_open(events_file)
        final = chain.on_close(events_file)
        assert final == str(dest / "x.events.closed.gz")
        assert first.events == [("open", events_file),
                                ("close", events_file)]
        assert last.events == [("open", events_file), ("close", final)]
        assert os.listdir(tmp_path) == ["shipped"]
        assert read(final) == RECORDS

    def test_none_ends_the_chain(self, events_file):
        after = steps.MemoryCallback()
        chain = callbacks.CallbackChain([steps.DeleteFileCallback(),
                                         after])
        assert chain.on_close(events_file) is None
        assert after.events == []
        assert not os.path.exists(events_file)

    def test_failure_names_step_and_file_and_resumes(self, events_file):
        flaky = steps.MemoryCallback(fail_times=1)
        chain = callbacks.CallbackChain([
            ("gzip", steps.GzipCallback()),
            ("upload", flaky),
            ("delete", steps.DeleteFileCallback()),
        ])
        gz = events_file + ".gz"
        with pytest.raises(CallbackError) as info:
            chain.on_close(events_file)
        error = info.value
        assert error.callback == "upload"
        assert error.filename == gz
        assert "upload" in str(error) and gz in str(error)
        assert isinstance(error.__cause__, RuntimeError)
        assert read(gz) == RECORDS  # left where the failing step got it
        assert not os.path.exists(events_file)

        assert chain.on_close(gz, start=1) is None
        assert flaky.events == [("fail", gz), ("close", gz)]
        assert not os.path.exists(gz)

    def test_failing_first_step_keeps_the_file(self, events_file):
        chain = callbacks.CallbackChain([("boom", Boom()),
                                         steps.DeleteFileCallback()])
        with pytest.raises(CallbackError, match="disk on fire") as info:
            chain.on_close(events_file)
        assert info.value.callback == "boom"
        assert info.value.filename == events_file
        assert read(events_file) == RECORDS
        assert chain.run_step(1, events_file) is None

    def test_a_steps_own_callback_error_is_said_once(self, events_file):
        class Uploads:
            def on_close(self, filename):
                raise exceptions.UploadError(
                    "upload to c/x failed: 401 Unauthorized",
                    callback="swift", filename=filename, permanent=True,
                    hint="check [callback:swift] user and key")

        chain = callbacks.CallbackChain([("swift", Uploads())])
        with pytest.raises(exceptions.UploadError) as info:
            chain.on_close(events_file)
        assert str(info.value) == (
            "callback swift failed on %s: upload to c/x failed: 401 "
            "Unauthorized" % events_file)
        assert info.value.permanent
        assert info.value.hint == "check [callback:swift] user and key"

    def test_permanent_error_of_a_third_party_step(self, events_file):
        class Refused:
            def on_close(self, filename):
                raise exceptions.PermanentError(
                    "login refused", hint="check [callback:tag] password")

        chain = callbacks.CallbackChain([("tag", Refused())])
        with pytest.raises(CallbackError) as info:
            chain.on_close(events_file)
        assert str(info.value) == ("callback tag failed on %s: login "
                                   "refused" % events_file)
        assert info.value.permanent
        assert info.value.hint == "check [callback:tag] password"

    def test_other_errors_may_heal(self, events_file):
        chain = callbacks.CallbackChain([("boom", Boom())])
        with pytest.raises(CallbackError) as info:
            chain.on_close(events_file)
        assert not info.value.permanent and info.value.hint is None

    def test_empty_chain(self):
        chain = callbacks.CallbackChain()
        assert chain.on_close("x") == "x"
        chain.on_open("x")

    def test_report_goes_to_the_steps_that_declare_it(self, events_file):
        seen = []

        class Takes:
            def on_close(self, filename, *, report=None):
                seen.append(("takes", filename, report))
                return filename

        class Plain:
            def on_close(self, filename):
                seen.append(("plain", filename))
                return filename

        class Positional:  # a positional "report" is not the keyword
            def on_close(self, filename, report=None):
                seen.append(("positional", filename, report))
                return filename

        class Anything:  # nor is **kwargs
            def on_close(self, filename, **kwargs):
                seen.append(("anything", filename, kwargs))
                return filename

        chain = callbacks.CallbackChain([Takes(), Plain(), Positional(),
                                         Anything()])
        assert [chain.wants_report(i) for i in range(4)] == [
            True, False, False, False]
        report = archive.inspect_file(events_file)
        assert chain.on_close(events_file, report=report) == events_file
        assert seen == [("takes", events_file, report),
                        ("plain", events_file),
                        ("positional", events_file, None),
                        ("anything", events_file, {})]
        seen.clear()
        chain.run_step(0, events_file)
        assert seen == [("takes", events_file, None)]

    def test_signature_read_once_when_built(self, events_file):
        class Takes:
            def on_close(self, filename, *, report=None):
                return report

        step = Takes()
        chain = callbacks.CallbackChain([step])
        step.on_close = lambda filename: filename  # too late to matter
        with pytest.raises(CallbackError, match="report"):
            chain.run_step(0, events_file, report="r")

    def test_a_chain_in_a_chain_passes_it_on(self, events_file):
        inner = steps.MemoryCallback()
        seen = []

        class Takes:
            def on_close(self, filename, *, report=None):
                seen.append(report)
                return filename

        chain = callbacks.CallbackChain([
            callbacks.CallbackChain([Takes(), inner])])
        assert chain.wants_report(0)
        chain.on_close(events_file, report="the report")
        assert seen == ["the report"]
        assert inner.events == [("close", events_file)]

    def test_steps_without_on_open(self, events_file):
        class CloseOnly:
            def on_close(self, filename):
                return filename

        chain = callbacks.CallbackChain([CloseOnly()])
        chain.on_open(events_file)
        assert chain.on_close(events_file) == events_file
