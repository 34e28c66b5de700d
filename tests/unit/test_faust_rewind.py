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

from streamprov.agents.faust_rewind import SeekAgain


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


def installed(consumer: Consumer, reset: str = "earliest") -> Consumer:
    app = SimpleNamespace(
        consumer=consumer,
        on_rebalance_complete=Signal(),
        conf=SimpleNamespace(consumer_auto_offset_reset=reset),
    )
    SeekAgain(app, lambda: {"src"})
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
