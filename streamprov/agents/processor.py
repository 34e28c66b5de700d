"""A plain confluent-kafka consume-transform-produce processor that applies a registered function.

Every output carries a provenance header (map: `MapStamper`; reduce: `WindowedReducer` windows), and
every record that cannot be processed goes to the dead-letter topic with the reason: the loop never
drops a record and never dies on bad input.

How it stays correct:

* No transaction is ever open while `consume()` runs. A batch is consumed, then transformed record by
  record, each output produced as soon as it is made (so sending overlaps the work): exactly once, in
  one transaction begun with the first output and committed with the input offsets; at least once,
  every delivery report is awaited before the offsets are committed synchronously. So a rebalance
  (served inside `consume()`) always finds all finished work committed, and the librdkafka callbacks
  only record what changed; the loop acts on it after `consume()` returns.
* When a batch cannot be shipped (an abortable transaction error, a failed delivery), its in-memory
  effects are undone by seeking every partition back to the last committed offset and processing
  again; bounded by `max_consecutive_failures`.
* Reduce commits never pass the oldest record still held in an open window. The committed offset's
  metadata holds a `Checkpoint` (how far the partition was read, and the reducer's watermark), so after
  a restart or rebalance the records between the committed offset and that position are replayed
  silently: records of windows already emitted are skipped, the rest rebuild the open windows. A
  record past that position for an already-closed window is truly late and is dead-lettered.
  The watermark is the newest record timestamp seen (as in Kafka Streams), with no cap: one record
  stamped far ahead (a broker accepts up to `message.timestamp.after.max.ms`, 1 h by default) closes
  the windows before it, and the on-time records after it are dead-lettered as `late_record`.
* An output larger than the producer may send (`message.max.bytes`), or than the output topic takes
  (its `max.message.bytes`, read at start), less 1 KB for framing, is dead-lettered as
  `record_too_large` (its input; for a reduce, the window's result cut to fit).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from time import time_ns as _time_ns
from typing import TYPE_CHECKING, Any, Literal, Protocol

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

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
from streamprov.agents.kafka_io import (
    KAFKA_LOG,
    RebalanceEvents,
    TopicPartitionKey,
    is_fenced,
    kafka_error,
    produce_blocking,
    record_limit_below,
    seek_retrying,
)
from streamprov.agents.serde import JsonSerde, Serde
from streamprov.checksum import ChecksumAlgorithm, matches
from streamprov.errors import HeaderError, SerdeError, StreamprovError
from streamprov.header import (
    PREFIX,
    ProvenanceHeader,
    find_raw,
    scan,
    verify_value,
)
from streamprov.ledger.errors import (
    LedgerBackpressureError,
    LedgerTimeoutError,
    LedgerWriterError,
)
from streamprov.ledger.model import Context
from streamprov.ledger.recorder import StepRecorder
from streamprov.ledger.writer import FlushWaiter, LedgerAppender
from streamprov.lineage import StepKind, decode_lineage
from streamprov.reduce import LateRecordError, ReduceOutput, WindowedReducer
from streamprov.registry import RegisteredFunction
from streamprov.signing import Signer, signed_headers
from streamprov.stamp import ChecksumMismatchError, InputRecord, MapStamper, source_data_id

if TYPE_CHECKING:
    from streamprov.telemetry.tracing import StepTracing

log = logging.getLogger(__name__)

Guarantee = Literal["exactly_once", "at_least_once"]
EXACTLY_ONCE: Guarantee = "exactly_once"
AT_LEAST_ONCE: Guarantee = "at_least_once"

Headers = list[tuple[str, bytes | None]]

_PREFIX_LEN = len(PREFIX)


def max_output_bytes(config: Mapping[str, Any], producer_config: Mapping[str, Any] | None) -> int:
    """The largest output (key, value, headers) the producer of these settings may send."""
    limit = {**config, **(producer_config or {})}.get("message.max.bytes")
    return DEFAULT_MAX_OUTPUT_BYTES if limit is None else int(limit) - RECORD_FRAMING_BYTES


# -- errors -------------------------------------------------------------------------------------------
class ProcessorError(StreamprovError):
    """The processor cannot go on; `kafka_error` keeps librdkafka's error (and its code) when there is one."""

    def __init__(self, message: str, kafka_error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error
        self.code: int | None = None if kafka_error is None else int(kafka_error.code())


class FatalProcessorError(ProcessorError):
    """librdkafka reported a fatal error: this producer/consumer can do nothing more; recreate it."""


class FencedError(FatalProcessorError):
    """A newer instance with our transactional.id or group.instance.id took over: this one is a zombie."""


def _fatal(what: str, err: KafkaError) -> FatalProcessorError:
    cls = FencedError if is_fenced(err) else FatalProcessorError
    return cls(f"{what}: {err.str()}", err)


_kafka_error = kafka_error


# -- values the loop passes around -----------------------------------------------------------------------
class MessageLike(Protocol):
    """The part of `confluent_kafka.Message` the transform reads (tests pass plain objects)."""

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...

    def key(self) -> Any: ...

    def value(self) -> Any: ...

    def headers(self) -> Any: ...

    def timestamp(self) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce: an output or a dead letter."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None = None
    dead_letter: bool = False


@dataclass
class ProcessorStats:
    """Counters of shipped work (a batch counts once it is committed or, at least once, delivered)."""

    records_in: int = 0
    records_out: int = 0
    dead_lettered: int = 0
    replayed: int = 0
    """Records read again after a restart, rebalance or rewind that had been processed before."""
    batches: int = 0
    commits: int = 0
    aborts: int = 0
    """Batches that could not be shipped and were processed again."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a reduce step keeps in its committed offsets' metadata, to resume without re-emitting.

    `position`: every record of the partition below it was processed (emitted, held in a window that
    the committed offset still covers, or dead-lettered). `watermark_ms`: the reducer's watermark then,
    which says which windows were already closed.
    """

    position: int
    watermark_ms: int

    VERSION = 1

    def encode(self) -> str:
        return json.dumps(
            {"streamprov": self.VERSION, "position": self.position, "watermark_ms": self.watermark_ms},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | bytes | None) -> Checkpoint | None:
        """The checkpoint in offset metadata; None when absent or written by something else."""
        if not text:
            return None
        try:
            data = json.loads(text)
            if isinstance(data, dict) and data.get("streamprov") == cls.VERSION:
                position, watermark = data["position"], data["watermark_ms"]
                if isinstance(position, int) and isinstance(watermark, int):
                    return cls(position, watermark)
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("ignoring offset metadata that is not a streamprov checkpoint: %.200r", text)
        return None


# -- the per-record logic, without Kafka ------------------------------------------------------------
_HEX = "hex:"


def group_key(key: bytes | None) -> str:
    """Reduce group of a record (also its output's DataID): its key as text, or `hex:` and the key's
    hex digits when it is not UTF-8 or itself starts with `hex:`, so no two keys share a group; ''
    for keyless records (no key, or an empty one). `key_of_group` gives the key back."""
    if not key:
        return ""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return _HEX + key.hex()
    return _HEX + key.hex() if text.startswith(_HEX) else text


def key_of_group(group: str) -> bytes | None:
    """The record key of a reduce group's output: the key its records had (None when keyless)."""
    if not group:
        return None
    return bytes.fromhex(group[len(_HEX) :]) if group.startswith(_HEX) else group.encode("utf-8")


def _coordinates(msg: MessageLike) -> tuple[str, int, int]:
    return msg.topic() or "", msg.partition() or 0, msg.offset() or 0


def _record_timestamp(msg: MessageLike) -> int | None:
    kind, ts = msg.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else int(ts)


class StepTransform:
    """One map or reduce step applied record by record: outputs and dead letters, no I/O.

    The processor feeds it consumed records in offset order and ships what it returns. Kept apart from
    the Kafka loop so the provenance and dead-letter decisions are testable without a broker.
    """

    def __init__(
        self,
        function: RegisteredFunction,
        *,
        output_topic: str,
        dead_letter_topic: str,
        params: Mapping[str, Any] | None = None,
        serde: Serde | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        window_ms: int | None = None,
        grace_ms: int = 0,
        verify_input: bool = True,
        key_by: Callable[[Any], str | bytes] | None = None,
        ledger: LedgerAppender | None = None,
        context: Context | None = None,
        device_id: str | None = None,
        signer: Signer | None = None,
        tracing: StepTracing | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.function = function
        self.max_output_bytes = max_output_bytes
        """An output larger than this (key, value, headers) is dead-lettered (`record_too_large`):
        the producer would refuse it, and the batch around it could never be shipped."""
        self.signer = signer
        """Signs every output header (`streamprov.sig`, see `streamprov.signing`)."""
        self.tracing = tracing
        """OpenTelemetry spans per record, trace context in the headers (`streamprov.telemetry`)."""
        self.params = dict(params or {})
        self.key_by = key_by
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self.algorithm = algorithm
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.verify_input = verify_input
        self.is_reduce = function.kind is StepKind.REDUCE
        self._stamper = MapStamper(function, self.params, algorithm, verify_input=False)
        self.recorder: StepRecorder | None = None
        """Records every application in the provenance ledger when a `ledger` writer is given."""
        if ledger is not None:
            self.recorder = StepRecorder(
                ledger, self._stamper.step, context=context, device_id=device_id, algorithm=algorithm
            )
        if self.is_reduce and (window_ms is None or window_ms <= 0):
            raise StreamprovError(f"reduce function {function.function_id!r} needs window_ms > 0")
        self.window_ms = window_ms or 0
        self.grace_ms = grace_ms
        self.reducer: WindowedReducer | None = self._new_reducer()
        self._closed_mark = self._mark(-1)

    def _new_reducer(self) -> WindowedReducer | None:
        if not self.is_reduce:
            return None
        return WindowedReducer(self.function, self.window_ms, self.grace_ms, self.params)

    # -- shared ------------------------------------------------------------------------------------
    def dead_letter(
        self, msg: MessageLike, error: BaseException, reason: DeadLetterReason | None = None
    ) -> Outgoing:
        """The record exactly as consumed, plus the dead-letter headers saying why and from where."""
        topic, partition, offset = _coordinates(msg)
        headers = dead_letter_headers(
            msg.headers(), reason or classify(error), error, source_of(topic, partition, offset)
        )
        key, value, fitted = fit(msg.key(), msg.value(), headers)
        return Outgoing(self.dead_letter_topic, key, value, fitted, dead_letter=True)

    def _check_header(self, record: InputRecord) -> ProvenanceHeader | None:
        """Validate the input's header before any work, so a bad header is reported as such.

        Returns the decoded header only when it had to be decoded (an older format); the hot path
        reads the current format in place, and its lineage through the memo.
        """
        raw = find_raw(record.headers)
        if raw is None:
            return None
        if raw[:_PREFIX_LEN] == PREFIX:
            *_, lineage_at = scan(raw)
            decode_lineage(raw[lineage_at:])
            if self.verify_input and not verify_value(raw, record.value):
                raise ChecksumMismatchError("input value does not match its header checksum", raw)
            return None
        header = ProvenanceHeader.decode(raw)
        if self.verify_input and not matches(header.checksum, record.value):
            raise ChecksumMismatchError("input value does not match its header checksum", raw)
        return header

    @property
    def _limit_text(self) -> str:
        return (
            f"more than the {self.max_output_bytes} an output may be (the producer's message.max.bytes "
            "or the output topic's max.message.bytes, less 1 KB for framing)"
        )

    def _load(self, value: bytes | None) -> Any:
        if value is None:
            raise SerdeError("record has no value (a tombstone)")
        try:
            return self.serde.loads(value)
        except SerdeError:
            raise
        except Exception as exc:  # a user-supplied serde may raise anything: it is still bad input
            raise SerdeError(f"{type(exc).__name__}: {exc}") from exc

    def _dump(self, value: Any) -> bytes:
        try:
            return self.serde.dumps(value)
        except SerdeError:
            raise
        except Exception as exc:
            raise SerdeError(f"{type(exc).__name__}: {exc}") from exc

    def process(
        self, msg: MessageLike, *, replayed: bool = False, closed_before_ms: int | None = None
    ) -> list[Outgoing]:
        """Outputs and dead letters for one consumed record.

        Reduce only: `replayed` marks a record read again after a restart that was processed before
        (it is never dead-lettered twice); `closed_before_ms` is the partition's checkpointed horizon
        (windows starting before it were already emitted).
        """
        if self.reducer is None:
            return [self._map(msg)]
        return self._reduce(msg, self.reducer, replayed, closed_before_ms)

    # -- map ---------------------------------------------------------------------------------------
    def _map(self, msg: MessageLike) -> Outgoing:
        started_ns = _time_ns() if self.tracing is not None else 0
        topic, partition, offset = _coordinates(msg)
        value = msg.value()
        record = InputRecord(value or b"", msg.headers(), msg.key(), topic, partition, offset)
        try:
            self._check_header(record)
        except HeaderError as exc:
            return self.dead_letter(msg, exc)
        try:
            obj = self._load(value)
        except SerdeError as exc:
            return self.dead_letter(msg, exc, DeadLetterReason.DESERIALIZATION_ERROR)
        try:
            result = self.function.apply(obj, params=self.params)
        except Exception as exc:  # the user's function: whatever it raises dead-letters the record
            return self.dead_letter(msg, exc, DeadLetterReason.PROCESSING_ERROR)
        try:
            output = self._dump(result)
            header = self._stamper.stamp(record, output)
        except SerdeError as exc:
            return self.dead_letter(msg, exc, DeadLetterReason.SERIALIZATION_ERROR)
        except HeaderError as exc:
            return self.dead_letter(msg, exc)
        headers = signed_headers(header, self.signer, msg.headers() or ())
        if self.tracing is not None:
            self.tracing.on_map(msg, headers, started_ns, self.function)
        key = msg.key()
        if self.key_by is not None:  # re-key (e.g. for a downstream reduce); the DataID stays in the header
            try:
                new_key = self.key_by(result)
                if not isinstance(new_key, str | bytes | None):
                    raise TypeError(f"key_by returned a {type(new_key).__name__}, not str, bytes or None")
            except Exception as exc:  # the user's key function: dead-letter, as for the step itself
                return self.dead_letter(msg, exc, DeadLetterReason.PROCESSING_ERROR)
            key = new_key.encode("utf-8") if isinstance(new_key, str) else new_key
        size = record_size(key, output, headers)
        if size > self.max_output_bytes:
            too_large = StreamprovError(
                f"the output is {size} bytes (key, value, headers), {self._limit_text}"
            )
            return self.dead_letter(msg, too_large, DeadLetterReason.RECORD_TOO_LARGE)
        if self.recorder is not None:  # a queue put; the ledger's own errors stop the batch (see Processor)
            self.recorder.record_map(find_raw(record.headers), record.value, header)
        # The input's timestamp carries over, so a downstream windowed step sees event time.
        return Outgoing(self.output_topic, key, output, headers, _record_timestamp(msg))

    # -- reduce ------------------------------------------------------------------------------------
    def _mark(self, watermark_ms: int) -> int:
        """Start of the first window not yet due at this watermark (windows before it close)."""
        if not self.is_reduce:
            return -1
        horizon = watermark_ms - self.grace_ms
        return horizon - horizon % self.window_ms

    def closed_before(self, watermark_ms: int) -> int:
        """Windows starting before this were closed when the reducer's watermark was `watermark_ms`."""
        return self._mark(watermark_ms) if watermark_ms >= 0 else -1

    def _reduce(
        self, msg: MessageLike, reducer: WindowedReducer, replayed: bool, closed_before_ms: int | None
    ) -> list[Outgoing]:
        topic, partition, offset = _coordinates(msg)
        value = msg.value()
        record = InputRecord(value or b"", msg.headers(), msg.key(), topic, partition, offset)
        try:
            header = self._check_header(record)
            if header is None:
                header = ProvenanceHeader.from_headers(record.headers) or ProvenanceHeader.for_source(
                    source_data_id(record.key, topic, partition, offset), record.value, self.algorithm
                )
            obj = self._load(value)
        except (HeaderError, SerdeError) as exc:
            return [] if replayed else [self.dead_letter(msg, exc)]
        timestamp = _record_timestamp(msg)
        ts = header.timestamp_ms if timestamp is None else timestamp
        if closed_before_ms is not None and reducer.window_of(ts)[0] < closed_before_ms:
            if replayed:  # its window was emitted before the restart
                return []
            late = LateRecordError(
                f"record at {ts} ms for key {group_key(msg.key())!r} belongs to a window that was "
                f"emitted before the restart (windows before {closed_before_ms} are closed)"
            )
            return [self.dead_letter(msg, late, DeadLetterReason.LATE_RECORD)]
        group = group_key(msg.key())
        try:
            reducer.add(group, header, obj, ts, (topic, partition, offset))
        except LateRecordError as exc:
            return [] if replayed else [self.dead_letter(msg, exc, DeadLetterReason.LATE_RECORD)]
        except Exception as exc:  # the user's function raised inside the reducer
            return [] if replayed else [self.dead_letter(msg, exc, DeadLetterReason.PROCESSING_ERROR)]
        if self.tracing is not None:
            window = (group, reducer.window_of(ts)[0])
            self.tracing.on_reduce_input(msg, window, header.data_id, self.function)
        if self.recorder is not None:  # the full input list of the window, for its ledger entry
            self.recorder.add_input((group, reducer.window_of(ts)[0]), header.data_id, header.checksum)
        return self._close_due(reducer)

    def _close_due(self, reducer: WindowedReducer) -> list[Outgoing]:
        # Closing after every record that moves the horizon (not once per batch) makes what a window
        # holds independent of how records were batched, so a replay decides it the same way.
        mark = self._mark(reducer.watermark_ms)
        if mark == self._closed_mark:
            return []
        self._closed_mark = mark
        return self._emit(reducer.close_due())

    def _window_dead_letter(
        self,
        window: ReduceOutput,
        key: bytes | None,
        value: bytes,
        reason: DeadLetterReason,
        error: BaseException | str,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> Outgoing:
        """A window's result that cannot be an output: no input record to set aside, so the result
        itself, with why and which window, cut to fit (`fit`); its ledger entry is dropped."""
        where = f"window {window.key}@[{window.window[0]},{window.window[1]})"
        dl_key, dl_value, fitted = fit(key, value, dead_letter_headers(headers, reason, error, where))
        if self.recorder is not None:
            self.recorder.forget((window.key, window.window[0]))
        return Outgoing(self.dead_letter_topic, dl_key, dl_value, fitted, None, True)

    def _emit(self, closed: list[ReduceOutput]) -> list[Outgoing]:
        out: list[Outgoing] = []
        for window in closed:
            key = key_of_group(window.key)
            try:
                value = self._dump(window.value)
            except SerdeError as exc:
                # No input record to set aside: dead-letter the window's result as text, never drop it.
                log.error("reduce result of %r %s is not serialisable: %s", window.key, window.window, exc)
                reason = DeadLetterReason.SERIALIZATION_ERROR
                out.append(self._window_dead_letter(window, key, repr(window.value).encode(), reason, exc))
                continue
            stamped = window.header(self.function, self.params, value, self.algorithm)
            out_headers = signed_headers(stamped.encode(), self.signer)
            size = record_size(key, value, out_headers)
            if size > self.max_output_bytes:  # the result itself, cut to fit, with why and which window
                log.error("reduce result of %r %s: %d bytes, dead-lettered", window.key, window.window, size)
                error = f"the result is {size} bytes, {self._limit_text}"
                reason = DeadLetterReason.RECORD_TOO_LARGE
                out.append(self._window_dead_letter(window, key, value, reason, error, out_headers))
                continue
            if self.recorder is not None:
                self.recorder.record_reduce((window.key, window.window[0]), stamped)
            if self.tracing is not None:
                self.tracing.on_reduce_output((window.key, window.window[0]), out_headers, self.function)
            out.append(Outgoing(self.output_topic, key, value, out_headers, window.window[1] - 1))
        return out

    @property
    def watermark_ms(self) -> int:
        return -1 if self.reducer is None else self.reducer.watermark_ms

    def open_offsets(self) -> dict[TopicPartitionKey, int]:
        return {} if self.reducer is None else self.reducer.open_offsets()

    @property
    def open_windows(self) -> int:
        return 0 if self.reducer is None else len(self.reducer)

    def reset(self, watermark_ms: int = -1) -> None:
        """Drop every open window (they are rebuilt by replay) and resume at `watermark_ms`."""
        self.reducer = self._new_reducer()
        if self.recorder is not None:
            self.recorder.drop_windows()
        self._closed_mark = self._mark(-1)
        if self.reducer is not None and watermark_ms >= 0:
            self.reducer.advance_watermark(watermark_ms)
            self._closed_mark = self._mark(watermark_ms)
            self.reducer.close_due()  # nothing is open: this only records which windows are closed

    def flush(self) -> list[Outgoing]:
        """Emit every open window now (end of input) and mark them closed, so no later record reopens them."""
        if self.reducer is None or not len(self.reducer):
            return []
        closed = self.reducer.close_all()
        last_end = max(w.window[1] for w in closed)
        self.reducer.advance_watermark(last_end + self.grace_ms)
        self._closed_mark = self._mark(self.reducer.watermark_ms)
        self.reducer.close_due()
        return self._emit(closed)


# -- the Kafka loop --------------------------------------------------------------------------------------
@dataclass
class _PartitionState:
    position: int | None = None
    """Next offset to process."""
    resume: int | None = None
    """Where to seek back to when uncommitted work is undone: the committed offset, else the first read."""
    committed: int | None = None
    committed_meta: str | None = None
    consumed: bool = False
    replay_end: int = -1
    closed_before: int | None = None


@dataclass
class _Batch:
    """What one batch sent so far, and whether its transaction is open."""

    sent: int = 0
    dead_letters: int = 0
    in_transaction: bool = False
    failed: list[KafkaError] = field(default_factory=list)
    ledger: FlushWaiter | None = None
    """The ledger flush of this batch's applications: waited for before the offsets commit."""

    def ledger_durable(self) -> None:
        if self.ledger is not None:
            self.ledger.wait()

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:  # a librdkafka callback: record, act after flush()
            self.failed.append(err)


class Processor:
    """Consume, apply a registered function, stamp provenance, produce; exactly or at least once.

    `config` holds librdkafka settings shared by the consumer and the producer (bootstrap.servers,
    security); `consumer_config` / `producer_config` add client-specific ones. The processor sets what
    its guarantee depends on (auto-commit off, idempotence, transactional.id, read_committed).
    Several processors in one group need distinct `transactional_id`s; keep each one stable across
    restarts so a restart fences its predecessor and aborts the transaction it left open.
    `key_by` (map only) picks each output's key from the function's result, like Kafka Streams'
    selectKey, so a downstream reduce can group by it; the DataID stays in the provenance header.

    `ledger` (optional) records every application in the provenance ledger with `ledger_context` and
    `device_id` (default: STREAMPROV_DEVICE_ID, POD_NAME, HOSTNAME, else the host name). Appends are
    queue puts; the ledger is flushed before every offset commit (exactly once: before
    `commit_transaction`; at least once: before the offset commit), overlapped with the batch's own
    flush, so an entry is never lost to a crash. The caller owns the writer (start and close it).
    When the ledger cannot keep up (backpressure, a flush timeout) the batch is redone like any batch
    that could not be shipped; when it failed for good the processor stops with `ProcessorError`.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        group_id: str,
        input_topics: Sequence[str] | str,
        output_topic: str,
        dead_letter_topic: str,
        function: RegisteredFunction,
        params: Mapping[str, Any] | None = None,
        serde: Serde | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        guarantee: Guarantee = EXACTLY_ONCE,
        transactional_id: str | None = None,
        batch_size: int = 500,
        poll_timeout_s: float = 0.5,
        window_ms: int | None = None,
        grace_ms: int = 0,
        flush_windows_on_stop: bool = False,
        verify_input: bool = True,
        operation_timeout_s: float = 30.0,
        max_consecutive_failures: int = 10,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        key_by: Callable[[Any], str | bytes] | None = None,
        ledger: LedgerAppender | None = None,
        ledger_context: Context | None = None,
        device_id: str | None = None,
        signer: Signer | None = None,
        tracing: StepTracing | None = None,
    ) -> None:
        topics = [input_topics] if isinstance(input_topics, str) else list(input_topics)
        if not topics or not all(topics):
            raise StreamprovError("a processor needs at least one input topic")
        if not output_topic or not dead_letter_topic or not group_id:
            raise StreamprovError("a processor needs an output topic, a dead-letter topic and a group id")
        if guarantee not in (EXACTLY_ONCE, AT_LEAST_ONCE):
            raise StreamprovError(
                f"guarantee must be {EXACTLY_ONCE!r} or {AT_LEAST_ONCE!r}, not {guarantee!r}"
            )
        if batch_size <= 0 or poll_timeout_s <= 0 or operation_timeout_s <= 0:
            raise StreamprovError("batch_size, poll_timeout_s and operation_timeout_s must be positive")
        self.group_id = group_id
        self.input_topics = topics
        self.guarantee: Guarantee = guarantee
        self.exactly_once = guarantee == EXACTLY_ONCE
        self.transactional_id = transactional_id or f"streamprov-{group_id}-{','.join(sorted(topics))}"
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.flush_windows_on_stop = flush_windows_on_stop
        self.operation_timeout_s = operation_timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self._bootstrap = str(config.get("bootstrap.servers", "?"))
        self._admin_config = {
            k: v
            for k, v in self._common(config, producer_config).items()
            if k not in ("transactional.id", "enable.idempotence", "acks", "linger.ms")
        }
        self.transform = StepTransform(
            function,
            output_topic=output_topic,
            dead_letter_topic=dead_letter_topic,
            params=params,
            serde=serde,
            algorithm=algorithm,
            window_ms=window_ms,
            grace_ms=grace_ms,
            verify_input=verify_input,
            key_by=key_by,
            ledger=ledger,
            context=ledger_context,
            device_id=device_id,
            signer=signer,
            tracing=tracing,
            max_output_bytes=max_output_bytes(config, producer_config),
        )
        self.stats = ProcessorStats()
        try:
            self._consumer = Consumer(self._consumer_settings(config, consumer_config))
        except KafkaException as exc:
            raise ProcessorError(f"bad consumer configuration: {exc}", _kafka_error(exc)) from exc
        try:
            self._producer = Producer(self._producer_settings(config, producer_config))
        except KafkaException as exc:
            self._consumer.close()
            raise ProcessorError(f"bad producer configuration: {exc}", _kafka_error(exc)) from exc
        self._parts: dict[TopicPartitionKey, _PartitionState] = {}
        self._rebalance = RebalanceEvents()
        self._fatal: KafkaError | None = None
        self._stop = threading.Event()
        self._started = False
        self._closed = False
        self._failures = 0

    # -- configuration ---------------------------------------------------------------------------------
    def _common(self, config: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
        settings = {**config, **(extra or {})}
        settings.setdefault("error_cb", self._on_error)
        settings.setdefault("logger", KAFKA_LOG)  # librdkafka's own log lines, repeats held back
        return settings

    def _consumer_settings(
        self, config: Mapping[str, Any], extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        settings = self._common(config, extra)
        settings["group.id"] = self.group_id
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        settings.setdefault("auto.offset.reset", "earliest")
        settings.setdefault("enable.partition.eof", False)
        if self.exactly_once:
            settings["isolation.level"] = "read_committed"
        else:
            settings.setdefault("isolation.level", "read_committed")
        return settings

    def _producer_settings(
        self, config: Mapping[str, Any], extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        settings = self._common(config, extra)
        for key in (
            "group.id",
            "group.instance.id",
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "auto.offset.reset",
            "isolation.level",
            "max.poll.interval.ms",
        ):
            settings.pop(key, None)  # consumer-only keys would only make librdkafka warn
        settings["enable.idempotence"] = True
        settings["acks"] = "all"
        settings.setdefault("linger.ms", 5)
        if self.exactly_once:
            settings["transactional.id"] = self.transactional_id
        return settings

    # -- librdkafka callbacks: record state only -------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("fatal Kafka error: %s", err.str())
        else:
            KAFKA_LOG.warning("Kafka error: %s", err.str())

    # -- lifecycle -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run()` to return after the current batch; safe from signal handlers and other threads."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and release the clients; work not committed is redone by the next owner."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer: %s", exc)
        try:
            self._producer.flush(self.operation_timeout_s)
        except (KafkaException, RuntimeError) as exc:
            log.warning("flushing the producer: %s", exc)

    def __enter__(self) -> Processor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._started:
            return
        if self.exactly_once:
            try:
                self._call(
                    "init_transactions", lambda: self._producer.init_transactions(self.operation_timeout_s)
                )
            except KafkaException as exc:
                err = _kafka_error(exc)
                raise ProcessorError(
                    f"cannot start transactions: {err.str()}. Check that the brokers at "
                    f"{self._bootstrap} are reachable and the transaction state topic is available",
                    err,
                ) from exc
        self._fit_output_topic()
        rebalance = self._rebalance
        self._consumer.subscribe(
            self.input_topics,
            on_assign=rebalance.on_assign,
            on_revoke=rebalance.on_revoke,
            on_lost=rebalance.on_lost,
        )
        self._started = True
        log.info(
            "processor %s: %s -> %s (%s, %s)",
            self.transform.function.function_id,
            ",".join(self.input_topics),
            self.transform.output_topic,
            self.guarantee,
            "reduce" if self.transform.is_reduce else "map",
        )

    def _fit_output_topic(self) -> None:
        """Lower the output size limit to the output topic's `max.message.bytes` when that is below
        the producer's: the broker refuses a larger record, the batch is retried until the processor
        gives up, and on every restart again (found by probing); checked once, at start."""
        transform = self.transform
        lower = record_limit_below(
            self._admin_config,
            transform.output_topic,
            transform.max_output_bytes,
            timeout_s=self.operation_timeout_s,
        )
        if lower is not None:
            transform.max_output_bytes = lower
            log.info(
                "output topic %s takes records of at most %d bytes less framing (max.message.bytes): "
                "larger outputs are dead-lettered as record_too_large",
                transform.output_topic,
                lower,
            )

    def run(
        self,
        max_records: int | None = None,
        idle_timeout_s: float | None = None,
        stop_event: threading.Event | None = None,
    ) -> ProcessorStats:
        """Process until stopped, `max_records` records were shipped, or nothing arrived for `idle_timeout_s`.

        Returns the cumulative stats. On return every shipped batch is committed; open reduce windows
        stay open (and uncommitted) unless `flush_windows_on_stop` is set.
        """
        if self._closed:
            raise ProcessorError("the processor is closed")
        self._start()
        try:
            self._loop(max_records, idle_timeout_s, stop_event)
        except FatalProcessorError:
            self.close()  # a fatal client is unusable; a fenced one must not touch the group again
            raise
        finally:
            self._stop.clear()
        return self.stats

    def _loop(
        self, max_records: int | None, idle_timeout_s: float | None, stop_event: threading.Event | None
    ) -> None:
        start_in = self.stats.records_in
        last_activity = time.monotonic()
        while not self._stop.is_set() and not (stop_event is not None and stop_event.is_set()):
            done = self.stats.records_in - start_in
            if max_records is not None and done >= max_records:
                break
            if idle_timeout_s is not None and time.monotonic() - last_activity >= idle_timeout_s:
                log.info("idle for %.1f s: stopping", idle_timeout_s)
                break
            if self._fatal is not None:
                raise _fatal("Kafka client", self._fatal)
            want = self.batch_size if max_records is None else min(self.batch_size, max_records - done)
            messages = self._consume(want)
            dropped: set[TopicPartitionKey] = set()
            if self._rebalance.pending:
                dropped = self._apply_rebalance()
                last_activity = time.monotonic()
            batch = self._accept(messages, dropped)
            if batch:
                last_activity = time.monotonic()
            self._process(batch)
            self._producer.poll(0)
        if self.flush_windows_on_stop and self.transform.open_windows:
            self._flush_windows()

    def _consume(self, count: int) -> list[Any]:
        try:
            return list(self._consumer.consume(count, self.poll_timeout_s))
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err.fatal():
                raise _fatal("consume", err) from exc
            raise ProcessorError(f"consume failed: {err.str()}", err) from exc

    # -- rebalance, acted on outside the callbacks ------------------------------------------------------
    def _apply_rebalance(self) -> set[TopicPartitionKey]:
        """Apply recorded assignments/revocations; returns partitions whose batch messages must be dropped."""
        events = self._rebalance.drain()
        added: set[TopicPartitionKey] = set()
        revoked = False
        for kind, tps in events:
            log.info("partitions %s: %s", "assigned" if kind == "assign" else "revoked", sorted(tps))
            for tp in tps:
                if kind == "assign":
                    self._parts[tp] = _PartitionState()
                    added.add(tp)
                else:
                    revoked |= self._parts.pop(tp, None) is not None
                    added.discard(tp)
        if not self.transform.is_reduce:
            return set()  # every finished batch is committed: nothing in memory depends on a partition
        if added:
            self._load_checkpoints(added)
        if revoked:
            # Open windows may mix partitions: drop them all and rebuild the kept partitions by replay.
            return self._rewind()
        if added and not self.transform.open_windows:
            self.transform.reset(self._restore_watermark())
        return set()

    def _load_checkpoints(self, tps: set[TopicPartitionKey]) -> None:
        wanted = [TopicPartition(t, p) for t, p in sorted(tps)]
        found: list[TopicPartition] = self._with_retries(
            "committed", lambda: self._consumer.committed(wanted, timeout=self.operation_timeout_s)
        )
        for tp in found:
            st = self._parts.get((tp.topic, tp.partition))
            if st is None:
                continue
            if tp.error is not None:
                log.warning("committed offset of %s/%s: %s", tp.topic, tp.partition, tp.error)
                continue
            if tp.offset >= 0:
                st.committed = st.resume = st.position = tp.offset
            st.committed_meta = tp.metadata
            self._arm_replay(st)

    def _arm_replay(self, st: _PartitionState) -> None:
        checkpoint = Checkpoint.decode(st.committed_meta)
        if checkpoint is None:
            st.replay_end, st.closed_before = -1, None
        else:
            st.replay_end = checkpoint.position
            st.closed_before = self.transform.closed_before(checkpoint.watermark_ms)

    def _restore_watermark(self) -> int:
        # The lowest across owned partitions: another partition's windows must not turn late.
        marks = []
        for st in self._parts.values():
            checkpoint = Checkpoint.decode(st.committed_meta) if st.committed_meta else None
            marks.append(checkpoint.watermark_ms if checkpoint is not None else -1)
        return min(marks, default=-1)

    def _rewind(self) -> set[TopicPartitionKey]:
        """Undo uncommitted work: seek every partition read so far back to where it is committed."""
        rewound: set[TopicPartitionKey] = set()
        for tp, st in self._parts.items():
            if st.consumed and st.resume is not None:
                self._seek(tp, st.resume)
                st.position = st.resume
                rewound.add(tp)
            if self.transform.is_reduce:
                self._arm_replay(st)
        if self.transform.is_reduce:
            self.transform.reset(self._restore_watermark())
        log.info("rewound %d partition(s) to their committed offsets", len(rewound))
        return rewound

    def _seek(self, tp: TopicPartitionKey, offset: int) -> None:
        try:
            seek_retrying(self._consumer, tp[0], tp[1], offset, self.operation_timeout_s)
        except KafkaException as exc:
            raise ProcessorError(f"cannot seek {tp[0]}/{tp[1]} to {offset}", _kafka_error(exc)) from exc

    # -- batches -----------------------------------------------------------------------------------------
    def _accept(self, messages: list[Any], dropped: set[TopicPartitionKey]) -> list[Any]:
        accepted = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise _fatal("consume", err)
                log.warning("consumer error: %s", err.str())
                continue
            tp = (msg.topic(), msg.partition())
            st = self._parts.get(tp)
            offset = msg.offset()
            if st is None or tp in dropped or (st.position is not None and offset < st.position):
                continue  # not ours any more, or from before a seek: it will come again
            if st.resume is None:
                st.resume = offset
            st.position = offset + 1
            st.consumed = True
            accepted.append(msg)
        return accepted

    def _process(self, batch: list[Any]) -> None:
        replayed = 0

        def transform(work: _Batch) -> None:
            nonlocal replayed
            for msg in batch:
                st = self._parts[(msg.topic(), msg.partition())]
                again = msg.offset() < st.replay_end
                replayed += again
                for out in self.transform.process(msg, replayed=again, closed_before_ms=st.closed_before):
                    self._send(work, out)

        if self._ship(transform):
            self.stats.records_in += len(batch)
            self.stats.replayed += replayed

    def _failed(self) -> None:
        self.stats.aborts += 1
        self._failures += 1
        if self._failures > self.max_consecutive_failures:
            raise ProcessorError(f"{self._failures} batches in a row could not be shipped; giving up")
        self._rewind()

    def _offsets_to_commit(self) -> list[TopicPartition]:
        """Positions that moved since the last commit; a reduce never commits past an open window."""
        held = self.transform.open_offsets()
        watermark = self.transform.watermark_ms
        offsets = []
        for (topic, partition), st in self._parts.items():
            if st.position is None or not st.consumed:
                continue
            offset = min(held.get((topic, partition), st.position), st.position)
            meta = None
            if self.transform.is_reduce:
                meta = Checkpoint(max(st.position, st.replay_end), watermark).encode()
            if offset != st.committed or meta != st.committed_meta:
                tp = TopicPartition(topic, partition, offset)
                if meta is not None:
                    tp = TopicPartition(topic, partition, offset, metadata=meta)
                offsets.append(tp)
        return offsets

    def _flush_windows(self) -> None:
        outgoing = self.transform.flush()
        log.info("stop: flushing %d open window(s)", len(outgoing))

        def send(work: _Batch) -> None:
            for out in outgoing:
                self._send(work, out)

        if not self._ship(send):
            log.warning(
                "the flushed windows could not be shipped: they are rebuilt from the input on restart"
            )

    # -- shipping ------------------------------------------------------------------------------------------
    def _ship(self, produce: Callable[[_Batch], None]) -> bool:
        """Run `produce` (which sends outputs as they are made) and commit it with the input offsets.

        Exactly once, the transaction begins with the first output (after `consume()` returned) and
        ends with the offsets; at least once, every delivery is confirmed before offsets are committed.
        False when nothing of the batch was committed: the partitions were rewound to redo it.
        """
        work = _Batch()
        try:
            produce(work)
            offsets = self._offsets_to_commit()
            recorder = self.transform.recorder
            if not work.sent and not offsets and (recorder is None or not recorder.unflushed):
                return True
            # The ledger flushes on its own thread while the batch is delivered / its offsets sent.
            work.ledger = recorder.begin_flush(self.operation_timeout_s) if recorder is not None else None
            committed = self._finish(work, offsets)
        except (LedgerBackpressureError, LedgerTimeoutError) as exc:
            log.warning("the provenance ledger did not keep up (%s): processing the batch again", exc)
            if work.in_transaction:
                self._abort()
            self._failed()
            return False
        except LedgerWriterError as exc:  # failed for good, or closed: nothing can be recorded
            if work.in_transaction:
                self._abort_quietly()
            raise ProcessorError(f"the provenance ledger failed: {exc}") from exc
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err.fatal():
                raise _fatal("transaction" if self.exactly_once else "produce", err) from exc
            log.warning("batch failed (%s): processing it again", err.str())
            if work.in_transaction:
                self._abort()
            self._failed()
            return False
        except BaseException as exc:
            if work.in_transaction and not isinstance(exc, FatalProcessorError):
                self._abort_quietly()
            raise
        if committed is None:  # at least once, a delivery failed: not committed, redo the batch
            self._failed()
            return False
        self._failures = 0
        self.stats.batches += 1
        self.stats.records_out += work.sent - work.dead_letters
        self.stats.dead_lettered += work.dead_letters
        if committed:
            self.stats.commits += 1
            for tp in offsets:
                owned = self._parts.get((tp.topic, tp.partition))
                if owned is not None:
                    owned.committed = owned.resume = tp.offset
                    owned.committed_meta = tp.metadata
        return True

    def _send(self, work: _Batch, out: Outgoing) -> None:
        if self.exactly_once and not work.in_transaction:
            self._call("begin_transaction", self._producer.begin_transaction)
            work.in_transaction = True
        self._produce(out, None if self.exactly_once else work.on_delivery)
        work.sent += 1
        work.dead_letters += out.dead_letter

    def _finish(self, work: _Batch, offsets: list[TopicPartition]) -> bool | None:
        """Commit the batch: True committed, False delivered but offsets not committed, None not delivered."""
        if not self.exactly_once:
            return self._deliver_then_commit(work, offsets)
        producer, timeout = self._producer, self.operation_timeout_s
        if not work.in_transaction:  # offsets only (a reduce holding its records, dead letters aside)
            self._call("begin_transaction", producer.begin_transaction)
            work.in_transaction = True
        if offsets:
            self._call(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(
                    offsets, self._consumer.consumer_group_metadata(), timeout
                ),
            )
        work.ledger_durable()  # the entries of what this transaction commits are stored first
        self._call("commit_transaction", lambda: producer.commit_transaction(timeout))
        work.in_transaction = False
        return bool(offsets)

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except Exception:  # already failing: keep the original error
            log.exception("abort_transaction failed")

    def _abort(self) -> None:
        try:
            self._call(
                "abort_transaction", lambda: self._producer.abort_transaction(self.operation_timeout_s)
            )
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err.fatal():
                raise _fatal("abort_transaction", err) from exc
            if err.code() != KafkaError._STATE:  # _STATE: no transaction was open
                raise ProcessorError(f"abort_transaction failed: {err.str()}", err) from exc

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        """A transactional API call, repeated while librdkafka says the error is retriable."""
        attempts = 0
        while True:
            try:
                return call()
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err.fatal():
                    raise _fatal(what, err) from exc
                if (
                    err.txn_requires_abort()
                    or not err.retriable()
                    or attempts >= self.max_consecutive_failures
                    or self._stop.is_set()  # asked to stop (SIGTERM): do not wait out every retry
                ):
                    raise
                attempts += 1
                log.info("%s: retriable error %s (attempt %d)", what, err.str(), attempts)
                time.sleep(min(0.05 * 2**attempts, 2.0))

    def _with_retries(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return self._call(what, call)
        except KafkaException as exc:
            err = _kafka_error(exc)
            raise ProcessorError(f"{what} failed: {err.str()}", err) from exc

    def _produce(self, out: Outgoing, on_delivery: Callable[[KafkaError | None, Any], None] | None) -> None:
        enqueued = produce_blocking(
            self._producer,
            out.topic,
            out.value,
            out.key,
            headers=out.headers,
            on_delivery=on_delivery,
            timestamp_ms=out.timestamp_ms,
            timeout_s=self.operation_timeout_s,
        )
        if not enqueued:
            raise ProcessorError("the producer queue stayed full")

    def _deliver_then_commit(self, work: _Batch, offsets: list[TopicPartition]) -> bool | None:
        remaining = self._producer.flush(self.operation_timeout_s)
        if remaining or work.failed:
            for err in work.failed:
                if err.fatal():
                    raise _fatal("delivery", err)
            log.warning(
                "%d record(s) not delivered (%d still queued, first error %s): not committing, "
                "processing the batch again",
                len(work.failed),
                remaining,
                work.failed[0].str() if work.failed else "timeout",
            )
            return None
        work.ledger_durable()  # the entries of what these offsets cover are stored first
        return self._commit_offsets(offsets) if offsets else False

    def _commit_offsets(self, offsets: list[TopicPartition]) -> bool:
        try:
            result = self._call("commit", lambda: self._consumer.commit(offsets=offsets, asynchronous=False))
        except KafkaException as exc:
            err = _kafka_error(exc)
            # Typically a rebalance: the records are delivered, the partition's next owner redoes them.
            log.warning("offset commit failed (%s): those records will be processed again", err.str())
            return False
        errors = [tp for tp in result or () if tp.error is not None]
        if errors:
            log.warning(
                "offset commit failed for %s", [(tp.topic, tp.partition, str(tp.error)) for tp in errors]
            )
            return False
        return True
