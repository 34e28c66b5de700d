"""Small confluent-kafka pieces every streamprov consume-produce loop needs, shared by the processor
(`streamprov.agents.processor`) and the Validator (`validator.service`).

They encode lessons the loops must not relearn one by one:

* `kafka_error`: confluent-kafka raises `KafkaException` whose first argument is usually, not always,
  a `KafkaError`; callers want the error (its code, `fatal()`, `retriable()`) either way.
* `RebalanceEvents`: librdkafka calls the rebalance callbacks from inside `consume()`; doing work
  there (commits, seeks, produce) is how loops hang (confluent-kafka-python #457). The callbacks only
  record what changed; the loop acts on it after `consume()` returns.
* `produce_blocking`: `Producer.produce` raises `BufferError` when its local queue is full; the fix is
  to serve delivery reports (`poll`) and try again, for a bounded time, never to drop the record.
* `seek_retrying`: a seek right after an assignment can fail while the partition's fetcher starts.
* `list_all_topics`, `missing_topics`: whether a topic exists is asked by listing ALL topics; a
  metadata request naming a topic may create it (a broker with `auto.create.topics.enable`).
* `TopicReader`: reading whole topics (committed records, no group) up to their end as of now.
* `KAFKA_LOG`: the logger librdkafka's log lines and error callbacks go to. While a broker is away
  every client logs every reconnect attempt (a Validator logged ~90 lines a second), so a line is let
  through once per `RepeatFilter.window_s` and the next one says how many like it were held back.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]  # not in its __all__

from streamprov.agents.dead_letter import RECORD_FRAMING_BYTES
from streamprov.errors import StreamprovError

log = logging.getLogger(__name__)


class RepeatFilter(logging.Filter):
    """Passes a message once per `window_s` (by its text with the digits taken out: "after 0ms"
    varies); the next one that passes says how many like it were held back meanwhile."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, list[float]] = {}  # shape -> [last passed at, held back since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        shape = _DIGITS.sub("#", text)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(shape)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            if len(self._seen) >= _MAX_SHAPES:
                self._seen.clear()
            self._seen[shape] = [now, 0]
        held = 0 if seen is None else int(seen[1])
        if held:
            record.msg, record.args = f"{text} ({held} more like it in the last {self.window_s:g} s)", ()
        return True


_DIGITS = re.compile(r"\d+")
_MAX_SHAPES = 1000


def _not_chosen_on_purpose(record: logging.LogRecord) -> bool:
    """Drops librdkafka's warning that `enable.gapless.guarantee` is experimental: the ledger sink
    sets it on purpose (docs/ledger.md), and every demo run showed it to newcomers."""
    return "enable.gapless.guarantee is experimental" not in record.getMessage()


KAFKA_LOG = logging.getLogger("streamprov.kafka")
"""librdkafka's log lines (`"logger"` in a client's settings) and non-fatal error callbacks."""
KAFKA_LOG.addFilter(_not_chosen_on_purpose)
KAFKA_LOG.addFilter(RepeatFilter())

TopicPartitionKey = tuple[str, int]
RebalanceKind = Literal["assign", "revoke"]

FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
"""Error codes meaning a newer instance (same transactional.id or group.instance.id) took over."""


def kafka_error(exc: KafkaException) -> KafkaError:
    """The `KafkaError` inside a `KafkaException` (a generic `_FAIL` one when it carries none)."""
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))


def is_fenced(err: KafkaError) -> bool:
    return err.code() in FENCED_CODES


class RebalanceEvents:
    """Rebalance callbacks that only record: pass `on_assign`/`on_revoke`/`on_lost` to `subscribe`.

    The loop calls `drain()` after each `consume()` and applies the events in order. A lost
    assignment is recorded as a revocation: either way the partitions are no longer ours.
    """

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[tuple[RebalanceKind, list[TopicPartitionKey]]] = []

    def on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("assign", [(p.topic, p.partition) for p in partitions]))

    def on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("revoke", [(p.topic, p.partition) for p in partitions]))

    on_lost = on_revoke

    @property
    def pending(self) -> bool:
        return bool(self._events)

    def drain(self) -> list[tuple[RebalanceKind, list[TopicPartitionKey]]]:
        events, self._events = self._events, []
        return events


def produce_blocking(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    headers: list[tuple[str, bytes | None]] | None = None,
    on_delivery: Callable[[KafkaError | None, Any], None] | None = None,
    timestamp_ms: int | None = None,
    timeout_s: float,
) -> bool:
    """`Producer.produce`, waiting (serving delivery reports) while the local queue is full.

    Returns False when the queue stayed full for `timeout_s`; the caller decides what that means
    (the record was not enqueued). Other errors (`KafkaException`) propagate.
    """
    kwargs: dict[str, Any] = {}
    if headers:
        kwargs["headers"] = headers
    if timestamp_ms is not None:
        kwargs["timestamp"] = timestamp_ms
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return True
        except BufferError:
            if time.monotonic() >= deadline:
                return False
            producer.poll(0.05)


def seek_retrying(consumer: Consumer, topic: str, partition: int, offset: int, timeout_s: float) -> None:
    """Seek, retrying for `timeout_s` while the partition's fetcher is still starting.

    Raises the last `KafkaException` when the seek keeps failing.
    """
    target = TopicPartition(topic, partition, offset)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            consumer.seek(target)
            return
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _with_logger(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Client settings whose librdkafka log lines go to `KAFKA_LOG` (repeats held back), not raw to
    stderr, unless they name a logger of their own."""
    return {"logger": KAFKA_LOG, **settings}


def list_all_topics(
    client: AdminClient | Producer | Consumer | Mapping[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Every topic of the cluster: name -> `TopicMetadata`. `client` may be librdkafka settings (for
    an `AdminClient`). Raises `KafkaException` when the brokers do not answer within `timeout_s`.

    All topics on purpose: a metadata request naming a topic may create it (a broker with
    `auto.create.topics.enable`), so asking whether a topic exists must not name it.
    """
    if isinstance(client, Mapping):
        client = AdminClient(_with_logger(client))
    topics: dict[str, Any] = client.list_topics(timeout=timeout_s).topics
    return topics


def missing_topics(
    client: AdminClient | Producer | Consumer | Mapping[str, Any],
    required: Iterable[str],
    optional: Iterable[str] = (),
    *,
    timeout_s: float,
) -> tuple[list[str], list[str]]:
    """(the `required` topics that do not exist, the `optional` ones that do not exist yet), in order.

    A start-up check: when the topics cannot be listed it logs a warning and reports none missing
    (the service then finds out when it uses them).
    """
    try:
        topics = list_all_topics(client, timeout_s)
    except KafkaException as exc:
        log.warning(
            "cannot list topics (%s): not checking that they exist. If this lasts, check "
            "kafka.bootstrap_servers and that the brokers are reachable from here",
            kafka_error(exc).str(),
        )
        return [], []
    return [t for t in required if t not in topics], [t for t in optional if t not in topics]


def topic_max_message_bytes(settings: Mapping[str, Any], topic: str, *, timeout_s: float) -> int | None:
    """The topic's `max.message.bytes`: the broker refuses a larger record batch, whatever the
    producer allows. None when it cannot be read (no such topic, no DescribeConfigs permission, no
    answer within `timeout_s`): the caller keeps its producer's limit."""
    admin = AdminClient(_with_logger(settings))
    try:
        future = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        (entries,) = (f.result(timeout=timeout_s) for f in future.values())
        value = entries["max.message.bytes"].value
        return int(value) if value is not None else None
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except KafkaException as exc:
        why = kafka_error(exc).str()
    except (KeyError, ValueError, TypeError) as exc:
        why = repr(exc)
    log.warning("cannot read max.message.bytes of topic %s (%s): using the producer's limit", topic, why)
    return None


def record_limit_below(
    settings: Mapping[str, Any], topic: str, current: int, *, timeout_s: float
) -> int | None:
    """The largest record `topic` takes (its `max.message.bytes` less `RECORD_FRAMING_BYTES`) when
    that is below `current`, a writer's own limit; else None (not lower, or not readable). A record
    over it is refused by the broker on every retry: a writer lowers its limit to it at start."""
    return limit_below(topic_max_message_bytes(settings, topic, timeout_s=timeout_s), current)


def limit_below(max_message_bytes: int | None, current: int) -> int | None:
    """The largest record a topic of this `max.message.bytes` takes (less `RECORD_FRAMING_BYTES`)
    when that is below `current`; else None (not lower, or the limit is not known)."""
    if max_message_bytes is None or max_message_bytes - RECORD_FRAMING_BYTES >= current:
        return None
    return max_message_bytes - RECORD_FRAMING_BYTES


_NO_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


def read_range(
    settings: Mapping[str, Any],
    topic: str,
    partition: int,
    start: int,
    end: int,
    *,
    isolation_level: str = "read_uncommitted",
    timeout_s: float = 30.0,
) -> list[Message]:
    """The records of `topic`/`partition` at offsets `start` to `end` - 1 that exist (transaction
    markers and compacted records do not), read by a consumer of its own that joins no group and
    commits nothing. Raises `StreamprovError` when they cannot be read within `timeout_s` (a
    partition that does not exist included), or at once for a fatal error."""
    consumer = Consumer(
        _with_logger(
            {
                **settings,
                "group.id": "streamprov-read-back",  # assign() only: never joins, never commits
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",  # retention moved the log start past `start`
                "isolation.level": isolation_level,
            }
        )
    )
    records: list[Message] = []
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = consumer.poll(min(0.5, left))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return records
                if err.fatal() or err.code() in _NO_TOPIC:
                    raise StreamprovError(f"reading {topic}/{partition} from offset {start}: {err.str()}")
                continue  # a broker or transport hiccup: librdkafka retries until the deadline
            if (msg.offset() or 0) >= end:
                return records
            records.append(msg)
        raise StreamprovError(
            f"offsets {start} to {end - 1} of {topic}/{partition} were not read within {timeout_s:g} s "
            f"({len(records)} read)"
        )
    finally:
        consumer.close()


class TopicMissingError(StreamprovError):
    """A topic given to a `TopicReader` does not exist."""


class TopicReadTimeoutError(StreamprovError):
    """A `TopicReader` did not reach the end of its topics in the time it was given."""


class TopicReader:
    """Manually assigned, read_committed reader of whole topics, from the beginning, no group.

    Each `read` (or `catch_up`) goes on from where the previous one stopped, up to the high
    watermarks as of the call. The end is found from the consumer's position, not from partition
    EOF events: transaction markers occupy offsets, so the last record of a transactional partition
    is not at the high watermark minus one.

    Its fetches wait at most 50 ms: an idle consumer keeps a long-poll fetch open
    (`fetch.wait.max.ms`, 500 ms by default), and every watermark query of a `catch_up` queues behind
    it on the broker connection (about 0.5 s per partition, so seconds per catch-up; measured with
    the Recompute Manager's workers, which catch up before every unit). Pausing the partitions between
    catch-ups instead costs about 0.4 s per catch-up in fetch restarts.

    Raises `TopicMissingError` when a topic does not exist (found by listing all topics: naming one
    may create it),
    `StreamprovError` when one cannot be read, `KafkaException` when the brokers do not answer.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Iterable[str],
        *,
        group_id: str = "streamprov-topic-reader",
        timeout_s: float = 10.0,
    ) -> None:
        settings = {k: v for k, v in config.items() if k != "group.id"}
        settings.update(
            {
                "group.id": group_id,  # never joined, never commits: assign() only
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 50,  # a catch-up's watermark queries wait behind a fetch
            }
        )
        self.timeout_s = timeout_s
        self._consumer = Consumer(settings)
        self._tps: list[TopicPartition] = []
        try:
            wanted = list(topics)
            found = list_all_topics(self._consumer, timeout_s) if wanted else {}
            for topic in wanted:
                meta = found.get(topic)
                if meta is None or (meta.error is None and not meta.partitions):
                    raise TopicMissingError(f"topic {topic!r} does not exist")
                if meta.error is not None:
                    if meta.error.code() in _NO_TOPIC:
                        raise TopicMissingError(f"topic {topic!r} does not exist")
                    raise StreamprovError(f"topic {topic!r} is not available: {meta.error.str()}")
                self._tps += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
            self._consumer.assign(self._tps)
        except BaseException:
            self._consumer.close()
            raise
        self._next: dict[tuple[str, int], int] = {(t.topic, t.partition): 0 for t in self._tps}

    def read(
        self, *, wait_s: float = 30.0, idle: bool = False, beat: Callable[[], object] | None = None
    ) -> Iterator[list[Message]]:
        """Every committed record up to the high watermarks as of the call, in batches (`beat` is
        called before each fetch). Raises `TopicReadTimeoutError` when `wait_s` is over first: `wait_s`
        from the call, or with `idle` from the last batch that brought records."""
        targets: dict[tuple[str, int], int] = {}
        for tp in self._tps:
            key = (tp.topic, tp.partition)
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s, cached=False)
            targets[key] = high
            self._next[key] = max(self._next[key], low)  # below it the records are gone
        deadline = time.monotonic() + wait_s
        while self._behind(targets):
            if time.monotonic() >= deadline:
                raise TopicReadTimeoutError(f"the end of the topics was not reached within {wait_s:g} s")
            if beat is not None:
                beat()
            batch: list[Message] = []
            for msg in self._consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("read error: %s", err.str())
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if topic is None or partition is None or offset is None:
                    raise StreamprovError("a consumed record without coordinates")
                self._next[(topic, partition)] = offset + 1
                batch.append(msg)
            if batch:
                if idle:
                    deadline = time.monotonic() + wait_s
                yield batch

    def _behind(self, targets: Mapping[tuple[str, int], int]) -> bool:
        behind = False
        for key, high in targets.items():
            if self._next[key] >= high:
                continue
            pos = self._consumer.position([TopicPartition(*key)])[0].offset
            if pos >= 0:  # transaction markers occupy offsets
                self._next[key] = max(self._next[key], pos)
            behind = behind or self._next[key] < high
        return behind

    def catch_up(self, *, max_wait_s: float = 30.0) -> list[Message]:
        """Every committed record up to the high watermarks as of now; what came within `max_wait_s`
        when that is not all (the rest comes with the next catch-up)."""
        out: list[Message] = []
        with contextlib.suppress(TopicReadTimeoutError):
            for batch in self.read(wait_s=max_wait_s):
                out += batch
        return out

    def close(self) -> None:
        self._consumer.close()
