"""A confluent-kafka Producer that stamps source records with a provenance header.

Use it where original data enters Kafka: each record gets DataID (its key unless given), its checksum
as both checksum and source checksum, a timestamp and an empty lineage. Other headers pass through.

`produce` is called once per record, so its common case (bytes value, short ASCII bytes key, CRC32C)
builds the header inline: one CRC32C call, one clock read (the timestamp varint is memoised per
millisecond) and one join, then a single positional call into the C producer (keyword arguments cost
measurably more there). Every other case goes through `SourceStamper.header`, which writes the same
bytes; bench/bench_headers.py measures the cost against a plain producer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from time import time_ns as _time_ns
from typing import TYPE_CHECKING, Any

import crc32c as _crc32c
from confluent_kafka import Producer

from streamprov.checksum import ChecksumAlgorithm
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY
from streamprov.signing import Signer, signed_headers
from streamprov.stamp import _CRC_HEAD, _CRC_TAG, _EMPTY_LINEAGE, _SHORT_LEN, SourceStamper

if TYPE_CHECKING:
    from streamprov.telemetry.tracing import StepTracing

_crc: Callable[[bytes], int] = _crc32c.crc32c
_Headers = list[tuple[str, str | bytes | None]]
_UNASSIGNED = -1
"""librdkafka's RD_KAFKA_PARTITION_UA: let the configured partitioner choose."""
_NOW = 0
"""confluent-kafka's `timestamp` default: the record's CreateTime is the produce time."""


class ProvenanceProducer:
    """Thin wrapper over `confluent_kafka.Producer`; everything but `produce` passes through."""

    def __init__(
        self,
        config: Mapping[str, Any],
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        producer: Producer | None = None,
        signer: Signer | None = None,
        tracing: StepTracing | None = None,
    ) -> None:
        """`signer`: sign every provenance header (`streamprov.signing`, header `streamprov.sig`);
        `tracing`: a PRODUCER span per record, its context in `traceparent` (`streamprov.telemetry`)."""
        self._producer = producer if producer is not None else Producer(dict(config))
        self._produce = self._producer.produce
        self._stamper = SourceStamper(algorithm)
        self._clock = self._stamper._clock
        self._signer = signer
        self._tracing = tracing
        self._inline = algorithm is ChecksumAlgorithm.CRC32C and signer is None and tracing is None

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
        """Produce `value` with a source provenance header; DataID defaults to the key.

        Raises `StreamprovError` for a value that is not bytes or a record without a DataID, and
        whatever `confluent_kafka.Producer.produce` raises (BufferError when its queue is full).
        """
        ident = key if data_id is None else data_id
        if type(value) is bytes and type(ident) is bytes and self._inline:
            n = len(ident)
            if 0 < n < 64 and ident.isascii():
                # SourceStamper.header's CRC32C case, inlined (it is the per-record cost).
                digest4 = _crc(value).to_bytes(4, "big")
                clock = self._clock
                t = _time_ns()
                ts = clock._enc if clock._lo <= t < clock._hi else clock.tick(t)
                stamped: _Headers = [
                    (
                        HEADER_KEY,
                        b"".join(
                            (_CRC_HEAD, digest4, _CRC_TAG, digest4, ts, _SHORT_LEN[n], ident, _EMPTY_LINEAGE)
                        ),
                    )
                ]
                if headers:
                    stamped.extend(h for h in headers if h[0] != HEADER_KEY)
                self._produce(
                    topic,
                    value,
                    key,
                    _UNASSIGNED if partition is None else partition,
                    None,
                    on_delivery,
                    _NOW,
                    stamped,
                )
                return
        self._produce_general(topic, value, key, ident, headers, partition, on_delivery)

    def _produce_general(
        self,
        topic: str,
        value: bytes,
        key: bytes | str | None,
        ident: str | bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
        partition: int | None,
        on_delivery: Callable[..., None] | None,
    ) -> None:
        if not isinstance(value, bytes | bytearray):
            raise StreamprovError(f"value must be bytes (serialise it first), not {type(value).__name__}")
        if not ident:
            raise StreamprovError("a source record needs a DataID: pass key= or data_id=")
        value = bytes(value)
        header = self._stamper.header(ident, value)
        stamped: _Headers = list(signed_headers(header, self._signer, headers or ()))
        if self._tracing is not None:
            self._tracing.on_produce(topic, ident, stamped)
        self._produce(
            topic,
            value,
            key,
            _UNASSIGNED if partition is None else partition,
            None,
            on_delivery,
            _NOW,
            stamped,
        )

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; returns how many records are still undelivered (0 on success)."""
        return int(self._producer.flush(timeout))
