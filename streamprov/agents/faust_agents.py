"""Provenance map and reduce agents for faust-streaming, declared with decorators.

```python
app = faust.App("id", broker="kafka://127.0.0.1:39092", topic_partitions=1)
prov = ProvenanceAgents(app, registry=FunctionRegistry(), dead_letter_topic="dlq")

@prov.map(source="readings", sink="scaled", function_id="scale", version="1", params={"factor": 2})
def scale(value, factor): return value * factor

@prov.reduce(source="scaled", sink="totals", function_id="sum", version="1",
             initial=lambda: 0, window_ms=1000, grace_ms=0)
def total(acc, value): return acc + value
```

Each decorator registers the function in the `FunctionRegistry` (so the Validator and the Recompute
Manager can replay it) and creates a faust agent for it. Topics carry raw bytes: the checksum in a
provenance header is over exactly the bytes on the wire, and a `Serde` (canonical JSON by default)
turns them into values for the function and back.

The record logic lives in `MapHandler` and `ReduceHandler`, which know nothing about faust: they
take an `InputRecord` and return `Outgoing` records, so they are tested without a broker and could
drive any consumer loop. The faust agents are a thin loop around them.

Guarantees
----------
* Nothing is dropped and no record problem crashes an agent: malformed or unknown headers, checksum
  mismatches, undecodable values, exceptions in the user's function, late records go to the
  dead-letter topic with `streamprov.dlq.reason` / `.error` / `.source` headers.
* An output larger than the producer may send (``producer_max_request_size``), or than its sink
  topic takes (its ``max.message.bytes``, read when the agent starts), less 1 KB for framing, is
  dead-lettered as ``record_too_large`` (a map: its input; a reduce: the window's result, cut to fit).
* Map: at-least-once. faust flushes the producer before it commits an offset, so an output is on
  the broker before its input counts as done; after a crash the input is processed again and the
  output written twice (same DataID, value and checksums; only the header timestamp differs). A
  worker restarted before it ever committed (a crash in its first commit interval) reads its
  partitions from their first offset again. A record handed again after the recovery's final seek
  (`faust_delivery`) is processed again: duplicates, never gaps.
* Reduce (``state="table"``, the default): every open (key, window) state lives in a faust Table,
  i.e. in a compacted changelog topic, so a restart (or a rebalance that moves the partition)
  resumes the open windows instead of losing them. Each state carries the offset of the last
  record folded into it, and a per-partition entry keeps the watermark and the last folded offset:
  a record replayed after a crash (its offset not yet committed when the worker died) is recognised
  and not folded twice. A closed window's output is awaited until the broker acknowledged it, and
  only then is its state deleted; so a crash in between re-emits that window once more after the
  restart (at-least-once output, identical value and Merkle root). With faust's
  ``processing_guarantee="exactly_once"`` the changelog, outputs and offsets would share a
  transaction (not tested here). The replay check relies on the changelog keeping the order of
  its writes, which one producer writing one partition does.
* Reduce with ``state="memory"``: open windows live only in this process. faust commits the
  offsets of records as soon as they are folded, so a restart or a rebalance loses every open
  window, and the records in it are not read again. Use it for tests and throw-away pipelines.
* Windows close on event time: when the partition's watermark (the highest record timestamp seen)
  passes window end + grace. A partition that stops receiving records keeps its last windows open
  until a later record arrives (faust cannot write a Table outside an event, so there is no idle
  timer); send a heartbeat record with a later timestamp to flush them.

faust-streaming notes (0.15.3, aiokafka 0.14, Apache Kafka 4.4)
-------------------------------------------------------------
* The reduce Table is declared with ``key_type=bytes, value_type=bytes``: faust picks the changelog
  codec from those types, and a `faust.Schema` alone is overridden by the JSON default when the
  changelog is read back, which leaves recovery retrying undecodable records forever.
* ``faust worker`` sets ``web_enabled`` from its own ``--with-web/--without-web`` flag (default on,
  binding 0.0.0.0:6066) whatever the App says: pass ``--without-web`` (or set ``web_bind``).
* At the end of a recovery faust clears the agents' queues after seeking only the partitions that
  have a committed offset: records fetched during that seek were lost to a partition without one
  (a worker restarted before its first commit). `streamprov.agents.faust_delivery.SeekAgain` seeks
  the agents' source partitions again right before the queues are cleared. Before it, tests saw a
  restarted worker that was "ready" but handed no event to any agent (its whole backlog had been
  cleared), or a reduce window short of one input. A batch still being delivered when the queues
  are cleared lost records even so (faust-streaming issue 596, open): `DeliveryWatch` sees the gap
  in what an agent is handed after the seek, logs it ("were not delivered") and the agent reads those
  offsets back from Kafka itself, then processes them in order (`delivery.gaps`, `delivery.read_back`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from confluent_kafka import KafkaException, Message

from streamprov.agents.dead_letter import (
    DEFAULT_MAX_OUTPUT_BYTES,
    RECORD_FRAMING_BYTES,
    DeadLetterReason,
    classify,
    dead_letter_headers,
    fit,
    record_size,
    source_of,
)
from streamprov.agents.faust_delivery import DeliveryWatch, SeekAgain
from streamprov.agents.kafka_io import limit_below, read_range, topic_max_message_bytes
from streamprov.agents.serde import JsonSerde, Serde
from streamprov.checksum import Checksum, ChecksumAlgorithm, matches
from streamprov.errors import ProcessingError, SerdeError, StreamprovError
from streamprov.header import (
    HEADER_KEY,
    PREFIX,
    ProvenanceHeader,
    find_raw,
    headers_without,
    scan,
    verify_value,
)
from streamprov.ledger.model import Context
from streamprov.ledger.recorder import StepRecorder
from streamprov.ledger.writer import LedgerAppender
from streamprov.lineage import Step, StepKind, decode_lineage, encode_lineage
from streamprov.merkle import MerkleAccumulator, length_prefixed
from streamprov.reduce import LateRecordError, ReduceOutput, WindowedReducer
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import (
    ChecksumMismatchError,
    Headers,
    InputRecord,
    MapStamper,
    ReduceState,
    input_header,
    source_data_id,
)

logger = logging.getLogger(__name__)

OutHeaders = list[tuple[str, bytes | None]]
StateStore = MutableMapping[bytes, bytes]
"""Where reduce state lives: a faust Table (changelog-backed) or, for tests, a plain dict."""
PRODUCER_LIMIT = "the producer's producer_max_request_size"
"""Where a handler's `max_output_bytes` comes from unless its sink topic takes less."""
SINK_CONFIG_TIMEOUT_S = 10.0
"""How long an agent waits at start for its sink topic's `max.message.bytes`."""
READ_BACK_TIMEOUT_S = 30.0
"""How long an agent reads back the records faust did not hand it (`ProvenanceAgents._missed`)."""


def too_large(what: str, size: int, limit: int, limit_of: str) -> str:
    """The error text of a `record_too_large` dead letter: the size, the limit and which one it is."""
    return (
        f"{what} is {size} bytes, more than the {limit} an output may be "
        f"({limit_of}, less {RECORD_FRAMING_BYTES} bytes for framing)"
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce: a step's output, or an input set aside on the dead-letter topic."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: OutHeaders
    timestamp_ms: int | None = None
    dead_letter: bool = False


def dead_letter(
    topic: str,
    record: InputRecord | None,
    reason: DeadLetterReason | str,
    error: BaseException | str,
    *,
    key: bytes | None = None,
    value: bytes | None = None,
    headers: OutHeaders | None = None,
    source: str = "",
    timestamp_ms: int | None = None,
) -> Outgoing:
    """The original record, untouched, with the dead-letter headers added."""
    if record is not None:
        key, value, source = (
            record.key,
            record.value,
            source_of(record.topic, record.partition, record.offset),
        )
        headers = list(record.headers or ())
    key, value, fitted = fit(key, value, dead_letter_headers(headers, reason, error, source))
    return Outgoing(topic, key, value, fitted, timestamp_ms, True)


def check_input(record: InputRecord) -> None:
    """Reject a record whose provenance header is malformed or whose value does not match it.

    Done before the value is decoded, so a corrupted payload is reported as a checksum mismatch (the
    cause) rather than as whatever the decoder made of it.
    """
    raw = find_raw(record.headers)
    if raw is None:
        return
    if raw[: len(PREFIX)] == PREFIX:
        scan(raw)
        ok = verify_value(raw, record.value)
    else:  # an older header version: full decode
        ok = matches(ProvenanceHeader.decode(raw).checksum, record.value)
    if not ok:
        raise ChecksumMismatchError("input value does not match its header checksum", raw)


class MapHandler:
    """One map step, per record: check the header, decode, apply, encode, stamp."""

    def __init__(
        self,
        function: RegisteredFunction,
        *,
        sink: str,
        dead_letter_topic: str,
        serde: Serde | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        verify_input: bool = True,
        recorder: StepRecorder | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        if function.kind is not StepKind.MAP:
            raise StreamprovError(f"{function.function_id} is not a map function")
        self.function = function
        self.sink = sink
        self.dead_letter_topic = dead_letter_topic
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self.verify_input = verify_input
        # The input is checked once up front (check_input); the stamper need not verify again.
        self.stamper = MapStamper(function, None, algorithm, verify_input=False)
        self.recorder = recorder
        """Records every output in the provenance ledger (see `ProvenanceAgents`)."""
        self.max_output_bytes = max_output_bytes
        """A larger output (key, value, headers) is dead-lettered: the producer would refuse it, and
        the agent crashed and lost the record. `ProvenanceAgents` lowers it to the sink topic's
        `max.message.bytes` (less framing) when that is smaller."""
        self.limit_of = PRODUCER_LIMIT
        """Which limit `max_output_bytes` is, for the dead letter's error text."""

    def handle(self, record: InputRecord, timestamp_ms: int | None = None) -> Outgoing:
        """The output record, or the input as a dead-letter record; never raises for a bad record."""
        stage = "input"
        try:
            if self.verify_input:
                check_input(record)
            value = self.serde.loads(record.value)
            stage = "function"
            try:
                result = self.function.apply(value)
            except Exception as exc:
                raise ProcessingError(
                    f"{self.function.function_id}@{self.function.version} raised {exc!r}"
                ) from exc
            stage = "output"
            out = self.serde.dumps(result)
            header = self.stamper.stamp(record, out)
        except Exception as exc:
            reason = classify(exc, serialising=stage == "output")
            logger.warning(
                "map %s: %s at %s/%s/%s sent to %s: %s",
                self.function.function_id,
                reason,
                record.topic,
                record.partition,
                record.offset,
                self.dead_letter_topic,
                exc,
            )
            return dead_letter(self.dead_letter_topic, record, reason, exc, timestamp_ms=timestamp_ms)
        headers: OutHeaders = [(HEADER_KEY, header), *headers_without(record.headers)]
        size = record_size(record.key, out, headers)
        if size > self.max_output_bytes:
            error = too_large("the output", size, self.max_output_bytes, self.limit_of)
            where = f"{record.topic}/{record.partition}/{record.offset}"
            logger.warning("map %s: %s at %s", self.function.function_id, error, where)
            reason = DeadLetterReason.RECORD_TOO_LARGE
            return dead_letter(self.dead_letter_topic, record, reason, error, timestamp_ms=timestamp_ms)
        if self.recorder is not None:  # outside the try: a ledger failure is not the record's fault
            self.recorder.record_map(find_raw(record.headers), record.value, header)
        return Outgoing(self.sink, record.key, out, headers, timestamp_ms)


# -- reduce state persistence ----------------------------------------------------------------------
_STATE_VERSION = b"\x01"
_NO_LINEAGE = b""  # ReduceState.upstream is None (no input yet); an empty lineage encodes as b"\x00"


def _i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def _from_i64(b: bytes) -> int:
    if len(b) != 8:
        raise StreamprovError(f"expected an 8-byte integer, got {len(b)} bytes")
    return int.from_bytes(b, "big", signed=True)


def split_prefixed(data: bytes) -> list[bytes]:
    """Inverse of `merkle.length_prefixed`; raises StreamprovError on anything else."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise StreamprovError("truncated length prefix in reduce state")
        n = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if pos + n > len(data):
            raise StreamprovError("reduce state part runs past the end")
        parts.append(data[pos : pos + n])
        pos += n
    return parts


def window_key(topic: str, partition: int, key: str, start: int) -> bytes:
    """Store key of one open window; it names its source partition so a restore can filter on it."""
    return b"w" + length_prefixed(topic.encode(), partition.to_bytes(4, "big"), key.encode(), _i64(start))


def progress_key(topic: str, partition: int) -> bytes:
    """Store key of a partition's progress: watermark and the last offset folded into any window."""
    return b"p" + length_prefixed(topic.encode(), partition.to_bytes(4, "big"))


def input_key(topic: str, partition: int, key: str, start: int, offset: int) -> bytes:
    """Store key of one input of an open window (ledger on): the window's key parts and the offset."""
    return b"r" + length_prefixed(
        topic.encode(), partition.to_bytes(4, "big"), key.encode(), _i64(start), _i64(offset)
    )


def parse_input_key(raw: bytes) -> tuple[str, int, str, int, int] | None:
    """(topic, partition, key, window start, offset) of an input key; None for any other store key."""
    if raw[:1] != b"r":
        return None
    topic, partition, key, start, offset = split_prefixed(raw[1:])
    return topic.decode(), int.from_bytes(partition, "big"), key.decode(), _from_i64(start), _from_i64(offset)


def encode_input(data_id: str, checksum: Checksum) -> bytes:
    return length_prefixed(data_id.encode("utf-8"), bytes((checksum.algorithm,)), checksum.value)


def decode_input(raw: bytes) -> tuple[str, Checksum]:
    data_id, alg, digest = split_prefixed(raw)
    return data_id.decode("utf-8"), Checksum(ChecksumAlgorithm(alg[0]), digest)


def parse_window_key(raw: bytes) -> tuple[str, int, str, int] | None:
    """(topic, partition, key, window start) of a window key; None for any other store key."""
    if raw[:1] != b"w":
        return None
    topic, partition, key, start = split_prefixed(raw[1:])
    return topic.decode(), int.from_bytes(partition, "big"), key.decode(), _from_i64(start)


def encode_state(state: ReduceState, last_offset: int, serde: Serde) -> bytes:
    """A window's state in one store value: accumulator (via the serde), both Merkle frontiers,
    the shared upstream lineage, the newest input timestamp and the last folded offset.

    Writing the offset in the same value as the state makes "folded" and "recorded as folded" one
    atomic changelog write, which is what lets a replay skip records already folded.
    """
    upstream = _NO_LINEAGE if state.upstream is None else encode_lineage(state.upstream)
    return _STATE_VERSION + length_prefixed(
        serde.dumps(state.accumulator),
        state.inputs.to_bytes(),
        state.sources.to_bytes(),
        upstream,
        _i64(state.last_timestamp_ms),
        _i64(last_offset),
    )


def decode_state(raw: bytes, serde: Serde) -> tuple[ReduceState, int]:
    if raw[:1] != _STATE_VERSION:
        raise StreamprovError(f"unknown reduce state version {raw[:1].hex()}")
    acc, inputs, sources, upstream, last_ts, last_offset = split_prefixed(raw[1:])
    state = ReduceState(
        serde.loads(acc),
        MerkleAccumulator.from_bytes(inputs),
        MerkleAccumulator.from_bytes(sources),
        None if upstream == _NO_LINEAGE else decode_lineage(upstream),
        _from_i64(last_ts),
    )
    return state, _from_i64(last_offset)


def encode_progress(watermark_ms: int, last_offset: int) -> bytes:
    return _i64(watermark_ms) + _i64(last_offset)


def decode_progress(raw: bytes) -> tuple[int, int]:
    return _from_i64(raw[:8]), _from_i64(raw[8:])


@dataclass
class _Partition:
    """The reducer of one source partition and what has been folded into it."""

    reducer: WindowedReducer
    last_offset: int = -1
    window_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    replays_skipped: int = 0
    input_keys: dict[tuple[str, int], list[bytes]] = field(default_factory=dict)
    """Ledger on: store keys of each open window's inputs (deleted with the window's state)."""


@dataclass
class ReduceResult:
    """What one input record produced: closed-window outputs and/or a dead-letter record.

    The caller sends `records`, waits until the window outputs are acknowledged, then calls
    `ReduceHandler.release(result)` to delete their state: a crash in between re-emits, never loses.
    """

    records: list[Outgoing] = field(default_factory=list)
    closed: list[bytes] = field(default_factory=list)
    duplicate: bool = False


class ReduceHandler:
    """Keyed tumbling-window reduce over one source topic, its state in a `StateStore`.

    One `WindowedReducer` per source partition (a key lives in one partition, and a watermark per
    partition keeps one slow partition from making another's records late).
    """

    def __init__(
        self,
        function: RegisteredFunction,
        *,
        sink: str,
        dead_letter_topic: str,
        window_ms: int,
        grace_ms: int = 0,
        store: StateStore | None = None,
        serde: Serde | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        verify_input: bool = True,
        recorder: StepRecorder | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        if function.kind is not StepKind.REDUCE:
            raise StreamprovError(f"{function.function_id} is not a reduce function")
        WindowedReducer(function, window_ms, grace_ms)  # validates the window arguments early
        self.function = function
        self.sink = sink
        self.dead_letter_topic = dead_letter_topic
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.store: StateStore = store if store is not None else {}
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self.algorithm = algorithm
        self.verify_input = verify_input
        self.max_output_bytes = max_output_bytes
        """A larger window result (key, value, headers) is dead-lettered, cut to fit (`MapHandler`)."""
        self.limit_of = PRODUCER_LIMIT
        self.recorder = recorder
        """Ledger on: records each emitted window with its full input list. The inputs of open
        windows are kept in the store too (one entry per input, `input_key`), so a restart or a
        rebalance rebuilds them with the windows."""
        self._partitions: dict[tuple[str, int], _Partition] = {}

    # -- partitions --------------------------------------------------------------------------
    def _partition(self, topic: str, partition: int) -> tuple[_Partition, list[ReduceOutput]]:
        """The partition's reducer; the first call restores it from the store (after a restart or a
        rebalance) and returns any windows the restored watermark had already closed."""
        part = self._partitions.get((topic, partition))
        if part is not None:
            return part, []
        part = _Partition(WindowedReducer(self.function, self.window_ms, self.grace_ms))
        restored = 0
        inputs: list[tuple[tuple[str, int, str, int], int, bytes, bytes]] = []
        for raw_key, raw_value in list(self.store.items()):
            if self.recorder is not None and raw_key[:1] == b"r":
                ref = parse_input_key(raw_key)
                if ref is not None and ref[0] == topic and ref[1] == partition:
                    inputs.append(((topic, partition, ref[2], ref[3]), ref[4], raw_key, raw_value))
                continue
            parsed = parse_window_key(raw_key)
            if parsed is None or parsed[0] != topic or parsed[1] != partition:
                continue
            _, _, key, start = parsed
            try:
                state, last = decode_state(raw_value, self.serde)
            except StreamprovError as exc:  # crash-looping on it would stop every other window
                logger.error(
                    "reduce %s: cannot restore window %s of %r on %s/%s (left in the store): %s",
                    self.function.function_id,
                    start,
                    key,
                    topic,
                    partition,
                    exc,
                )
                continue
            part.reducer.restore(key, start, state)
            part.window_offsets[(key, start)] = last
            restored += 1
        for window, _, raw_key, raw_value in sorted(inputs, key=lambda i: (i[0], i[1])):  # arrival order
            assert self.recorder is not None
            if (window[2], window[3]) not in part.window_offsets:  # its window was emitted: stale
                self.store.pop(raw_key, None)
                continue
            data_id, checksum = decode_input(raw_value)
            self.recorder.add_input(window, data_id, checksum)
            part.input_keys.setdefault((window[2], window[3]), []).append(raw_key)
        progress = self.store.get(progress_key(topic, partition))
        if progress is not None:
            watermark, part.last_offset = decode_progress(progress)
            part.reducer.advance_watermark(watermark)
        self._partitions[(topic, partition)] = part
        if restored or progress is not None:
            logger.info(
                "reduce %s: restored %d open window(s) of %s/%s, watermark %s, last folded offset %s",
                self.function.function_id,
                restored,
                topic,
                partition,
                part.reducer.watermark_ms,
                part.last_offset,
            )
        return part, part.reducer.close_due()

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop in-memory reducers of revoked partitions; their state stays in the store."""
        for tp in partitions:
            part = self._partitions.pop(tp, None)
            if part is not None and self.recorder is not None:
                for key, start in part.input_keys:
                    self.recorder.forget((tp[0], tp[1], key, start))

    # -- records -----------------------------------------------------------------------------
    def group_key(self, record: InputRecord, header: ProvenanceHeader) -> str:
        """The reduce key (and the output's DataID): the record key, else the input's DataID."""
        if record.key:
            return source_data_id(record.key, record.topic, record.partition, record.offset)
        return header.data_id

    def handle(self, record: InputRecord, timestamp_ms: int | None) -> ReduceResult:
        """Fold one record; returns the outputs of windows it closed, or its dead-letter record."""
        part, restored_due = self._partition(record.topic, record.partition)
        result = ReduceResult()
        self._emit(record.topic, record.partition, restored_due, result)
        if record.offset <= part.last_offset:
            self._skip_replay(part, record)
            result.duplicate = True
            return result
        try:
            if self.verify_input:
                check_input(record)
            header = input_header(record, self.algorithm)
            ts = timestamp_ms if timestamp_ms is not None and timestamp_ms >= 0 else header.timestamp_ms
            key = self.group_key(record, header)
            start, _ = part.reducer.window_of(ts)
            if part.window_offsets.get((key, start), -1) >= record.offset:
                self._skip_replay(part, record)
                result.duplicate = True
                return result
            value = self.serde.loads(record.value)
            try:
                part.reducer.add(key, header, value, ts)
            except (LateRecordError, StreamprovError):
                raise
            except Exception as exc:
                raise ProcessingError(
                    f"{self.function.function_id}@{self.function.version} raised {exc!r}"
                ) from exc
        except Exception as exc:
            reason = classify(exc)
            logger.warning(
                "reduce %s: %s at %s/%s/%s sent to %s: %s",
                self.function.function_id,
                reason,
                record.topic,
                record.partition,
                record.offset,
                self.dead_letter_topic,
                exc,
            )
            result.records.append(
                dead_letter(self.dead_letter_topic, record, reason, exc, timestamp_ms=timestamp_ms)
            )
            return result
        state = part.reducer.state_of(key, start)
        assert state is not None
        part.window_offsets[(key, start)] = record.offset
        part.last_offset = record.offset
        if self.recorder is not None:  # the input list of the window, for its ledger entry
            ref_key = input_key(record.topic, record.partition, key, start, record.offset)
            self.store[ref_key] = encode_input(header.data_id, header.checksum)
            part.input_keys.setdefault((key, start), []).append(ref_key)
            self.recorder.add_input(
                (record.topic, record.partition, key, start), header.data_id, header.checksum
            )
        # State before progress: a crash between the two leaves the window's own offset to dedup on.
        self.store[window_key(record.topic, record.partition, key, start)] = encode_state(
            state, record.offset, self.serde
        )
        self.store[progress_key(record.topic, record.partition)] = encode_progress(
            part.reducer.watermark_ms, record.offset
        )
        self._emit(record.topic, record.partition, part.reducer.close_due(), result)
        return result

    def _skip_replay(self, part: _Partition, record: InputRecord) -> None:
        """A record folded before a restart whose offset was not committed: seen again, not re-folded."""
        if not part.replays_skipped:
            logger.info(
                "reduce %s: %s/%s from offset %s was already folded before a restart; skipping the replay",
                self.function.function_id,
                record.topic,
                record.partition,
                record.offset,
            )
        part.replays_skipped += 1

    def _emit(self, topic: str, partition: int, outputs: list[ReduceOutput], result: ReduceResult) -> None:
        part = self._partitions[(topic, partition)]
        for output in outputs:
            part.window_offsets.pop((output.key, output.window[0]), None)
            result.closed.extend(part.input_keys.pop((output.key, output.window[0]), ()))
            if output.state.count == 0:
                # WindowedReducer opens a window before folding into it: a first record whose
                # function call raised (and went to the dead-letter topic) leaves it empty.
                if self.recorder is not None:
                    self.recorder.forget((topic, partition, output.key, output.window[0]))
                continue
            result.records.append(self.output_record(output, topic, partition))
            result.closed.append(window_key(topic, partition, output.key, output.window[0]))

    def _window_dead_letter(
        self,
        output: ReduceOutput,
        topic: str,
        partition: int,
        value: bytes,
        reason: DeadLetterReason,
        error: BaseException | str,
    ) -> Outgoing:
        """A window's result that cannot be an output: no input record to set aside, so the result
        itself, with why and which window (`dead_letter` cuts it to fit); its ledger entry is dropped."""
        if self.recorder is not None:  # no output node: no entry
            self.recorder.forget((topic, partition, output.key, output.window[0]))
        return dead_letter(
            self.dead_letter_topic,
            None,
            reason,
            error,
            key=output.key.encode("utf-8"),
            value=value,
            source=f"{topic}/{partition} window [{output.window[0]}, {output.window[1]})",
            timestamp_ms=output.window[1] - 1,
        )

    def output_record(self, output: ReduceOutput, topic: str, partition: int) -> Outgoing:
        """A closed window as a record: key = DataID = group key, timestamp = the window's last ms."""
        key = output.key.encode("utf-8")
        ts = output.window[1] - 1
        try:
            value = self.serde.dumps(output.value)
        except SerdeError as exc:
            logger.error(
                "reduce %s: window %s of %r not serialisable: %s",
                self.function.function_id,
                output.window,
                output.key,
                exc,
            )
            text = repr(output.value).encode("utf-8", "replace")
            return self._window_dead_letter(
                output, topic, partition, text, DeadLetterReason.SERIALIZATION_ERROR, exc
            )
        header = output.header(self.function, None, value, self.algorithm)
        headers: OutHeaders = [(HEADER_KEY, header.encode())]
        size = record_size(key, value, headers)
        if size > self.max_output_bytes:  # it would be refused: set aside, cut, with its window
            error = too_large("the result", size, self.max_output_bytes, self.limit_of)
            logger.error(
                "reduce %s: window %s of %r: %s", self.function.function_id, output.window, output.key, error
            )
            return self._window_dead_letter(
                output, topic, partition, value, DeadLetterReason.RECORD_TOO_LARGE, error
            )
        if self.recorder is not None:
            self.recorder.record_reduce((topic, partition, output.key, output.window[0]), header)
        return Outgoing(self.sink, key, value, headers, ts)

    def release(self, result: ReduceResult) -> None:
        """Delete the state of windows whose outputs the broker has acknowledged."""
        for k in result.closed:
            self.store.pop(k, None)
        result.closed.clear()


def read_back_record(msg: Message) -> tuple[InputRecord, int | None]:
    """A record read back with confluent-kafka (`ProvenanceAgents._missed`) as the stampers see it,
    with its timestamp (None when it has none)."""
    headers = cast(Headers, list(msg.headers() or []))
    record = InputRecord(
        cast(bytes, msg.value()),
        headers,
        msg.key(),
        msg.topic() or "",
        msg.partition() or 0,
        msg.offset() or 0,
    )
    _kind, ts = msg.timestamp()
    return record, (ts if ts >= 0 else None)


# -- faust wiring ----------------------------------------------------------------------------------
def _faust_timestamp(ms: int | None) -> float | None:
    """faust takes seconds and sends int(seconds * 1000): half a millisecond keeps that exact."""
    return None if ms is None else (ms + 0.5) / 1000.0


def _event_ms(timestamp: float | None) -> int | None:
    return None if timestamp is None else round(timestamp * 1000)


def input_record(message: Any) -> InputRecord:
    """A faust/aiokafka message as the stampers see it (raw key, value and header list)."""
    headers = message.headers or ()
    if isinstance(headers, Mapping):  # faust accepts a dict of headers when sending
        headers = headers.items()
    return InputRecord(
        message.value,
        list(headers),
        message.key,
        message.topic,
        message.partition,
        message.offset,
    )


class ProvenanceAgents:
    """Decorators that register a function and run it as a provenance-stamping faust agent.

    `app` is a `faust.App` (typed as Any: faust's own annotations of topics, sends and agents do not
    match what they return at runtime, e.g. `await topic.send()` gives a future to await again).

    `ledger` (optional) records every application in the provenance ledger, with `ledger_context`
    and `device_id`. The ledger is flushed before faust may commit the offsets of the records it
    covers: a map agent then takes its events in batches (`stream.take_events(ledger_batch,
    ledger_within_s)`, which acks a batch only after the loop body ran) and flushes once per batch; a
    reduce agent keeps one event at a time (its table writes need the event's context) and flushes
    after an event that emitted a window, before the window's state is deleted. A ledger failure
    stops the agent; the unacknowledged records are processed again after a restart.
    """

    def __init__(
        self,
        app: Any,
        *,
        registry: FunctionRegistry,
        dead_letter_topic: str,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        serde: Serde | None = None,
        verify_input: bool = True,
        state: Literal["table", "memory"] = "table",
        ledger: LedgerAppender | None = None,
        ledger_context: Context | None = None,
        device_id: str | None = None,
        ledger_batch: int = 200,
        ledger_within_s: float = 0.2,
        ledger_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.ledger = ledger
        self.ledger_context = ledger_context
        self.device_id = device_id
        self.ledger_batch = ledger_batch
        self.ledger_within_s = ledger_within_s
        self.ledger_timeout_s = ledger_timeout_s
        self.registry = registry
        self.dead_letter_topic = dead_letter_topic
        self.algorithm = algorithm
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self.verify_input = verify_input
        self.state = state
        self.agents: dict[str, Any] = {}
        """faust agents by function id."""
        self.handlers: dict[str, MapHandler | ReduceHandler] = {}
        self._topics: dict[str, Any] = {}
        self._reducers: list[ReduceHandler] = []
        self._sink_limits: dict[str, int | None] = {}
        """Each sink topic's `max.message.bytes`, read once (None: could not be read)."""
        app.on_partitions_revoked.connect(self._on_partitions_revoked)
        self.delivery = DeliveryWatch()
        """Records faust did not deliver to an agent (`DeliveryWatch.gaps`)."""
        SeekAgain(app, self.delivery)

    def topic(self, name: str, partitions: int | None = None) -> Any:
        """A raw-bytes faust topic: no (de)serialisation between the wire and the checksum."""
        t = self._topics.get(name)
        if t is None:
            t = self._topics[name] = self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=partitions,
            )
        return t

    # -- decorators ---------------------------------------------------------------------------
    def map(
        self,
        *,
        source: str,
        sink: str,
        function_id: str,
        version: str,
        params: Mapping[str, Any] | None = None,
        serde: Serde | None = None,
    ) -> Callable[[Callable[..., Any]], RegisteredFunction]:
        """Register `fn(value, **params) -> value` and run it on every record of `source`."""

        def decorate(fn: Callable[..., Any]) -> RegisteredFunction:
            registered = self.registry.add(fn, function_id, version, kind=StepKind.MAP, params=params)
            handler = MapHandler(
                registered,
                sink=sink,
                dead_letter_topic=self.dead_letter_topic,
                serde=serde or self.serde,
                algorithm=self.algorithm,
                verify_input=self.verify_input,
                recorder=self._recorder(registered.step(None)),  # the step MapStamper stamps
                max_output_bytes=self._max_output_bytes(),
            )

            async def one(event: Any) -> None:
                message = event.message
                for record, record_ts in await self._missed(function_id, message):
                    missed = self._tombstone(record, record_ts) if record.value is None else None
                    await self.send(missed or handler.handle(record, record_ts))
                ts = _event_ms(message.timestamp)
                if message.value is None:
                    out = self._tombstone(message, ts)
                else:
                    out = handler.handle(input_record(message), ts)
                await self.send(out)

            async def run(stream: Any) -> None:
                await self._fit_sink(handler)
                if handler.recorder is None:
                    async for event in stream.events():
                        await one(event)
                    return
                async for events in stream.take_events(self.ledger_batch, self.ledger_within_s):
                    for event in events:
                        await one(event)
                    await self._flush_ledger(handler.recorder)  # before the batch is acknowledged

            self._agent(function_id, "map", source, run, handler)
            return registered

        return decorate

    def reduce(
        self,
        *,
        source: str,
        sink: str,
        function_id: str,
        version: str,
        initial: Callable[[], Any],
        window_ms: int,
        grace_ms: int = 0,
        params: Mapping[str, Any] | None = None,
        serde: Serde | None = None,
        partitions: int | None = None,
    ) -> Callable[[Callable[..., Any]], RegisteredFunction]:
        """Register `fn(acc, value, **params) -> acc`; fold `source` per key into tumbling windows.

        `partitions` is the source topic's partition count (the state table must match it; defaults
        to the app's `topic_partitions`).
        """

        def decorate(fn: Callable[..., Any]) -> RegisteredFunction:
            registered = self.registry.add(
                fn, function_id, version, kind=StepKind.REDUCE, params=params, initial=initial
            )
            store: StateStore | None = None
            if self.state == "table":
                store = self.app.Table(
                    f"streamprov-reduce-{function_id}",
                    default=None,
                    partitions=partitions,
                    # bytes types make faust pick the "raw" codec for the changelog in both
                    # directions; a schema alone is overridden by the JSON default on recovery.
                    key_type=bytes,
                    value_type=bytes,
                    help=f"open windows of streamprov reduce {function_id}@{version}",
                )
            handler = ReduceHandler(
                registered,
                sink=sink,
                dead_letter_topic=self.dead_letter_topic,
                window_ms=window_ms,
                grace_ms=grace_ms,
                store=store,
                serde=serde or self.serde,
                algorithm=self.algorithm,
                verify_input=self.verify_input,
                recorder=self._recorder(registered.step(None)),
                max_output_bytes=self._max_output_bytes(),
            )
            self._reducers.append(handler)

            async def run(stream: Any) -> None:
                await self._fit_sink(handler)
                async for event in stream.events():
                    message = event.message
                    ts = _event_ms(message.timestamp)
                    records = [*await self._missed(function_id, message), (input_record(message), ts)]
                    for record, record_ts in records:
                        if record.value is None:
                            await self.send(self._tombstone(record, record_ts))
                            continue
                        result = handler.handle(record, record_ts)
                        await self.deliver(result)
                        await self._flush_ledger(handler.recorder)  # entries before the state goes
                        handler.release(result)

            self._agent(function_id, "reduce", source, run, handler, partitions)
            return registered

        return decorate

    # -- plumbing ------------------------------------------------------------------------------
    def _recorder(self, step: Step) -> StepRecorder | None:
        if self.ledger is None:
            return None
        return StepRecorder(
            self.ledger, step, context=self.ledger_context, device_id=self.device_id, algorithm=self.algorithm
        )

    async def _flush_ledger(self, recorder: StepRecorder | None) -> None:
        """Make what `recorder` appended durable, off the event loop (a no-op when nothing was)."""
        if recorder is None or not recorder.unflushed:
            return
        await asyncio.get_running_loop().run_in_executor(None, recorder.flush, self.ledger_timeout_s)

    def _agent(
        self,
        function_id: str,
        kind: str,
        source: str,
        run: Callable[[Any], Any],
        handler: MapHandler | ReduceHandler,
        partitions: int | None = None,
    ) -> None:
        if function_id in self.agents:
            raise StreamprovError(f"an agent for {function_id!r} is already defined")
        # An explicit name: every agent here wraps the same inner function, whose qualified name
        # faust would otherwise use for all of them.
        self.agents[function_id] = self.app.agent(
            self.topic(source, partitions), name=f"streamprov.{kind}.{function_id}"
        )(run)
        self.handlers[function_id] = handler
        self.delivery.agent(function_id, source)

    def _tombstone(self, message: Any, ts: int | None) -> Outgoing:
        """A record without a value: nothing to decode or checksum, so it is dead-lettered as is.
        `message`: faust's, or an `InputRecord` read back (`_missed`)."""
        record = message if isinstance(message, InputRecord) else input_record(message)
        return dead_letter(
            self.dead_letter_topic,
            record,  # value None, kept so the dead-letter record is the original
            DeadLetterReason.DESERIALIZATION_ERROR,
            "record has no value (tombstone)",
            timestamp_ms=ts,
        )

    def _max_output_bytes(self) -> int:
        """The largest output the app's producer sends (`producer_max_request_size`, less framing)."""
        return int(self.app.conf.producer_max_request_size) - RECORD_FRAMING_BYTES

    async def _fit_sink(self, handler: MapHandler | ReduceHandler) -> None:
        """Lower `handler`'s output limit to its sink topic's `max.message.bytes` when that is below
        the producer's: the broker refuses a larger record. A map agent's send only logged faust's
        "_on_published error ... MessageSizeTooLargeError", its offset was committed and the record
        was in neither the sink nor the dead letters; a reduce agent crashed in `deliver`, and the
        window's state, never released, crashed it again after every restart (found by probing).
        Read once per sink, when its agent first starts; a failed read keeps the producer's limit."""
        if handler.sink not in self._sink_limits:
            self._sink_limits[handler.sink] = await self._read_max_message_bytes(handler.sink)
        limit = self._sink_limits[handler.sink]
        lower = limit_below(limit, handler.max_output_bytes)
        if lower is not None:
            handler.max_output_bytes = lower
            handler.limit_of = f"the sink topic's max.message.bytes, {limit}"
            logger.info(
                "sink topic %s takes records of at most %d bytes (max.message.bytes): larger outputs of "
                "%s are dead-lettered as record_too_large",
                handler.sink,
                limit,
                handler.function.function_id,
            )

    def _client_settings(self) -> dict[str, Any] | None:
        """librdkafka settings for the app's brokers (`app.conf.broker`, ``kafka://host:port`` URLs,
        faust's default port 9092); None when faust connects with credentials (not translated)."""
        if self.app.conf.broker_credentials is not None:
            return None
        return {"bootstrap.servers": ",".join(f"{u.host}:{u.port or 9092}" for u in self.app.conf.broker)}

    async def _read_max_message_bytes(self, topic: str) -> int | None:
        """`kafka_io.topic_max_message_bytes` off the event loop, on the app's brokers. None when it
        cannot be read, or when faust connects with credentials."""
        settings = self._client_settings()
        if settings is None:
            logger.warning(
                "faust broker credentials are set: max.message.bytes of sink topic %s is not read, its "
                "outputs are limited by the producer's producer_max_request_size only",
                topic,
            )
            return None
        read = functools.partial(topic_max_message_bytes, settings, topic, timeout_s=SINK_CONFIG_TIMEOUT_S)
        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def _missed(self, name: str, message: Any) -> list[tuple[InputRecord, int | None]]:
        """The records agent `name` should have been handed before `message` but faust dropped
        (`DeliveryWatch.delivered`: the race at the end of a recovery), read back from Kafka, in order,
        with their timestamps; none when there is no such gap. Read with faust's isolation level;
        what cannot be read back is logged as an error, with its offsets: it is not processed.

        The offsets read back are then marked as a gap in faust's offset tracking (its private
        `Consumer._add_gap`, as faust does for the gaps it sees): faust never acked them, and without
        it no offset of the partition would be committed again until the next rebalance."""
        gap = self.delivery.delivered(
            name, message.topic, message.partition, message.offset, rebalancing=bool(self.app.rebalancing)
        )
        if gap is None:
            return []
        start, end = gap
        where = f"offsets {start} to {end - 1} of {message.topic}/{message.partition}"
        settings = self._client_settings()
        if settings is None:
            logger.error("agent %s: %s cannot be read back (faust broker credentials are set)", name, where)
            return []
        exactly_once = bool(self.app.in_transaction)  # faust reads read_committed then
        read = functools.partial(
            read_range,
            settings,
            message.topic,
            message.partition,
            start,
            end,
            isolation_level="read_committed" if exactly_once else "read_uncommitted",
            timeout_s=READ_BACK_TIMEOUT_S,
        )
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, read)
        except (StreamprovError, KafkaException) as exc:
            logger.error(
                "agent %s: %s could not be read back, so they were not processed: %s", name, where, exc
            )
            return []
        self.delivery.read_back += len(found)
        logger.warning("agent %s: %s read back from Kafka: %d record(s) to process", name, where, len(found))
        add_gap = getattr(self.app.consumer, "_add_gap", None)
        if add_gap is not None:
            await add_gap(message.tp, start, end - 1)
        return [read_back_record(m) for m in found]

    async def send(self, out: Outgoing, *, force: bool = False) -> Any:
        """Produce one record; returns faust's future of its delivery."""
        return await self.topic(out.topic).send(
            key=out.key,
            value=out.value,
            headers=out.headers,
            timestamp=_faust_timestamp(out.timestamp_ms),
            force=force,
        )

    async def deliver(self, result: ReduceResult) -> None:
        """Send a reduce result and wait until the broker has every window output.

        `force=True` bypasses faust's publish-on-commit attachments: an attached message is only sent
        at the next commit, which cannot happen while this event is still being processed.
        """
        futures = [await self.send(out, force=True) for out in result.records]
        for fut in futures:
            await fut

    async def _on_partitions_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        """A revoked partition's windows now belong to another worker: forget them here.

        If it comes back, the reducer is rebuilt from the table faust recovered for it.
        """
        tps = {(tp.topic, tp.partition) for tp in revoked}
        self.delivery.forget(tps)
        for handler in self._reducers:
            handler.forget(tps)
