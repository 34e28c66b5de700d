"""The views one manager process shares between its planner and its workers, and committed-only
superseded versions.

`Views` holds the result cache, the ledger index, the current sources and the output index behind
one lock: catching up and executing a unit happen under it (the GIL serialises Python work anyway;
worker threads still overlap their Kafka round trips: fetches, transactions).

Superseded versions (`ResultCache.supersede` / `latest`) decide what a later plan reads for a
corrected intermediate, so they must only ever say what was committed: a worker killed after its
executor superseded a node but before its transaction committed would otherwise leave a correction
nobody published, and the replay (or another plan) would read it. `CommittedCache` therefore holds
the executor's `supersede` calls back while a unit runs (`begin` / `staged`) and writes them only
after the unit's transaction committed (`commit`); a crash or an abort drops them. `SupersededIndex`
learns the corrections other replicas committed by reading the priority topics (read_committed): a
record there carries its new node (provenance header) and the coordinates of the record it replaces
(`streamprov.supersedes`), which the output index maps back to the original node. When two
corrections of one node are seen, the later record timestamp wins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException, Message

from recompute_manager.cache import ResultCache
from recompute_manager.executor import SUPERSEDES_HEADER
from recompute_manager.outputs import OutputIndex, SourceIndex, TopicReader
from recompute_manager.planner import Coordinates
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader, now_ms
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader
from streamprov.ledger.model import DataRef

__all__ = ["CommittedCache", "SupersededIndex", "Views"]

log = logging.getLogger(__name__)

Staged = list[tuple[DataRef, DataRef, bytes]]


class CommittedCache(ResultCache):
    """A `ResultCache` whose superseded versions are only ever committed ones (see the module docs).

    Between `begin()` and `staged()` the executor's `supersede` calls are collected, not written;
    `commit(staged)` writes them once the unit's transaction committed. Outside a unit (no `begin`)
    `supersede` writes at once, as the plain cache does. `latest` / `header` read committed state
    only: a unit's own tasks never read a node their unit supersedes as a stored input (the planner
    makes such an input a task output), so a replay reads exactly what the first attempt read.
    Results and values by content are written at once: they are facts about deterministic inputs,
    and only make a replay cheaper.
    """

    def __init__(self, path: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._staged: Staged | None = None
        self._seen_ms: dict[DataRef, int] = {}

    def begin(self) -> None:
        self._staged = []

    def staged(self) -> Staged:
        """End the unit: the supersede calls it made, for `commit` after its transaction."""
        out, self._staged = self._staged or [], None
        return out

    def supersede(self, old: DataRef, new: DataRef, header: bytes) -> None:
        if self._staged is not None:
            self._staged.append((old, new, header))
        else:
            self.record(old, new, header, now_ms())

    def commit(self, staged: Staged) -> None:
        at = now_ms()
        for old, new, header in staged:
            self.record(old, new, header, at)

    def record(self, old: DataRef, new: DataRef, header: bytes, at_ms: int) -> bool:
        """Write `old -> new` unless a later correction of `old` is known; True when written."""
        if self._seen_ms.get(old, -1) > at_ms:
            return False
        self._seen_ms[old] = at_ms
        ResultCache.supersede(self, old, new, header)
        return True


def _coordinates(raw: bytes) -> Coordinates | None:
    try:
        topic, partition, offset = raw.decode("utf-8").rsplit("/", 2)
        return Coordinates(topic, int(partition), int(offset))
    except ValueError:
        return None


class SupersededIndex:
    """Committed corrections read back from the priority topics into the cache's superseded versions.

    Priority topics that do not exist yet are looked for again at most every `recheck_s`.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Iterable[str],
        cache: CommittedCache,
        outputs: OutputIndex,
        *,
        recheck_s: float = 10.0,
    ) -> None:
        self.config = dict(config)
        self.cache = cache
        self.outputs = outputs
        self.recheck_s = recheck_s
        self._readers: list[TopicReader] = []
        self._missing = list(dict.fromkeys(topics))
        self._checked = float("-inf")
        self._by_coordinates: dict[Coordinates, DataRef] = {}
        self._indexed = -1
        self.corrections = 0

    def _open_missing(self) -> None:
        if not self._missing or time.monotonic() - self._checked < self.recheck_s:
            return
        self._checked = time.monotonic()
        still: list[str] = []
        for topic in self._missing:
            try:
                self._readers.append(TopicReader(self.config, [topic]))
            except (StreamprovError, KafkaException):
                still.append(topic)
        if still and len(still) != len(self._missing):
            log.info("priority topics not there yet: %s", ", ".join(still))
        self._missing = still

    def _original(self, at: Coordinates) -> DataRef | None:
        node = self._by_coordinates.get(at)
        if node is None and len(self.outputs.locations) != self._indexed:
            self._by_coordinates = {c: n for n, c in self.outputs.locations.items()}
            self._indexed = len(self.outputs.locations)
            node = self._by_coordinates.get(at)
        return node

    def catch_up(self, *, max_wait_s: float = 30.0) -> int:
        self._open_missing()
        n = 0
        for reader in self._readers:
            for msg in reader.catch_up(max_wait_s=max_wait_s):
                n += self.add(msg)
        return n

    def add(self, msg: Message) -> int:
        raw = msg.headers() or []
        headers = dict(raw.items()) if isinstance(raw, dict) else dict(raw)
        at = headers.get(SUPERSEDES_HEADER)
        value = msg.value()
        if at is None or value is None:
            return 0
        try:
            header = ProvenanceHeader.from_headers(list(headers.items()))
        except HeaderError:
            return 0
        where = _coordinates(at if isinstance(at, bytes) else str(at).encode())
        old = None if where is None or header is None else self._original(where)
        if old is None or header is None:
            return 0
        new = DataRef(header.data_id, header.checksum)
        self.cache.put_value(new, value)
        _kind, ts = msg.timestamp()
        if self.cache.record(old, new, header.encode(), ts):
            self.corrections += 1
        return 1

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class Views:
    """Cache, ledger index, sources, outputs and committed corrections of one process, one lock."""

    def __init__(
        self,
        kafka: Mapping[str, Any],
        state_dir: Any,
        *,
        ledger_id: str,
        ledger_topic: str,
        ledger_idle_s: float,
        sources: Sequence[str],
        outputs: Sequence[str],
        priority_topics: Sequence[str],
    ) -> None:
        self.kafka = dict(kafka)
        self.lock = threading.RLock()
        self.ledger_topic = ledger_topic
        self.ledger_idle_s = ledger_idle_s
        self.cache = CommittedCache(state_dir / "cache")
        self.index = LedgerIndex(state_dir / "ledger-index", ledger_id)
        self.outputs = OutputIndex(self.kafka, outputs, cache=self.cache)
        self.sources = SourceIndex(self.kafka, sources)
        self.superseded = SupersededIndex(self.kafka, priority_topics, self.cache, self.outputs)

    def for_planning(self) -> None:
        """Ledger and output coordinates up to now (call with the lock held)."""
        reader = KafkaLedgerReader(self.kafka, self.ledger_topic, idle_timeout_s=self.ledger_idle_s)
        self.index.catch_up(reader)
        self.outputs.catch_up()

    def for_execution(self) -> None:
        """Sources, outputs (values, headers) and committed corrections up to now (lock held): at least
        what the planner saw when it planned any unit consumed before this call."""
        self.sources.catch_up()
        self.outputs.catch_up()
        self.superseded.catch_up()

    def close(self) -> None:
        for closer in (self.outputs.close, self.sources.close, self.superseded.close):
            try:
                closer()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing: %s", exc)
        self.index.close()
        self.cache.close()
