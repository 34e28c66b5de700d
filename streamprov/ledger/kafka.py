"""The ledger on Kafka: the topic is the source of truth (replicated, append-only), one writer owns it.

Topic rules (`LEDGER_TOPIC_CONFIG`, `create_ledger_topic`):

- exactly one partition: hash chaining needs one total order and a single sequencer;
- never compacted and never expired (`cleanup.policy=delete`, `retention.ms=-1`,
  `retention.bytes=-1`): compaction or retention would delete entries, which verification reports
  as tampering (and the index could not be rebuilt).

`KafkaLedgerSink` is the writer's storage: an idempotent producer (acks=all, gapless: librdkafka
raises a fatal error rather than leave a hole; its warning that the setting is "experimental" is
dropped from `KAFKA_LOG`),
so a retried batch is neither duplicated nor reordered. Give it a `transactional_id` and Kafka also
fences a zombie: a second writer with the same id aborts the first one's open transaction and makes
it fail, so two writers can never fork the chain; each batch is then one transaction and readers
read committed records only. On start it reads
the topic's tail to continue the chain (from the last checkpoint, which carries the Merkle frontier).

`KafkaLedgerReader` reads the records back in order, without joining a consumer group.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamprov.agents.kafka_io import KAFKA_LOG, kafka_error, list_all_topics
from streamprov.ledger.chain import ChainState, resume_state
from streamprov.ledger.codec import encode_record, record_key, stored
from streamprov.ledger.errors import (
    ChainError,
    LedgerError,
    LedgerTimeoutError,
    LedgerWriteFailedError,
    LedgerWriterError,
)
from streamprov.ledger.model import LedgerRecord, StoredRecord

logger = logging.getLogger(__name__)

LEDGER_TOPIC_CONFIG: dict[str, str] = {
    "cleanup.policy": "delete",
    "retention.ms": "-1",
    "retention.bytes": "-1",
}
KafkaConfig = Mapping[str, Any] | str
"""librdkafka settings, or just the bootstrap servers."""
Isolation = Literal["read_committed", "read_uncommitted"]
ExtraRecord = tuple[str, bytes | None, bytes, list[tuple[str, str | bytes | None]]]
"""(topic, key, value, headers): a record produced in a ledger transaction besides the entries."""

_TAIL_WINDOW = 4096
_BUFFER_FULL_WAIT_S = 0.05


def client_config(config: KafkaConfig) -> dict[str, Any]:
    """librdkafka settings from a bootstrap address or settings, logging through `KAFKA_LOG`."""
    conf: dict[str, Any] = {"bootstrap.servers": config} if isinstance(config, str) else dict(config)
    conf.setdefault("logger", KAFKA_LOG)  # librdkafka's own log lines, repeats held back
    return conf


def create_ledger_topic(
    config: KafkaConfig, topic: str, *, replication_factor: int = 1, timeout_s: float = 30.0
) -> None:
    """Create the ledger topic with the settings a ledger needs (one partition, kept forever).

    Production clusters want replication_factor=3 and min.insync.replicas=2 (acks=all then waits
    for two copies). An existing topic is left as it is.
    """
    admin = AdminClient(client_config(config))
    new = NewTopic(topic, num_partitions=1, replication_factor=replication_factor, config=LEDGER_TOPIC_CONFIG)
    futures = admin.create_topics([new], operation_timeout=timeout_s, request_timeout=timeout_s)
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return
        raise LedgerError(f"cannot create ledger topic {topic}: {exc}") from exc


Pause = Callable[[float], bool]
"""Waits up to the given seconds, and says False when the caller was asked to stop in the meantime
(`ServiceState.pause`): how a start-up wait stays stop-aware."""
METADATA_ATTEMPT_S = 1.0
"""How long one metadata request may wait: a start-up check asks again and again until its deadline,
so a stop request is seen within about this long."""


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def list_topics_within(config: dict[str, Any], timeout_s: float, *, pause: Pause | None = None) -> Any:
    """Every topic of the cluster (`list_all_topics`: naming a topic may create it), asked in attempts
    of at most `METADATA_ATTEMPT_S` until `timeout_s` has passed; between attempts it waits with
    `pause` and returns None as soon as that says stop. Raises `LedgerError` naming the brokers and
    what to check when none answers (librdkafka's `KafkaException` never escapes)."""
    wait = pause or _sleep
    deadline = time.monotonic() + timeout_s
    admin = AdminClient(config)
    while wait(0):
        started = time.monotonic()
        attempt = max(0.1, min(METADATA_ATTEMPT_S, deadline - started))
        try:
            return list_all_topics(admin, attempt)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err.fatal() or time.monotonic() >= deadline:
                raise LedgerError(
                    f"cannot list the topics on {config.get('bootstrap.servers', '?')} within "
                    f"{timeout_s:g} s ({err.str()}): check the bootstrap servers and that the brokers "
                    "are up and reachable from here"
                ) from exc
        rest = started + attempt - time.monotonic()  # an attempt that failed at once: not a busy loop
        if rest > 0 and not wait(rest):
            break
    return None


def check_topic_exists(
    config: dict[str, Any], topic: str, timeout_s: float, *, what: str, pause: Pause | None = None
) -> Any:
    """The topic's metadata; raises `LedgerError` when it does not exist (a transaction producing to
    a missing topic fails every time it is retried: better refused at start) or the brokers do not
    answer within `timeout_s`. None when `pause` says stop first (see `list_topics_within`)."""
    topics = list_topics_within(config, timeout_s, pause=pause)
    return None if topics is None else topic_metadata(topics, topic, what=what)


def topic_metadata(topics: dict[str, Any], topic: str, *, what: str) -> Any:
    """`topic`'s metadata among `list_all_topics`; `LedgerError` when it is not there."""
    md = topics.get(topic)
    if md is None or md.error is not None:
        raise LedgerError(f"{what} {topic} is not available: {md.error if md else 'unknown topic'}")
    return md


def check_single_partition(
    config: dict[str, Any],
    topic: str,
    timeout_s: float,
    *,
    what: str = "ledger topic",
    why: str = "a hash-chained ledger needs exactly one (one total order, one sequencer)",
    pause: Pause | None = None,
) -> bool:
    """Raise `LedgerError` unless `topic` exists with exactly one partition; False when `pause` said
    stop before it could tell."""
    md = check_topic_exists(config, topic, timeout_s, what=what, pause=pause)
    if md is None:
        return False
    single_partition(md, what=what, why=why)
    return True


def single_partition(md: Any, *, what: str, why: str) -> None:
    if len(md.partitions) != 1:
        raise LedgerError(f"{what} {md.topic} has {len(md.partitions)} partitions; {why}")


class KafkaLedgerReader:
    """Reads a ledger topic's records in order, from an offset up to what is stored at the call."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        *,
        isolation: Isolation = "read_committed",
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.config = client_config(config)
        self.topic = topic
        self.isolation = isolation
        self.idle_timeout_s = idle_timeout_s

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                **self.config,
                "group.id": f"streamprov-ledger-reader-{uuid.uuid4().hex[:12]}",  # never joined
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": self.isolation,
                "auto.offset.reset": "earliest",
            }
        )

    def watermarks(self, timeout_s: float = 10.0) -> tuple[int, int]:
        consumer = self._consumer()
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=timeout_s)
        except KafkaException as exc:
            raise LedgerError(f"cannot read the offsets of ledger topic {self.topic}: {exc}") from exc
        finally:
            consumer.close()
        return int(low), int(high)

    def read(self, start_offset: int = 0) -> Iterator[StoredRecord]:
        """Stored records from `start_offset` to the end of the partition as seen when reading it.

        Raises `LedgerError` when the broker fails or nothing arrives for `idle_timeout_s`.
        """
        _, high = self.watermarks()
        if start_offset >= high:
            return
        consumer = self._consumer()
        try:
            consumer.assign([TopicPartition(self.topic, 0, start_offset)])
            idle_since = time.monotonic()
            while True:  # ends at end-of-partition, at the high watermark, or after idle_timeout_s
                batch: list[Message] = consumer.consume(num_messages=1000, timeout=0.5)
                if not batch:
                    if time.monotonic() - idle_since > self.idle_timeout_s:
                        raise LedgerError(
                            f"ledger topic {self.topic}: nothing read for {self.idle_timeout_s}s "
                            f"(reading from offset {start_offset})"
                        )
                    continue
                idle_since = time.monotonic()
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return
                        raise LedgerError(f"reading ledger topic {self.topic}: {err}")
                    offset = msg.offset()
                    if offset is None:  # only error events lack an offset; handled above
                        continue
                    yield stored(offset, msg.value())
                    if offset >= high - 1:
                        return
        finally:
            consumer.close()


class KafkaLedgerSink:
    """The writer's storage on Kafka; see the module docstring. Used from the writer thread only."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        *,
        transactional_id: str | None = None,
        producer_config: Mapping[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.config = client_config(config)
        self.topic = topic
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        settings: dict[str, Any] = {
            **self.config,
            "linger.ms": 20,
            "compression.type": "lz4",
            **(producer_config or {}),
            # not overridable: the ledger's guarantees rest on these
            "enable.idempotence": True,
            "acks": "all",
            "enable.gapless.guarantee": True,
            # only failures call back into Python (a callback per stored entry costs the writer more
            # than the produce call); flush() still waits for every record's acknowledgement
            "delivery.report.only.error": True,
        }
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
        self._producer = Producer(settings)
        self._errors: list[KafkaError] = []
        self._since_poll = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # librdkafka callback: record only, act on the writer thread (confluent-kafka-python #457)
        if err is not None:
            self._errors.append(err)

    def _raise_errors(self) -> None:
        if self._errors:
            first = self._errors[0]
            raise LedgerWriteFailedError(
                f"{len(self._errors)} ledger records were not stored in {self.topic}: {first}"
            )

    def load_state(self, ledger_id: str, *, dedup_window: int) -> ChainState:
        check_single_partition(self.config, self.topic, self.timeout_s)
        if self.transactional_id is not None:
            try:  # fences any older writer with the same id and aborts its open transaction
                self._producer.init_transactions(self.timeout_s)
            except KafkaException as exc:
                raise LedgerWriteFailedError(f"cannot start ledger transactions: {exc}") from exc
        reader = KafkaLedgerReader(self.config, self.topic, idle_timeout_s=self.timeout_s)
        low, high = reader.watermarks()
        if high <= low:
            if low > 0:
                raise ChainError(
                    f"ledger topic {self.topic} is empty from offset {low}: its entries were deleted"
                )
            return ChainState.genesis(ledger_id)
        # The tail covers the dedup window (the entry ids a replayed request is checked against) plus
        # room for a checkpoint to resume from; it grows 8x per turn until it holds one.
        window = _TAIL_WINDOW + dedup_window
        while True:
            start = max(low, high - window)
            from_start = start == 0
            state = resume_state(
                ledger_id, reader.read(start), from_start=from_start, dedup_window=dedup_window
            )
            if state is not None:
                logger.info(
                    "ledger %s: resumed from offset %d, next seq %d", ledger_id, start, state.next_seq
                )
                return state
            if start == low:
                raise ChainError(
                    f"ledger topic {self.topic} starts at offset {low} (earlier records were deleted) and "
                    "holds no checkpoint to resume from"
                )
            window *= 8

    def write(self, records: Sequence[LedgerRecord]) -> None:
        self.write_encoded([(record_key(r), encode_record(r)) for r in records])

    def write_encoded(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """`write` for records already encoded as (key, value): the writer's per-entry fast path."""
        self._store(items, ())

    def write_consumed(
        self,
        items: Sequence[tuple[bytes, bytes]],
        extra: Sequence[ExtraRecord],
        consumer: Consumer,
        offsets: Sequence[TopicPartition],
    ) -> None:
        """Store `items`, produce `extra` (topic, key, value, headers: e.g. dead letters) and commit
        `consumer`'s `offsets`, all in ONE transaction: what a sequencer consumed is then sealed
        into the ledger exactly once. Needs a `transactional_id`."""
        if self.transactional_id is None:
            raise LedgerWriterError("write_consumed needs a transactional sink (give it a transactional_id)")
        self._store(items, extra, consumer, offsets)

    def _store(
        self,
        items: Sequence[tuple[bytes, bytes]],
        extra: Sequence[ExtraRecord],
        consumer: Consumer | None = None,
        offsets: Sequence[TopicPartition] = (),
    ) -> None:
        self._raise_errors()
        transactional = self.transactional_id is not None
        try:
            if transactional:
                self._producer.begin_transaction()
            for key, value in items:
                self._produce(value, key)
            for topic, extra_key, extra_value, headers in extra:
                self._produce(extra_value, extra_key, topic=topic, headers=headers)
            if consumer is not None and offsets:
                self._producer.send_offsets_to_transaction(
                    list(offsets), consumer.consumer_group_metadata(), self.timeout_s
                )
            if transactional:
                self._producer.commit_transaction(self.timeout_s)
        except (KafkaException, LedgerWriterError, BufferError) as exc:
            if transactional:  # whatever failed, nothing of the batch may commit later
                try:
                    self._producer.abort_transaction(self.timeout_s)
                except KafkaException:
                    logger.exception("ledger: aborting the failed transaction failed too")
            if isinstance(exc, LedgerWriterError):
                raise
            raise LedgerWriteFailedError(f"ledger batch not stored in {self.topic}: {exc}") from exc
        self._raise_errors()

    def _produce(
        self,
        value: bytes,
        key: bytes | None,
        *,
        topic: str | None = None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        """Produce to the ledger's one partition (or to `topic`, its default partitioner)."""
        deadline = time.monotonic() + self.timeout_s
        while True:  # retries only while librdkafka's local queue is full, until the deadline
            try:
                if topic is None:
                    self._producer.produce(self.topic, value, key, partition=0, on_delivery=self._on_delivery)
                else:
                    self._producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
            except BufferError:
                if time.monotonic() > deadline:
                    raise LedgerWriteFailedError(
                        f"the producer's local queue stayed full for {self.timeout_s}s"
                    ) from None
                self._producer.poll(_BUFFER_FULL_WAIT_S)
                continue
            self._since_poll += 1
            if self._since_poll >= 256:  # serve (error) reports now and then; flush() serves the rest
                self._since_poll = 0
                self._producer.poll(0)
            return

    def service(self) -> None:
        self._producer.poll(0)
        self._raise_errors()

    def flush(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        self._raise_errors()
        if remaining:
            raise LedgerTimeoutError(f"{remaining} ledger records still unacknowledged after {timeout_s}s")

    def close(self) -> None:
        remaining = self._producer.flush(self.timeout_s)
        if remaining:
            logger.error("ledger: %d records unacknowledged when closing", remaining)
