"""Keyed, tumbling-window reduction with provenance, independent of the stream framework.

Both agent flavours drive it: add records as they arrive, take the windows that closed. The output of
a window carries a header whose reduce step holds a constant-size digest of the inputs (count + Merkle
root), so headers stay bounded whatever the fan-in. `open_offsets()` tells a consumer which offsets it
may commit: none past the oldest record still held in an open window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamprov.checksum import ChecksumAlgorithm
from streamprov.errors import StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.registry import RegisteredFunction
from streamprov.stamp import ReduceState

TopicPartition = tuple[str, int]


class LateRecordError(StreamprovError):
    """A record arrived for a window that has already been emitted (past its grace period)."""


@dataclass
class _Window:
    state: ReduceState
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReduceOutput:
    """A closed window: its key, bounds, final accumulator and provenance state."""

    key: str
    window: tuple[int, int]
    value: Any
    state: ReduceState

    def header(
        self,
        function: RegisteredFunction,
        params: Mapping[str, Any] | None,
        output_value: bytes,
        algorithm: ChecksumAlgorithm,
    ) -> ProvenanceHeader:
        return self.state.header(function.step(params), self.key, output_value, algorithm, self.window)


class WindowedReducer:
    """Tumbling windows of `window_ms` by record timestamp, closed `grace_ms` after their end."""

    def __init__(
        self,
        function: RegisteredFunction,
        window_ms: int,
        grace_ms: int = 0,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if function.initial is None:
            raise StreamprovError(f"{function.function_id} is not a reduce function")
        if window_ms <= 0 or grace_ms < 0:
            raise StreamprovError("window_ms must be > 0 and grace_ms >= 0")
        self.function = function
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.params = dict(params or {})
        self._open: dict[tuple[str, int], _Window] = {}
        self._watermark = -1
        self._closed_before = -1  # windows starting before this have been emitted

    @property
    def watermark_ms(self) -> int:
        return self._watermark

    def window_of(self, timestamp_ms: int) -> tuple[int, int]:
        start = timestamp_ms - timestamp_ms % self.window_ms
        return start, start + self.window_ms

    def add(
        self,
        key: str,
        header: ProvenanceHeader,
        value: Any,
        timestamp_ms: int,
        position: tuple[str, int, int] | None = None,
    ) -> None:
        """Fold one record into its (key, window); `position` is (topic, partition, offset)."""
        start, _ = self.window_of(timestamp_ms)
        if start < self._closed_before:
            raise LateRecordError(
                f"record at {timestamp_ms} ms for key {key!r} is later than the grace period "
                f"({self.grace_ms} ms) of window starting {start}"
            )
        slot = self._open.get((key, start))
        if slot is None:
            assert self.function.initial is not None
            slot = _Window(ReduceState(self.function.initial()))
            # Kept only once the function accepted the record: if it raises, no empty window is left
            # behind to be emitted later with zero inputs.
            slot.state.add(self.function, self.params, header, value)
            self._open[(key, start)] = slot
        else:
            slot.state.add(self.function, self.params, header, value)
        if position is not None:
            tp = (position[0], position[1])
            slot.first_offsets.setdefault(tp, position[2])
        self._watermark = max(self._watermark, timestamp_ms)

    def close_due(self) -> list[ReduceOutput]:
        """Windows whose end plus grace is at or before the watermark, oldest first."""
        horizon = self._watermark - self.grace_ms
        due = sorted((k for k in self._open if k[1] + self.window_ms <= horizon), key=lambda k: (k[1], k[0]))
        # Every window ending at or before the horizon is now closed, whether or not it held records:
        # a later record for any of them is late. Lateness depends on the watermark alone, not on
        # which windows other keys happened to hold (and no window is emitted after a newer one).
        self._closed_before = max(self._closed_before, self.window_of(horizon)[0])
        return [self._emit(k) for k in due]

    def close_all(self) -> list[ReduceOutput]:
        """Every open window, e.g. on a clean shutdown or at the end of a bounded input."""
        keys = sorted(self._open, key=lambda k: (k[1], k[0]))
        return [self._emit(k) for k in keys]

    def _emit(self, k: tuple[str, int]) -> ReduceOutput:
        slot = self._open.pop(k)
        return ReduceOutput(k[0], (k[1], k[1] + self.window_ms), slot.state.accumulator, slot.state)

    def state_of(self, key: str, start: int) -> ReduceState | None:
        """The open state of window (key, start): an agent persists it after `add`."""
        slot = self._open.get((key, start))
        return None if slot is None else slot.state

    def restore(self, key: str, start: int, state: ReduceState) -> None:
        """Re-open a window from persisted state after a restart (the state store is the truth)."""
        if start % self.window_ms:
            raise StreamprovError(f"{start} is not the start of a {self.window_ms} ms window")
        self._open[(key, start)] = _Window(state)

    def advance_watermark(self, timestamp_ms: int) -> None:
        """Move the watermark forward without a record: restoring progress, or an idle timer.

        Call `close_due()` afterwards to emit what it closed.
        """
        self._watermark = max(self._watermark, timestamp_ms)

    def open_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the oldest offset still held by an open window (not yet committable)."""
        low: dict[TopicPartition, int] = {}
        for slot in self._open.values():
            for tp, off in slot.first_offsets.items():
                if off < low.get(tp, off + 1):
                    low[tp] = off
        return low

    def __len__(self) -> int:
        return len(self._open)
