"""A confluent-kafka Producer that stamps source records with a provenance header.

Use it where original data enters Kafka: each record gets DataID (its key unless given), its checksum
as both checksum and source checksum, a timestamp and an empty lineage. Other headers pass through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Producer

from streamprov.checksum import ChecksumAlgorithm
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY
from streamprov.stamp import SourceStamper


class ProvenanceProducer:
    """Thin wrapper over `confluent_kafka.Producer`; everything but `produce` passes through."""

    def __init__(
        self,
        config: Mapping[str, Any],
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        producer: Producer | None = None,
    ) -> None:
        self._producer = producer if producer is not None else Producer(dict(config))
        self._stamper = SourceStamper(algorithm)

    @property
    def producer(self) -> Producer:
        return self._producer

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | str | None = None,
        *,
        data_id: str | bytes | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        on_delivery: Callable[..., None] | None = None,
    ) -> None:
        """Produce `value` with a source provenance header; DataID defaults to the key."""
        if not isinstance(value, bytes | bytearray):
            raise StreamprovError(f"value must be bytes (serialise it first), not {type(value).__name__}")
        ident = data_id if data_id is not None else key
        if not ident:
            raise StreamprovError("a source record needs a DataID: pass key= or data_id=")
        stamped: list[tuple[str, bytes | None]] = [(HEADER_KEY, self._stamper.header(ident, bytes(value)))]
        if headers:
            stamped.extend(h for h in headers if h[0] != HEADER_KEY)
        kwargs: dict[str, Any] = {"headers": stamped}
        if partition is not None:
            kwargs["partition"] = partition
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        self._producer.produce(topic, value, key, **kwargs)

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; returns how many records are still undelivered (0 on success)."""
        return int(self._producer.flush(timeout))
