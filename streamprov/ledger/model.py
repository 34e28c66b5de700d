"""The ledger's values: data nodes, function applications, sequenced entries and signed checkpoints.

The provenance DAG has data nodes and function applications. A data node is a `DataRef`, a (DataID,
checksum) pair: the same DataID with other content is another node, so a new version of a source
record is a new node and everything derived from the old one stays attributable to it. An
`Application` is an edge: a function (id, version, code hash, parameters) applied to input nodes,
producing an output node, with where/when/who context. The ledger seals each application into a
`LedgerEntry` (sequence number, hash chain) and periodically signs a `Checkpoint` over all entries.

Everything here is immutable; hashing lives in `hashing`, bytes in `codec`.
"""

from __future__ import annotations

import enum
import functools
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from streamprov.checksum import Checksum, ChecksumAlgorithm, compute
from streamprov.header import now_ms
from streamprov.lineage import InputDigest, Step, StepKind, canonical_json
from streamprov.merkle import length_prefixed, merkle_root


class ApplicationKind(enum.IntEnum):
    """Numbered as the Avro enum `ApplicationKind`: MAP and REDUCE match the lineage `StepKind`."""

    MAP = 0
    REDUCE = 1
    SOURCE = 2
    """A source record version entering the pipeline: no function, no inputs; the output is the node."""


class Origin(enum.IntEnum):
    """Why the function ran: the regular data path, or a Recompute Manager task."""

    PIPELINE = 0
    RECOMPUTE = 1


@dataclass(frozen=True, slots=True)
class DataRef:
    """A data node: a DataID at one exact content (its checksum)."""

    data_id: str
    checksum: Checksum

    @classmethod
    def of(
        cls, data_id: str, value: bytes, algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C
    ) -> DataRef:
        """The node of `value` (the record value bytes as on the wire) under `data_id`."""
        return cls(data_id, compute(algorithm, value))

    def leaf_data(self) -> bytes:
        """`len(DataID) DataID len(alg) alg len(digest) digest`: the same bytes a reduce header's
        Merkle leaf uses, so an entry's input list can be checked against the header's InputDigest."""
        return length_prefixed(
            self.data_id.encode("utf-8"), bytes([self.checksum.algorithm]), self.checksum.value
        )

    def describe(self) -> str:
        return f"{self.data_id}@{self.checksum.hex()}"


@dataclass(frozen=True, slots=True)
class Context:
    """Where the data came from, where it was processed, and who may see it."""

    source: str = ""
    location: str = ""
    access_rights: tuple[str, ...] = ()


NO_CONTEXT = Context()


@functools.cache
def default_device_id() -> str:
    """The host or pod applying functions: STREAMPROV_DEVICE_ID, else POD_NAME (Kubernetes downward
    API), else HOSTNAME (a pod's name in Kubernetes), else the host name. Read once per process."""
    for name in ("STREAMPROV_DEVICE_ID", "POD_NAME", "HOSTNAME"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class Application:
    """One function application, before the ledger sequences it (what an agent hands the writer).

    `parameters` are (name, canonical JSON) pairs as in the lineage `Step`, sorted by name; hashing
    sorts them again, so an unsorted tuple cannot change an entry's identity.
    """

    kind: ApplicationKind
    function_id: str
    function_version: str
    code_hash: bytes
    parameters: tuple[tuple[str, str], ...]
    inputs: tuple[DataRef, ...]
    output: DataRef
    timestamp_ms: int
    device_id: str
    context: Context = NO_CONTEXT
    origin: Origin = Origin.PIPELINE
    task_id: str | None = None
    window_start: int | None = None
    window_end: int | None = None

    @classmethod
    def of_step(
        cls,
        step: Step,
        inputs: Sequence[DataRef],
        output: DataRef,
        *,
        timestamp_ms: int | None = None,
        device_id: str | None = None,
        context: Context = NO_CONTEXT,
        origin: Origin = Origin.PIPELINE,
        task_id: str | None = None,
    ) -> Application:
        """The application a map or reduce agent just performed, from the lineage Step it stamped.

        A reduce's window comes from the Step's InputDigest; its full input list is `inputs` (the
        header only carries their count and Merkle root, see `check_input_digest`).
        """
        window = step.inputs
        return cls(
            ApplicationKind(int(step.kind)),
            step.function_id,
            step.function_version,
            step.code_hash,
            tuple(sorted(step.parameters)),
            tuple(inputs),
            output,
            now_ms() if timestamp_ms is None else timestamp_ms,
            default_device_id() if device_id is None else device_id,
            context,
            origin,
            task_id,
            window.window_start if window is not None else None,
            window.window_end if window is not None else None,
        )

    @classmethod
    def of_source(
        cls,
        node: DataRef,
        *,
        timestamp_ms: int | None = None,
        device_id: str | None = None,
        context: Context = NO_CONTEXT,
    ) -> Application:
        """A source record version seen on a source topic (change detection records these)."""
        return cls(
            ApplicationKind.SOURCE,
            "",
            "",
            b"",
            (),
            (),
            node,
            now_ms() if timestamp_ms is None else timestamp_ms,
            default_device_id() if device_id is None else device_id,
            context,
        )

    @classmethod
    def create(
        cls,
        kind: ApplicationKind,
        function_id: str,
        function_version: str,
        code_hash: bytes,
        params: Mapping[str, Any] | None,
        inputs: Sequence[DataRef],
        output: DataRef,
        **more: Any,
    ) -> Application:
        """Build from plain parameter values (canonical JSON, as `Step.create` does)."""
        encoded = tuple(sorted((k, canonical_json(v)) for k, v in (params or {}).items()))
        more.setdefault("timestamp_ms", now_ms())
        more.setdefault("device_id", default_device_id())
        return cls(kind, function_id, function_version, code_hash, encoded, tuple(inputs), output, **more)

    @property
    def function_key(self) -> tuple[str, str]:
        return self.function_id, self.function_version

    def input_digest_root(self) -> bytes:
        """Merkle root over the inputs as a reduce header's InputDigest computes it."""
        return merkle_root([ref.leaf_data() for ref in self.inputs])

    def check_input_digest(self, digest: InputDigest) -> bool:
        """Does this entry's input list match what the reduce output's header claims?"""
        return digest.count == len(self.inputs) and digest.merkle_root == self.input_digest_root()

    def step(self) -> Step | None:
        """The lineage Step this application stamped (None for SOURCE)."""
        if self.kind is ApplicationKind.SOURCE:
            return None
        digest = None
        if self.kind is ApplicationKind.REDUCE:
            digest = InputDigest(
                len(self.inputs), self.input_digest_root(), self.window_start, self.window_end
            )
        return Step(
            StepKind(int(self.kind)),
            self.function_id,
            self.function_version,
            self.code_hash,
            tuple(sorted(self.parameters)),
            digest,
        )

    def describe(self) -> str:
        if self.kind is ApplicationKind.SOURCE:
            return f"source {self.output.describe()}"
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.parameters))
        ins = ", ".join(r.describe() for r in self.inputs[:3])
        if len(self.inputs) > 3:
            ins += f", ... ({len(self.inputs)} inputs)"
        origin = "" if self.origin is Origin.PIPELINE else f" [recompute {self.task_id or ''}]".rstrip()
        return (
            f"{self.kind.name.lower()} {self.function_id}@{self.function_version}({args}): "
            f"{ins} -> {self.output.describe()}{origin}"
        )


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """An application sealed into the ledger: its place (seq), its link (prev_hash) and its hash."""

    seq: int
    prev_hash: bytes
    entry_id: bytes
    application: Application
    entry_hash: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed tree head: the Merkle root over the first `tree_size` entries, Ed25519-signed.

    `frontier` (perfect subtree roots, largest first) folds into `root_hash`; it lets a writer resume
    the tree, and a verifier localise a rewrite, without reading the ledger from its start.
    """

    ledger_id: str
    number: int
    tree_size: int
    root_hash: bytes
    head_hash: bytes
    frontier: tuple[bytes, ...]
    timestamp_ms: int
    key_id: bytes
    signature: bytes


LedgerRecord = LedgerEntry | Checkpoint


@dataclass(frozen=True, slots=True)
class MalformedRecord:
    """Bytes found on the ledger that decode as neither an entry nor a checkpoint."""

    raw: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as read back from storage, with its position (the Kafka offset)."""

    offset: int
    record: LedgerEntry | Checkpoint | MalformedRecord


class AppTemplate(NamedTuple):
    """What all applications of one step by one agent share; registered once (`LedgerWriter.template`)."""

    kind: ApplicationKind
    function_id: str
    function_version: str
    code_hash: bytes
    parameters: tuple[tuple[str, str], ...]
    device_id: str
    context: Context
    origin: Origin = Origin.PIPELINE
    task_id: str | None = None

    @classmethod
    def of(cls, app: Application) -> AppTemplate:
        return cls(
            app.kind,
            app.function_id,
            app.function_version,
            app.code_hash,
            app.parameters,
            app.device_id,
            app.context,
            app.origin,
            app.task_id,
        )


RefRow = tuple[str, int, bytes]
"""A data node as plain values: (DataID, checksum algorithm number, digest)."""
Row = tuple[int, tuple[RefRow, ...], RefRow, int, int | None, int | None]
"""One application as plain values: (template key, inputs, output, timestamp_ms, window_start, window_end).
Cheap to build on the data path (no objects) and to pickle to a writer process."""
MapRow = tuple[int, bytes | None, tuple[int, bytes] | None, bytes]
"""A map application as the data path has it: (template key, the input's header bytes or None,
(algorithm, digest) of the input value when it had no header, the output's header bytes). The writer
reads the DataID, checksums and timestamp out of the headers (`streamprov.ledger.rows.expand`)."""
AnyRow = Row | MapRow


def ref_row(ref: DataRef) -> RefRow:
    return ref.data_id, int(ref.checksum.algorithm), ref.checksum.value


def _ref(row: RefRow) -> DataRef:
    return DataRef(row[0], Checksum(ChecksumAlgorithm(row[1]), row[2]))


def application_of(template: AppTemplate, row: Row) -> Application:
    """The Application a row describes under its template."""
    t = template
    return Application(
        t.kind,
        t.function_id,
        t.function_version,
        t.code_hash,
        t.parameters,
        tuple(_ref(r) for r in row[1]),
        _ref(row[2]),
        row[3],
        t.device_id,
        t.context,
        t.origin,
        t.task_id,
        row[4],
        row[5],
    )
