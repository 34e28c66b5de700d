"""The provenance ledger: append-only, hash-chained, signed, and queryable as a DAG.

Every function application (map, reduce, source version, recompute) becomes a `LedgerEntry`: an
edge from input data nodes to an output data node, each node a (DataID, checksum) pair. Entries are
sequenced and hash-chained by a single writer, covered by Ed25519-signed RFC 6962 Merkle checkpoints,
stored on a one-partition Kafka topic (the source of truth), and materialised into a local RocksDB
index for lineage and impact queries.

    chain       LedgerChain: the single sequencer (seq, prev_hash, dedup, checkpoints)
    writer      LedgerWriter: asynchronous, batched, bounded; what agents call
    kafka       KafkaLedgerSink / KafkaLedgerReader: the topic
    store       storage contracts + MemoryLedgerStore
    verify      verify_ledger: re-derive everything, name the first bad entry
    proofs      inclusion and consistency proofs
    index       LedgerIndex: RocksDB index, queries (upstream, downstream, affected_by_function)
    cli         `streamprov ledger verify|dump|index|downstream|upstream|checkpoint|keygen`
    model, hashing, codec, signing, keys, queries, errors: the parts they share

docs/ledger.md describes the formats byte by byte.
"""

from __future__ import annotations

from streamprov.ledger.chain import ChainState, LedgerChain, resume_state
from streamprov.ledger.codec import decode_record, encode_record
from streamprov.ledger.errors import (
    ChainError,
    EntryTooLargeError,
    LedgerBackpressureError,
    LedgerClosedError,
    LedgerError,
    LedgerIndexError,
    LedgerTimeoutError,
    LedgerWriteFailedError,
    LedgerWriterError,
    MalformedRecordError,
    ProofError,
    SigningKeyError,
)
from streamprov.ledger.hashing import entry_id_of, genesis_hash, seal
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import (
    Application,
    ApplicationKind,
    Checkpoint,
    Context,
    DataRef,
    LedgerEntry,
    LedgerRecord,
    MalformedRecord,
    Origin,
    StoredRecord,
    default_device_id,
)
from streamprov.ledger.proofs import ConsistencyProof, InclusionProof, MemoryProver, entry_proven
from streamprov.ledger.queries import Applied, DownstreamResult, UpstreamResult
from streamprov.ledger.signing import (
    CheckpointSigner,
    CheckpointVerifier,
    load_private_key,
    load_public_key,
)
from streamprov.ledger.store import LedgerSink, LedgerSource, MemoryLedgerStore
from streamprov.ledger.verify import Problem, ProblemKind, VerifyReport, verify_ledger
from streamprov.ledger.writer import LedgerWriter

__all__ = [
    "Application",
    "ApplicationKind",
    "Applied",
    "ChainError",
    "ChainState",
    "Checkpoint",
    "CheckpointSigner",
    "CheckpointVerifier",
    "ConsistencyProof",
    "Context",
    "DataRef",
    "DownstreamResult",
    "EntryTooLargeError",
    "InclusionProof",
    "LedgerBackpressureError",
    "LedgerChain",
    "LedgerClosedError",
    "LedgerEntry",
    "LedgerError",
    "LedgerIndex",
    "LedgerIndexError",
    "LedgerRecord",
    "LedgerSink",
    "LedgerSource",
    "LedgerTimeoutError",
    "LedgerWriteFailedError",
    "LedgerWriter",
    "LedgerWriterError",
    "MalformedRecord",
    "MalformedRecordError",
    "MemoryLedgerStore",
    "MemoryProver",
    "Origin",
    "Problem",
    "ProblemKind",
    "ProofError",
    "SigningKeyError",
    "StoredRecord",
    "UpstreamResult",
    "VerifyReport",
    "decode_record",
    "default_device_id",
    "encode_record",
    "entry_id_of",
    "entry_proven",
    "genesis_hash",
    "load_private_key",
    "load_public_key",
    "resume_state",
    "seal",
    "verify_ledger",
]
