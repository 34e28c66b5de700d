"""What faust-streaming delivers to the agents: seek their partitions again after a recovery, and
report the records it did not deliver.

faust-streaming 0.15.3 ends a recovery (`Recovery.on_recovery_completed`) by resuming the stream
partitions, seeking them to their committed offsets (`Consumer.perform_seek`), then calling
`flow_control.resume()`, which clears every agent's queue. The fetcher runs during the seek when
the worker restored tables (it was started to read the changelogs) and flow is already active, so
records fetched while the seek waits on the broker reach the agents' queues and are then cleared.

* A partition with a committed offset is sought back to it, and its cleared records are read
  again. aiokafka seeks one partition after another, awaiting each one's committed offset, so a
  partition sought early can still lose records fetched while a later one is looked up.
* A partition without one (None, or 0: aiokafka's ``seek_to_committed`` only seeks offsets > 0) is
  not sought at all: its cleared records are never delivered. That is a worker restarted before its
  first commit, e.g. after a crash: a map agent skipped source records and a reduce agent left
  records out of its windows (seen in this project's CI, and in 2 of 40 restart tests under load).

`SeekAgain` wraps the app consumer's ``seek_to_committed`` (installed when the first recovery
completes, which is before its seek; faust also calls it when a fetch finds the flow stopped, during
a revocation) to seek the agents' source partitions once more, back to back at the end: each to the
first record an agent has not taken yet (`DeliveryWatch`), so records taken during the seek are not
handed again (with several agents on a topic: the slowest one's); else to its committed offset;
else to its first offset, looked up before faust's seek (when ``consumer_auto_offset_reset`` is
"earliest", faust's default; with "latest" a worker starts at the end anyway).

Not covered by the seek: the fetcher still delivering a batch when the queues are cleared. The
rest of that batch is delivered after the clear, faust's read offset (`Consumer._read_offset`) moves
past the cleared records, and faust drops them as already read when they are fetched again (faust's
own race for partitions with a committed offset too: faust-streaming issue 596, open, "a race
condition in recovery causes unrecoverable gaps in acked offsets"). `DeliveryWatch` sees the gap in
the records an agent is handed; the agent reads the missing offsets back from Kafka with a consumer
of its own and processes them before the record that revealed the gap, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

FIRST_OFFSETS_TIMEOUT_S = 5.0
"""How long `SeekAgain` waits for the source partitions' first offsets (inside faust's seek)."""
INSTALLED = "_streamprov_seek_again"
"""Attribute set on the consumer once its ``seek_to_committed`` is wrapped."""


class DeliveryWatch:
    """Per agent and source partition, the offset of the next record it should be handed: the one
    after the last it took, else where `SeekAgain` sought. A record past it means the records in
    between were not delivered. Transaction markers and compaction leave such gaps on purpose;
    otherwise faust dropped records. Logged as a warning at most once per `report_every_s` per agent
    and partition, and counted (`gaps`).

    The gap an agent meets on its first record after a seek is the race above (faust drops records
    only there): `delivered` returns it, and the agent reads those offsets back from Kafka itself.
    Later gaps (markers, compaction) are only reported: reading each back would cost a consumer per
    transaction of a transactional input."""

    def __init__(self, report_every_s: float = 60.0) -> None:
        self.report_every_s = report_every_s
        self.gaps = 0
        self.read_back = 0
        """Records the agents read back from Kafka after a gap (`ProvenanceAgents._missed`)."""
        self._agents: dict[str, set[str]] = {}
        self._next: dict[tuple[str, str, int], int] = {}
        self._reported: dict[tuple[str, str, int], float] = {}
        self._unreported: dict[tuple[str, str, int], tuple[int, int]] = {}
        self._after_seek: set[tuple[str, str, int]] = set()

    def agent(self, name: str, topic: str) -> None:
        """Agent `name` consumes `topic`."""
        self._agents.setdefault(topic, set()).add(name)

    def topics(self) -> set[str]:
        return set(self._agents)

    def resume_at(self, topic: str, partition: int) -> int | None:
        """The first record of the partition some agent has not taken yet; None when an agent of the
        topic has taken none (since the start, or since the partition was revoked)."""
        nexts = [self._next.get((name, topic, partition)) for name in self._agents.get(topic, ())]
        if not nexts or any(n is None for n in nexts):
            return None
        return min(n for n in nexts if n is not None)

    def sought(self, topic: str, partition: int, offset: int) -> None:
        """The partition was sought to `offset`: an agent that took nothing yet expects it next (one
        that did expects the record after its last, or one it already had again)."""
        for name in self._agents.get(topic, ()):
            self._next.setdefault((name, topic, partition), offset)
            self._after_seek.add((name, topic, partition))

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Revoked partitions: where they resume is not known here."""
        gone = set(partitions)
        for key in [k for k in self._next if (k[1], k[2]) in gone]:
            del self._next[key]
        self._after_seek = {k for k in self._after_seek if (k[1], k[2]) not in gone}

    def delivered(
        self, name: str, topic: str, partition: int, offset: int, *, rebalancing: bool = False
    ) -> tuple[int, int] | None:
        """Agent `name` was handed this record: the offsets it missed right before it (start, end)
        when it is the first record after a seek, else None. A record handed while faust is still
        `rebalancing` (between the seek and the clear) does not count as that first record: the gap
        the clear makes comes after it."""
        key = (name, topic, partition)
        expected = self._next.get(key)
        self._next[key] = offset + 1
        after_seek = key in self._after_seek
        if not rebalancing:
            self._after_seek.discard(key)
        if expected is None or offset <= expected:
            return None
        self._report(key, expected, offset)
        if after_seek:
            self._after_seek.discard(key)
            return (expected, offset)
        return None

    def _report(self, key: tuple[str, str, int], expected: int, offset: int) -> None:
        name, topic, partition = key
        self.gaps += 1
        gaps, missing = self._unreported.pop(key, (0, 0))
        gaps, missing = gaps + 1, missing + offset - expected
        now = time.monotonic()
        if now - self._reported.get(key, float("-inf")) < self.report_every_s:
            self._unreported[key] = (gaps, missing)
            return
        self._reported[key] = now
        logger.warning(
            "agent %s: offsets %d to %d of %s/%d were not delivered (%d gap(s), %d offset(s) since the "
            "last report): transaction markers or compacted records leave such gaps; otherwise "
            "faust-streaming dropped those records (its issue 596)",
            name,
            expected,
            offset - 1,
            topic,
            partition,
            gaps,
            missing,
        )


class SeekAgain:
    """Installs the wrapper on `app`'s consumer, for the source partitions of the agents `watch` knows."""

    def __init__(self, app: Any, watch: DeliveryWatch) -> None:
        self.app = app
        self.watch = watch
        app.on_rebalance_complete.connect(self._install)

    async def _install(self, sender: Any, **_: Any) -> None:
        consumer = self.app.consumer
        if getattr(consumer, INSTALLED, False):
            return
        original = consumer.seek_to_committed

        async def seek_to_committed() -> Mapping[Any, int | None]:
            sources = self.watch.topics()
            ours = sorted(tp for tp in consumer.assignment() if tp.topic in sources)
            try:  # inside faust's bounded wait for the seek: a slow broker must not use it up
                earliest = await asyncio.wait_for(
                    self._first_offsets(consumer, ours), FIRST_OFFSETS_TIMEOUT_S
                )
            except TimeoutError:
                logger.warning("the first offsets of the source partitions were not read in time")
                earliest = {}
            committed: Mapping[Any, int | None] = await original()
            await self.seek(consumer, ours, committed, earliest)
            return committed

        consumer.seek_to_committed = seek_to_committed
        setattr(consumer, INSTALLED, True)

    @staticmethod
    async def _first_offsets(consumer: Any, partitions: list[Any]) -> Mapping[Any, int]:
        """Each partition's first offset; none when they cannot be read (faust's seek still runs)."""
        if not partitions:
            return {}
        try:
            offsets: Mapping[Any, int] = await consumer.earliest_offsets(*partitions)
        except Exception as exc:  # a broker hiccup must not crash the recovery it is part of
            logger.warning(
                "could not read the first offsets of %d source partition(s), so those without a "
                "committed offset are only sought by faust (records fetched during its seek may be "
                "skipped): %r",
                len(partitions),
                exc,
            )
            return {}
        return offsets

    async def seek(
        self,
        consumer: Any,
        partitions: Iterable[Any],
        committed: Mapping[Any, int | None],
        earliest: Mapping[Any, int],
    ) -> None:
        """Seek `partitions` once more, back to back (faust's `Consumer.seek` does not yield), as
        close to faust's clear as this code gets: a couple of event-loop turns still pass before it,
        in which the fetcher may deliver what `DeliveryWatch` then finds missing. Each to the first
        record an agent has not taken yet (`DeliveryWatch.resume_at`; with several agents on a topic,
        the slowest one's: the others are handed some records again), else its committed offset,
        else its first offset (looked up before faust's seek)."""
        sought = []
        for tp in partitions:
            offset, where = self.watch.resume_at(tp.topic, tp.partition), "next not taken"
            if offset is None:
                offset, where = committed.get(tp), "committed"
            if not offset:
                if self.app.conf.consumer_auto_offset_reset != "earliest" or tp not in earliest:
                    continue  # "latest": the position is the end whatever was fetched
                offset, where = earliest[tp], "first"
            await consumer.seek(tp, offset)
            self.watch.sought(tp.topic, tp.partition, offset)
            sought.append(f"{tp.topic}/{tp.partition}@{offset} ({where})")
        if sought:
            logger.info("source partitions sought again after faust's seek: %s", ", ".join(sought))
