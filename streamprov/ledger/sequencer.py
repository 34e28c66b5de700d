"""The shared ledger sequencer: many processes send applications, one service chains them.

A hash chain has one order, so one ledger has one sequencer. `KafkaLedgerClient` (any number of
agent replicas or recompute workers) sends unsealed applications to a requests topic with ONE
partition; `LedgerSequencer` consumes it as a consumer group and, per batch, in ONE Kafka
transaction: seals the applications into chained entries (and signed checkpoints) on the ledger
topic, dead-letters what it cannot seal (undecodable request, request for another ledger) with the
reason, and commits the consumed offsets. So every request is sealed exactly once; a client replay
(same entry_id) is dropped as a duplicate by the chain.

Standby replicas: every replica joins the same group and only the member assigned the partition
seals; it starts its transactional producer (transactional.id per ledger) when assigned, which
fences a previous owner and aborts its open transaction, then resumes the chain from the ledger
topic's committed tail. A failed transaction is aborted, the chain reloaded and the consumer sent
back to its committed offset: nothing is lost or sealed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamprov.agents.dead_letter import dead_letter_headers, fit, source_of
from streamprov.agents.health import HttpEndpoints
from streamprov.agents.kafka_io import RebalanceEvents, kafka_error, record_limit_below
from streamprov.agents.lifecycle import ServiceState, close_probes, serve_probes, stall_limit
from streamprov.ledger.chain import DEFAULT_CHECKPOINT_EVERY, DEFAULT_DEDUP_WINDOW, LedgerChain
from streamprov.ledger.codec import encode_record, record_key
from streamprov.ledger.errors import ChainError, LedgerError, LedgerWriterError, MalformedRecordError
from streamprov.ledger.kafka import (
    ExtraRecord,
    KafkaLedgerSink,
    client_config,
    list_topics_within,
    single_partition,
    topic_metadata,
)
from streamprov.ledger.model import AppTemplate, Checkpoint
from streamprov.ledger.requests import LedgerRequest, decode_request
from streamprov.ledger.rows import RowSealer
from streamprov.ledger.signing import CheckpointSigner
from streamprov.ledger.writer import (
    DEFAULT_MAX_ENTRY_BYTES,
    approx_map_row_size,
    approx_size,
    template_size,
)

__all__ = ["LedgerSequencer", "SequencerStats"]

log = logging.getLogger(__name__)

MALFORMED_REQUEST = "malformed_request"
WRONG_LEDGER = "wrong_ledger"
ENTRY_TOO_LARGE = "entry_too_large"
"""A request with an application whose entry would not fit a ledger record (`max_entry_bytes`)."""
REWIND_ATTEMPTS = 5
FAILURES_NOT_READY = 3
"""Consecutive failed batches after which the sequencer reports not ready (with the last error)."""
MAX_FAILURES = 10
"""Consecutive failed batches after which it stops with an error: the same batch failing again and
again (a topic deleted, a request the broker refuses) needs someone to look; a restart resumes from
the committed offsets."""
UNASSIGNED_GRACE_S = 20.0
"""An idle timeout waits at least this long for the requests partition (joining the group, a
crashed predecessor's session timing out) before it counts as idle."""


@dataclass
class SequencerStats:
    requests: int = 0
    applications: int = 0
    entries: int = 0
    duplicates: int = 0
    checkpoints: int = 0
    dead_letters: int = 0
    transactions: int = 0
    recoveries: int = 0


class LedgerSequencer:
    """Use as a context manager; `run()` until `stop()` (safe from signal handlers)."""

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        *,
        requests_topic: str,
        ledger_topic: str,
        ledger_id: str,
        signer: CheckpointSigner | None,
        dead_letter_topic: str,
        group_id: str | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        batch_size: int = 500,
        poll_timeout_s: float = 0.5,
        timeout_s: float = 30.0,
        consumer_config: Mapping[str, Any] | None = None,
        http_host: str = "127.0.0.1",
        http_port: int | None = None,
    ) -> None:
        """`http_port`: `/healthz` and `/readyz` (None: not served, 0: any free port); a standby
        replica is ready too (it is consuming, waiting for the partition)."""
        self.config = client_config(config)
        self.requests_topic = requests_topic
        self.ledger_topic = ledger_topic
        self.ledger_id = ledger_id
        self.signer = signer
        self.dead_letter_topic = dead_letter_topic
        self.group_id = group_id or f"streamprov-ledger-sequencer.{ledger_id}"
        self.checkpoint_every = checkpoint_every
        self.dedup_window = dedup_window
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.timeout_s = timeout_s
        self.stats = SequencerStats()
        self.max_entry_bytes = DEFAULT_MAX_ENTRY_BYTES
        """The largest entry sealed; a larger application is dead-lettered as `entry_too_large`.
        `check_topics` lowers it to the ledger topic's `max.message.bytes` less framing."""
        self.state = ServiceState(stall_limit(timeout_s))
        self.http_host = http_host
        self.http_port = http_port
        self._http: list[HttpEndpoints] = []
        self._events = RebalanceEvents()
        self._assigned: set[tuple[str, int]] = set()
        self._failures = 0
        """Consecutive failed batches (`_failed`)."""
        self._sink: KafkaLedgerSink | None = None
        self._chain: LedgerChain | None = None
        self._sealer: RowSealer | None = None
        self._template_keys: dict[AppTemplate, int] = {}
        self._consumer = Consumer(
            {
                **self.config,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # a replacement (restart after a crash, or a standby) takes over after this long
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 2_000,
                **(consumer_config or {}),
            }
        )
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self.state.stop()

    @property
    def http_ports(self) -> list[int]:
        return [h.port for h in self._http]

    @property
    def active(self) -> bool:
        """Does this replica own the requests partition (and so seal)?"""
        return self._chain is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.closed = True
        self._final_checkpoint()
        self._deactivate()
        close_probes(self._http)
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the sequencer's consumer: %s", exc)

    def __enter__(self) -> LedgerSequencer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def check_topics(self) -> bool:
        """Refuse a requests topic with several partitions (two members would each seal a part) and a
        missing dead-letter topic (every transaction with a dead letter would fail), and brokers that
        do not answer within `timeout_s` (`LedgerError`). Stop-aware: False when stopped first."""
        topics = list_topics_within(self.config, self.timeout_s, pause=self.state.pause)
        if topics is None:
            return False
        single_partition(
            topic_metadata(topics, self.requests_topic, what="requests topic"),
            what="requests topic",
            why="a ledger sequencer needs exactly one (one order in, one chain out)",
        )
        topic_metadata(topics, self.dead_letter_topic, what="dead-letter topic")
        self._fit_ledger_topic()
        return True

    def _fit_ledger_topic(self) -> None:
        """The broker refuses a record over the ledger topic's `max.message.bytes`: an entry over it
        would fail its transaction on every retry and restart, so such an application is
        dead-lettered instead, as one over `DEFAULT_MAX_ENTRY_BYTES` is. Unreadable: the default."""
        lower = record_limit_below(
            self.config, self.ledger_topic, self.max_entry_bytes, timeout_s=self.timeout_s
        )
        if lower is not None:
            self.max_entry_bytes = lower
            log.info(
                "ledger topic %s takes records of at most %d bytes less framing (max.message.bytes): "
                "larger entries are dead-lettered as %s",
                self.ledger_topic,
                lower,
                ENTRY_TOO_LARGE,
            )

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, *, idle_timeout_s: float | None = None, max_requests: int | None = None) -> SequencerStats:
        """Seal requests until `stop()`, or until nothing arrived for `idle_timeout_s` (counted from
        start and from each assignment; at least `UNASSIGNED_GRACE_S` before the partition is ours;
        never while a batch read is not sealed: it is retried until `MAX_FAILURES`) or after
        `max_requests` requests (for tests and batch use)."""
        self.state.started = True
        self.state.beat()
        if not self._http:
            self._http = serve_probes(self.state, self.http_host, self.http_port)
        if not self.check_topics():  # stopped while the brokers did not answer yet
            log.info("ledger sequencer for %s: stopped while starting", self.ledger_id)
            return self.stats
        ev = self._events
        self._consumer.subscribe(
            [self.requests_topic], on_assign=ev.on_assign, on_revoke=ev.on_revoke, on_lost=ev.on_lost
        )
        self.state.set_ready("consuming (standby until the requests partition is assigned)")
        log.info("ledger sequencer for %s: %s -> %s", self.ledger_id, self.requests_topic, self.ledger_topic)
        last = time.monotonic()
        start = self.stats.requests
        while self.state.beat():
            if max_requests is not None and self.stats.requests - start >= max_requests:
                break
            if idle_timeout_s is not None and not self._failures:  # a batch not sealed is not idleness
                limit = idle_timeout_s if self._assigned else max(idle_timeout_s, UNASSIGNED_GRACE_S)
                if time.monotonic() - last >= limit:
                    break
            try:
                msgs: list[Message] = self._consumer.consume(self.batch_size, self.poll_timeout_s)
            except KafkaException as exc:
                log.warning("consume: %s", kafka_error(exc).str())
                continue
            if self._rebalance():
                last = time.monotonic()  # idleness counts from when the requests became ours
                # fence the previous owner NOW: its open transaction holds our group's offsets
                # (unstable until aborted), so the first fetch would wait for its timeout otherwise
                self._try_activate()
            good = [m for m in msgs if _usable(m)]
            if not good:
                continue
            last = time.monotonic()
            if self._chain is None and not self._try_activate():
                self._recover()  # not ours yet: read these requests again once it is
                continue
            try:
                self._seal(good)
            except LedgerWriterError as exc:
                self._failed(exc)
                self._recover()
            else:
                if self._failures:
                    self._failures = 0
                    self._set_ready(f"sealing ledger {self.ledger_id}")
        return self.stats

    def _failed(self, exc: LedgerWriterError) -> None:
        """Count a failed batch: not ready after `FAILURES_NOT_READY` in a row, stop after
        `MAX_FAILURES` (raises `LedgerError`); waits longer after each (0.5 s doubling to 10 s)."""
        self._failures += 1
        log.warning(
            "ledger batch not sealed (%d in a row: %s); reloading the chain and replaying",
            self._failures,
            exc,
        )
        if self._failures >= MAX_FAILURES:
            raise LedgerError(
                f"{self._failures} batches in a row could not be sealed into {self.ledger_topic}; last: "
                f"{exc}. Check the ledger and dead-letter topics and the broker, then restart (it resumes "
                "from the committed offsets)"
            ) from exc
        if self._failures >= FAILURES_NOT_READY:
            self.state.set_not_ready(f"{self._failures} batches in a row not sealed: {exc}")
        self.state.beat()
        self.state.pause(min(10.0, 0.5 * 2 ** (self._failures - 1)))

    def _set_ready(self, reason: str) -> None:
        """Ready with `reason`, unless failing batches in a row keep it not ready (`_failed`)."""
        if self._failures < FAILURES_NOT_READY:
            self.state.set_ready(reason)

    def _rebalance(self) -> bool:
        """Apply rebalance events; True when partitions were assigned."""
        assigned = False
        for kind, partitions in self._events.drain():
            if kind == "assign":
                assigned = assigned or bool(partitions)
                self._assigned.update(partitions)
            else:
                self._assigned.difference_update(partitions)
                self._failures = 0  # a batch we failed to seal is the next owner's now
                self._deactivate()  # another member may seal next: our chain state goes stale
        return assigned

    def _try_activate(self) -> bool:
        """`_activate`, waiting a little on failure (broker unreachable, timeouts); a ledger that
        does not chain (`ChainError`) is not retried: someone must look at it."""
        try:
            self._activate()
        except ChainError:
            raise
        except LedgerError as exc:
            log.warning("cannot take over ledger %s yet (%s); retrying", self.ledger_id, exc)
            self._deactivate()
            self.state.set_not_ready(f"cannot take over the ledger: {exc}")
            self.state.pause(1.0)
            return False
        return True

    def _activate(self) -> None:
        """Own the ledger: fence earlier owners, resume the chain from the committed tail."""
        self._deactivate()
        sink = KafkaLedgerSink(
            self.config,
            self.ledger_topic,
            transactional_id=f"streamprov-ledger-sequencer.{self.ledger_id}",
            timeout_s=self.timeout_s,
        )
        state = sink.load_state(self.ledger_id, dedup_window=self.dedup_window)
        self._sink = sink
        self._chain = LedgerChain(
            self.ledger_id,
            self.signer,
            checkpoint_every=self.checkpoint_every,
            dedup_window=self.dedup_window,
            state=state,
        )
        self._sealer = RowSealer(self._chain)
        log.info("ledger %s: sequencing from seq %d", self.ledger_id, state.next_seq)
        self._set_ready(f"sealing ledger {self.ledger_id}")

    def _deactivate(self) -> None:
        sink, self._sink, self._chain, self._sealer = self._sink, None, None, None
        if not self.state.closed:
            self._set_ready("consuming (standby: the requests partition is not ours)")
        if sink is not None:
            try:
                sink.close()
            except (KafkaException, LedgerError) as exc:
                log.warning("closing the ledger sink: %s", exc)

    def _final_checkpoint(self) -> None:
        """Sign what is not covered yet, so a cleanly stopped ledger is covered to its last entry."""
        chain, sink = self._chain, self._sink
        if chain is None or sink is None:
            return
        cp = chain.checkpoint()
        if cp is None:
            return
        try:
            sink.write_consumed([(record_key(cp), encode_record(cp))], [], self._consumer, [])
            self.stats.checkpoints += 1
        except LedgerWriterError as exc:
            log.warning("final checkpoint not stored (the next owner signs one later): %s", exc)

    def _recover(self) -> None:
        """After a failed transaction: drop the chain state, rewind to the committed offsets.

        Consuming on from the current position would skip the unsealed batch, so when the rewind
        itself keeps failing the sequencer stops with an error (a restart resumes from the committed
        offsets: nothing is lost)."""
        self.stats.recoveries += 1
        self._deactivate()
        assigned = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not assigned:
            return
        for attempt in range(1, REWIND_ATTEMPTS + 1):
            try:
                for tp in self._consumer.committed(assigned, timeout=self.timeout_s):
                    offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
                return
            except KafkaException as exc:
                log.warning("rewind %d/%d failed: %s", attempt, REWIND_ATTEMPTS, kafka_error(exc).str())
                time.sleep(1.0)
        raise LedgerError(
            f"cannot rewind {self.requests_topic} to its committed offsets after a failed batch; "
            "stopping so that a restart resumes from them"
        )

    def _seal(self, msgs: list[Message]) -> None:
        chain, sink = self._chain, self._sink
        assert chain is not None and sink is not None
        items: list[tuple[bytes, bytes]] = []
        extra: list[ExtraRecord] = []
        offsets: dict[tuple[str, int], int] = {}
        stats = SequencerStats()
        for msg in msgs:
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            offsets[(topic, partition)] = offset + 1
            stats.requests += 1
            try:
                request = decode_request(msg.value())
            except MalformedRecordError as exc:
                extra.append(self._dead_letter(msg, MALFORMED_REQUEST, exc))
                continue
            if request.ledger_id != self.ledger_id:
                problem = f"request for ledger {request.ledger_id!r}; this sequencer seals {self.ledger_id!r}"
                extra.append(self._dead_letter(msg, WRONG_LEDGER, problem))
                continue
            too_large = _too_large(request, self.max_entry_bytes)
            if too_large is not None:  # checked before any of it is sealed: a request is all or nothing
                extra.append(self._dead_letter(msg, ENTRY_TOO_LARGE, too_large))
                continue
            self._seal_request(request, items, stats)
        stats.dead_letters = len(extra)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        sink.write_consumed(items, extra, self._consumer, tps)
        stats.transactions = 1
        for name in vars(stats):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(stats, name))

    def _seal_request(
        self, request: LedgerRequest, items: list[tuple[bytes, bytes]], stats: SequencerStats
    ) -> None:
        """Applications through the chain; map rows straight from their header bytes (`RowSealer`:
        the same entries, without building objects)."""
        chain, sealer = self._chain, self._sealer
        assert chain is not None and sealer is not None
        for app in request.applications:
            stats.applications += 1
            records = chain.append(app)
            if not records:
                stats.duplicates += 1
            for record in records:
                if isinstance(record, Checkpoint):
                    stats.checkpoints += 1
                else:
                    stats.entries += 1
                items.append((record_key(record), encode_record(record)))
        for template, rows in request.map_rows:
            key = self._template_keys.setdefault(template, len(self._template_keys))
            for _, input_raw, input_checksum, output_header in rows:
                stats.applications += 1
                before = len(items)
                if sealer.seal(template, (key, input_raw, input_checksum, output_header), items):
                    stats.entries += 1
                    stats.checkpoints += len(items) - before - 1
                else:
                    stats.duplicates += 1

    def _dead_letter(self, msg: Message, reason: str, error: BaseException | str) -> ExtraRecord:
        log.warning("dead-lettering a ledger request (%s): %s", reason, error)
        where = source_of(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        key, value, headers = fit(
            msg.key(), msg.value() or b"", dead_letter_headers(_byte_headers(msg), reason, error, where)
        )
        kept: list[tuple[str, str | bytes | None]] = list(headers)
        return (self.dead_letter_topic, key, value or b"", kept)


def _too_large(request: LedgerRequest, limit: int) -> str | None:
    """Why one of the request's entries would not fit a ledger record (`limit` bytes), or None.
    Applications and map rows alike: a record the broker refuses fails its batch again and again."""
    for app in request.applications:
        size = approx_size(app)
        if size > limit:
            return (
                f"application of {app.function_id}@{app.function_version} needs about {size} bytes, "
                f"above max_entry_bytes={limit}"
            )
    for template, rows in request.map_rows:
        static = template_size(template)
        for i, row in enumerate(rows):
            size = approx_map_row_size(static, row, limit)
            if size > limit:
                return (
                    f"map row {i} of {template.function_id}@{template.function_version} needs about "
                    f"{size} bytes (its DataID is in the entry twice), above max_entry_bytes={limit}"
                )
    return None


def _usable(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume: %s", err.str())
    return False


def _byte_headers(msg: Message) -> list[tuple[str, bytes | None]]:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return [(k, v if v is None or isinstance(v, bytes) else str(v).encode()) for k, v in pairs]
