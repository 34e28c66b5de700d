"""Where the ledger lives: the small contracts a storage backend fulfils, and an in-memory backend.

A backend is a `LedgerSink` (what the writer needs: resume state, write batches, make them durable)
and a `LedgerSource` (what verification and the index need: stored records in order, from an
offset). Kafka is the production backend (`streamprov.ledger.kafka`); `MemoryLedgerStore` keeps the
encoded records in a list, for tests and tools, and goes through the same codec.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from streamprov.ledger.chain import ChainState, resume_state
from streamprov.ledger.codec import encode_record, stored
from streamprov.ledger.model import LedgerRecord, StoredRecord


class LedgerSource(Protocol):
    """Stored records in storage order, from `start_offset` to what is stored now."""

    def read(self, start_offset: int = 0) -> Iterator[StoredRecord]: ...


class LedgerSink(Protocol):
    """What the asynchronous writer needs of storage. Called from the writer's thread only."""

    def load_state(self, ledger_id: str, *, dedup_window: int) -> ChainState:
        """The chain state to continue from (genesis for an empty ledger)."""
        ...

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store `records` after everything written before, in order (may return before durable)."""
        ...

    def service(self) -> None:
        """Called when the writer is idle: serve delivery reports; raise if storage failed."""
        ...

    def flush(self, timeout_s: float) -> None:
        """Return once everything written is durable; raise `LedgerTimeoutError` or
        `LedgerWriteFailedError` otherwise."""
        ...

    def close(self) -> None: ...


class MemoryLedgerStore:
    """A ledger in a list of encoded records (offset = index); both a sink and a source.

    `raw` is public on purpose: tests tamper with the stored bytes the way an attacker with write
    access to the topic would.
    """

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self._lock = threading.Lock()

    def load_state(self, ledger_id: str, *, dedup_window: int) -> ChainState:
        state = resume_state(ledger_id, self.read(), from_start=True, dedup_window=dedup_window)
        assert state is not None  # from_start always yields a state
        return state

    def write(self, records: Sequence[LedgerRecord]) -> None:
        encoded = [encode_record(r) for r in records]
        with self._lock:
            self.raw.extend(encoded)

    def write_encoded(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store records already encoded (key, value): the writer's fast path."""
        with self._lock:
            self.raw.extend(value for _, value in items)

    def service(self) -> None:
        return None

    def flush(self, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        return None

    def read(self, start_offset: int = 0) -> Iterator[StoredRecord]:
        with self._lock:
            snapshot = self.raw[start_offset:]
        for i, raw in enumerate(snapshot, start_offset):
            yield stored(i, raw)

    def __len__(self) -> int:
        return len(self.raw)
