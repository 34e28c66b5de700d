"""Source drift for records derived through a reduce step, with the input lists from the ledger.

A reduce output's header cannot be checked against the source view on its own: its DataID is the
group key (no source record has it) and its `source_checksum` is a SHA-256 Merkle root over
(input DataID, input source checksum) leaves, in arrival order; the header carries only the
InputDigest (count and root over the inputs' own checksums), never the input list. The provenance
ledger has the list: every REDUCE entry names its inputs, in order, and every MAP entry its input.

`LedgerSources.explain` walks the ledger from the record's node (DataID, checksum) back to source
versions and returns the `Derivation`: a source version (`DataRef`), or a `Reduced` over inputs,
each with its own derivation. Recomputing the Merkle construction over it must give exactly the
header's `source_checksum`; only then is it trusted (anything else is `Unexplained`: not in the
ledger yet, ambiguous, or the ledger and the header disagree). The drift check then compares each
source version with the source view's current one (`validator.checks`).

Sound, not complete: a record the ledger does not explain is skipped (counted), never flagged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from streamprov.agents.lifecycle import beating
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import ApplicationKind, DataRef, StoredRecord
from streamprov.ledger.store import LedgerSource
from streamprov.merkle import MerkleAccumulator
from streamprov.stamp import reduce_leaf

log = logging.getLogger(__name__)

FAILURE_BACKOFF_S = 30.0
"""After the ledger could not be read (no such topic, broker away), catch-ups wait this long."""
DEFAULT_MAX_NODES = 200_000
"""Ledger nodes one explanation may visit (a reduce of reduces of large fan-in); past it: skipped."""


@dataclass(frozen=True, slots=True)
class Reduced:
    """A reduce application: its inputs in arrival order, each with the derivation of its source."""

    inputs: tuple[tuple[str, Derivation], ...]


Derivation = DataRef | Reduced
"""What a record's source checksum is computed from: one source version, or a reduce over inputs."""


class Unexplained(NamedTuple):
    """The ledger cannot say what the record derives from; `reason` says why (for logs)."""

    reason: str
    not_found: bool = False
    """The record's node is not in the index: catching the index up may explain it."""


class _AmbiguousError(Exception):
    pass


class _TooLargeError(Exception):
    pass


def source_checksum(
    derivation: Derivation, current: Callable[[DataRef], Checksum | None] | None = None
) -> Checksum | None:
    """The source checksum a header stamps for `derivation`; with `current`, each source version is
    replaced by what `current` returns for it (None when any is missing: then None)."""
    if isinstance(derivation, DataRef):
        return derivation.checksum if current is None else current(derivation)
    acc = MerkleAccumulator()
    for data_id, inner in derivation.inputs:
        checksum = source_checksum(inner, current)
        if checksum is None:
            return None
        acc.add(reduce_leaf(data_id, checksum))
    return Checksum(ChecksumAlgorithm.SHA256, acc.root())


def source_versions(derivation: Derivation) -> list[DataRef]:
    """The source versions a derivation rests on, each once, in first-seen order."""
    seen: dict[DataRef, None] = {}
    stack: list[Derivation] = [derivation]
    while stack:
        d = stack.pop()
        if isinstance(d, DataRef):
            seen.setdefault(d, None)
        else:
            stack.extend(inner for _, inner in reversed(d.inputs))
    return list(seen)


class LedgerSources:
    """Explains reduce-derived records from a `LedgerIndex` kept up to date from the ledger topic.

    `ledger` is the topic reader the index catches up from (`KafkaLedgerReader`); `refresh_s` bounds
    how often a record missing from the index makes it catch up (a catch-up reads the topic's
    watermarks: two short-lived consumers).
    """

    def __init__(
        self,
        index: LedgerIndex,
        ledger: LedgerSource | None,
        *,
        refresh_s: float = 1.0,
        max_nodes: int = DEFAULT_MAX_NODES,
    ) -> None:
        self.index = index
        self.ledger = ledger
        self.refresh_s = refresh_s
        self.max_nodes = max_nodes
        self._next_refresh = float("-inf")
        self._warned = False
        self.explained = 0
        self.unexplained = 0

    def close(self) -> None:
        self.index.close()

    # -- keeping the index current -----------------------------------------------------------------
    def catch_up(self, beat: Callable[[], bool] | None = None) -> int:
        """Index what the ledger topic holds now; returns the records applied (0 when the ledger
        cannot be read: logged, tried again later). `beat` is called every 10,000 records; when it
        returns False the catch-up stops there (what was read stays indexed)."""
        self._next_refresh = time.monotonic() + self.refresh_s
        if self.ledger is None:
            return 0
        try:
            records: Iterable[StoredRecord] = self.ledger.read(self.index.next_offset)
            if beat is not None:
                records = beating(records, beat)
            applied = self.index.apply(records)
        except LedgerError as exc:
            self._next_refresh = time.monotonic() + FAILURE_BACKOFF_S
            if not self._warned:
                log.warning(
                    "cannot read the ledger (%s): reduce outputs get no drift check until it can", exc
                )
                self._warned = True
            return 0
        self._warned = False
        if applied:
            log.info("ledger index: %d record(s) applied, %d entries", applied, self.index.size)
        return applied

    def refresh(self) -> bool:
        """Catch up unless that was done less than `refresh_s` ago (`FAILURE_BACKOFF_S` after a
        failure); True when it read anything."""
        if time.monotonic() < self._next_refresh:
            return False
        return self.catch_up() > 0

    # -- explaining ----------------------------------------------------------------------------------
    def explain(
        self, data_id: str, checksum: Checksum, claimed_source: Checksum, digests: frozenset[bytes]
    ) -> Derivation | Unexplained:
        """What the record (`data_id`, `checksum`) derives from, according to the ledger.

        `digests`: the Merkle roots of the InputDigests in the record's lineage; they pick the
        application when several produced the same node (e.g. two windows with equal sums).
        `claimed_source` is the header's source checksum: the derivation must reproduce it.
        """
        node = DataRef(data_id, checksum)
        try:
            if not self.index.producers(node):
                return Unexplained(f"{node.describe()} is not in the ledger", not_found=True)
            derivation = self._derive(node, digests, {}, [0])
        except _AmbiguousError as exc:
            self.unexplained += 1
            return Unexplained(f"the ledger is ambiguous about {exc}")
        except _TooLargeError:
            self.unexplained += 1
            return Unexplained(f"more than {self.max_nodes} ledger nodes behind it")
        except LedgerError as exc:  # an index that cannot be read: no finding, just no check
            self.unexplained += 1
            return Unexplained(f"the ledger index failed: {exc}")
        if isinstance(derivation, DataRef):
            self.unexplained += 1
            return Unexplained(f"the ledger records {node.describe()} as a source, not as derived")
        recomputed = source_checksum(derivation)
        if recomputed != claimed_source:
            self.unexplained += 1
            return Unexplained(
                f"the inputs the ledger records give source checksum "
                f"{recomputed.hex() if recomputed else '?'}, the header says {claimed_source.hex()}"
            )
        self.explained += 1
        return derivation

    def _derive(
        self, node: DataRef, digests: frozenset[bytes], memo: dict[DataRef, Derivation], budget: list[int]
    ) -> Derivation:
        known = memo.get(node)
        if known is not None:
            return known
        budget[0] += 1
        if budget[0] > self.max_nodes:
            raise _TooLargeError
        apps = [self.index.entry(e).application for e in self.index.producers(node)]
        if not apps or any(a.kind is ApplicationKind.SOURCE for a in apps):
            result: Derivation = node  # original data (the index's `is_source` rule)
        else:
            if len(apps) > 1:  # several applications made this node: prefer the header's reduce
                picked = [
                    a for a in apps if a.kind is ApplicationKind.REDUCE and a.input_digest_root() in digests
                ]
                apps = picked or apps
            options: list[Derivation] = []
            for app in apps:
                if app.kind is ApplicationKind.MAP:
                    options.append(self._derive(app.inputs[0], digests, memo, budget))
                else:
                    inputs = tuple((i.data_id, self._derive(i, digests, memo, budget)) for i in app.inputs)
                    options.append(Reduced(inputs))
            result = options[0]
            if any(source_checksum(o) != source_checksum(result) for o in options[1:]):
                raise _AmbiguousError(f"{node.describe()}: {len(options)} applications produced it")
        memo[node] = result
        return result
