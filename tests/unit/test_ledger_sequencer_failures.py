"""How the sequencer and its Kafka sink fail: without a broker (nothing here talks to Kafka).

A batch that keeps failing makes the sequencer not ready, then stop with an error naming what to
check, instead of replaying forever while reporting healthy; a full local queue while producing a
dead letter aborts the transaction and surfaces as a ledger write failure, not a crash."""

from __future__ import annotations

from typing import Any

import pytest

from streamprov.ledger.errors import LedgerError, LedgerWriteFailedError
from streamprov.ledger.kafka import KafkaLedgerSink
from streamprov.ledger.sequencer import FAILURES_NOT_READY, MAX_FAILURES, LedgerSequencer

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
