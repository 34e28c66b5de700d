"""What an agent calls to record its applications in the ledger, off the data path.

`StepRecorder` turns what a map or reduce step just did into an `Application` and hands it to a
`LedgerWriter` (a bounded queue put; sealing, hashing and storing happen on the writer's thread).
Every agent flavour shares it: the confluent-kafka `Processor` and the faust agents.

- **Map**: one input node (the input's DataID and its checksum: from its header, or computed when it
  arrives without one, exactly as the stamper names it) and one output node (same DataID, the
  checksum of the output value as stamped). Read from the header bytes in place, no decoding.
- **Reduce**: the full input list, in arrival order, kept per open window (`add_input`) until the
  window is emitted (`record_reduce`) or dropped (`drop_windows`, on a rewind: replay rebuilds it).
  Memory is bounded by what the open windows hold: one `DataRef` per input record. The header's
  InputDigest (count + Merkle root) is over the same (DataID, checksum) leaves in the same order, so
  `Application.check_input_digest` ties the entry to the output's header.

Applications are buffered and handed to the writer `handoff` at a time (one queue item: one lock and
one wake-up of the writer thread for many records), and at every flush.

Durability contract (at-least-once): the agent calls `begin_flush()` / `flush()` before committing
its consumer offsets, so an entry is never lost to a crash; a replay appends the same application
again, with the same entry_id, and the chain and the index drop it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from streamprov.checksum import Checksum, ChecksumAlgorithm, compute
from streamprov.header import PREFIX, ProvenanceHeader
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.model import (
    NO_CONTEXT,
    AnyRow,
    ApplicationKind,
    AppTemplate,
    Context,
    DataRef,
    Origin,
    RefRow,
    default_device_id,
)
from streamprov.ledger.rows import header_checksum, input_ref_row, output_fields
from streamprov.ledger.writer import FlushWaiter, LedgerAppender
from streamprov.lineage import Step, StepKind
from streamprov.merkle import length_prefixed, merkle_root

_PREFIX_LEN = len(PREFIX)
_ALGORITHMS = tuple(ChecksumAlgorithm)


@dataclass
class RecorderStats:
    appended: int = 0
    """Applications handed to the writer."""
    inputs_held: int = 0
    """Input refs held for open windows."""


class StepRecorder:
    """Records one step's applications (map or reduce) in a ledger; see the module docstring.

    `context` (source, location, access rights) and `device_id` (default: `default_device_id()`, i.e.
    STREAMPROV_DEVICE_ID, POD_NAME, HOSTNAME, else the host name) go into every entry.
    Not thread-safe: one agent loop owns it (the writer it feeds is thread-safe).
    """

    def __init__(
        self,
        writer: LedgerAppender,
        step: Step,
        *,
        context: Context | None = None,
        device_id: str | None = None,
        origin: Origin = Origin.PIPELINE,
        task_id: str | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        handoff: int = 64,
    ) -> None:
        self.writer = writer
        self.step = step
        self.context = context if context is not None else NO_CONTEXT
        self.device_id = device_id or default_device_id()
        self.algorithm = algorithm
        self.handoff = handoff
        self.stats = RecorderStats()
        self.template = AppTemplate(
            ApplicationKind(int(step.kind)),
            step.function_id,
            step.function_version,
            step.code_hash,
            tuple(sorted(step.parameters)),
            self.device_id,
            self.context,
            origin,
            task_id,
        )
        self._key = writer.template(self.template)
        self._windows: dict[Hashable, list[RefRow]] = {}
        self._buffer: list[AnyRow] = []
        self._unflushed = 0

    @property
    def unflushed(self) -> int:
        """Applications recorded since the last flush began (0: a flush would have nothing to do)."""
        return self._unflushed

    # -- map -------------------------------------------------------------------------------------------
    def input_ref(self, raw: bytes | None, value: bytes, data_id: str) -> DataRef:
        """The node a step read: the header's DataID and checksum, or (no header) `data_id` and the
        checksum of `value`, as the stamper names a record that arrives without provenance."""
        row = self._input_row(raw, value, data_id)
        return DataRef(row[0], Checksum(_ALGORITHMS[row[1]], row[2]))

    def _input_row(self, raw: bytes | None, value: bytes, data_id: str) -> RefRow:
        if raw is None:
            c = compute(self.algorithm, value)
            return data_id, int(c.algorithm), c.value
        return input_ref_row(raw, data_id)

    def record_map(self, input_raw: bytes | None, input_value: bytes, output_header: bytes) -> None:
        """Record a map application from the input's header (None when it had none) and value, and the
        output header the stamper made. Raises the writer's errors (backpressure, failed, closed).

        The data path keeps the header bytes as they are (a `MapRow`); the writer reads the DataID,
        checksums and timestamp out of them on its own thread or process.
        """
        if input_raw is None:  # no header: the node is named by the value's checksum
            c = compute(self.algorithm, input_value)
            self._add((self._key, None, (int(c.algorithm), c.value), output_header))
        else:
            self._add((self._key, input_raw, None, output_header))

    # -- reduce ----------------------------------------------------------------------------------------
    def add_input(self, window: Hashable, data_id: str, checksum: Checksum) -> None:
        """Remember that the open `window` (any hashable key, e.g. (group, start)) took this input."""
        refs = self._windows.get(window)
        if refs is None:
            refs = self._windows[window] = []
        refs.append((data_id, int(checksum.algorithm), checksum.value))
        self.stats.inputs_held += 1

    def held(self, window: Hashable) -> list[DataRef]:
        return [DataRef(r[0], Checksum(_ALGORITHMS[r[1]], r[2])) for r in self._windows.get(window, ())]

    def record_reduce(self, window: Hashable, header: ProvenanceHeader) -> None:
        """Record the reduce application that emitted `window` with output `header`; forgets its inputs.

        The header's last lineage step is the reduce step (with its InputDigest, i.e. window bounds);
        held inputs that do not match that digest raise `LedgerError` (the entry would lie).
        """
        refs = self._windows.pop(window, [])
        self.stats.inputs_held -= len(refs)
        step = header.lineage[-1] if header.lineage else None
        if step is None or step.kind is not StepKind.REDUCE:
            raise LedgerError(f"the header of window {window!r} does not end with a reduce step")
        digest = step.inputs
        if digest is not None:
            root = merkle_root([length_prefixed(r[0].encode("utf-8"), bytes((r[1],)), r[2]) for r in refs])
            if digest.count != len(refs) or digest.merkle_root != root:
                raise LedgerError(
                    f"window {window!r}: {len(refs)} held inputs do not match the header's digest of "
                    f"{digest.count} inputs"
                )
        c = header.checksum
        self._add(
            (
                self._key,
                tuple(refs),
                (header.data_id, int(c.algorithm), c.value),
                header.timestamp_ms,
                None if digest is None else digest.window_start,
                None if digest is None else digest.window_end,
            )
        )

    def forget(self, window: Hashable) -> None:
        """Drop one window's inputs (it was dead-lettered or discarded without an output)."""
        self.stats.inputs_held -= len(self._windows.pop(window, []))

    def drop_windows(self) -> None:
        """Forget every open window (the agent dropped them; replaying the input rebuilds them)."""
        self._windows.clear()
        self._buffer.clear()  # a rewind redoes the batch: its applications are recorded again
        self.stats.inputs_held = 0

    @property
    def open_windows(self) -> int:
        return len(self._windows)

    # -- durability ------------------------------------------------------------------------------------
    def _add(self, row: AnyRow) -> None:
        self._buffer.append(row)
        self._unflushed += 1
        if len(self._buffer) >= self.handoff:
            self.hand_over()

    def hand_over(self) -> None:
        """Give the buffered applications to the writer (one queue item); raises the writer's errors,
        and then keeps nothing: the agent redoes the batch, which records them again."""
        buffer, self._buffer = self._buffer, []
        if buffer:
            self.writer.append_rows(buffer)
            self.stats.appended += len(buffer)

    def begin_flush(self, timeout_s: float = 30.0) -> FlushWaiter | None:
        """Hand over what is buffered and start flushing what was appended (None when nothing was
        since the last flush)."""
        if not self._unflushed:
            return None
        self.hand_over()
        ticket = self.writer.begin_flush(timeout_s)
        self._unflushed = 0
        return ticket

    def flush(self, timeout_s: float = 30.0) -> None:
        ticket = self.begin_flush(timeout_s)
        if ticket is not None:
            ticket.wait()


__all__ = ["RecorderStats", "StepRecorder", "header_checksum", "output_fields"]
