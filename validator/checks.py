"""The Validator's per-message checks, without Kafka I/O: a batch of consumed messages in, alerts and
dead letters out.

Each check is switched per topic (`TopicPolicy`):

* integrity: the value's checksum against the header's (`header.verify_value`: one struct unpack
  and one CRC32C in the common case);
* source drift: the header's source checksum against the current version of the source record
  with the same DataID in the local source view; compared as encoded bytes, in place, with no
  object built. A missing source is its own finding (`missing_source`). Records whose lineage holds
  a REDUCE step are skipped: their DataID is the group key and their source checksum a Merkle root
  over the inputs' source checksums, which the header alone cannot recompute (the input list is in
  the ledger);
* re-derivation (sampled): see `validator.rederive`;
* staleness: the source record's Kafka timestamp against `source_max_age`, the header timestamp
  against `message_max_age`.

A record without a provenance header (`missing_header`), with one that does not decode
(`malformed_header`: empty, truncated, bad field or lineage) or of an unknown schema version
(`unknown_schema`) is dead-lettered with that reason and also raises a `malformed` alert whose
evidence starts with the same code.

Before a changed or missing source is reported, the view is brought up to the source topics' ends
once per batch (`refresh`) and the suspects are checked again: a record derived from a source
version the view has not read yet is not a finding.

The loop is the Validator's hot path: per clean record it reads the header's head fields with
`header.scan` (slices and varints, no objects), looks the lineage up in a memo keyed by its bytes,
and the source up in the view's in-memory cache.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import crc32c as _crc32c

from streamprov import avro
from streamprov.agents.dead_letter import DeadLetterReason, classify, dead_letter_headers, fit, source_of
from streamprov.checksum import Checksum, ChecksumAlgorithm, digest
from streamprov.errors import HeaderError, MalformedHeaderError, MissingHeaderError
from streamprov.header import (
    HEADER_KEY,
    PREFIX,
    ProvenanceHeader,
    encode_checksum,
    find_raw,
    scan,
    verify_value,
)
from streamprov.ledger.model import DataRef
from streamprov.lineage import Lineage, StepKind, decode_lineage
from streamprov.signing import Verifier
from streamprov.stamp import source_data_id
from validator.alerts import Alert, AlertKind, Criticality, Evidence
from validator.rederive import Rederiver, describe_chain, sampled
from validator.reduce_drift import (
    Derivation,
    LedgerSources,
    Unexplained,
    source_checksum,
    source_versions,
)
from validator.source_view import SourceEntry, SourceLookup

log = logging.getLogger(__name__)

_KEY = HEADER_KEY
_PREFIX_LEN = len(PREFIX)
_crc: Callable[[bytes], int] = _crc32c.crc32c
_CRC_TAG = b"\x00\x08"
"""An Avro-encoded Checksum's head for CRC32C: algorithm index 0, digest length 4 (zig-zag 8)."""
_HEAD_OK = PREFIX + _CRC_TAG
_unpack_head = struct.Struct(f">{len(_HEAD_OK)}sI2sIIBBB").unpack_from
"""prefix + checksum tag, checksum (int), source checksum tag, source checksum (int), the first four
timestamp varint bytes (one int), the fifth, the sixth, the DataID's length byte: the fast path's
whole read."""
_CONTINUED = 0x80808080


_SOURCE_AT = len(_HEAD_OK) + 4
_SOURCE_END = _SOURCE_AT + 6
_ID_AT = _SOURCE_END + 6 + 1
"""Where the DataID starts when the timestamp varint has six bytes (2^34..2^41 ms: 1970+6 months
to 2039) and the DataID's length one: the fast path's layout."""
_ALGORITHMS = tuple(ChecksumAlgorithm)
_LINEAGE_MEMO_SIZE = 4096


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """Which checks run on one output topic, with their limits (from the topic's config)."""

    integrity: bool = True
    source_drift: bool = True
    rederive_rate: float = 0.0
    """Fraction of records re-derived (0 = off)."""
    source_max_age_ms: int | None = None
    """Stale when the source record's Kafka timestamp is older than this (None = off)."""
    message_max_age_ms: int | None = None
    """Stale when the header timestamp is older than this (None = off)."""
    criticality: Criticality = Criticality.MEDIUM
    verifier: Verifier | None = None
    """Verify the provenance header's signature (`streamprov.signing`); a bad one: `bad_signature`."""

    @property
    def needs_source(self) -> bool:
        return self.source_drift or self.source_max_age_ms is not None or self.rederive_rate > 0


class MessageLike(Protocol):
    """The part of a consumed `confluent_kafka.Message` the checks read (tests pass plain objects)."""

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...

    def key(self) -> Any: ...

    def value(self) -> Any: ...

    def headers(self) -> Any: ...

    def error(self) -> Any: ...


class DeadLetterRecord(NamedTuple):
    """A record to set aside exactly as consumed, with the dead-letter headers saying why."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class LineageInfo(NamedTuple):
    lineage: Lineage
    has_reduce: bool
    replayable: bool
    digests: frozenset[bytes] = frozenset()
    """Merkle roots of the lineage's InputDigests (they pick a reduce entry in the ledger)."""


@dataclass
class BatchResult:
    """What one batch produced, and counters for metrics."""

    alerts: list[Alert] = field(default_factory=list)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)
    checked: int = 0
    drift_skipped: int = 0
    """Records whose lineage has a REDUCE step and that the ledger does not explain (or no ledger is
    configured): no drift check (see `validator.reduce_drift`)."""
    reduce_checked: int = 0
    """Records whose lineage has a REDUCE step whose sources were checked through the ledger."""
    rederived: int = 0
    errors: list[Any] = field(default_factory=list)
    """Consumer errors (`KafkaError`) delivered as messages in the batch; not records, not checked."""


class _ReduceSuspect(NamedTuple):
    """A reduce-derived record whose sources (per the ledger) differ from the view's; held back like
    `_Suspect` until the view has caught up."""

    msg: MessageLike
    raw: bytes
    data_id: bytes
    derivation: Derivation
    claimed: Checksum
    policy: TopicPolicy


class _ReduceLookup(NamedTuple):
    """A reduce-derived record not in the ledger index yet: looked up again after a catch-up."""

    msg: MessageLike
    raw: bytes
    current: bytes
    source_start: int
    source_end: int
    data_id: bytes
    info: LineageInfo
    policy: TopicPolicy


class _Suspect(NamedTuple):
    """A drift finding held back until the view has caught up with the source topics."""

    msg: MessageLike
    raw: bytes
    current: bytes
    source_start: int
    source_end: int
    data_id: bytes
    policy: TopicPolicy


def iso_ms(ms: int) -> str:
    """A ms timestamp as ISO 8601 UTC text for evidence (the raw number when out of range)."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


def checksum_text(encoded: bytes) -> str:
    """'crc32c:5e9725f0' for an Avro-encoded Checksum (algorithm byte, length byte, digest)."""
    return f"{_ALGORITHMS[encoded[0] >> 1].name.lower()}:{encoded[2:].hex()}"


def _repeated(hs: Any) -> bool:
    """Does the provenance header appear again after the first one? (The general path reports it.)"""
    return any(k == _KEY for k, _ in hs[1:])


class Checker:
    """Runs the enabled checks on batches of messages; keeps only memos, never Kafka state."""

    def __init__(
        self,
        policy_for: Callable[[str], TopicPolicy],
        view: SourceLookup | None,
        *,
        dead_letter_topic: str,
        rederiver: Rederiver | None = None,
        refresh: Callable[[], object] | None = None,
        topics: Sequence[str] | None = None,
        ledger: LedgerSources | None = None,
    ) -> None:
        """`topics`: the topics the messages come from, when known; with exactly one, the loop does
        not read each record's topic. `ledger`: explains records derived through a reduce, so their
        sources get the drift check too (without it they are skipped and counted)."""
        self._policy_for = policy_for
        self._policies: dict[str, TopicPolicy] = {}
        self.view = view
        self.dead_letter_topic = dead_letter_topic
        self.rederiver = rederiver
        self.refresh = refresh
        self.ledger = ledger
        self._reduce_suspects: list[_ReduceSuspect] = []
        self._reduce_lookups: list[_ReduceLookup] = []
        self._lineages: dict[bytes, LineageInfo] = {}
        self._single = topics[0] if topics is not None and len(topics) == 1 else None

    def policy(self, topic: str) -> TopicPolicy:
        pol = self._policies.get(topic)
        if pol is None:
            pol = self._policies[topic] = self._policy_for(topic)
        return pol

    def _fast_policy(self, topic: str) -> tuple[TopicPolicy, bool, bool, bool]:
        """(policy, can the fast loop check it, integrity on, drift on) for `topic`."""
        pol = self.policy(topic)
        fast = pol.message_max_age_ms is None and pol.source_max_age_ms is None and pol.rederive_rate <= 0
        fast = fast and pol.verifier is None
        return pol, fast, pol.integrity, pol.source_drift and self.view is not None

    def _lineage(self, encoded: bytes) -> LineageInfo:
        info = self._lineages.get(encoded)
        if info is None:
            lineage = decode_lineage(encoded)  # raises MalformedHeaderError
            has_reduce = any(s.kind is StepKind.REDUCE for s in lineage)
            digests = frozenset(s.inputs.merkle_root for s in lineage if s.inputs is not None)
            info = LineageInfo(lineage, has_reduce, bool(lineage) and not has_reduce, digests)
            if len(self._lineages) >= _LINEAGE_MEMO_SIZE:
                self._lineages.clear()
            self._lineages[encoded] = info
        return info

    # -- the batch loop ------------------------------------------------------------------------------
    def check(self, messages: Sequence[MessageLike], now_ms: int) -> BatchResult:  # noqa: PLR0915
        """Check every message; never raises for a bad record (it becomes an alert or a dead letter).

        The loop is the per-record path, so it is written for the common case and hands everything
        else to `_check_one`: a record goes the fast way when its topic checks integrity and/or
        drift only, and its header is first, of the current version, with CRC32C checksums, a
        timestamp of this era (a six-byte varint) and a DataID under 64 ASCII bytes. One struct
        unpack reads all of that; the lineage is compared with the previous record's (a stage shares
        one) before any lookup. Nothing is decided until every byte the fast way relies on has been
        validated, so a record is never checked twice.
        """
        result = BatchResult()
        lineages = self._lineages
        view = self.view
        view_get = view.get if view is not None else None
        crc_of = view.crcs.get if view is not None else None
        suspects: list[_Suspect] = []
        slow: list[MessageLike] = []
        unpack = _unpack_head
        head_ok = _HEAD_OK
        crc_tag = _CRC_TAG
        continued = _CONTINUED
        id_at = _ID_AT
        key_ = _KEY
        crc = _crc
        last_lineage = b""
        last_len = 1 << 62  # matches no record: the first one's lineage is always decoded
        last_reduce = False
        last_topic: str | None = None
        multi = self._single is None
        reduce_check = self.ledger is not None
        self._reduce_suspects, self._reduce_lookups = [], []
        pol, fast, integrity, drift = self._fast_policy(self._single or "")
        events = 0
        for m in messages:
            hs = m.headers()
            try:
                key, raw = hs[0]
                head, crc_claimed, source_tag, source_crc, t4, t5, t6, id_len = unpack(raw)
                value_crc = crc(m.value())  # a null value raises TypeError: the general path
            except (TypeError, IndexError, ValueError, struct.error):
                slow.append(m)
                continue
            if (
                key != key_
                or (len(hs) > 1 and _repeated(hs))
                or head != head_ok
                or source_tag != crc_tag
                or t4 & continued != continued
                or t5 < 0x80
                or t6 >= 0x80
                or id_len >= 0x80
                or id_len & 1
            ):
                slow.append(m)
                continue
            lineage_at = id_at + (id_len >> 1)
            if len(raw) - last_len != lineage_at or not raw.endswith(last_lineage):
                encoded = raw[lineage_at:]
                info = lineages.get(encoded)
                if info is None:
                    try:
                        info = self._lineage(encoded)
                    except HeaderError:
                        slow.append(m)
                        continue
                last_lineage, last_len, last_reduce = encoded, len(encoded), info.has_reduce
            if multi:
                topic = m.topic()
                if topic != last_topic:
                    last_topic = topic
                    pol, fast, integrity, drift = self._fast_policy(topic or "")
            if not fast:
                slow.append(m)
                continue
            data_id = raw[id_at:lineage_at]
            if drift and not last_reduce:
                # A hit also proves the DataID valid: the view's keys are UTF-8.
                if crc_of(data_id) != source_crc:  # type: ignore[misc]
                    entry = view_get(data_id)  # type: ignore[misc]  # rare: not cached, missing, changed
                    if entry is None or entry.crc32c != source_crc:
                        slow.append(m)  # the general path validates, reports, and re-checks drift
                        continue
            elif not data_id.isascii():
                slow.append(m)
                continue
            elif drift:
                if reduce_check:  # its sources are behind the ledger: the general path asks it
                    slow.append(m)
                    continue
                result.drift_skipped += 1
            if integrity and value_crc != crc_claimed:
                self._checksum_mismatch(m, raw, raw, _SOURCE_AT, m.value(), pol, now_ms, result)
        for m in slow:
            if not self._check_one(m, now_ms, result, suspects):
                events += 1
        result.checked = len(messages) - events
        if self._reduce_lookups:
            self._look_up_again(result)
        if suspects or self._reduce_suspects:
            self._report_drift(suspects, now_ms, result)
        return result

    def _check_one(  # noqa: PLR0915
        self, m: MessageLike, now_ms: int, result: BatchResult, suspects: list[_Suspect]
    ) -> bool:
        """Every check on one record, any header layout and any policy; False for a consumer event."""
        topic = m.topic()
        pol = self.policy(topic or "")
        hs = m.headers()
        try:
            raw, current = self._general_header(hs)
            source_start, source_end, id_start, lineage_at = scan(current)
            info = self._lineage(current[lineage_at:])
        except (HeaderError, TypeError, ValueError) as exc:
            error = m.error()
            if error is not None:  # an event from librdkafka, not a record
                result.errors.append(error)
                return False
            if not isinstance(exc, HeaderError):
                exc = MalformedHeaderError(f"record headers are unreadable: {exc}")
            self._malformed(m, raw_or_none(hs), exc, pol, now_ms, result)
            return True
        data_at = id_start + 1 if current[id_start] < 0x80 else avro.read_long(current, id_start)[1]
        data_id = current[data_at:lineage_at]
        value = m.value()
        if pol.integrity and not verify_value(current, value if value is not None else b""):
            self._checksum_mismatch(m, raw, current, source_start, value, pol, now_ms, result)
        if pol.verifier is not None:
            self._signature(pol.verifier, m, hs, raw, data_id, pol, now_ms, result)
        message_max = pol.message_max_age_ms
        if message_max is not None:
            ts = avro.read_long(current, source_end)[0]
            if now_ms - ts > message_max:
                self._stale_message(m, raw, data_id, ts, pol, now_ms, result)
        view = self.view
        if view is None or not pol.needs_source:
            return True
        if info.has_reduce:  # the DataID is a group key, not a source: the sources are in the ledger
            if pol.source_drift:
                lookup = _ReduceLookup(m, raw, current, source_start, source_end, data_id, info, pol)
                self._reduce_drift(lookup, result, retry=True)
            return True
        entry = view.get(data_id)
        drifted = False
        if pol.source_drift:
            if entry is None:
                drifted = True
            elif current[source_start] == 0:  # CRC32C
                drifted = entry.crc32c != int.from_bytes(current[source_start + 2 : source_end])
            else:  # another algorithm: the view computes it from the stored value
                src = view.encoded_checksum(data_id, _ALGORITHMS[current[source_start] >> 1]) or b""
                drifted = current[source_start:source_end] != src
            if drifted:
                suspects.append(_Suspect(m, raw, current, source_start, source_end, data_id, pol))
        if entry is None:
            if not pol.source_drift:  # no drift check to report it: still a finding
                self._missing_source(m, raw, data_id, pol, now_ms, result)
            return True
        source_max = pol.source_max_age_ms
        if source_max is not None and entry.timestamp_ms >= 0 and now_ms - entry.timestamp_ms > source_max:
            self._stale_source(m, raw, data_id, entry, pol, now_ms, result)
        if (
            pol.rederive_rate > 0
            and not drifted
            and info.replayable
            and self.rederiver is not None
            and sampled(topic or "", m.partition() or 0, m.offset() or 0, pol.rederive_rate)
        ):
            self._rederive(m, raw, current, data_id, entry, info, pol, now_ms, result)
        return True

    def _general_header(self, hs: Any) -> tuple[bytes, bytes]:
        """(raw, current-version bytes) of a header that is not first or not the current version."""
        raw = find_raw(hs)
        if raw is None:
            raise MissingHeaderError(f"record has no provenance header {_KEY!r}")
        try:
            scan(raw)
            return raw, raw
        except HeaderError:
            pass
        # An older schema version decodes onto the current one; re-encoding gives the same fields.
        return raw, ProvenanceHeader.decode(raw).encode()

    # -- findings -------------------------------------------------------------------------------------
    @staticmethod
    def _alert(
        kind: AlertKind,
        m: MessageLike,
        raw: bytes | None,
        data_id: bytes | str,
        evidence: Evidence,
        pol: TopicPolicy,
        now_ms: int,
        aspect: str = "",
    ) -> Alert:
        return Alert.create(
            kind,
            data_id=data_id if isinstance(data_id, str) else data_id.decode("utf-8", "replace"),
            topic=m.topic() or "",
            partition=m.partition() or 0,
            offset=m.offset() or 0,
            header=raw,
            evidence=evidence,
            criticality=pol.criticality,
            detected_at_ms=now_ms,
            aspect=aspect,
        )

    def _malformed(
        self,
        m: MessageLike,
        raw: bytes | None,
        exc: HeaderError,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        topic, partition, offset = m.topic() or "", m.partition() or 0, m.offset() or 0
        reason = classify(exc)  # missing_header, malformed_header or unknown_schema
        where = source_of(topic, partition, offset)
        try:
            headers = dead_letter_headers(m.headers(), reason, exc, where)
        except (TypeError, ValueError):  # headers that are not (key, value) pairs cannot be kept
            headers = dead_letter_headers(None, reason, exc, where)
        key, value, headers = fit(m.key(), m.value(), headers)
        result.dead_letters.append(DeadLetterRecord(key, value, headers))
        data_id = source_data_id(m.key(), topic, partition, offset)
        if reason is DeadLetterReason.MISSING_HEADER:
            actual = "no header"
        elif raw is None:
            actual = f"no readable header: {exc}"[:500]
        elif not raw:
            actual = f"an empty header: {exc}"[:500]
        else:
            actual = f"{len(raw)} header bytes: {exc}"[:500]
        evidence = Evidence(
            f"a provenance header {_KEY!r} of a known schema version",
            actual,
            f"{reason}: {exc}; the record went to the dead-letter topic {self.dead_letter_topic}"[:1000],
        )
        result.alerts.append(self._alert(AlertKind.MALFORMED, m, raw, data_id, evidence, pol, now_ms))

    def _signature(
        self,
        verifier: Verifier,
        m: MessageLike,
        hs: Any,
        raw: bytes,
        data_id: bytes,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        problem = verifier.problem(hs, m.value())
        if problem is not None:
            evidence = Evidence(problem.expected, problem.actual, problem.reason)
            result.alerts.append(self._alert(AlertKind.BAD_SIGNATURE, m, raw, data_id, evidence, pol, now_ms))

    def _checksum_mismatch(
        self,
        m: MessageLike,
        raw: bytes,
        current: bytes,
        source_start: int,
        value: bytes | None,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        claimed = current[_PREFIX_LEN:source_start]  # the encoded checksum, right after the prefix
        algorithm = _ALGORITHMS[claimed[0] >> 1]
        actual = digest(algorithm, value if value is not None else b"")
        data_id = _data_id_text(current)
        evidence = Evidence(
            checksum_text(claimed),
            f"{algorithm.name.lower()}:{actual.hex()}",
            f"the {algorithm.name} of the record's value does not match the checksum in its provenance "
            "header: the payload was corrupted or the header altered"
            + (" (the value is null)" if value is None else ""),
        )
        result.alerts.append(self._alert(AlertKind.CHECKSUM_MISMATCH, m, raw, data_id, evidence, pol, now_ms))

    def _stale_message(
        self,
        m: MessageLike,
        raw: bytes,
        data_id: bytes,
        ts: int,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        limit = pol.message_max_age_ms or 0
        evidence = Evidence(
            f"age <= {limit} ms",
            f"age {now_ms - ts} ms (header timestamp {iso_ms(ts)})",
            f"the record was made longer ago than the topic's message_max_age ({limit} ms)",
        )
        result.alerts.append(
            self._alert(AlertKind.STALE, m, raw, data_id, evidence, pol, now_ms, aspect="message")
        )

    def _stale_source(
        self,
        m: MessageLike,
        raw: bytes,
        data_id: bytes,
        entry: SourceEntry,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        limit = pol.source_max_age_ms or 0
        age = now_ms - entry.timestamp_ms
        evidence = Evidence(
            f"source updated within {limit} ms",
            f"source last updated {age} ms ago ({iso_ms(entry.timestamp_ms)}, {entry.coordinates})",
            f"the source record has not been updated within the topic's source_max_age ({limit} ms)",
        )
        result.alerts.append(
            self._alert(AlertKind.STALE, m, raw, data_id, evidence, pol, now_ms, aspect="source")
        )

    def _missing_source(
        self, m: MessageLike, raw: bytes, data_id: bytes, pol: TopicPolicy, now_ms: int, result: BatchResult
    ) -> None:
        text = data_id.decode("utf-8", "replace")
        evidence = Evidence(
            f"a source record with DataID {text!r}",
            "none in the source view",
            "no source record has this DataID: it was never produced to a source topic, or was deleted "
            "(a tombstone)",
        )
        result.alerts.append(self._alert(AlertKind.MISSING_SOURCE, m, raw, data_id, evidence, pol, now_ms))

    # -- reduce outputs: their sources through the ledger (`validator.reduce_drift`) ------------------
    def _reduce_drift(self, r: _ReduceLookup, result: BatchResult, *, retry: bool) -> None:
        """Explain a reduce-derived record from the ledger and compare its sources with the view."""
        ledger, view = self.ledger, self.view
        try:
            data_id = r.data_id.decode("utf-8")
        except UnicodeDecodeError:
            data_id = ""
        if ledger is None or view is None or not data_id:
            result.drift_skipped += 1
            return
        checksum = _checksum_at(r.current, _PREFIX_LEN, r.source_start)
        claimed = _checksum_at(r.current, r.source_start, r.source_end)
        found = ledger.explain(data_id, checksum, claimed, r.info.digests)
        if isinstance(found, Unexplained):
            if found.not_found and retry:
                self._reduce_lookups.append(r)  # once more after the index caught up
                return
            result.drift_skipped += 1
            m = r.msg
            log.debug("no drift check for %s/%s/%s: %s", m.topic(), m.partition(), m.offset(), found.reason)
            return
        result.reduce_checked += 1
        changed, missing = self._reduce_differences(found)
        if changed or missing:
            self._reduce_suspects.append(_ReduceSuspect(r.msg, r.raw, r.data_id, found, claimed, r.policy))

    def _look_up_again(self, result: BatchResult) -> None:
        """Records not in the ledger index: catch it up (at most every `refresh_s`), ask once more."""
        lookups, self._reduce_lookups = self._reduce_lookups, []
        assert self.ledger is not None
        self.ledger.refresh()
        for r in lookups:
            self._reduce_drift(r, result, retry=False)

    def _current(self, ref: DataRef) -> Checksum | None:
        """The view's current checksum of source `ref.data_id`, in `ref`'s algorithm."""
        assert self.view is not None
        encoded = self.view.encoded_checksum(ref.data_id.encode("utf-8"), ref.checksum.algorithm)
        return None if encoded is None else Checksum(ref.checksum.algorithm, encoded[2:])

    def _reduce_differences(self, derivation: Derivation) -> tuple[list[DataRef], list[DataRef]]:
        """(changed, missing) source versions of a derivation, against the view."""
        assert self.view is not None
        changed: list[DataRef] = []
        missing: list[DataRef] = []
        for ref in source_versions(derivation):
            now = self.view.encoded_checksum(ref.data_id.encode("utf-8"), ref.checksum.algorithm)
            if now is None:
                missing.append(ref)
            elif now != encode_checksum(ref.checksum):
                changed.append(ref)
        return changed, missing

    def _report_reduce(self, s: _ReduceSuspect, now_ms: int, result: BatchResult) -> None:
        changed, missing = self._reduce_differences(s.derivation)
        if not changed and not missing:
            return
        total = len(source_versions(s.derivation))
        if changed:
            current = source_checksum(s.derivation, self._current)
            evidence = Evidence(
                s.claimed.hex(),
                current.hex() if current is not None else f"unknown ({len(missing)} source(s) missing)",
                f"{len(changed)} of the {total} source record(s) this output derives from through a reduce "
                f"(inputs from the ledger) changed since it was derived: {self._name_sources(changed)}",
            )
            result.alerts.append(
                self._alert(AlertKind.SOURCE_CHANGED, s.msg, s.raw, s.data_id, evidence, s.policy, now_ms)
            )
        if missing:
            evidence = Evidence(
                f"the {total} source record(s) this output derives from through a reduce (per the ledger)",
                f"{len(missing)} not in the source view: {self._name_sources(missing)}",
                "source records this output derives from were deleted (a tombstone) or never produced "
                "to a source topic",
            )
            result.alerts.append(
                self._alert(AlertKind.MISSING_SOURCE, s.msg, s.raw, s.data_id, evidence, s.policy, now_ms)
            )

    def _name_sources(self, refs: list[DataRef], limit: int = 5) -> str:
        assert self.view is not None
        named = []
        for ref in refs[:limit]:
            entry = self.view.get(ref.data_id.encode("utf-8"))
            where = f"now {entry.coordinates}" if entry is not None else "gone"
            named.append(f"{ref.data_id!r} (was {ref.checksum.hex()}, {where})")
        more = f" and {len(refs) - limit} more" if len(refs) > limit else ""
        return "; ".join(named)[:800] + more

    def _report_drift(self, suspects: list[_Suspect], now_ms: int, result: BatchResult) -> None:
        """Bring the view up to date once, then report the suspects that still differ."""
        view = self.view
        assert view is not None
        if self.refresh is not None:
            self.refresh()
        reduce_suspects, self._reduce_suspects = self._reduce_suspects, []
        for r in reduce_suspects:
            self._report_reduce(r, now_ms, result)
        for s in suspects:
            entry = view.get(s.data_id)
            if entry is None:
                self._missing_source(s.msg, s.raw, s.data_id, s.policy, now_ms, result)
                continue
            claimed = s.current[s.source_start : s.source_end]
            current = entry.checksum
            if claimed[0] != 0:
                current = view.encoded_checksum(s.data_id, _ALGORITHMS[claimed[0] >> 1]) or b""
            if claimed == current:
                continue
            evidence = Evidence(
                checksum_text(claimed),
                checksum_text(current) if current else "unknown",
                f"the source record {s.data_id.decode('utf-8', 'replace')!r} has changed since this record "
                f"was derived from it: its current version ({entry.coordinates}, Kafka timestamp "
                f"{iso_ms(entry.timestamp_ms)}) has another checksum",
            )
            result.alerts.append(
                self._alert(AlertKind.SOURCE_CHANGED, s.msg, s.raw, s.data_id, evidence, s.policy, now_ms)
            )

    def _rederive(
        self,
        m: MessageLike,
        raw: bytes,
        current: bytes,
        data_id: bytes,
        entry: SourceEntry,
        info: LineageInfo,
        pol: TopicPolicy,
        now_ms: int,
        result: BatchResult,
    ) -> None:
        assert self.rederiver is not None and self.view is not None
        source_value = self.view.value(data_id)
        if source_value is None:
            return
        result.rederived += 1
        claimed = current[_PREFIX_LEN : _checksum_end(current)]
        outcome = self.rederiver.check(info.lineage, source_value, _ALGORITHMS[claimed[0] >> 1], claimed[2:])
        if outcome is None:
            return
        evidence = Evidence(
            outcome.expected, outcome.actual, f"{outcome.reason} (source {entry.coordinates})"
        )
        result.alerts.append(self._alert(outcome.kind, m, raw, data_id, evidence, pol, now_ms))
        log.debug("re-derivation of %s: %s", describe_chain(info.lineage), outcome.kind)


def _checksum_at(current: bytes, start: int, end: int) -> Checksum:
    """The Avro-encoded Checksum at current[start:end] (algorithm byte, length byte, digest)."""
    return Checksum(_ALGORITHMS[current[start] >> 1], current[start + 2 : end])


def _checksum_end(current: bytes) -> int:
    return scan(current)[0]


def _data_id_text(current: bytes) -> str:
    _, _, id_start, lineage_at = scan(current)
    _, data_at = avro.read_long(current, id_start)
    return current[data_at:lineage_at].decode("utf-8")


def raw_or_none(hs: Any) -> bytes | None:
    """The provenance header bytes for a malformed record's alert, if any can be found."""
    try:
        raw = find_raw(hs)
    except HeaderError as exc:
        return exc.raw  # b"" for an empty header: present, unlike None
    return raw
