"""Read records from a topic for people: value, key, coordinates and the decoded provenance header."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaException

from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader


def describe_message(msg: Any) -> dict[str, Any]:
    """A printable view of a confluent-kafka Message with its provenance decoded (or the reason not)."""
    headers = msg.headers() or []
    value = msg.value() or b""
    try:
        text: Any = value.decode("utf-8")
    except UnicodeDecodeError:
        text = "hex:" + value.hex()
    view: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": (msg.key() or b"").decode("utf-8", "replace"),
        "value": text,
    }
    try:
        header = ProvenanceHeader.from_headers(headers)
        view["provenance"] = header.describe() if header else None
    except HeaderError as exc:
        view["provenance_error"] = str(exc)
    others = {k: (v or b"").decode("utf-8", "replace") for k, v in headers if k != HEADER_KEY}
    if others:
        view["headers"] = others
    return view


def read_records(
    bootstrap_servers: str, topic: str, *, limit: int, idle_timeout_s: float
) -> Iterator[dict[str, Any]]:
    """Up to `limit` records from the start of `topic`; stops after `idle_timeout_s` without data."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"streamprov-inspect-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=idle_timeout_s)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise StreamprovError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        consumer.subscribe([topic])
        seen = 0
        deadline = time.monotonic() + idle_timeout_s
        while seen < limit and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise StreamprovError(f"reading {topic}: {msg.error()}")
            seen += 1
            deadline = time.monotonic() + idle_timeout_s
            yield describe_message(msg)
    except KafkaException as exc:
        raise StreamprovError(f"Kafka error reading {topic!r}: {exc}") from exc
    finally:
        consumer.close()
