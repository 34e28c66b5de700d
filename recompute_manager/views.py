"""The views one manager process shares between its planner and its workers, and committed-only
superseded versions.

`Views` holds the result cache, the ledger index, the current sources and the output index behind
one lock, held to catch up, to plan and to record corrections. Units execute outside it, each
worker with its own `Executor`: they only look values up (dict reads, RocksDB gets), which a
concurrent catch-up does not tear; a unit may then see source values newer than its planner saw,
never older. Threads run I/O-bound functions in parallel; CPU-bound ones share the GIL.

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
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient

from recompute_manager.cache import ResultCache
from recompute_manager.executor import SUPERSEDES_HEADER, TASK_HEADER
from recompute_manager.outputs import READER_GROUP, OutputIndex, SourceIndex, TopicReader
from recompute_manager.planner import Coordinates, PlanError, RecomputeTask
from recompute_manager.summary import SummaryKeeper
from streamprov.agents.dead_letter import SOURCE_HEADER
from streamprov.agents.kafka_io import TopicMissingError, list_all_topics
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader, now_ms
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader
from streamprov.ledger.model import DataRef, LedgerEntry
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.lineage import Step

__all__ = ["CommittedCache", "DeadTaskIndex", "StateError", "SupersededIndex", "Views"]

log = logging.getLogger(__name__)

Staged = list[tuple[DataRef, DataRef, bytes]]
CATCH_UP_LOG_EVERY_S = 10.0
"""A ledger catch-up longer than this logs its progress this often."""
MAX_FRESH_PLANS = 10_000
"""Plans whose units run without another catch-up (see `Views.for_execution`), most recent kept."""


class StateError(StreamprovError):
    """The state dir cannot be opened: each replica needs its own (RocksDB holds a lock on it)."""


class CommittedCache(ResultCache):
    """A `ResultCache` whose superseded versions are only ever committed ones (see the module docs).

    Between `begin()` and `staged()` (per thread: each worker runs its own unit) the executor's
    `supersede` calls are collected, not written; `commit(staged)` writes them once the unit's
    transaction committed. Outside a unit (no `begin`) `supersede` writes at once, as the plain cache
    does. `latest` / `header` read committed state only: a unit's own tasks never read a node their
    unit supersedes as a stored input (the planner makes such an input a task output), so a replay
    reads what the first attempt read. Results and values by content are written at once: they are
    facts about deterministic inputs, and only make a replay cheaper.
    """

    def __init__(self, path: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._unit = threading.local()
        self._seen_ms: dict[DataRef, int] = {}

    def __enter__(self) -> CommittedCache:
        return self

    def begin(self) -> None:
        self._unit.staged = []

    def staged(self) -> Staged:
        """End this thread's unit: the supersede calls it made, for `commit` after its transaction."""
        out: Staged = getattr(self._unit, "staged", None) or []
        self._unit.staged = None
        return out

    def supersede(self, old: DataRef, new: DataRef, header: bytes, *, current: bool = True) -> None:
        """`current` is decided when it is recorded (`record`: unless a later correction of `new`
        is known)."""
        staged: Staged | None = getattr(self._unit, "staged", None)
        if staged is not None:
            staged.append((old, new, header))
        else:
            self.record(old, new, header, now_ms())

    def commit(self, staged: Staged) -> None:
        at = now_ms()
        for old, new, header in staged:
            self.record(old, new, header, at)

    def record(self, old: DataRef, new: DataRef, header: bytes, at_ms: int) -> bool:
        """Write `old -> new` unless a later correction of `old` is known; True when written. The
        same node again (a recompute made the same bytes) only keeps the header it stamped: not a
        correction, so it does not hold back one learned later with an earlier timestamp. Either
        makes `new` current again (drops a link from it) unless a later correction of it is known."""
        current = self._seen_ms.get(new, -1) <= at_ms
        if old == new:
            ResultCache.supersede(self, old, new, header, current=current)
            return False
        if self._seen_ms.get(old, -1) > at_ms:
            return False
        self._seen_ms[old] = at_ms
        ResultCache.supersede(self, old, new, header, current=current)
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
        self._admin_client: AdminClient | None = None
        self.corrections = 0
        self.locations: dict[DataRef, Coordinates] = {}
        """Each corrected node -> the original record it replaces (its `streamprov.supersedes`): a
        plan that recomputes a correction again publishes to that record's topic."""

    def _open_missing(self) -> None:
        if not self._missing or time.monotonic() - self._checked < self.recheck_s:
            return
        self._checked = time.monotonic()
        topics = list_all_topics(self._admin(), 10)  # naming a topic in the request may create it
        found: list[str] = []
        for topic in self._missing:
            meta = topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                found.append(topic)
        if found:
            self._readers.append(
                TopicReader(self.config, found, group_id=READER_GROUP)
            )  # one consumer for all
        self._missing = [t for t in self._missing if t not in found]
        if self._missing:
            log.info("priority topics not there yet: %s", ", ".join(self._missing))

    def _admin(self) -> AdminClient:
        if self._admin_client is None:
            self._admin_client = AdminClient(self.config)
        return self._admin_client

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
        if where is None or header is None:
            return 0
        old = self._original(where)
        if old is None:
            return 0
        new = DataRef(header.data_id, header.checksum)
        self.locations[new] = where
        self.cache.put_value(new, value)
        _kind, ts = msg.timestamp()
        if self.cache.record(old, new, header.encode(), ts):
            self.corrections += 1
        return 1

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class DeadTaskIndex:
    """Task dead letters committed by any replica, read back from the dead-letter topic into the
    cache's dead marks (`ResultCache.mark_dead`): a part of a plan that reads an earlier part's output
    must know that part dead-lettered it, even when another replica ran it, or this one crashed
    between its commit and marking it. A record counts when it is what `DeadLetter` publishes: its
    source `recompute/...` and a value that decodes as the task its task header names."""

    def __init__(
        self, config: Mapping[str, Any], topic: str, cache: ResultCache, *, recheck_s: float = 10.0
    ) -> None:
        self.config = dict(config)
        self.topic = topic
        self.cache = cache
        self.recheck_s = recheck_s
        self._reader: TopicReader | None = None
        self._checked = float("-inf")
        self.dead = 0

    def _open(self) -> TopicReader | None:
        """The reader; None while the topic does not exist (no dead letters yet), looked for again
        at most every `recheck_s`."""
        if self._reader is None and time.monotonic() - self._checked >= self.recheck_s:
            self._checked = time.monotonic()
            try:
                self._reader = TopicReader(self.config, [self.topic], group_id=READER_GROUP)
            except TopicMissingError:
                log.info("dead-letter topic %s not there yet", self.topic)
        return self._reader

    def catch_up(self, *, max_wait_s: float = 30.0) -> int:
        reader = self._open()
        if reader is None:
            return 0
        found: list[str] = []
        for msg in reader.catch_up(max_wait_s=max_wait_s):
            task_id = _dead_task(msg)
            if task_id is not None:
                found.append(task_id)
        if found:
            self.cache.mark_dead(found)
            self.dead += len(found)
        return len(found)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _dead_task(msg: Message) -> str | None:
    headers = dict(msg.headers() or [])
    task_id, source = headers.get(TASK_HEADER), headers.get(SOURCE_HEADER)
    if not isinstance(task_id, bytes) or not (isinstance(source, bytes) and source.startswith(b"recompute/")):
        return None
    try:
        task = RecomputeTask.decode(msg.value() or b"")
    except PlanError:
        return None
    return task.task_id if task.task_id.encode("ascii") == task_id else None


class LockedLedger:
    """The views' ledger index for a worker expanding a delta task (`Executor(ledger=)`): each read
    under the views lock (the index has one owner at a time; the planner catches it up)."""

    def __init__(self, views: Views) -> None:
        self._views = views

    def entry(self, entry_id: bytes) -> LedgerEntry:
        with self._views.lock:
            return self._views.index.entry(entry_id)

    def sources_among(self, nodes: Sequence[DataRef]) -> list[bool]:
        with self._views.lock:
            return self._views.index.sources_among(nodes)


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
        verifier: CheckpointVerifier | None = None,
        dead_letters: str | None = None,
        summarise: Callable[[Step], bool] | None = None,
    ) -> None:
        """`verifier`: checks the ledger's checkpoint signatures as the index reads them.
        `dead_letters`: the topic the workers dead-letter tasks to (`DeadTaskIndex`). `summarise`:
        which reduce steps' outputs to summarise (`SummaryKeeper`; None: all)."""
        self.kafka = dict(kafka)
        self.lock = threading.RLock()
        self.ledger_topic = ledger_topic
        self.ledger_idle_s = ledger_idle_s
        self._fresh: OrderedDict[str, None] = OrderedDict()
        hint = f"in {state_dir} cannot be opened (another manager on this state dir?)"
        try:
            self.cache = CommittedCache(state_dir / "cache")
        except Exception as exc:  # rocksdict raises plain Exceptions (a held LOCK among them)
            raise StateError(f"result cache {hint}: {exc}") from exc
        try:
            self.index = LedgerIndex(state_dir / "ledger-index", ledger_id, verifier=verifier)
        except Exception as exc:
            self.cache.close()
            raise StateError(f"ledger index {hint}: {exc}") from exc
        readers: list[OutputIndex | SourceIndex] = []
        try:
            self.summaries = SummaryKeeper(self.cache, summarise)
            self.outputs = OutputIndex(self.kafka, outputs, cache=self.cache, summaries=self.summaries)
            readers.append(self.outputs)
            self.sources = SourceIndex(self.kafka, sources)
            readers.append(self.sources)
            self.superseded = SupersededIndex(self.kafka, priority_topics, self.cache, self.outputs)
            self.dead_tasks = (
                None if dead_letters is None else DeadTaskIndex(self.kafka, dead_letters, self.cache)
            )
        except BaseException:
            for r in readers:
                r.close()
            self.index.close()
            self.cache.close()
            raise

    def for_planning(self, beat: Callable[[], None] | None = None) -> None:
        """Ledger, output coordinates and sources up to now (call with the lock held).

        `beat()` after each batch of the ledger catch-up: indexing a large ledger (the first start,
        or a long pause) takes minutes on the planner's thread, whose liveness probe would otherwise
        report it dead after 120 s. A catch-up that long logs its progress."""
        reader = KafkaLedgerReader(self.kafka, self.ledger_topic, idle_timeout_s=self.ledger_idle_s)
        started = last_log = time.monotonic()

        def progress(applied: int) -> None:
            nonlocal last_log
            if beat is not None:
                beat()
            if time.monotonic() - last_log >= CATCH_UP_LOG_EVERY_S:
                last_log = time.monotonic()
                log.info(
                    "ledger index: %d records indexed in %.0f s, catching up", applied, last_log - started
                )

        applied = self.index.catch_up(reader, on_progress=progress)
        if time.monotonic() - started >= CATCH_UP_LOG_EVERY_S:
            log.info("ledger index: caught up, %d records in %.0f s", applied, time.monotonic() - started)
        self.outputs.catch_up()
        self.sources.catch_up()
        self.superseded.catch_up()
        self.summaries.keep(self.index, self.outputs.headers)

    @property
    def locations(self) -> Mapping[DataRef, Coordinates]:
        """Where the record each output node stands for sits, for a plan's `supersedes`: an original
        output's own coordinates, a correction's the original record's it replaces. Without the
        second, a correction recomputed again had no topic and was published to `.priority`."""
        return ChainMap(self.outputs.locations, self.superseded.locations)

    def for_execution(self, plan_id: str) -> bool:
        """Make the views fit to run a unit of `plan_id` (lock held); True when it caught up.

        A unit needs at least what its planner saw, and the corrections committed before it by units
        of the same key. Catching up once after consuming one of a plan's units gives the first for
        all its units (they were committed together, after the planner's reads); the second holds
        for same-key units committed by this process (`CommittedCache.commit`) and, after a catch-up,
        by anyone: `forget_fresh()` on every rebalance, since a partition that moved here may carry
        units another replica ran. A plan planned here is fresh from the start (`mark_fresh`).
        """
        if plan_id in self._fresh:
            self._fresh.move_to_end(plan_id)
            return False
        self.sources.catch_up()
        self.outputs.catch_up()
        self.superseded.catch_up()
        if self.dead_tasks is not None:
            self.dead_tasks.catch_up()
        self.mark_fresh(plan_id)
        return True

    def mark_fresh(self, plan_id: str) -> None:
        self._fresh[plan_id] = None
        while len(self._fresh) > MAX_FRESH_PLANS:
            self._fresh.popitem(last=False)

    def forget_fresh(self) -> None:
        self._fresh.clear()

    def close(self) -> None:
        closers = [self.outputs.close, self.sources.close, self.superseded.close]
        if self.dead_tasks is not None:
            closers.append(self.dead_tasks.close)
        for closer in closers:
            try:
                closer()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing: %s", exc)
        self.index.close()
        self.cache.close()
