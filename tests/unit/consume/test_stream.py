"""Tests for shoebox_worker.consume.stream: the offset file, the resume
point, and each stream's positions (the worker's use of them is in
test_worker.py's TestStream, the real broker in
tests/functional/test_worker_stream.py)."""

import datetime
import hashlib
import json
import logging
import os
import types

import kombu
import pytest

from shoebox_worker import exceptions
from shoebox_worker import files
from shoebox_worker.consume import stream as stream_mod


def consumer(queue, stream=True, offset="first"):
    return types.SimpleNamespace(queue=queue, is_stream=stream,
                                 stream_offset=offset)


def message(offset):
    headers = {} if offset is None else {stream_mod.OFFSET_ARG: offset}
    return types.SimpleNamespace(headers=headers)


class TestOffsetFile:
    def test_path_is_the_queue_name_percent_encoded(self, tmp_path):
        assert stream_mod.offset_path(str(tmp_path), "notifications") == \
            str(tmp_path / "notifications.stream-offset")
        assert stream_mod.offset_path(str(tmp_path), "a/b c") == \
            str(tmp_path / "a%2Fb%20c.stream-offset")
        assert stream_mod.offset_path(str(tmp_path), "..") == \
            str(tmp_path / "...stream-offset")  # a name, not a folder

    def test_a_long_queue_name_fits_a_file_name(self, tmp_path):
        one = stream_mod.offset_path(str(tmp_path), "\u00e9" * 127 + "a")
        two = stream_mod.offset_path(str(tmp_path), "\u00e9" * 127 + "b")
        assert one != two
        for path in (one, two):
            name = os.path.basename(path + stream_mod.LOCK_SUFFIX + ".tmp")
            assert len(name.encode()) <= 255
            stream_mod.write_offset(path, "q", 1)
            assert stream_mod.read_offset(path) == 1

    def test_written_then_read(self, tmp_path):
        path = str(tmp_path / "q.stream-offset")
        assert stream_mod.read_offset(path) is None
        stream_mod.write_offset(path, "q", 0)
        assert stream_mod.read_offset(path) == 0
        stream_mod.write_offset(path, "q", 12345678901)
        assert stream_mod.read_offset(path) == 12345678901
        with open(path) as f:
            assert json.load(f) == {"queue": "q", "offset": 12345678901}
        assert os.listdir(tmp_path) == ["q.stream-offset"]  # no tmp left

    def test_replaced_atomically(self, tmp_path, monkeypatch):
        # tmp + fsync + rename + directory fsync: files.write_json_atomic
        path = str(tmp_path / "q.stream-offset")
        stream_mod.write_offset(path, "q", 5)
        calls = []
        real = files.write_json_atomic

        def spy(target, data):
            calls.append((target, data))
            return real(target, data)

        monkeypatch.setattr(files, "write_json_atomic", spy)
        stream_mod.write_offset(path, "q", 6)
        assert calls == [(path, {"queue": "q", "offset": 6})]

    def test_a_stale_tmp_of_a_killed_run_does_not_stop_it(self, tmp_path):
        path = str(tmp_path / "q.stream-offset")
        with open(path + ".tmp", "w") as f:
            f.write('{"queue": "q", "offs')
        stream_mod.write_offset(path, "q", 7)
        assert stream_mod.read_offset(path) == 7
        assert not os.path.exists(path + ".tmp")

    @pytest.mark.parametrize("text", [
        "", "{", "[]", '{"offset": "7"}', '{"offset": -1}',
        '{"offset": 1.5}', '{"offset": true}', '{"queue": "q"}'])
    def test_a_file_without_an_offset_is_one_line(self, tmp_path, text):
        path = tmp_path / "q.stream-offset"
        path.write_text(text)
        with pytest.raises(stream_mod.StreamError) as info:
            stream_mod.read_offset(str(path))
        assert isinstance(info.value, exceptions.ShoeboxError)
        message = str(info.value)
        assert "\n" not in message
        assert str(path) in message and "remove it" in message


class TestIdentity:
    def test_written_with_the_offset_and_read_back(self, tmp_path):
        path = str(tmp_path / "q.stream-offset")
        identity = stream_mod.Identity(7, stream_mod.digest(b"seven"))
        stream_mod.write_offset(path, "q", 9, identity)
        with open(path) as f:
            assert json.load(f) == {"queue": "q", "offset": 9, "identity": {
                "offset": 7, "sha256": hashlib.sha256(b"seven").hexdigest()}}
        assert stream_mod.read_saved(path) == (9, identity)
        assert stream_mod.read_offset(path) == 9

    def test_an_old_file_has_none(self, tmp_path):
        path = tmp_path / "q.stream-offset"
        path.write_text('{"queue": "q", "offset": 4}')
        assert stream_mod.read_saved(str(path)) == (4, None)
        assert stream_mod.read_saved(str(tmp_path / "none")) == (None, None)

    def test_one_known_by_its_offset_alone_is_not_written(self, tmp_path):
        path = str(tmp_path / "q.stream-offset")
        stream_mod.write_offset(path, "q", 4, stream_mod.Identity(4))
        assert stream_mod.read_saved(path) == (4, None)

    @pytest.mark.parametrize("identity", [
        "[]", '{"offset": 1}', '{"sha256": "%s"}' % ("a" * 64),
        '{"offset": -1, "sha256": "%s"}' % ("a" * 64),
        '{"offset": 1, "sha256": "%s"}' % ("A" * 64),
        '{"offset": 1, "sha256": "abc"}'])
    def test_a_broken_one_is_one_line(self, tmp_path, identity):
        path = tmp_path / "q.stream-offset"
        path.write_text('{"queue": "q", "offset": 4, "identity": %s}'
                        % identity)
        with pytest.raises(stream_mod.StreamError) as info:
            stream_mod.read_saved(str(path))
        assert "\n" not in str(info.value)
        assert str(path) in str(info.value) and "remove it" in \
            str(info.value)

    def test_as_a_log_line_names_it(self):
        assert str(stream_mod.Identity(4, "0123456789abcdef" * 4)) == \
            "sha256 0123456789abcdef at offset 4"
        assert str(stream_mod.Identity(1000)) == \
            "offset 1000 (no sha256 saved)"


class TestResumePoint:
    def test_nothing_known(self):
        assert stream_mod.resume_point(None, []) == (None, None)

    def test_saved_alone(self):
        assert stream_mod.resume_point(41, []) == (41, None)

    def test_archived_past_the_saved_offset(self):
        # fsynced, then killed before the offset file was written
        assert stream_mod.resume_point(9, [12, 10, 11, 8, 9]) == (12, None)

    def test_archived_behind_the_saved_offset(self):
        # shipped archives are gone, local ones are older: the file wins
        assert stream_mod.resume_point(100, [50, 51, 52]) == (100, None)

    def test_archived_without_a_file(self):
        # killed before the first offset file: from the first found on
        assert stream_mod.resume_point(None, [7, 5, 6]) == (7, None)

    def test_duplicates_count_once(self):
        assert stream_mod.resume_point(3, [4, 4, 5, 5]) == (5, None)

    def test_a_gap_is_the_streams_own(self):
        # each segment starts with an entry no consumer gets
        assert stream_mod.resume_point(9, [10, 11, 13, 14]) == (14, None)
        assert stream_mod.resume_point(None, [3, 5]) == (5, None)

    def test_after_damage_a_gap_stops_before_it(self):
        # records after a hole (unsynced pages lost to a power cut) are
        # archived twice rather than the hole lost
        assert stream_mod.resume_point(9, [10, 11, 14, 15], True) == (11, 12)
        assert stream_mod.resume_point(9, [12, 13], True) == (9, 10)
        assert stream_mod.resume_point(None, [3, 5], True) == (3, 4)
        assert stream_mod.resume_point(None, [], True) == (None, None)
        assert stream_mod.resume_point(3, [1, 2, 3, 4], True) == (4, None)


class TestStream:
    def make(self, tmp_path, start="first"):
        return stream_mod.Stream("q", str(tmp_path / "q.stream-offset"),
                                 start)

    def test_first_argument_is_stream_offset(self, tmp_path):
        when = datetime.datetime(2026, 12, 2, 18, tzinfo=datetime.timezone.utc)
        for start in ("first", "last", "next", 17, "1h", when):
            assert self.make(tmp_path, start).argument() == start

    def test_argument_after_the_last_written(self, tmp_path):
        stream = self.make(tmp_path, "next")
        stream.written(0)
        assert stream.argument() == 1
        stream.written(1)
        assert stream.argument() == 2

    def test_is_new(self, tmp_path):
        stream = self.make(tmp_path)
        assert stream.is_new(0) and stream.is_new(None)
        stream.written(5)
        assert not stream.is_new(5) and not stream.is_new(0)
        assert stream.is_new(6) and stream.is_new(None)

    def test_offset_of_a_delivery(self, tmp_path, caplog):
        stream = self.make(tmp_path)
        assert stream.offset_of(message(0)) == 0
        assert stream.offset_of(message(2 ** 40)) == 2 ** 40
        with caplog.at_level(logging.ERROR):
            assert stream.offset_of(message(None)) is None
            assert stream.offset_of(message("3")) is None
        assert len(caplog.records) == 1  # said once
        assert "without an x-stream-offset header" in caplog.text

    def test_a_gap_at_a_subscriptions_start_is_warned(self, tmp_path,
                                                      caplog):
        stream = self.make(tmp_path)
        stream.written(1)
        stream.subscribed = True  # as Streams.position sets it
        with caplog.at_level(logging.WARNING):
            stream.written(5)
        assert "offsets 2-4 were never delivered (the stream's retention " \
            "removed them before they were read)" in caplog.text
        assert stream.last == 5 and not stream.subscribed

    def test_other_gaps_are_the_streams_own_entries(self, tmp_path,
                                                    caplog):
        stream = self.make(tmp_path)
        stream.written(0)
        stream.subscribed = True
        with caplog.at_level(logging.DEBUG, logger=stream_mod.LOG.name):
            stream.written(2)   # one entry: a segment's first
            stream.written(3)
            stream.written(9)   # later in the subscription
        assert [r.levelno for r in caplog.records] == [logging.DEBUG] * 2
        assert stream.last == 9

    def test_saves_only_what_is_durable(self, tmp_path):
        stream = self.make(tmp_path)
        stream.resume()
        stream.written(3)
        stream.save()  # written, not synced: nothing saved
        assert stream_mod.read_offset(stream.path) is None
        stream.durable = stream.last
        stream.save()
        assert stream_mod.read_offset(stream.path) == 3
        stream.release()

    def test_resume_logs_where_it_starts(self, tmp_path, caplog):
        stream = self.make(tmp_path, "next")
        with caplog.at_level(logging.INFO):
            stream.resume()
        assert "stream q: first start, reading from next" in caplog.text
        stream.release()
        stream_mod.write_offset(stream.path, "q", 8)
        stream.archived = [9, 10]
        caplog.clear()
        with caplog.at_level(logging.INFO):
            stream.resume()
        assert "resuming after offset 10 (found in the archives" in \
            caplog.text
        assert stream.argument() == 11 and stream.archived == []
        stream.release()

    def test_resume_after_damage_warns_of_a_gap(self, tmp_path, caplog):
        stream = self.make(tmp_path)
        stream.archived = [0, 1, 3]
        stream.damaged = True
        with caplog.at_level(logging.WARNING):
            stream.resume()
        assert "lack offset 2 but hold later ones: resuming at 2" in \
            caplog.text
        assert stream.argument() == 2
        stream.release()

    def test_resume_without_damage_goes_past_a_gap(self, tmp_path, caplog):
        stream = self.make(tmp_path)
        stream.archived = [0, 1, 3]
        with caplog.at_level(logging.WARNING):
            stream.resume()
        assert caplog.text == ""
        assert stream.argument() == 4
        stream.release()

    def test_the_lock_keeps_a_second_reader_out(self, tmp_path):
        one, two = self.make(tmp_path), self.make(tmp_path)
        one.resume()
        with pytest.raises(stream_mod.StreamError) as info:
            two.resume()
        assert "another worker reads stream 'q'" in str(info.value)
        assert "\n" not in str(info.value)
        one.release()
        two.resume()
        two.release()


def probe_of(found):
    """A probe (:func:`stream_mod.first_delivery`) answering ``found``,
    noting the offsets asked for."""
    def probe(connection, queue, offset):
        probe.asked.append((connection, queue, offset))
        return found
    probe.asked = []
    return probe


SAVED = stream_mod.Identity(4, stream_mod.digest(b"four"))


class TestCheck:
    """Before a subscription: the stream must hold the identity's
    message."""

    def resumed(self, tmp_path, identity=SAVED, start="next"):
        stream = stream_mod.Stream("q", str(tmp_path / "q.stream-offset"),
                                   start)
        stream_mod.write_offset(stream.path, "q", 4, identity)
        stream.resume()
        return stream

    def test_the_same_stream(self, tmp_path, caplog):
        stream = self.resumed(tmp_path)
        probe = probe_of(SAVED)
        with caplog.at_level(logging.WARNING):
            assert stream.subscribe(probe, "conn") == 5
        assert probe.asked == [("conn", "q", 4)]
        assert caplog.text == ""
        stream.release()

    def test_nothing_to_check_on_another_transport(self, tmp_path, caplog):
        stream = self.resumed(tmp_path)
        with caplog.at_level(logging.WARNING):
            assert stream.subscribe(probe_of(stream_mod.UNKNOWN), None) == 5
        assert caplog.text == ""
        stream.release()

    def test_nothing_archived_nothing_checked(self, tmp_path):
        stream = stream_mod.Stream("q", str(tmp_path / "q"), "next")
        stream.resume()
        probe = probe_of(None)
        assert stream.subscribe(probe, None) == "next"
        assert probe.asked == []
        stream.release()

    def test_retention_removed_it(self, tmp_path, caplog):
        # the stream starts past the offset: the gap is written()'s
        stream = self.resumed(tmp_path)
        later = stream_mod.Identity(9, stream_mod.digest(b"nine"))
        with caplog.at_level(logging.WARNING):
            assert stream.subscribe(probe_of(later), None) == 5
        assert caplog.text == "" and stream.identity == SAVED
        stream.release()

    @pytest.mark.parametrize("found, holds", [
        (stream_mod.Identity(4, stream_mod.digest(b"other")),
         "sha256 %s at offset 4" % stream_mod.digest(b"other")[:16]),
        (None, "nothing at or after offset 4"),
        (stream_mod.Identity(2, stream_mod.digest(b"two")),
         "offset 2 first when asked for 4")])
    def test_another_stream_is_read_from_its_first_offset(
            self, tmp_path, caplog, found, holds):
        stream = self.resumed(tmp_path, start="next")
        with caplog.at_level(logging.WARNING):
            assert stream.subscribe(probe_of(found), None) == "first"
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert caplog.records[0].getMessage() == (
            "stream q: %s names sha256 %s at offset 4; the stream holds "
            "%s: not the stream archived before (deleted and declared "
            "again, or a working directory restored from another time): "
            "reading it from its first offset, so that none of it is "
            "skipped" % (stream.path, SAVED.sha256[:16], holds))
        assert stream.last is None and stream.is_new(0)
        stream.release()

    def test_after_another_stream_its_own_identity_is_saved(self, tmp_path):
        # the new stream's offset 4 is saved, though the file said 4 too
        stream = self.resumed(tmp_path)
        stream.subscribe(probe_of(None), None)
        for n in range(5):
            stream.written(n, b"new %d" % n)
        stream.synced()
        stream.save()
        assert stream_mod.read_saved(stream.path) == (4, stream_mod.Identity(
            4, stream_mod.digest(b"new 4")))
        stream.release()

    def test_an_old_file_is_checked_by_its_offset(self, tmp_path, caplog):
        with caplog.at_level(logging.INFO):
            stream = self.resumed(tmp_path, identity=None)
        assert "stream q: %s names no stream identity (an earlier " \
            "version's): checking only that the stream holds offset 4; " \
            "the identity is saved with the next offset" % stream.path in \
            caplog.text
        assert stream.identity == stream_mod.Identity(4)
        assert stream.subscribe(probe_of(SAVED), None) == 5
        assert stream.identity == SAVED  # what it held there
        stream.release()

    def test_an_old_file_past_the_streams_end(self, tmp_path, caplog):
        stream = self.resumed(tmp_path, identity=None)
        with caplog.at_level(logging.ERROR):
            assert stream.subscribe(probe_of(None), None) == "first"
        assert "names offset 4 (no sha256 saved); the stream holds " \
            "nothing at or after offset 4: not the stream" in caplog.text
        stream.release()


def test_first_delivery_has_nothing_to_check_without_rabbitmq():
    with kombu.Connection("memory://") as conn:
        assert stream_mod.first_delivery(conn, "q", 0) is \
            stream_mod.UNKNOWN


class TestIdentityKept:
    def make(self, tmp_path):
        stream = stream_mod.Stream("q", str(tmp_path / "q.stream-offset"),
                                   "first")
        stream.resume()
        return stream

    def test_the_last_synced_record_names_the_stream(self, tmp_path):
        stream = self.make(tmp_path)
        stream.written(0, b"zero")
        stream.written(1, b"one")
        stream.save()  # nothing synced: nothing saved
        assert stream_mod.read_saved(stream.path) == (None, None)
        stream.synced()
        stream.written(2, b"two")
        stream.save()
        assert stream_mod.read_saved(stream.path) == (1, stream_mod.Identity(
            1, stream_mod.digest(b"one")))
        stream.cut()  # 2 was cut off: it names nothing
        stream.synced()
        assert stream.identity == stream_mod.Identity(
            1, stream_mod.digest(b"one"))
        stream.release()

    def test_offsets_recovery_found_keep_the_files_identity(self, tmp_path):
        path = str(tmp_path / "q.stream-offset")
        stream_mod.write_offset(path, "q", 4, SAVED)
        stream = stream_mod.Stream("q", path, "first")
        stream.archived = [5, 6]
        stream.resume()
        stream.save()
        assert stream_mod.read_saved(path) == (6, SAVED)
        stream.release()


class TestCredit:
    def test_a_subscription_behind_the_last_offset_is_warned_once(
            self, tmp_path, caplog):
        stream = stream_mod.Stream("q", str(tmp_path / "q"), "first")
        stream.resume()
        stream.written(1000)
        probe = probe_of(stream_mod.UNKNOWN)
        stream.subscribe(probe, None)
        with caplog.at_level(logging.WARNING):
            for offset in (0, 1, 2):
                stream.credit(offset)
        assert [r.getMessage() for r in caplog.records] == [
            "stream q: asked for offset 1001, the broker delivered offset "
            "0, at or below the last one archived (1000): taken as "
            "archived already (acked as credit, not written), and so every "
            "delivery up to offset 1000"]
        assert caplog.records[0].levelno == logging.WARNING
        caplog.clear()
        stream.subscribe(probe, None)  # again: said again
        stream.credit(3)
        assert len(caplog.records) == 1
        stream.release()

    def test_not_once_the_subscription_wrote(self, tmp_path, caplog):
        # a cancelled subscription's last deliveries: nothing to say
        stream = stream_mod.Stream("q", str(tmp_path / "q"), "first")
        stream.resume()
        stream.subscribe(probe_of(stream_mod.UNKNOWN), None)
        stream.written(0)
        stream.written(1)
        with caplog.at_level(logging.WARNING):
            stream.credit(0)
        assert caplog.text == ""
        stream.release()


class TestStreams:
    def test_only_stream_queues(self, tmp_path):
        streams = stream_mod.Streams(str(tmp_path), [
            consumer("s"), consumer("classic", stream=False)])
        assert streams
        assert streams.get("s").path == str(tmp_path / "s.stream-offset")
        assert streams.get("classic") is None
        assert not stream_mod.Streams(str(tmp_path),
                                      [consumer("c", stream=False)])

    def test_recovered_records_by_queue(self, tmp_path):
        streams = stream_mod.Streams(str(tmp_path), [consumer("a"),
                                                     consumer("b")])
        for queue, offset in [("a", "4"), ("b", "9"), ("a", "5"),
                              ("other", "99"), ("a", None), ("a", "x")]:
            metadata = {"queue": queue}
            if offset is not None:
                metadata[stream_mod.METADATA_KEY] = offset
            streams.recovered((0, 2, 10, metadata, b""))
        assert streams.get("a").archived == [4, 5]
        assert streams.get("b").archived == [9]
        streams.resume()
        assert streams.get("a").argument() == 6
        assert streams.get("b").argument() == 10
        # saved at once: recovered archives may be shipped and deleted next
        assert stream_mod.read_offset(streams.get("a").path) == 5
        assert stream_mod.read_offset(streams.get("b").path) == 9
        streams.release()

    def test_synced_saved_and_cut(self, tmp_path):
        streams = stream_mod.Streams(str(tmp_path), [consumer("a")])
        streams.resume()
        a = streams.get("a")
        a.written(0)
        a.written(1)
        streams.synced()
        a.written(2)
        streams.save()
        assert stream_mod.read_offset(a.path) == 1
        streams.cut()  # 2 was cut off the archive: read again
        assert a.argument() == 2 and a.is_new(2)
        streams.release()

    def test_position_sets_the_consumer_argument(self, tmp_path):
        streams = stream_mod.Streams(str(tmp_path), [
            consumer("a", offset="next"), consumer("b", offset=3)])
        queues = [types.SimpleNamespace(name=name, consumer_arguments=None)
                  for name in ("a", "b", "classic")]
        fake = types.SimpleNamespace(queues=queues, connection=None)
        streams.position(fake)
        assert [q.consumer_arguments for q in queues] == [
            {"x-stream-offset": "next"}, {"x-stream-offset": 3}, None]
        streams.get("a").written(10)
        streams.position(fake)
        assert queues[0].consumer_arguments == {"x-stream-offset": 11}
