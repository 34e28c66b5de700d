"""How the sequencer and its Kafka sink fail: without a broker (nothing here talks to Kafka).

A batch that keeps failing makes the sequencer not ready, then stop with an error naming what to
check, instead of replaying forever while reporting healthy (and never counts as idle time); a full
local queue while producing a dead letter aborts the transaction and surfaces as a ledger write
failure, not a crash; an entry too large for a ledger record, map rows included, is found before
anything is sealed; brokers that do not answer at start-up are a `LedgerError` naming them, and a
stop request ends the start-up at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from ledger_support import chain_apps

from streamprov.header import ProvenanceHeader
from streamprov.ledger import kafka as ledger_kafka
from streamprov.ledger import sequencer as sequencer_module
from streamprov.ledger import writer as writer_module
from streamprov.ledger.errors import LedgerError, LedgerWriteFailedError
from streamprov.ledger.kafka import KafkaLedgerSink
from streamprov.ledger.model import ApplicationKind, AppTemplate, Context, MapRow
from streamprov.ledger.requests import LedgerRequest
from streamprov.ledger.sequencer import FAILURES_NOT_READY, MAX_FAILURES, LedgerSequencer
from streamprov.ledger.writer import DEFAULT_MAX_ENTRY_BYTES

UNREACHABLE = "127.0.0.1:1"  # clients are created, never used


def _sequencer() -> LedgerSequencer:
    return LedgerSequencer(
        UNREACHABLE,
        requests_topic="req",
        ledger_topic="ledger",
        ledger_id="unit",
        signer=None,
        dead_letter_topic="dlq",
    )


def test_failing_batches_make_it_not_ready_then_stop_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seq = _sequencer()
    waits: list[float] = []
    monkeypatch.setattr(seq.state, "pause", lambda s: waits.append(s) or True)
    seq.state.set_ready("sealing")
    try:
        for n in range(1, MAX_FAILURES):
            seq._failed(LedgerWriteFailedError("topic gone"))
            ready, why = seq.state.ready()
            assert ready is (n < FAILURES_NOT_READY), (n, why)
            seq._set_ready("sealing ledger unit")  # what a (re)activation does: kept not ready
            assert seq.state.ready()[0] is (n < FAILURES_NOT_READY)
        assert not seq.state.ready()[0] and "topic gone" in seq.state.ready()[1]
        with pytest.raises(LedgerError, match="batches in a row could not be sealed") as info:
            seq._failed(LedgerWriteFailedError("topic gone"))
        assert "restart" in str(info.value)
        assert waits == [min(10.0, 0.5 * 2**i) for i in range(MAX_FAILURES - 1)]  # backoff, bounded
    finally:
        seq._consumer.close()


def test_a_sealed_batch_after_failures_makes_it_ready_again(monkeypatch: pytest.MonkeyPatch) -> None:
    seq = _sequencer()
    monkeypatch.setattr(seq.state, "pause", lambda s: True)
    try:
        for _ in range(FAILURES_NOT_READY):
            seq._failed(LedgerWriteFailedError("broker away"))
        assert not seq.state.ready()[0]
        seq._failures = 0  # what run() does after a sealed batch, before reporting ready
        seq._set_ready("sealing ledger unit")
        assert seq.state.ready() == (True, "sealing ledger unit")
    finally:
        seq._consumer.close()


class _FullQueueProducer:
    """Accepts ledger records; its local queue is full for every other topic (a dead letter)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, *_a: Any, **_kw: Any) -> None:
        if topic != "ledger":
            raise BufferError("Local: Queue full")
        self.calls.append("produce")

    def poll(self, _timeout: float) -> int:
        return 0

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit")

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append("abort")


def test_a_dead_letter_that_cannot_be_queued_aborts_the_transaction() -> None:
    sink = KafkaLedgerSink(UNREACHABLE, "ledger", transactional_id="unit-tx", timeout_s=0.2)
    fake = _FullQueueProducer()
    sink._producer = fake  # type: ignore[assignment]
    with pytest.raises(LedgerWriteFailedError, match="queue stayed full"):
        sink._store([(b"k", b"entry")], [("dlq", b"k", b"bad request", [])])
    assert fake.calls == ["begin", "produce", "abort"]  # nothing of the batch commits later


# -- entries too large for a ledger record, and idleness while a batch is not sealed ------------------------
# A probe's map row with a 600 kB DataID (its entry holds the DataID twice: over 1 MB) was not
# dead-lettered: the sequencer checked the size of a request's applications only. The broker refused
# the batch (MSG_SIZE_TOO_LARGE) ten times, the sequencer exited 2 with the good applications of the
# batch unsealed, and a restart did the same; with --idle-exit the failure backoff counted as idle
# time and it exited 0 having sealed nothing.

_TEMPLATE = AppTemplate(ApplicationKind.MAP, "f", "1", b"0123456789abcdef", (), "dev", Context("s", "l", ()))


def _map_row(data_id_bytes: int) -> MapRow:
    out = ProvenanceHeader.for_source("X" * data_id_bytes, b"value", timestamp_ms=1).encode()
    return (0, None, (0, b"1234"), out)


def test_a_map_row_whose_entry_would_not_fit_a_record_is_too_large() -> None:
    request = LedgerRequest("unit", tuple(chain_apps(2)), ((_TEMPLATE, (_map_row(10), _map_row(600_000))),))
    problem = sequencer_module._too_large(request, DEFAULT_MAX_ENTRY_BYTES)
    assert problem is not None and problem.startswith("map row 1 of f@1 needs about 1200")


def test_a_map_row_counts_its_dataid_in_bytes_not_as_four_per_character() -> None:
    """A 150 kB DataID makes a ~300 kB entry: it fits (approx_size's 4 bytes a character would make it
    1.2 MB and refuse an entry the sequencer always sealed)."""
    row = _map_row(150_000)
    size = writer_module.approx_map_row_size(
        writer_module.template_size(_TEMPLATE), row, DEFAULT_MAX_ENTRY_BYTES
    )
    assert 300_000 < size < 320_000
    too_large = sequencer_module._too_large
    assert too_large(LedgerRequest("unit", (), ((_TEMPLATE, (row,)),)), DEFAULT_MAX_ENTRY_BYTES) is None
    # and a row whose headers are short is bounded without being read
    garbage = (0, None, (0, b"1234"), b"garbage")
    assert (
        writer_module.approx_map_row_size(
            writer_module.template_size(_TEMPLATE), garbage, DEFAULT_MAX_ENTRY_BYTES
        )
        < 1000
    )


class _Msg:
    def error(self) -> None:
        return None


class _ReplayingConsumer:
    """Hands out the same batch on every call, as the rewind after each failed batch does."""

    def subscribe(self, *_a: Any, **_kw: Any) -> None:
        pass

    def consume(self, *_a: Any) -> list[_Msg]:
        return [_Msg()]

    def close(self) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_batch_that_is_never_sealed_does_not_count_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an idle timeout shorter than the failure backoff, the sequencer still stops with an error
    after `MAX_FAILURES` (the batch was never sealed), never returns as if it had been idle."""
    seq = _sequencer()
    consumer = seq._consumer
    clock = _Clock()
    monkeypatch.setattr(sequencer_module, "time", clock)
    monkeypatch.setattr(seq.state, "pause", lambda s: clock.sleep(s) or True)
    monkeypatch.setattr(seq, "check_topics", lambda: True)
    monkeypatch.setattr(seq, "_try_activate", lambda: True)
    monkeypatch.setattr(seq, "_recover", lambda: None)
    failed = []

    def seal(_msgs: object) -> None:
        failed.append(clock.now)
        raise LedgerWriteFailedError("Broker: Message size too large")

    monkeypatch.setattr(seq, "_seal", seal)
    seq._consumer = _ReplayingConsumer()  # type: ignore[assignment]
    seq._assigned = {("req", 0)}  # the partition is ours: the idle timeout is not stretched
    try:
        with pytest.raises(LedgerError, match="batches in a row could not be sealed"):
            seq.run(idle_timeout_s=3.0)
        assert len(failed) == MAX_FAILURES
        assert clock.now - 1000.0 > 3.0 * MAX_FAILURES  # waited far longer than the idle timeout
    finally:
        consumer.close()


# -- brokers that do not answer at start-up ------------------------------------------------------------------
# A probe started `streamprov ledger sequencer -b 127.0.0.1:1`: after 30 s an uncaught
# cimpl.KafkaException traceback (raised from run -> check_topics -> list_all_topics), exit 1; and a
# SIGTERM sent 1-3 s after start still took 27-30 s to act, the metadata request blocking the loop.


def _unreachable(timeout_s: float) -> LedgerSequencer:
    return LedgerSequencer(
        UNREACHABLE,
        requests_topic="req",
        ledger_topic="ledger",
        ledger_id="unit",
        signer=None,
        dead_letter_topic="dlq",
        timeout_s=timeout_s,
    )


def test_brokers_that_do_not_answer_are_a_ledger_error_naming_them() -> None:
    started = time.monotonic()
    with (
        _unreachable(2.0) as seq,
        pytest.raises(LedgerError, match=r"cannot list the topics on 127\.0\.0\.1:1 within 2 s .*reachable"),
    ):
        seq.run()
    assert time.monotonic() - started < 10


def test_a_stop_while_the_brokers_do_not_answer_ends_the_start_up_at_once() -> None:
    seq = _unreachable(20.0)
    stopper = threading.Timer(1.5, seq.stop)
    stopper.start()
    started = time.monotonic()
    try:
        with seq:
            stats = seq.run()
    finally:
        stopper.cancel()
    took = time.monotonic() - started
    assert took < 1.5 + 2 * ledger_kafka.METADATA_ATTEMPT_S + 1.0, took  # the attempt under way, then out
    assert stats.requests == 0 and not seq.active
