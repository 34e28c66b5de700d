"""Seek an agent's source partitions again at the end of faust's recovery, so no fetched record is lost.

faust-streaming 0.15.3 ends a recovery (`Recovery.on_recovery_completed`) by resuming the stream
partitions, seeking them to their committed offsets (`Consumer.perform_seek`), then calling
`flow_control.resume()`, which clears every agent's queue. The fetcher runs during the seek when
the worker restored tables (it was started to read the changelogs) and flow is already active, so
records fetched while the seek waits on the broker reach the agents' queues and are then cleared.

* A partition with a committed offset is seeked back to it, and its cleared records are read
  again. aiokafka seeks one partition after another, awaiting each one's committed offset, so a
  partition seeked early can still lose records fetched while a later one is looked up.
* A partition without one (None, or 0: aiokafka's ``seek_to_committed`` only seeks offsets > 0) is
  not seeked at all: its cleared records are never delivered. That is a worker restarted before its
  first commit, e.g. after a crash: a map agent skipped source records and a reduce agent left
  records out of its windows (seen in this project's CI, 1 run in about 30 under load).

`SeekAgain` wraps the app consumer's ``seek_to_committed`` (installed when the first recovery
completes, which is before its seek) to seek the agents' source partitions once more, back to back
at the end: those with a committed offset to it, the others to their first offset, looked up before
faust's seek (when ``consumer_auto_offset_reset`` is "earliest", faust's default; with "latest" a
worker starts at the end anyway). A record processed before the queues were cleared is processed
again: map outputs are at-least-once anyway, and a reduce skips a record it already folded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

INSTALLED = "_streamprov_seek_again"
"""Attribute set on the consumer once its ``seek_to_committed`` is wrapped."""


class SeekAgain:
    """Installs the wrapper on `app`'s consumer; `topics()` names the agents' source topics."""

    def __init__(self, app: Any, topics: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self.topics = topics
        app.on_rebalance_complete.connect(self._install)

    async def _install(self, sender: Any, **_: Any) -> None:
        consumer = self.app.consumer
        if getattr(consumer, INSTALLED, False):
            return
        original = consumer.seek_to_committed

        async def seek_to_committed() -> Mapping[Any, int | None]:
            sources = set(self.topics())
            ours = sorted(tp for tp in consumer.assignment() if tp.topic in sources)
            earliest = await self._first_offsets(consumer, ours)
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
        """Seek `partitions` once more, back to back: faust's `Consumer.seek` does not yield, so no
        record fetched after these seeks reaches a queue before faust clears them.

        The offsets are looked up before faust's own seek, for the same reason.
        """
        fresh = []
        for tp in partitions:
            offset = committed.get(tp)
            if not offset:
                if self.app.conf.consumer_auto_offset_reset != "earliest" or tp not in earliest:
                    continue  # "latest": the position is the end whatever was fetched
                offset = earliest[tp]
                fresh.append(f"{tp.topic}/{tp.partition}@{offset}")
            await consumer.seek(tp, offset)
        if fresh:
            logger.info(
                "source partition(s) without a committed offset sought to their first offset: %s",
                ", ".join(fresh),
            )
