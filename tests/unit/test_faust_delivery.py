"""SeekAgain against a stand-in faust consumer: which partitions it seeks, where, and when.

The faust behaviour it works around (queues cleared after the seek at the end of a recovery) is
exercised on Kafka by tests/integration/test_faust_agents.py; here only the wrapper's decisions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest

from streamprov.agents.faust_delivery import DeliveryWatch, SeekAgain


class TP(NamedTuple):
    topic: str
    partition: int


class Signal:
    def __init__(self) -> None:
        self.handlers: list[Callable[..., Any]] = []

    def connect(self, handler: Callable[..., Any]) -> None:
        self.handlers.append(handler)

    async def send(self) -> None:
        for handler in self.handlers:
            await handler(self)


class Consumer:
    """Records what is called, in order."""

    def __init__(self, committed: Mapping[TP, int | None], earliest: Mapping[TP, int]) -> None:
        self.committed = dict(committed)
        self.earliest = dict(earliest)
        self.calls: list[tuple[Any, ...]] = []

    def assignment(self) -> set[TP]:
        return set(self.committed)

    async def earliest_offsets(self, *tps: TP) -> Mapping[TP, int]:
        self.calls.append(("earliest", tps))
        return {tp: self.earliest[tp] for tp in tps if tp in self.earliest}

    async def seek_to_committed(self) -> Mapping[TP, int | None]:
        self.calls.append(("faust seek",))
        return dict(self.committed)

    async def seek(self, tp: TP, offset: int) -> None:
        self.calls.append(("seek", tp, offset))


SRC0, SRC1, SRC2 = TP("src", 0), TP("src", 1), TP("src", 2)
CHANGELOG, OTHER = TP("app-table-changelog", 0), TP("other", 0)


def installed(consumer: Consumer, reset: str = "earliest", watch: DeliveryWatch | None = None) -> Consumer:
    app = SimpleNamespace(
        consumer=consumer,
        on_rebalance_complete=Signal(),
        conf=SimpleNamespace(consumer_auto_offset_reset=reset),
    )
    if watch is None:
        watch = DeliveryWatch()
        watch.agent("scale", "src")
    SeekAgain(app, watch)
    for _ in range(2):  # every recovery sends the signal; the wrapper goes on once
        asyncio.run(app.on_rebalance_complete.send())
    return consumer


def test_agent_partitions_are_sought_again_after_fausts_seek() -> None:
    consumer = installed(
        Consumer(
            committed={SRC0: None, SRC1: 42, SRC2: 0, CHANGELOG: 7, OTHER: None},
            earliest={SRC0: 3, SRC1: 0, SRC2: 5},
        )
    )
    committed = asyncio.run(consumer.seek_to_committed())

    assert committed == consumer.committed  # faust still gets its own result
    assert consumer.calls == [
        ("earliest", (SRC0, SRC1, SRC2)),  # looked up first: nothing awaits after the seeks
        ("faust seek",),
        ("seek", SRC0, 3),  # no committed offset: its first offset
        ("seek", SRC1, 42),  # committed: there again, after every other lookup
        ("seek", SRC2, 5),  # committed 0 is not sought by aiokafka either
    ]


def test_latest_reset_leaves_uncommitted_partitions_alone() -> None:
    consumer = installed(
        Consumer(committed={SRC0: None, SRC1: 42}, earliest={SRC0: 3, SRC1: 0}), reset="latest"
    )
    asyncio.run(consumer.seek_to_committed())
    assert [c for c in consumer.calls if c[0] == "seek"] == [("seek", SRC1, 42)]


def test_no_agent_partition_assigned_looks_nothing_up() -> None:
    consumer = installed(Consumer(committed={OTHER: None, CHANGELOG: 1}, earliest={}))
    asyncio.run(consumer.seek_to_committed())
    assert consumer.calls == [("faust seek",)]


def test_a_partition_whose_first_offset_was_not_returned_is_left_to_faust() -> None:
    consumer = installed(Consumer(committed={SRC0: None, SRC1: 9}, earliest={SRC1: 0}))
    asyncio.run(consumer.seek_to_committed())
    assert consumer.calls[-2:] == [("faust seek",), ("seek", SRC1, 9)]


def test_first_offsets_that_cannot_be_read_leave_uncommitted_partitions_to_faust(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unreachable(Consumer):
        async def earliest_offsets(self, *tps: TP) -> Mapping[TP, int]:
            raise ConnectionError("broker gone")

    consumer = installed(Unreachable(committed={SRC0: None, SRC1: 9}, earliest={}))
    assert asyncio.run(consumer.seek_to_committed()) == {SRC0: None, SRC1: 9}
    assert consumer.calls == [("faust seek",), ("seek", SRC1, 9)]
    assert "could not read the first offsets of 2 source partition(s)" in caplog.text


def test_records_the_agents_took_during_the_seek_are_not_sought_again() -> None:
    """Sought to the first offset (or the committed one), a partition whose records the agents took
    while faust sought had them processed twice: map outputs again, which a reduce then found late."""
    watch = DeliveryWatch()
    watch.agent("scale", "src")
    watch.agent("audit", "src")
    for offset in range(7):  # during the seek: both agents took SRC0's records, one took SRC1's
        watch.delivered("scale", "src", 0, offset)
        watch.delivered("audit", "src", 0, max(0, offset - 2))
        watch.delivered("scale", "src", 1, offset)
    consumer = installed(
        Consumer(committed={SRC0: None, SRC1: 42, SRC2: None}, earliest={SRC0: 0, SRC1: 0, SRC2: 9}),
        watch=watch,
    )
    asyncio.run(consumer.seek_to_committed())
    assert [c for c in consumer.calls if c[0] == "seek"] == [
        ("seek", SRC0, 5),  # the first record one of its agents has not taken
        ("seek", SRC1, 42),  # "audit" took none of SRC1: as faust
        ("seek", SRC2, 9),
    ]
    assert watch.resume_at("src", 2) == 9  # both agents were told where it was sought
    watch.delivered("audit", "src", 2, 9)
    watch.delivered("scale", "src", 2, 9)
    assert watch.resume_at("src", 2) == 10 and watch.gaps == 0


def test_records_not_delivered_are_reported_with_their_offsets(caplog: pytest.LogCaptureFixture) -> None:
    watch = DeliveryWatch(report_every_s=3600)
    watch.agent("scale", "src")
    watch.agent("audit", "src")
    watch.sought("src", 0, 10)
    for offset in (10, 11, 11, 12):  # in order, and a record delivered again: no gap
        watch.delivered("scale", "src", 0, offset)
    assert watch.gaps == 0 and not caplog.records
    watch.delivered("scale", "src", 0, 15)  # 13 and 14 never came
    assert watch.gaps == 1
    assert "agent scale: offsets 13 to 14 of src/0 were not delivered (1 gap(s), 2 offset(s)" in caplog.text
    watch.delivered("scale", "src", 0, 20)  # within the report interval: counted, not logged
    assert watch.gaps == 2 and len(caplog.records) == 1
    watch.delivered("audit", "src", 0, 40)  # each agent has its own stream: sought to 10, then 40
    assert watch.gaps == 3 and "agent audit: offsets 10 to 39 of src/0" in caplog.text


def test_unreported_gaps_are_summed_into_the_next_report(caplog: pytest.LogCaptureFixture) -> None:
    watch = DeliveryWatch(report_every_s=0.0)
    watch.agent("scale", "src")
    watch.delivered("scale", "src", 1, 5)  # the first record seen: nothing to compare with
    watch.delivered("scale", "src", 1, 7)
    assert "offsets 6 to 6 of src/1 were not delivered (1 gap(s), 1 offset(s)" in caplog.text
    watch.report_every_s = 3600
    watch.delivered("scale", "src", 1, 9)
    watch.delivered("scale", "src", 1, 12)
    watch.report_every_s = 0.0
    watch.delivered("scale", "src", 1, 20)
    assert "offsets 13 to 19 of src/1 were not delivered (3 gap(s), 10 offset(s)" in caplog.text


def test_a_revoked_partition_is_forgotten() -> None:
    watch = DeliveryWatch()
    watch.agent("scale", "src")
    watch.delivered("scale", "src", 0, 5)
    watch.forget({("src", 0)})
    watch.delivered("scale", "src", 0, 50)  # resumed elsewhere meanwhile: not a gap
    assert watch.gaps == 0


def test_the_gap_on_the_first_record_after_a_seek_is_returned_for_reading_back() -> None:
    """faust drops records only at the end of a recovery: the agent reads that gap back from Kafka.
    Later gaps (transaction markers, compaction) are reported, not read: a consumer per transaction."""
    watch = DeliveryWatch()
    watch.agent("sum", "mapped")
    for offset in range(6):
        assert watch.delivered("sum", "mapped", 0, offset) is None
    watch.sought("mapped", 0, 3)  # sought back: it had taken up to 5, and expects 6
    assert watch.delivered("sum", "mapped", 0, 9) == (6, 9)  # 6 to 8 were cleared: read them back
    assert watch.delivered("sum", "mapped", 0, 11) is None  # a marker at 10: reported only
    assert watch.gaps == 2
    watch.sought("mapped", 0, 12)
    assert watch.delivered("sum", "mapped", 0, 12) is None  # as expected after the seek: no gap
    assert watch.delivered("sum", "mapped", 0, 14) is None  # the first record after it was the one


def test_records_handed_before_faust_clears_the_queues_keep_the_read_back_armed() -> None:
    """Between SeekAgain's seek and faust's clear the agent may still take a record or two; the gap
    the clear makes comes after them, and must still be read back."""
    watch = DeliveryWatch()
    watch.agent("scale", "src")
    watch.sought("src", 0, 100)
    assert watch.delivered("scale", "src", 0, 100, rebalancing=True) is None
    assert watch.delivered("scale", "src", 0, 101, rebalancing=True) is None
    assert watch.delivered("scale", "src", 0, 140) == (102, 140)  # after the clear: read back
    assert watch.delivered("scale", "src", 0, 150) is None  # once
