"""Applications sent to a shared ledger sequencer: the request codec and the client agents use.

A hash-chained ledger has one sequencer. With one process per ledger the agent's `LedgerWriter`
is that sequencer. With several processes (agent replicas, recompute workers on many machines)
each sends its applications, unsealed, to a requests topic with `KafkaLedgerClient`, and one
`LedgerSequencer` (`streamprov ledger sequencer`) chains them into the ledger topic.

Wire format: `schemas/ledger_request.avsc` (a ledger id and a list of applications: the fields of a
LedgerEntry without the four the sequencer derives), Avro single-object encoded, keyed by ledger id.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import fastavro
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from fastavro.schema import parse_schema

from streamprov import avro
from streamprov.checksum import ChecksumAlgorithm
from streamprov.ledger.codec import application_from_avro, application_to_avro
from streamprov.ledger.errors import (
    EntryTooLargeError,
    LedgerBackpressureError,
    LedgerClosedError,
    LedgerTimeoutError,
    LedgerWriteFailedError,
    MalformedRecordError,
)
from streamprov.ledger.kafka import client_config
from streamprov.ledger.model import (
    AnyRow,
    Application,
    ApplicationKind,
    AppTemplate,
    Context,
    MapRow,
    Origin,
    application_of,
)
from streamprov.ledger.rows import expand
from streamprov.ledger.writer import (
    DEFAULT_MAX_ENTRY_BYTES,
    approx_map_row_size,
    approx_size,
    template_size,
)

__all__ = ["KafkaLedgerClient", "LedgerRequest", "decode_request", "encode_request"]

logger = logging.getLogger(__name__)

REQUEST_SCHEMA_JSON = avro.load_schema_json("ledger_request")
REQUEST_PREFIX = avro.single_object_prefix(REQUEST_SCHEMA_JSON)
_REQUEST_SCHEMA = parse_schema(avro.without_logical_types(REQUEST_SCHEMA_JSON))


class LedgerRequest:
    """A decoded request: the ledger it is for, its applications, then its map rows (kept as the
    agent sent them: the sequencer seals them straight from the header bytes)."""

    __slots__ = ("applications", "ledger_id", "map_rows")

    def __init__(
        self,
        ledger_id: str,
        applications: tuple[Application, ...],
        map_rows: tuple[tuple[AppTemplate, tuple[MapRow, ...]], ...] = (),
    ) -> None:
        self.ledger_id = ledger_id
        self.applications = applications
        self.map_rows = map_rows

    def expanded(self) -> tuple[Application, ...]:
        """Every application, in sealing order (map rows expanded)."""
        rows = [application_of(t, expand(r)) for t, batch in self.map_rows for r in batch]
        return (*self.applications, *rows)

    def __len__(self) -> int:
        return len(self.applications) + sum(len(batch) for _, batch in self.map_rows)


def encode_request(
    ledger_id: str,
    applications: Sequence[Application],
    map_rows: Sequence[tuple[AppTemplate, Sequence[MapRow]]] = (),
) -> bytes:
    """One request: `applications`, then `map_rows` (compact map applications per template: the
    sequencer reads the rest out of the headers, so the agent's data path does no more than keep the
    header bytes it already has).

    The map rows are written by hand (they are on the agent's path: ~0.5 us a row instead of ~6 with
    fastavro's dicts); a property test checks the bytes equal fastavro's."""
    head = _fastavro_request(ledger_id, applications, ())
    if not map_rows:
        return head
    parts = [head[:-1], _long(len(map_rows))]  # head ends with the empty map_rows array (0x00)
    for template, rows in map_rows:
        parts.append(_template_avro(template))
        if rows:
            parts.append(_long(len(rows)))
            for _, input_raw, input_checksum, output_header in rows:
                if input_raw is not None:
                    parts += (_BYTES_BRANCH, _long(len(input_raw)), input_raw)
                else:
                    assert input_checksum is not None
                    algorithm, digest = input_checksum
                    parts += (_CHECKSUM_BRANCH, _long(algorithm), _long(len(digest)), digest)
                parts += (_long(len(output_header)), output_header)
        parts.append(_END)
    parts.append(_END)
    return b"".join(parts)


def _fastavro_request(
    ledger_id: str,
    applications: Sequence[Application],
    map_rows: Sequence[tuple[AppTemplate, Sequence[MapRow]]],
) -> bytes:
    """The request written by fastavro from dicts: the reference encoding."""
    datum = {
        "ledger_id": ledger_id,
        "applications": [application_to_avro(a) for a in applications],
        "map_rows": [
            {"template": _template_to_avro(t), "rows": [_map_row_to_avro(r) for r in rows]}
            for t, rows in map_rows
        ],
    }
    buf = io.BytesIO()
    buf.write(REQUEST_PREFIX)
    fastavro.schemaless_writer(buf, _REQUEST_SCHEMA, datum)
    return buf.getvalue()


_long = avro.encode_long
_END = b"\x00"
_BYTES_BRANCH = b"\x00"  # MapRow.input: union branch 0 (header bytes)
_CHECKSUM_BRANCH = b"\x02"  # branch 1 (Checksum)
_EMPTY_WITH_ONE_BATCH = len(REQUEST_PREFIX) + 3  # "" (0x00), [] (0x00), map_rows block of 1 (0x02)


@functools.lru_cache(maxsize=256)
def _template_avro(template: AppTemplate) -> bytes:
    """A template's Avro bytes, cut out of a request holding only it (rows: 0x00, end: 0x00)."""
    raw = _fastavro_request("", (), ((template, ()),))
    return raw[_EMPTY_WITH_ONE_BATCH:-2]


def decode_request(raw: bytes | None) -> LedgerRequest:
    """Raises `MalformedRecordError` (with the reason) for anything that is not a valid request."""
    if not raw:
        raise MalformedRecordError("empty ledger request")
    if raw[: len(REQUEST_PREFIX)] != REQUEST_PREFIX:
        raise MalformedRecordError(
            "not a ledger request (bad marker or unknown schema fingerprint "
            f"{raw[2 : len(REQUEST_PREFIX)].hex() or '-'}); "
            "was something else written to the requests topic?",
            raw,
        )
    try:
        r = avro.schemaless_read(raw[len(REQUEST_PREFIX) :], _REQUEST_SCHEMA)
        apps = tuple(application_from_avro(a) for a in r["applications"])
        batches = []
        for b, batch in enumerate(r["map_rows"]):
            template = _template_from_avro(batch["template"])
            rows = []
            for i, row in enumerate(batch["rows"]):
                inp = row["input"]
                checksum = (
                    None
                    if isinstance(inp, bytes)
                    else (int(ChecksumAlgorithm[inp["algorithm"]]), inp["value"])
                )
                map_row: MapRow = (0, inp if isinstance(inp, bytes) else None, checksum, row["output_header"])
                # The door: the row is read now as it will be sealed (the headers, each checksum's
                # size against its algorithm), so a bad row refuses the whole request here and no
                # entry that would not decode back is ever sealed.
                try:
                    expand(map_row)
                except MalformedRecordError as exc:
                    raise MalformedRecordError(f"map row {i} of batch {b}: {exc}") from exc
                rows.append(map_row)
            batches.append((template, tuple(rows)))
    except MalformedRecordError as exc:
        raise MalformedRecordError(str(exc), raw) from exc
    except Exception as exc:  # untrusted bytes through fastavro: one typed error out
        raise MalformedRecordError(f"ledger request does not decode: {exc!r}", raw) from exc
    return LedgerRequest(r["ledger_id"], apps, tuple(batches))


def _template_to_avro(t: AppTemplate) -> dict[str, Any]:
    return {
        "kind": t.kind.name,
        "function_id": t.function_id,
        "function_version": t.function_version,
        "code_hash": t.code_hash,
        "parameters": dict(t.parameters),
        "device_id": t.device_id,
        "context": {
            "source": t.context.source,
            "location": t.context.location,
            "access_rights": list(t.context.access_rights),
        },
        "origin": t.origin.name,
        "task_id": t.task_id,
    }


def _template_from_avro(r: dict[str, Any]) -> AppTemplate:
    ctx = r["context"]
    return AppTemplate(
        ApplicationKind[r["kind"]],
        r["function_id"],
        r["function_version"],
        r["code_hash"],
        tuple(sorted(r["parameters"].items())),
        r["device_id"],
        Context(ctx["source"], ctx["location"], tuple(ctx["access_rights"])),
        Origin[r["origin"]],
        r["task_id"],
    )


def _map_row_to_avro(row: MapRow) -> dict[str, Any]:
    _, input_raw, input_checksum, output_header = row
    if input_raw is not None:
        inp: Any = input_raw
    else:
        assert input_checksum is not None
        inp = {"algorithm": ChecksumAlgorithm(input_checksum[0]).name, "value": input_checksum[1]}
    return {"input": inp, "output_header": output_header}


class _Flush:
    """`begin_flush`'s ticket: everything sent before it is acknowledged once `wait()` returns."""

    def __init__(self, client: KafkaLedgerClient, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    def done(self) -> bool:
        return len(self._client._producer) == 0

    def wait(self) -> None:
        self._client._await(self._timeout_s)


class KafkaLedgerClient:
    """A `LedgerAppender` that sends applications to a sequencer's requests topic.

    Same contract as `LedgerWriter` for agents: `append*` queue and return (batches of `max_batch`
    applications per request record); `flush()` returns once everything appended is stored on the
    requests topic (acks=all, idempotent producer: retries neither duplicate nor reorder), so an
    agent flushes before committing its offsets and a crash can only replay applications, which the
    sequencer drops as duplicates (same entry_id). Unlike the writer, nothing is sealed here.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        requests_topic: str,
        ledger_id: str,
        *,
        max_batch: int = 500,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        producer_config: Mapping[str, Any] | None = None,
        put_timeout_s: float = 1.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        base = client_config(config)
        self.topic = requests_topic
        self.ledger_id = ledger_id
        self.max_batch = max_batch
        self.max_entry_bytes = max_entry_bytes
        self.put_timeout_s = put_timeout_s
        self._producer = Producer(
            {
                **base,
                "linger.ms": 20,
                "compression.type": "lz4",
                **(producer_config or {}),
                "enable.idempotence": True,
                "acks": "all",
                "message.max.bytes": max(1_000_000, max_entry_bytes + 100_000),
            }
        )
        self._lock = threading.Lock()
        self._pending: list[Application] = []
        self._pending_rows: dict[int, list[MapRow]] = {}
        self._pending_count = 0
        self._pending_bytes = 0
        self._templates: dict[int, AppTemplate] = {}
        self._template_sizes: dict[int, int] = {}
        """`template_size` of each template: a map row's entry size is bounded from its header lengths."""
        self._template_keys: dict[AppTemplate, int] = {}
        self._errors: list[KafkaError] = []
        self._closed = False
        self.sent = 0

    # -- LedgerAppender -----------------------------------------------------------------------------
    def template(self, template: AppTemplate) -> int:
        key = self._template_keys.get(template)
        if key is None:
            key = len(self._template_keys)
            self._templates[key] = template
            self._template_sizes[key] = template_size(template)
            self._template_keys[template] = key
        return key

    def append(self, app: Application, timeout_s: float | None = None) -> None:
        self.append_many([app], timeout_s)

    def append_rows(self, rows: list[AnyRow], timeout_s: float | None = None) -> None:
        """Map rows travel as they are (header bytes: the sequencer reads the rest out of them);
        other rows are expanded into applications here."""
        self._check()
        if any(len(r) != 4 for r in rows):
            apps = []
            for row in rows:
                full = expand(row)
                apps.append(application_of(self._templates[full[0]], full))
            self.append_many(apps, timeout_s)
            return
        limit, sizes = self.max_entry_bytes, self._template_sizes
        for row in rows:  # all or none are queued: a row too large for a ledger record refuses the call
            size = approx_map_row_size(sizes[row[0]], row, limit)  # type: ignore[arg-type]  # a MapRow
            if size > limit:
                template = self._templates[row[0]]
                raise EntryTooLargeError(
                    f"map application of {template.function_id}@{template.function_version} needs about "
                    f"{size} bytes (its DataID is in the entry twice), above max_entry_bytes={limit}"
                )
        with self._lock:
            if self._pending:  # keep the order: earlier applications go first
                self._send(timeout_s)
            for row in rows:
                map_row: MapRow = row  # type: ignore[assignment]  # len 4: a MapRow
                size = len(map_row[1] or b"") + len(map_row[3]) + 48
                if self._pending_count and (
                    self._pending_count >= self.max_batch or self._pending_bytes + size > self.max_entry_bytes
                ):
                    self._send(timeout_s)
                self._pending_rows.setdefault(map_row[0], []).append(map_row)
                self._pending_count += 1
                self._pending_bytes += size

    def append_many(self, apps: Sequence[Application], timeout_s: float | None = None) -> None:
        self._check()
        sizes = [approx_size(a) for a in apps]
        for app, size in zip(apps, sizes, strict=True):
            if size > self.max_entry_bytes:
                raise EntryTooLargeError(
                    f"application of {app.function_id}@{app.function_version} with {len(app.inputs)} "
                    f"inputs needs about {size} bytes, above max_entry_bytes={self.max_entry_bytes}"
                )
        with self._lock:
            if self._pending_rows:  # keep the order: earlier rows go first
                self._send(timeout_s)
            for app, size in zip(apps, sizes, strict=True):
                if self._pending_count and (
                    self._pending_count >= self.max_batch or self._pending_bytes + size > self.max_entry_bytes
                ):
                    self._send(timeout_s)
                self._pending.append(app)
                self._pending_count += 1
                self._pending_bytes += size
            if self._pending_count >= self.max_batch:
                self._send(timeout_s)

    def begin_flush(self, timeout_s: float = 30.0) -> _Flush:
        self._check()
        with self._lock:
            if self._pending_count:
                self._send(timeout_s)
        return _Flush(self, timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.begin_flush(timeout_s).wait()

    def close(self, timeout_s: float = 30.0) -> None:
        """Send and await what is pending; later appends raise `LedgerClosedError`."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            self._closed = True

    def __enter__(self) -> KafkaLedgerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise LedgerClosedError("the ledger client is closed")
        if self._errors:
            raise LedgerWriteFailedError(
                f"{len(self._errors)} ledger requests were not stored in {self.topic}: {self._errors[0]}"
            )

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:  # record only; raised on the caller's thread (confluent-kafka-python #457)
            self._errors.append(err)

    def _send(self, timeout_s: float | None) -> None:
        """Produce the pending applications as one request record (the caller holds the lock)."""
        rows = [(self._templates[key], batch) for key, batch in self._pending_rows.items()]
        value = encode_request(self.ledger_id, self._pending, rows)
        deadline = time.monotonic() + (self.put_timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                self._producer.produce(
                    self.topic, value, self.ledger_id.encode(), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                if time.monotonic() > deadline:
                    raise LedgerBackpressureError(
                        f"the requests producer's queue stayed full; {self._pending_count} applications "
                        "not sent (retry, slow down, or check the broker)"
                    ) from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise LedgerWriteFailedError(f"cannot send a ledger request to {self.topic}: {exc}") from exc
        self.sent += self._pending_count
        self._pending = []
        self._pending_rows = {}
        self._pending_count = 0
        self._pending_bytes = 0
        self._producer.poll(0)

    def _await(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        self._check()
        if remaining:
            raise LedgerTimeoutError(f"{remaining} ledger requests still unacknowledged after {timeout_s}s")
