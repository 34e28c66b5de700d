"""Helpers for tests that talk to a real broker (Apache Kafka or the embedded Tansu).

Every wait here is bounded: a test against a broken broker fails with what it saw, it never hangs.
Consumers read with ``assign()`` from the beginning of every partition rather than joining a
group, so reading back what a test wrote does not pay a group rebalance (seconds on Kafka, about
half the session timeout on Tansu).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # typed here; confluent_kafka.admin re-exports it untyped

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_SCRIPT = REPO_ROOT / "scripts" / "kafka.sh"
DEFAULT_KAFKA_PORT = 39092

Isolation = Literal["read_committed", "read_uncommitted"]
Headers = list[tuple[str, bytes]]

# Fast group joins on both brokers: Kafka's minimum session timeout is 6 s, and Tansu finishes a
# JoinGroup after about half of it (see streamprov.embedded.TANSU_CONSUMER_CONFIG).
FAST_GROUP_CONFIG: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


@dataclass(frozen=True)
class Record:
    """One record to produce; ``partition=None`` lets the partitioner pick from the key."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    partition: int | None = None


# -- the Apache Kafka script ----------------------------------------------------------------------
def kafka_script(verb: str, *, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/kafka.sh VERB`` (bounded); output is captured, the exit code is not checked."""
    return subprocess.run(
        ["bash", str(KAFKA_SCRIPT), verb],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        # the script's readiness probe needs confluent_kafka: use the interpreter running the tests
        env={"STREAMPROV_PYTHON": sys.executable, **os.environ},
    )


def kafka_script_port() -> int:
    """The client port scripts/kafka.sh uses (``STREAMPROV_KAFKA_PORT``, default 39092)."""
    return int(os.environ.get("STREAMPROV_KAFKA_PORT", str(DEFAULT_KAFKA_PORT)))


# -- admin ------------------------------------------------------------------------------------------
def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def wait_for_broker(bootstrap: str, *, timeout_s: float = 30.0) -> None:
    """Return once the broker answers a metadata request; raise RuntimeError after ``timeout_s``."""
    admin = admin_client(bootstrap)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if admin.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic()))).brokers:
                return
        except KafkaException as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"no Kafka broker answered at {bootstrap} within {timeout_s}s: {last}")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topic(
    bootstrap: str,
    name: str,
    *,
    partitions: int = 1,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Create ``name`` and wait until metadata shows every partition with a leader."""
    admin = admin_client(bootstrap)
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=dict(config or {}))
    futures = admin.create_topics([topic], operation_timeout=timeout_s, request_timeout=timeout_s)
    futures[name].result(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=name, timeout=5.0).topics.get(name)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 and p.error is None for p in md.partitions.values())
        ):
            return name
        time.sleep(0.1)
    raise RuntimeError(f"topic {name} was created but not ready within {timeout_s}s")


def delete_topics(bootstrap: str, names: Sequence[str], *, timeout_s: float = 15.0) -> None:
    """Best-effort cleanup: errors are swallowed (the broker may already be gone)."""
    if not names:
        return
    with contextlib.suppress(Exception):  # cleanup must never fail a test
        futures = admin_client(bootstrap).delete_topics(list(names), operation_timeout=timeout_s)
        for future in futures.values():
            with contextlib.suppress(Exception):
                future.result(timeout=timeout_s)


def partitions_of(bootstrap: str, topic: str, *, timeout_s: float = 10.0) -> list[int]:
    md = admin_client(bootstrap).list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        raise RuntimeError(f"topic {topic} not found at {bootstrap}")
    return sorted(md.partitions)


# -- produce / consume ------------------------------------------------------------------------------
def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Record | bytes],
    *,
    timeout_s: float = 30.0,
    config: Mapping[str, Any] | None = None,
) -> list[Message]:
    """Produce ``records`` (idempotently) and return their delivery reports in delivery order.

    Raises RuntimeError if any record was not delivered within ``timeout_s``.
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **(config or {})}
    )
    delivered: list[Message] = []
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            delivered.append(msg)

    count = 0
    for item in records:
        record = item if isinstance(item, Record) else Record(value=item)
        kwargs: dict[str, Any] = {"value": record.value, "key": record.key, "on_delivery": on_delivery}
        if record.headers:
            kwargs["headers"] = list(record.headers)
        if record.partition is not None:
            kwargs["partition"] = record.partition
        producer.produce(topic, **kwargs)
        producer.poll(0)
        count += 1
    remaining = producer.flush(timeout_s)
    if remaining or failures or len(delivered) != count:
        raise RuntimeError(
            f"produce to {topic}: {len(delivered)}/{count} delivered, {remaining} still queued, "
            f"errors: {failures[:5]}"
        )
    return delivered


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    expected: int,
    timeout_s: float,
    isolation: Isolation = "read_committed",
    grace_s: float = 0.0,
) -> list[Message]:
    """Read ``topic`` from the beginning of every partition until ``expected`` records arrived.

    Returns what was read when ``expected`` is reached (then keeps reading ``grace_s`` more seconds
    so a test can see records that should not be there) or when ``timeout_s`` runs out, whichever
    comes first: the caller asserts on the result. Broker errors other than end-of-partition raise
    KafkaException.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_name("consume-all"),  # required by librdkafka, never joined
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions_of(bootstrap, topic)])
        received: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(received) < expected:
            received.extend(_poll_batch(consumer, deadline))
        if grace_s > 0:
            grace_end = min(time.monotonic() + grace_s, deadline + grace_s)
            while time.monotonic() < grace_end:
                received.extend(_poll_batch(consumer, grace_end))
        return received
    finally:
        consumer.close()


def _poll_batch(consumer: Consumer, deadline: float) -> list[Message]:
    wait = max(0.0, min(0.5, deadline - time.monotonic()))
    out: list[Message] = []
    for msg in consumer.consume(num_messages=500, timeout=wait):
        err = msg.error()
        if err is None:
            out.append(msg)
        elif err.code() != KafkaError._PARTITION_EOF:
            raise KafkaException(err)
    return out


def record_view(msg: Message) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    """(key, value, headers) of a consumed message, with headers as a list ([] when absent)."""
    raw = msg.headers() or []
    items = list(raw.items()) if isinstance(raw, dict) else raw
    headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in items]
    return msg.key(), msg.value(), headers
