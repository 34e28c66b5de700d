"""The faust agents' record logic without a broker: MapHandler, ReduceHandler, state persistence.

The handlers hold everything the agents do per record; the faust side is a loop that sends what they
return. One test drives a real faust agent through `agent.test_context()` (no broker involved).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faust
import pytest

from streamprov.agents.dead_letter import ERROR_HEADER, REASON_HEADER, SOURCE_HEADER
from streamprov.agents.faust_agents import (
    MapHandler,
    Outgoing,
    ProvenanceAgents,
    ReduceHandler,
    _faust_timestamp,
    decode_state,
    encode_state,
    parse_window_key,
    progress_key,
    split_prefixed,
    window_key,
)
from streamprov.agents.serde import JsonSerde, RawSerde
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.errors import SerdeError, StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.lineage import StepKind
from streamprov.merkle import MerkleAccumulator, length_prefixed, merkle_root
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import InputRecord, ReduceState, SourceStamper, reduce_leaf

CRC = ChecksumAlgorithm.CRC32C
WINDOW = 1000
T0 = 1_731_000_000_000  # a window start


def _scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {"v": value["v"] * factor}


def _sum(acc: int, value: dict[str, Any]) -> int:
    return acc + int(value["v"])


def map_fn() -> RegisteredFunction:
    return FunctionRegistry().add(_scale, "scale", "1", params={"factor": 2})


def reduce_fn() -> RegisteredFunction:
    return FunctionRegistry().add(_sum, "sum", "1", kind=StepKind.REDUCE, initial=lambda: 0)


def source_record(
    key: str, value: Any, offset: int, *, topic: str = "src", stamped: bool = True, extra: Any = ()
) -> InputRecord:
    raw = json.dumps(value, separators=(",", ":")).encode()
    headers: list[tuple[str, bytes | None]] = []
    if stamped:
        headers.append((HEADER_KEY, SourceStamper().header(key, raw)))
    headers.extend(extra)
    return InputRecord(raw, headers, key.encode(), topic, 0, offset)


def header_of(out: Outgoing) -> ProvenanceHeader:
    header = ProvenanceHeader.from_headers(out.headers)
    assert header is not None
    return header


def dlq(out: Outgoing) -> dict[str, str]:
    assert out.dead_letter
    return {k: (v or b"").decode() for k, v in out.headers if k.startswith("streamprov.dlq.")}


# -- map --------------------------------------------------------------------------------------------
def test_map_stamps_output_and_keeps_other_headers() -> None:
    handler = MapHandler(map_fn(), sink="out", dead_letter_topic="dlq")
    rec = source_record("d1", {"v": 21}, 5, extra=[("trace", b"abc")])
    out = handler.handle(rec, T0 + 7)
    assert not out.dead_letter
    assert (out.topic, out.key, out.value, out.timestamp_ms) == ("out", b"d1", b'{"v":42}', T0 + 7)
    assert out.headers[0][0] == HEADER_KEY and ("trace", b"abc") in out.headers
    h = header_of(out)
    src = ProvenanceHeader.from_headers(rec.headers)
    assert src is not None
    assert h.data_id == "d1"
    assert matches(h.checksum, out.value or b"")
    assert h.source_checksum == src.checksum
    assert [s.describe() for s in h.lineage] == ["map scale@1(factor=2)"]
    assert h.lineage[0].code_hash == handler.function.code_hash


def test_map_without_header_starts_provenance_at_the_record() -> None:
    handler = MapHandler(map_fn(), sink="out", dead_letter_topic="dlq")
    rec = source_record("d2", {"v": 1}, 0, stamped=False)
    h = header_of(handler.handle(rec))
    assert h.data_id == "d2"
    assert h.source_checksum == compute(CRC, rec.value)
    assert len(h.lineage) == 1


def test_map_chain_extends_lineage() -> None:
    first = MapHandler(map_fn(), sink="mid", dead_letter_topic="dlq")
    second = MapHandler(map_fn(), sink="out", dead_letter_topic="dlq")
    rec = source_record("d3", {"v": 1}, 0)
    mid = first.handle(rec)
    out = second.handle(InputRecord(mid.value or b"", mid.headers, mid.key, "mid", 0, 0))
    h = header_of(out)
    assert out.value == b'{"v":4}'
    assert len(h.lineage) == 2
    assert h.source_checksum == header_of(mid).source_checksum


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (InputRecord(b'{"v":1}', [(HEADER_KEY, b"\xc3\x01junk")], b"k", "src", 0, 3), "malformed_header"),
        (InputRecord(b'{"v":1}', [(HEADER_KEY, b"")], b"k", "src", 0, 3), "malformed_header"),
        (
            InputRecord(
                b'{"v":9}', [(HEADER_KEY, SourceStamper().header("k", b'{"v":1}'))], b"k", "src", 0, 3
            ),
            "checksum_mismatch",
        ),
        (InputRecord(b"not json", [], b"k", "src", 0, 3), "deserialization_error"),
        (InputRecord(b'{"v":null}', [], b"k", "src", 0, 3), "processing_error"),
        (InputRecord(b'{"w":1}', [], b"k", "src", 0, 3), "processing_error"),
    ],
)
def test_map_bad_records_go_to_the_dead_letter_topic_untouched(record: InputRecord, reason: str) -> None:
    out = MapHandler(map_fn(), sink="out", dead_letter_topic="dlq").handle(record, 11)
    assert (out.topic, out.key, out.value, out.timestamp_ms) == ("dlq", b"k", record.value, 11)
    info = dlq(out)
    assert info[REASON_HEADER] == reason
    assert info[SOURCE_HEADER] == "src/0/3"
    assert info[ERROR_HEADER]
    assert out.headers[: len(record.headers or [])] == list(record.headers or [])


def test_map_unserialisable_result_is_a_serialization_error() -> None:
    fn = FunctionRegistry().add(lambda v: {1, 2}, "setty", "1")
    out = MapHandler(fn, sink="out", dead_letter_topic="dlq").handle(source_record("k", {"v": 1}, 0))
    assert dlq(out)[REASON_HEADER] == "serialization_error"


def test_map_raw_serde_checksums_exact_bytes() -> None:
    fn = FunctionRegistry().add(lambda v: v.upper(), "upper", "1")
    rec = InputRecord(b"abc", [(HEADER_KEY, SourceStamper().header("k", b"abc"))], b"k", "src", 0, 0)
    out = MapHandler(fn, sink="out", dead_letter_topic="dlq", serde=RawSerde()).handle(rec)
    assert out.value == b"ABC"
    assert header_of(out).checksum == compute(CRC, b"ABC")


def test_handlers_refuse_the_wrong_kind() -> None:
    with pytest.raises(StreamprovError):
        MapHandler(reduce_fn(), sink="o", dead_letter_topic="d")
    with pytest.raises(StreamprovError):
        ReduceHandler(map_fn(), sink="o", dead_letter_topic="d", window_ms=WINDOW)
    with pytest.raises(StreamprovError):
        ReduceHandler(reduce_fn(), sink="o", dead_letter_topic="d", window_ms=0)


# -- reduce -----------------------------------------------------------------------------------------
def mapped(key: str, v: int, offset: int) -> InputRecord:
    """A map output record (lineage: scale) as the reduce consumes it."""
    out = MapHandler(map_fn(), sink="mapped", dead_letter_topic="dlq").handle(
        source_record(key, {"v": v}, offset)
    )
    return InputRecord(out.value or b"", out.headers, out.key, "mapped", 0, offset)


def expected_root(records: list[InputRecord], *, source: bool = False) -> bytes:
    leaves = []
    for r in records:
        h = ProvenanceHeader.from_headers(r.headers)
        assert h is not None
        leaves.append(reduce_leaf(h.data_id, h.source_checksum if source else h.checksum))
    return merkle_root(leaves)


def reducer(store: dict[bytes, bytes] | None = None, grace_ms: int = 0) -> ReduceHandler:
    return ReduceHandler(
        reduce_fn(), sink="totals", dead_letter_topic="dlq", window_ms=WINDOW, grace_ms=grace_ms, store=store
    )


def run(handler: ReduceHandler, items: list[tuple[InputRecord, int]]) -> list[Outgoing]:
    outs: list[Outgoing] = []
    for rec, ts in items:
        result = handler.handle(rec, ts)
        outs.extend(result.records)
        handler.release(result)
    return outs


def test_reduce_window_output_carries_a_bounded_input_digest() -> None:
    a = [mapped("k", i, i) for i in range(5)]
    b = [mapped("j", 10, 5)]
    tick = mapped("z", 0, 6)
    outs = run(reducer(), [(r, T0 + 10 * r.offset) for r in a + b] + [(tick, T0 + WINDOW)])
    assert [o.key for o in outs] == [b"j", b"k"]  # oldest window first, then by key
    by_key = {o.key: o for o in outs}
    k = by_key[b"k"]
    assert k.value == b"20" and k.topic == "totals" and k.timestamp_ms == T0 + WINDOW - 1
    h = header_of(k)
    assert h.data_id == "k"
    assert matches(h.checksum, b"20")
    assert [s.kind for s in h.lineage] == [StepKind.MAP, StepKind.REDUCE]
    digest = h.lineage[-1].inputs
    assert digest is not None
    assert (digest.count, digest.window_start, digest.window_end) == (5, T0, T0 + WINDOW)
    assert digest.merkle_root == expected_root(a)
    assert h.source_checksum == Checksum(ChecksumAlgorithm.SHA256, expected_root(a, source=True))


def test_reduce_without_a_record_key_groups_by_data_id() -> None:
    rec = mapped("dk", 1, 0)
    keyless = InputRecord(rec.value, rec.headers, None, rec.topic, 0, 0)
    outs = run(reducer(), [(keyless, T0), (mapped("z", 0, 1), T0 + WINDOW)])
    assert [o.key for o in outs] == [b"dk"]


def test_reduce_bad_and_late_records_are_dead_lettered() -> None:
    handler = reducer()
    bad_header = InputRecord(b"2", [(HEADER_KEY, b"\xc3\x01x")], b"k", "mapped", 0, 1)
    corrupt = mapped("k", 1, 2)
    corrupt = InputRecord(b'{"v":999}', corrupt.headers, b"k", "mapped", 0, 2)
    boom = InputRecord(b'{"v":"x"}', [], b"k", "mapped", 0, 3)
    items = [(mapped("k", 1, 0), T0), (bad_header, T0), (corrupt, T0), (boom, T0)]
    items += [(mapped("z", 0, 4), T0 + WINDOW), (mapped("k", 5, 5), T0 + 1)]  # the last is late
    outs = run(handler, items)
    reasons = [dlq(o)[REASON_HEADER] for o in outs if o.dead_letter]
    assert reasons == ["malformed_header", "checksum_mismatch", "processing_error", "late_record"]
    (total,) = [o for o in outs if not o.dead_letter]
    assert total.value == b"2"


def test_reduce_failed_first_record_leaves_no_empty_window() -> None:
    outs = run(
        reducer(),
        [(InputRecord(b'{"v":"x"}', [], b"k", "mapped", 0, 0), T0), (mapped("z", 0, 1), T0 + WINDOW)],
    )
    assert [dlq(o)[REASON_HEADER] for o in outs] == ["processing_error"]


def test_reduce_state_survives_a_restart() -> None:
    store: dict[bytes, bytes] = {}
    first = [mapped("k", i, i) for i in range(3)]
    assert run(reducer(store), [(r, T0 + r.offset) for r in first]) == []
    assert window_key("mapped", 0, "k", T0) in store and progress_key("mapped", 0) in store
    # A new handler (a new worker) on the same store: the window is reopened, not lost.
    second = [mapped("k", 10, 3)]
    outs = run(reducer(store), [(second[0], T0 + 500), (mapped("z", 0, 4), T0 + WINDOW)])
    (out,) = outs
    assert out.value == b"26"
    digest = header_of(out).lineage[-1].inputs
    assert digest is not None and digest.count == 4
    assert digest.merkle_root == expected_root(first + second)
    assert window_key("mapped", 0, "k", T0) not in store  # released once sent


def test_reduce_replay_after_a_crash_does_not_fold_twice() -> None:
    store: dict[bytes, bytes] = {}
    records = [mapped("k", i, i) for i in range(4)]
    run(reducer(store), [(r, T0 + r.offset) for r in records])
    # the offsets were not committed: the new worker sees every record again, then one more
    replay = reducer(store)
    results = [replay.handle(r, T0 + r.offset) for r in records]
    assert all(r.duplicate and not r.records for r in results)
    outs = run(replay, [(mapped("z", 0, 4), T0 + WINDOW)])
    (out,) = outs
    assert out.value == b"12"
    digest = header_of(out).lineage[-1].inputs
    assert digest is not None and digest.count == 4


def test_reduce_window_state_alone_dedups_when_progress_was_not_written() -> None:
    store: dict[bytes, bytes] = {}
    run(reducer(store), [(mapped("k", 1, 0), T0), (mapped("k", 2, 1), T0 + 1)])
    store[progress_key("mapped", 0)] = store[progress_key("mapped", 0)][:8] + (0).to_bytes(8, "big")
    replay = reducer(store)
    assert replay.handle(mapped("k", 2, 1), T0 + 1).duplicate
    (out,) = run(replay, [(mapped("z", 0, 2), T0 + WINDOW)])
    assert out.value == b"6"


def test_reduce_unreleased_window_is_emitted_again_after_restart() -> None:
    store: dict[bytes, bytes] = {}
    handler = reducer(store)
    run(handler, [(mapped("k", 1, 0), T0)])
    result = handler.handle(mapped("z", 0, 1), T0 + WINDOW)  # closes k's window
    assert [o.key for o in result.records] == [b"k"]
    # crash before the output was acknowledged (release not called): the state is still stored
    again = reducer(store).handle(mapped("z", 0, 2), T0 + WINDOW + 1)
    assert [o.key for o in again.records] == [b"k"]
    assert again.records[0].value == result.records[0].value


def test_reduce_forget_rebuilds_from_the_store() -> None:
    store: dict[bytes, bytes] = {}
    handler = reducer(store)
    run(handler, [(mapped("k", 1, 0), T0)])
    handler.forget({("mapped", 0)})
    (out,) = run(handler, [(mapped("k", 2, 1), T0 + 1), (mapped("z", 0, 2), T0 + WINDOW)])
    assert out.value == b"6"


def test_reduce_partitions_have_their_own_watermark() -> None:
    handler = reducer()
    p0 = mapped("a", 1, 0)
    b = mapped("b", 1, 0)
    p1 = InputRecord(b.value, b.headers, b.key, "mapped", 1, 0)
    assert run(handler, [(p0, T0), (p1, T0 + 5 * WINDOW)]) == []  # p1 does not close p0's window
    (out,) = run(handler, [(mapped("a", 2, 1), T0 + WINDOW)])
    assert out.key == b"a" and out.value == b"2"  # closed by its own partition's later record


def test_reduce_memory_store_is_the_default() -> None:
    handler = reducer()
    run(handler, [(mapped("k", 1, 0), T0)])
    assert isinstance(handler.store, dict) and handler.store


# -- state encoding ----------------------------------------------------------------------------------
def test_state_round_trips() -> None:
    handler = reducer()
    run(handler, [(mapped("k", i, i), T0) for i in range(7)])
    raw = handler.store[window_key("mapped", 0, "k", T0)]
    state, last = decode_state(raw, JsonSerde())
    assert last == 6
    assert state.accumulator == 42 and state.count == 7
    assert encode_state(state, last, JsonSerde()) == raw
    empty = ReduceState(0)
    back, off = decode_state(encode_state(empty, -1, JsonSerde()), JsonSerde())
    assert back.upstream is None and back.count == 0 and off == -1
    assert back.inputs.root() == MerkleAccumulator().root()


def test_state_keys_parse_back() -> None:
    key = window_key("topic", 3, "ключ", -WINDOW)
    assert parse_window_key(key) == ("topic", 3, "ключ", -WINDOW)
    assert parse_window_key(progress_key("topic", 3)) is None


@pytest.mark.parametrize("raw", [b"\x00\x00\x00", b"\x00\x00\x00\x05ab", length_prefixed(b"a") + b"\x00"])
def test_split_prefixed_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(StreamprovError):
        split_prefixed(raw)


def test_decode_state_rejects_unknown_version() -> None:
    with pytest.raises(StreamprovError):
        decode_state(b"\x09", JsonSerde())


def test_faust_timestamp_survives_faust_truncation() -> None:
    # faust sends int(seconds * 1000.0); ms / 1000 alone comes back 1 ms short for some values
    for ms in range(1_795_316_049_000, 1_795_316_049_000 + 5000):
        ts = _faust_timestamp(ms)
        assert ts is not None and int(ts * 1000.0) == ms


def test_serdes() -> None:
    serde = JsonSerde()
    assert serde.dumps({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    with pytest.raises(SerdeError):
        serde.dumps(float("nan"))
    with pytest.raises(SerdeError):
        serde.loads(b"\xff")
    with pytest.raises(SerdeError):
        RawSerde().dumps("text")


# -- faust wiring (no broker) -------------------------------------------------------------------------
def test_decorators_register_functions_and_define_agents() -> None:
    app = faust.App("streamprov-unit", broker="kafka://127.0.0.1:1", store="memory://")
    registry = FunctionRegistry()
    prov = ProvenanceAgents(app, registry=registry, dead_letter_topic="dlq", state="table")

    @prov.map(source="src", sink="mid", function_id="scale", version="1", params={"factor": 3})
    def scale(value: Any, factor: int) -> Any:
        return value * factor

    @prov.reduce(
        source="mid", sink="out", function_id="sum", version="1", initial=lambda: 0, window_ms=WINDOW
    )
    def total(acc: int, value: int) -> int:
        return acc + value

    assert registry.get("scale", "1") is scale and scale.default_params == {"factor": 3}
    assert registry.get("sum").kind is StepKind.REDUCE and total.initial is not None
    assert set(prov.agents) == {"scale", "sum"}
    table = app.tables["streamprov-reduce-sum"]
    # raw bytes both ways: faust decodes the changelog on recovery with these, not with a schema
    assert (table.key_serializer, table.value_serializer) == ("raw", "raw")
    assert table.changelog_topic.key_serializer == "raw"
    with pytest.raises(StreamprovError):
        prov.map(source="src", sink="x", function_id="scale", version="1")(lambda v: v)


def test_map_agent_in_a_faust_test_context() -> None:
    app = faust.App("streamprov-unit-ctx", broker="kafka://127.0.0.1:1", store="memory://")
    prov = ProvenanceAgents(app, registry=FunctionRegistry(), dead_letter_topic="dlq")
    sent: list[Outgoing] = []

    async def capture(out: Outgoing, *, force: bool = False) -> None:
        sent.append(out)

    prov.send = capture  # type: ignore[method-assign]

    @prov.map(source="src", sink="mid", function_id="scale", version="1", params={"factor": 2})
    def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
        return {"v": value["v"] * factor}

    src_value = b'{"v":4}'
    stamp = SourceStamper().header("k1", src_value)

    async def drive() -> None:
        async with prov.agents["scale"].test_context() as agent:
            await agent.put(src_value, key=b"k1", headers=[(HEADER_KEY, stamp), ("x", b"y")])
            await agent.put(b'{"v":1}', key=b"k2", headers=[(HEADER_KEY, b"\xc3\x01bad")])
            await agent.put(None, key=b"k3")

    asyncio.run(drive())
    ok, bad, tomb = sent
    assert (ok.topic, ok.key, ok.value) == ("mid", b"k1", b'{"v":8}')
    h = header_of(ok)
    assert h.data_id == "k1" and h.source_checksum == compute(CRC, src_value)
    assert ("x", b"y") in ok.headers
    assert (bad.topic, bad.value, dlq(bad)[REASON_HEADER]) == ("dlq", b'{"v":1}', "malformed_header")
    assert (tomb.topic, tomb.value, dlq(tomb)[REASON_HEADER]) == ("dlq", None, "deserialization_error")


def test_map_output_over_the_producer_limit_dead_letters_its_input() -> None:
    """The producer refused an output over `producer_max_request_size`: the agent crashed, faust
    restarted it and the record was in neither the sink nor the dead letters (found by probing)."""
    fn = FunctionRegistry().add(lambda v: {"v": v["v"] * 2}, "twice", "1")
    record = source_record("k", {"v": "x" * 600_000}, 5)
    out = MapHandler(fn, sink="out", dead_letter_topic="dlq").handle(record, 11)
    assert (out.topic, out.key, out.value) == ("dlq", b"k", record.value)
    assert dlq(out)[REASON_HEADER] == "record_too_large" and dlq(out)[SOURCE_HEADER] == "src/0/5"
    small = MapHandler(fn, sink="out", dead_letter_topic="dlq").handle(source_record("k", {"v": "x"}, 6))
    assert small.topic == "out"


def test_reduce_result_over_the_producer_limit_is_dead_lettered_with_its_window() -> None:
    handler = ReduceHandler(
        reduce_fn(), sink="totals", dead_letter_topic="dlq", window_ms=WINDOW, max_output_bytes=50
    )
    outs = run(handler, [(mapped("k", 3, 0), T0), (mapped("z", 0, 1), T0 + WINDOW)])
    (out,) = outs
    assert (out.topic, out.key, out.value) == ("dlq", b"k", b"6")  # mapped: 3 scaled by 2
    assert dlq(out)[REASON_HEADER] == "record_too_large"
    assert dlq(out)[SOURCE_HEADER] == f"mapped/0 window [{T0}, {T0 + WINDOW})"
