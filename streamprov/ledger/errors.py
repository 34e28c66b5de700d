"""Errors of the provenance ledger: one root (`LedgerError`) so callers can catch the ledger precisely.

Tampering found by `verify_ledger` is not an exception: verification returns a report naming the first
bad entry, because finding tampering is the expected outcome of the tool. Exceptions are for things a
caller must handle: a full writer queue, a failed broker, a key that does not load, a broken chain
met while building an index or resuming a writer.
"""

from __future__ import annotations

from streamprov.errors import StreamprovError


class LedgerError(StreamprovError):
    """Root of every error the ledger raises."""


class MalformedRecordError(LedgerError):
    """Bytes on the ledger topic are not a ledger entry or checkpoint of a known schema.

    `raw` keeps the bytes and `offset` their position, so a reader can report or dead-letter them.
    """

    def __init__(self, message: str, raw: bytes | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.raw = raw
        self.offset = offset


class SigningKeyError(LedgerError):
    """A checkpoint signing or verification key is missing or does not load."""


class ChainError(LedgerError):
    """The ledger does not form an unbroken chain where one is required (resuming, indexing).

    `seq` is the first entry that does not fit, when known. Run `verify_ledger` for the full diagnosis.
    """

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class LedgerWriterError(LedgerError):
    """Root of the asynchronous writer's errors."""


class LedgerBackpressureError(LedgerWriterError):
    """`append` waited its whole timeout for room in the full queue: the ledger cannot keep up.

    The entry was not queued. The caller decides: retry, slow down, or stop the pipeline. Dropping
    the entry would leave a hole in the provenance, so the writer never does it silently.
    """


class LedgerClosedError(LedgerWriterError):
    """The writer was closed; nothing more can be appended."""


class LedgerWriteFailedError(LedgerWriterError):
    """The storage behind the writer failed; the writer stopped and accepts nothing more.

    Entries queued but not yet stored when it failed are not in the ledger. A new writer resumes from
    what the topic holds, and the agents replay from their last committed offsets (at-least-once;
    replays keep their entry_id so the graph does not grow duplicates).
    """


class LedgerIndexError(LedgerError):
    """The local index cannot answer: wrong ledger, unknown node or checkpoint, or a closed database."""


class ProofError(LedgerError):
    """A Merkle proof cannot be produced for the sizes or position asked."""


class LedgerTimeoutError(LedgerWriterError):
    """A flush or close did not finish within its timeout; entries may still be on their way."""


class EntryTooLargeError(LedgerWriterError):
    """An application is too large for one ledger record (a reduce with a huge input list).

    Raised by `append` before anything is queued; raise the topic's and the producer's message size
    limits, or reduce smaller groups.
    """
