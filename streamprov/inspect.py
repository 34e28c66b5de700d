"""Read records back from a topic for people: value, key, coordinates and the decoded provenance header.

Reads with `assign()` from the start of every partition rather than joining a consumer group: looking
at a topic should not commit offsets or wait for a rebalance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from streamprov.agents.kafka_io import KAFKA_LOG, list_all_topics
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader


def message_headers(msg: Message) -> list[tuple[str, bytes | None]]:
    """A consumed record's headers as (key, bytes) pairs, whatever form the client handed them in."""
    raw: Any = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode("utf-8") if isinstance(v, str) else v) for k, v in pairs]


def as_text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def describe_message(msg: Message) -> dict[str, Any]:
    """A printable view of a record with its provenance decoded (or the reason it could not be)."""
    headers = message_headers(msg)
    value: Any = msg.value() or b""
    try:
        text: Any = value.decode("utf-8")
    except UnicodeDecodeError:
        text = "hex:" + value.hex()
    view: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": as_text(msg.key()),
        "value": text,
    }
    try:
        header = ProvenanceHeader.from_headers(headers)
        view["provenance"] = header.describe() if header else None
    except HeaderError as exc:
        view["provenance_error"] = str(exc)
    others = {k: as_text(v) for k, v in headers if k != HEADER_KEY}
    if others:
        view["headers"] = others
    return view


def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    limit: int,
    idle_timeout_s: float,
    config: dict[str, Any] | None = None,
) -> Iterator[Message]:
    """Up to `limit` committed records from the start of `topic`; stops after `idle_timeout_s` idle."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "streamprov-inspect",  # required by librdkafka; never joined or committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "logger": KAFKA_LOG,  # librdkafka's lines as log records, repeats held back; not raw stderr
            **(config or {}),
        }
    )
    try:
        meta = list_all_topics(consumer, max(idle_timeout_s, 5.0)).get(topic)  # naming it may create it
        if meta is None or meta.error is not None:
            raise StreamprovError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)])
        seen = 0
        deadline = time.monotonic() + idle_timeout_s
        while seen < limit and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                raise StreamprovError(f"reading {topic}: {msg.error()}")
            seen += 1
            deadline = time.monotonic() + idle_timeout_s
            yield msg
    except KafkaException as exc:
        raise StreamprovError(f"Kafka error reading {topic!r}: {exc}") from exc
    finally:
        consumer.close()
