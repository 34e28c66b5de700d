"""The Validator's checks without a broker: each finding with its evidence, dead letters for malformed
records, per-topic switches, reduce outputs, re-derivation and the drift re-check after a refresh."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import crc32c
import pytest

from streamprov.agents.dead_letter import ERROR_HEADER, REASON_HEADER, SOURCE_HEADER
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, PREFIX, ProvenanceHeader, encode_checksum
from streamprov.lineage import InputDigest, Step, StepKind
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, SourceStamper
from validator.alerts import AlertKind
from validator.checks import Checker, TopicPolicy, checksum_text, iso_ms
from validator.rederive import Rederiver, sampled
from validator.source_view import SourceEntry

NOW = 1_800_000_000_000
registry = FunctionRegistry()


@registry.map("f2c", "1")
def f2c(value: dict[str, Any]) -> dict[str, Any]:
    return {"c": round((value["f"] - 32) * 5 / 9, 3)}


@registry.map("scale", "2", factor=2)
def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {"c": value["c"] * factor}


def dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Msg:
    """Stands in for confluent_kafka.Message."""

    v: bytes | None
    h: list[tuple[str, bytes | None]] | None
    k: bytes | None = b"k"
    t: str = "out"
    p: int = 0
    o: int = 0
    err: Any = None

    def value(self) -> bytes | None:
        return self.v

    def key(self) -> bytes | None:
        return self.k

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self.h

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o

    def error(self) -> Any:
        return self.err


@dataclass
class FakeView:
    """DataID -> (value, Kafka timestamp); the SourceLookup the checks read."""

    records: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    refreshed: int = 0
    crcs: dict[bytes, int] = field(default_factory=dict)

    def put(self, data_id: str, value: bytes, ts: int = NOW - 1000) -> None:
        self.records[data_id.encode()] = (value, ts)

    def get(self, data_id: bytes) -> SourceEntry | None:
        found = self.records.get(data_id)
        if found is None:
            return None
        return SourceEntry(crc32c.crc32c(found[0]), found[1], "src", 0, 7)

    def encoded_checksum(self, data_id: bytes, algorithm: ChecksumAlgorithm) -> bytes | None:
        found = self.records.get(data_id)
        return None if found is None else encode_checksum(compute(algorithm, found[0]))

    def value(self, data_id: bytes) -> bytes | None:
        found = self.records.get(data_id)
        return None if found is None else found[0]


def source_header(data_id: str, value: bytes, ts: int = NOW - 5000) -> bytes:
    return ProvenanceHeader.for_source(data_id, value, timestamp_ms=ts).encode()


def map_output(
    data_id: str, source: bytes, steps: tuple[Any, ...] = (f2c,), ts: int | None = None
) -> tuple[bytes, bytes]:
    """(value, header) of `source` through the map steps, stamped as the processor does."""
    header = source_header(data_id, source)
    value = source
    for fn in steps:
        out = dumps(fn.apply(json.loads(value)))
        header = MapStamper(fn).stamp(InputRecord(value, [(HEADER_KEY, header)], None, "s", 0, 0), out)
        value = out
    if ts is not None:
        h = ProvenanceHeader.decode(header)
        header = ProvenanceHeader(h.data_id, h.checksum, h.source_checksum, ts, h.lineage).encode()
    return value, header


def checker(policy: TopicPolicy | None = None, view: FakeView | None = None, **kw: Any) -> Checker:
    pol = policy or TopicPolicy()
    return Checker(lambda _t: pol, view if view is not None else FakeView(), dead_letter_topic="dlq", **kw)


def test_clean_records_give_no_alerts() -> None:
    view = FakeView()
    msgs = []
    for i in range(50):
        src = dumps({"f": 32 + i})
        view.put(f"s-{i}", src)
        value, header = map_output(f"s-{i}", src, (f2c, scale), ts=NOW - 10)
        msgs.append(Msg(value, [(HEADER_KEY, header)], o=i))
    pol = TopicPolicy(source_max_age_ms=60_000, message_max_age_ms=60_000)
    result = checker(pol, view).check(msgs, NOW)
    assert result.alerts == [] and result.dead_letters == [] and result.checked == 50
    assert view.refreshed == 0


def test_corrupted_payload_is_a_checksum_mismatch_with_evidence() -> None:
    view = FakeView()
    src = dumps({"f": 212})
    view.put("s-1", src)
    value, header = map_output("s-1", src)
    corrupted = value.replace(b"100", b"101")
    result = checker(view=view).check([Msg(corrupted, [(HEADER_KEY, header)], t="out", p=2, o=9)], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.CHECKSUM_MISMATCH
    assert alert.data_id == "s-1" and (alert.topic, alert.partition, alert.offset) == ("out", 2, 9)
    assert alert.evidence.expected == f"crc32c:{crc32c.crc32c(value):08x}"
    assert alert.evidence.actual == f"crc32c:{crc32c.crc32c(corrupted):08x}"
    assert "does not match" in alert.evidence.reason
    assert alert.header == header and alert.detected_at_ms == NOW
    assert result.dead_letters == []


def test_tampered_header_checksum_is_a_checksum_mismatch() -> None:
    view = FakeView()
    src = dumps({"f": 50})
    view.put("s-1", src)
    value, header = map_output("s-1", src)
    tampered = bytearray(header)
    tampered[12] ^= 0xFF  # first checksum digest byte
    (alert,) = checker(view=view).check([Msg(value, [(HEADER_KEY, bytes(tampered))])], NOW).alerts
    assert alert.kind is AlertKind.CHECKSUM_MISMATCH
    assert alert.evidence.actual == f"crc32c:{crc32c.crc32c(value):08x}"
    assert alert.evidence.expected != alert.evidence.actual


def test_changed_source_is_reported_after_a_refresh() -> None:
    view = FakeView()
    old = dumps({"f": 50})
    value, header = map_output("s-1", old)
    new = dumps({"f": 60})
    view.put("s-1", new, ts=NOW - 42)

    def refresh() -> None:
        view.refreshed += 1

    result = checker(view=view, refresh=refresh).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED
    assert alert.evidence.expected == f"crc32c:{crc32c.crc32c(old):08x}"
    assert alert.evidence.actual == f"crc32c:{crc32c.crc32c(new):08x}"
    assert "src/0/7" in alert.evidence.reason and iso_ms(NOW - 42) in alert.evidence.reason
    assert view.refreshed == 1


def test_a_source_that_arrives_with_the_refresh_is_no_finding() -> None:
    view = FakeView()
    src = dumps({"f": 50})
    value, header = map_output("s-1", src)
    view.put("s-1", dumps({"f": 1}))  # the view lags: an older version

    def refresh() -> None:
        view.refreshed += 1
        view.put("s-1", src)

    result = checker(view=view, refresh=refresh).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and view.refreshed == 1


def test_missing_source() -> None:
    value, header = map_output("nobody", dumps({"f": 1}))
    (alert,) = checker().check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.MISSING_SOURCE and alert.data_id == "nobody"
    assert "nobody" in alert.evidence.expected and alert.evidence.actual == "none in the source view"


def test_missing_source_is_reported_without_the_drift_check_when_staleness_needs_it() -> None:
    value, header = map_output("nobody", dumps({"f": 1}))
    pol = TopicPolicy(source_drift=False, source_max_age_ms=1000)
    (alert,) = checker(pol).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.MISSING_SOURCE


def test_stale_message_and_stale_source_are_two_alerts_with_distinct_ids() -> None:
    view = FakeView()
    src = dumps({"f": 1})
    view.put("s-1", src, ts=NOW - 7_200_000)
    value, header = map_output("s-1", src, ts=NOW - 1_200_000)
    pol = TopicPolicy(source_max_age_ms=3_600_000, message_max_age_ms=900_000)
    alerts = checker(pol, view).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert [a.kind for a in alerts] == [AlertKind.STALE, AlertKind.STALE]
    message, source = alerts
    assert message.alert_id != source.alert_id
    assert message.evidence.expected == "age <= 900000 ms"
    assert (
        message.evidence.actual.startswith("age 1200000 ms")
        and iso_ms(NOW - 1_200_000) in message.evidence.actual
    )
    assert source.evidence.expected == "source updated within 3600000 ms"
    assert "7200000 ms ago" in source.evidence.actual and "src/0/7" in source.evidence.actual


def test_staleness_limits_are_exclusive_and_switchable() -> None:
    view = FakeView()
    src = dumps({"f": 1})
    view.put("s-1", src, ts=NOW - 1000)
    value, header = map_output("s-1", src, ts=NOW - 1000)
    at_limit = TopicPolicy(source_max_age_ms=1000, message_max_age_ms=1000)
    assert checker(at_limit, view).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts == []
    off = TopicPolicy()
    assert checker(off, view).check([Msg(value, [(HEADER_KEY, header)])], NOW + 10**9).alerts == []


@pytest.mark.parametrize(
    ("headers", "reason", "actual"),
    [
        (None, "missing_header", "no header"),
        ([("other", b"x")], "missing_header", "no header"),
        ([(HEADER_KEY, b"\x00garbage")], "malformed_header", "8 header bytes"),
        ([(HEADER_KEY, b"\xc3\x01" + b"\x11" * 8 + b"\x00\x08abcd")], "unknown_schema", "16 header bytes"),
        ([(HEADER_KEY, b"")], "malformed_header", "an empty header"),
        ([(HEADER_KEY, None)], "malformed_header", "an empty header"),
        ([(HEADER_KEY, 7)], "malformed_header", "no readable header"),
    ],
)
def test_malformed_records_are_dead_lettered_and_alerted(
    headers: list[tuple[str, bytes]] | None, reason: str, actual: str
) -> None:
    msg = Msg(b"\xff\xfe garbage", headers, k=b"key-1", t="out", p=1, o=5)
    result = checker().check([msg], NOW)
    (dead,) = result.dead_letters
    assert dead.key == b"key-1" and dead.value == b"\xff\xfe garbage"
    extra = dict(dead.headers)
    assert extra[REASON_HEADER] == reason.encode()
    assert extra[SOURCE_HEADER] == b"out/1/5" and extra[ERROR_HEADER]
    (alert,) = result.alerts
    assert alert.kind is AlertKind.MALFORMED and alert.data_id == "key-1"
    assert alert.evidence.actual.startswith(actual)
    assert alert.evidence.reason.startswith(f"{reason}: ") and "dlq" in alert.evidence.reason


def test_a_bad_lineage_is_malformed() -> None:
    value, header = map_output("s-1", dumps({"f": 1}))
    bad = header[:-1] + b"\x07"  # the lineage array does not end where the header does
    result = checker().check([Msg(value, [(HEADER_KEY, bad)], k=None, o=3)], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.MALFORMED and alert.data_id == "out/0/3"
    assert len(result.dead_letters) == 1


def test_header_not_first_and_sha256_source_checksums_take_the_general_path() -> None:
    view = FakeView()
    src = dumps({"f": 99})
    view.put("s-9", src)
    source = ProvenanceHeader.for_source("s-9", src, ChecksumAlgorithm.SHA256, timestamp_ms=NOW).encode()
    out = dumps(f2c.apply(json.loads(src)))
    header = MapStamper(f2c, algorithm=ChecksumAlgorithm.SHA256).stamp(
        InputRecord(src, [(HEADER_KEY, source)], None, "s", 0, 0), out
    )
    good = Msg(out, [("traceparent", b"00-x"), (HEADER_KEY, header)])
    assert checker(view=view).check([good], NOW).alerts == []
    view.put("s-9", dumps({"f": 100}))
    (alert,) = checker(view=view).check([good], NOW).alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED and alert.evidence.expected.startswith("sha256:")


def test_reduce_outputs_skip_the_drift_check() -> None:
    inputs = InputDigest(3, b"\x01" * 32, 0, 1000)
    step = Step.create(StepKind.REDUCE, "total", "1", b"\x00" * 16, {}, inputs)
    value = b"42"
    header = ProvenanceHeader(
        "group-a",
        compute(ChecksumAlgorithm.CRC32C, value),
        compute(ChecksumAlgorithm.SHA256, b"root"),
        NOW,
        (f2c.step(), step),
    ).encode()
    result = checker().check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and result.drift_skipped == 1


def test_integrity_switched_off() -> None:
    view = FakeView()
    src = dumps({"f": 1})
    view.put("s-1", src)
    _value, header = map_output("s-1", src)
    pol = TopicPolicy(integrity=False)
    assert checker(pol, view).check([Msg(b"corrupt", [(HEADER_KEY, header)])], NOW).alerts == []


def test_consumer_errors_are_passed_on_not_checked() -> None:
    err = object()
    result = checker().check([Msg(None, None, err=err)], NOW)
    assert result.errors == [err] and result.checked == 0 and result.alerts == []


def test_findings_of_several_kinds_on_one_record() -> None:
    view = FakeView()
    _value, header = map_output("s-1", dumps({"f": 1}), ts=NOW - 10_000)
    view.put("s-1", dumps({"f": 2}))
    pol = TopicPolicy(message_max_age_ms=1)
    kinds = {a.kind for a in checker(pol, view).check([Msg(b"x", [(HEADER_KEY, header)])], NOW).alerts}
    assert kinds == {AlertKind.CHECKSUM_MISMATCH, AlertKind.STALE, AlertKind.SOURCE_CHANGED}


# -- re-derivation -------------------------------------------------------------------------------------
def test_rederivation_of_a_faithful_map_chain_is_silent() -> None:
    view = FakeView()
    src = dumps({"f": 98.6})
    view.put("s-1", src)
    value, header = map_output("s-1", src, (f2c, scale))
    pol = TopicPolicy(rederive_rate=1.0)
    result = checker(pol, view, rederiver=Rederiver(registry)).check(
        [Msg(value, [(HEADER_KEY, header)])], NOW
    )
    assert result.alerts == [] and result.rederived == 1


def test_rederivation_mismatch_and_missing_function() -> None:
    view = FakeView()
    src = dumps({"f": 98.6})
    view.put("s-1", src)
    value, header = map_output("s-1", src, (f2c,))
    # A record that claims f2c made it, but whose value (and checksum) came from elsewhere.
    wrong = dumps({"c": 99})
    h = ProvenanceHeader.decode(header)
    forged = ProvenanceHeader(
        h.data_id, compute(ChecksumAlgorithm.CRC32C, wrong), h.source_checksum, NOW, h.lineage
    )
    pol = TopicPolicy(rederive_rate=1.0)
    result = checker(pol, view, rederiver=Rederiver(registry)).check(
        [Msg(wrong, [(HEADER_KEY, forged.encode())])], NOW
    )
    (alert,) = result.alerts
    assert alert.kind is AlertKind.REDERIVATION_MISMATCH
    assert alert.evidence.expected == f"crc32c:{crc32c.crc32c(wrong):08x}"
    assert alert.evidence.actual == f"crc32c:{crc32c.crc32c(value):08x}"
    assert "map f2c@1" in alert.evidence.reason

    empty = Rederiver(FunctionRegistry())
    (alert,) = checker(pol, view, rederiver=empty).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.MISSING_FUNCTION
    assert (
        alert.evidence.expected == "f2c@1 in the function registry"
        and alert.evidence.actual == "not registered"
    )


def test_rederivation_reports_a_raising_function() -> None:
    other = FunctionRegistry()

    @other.map("f2c", "1")
    def broken(value: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    view = FakeView()
    src = dumps({"f": 1})
    view.put("s-1", src)
    value, header = map_output("s-1", src)
    pol = TopicPolicy(rederive_rate=1.0)
    (alert,) = (
        checker(pol, view, rederiver=Rederiver(other)).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    )
    assert alert.kind is AlertKind.REDERIVATION_MISMATCH
    assert "RuntimeError: boom" in alert.evidence.actual
    assert "differs from the code that ran" in alert.evidence.reason


def test_rederivation_is_skipped_when_the_source_changed() -> None:
    view = FakeView()
    value, header = map_output("s-1", dumps({"f": 1}))
    view.put("s-1", dumps({"f": 2}))
    pol = TopicPolicy(rederive_rate=1.0)
    result = checker(pol, view, rederiver=Rederiver(registry)).check(
        [Msg(value, [(HEADER_KEY, header)])], NOW
    )
    assert [a.kind for a in result.alerts] == [AlertKind.SOURCE_CHANGED] and result.rederived == 0


def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    picks = [sampled("out", 0, o, 0.1) for o in range(20_000)]
    assert picks == [sampled("out", 0, o, 0.1) for o in range(20_000)]
    assert 1600 < sum(picks) < 2400
    assert all(sampled("t", 0, o, 1.0) for o in range(10)) and not any(
        sampled("t", 0, o, 0.0) for o in range(10)
    )


def test_evidence_helpers() -> None:
    assert checksum_text(b"\x00\x08\x5e\x97\x25\xf0") == "crc32c:5e9725f0"
    assert iso_ms(1731000000123) == "2024-11-07T17:20:00.123+00:00"
    assert iso_ms(10**20).endswith("ms")
    assert PREFIX.startswith(b"\xc3\x01")
    assert SourceStamper  # the producer-side stamper writes what the fast path reads


@pytest.mark.parametrize("topics", [None, ["out"], ["out", "other"]])
def test_a_mixed_batch_gives_the_same_findings_with_or_without_a_topic_hint(topics: list[str] | None) -> None:
    view = FakeView()
    msgs = []
    for i in range(6):
        src = dumps({"f": i})
        if i != 3:
            view.put(f"s-{i}", src)
        value, header = map_output(f"s-{i}", src)
        if i == 1:
            value += b" "
        if i == 4:
            header = header.replace(b"s-4", b"s-\xff")  # not UTF-8: malformed, not a missing source
        msgs.append(Msg(value, [(HEADER_KEY, header)], k=f"s-{i}".encode(), o=i))
    msgs.append(Msg(b"junk", None, o=6))
    view.crcs.update({d: crc32c.crc32c(v) for d, (v, _) in view.records.items()})
    pol = TopicPolicy()
    result = Checker(lambda _t: pol, view, dead_letter_topic="dlq", topics=topics).check(msgs, NOW)
    found = sorted((a.offset, a.kind.value) for a in result.alerts)
    assert found == [(1, "checksum_mismatch"), (3, "missing_source"), (4, "malformed"), (6, "malformed")]
    assert len(result.dead_letters) == 2 and result.checked == 7


def _crafted(value: bytes, timestamp: bytes, data_id_field: bytes) -> bytes:
    """A current-version header built by hand: CRC32C checksums, the given timestamp varint bytes
    and DataID field (length varint and bytes), an empty lineage."""
    checksums = encode_checksum(compute(ChecksumAlgorithm.CRC32C, value))
    checksums += encode_checksum(compute(ChecksumAlgorithm.CRC32C, b"s"))
    return PREFIX + checksums + timestamp + data_id_field + b"\x00"


def test_a_timestamp_that_overflows_a_long_is_malformed_also_where_staleness_is_checked() -> None:
    """Ten varint bytes whose last one is above 1 do not fit a 64-bit long: before, a topic with
    staleness checks raised out of `check` (the service exited, and again on every restart) and one
    without them let the header pass (found by probing)."""
    bad = _crafted(b"v", b"\xff" * 9 + b"\x7f", b"\x04d0")
    for policy in (TopicPolicy(message_max_age_ms=60_000), TopicPolicy()):
        result = checker(policy).check([Msg(b"v", [(HEADER_KEY, bad)], k=b"bad")], NOW)
        (alert,) = result.alerts
        assert alert.kind is AlertKind.MALFORMED and "overflows" in alert.evidence.actual
        assert len(result.dead_letters) == 1


@pytest.mark.parametrize("matching", [True, False])
def test_a_data_id_that_runs_past_the_header_is_malformed_when_first_in_a_batch(matching: bool) -> None:
    """The DataID's length claims one byte more than there is and the header ends in 0x00: the fast
    loop's first-record lineage sentinel matched it, so the lineage was never decoded. A checksum
    mismatch then raised out of `check`; a match was accepted silently (found by probing)."""
    bad = PREFIX + encode_checksum(compute(ChecksumAlgorithm.CRC32C, b"payload" if matching else b"other"))
    bad += (
        encode_checksum(compute(ChecksumAlgorithm.CRC32C, b"s")) + b"\x80\xe0\xb4\xd5\xa3\x34" + b"\x08ab\x00"
    )
    policy = TopicPolicy(source_drift=False)
    result = checker(policy).check([Msg(b"payload", [(HEADER_KEY, bad)], k=b"bad")], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.MALFORMED and len(result.dead_letters) == 1


@pytest.mark.parametrize("order", ["valid first", "garbage first"])
def test_a_second_provenance_header_is_malformed(order: str) -> None:
    """Which of two headers a reader takes depends on the client (Java's `lastHeader()`): ambiguous
    provenance is reported, whichever comes first (before, a valid first one hid the second)."""
    value, header = map_output("s-1", dumps({"f": 1}))
    view = FakeView()
    view.put("s-1", dumps({"f": 1}))
    pair = [(HEADER_KEY, header), (HEADER_KEY, b"\x00garbage")]
    headers = pair if order == "valid first" else pair[::-1]
    result = checker(view=view).check([Msg(value, headers)], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.MALFORMED and "2 times" in alert.evidence.actual
    assert len(result.dead_letters) == 1
    # one header among others (tracing) is fine
    clean = [(HEADER_KEY, header), ("traceparent", b"00-x")]
    assert checker(view=view).check([Msg(value, clean)], NOW).alerts == []
