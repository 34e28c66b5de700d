"""The processor's pure parts, without a broker: StepTransform (map/reduce provenance and dead-letter
decisions), the reduce checkpoint, and the module entry's argument handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE
from fake_messages import Msg

from streamprov.agents.dead_letter import (
    CUT_HEADER,
    DEFAULT_MAX_OUTPUT_BYTES,
    ERROR_HEADER,
    REASON_HEADER,
    SOURCE_HEADER,
    DeadLetterReason,
)
from streamprov.agents.processor import (
    Checkpoint,
    Outgoing,
    Processor,
    StepTransform,
    group_key,
    key_of_group,
    max_output_bytes,
)
from streamprov.agents.processor_main import build_parser, load_function
from streamprov.agents.serde import RawSerde
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY, PREFIX, ProvenanceHeader
from streamprov.lineage import StepKind
from streamprov.merkle import merkle_root
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import SourceStamper, reduce_leaf

registry = FunctionRegistry()


@registry.map("double", "1")
def double(value: dict[str, Any]) -> dict[str, Any]:
    if value["n"] < 0:
        raise ValueError("negative")
    if value["n"] == 99:
        return {"bad": {1, 2}}  # a set: not JSON-serialisable
    return {"n": value["n"] * 2}


@registry.map("reverse", "1")
def reverse(value: bytes) -> bytes:
    return value[::-1]


@registry.reduce("total", "1", initial=int)
def total(acc: int, value: dict[str, Any]) -> int:
    if value["n"] < 0:
        raise ValueError("negative")
    return acc + int(value["n"])


def module_level_factory() -> RegisteredFunction:
    return double


def js(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def sourced(data_id: str, value: bytes, **kw: Any) -> Msg:
    return Msg(value, data_id.encode(), [(HEADER_KEY, SourceStamper().header(data_id, value))], **kw)


def header_of(out: Outgoing) -> ProvenanceHeader:
    header = ProvenanceHeader.from_headers(out.headers)
    assert header is not None
    return header


def mapper(**kw: Any) -> StepTransform:
    return StepTransform(double, output_topic="out", dead_letter_topic="dlq", **kw)


def reducer(grace_ms: int = 0) -> StepTransform:
    return StepTransform(
        total, output_topic="out", dead_letter_topic="dlq", window_ms=1000, grace_ms=grace_ms
    )


def reason(out: Outgoing) -> str:
    assert out.dead_letter and out.topic == "dlq"
    value = dict(out.headers)[REASON_HEADER]
    assert value is not None
    return value.decode()


# -- map -----------------------------------------------------------------------------------------------
def test_map_source_record_gets_first_step_and_keeps_key_timestamp_and_other_headers() -> None:
    msg = Msg(js(2), b"id-1", [("trace", b"t1")], ts=(TIMESTAMP_CREATE_TIME, 123))
    (out,) = mapper().process(msg)
    assert (out.topic, out.key, out.value, out.timestamp_ms, out.dead_letter) == (
        "out",
        b"id-1",
        b'{"n":4}',
        123,
        False,
    )
    assert out.headers[0][0] == HEADER_KEY and ("trace", b"t1") in out.headers
    header = header_of(out)
    assert header.data_id == "id-1"
    assert header.lineage == (double.step(),)
    assert header.source_checksum == compute(ChecksumAlgorithm.CRC32C, js(2))
    assert matches(header.checksum, b'{"n":4}')


def test_map_chains_lineage_and_copies_the_source_checksum() -> None:
    first = mapper().process(sourced("d", js(1)))[0]
    msg = Msg(first.value, first.key, first.headers)
    second = StepTransform(double, output_topic="out", dead_letter_topic="dlq", params={"x": 1})
    # params the function does not take make it raise: a processing error, not a crash
    assert reason(second.process(msg)[0]) == DeadLetterReason.PROCESSING_ERROR
    (out,) = mapper(algorithm=ChecksumAlgorithm.SHA256).process(msg)
    header = header_of(out)
    assert header.lineage == (double.step(), double.step())
    assert header.source_checksum == compute(ChecksumAlgorithm.CRC32C, js(1))
    assert header.checksum.algorithm is ChecksumAlgorithm.SHA256 and matches(
        header.checksum, out.value or b""
    )


def test_map_without_timestamp_lets_the_broker_stamp_it() -> None:
    (out,) = mapper().process(Msg(js(1), ts=(TIMESTAMP_NOT_AVAILABLE, 0)))
    assert out.timestamp_ms is None


VALID = SourceStamper().header("x", js(1))


@pytest.mark.parametrize(
    ("headers", "value", "expected"),
    [
        ([(HEADER_KEY, b"\x00garbage")], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, b"")], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, None)], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, VALID[: len(PREFIX) + 3])], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, VALID[:-1])], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, VALID + b"\x00")], js(1), DeadLetterReason.MALFORMED_HEADER),
        ([(HEADER_KEY, b"\xc3\x01" + b"\x07" * 8 + VALID[10:])], js(1), DeadLetterReason.UNKNOWN_SCHEMA),
        ([(HEADER_KEY, VALID)], js(2), DeadLetterReason.CHECKSUM_MISMATCH),
        ([(HEADER_KEY, SourceStamper().header("x", b"{no"))], b"{no", DeadLetterReason.DESERIALIZATION_ERROR),
        (None, None, DeadLetterReason.DESERIALIZATION_ERROR),
        (None, js(-1), DeadLetterReason.PROCESSING_ERROR),
        (None, js(99), DeadLetterReason.SERIALIZATION_ERROR),
    ],
)
def test_map_dead_letters_keep_the_original_record(
    headers: list[tuple[str, bytes | None]] | None, value: bytes | None, expected: DeadLetterReason
) -> None:
    msg = Msg(value, b"key", headers, t="src", p=2, o=41)
    (out,) = mapper().process(msg)
    assert reason(out) == expected
    assert (out.key, out.value) == (b"key", value)
    assert out.headers[: len(headers or [])] == (headers or [])
    extra = dict(out.headers[len(headers or []) :])
    assert extra[SOURCE_HEADER] == b"src/2/41"
    assert extra[ERROR_HEADER]


def test_map_checksum_verification_can_be_turned_off() -> None:
    (out,) = mapper(verify_input=False).process(Msg(js(2), b"x", [(HEADER_KEY, VALID)]))
    assert not out.dead_letter


def test_raw_serde_passes_bytes_through() -> None:
    transform = StepTransform(reverse, output_topic="out", dead_letter_topic="dlq", serde=RawSerde())
    (out,) = transform.process(Msg(b"\x00\xffabc"))
    assert out.value == b"cba\xff\x00" and matches(header_of(out).checksum, out.value)


# -- reduce --------------------------------------------------------------------------------------------
def timed(key: str, data_id: str, n: int, ts: int, offset: int) -> Msg:
    msg = sourced(data_id, js(n), o=offset, ts=(TIMESTAMP_CREATE_TIME, ts))
    msg.k = key.encode()
    return msg


def feed(transform: StepTransform, msgs: list[Msg], **kw: Any) -> list[Outgoing]:
    return [out for msg in msgs for out in transform.process(msg, **kw)]


def test_reduce_emits_closed_windows_with_a_digest_of_their_inputs() -> None:
    msgs = [timed("a", "a0", 1, 100, 0), timed("b", "b0", 2, 200, 1), timed("a", "a1", 3, 900, 2)]
    transform = reducer()
    assert feed(transform, msgs) == []
    assert transform.open_offsets() == {("in", 0): 0}
    outs = feed(transform, [timed("c", "c0", 4, 1000, 3)])  # the watermark reaches the window's end
    assert [(o.key, o.value, o.timestamp_ms) for o in outs] == [(b"a", b"4", 999), (b"b", b"2", 999)]
    assert transform.open_offsets() == {("in", 0): 3}
    header = header_of(outs[0])
    step = header.lineage[-1]
    assert header.lineage[:-1] == () and header.data_id == "a"
    assert step.kind is StepKind.REDUCE and step.inputs is not None
    leaves = [reduce_leaf(d, compute(ChecksumAlgorithm.CRC32C, js(n))) for d, n in (("a0", 1), ("a1", 3))]
    assert (step.inputs.count, step.inputs.merkle_root) == (2, merkle_root(leaves))
    assert (step.inputs.window_start, step.inputs.window_end) == (0, 1000)
    assert header.source_checksum == Checksum(ChecksumAlgorithm.SHA256, merkle_root(leaves))
    assert matches(header.checksum, b"4")


def test_reduce_late_records_and_function_errors_are_dead_lettered_without_empty_windows() -> None:
    transform = reducer()
    feed(transform, [timed("a", "a0", 1, 100, 0), timed("a", "a1", 1, 1500, 1)])
    (late,) = transform.process(timed("a", "a2", 1, 200, 2))
    assert reason(late) == DeadLetterReason.LATE_RECORD
    (failed,) = transform.process(timed("n", "n0", -1, 1600, 3))
    assert reason(failed) == DeadLetterReason.PROCESSING_ERROR
    outs = feed(transform, [timed("z", "z0", 1, 5000, 4)])
    assert [(o.key, o.value) for o in outs] == [(b"a", b"1")]  # no empty window for "n"


def test_reduce_grace_keeps_a_window_open_and_closing_does_not_depend_on_batching() -> None:
    msgs = [
        timed("a", "a0", 1, 100, 0),
        timed("a", "a1", 2, 1100, 1),
        timed("a", "a2", 4, 800, 2),  # within the 500 ms grace
        timed("a", "a3", 8, 1600, 3),  # closes window 0
        timed("a", "a4", 16, 900, 4),  # late
    ]
    outs = feed(reducer(grace_ms=500), msgs)
    assert [(o.key, o.value, o.dead_letter) for o in outs] == [(b"a", b"5", False), (b"a", js(16), True)]


def test_reduce_replay_skips_what_was_done_and_dead_letters_only_new_late_records() -> None:
    transform = reducer()
    closed_before = transform.closed_before(1600)
    assert closed_before == 1000
    transform.reset(1600)
    replayed = [timed("a", "a1", 1, 1100, 1), timed("b", "b0", 1, 300, 2), Msg(b"{bad", o=3)]
    assert feed(transform, replayed, replayed=True, closed_before_ms=closed_before) == []
    (late,) = transform.process(timed("b", "b1", 1, 400, 4), closed_before_ms=closed_before)
    assert reason(late) == DeadLetterReason.LATE_RECORD
    outs = feed(transform, [timed("z", "z0", 1, 5000, 5)], closed_before_ms=closed_before)
    assert [(o.key, header_of(o).lineage[-1].inputs.count) for o in outs] == [(b"a", 1)]  # type: ignore[union-attr]


def test_reduce_flush_emits_everything_and_closes_those_windows() -> None:
    transform = reducer()
    feed(transform, [timed("a", "a0", 1, 100, 0), timed("b", "b0", 2, 700, 1)])
    outs = transform.flush()
    assert [(o.key, o.value) for o in outs] == [(b"a", b"1"), (b"b", b"2")]
    assert transform.open_windows == 0 and transform.open_offsets() == {}
    (late,) = transform.process(timed("b", "b1", 1, 300, 2))
    assert reason(late) == DeadLetterReason.LATE_RECORD
    assert transform.flush() == []


def test_reduce_needs_a_window() -> None:
    with pytest.raises(StreamprovError, match="window_ms"):
        StepTransform(total, output_topic="o", dead_letter_topic="d")


def test_group_key() -> None:
    assert (group_key(b"abc"), group_key(b"\xff\x00"), group_key(None), group_key(b"")) == (
        "abc",
        "hex:ff00",
        "",
        "",
    )
    # a text key that looks like an escaped one is escaped too: b"\xff\x01" and b"hex:ff01" were
    # one group, and the binary key came out as b"hex:ff01" (found by probing)
    assert group_key(b"hex:ff01") == "hex:" + b"hex:ff01".hex() != group_key(b"\xff\x01")
    for key in (b"abc", b"\xff\x00", b"hex:ff01", b"hex:", "ü".encode()):
        assert key_of_group(group_key(key)) == key
    assert key_of_group(group_key(None)) is None


def test_reduce_outputs_carry_their_records_keys() -> None:
    msgs = [timed("x", "a0", 1, 100, 0), timed("x", "b0", 10, 200, 1), timed("x", "c0", 5, 2000, 2)]
    msgs[0].k, msgs[1].k = b"\xff\x01", b"hex:ff01"
    outs = feed(reducer(), msgs)
    assert sorted((o.key, o.value) for o in outs) == [(b"hex:ff01", b"10"), (b"\xff\x01", b"1")]


# -- checkpoint ------------------------------------------------------------------------------------------
def test_checkpoint_round_trips_and_ignores_foreign_metadata() -> None:
    cp = Checkpoint(position=42, watermark_ms=1_700_000_000_123)
    assert Checkpoint.decode(cp.encode()) == cp
    assert len(cp.encode()) < 100  # offset metadata is limited (4 KiB by default)
    for foreign in (
        None,
        "",
        "not json",
        "[]",
        '{"streamprov": 2, "position": 1, "watermark_ms": 1}',
        '{"streamprov": 1}',
    ):
        assert Checkpoint.decode(foreign) is None


# -- construction and the module entry -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_topics": []},
        {"output_topic": ""},
        {"guarantee": "maybe_once"},
        {"batch_size": 0},
        {"function": total},  # reduce without window_ms
    ],
)
def test_processor_rejects_bad_settings_before_touching_kafka(kwargs: dict[str, Any]) -> None:
    settings: dict[str, Any] = {
        "group_id": "g",
        "input_topics": ["in"],
        "output_topic": "out",
        "dead_letter_topic": "dlq",
        "function": double,
        **kwargs,
    }
    with pytest.raises(StreamprovError):
        Processor({"bootstrap.servers": "127.0.0.1:1"}, **settings)


def test_load_function() -> None:
    assert load_function(f"{__name__}:double") is double
    assert load_function(f"{__name__}:module_level_factory") is double
    for bad in ("nocolon", f"{__name__}:group_key_missing", f"{__name__}:json"):
        with pytest.raises((StreamprovError, AttributeError)):
            load_function(bad)


def test_parser_collects_repeated_options() -> None:
    args = build_parser().parse_args(
        [
            "--bootstrap",
            "b:1",
            "--input",
            "a",
            "--input",
            "b",
            "--output",
            "o",
            "--dlq",
            "d",
            "--group",
            "g",
            "--function",
            "m:f",
            "--config",
            "linger.ms=1",
            "--config",
            "client.id=x=y",
        ]
    )
    assert args.input == ["a", "b"] and dict(args.config) == {"linger.ms": "1", "client.id": "x=y"}
    assert args.guarantee == "exactly_once"


def test_map_key_by_rekeys_the_output_but_keeps_the_data_id() -> None:
    (out,) = mapper(key_by=lambda result: f"bucket-{result['n'] % 3}").process(sourced("d-7", js(4)))
    assert out.key == b"bucket-2"
    assert header_of(out).data_id == "d-7"
    (raw_key,) = mapper(key_by=lambda result: b"\x00bin").process(sourced("d-8", js(1)))
    assert raw_key.key == b"\x00bin"


def test_map_key_by_that_raises_dead_letters_the_record() -> None:
    def broken(result: Any) -> str:
        raise KeyError("sensor")

    (out,) = mapper(key_by=broken).process(sourced("d-9", js(1)))
    assert reason(out) == DeadLetterReason.PROCESSING_ERROR
    assert out.key == b"d-9" and out.value == js(1)


@pytest.mark.parametrize("returned", [7, {"k": 1}, 1.5])
def test_map_key_by_that_returns_no_key_dead_letters_the_record(returned: Any) -> None:
    """A key must be str, bytes or None: another type crashed the processor with a bare TypeError
    from produce (found by probing)."""
    (out,) = mapper(key_by=lambda _result: returned).process(sourced("d-10", js(1)))
    assert reason(out) == DeadLetterReason.PROCESSING_ERROR and out.value == js(1)
    assert f"returned a {type(returned).__name__}" in (dict(out.headers)[ERROR_HEADER] or b"").decode()
    (none_key,) = mapper(key_by=lambda _result: None).process(sourced("d-11", js(1)))
    assert not none_key.dead_letter and none_key.key is None


def test_an_output_over_the_producer_limit_dead_letters_its_input() -> None:
    """The producer refuses a record over `message.max.bytes` (a 600 KB key counts twice: as the key
    and as the DataID in the header): the batch could never be shipped and the processor stopped,
    on every restart (found by probing). The input is set aside instead."""
    big_key = "K" * 600_000
    (out,) = mapper().process(sourced(big_key, js(1)))
    assert reason(out) == DeadLetterReason.RECORD_TOO_LARGE
    # the input, itself too large with its 600 KB DataID in its header: cut to fit (`fit`)
    assert out.key == big_key.encode()[:1024] and out.value == js(1) and CUT_HEADER in dict(out.headers)
    assert b"more than the 998976" in (dict(out.headers)[ERROR_HEADER] or b"")
    (fits,) = mapper().process(sourced("K" * 400_000, js(1)))
    assert not fits.dead_letter
    (small,) = mapper(max_output_bytes=50).process(sourced("d-12", js(1)))
    assert reason(small) == DeadLetterReason.RECORD_TOO_LARGE


def test_a_reduce_result_over_the_producer_limit_is_dead_lettered_cut_with_its_window() -> None:
    transform = StepTransform(
        total, output_topic="out", dead_letter_topic="dlq", window_ms=1000, max_output_bytes=50
    )
    outs = feed(transform, [timed("a", "a0", 1, 100, 0), timed("b", "b0", 2, 2000, 1)])
    (dead,) = outs
    assert reason(dead) == DeadLetterReason.RECORD_TOO_LARGE and dead.value == b"1"
    assert dict(dead.headers)[SOURCE_HEADER] == b"window a@[0,1000)"


def test_max_output_bytes_follows_the_producers_message_max_bytes() -> None:
    assert max_output_bytes({}, None) == DEFAULT_MAX_OUTPUT_BYTES == 1_000_000 - 1024
    assert max_output_bytes({"message.max.bytes": "2000000"}, None) == 2_000_000 - 1024
    assert (
        max_output_bytes({"message.max.bytes": 2_000_000}, {"message.max.bytes": 500_000}) == 500_000 - 1024
    )


def test_load_function_reports_a_module_that_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syntax error (or anything the module or a factory raises) was a traceback (found by probing)."""
    (tmp_path / "badsyn_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StreamprovError, match="badsyn_mod:f: cannot load it: SyntaxError"):
        load_function("badsyn_mod:f")
