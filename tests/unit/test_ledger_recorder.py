"""The agents' ledger hook without a broker: StepTransform with a LedgerWriter over a memory store.

Map: one entry per output, input node = the input's (DataID, checksum), output node = the output's;
chained maps connect node to node. Reduce: the full input list per window, matching the header's
InputDigest; rewinds drop held inputs; dead-lettered records leave no entry. Replays deduplicate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME
from fake_messages import Msg
from ledger_support import LEDGER

from streamprov.agents.processor import Outgoing, StepTransform
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, ProvenanceHeader, record_fields
from streamprov.ledger import (
    ApplicationKind,
    Context,
    DataRef,
    LedgerBackpressureError,
    LedgerEntry,
    LedgerIndex,
    LedgerWriter,
    MemoryLedgerStore,
    default_device_id,
)
from streamprov.ledger.recorder import StepRecorder, header_checksum
from streamprov.registry import FunctionRegistry
from streamprov.stamp import SourceStamper

registry = FunctionRegistry()
CTX = Context("orders", "test-rack", ("internal",))


@registry.map("double", "1")
def double(value: dict[str, Any]) -> dict[str, Any]:
    if value["n"] < 0:
        raise ValueError("negative")
    return {"n": value["n"] * 2}


@registry.map("inc", "2")
def inc(value: dict[str, Any], by: int = 1) -> dict[str, Any]:
    return {"n": value["n"] + by}


@registry.reduce("total", "1", initial=int)
def total(acc: int, value: dict[str, Any]) -> int:
    return acc + int(value["n"])


def _v(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def _source(data_id: str, n: int, *, offset: int = 0, ts: int = 1_000) -> Msg:
    value = _v(n)
    header = SourceStamper().header(data_id, value)
    return Msg(value, data_id.encode(), [(HEADER_KEY, header)], o=offset, ts=(TIMESTAMP_CREATE_TIME, ts))


def _as_msg(out: Outgoing, offset: int = 0) -> Msg:
    return Msg(out.value, out.key, list(out.headers), o=offset)


def _entries(store: MemoryLedgerStore) -> list[LedgerEntry]:
    return [r.record for r in store.read() if isinstance(r.record, LedgerEntry)]


def _flush(t: StepTransform) -> None:
    assert t.recorder is not None
    t.recorder.flush()


def _writer(store: MemoryLedgerStore, **kw: Any) -> LedgerWriter:
    return LedgerWriter(store, LEDGER, None, **kw).start()


def test_map_records_input_and_output_nodes_and_chains() -> None:
    store = MemoryLedgerStore()
    with _writer(store) as writer:
        first = StepTransform(
            registry.get("double"), output_topic="mid", dead_letter_topic="dlq", ledger=writer, context=CTX
        )
        second = StepTransform(
            registry.get("inc", "2"),
            output_topic="out",
            dead_letter_topic="dlq",
            params={"by": 5},
            ledger=writer,
            device_id="pod-7",
        )
        src = _source("id-1", 4)
        [mid] = first.process(src)
        [out] = second.process(_as_msg(mid))
        assert first.recorder is not None and first.recorder.unflushed == 1
        first.recorder.flush()
        assert first.recorder.unflushed == 0
        assert second.recorder is not None
        second.recorder.flush()  # buffered until a flush (or `handoff` of them) hands them over

    e1, e2 = _entries(store)
    a1, a2 = e1.application, e2.application
    src_header = dict(src.h or [])[HEADER_KEY]
    assert src_header is not None
    assert a1.kind is ApplicationKind.MAP and a1.function_key == ("double", "1")
    assert a1.inputs == (DataRef("id-1", compute(ChecksumAlgorithm.CRC32C, _v(4))),)
    assert a1.output == DataRef("id-1", compute(ChecksumAlgorithm.CRC32C, mid.value or b""))
    mid_fields = record_fields(dict(mid.headers)[HEADER_KEY] or b"")
    assert a1.timestamp_ms == mid_fields.timestamp_ms and a1.output.checksum == mid_fields.checksum
    assert a1.context == CTX and a1.device_id == default_device_id()
    assert a2.inputs == (a1.output,)  # the chain connects node to node
    assert a2.parameters == (("by", "5"),) and a2.device_id == "pod-7"
    assert a2.output.checksum == compute(ChecksumAlgorithm.CRC32C, out.value or b"")
    step = ProvenanceHeader.from_headers(out.headers)
    assert step is not None and a2.step() == step.lineage[-1]


def test_map_of_a_record_without_header_names_it_like_the_stamper(tmp_path: Path) -> None:
    store = MemoryLedgerStore()
    with _writer(store) as writer:
        t = StepTransform(
            registry.get("double"),
            output_topic="out",
            dead_letter_topic="dlq",
            ledger=writer,
            algorithm=ChecksumAlgorithm.SHA256,
        )
        [out] = t.process(Msg(_v(3), b"plain-key"))
        [keyless] = t.process(Msg(_v(3), None, t="src", p=2, o=17))
        assert not out.dead_letter and not keyless.dead_letter
        _flush(t)
    e1, e2 = _entries(store)
    assert e1.application.inputs == (DataRef.of("plain-key", _v(3), ChecksumAlgorithm.SHA256),)
    assert e2.application.inputs[0].data_id == "src/2/17"
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(store)
        down = idx.downstream("plain-key")
        assert [a.entry.entry_id for a in down.applications] == [e1.entry_id]


def test_dead_letters_and_replays_leave_no_extra_entries() -> None:
    store = MemoryLedgerStore()
    with _writer(store) as writer:
        t = StepTransform(registry.get("double"), output_topic="out", dead_letter_topic="dlq", ledger=writer)
        [bad] = t.process(_source("neg", -1))
        assert bad.dead_letter
        [bad2] = t.process(Msg(b"not json", b"x"))
        assert bad2.dead_letter
        for _ in range(3):  # a replay after a crash: same application, same entry_id
            t.process(_source("ok", 2))
            _flush(t)
        assert writer.stats.duplicates == 2
    assert len(_entries(store)) == 1


def test_reduce_records_the_full_input_list_matching_the_header_digest(tmp_path: Path) -> None:
    store = MemoryLedgerStore()
    with _writer(store) as writer:
        t = StepTransform(
            registry.get("total"), output_topic="out", dead_letter_topic="dlq", window_ms=1000, ledger=writer
        )
        rec = t.recorder
        assert rec is not None
        msgs = [
            _source("a", 1, offset=0, ts=100),
            _source("b", 2, offset=1, ts=200),
            _source("c", 3, offset=2, ts=300),
        ]
        for m in msgs:
            m.k = b"group"
            assert t.process(m) == []
        assert rec.open_windows == 1 and rec.stats.inputs_held == 3
        [out] = t.process(_source("d", 4, offset=3, ts=2_500))  # closes [0, 1000)
        assert rec.open_windows == 1 and rec.stats.inputs_held == 1  # only d's window is held
        rec.flush()
        t.reset()  # a rewind drops the open windows; replay rebuilds them
        assert rec.open_windows == 0 and rec.stats.inputs_held == 0
    [entry] = _entries(store)
    app = entry.application
    header = ProvenanceHeader.from_headers(out.headers)
    assert header is not None
    digest = header.lineage[-1].inputs
    assert digest is not None and app.check_input_digest(digest)
    assert app.kind is ApplicationKind.REDUCE and (app.window_start, app.window_end) == (0, 1000)
    assert [r.data_id for r in app.inputs] == ["a", "b", "c"]
    assert app.output == DataRef("group", header.checksum)
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(store)
        for data_id in "abc":
            assert idx.downstream(data_id).outputs == (app.output,)


def test_flush_on_end_of_input_records_every_window() -> None:
    store = MemoryLedgerStore()
    with _writer(store) as writer:
        t = StepTransform(
            registry.get("total"), output_topic="out", dead_letter_topic="dlq", window_ms=1000, ledger=writer
        )
        for i, key in enumerate([b"x", b"y", b"x"]):
            m = _source(f"r{i}", i, offset=i, ts=10 * i)
            m.k = key
            t.process(m)
        outs = t.flush()
        _flush(t)
    entries = _entries(store)
    assert len(outs) == 2 == len(entries)
    assert sorted(len(e.application.inputs) for e in entries) == [1, 2]


def test_backpressure_surfaces_to_the_caller() -> None:
    class Stuck(MemoryLedgerStore):
        def write(self, records: Any) -> None:
            time.sleep(0.3)
            super().write(records)

        def write_encoded(self, items: Any) -> None:
            time.sleep(0.3)
            super().write_encoded(items)

    store = Stuck()
    writer = LedgerWriter(store, LEDGER, None, max_queue=1, max_batch=1, put_timeout_s=0.01).start()
    try:
        t = StepTransform(registry.get("double"), output_topic="out", dead_letter_topic="dlq", ledger=writer)
        assert t.recorder is not None
        t.recorder.handoff = 1
        with pytest.raises(LedgerBackpressureError):
            for i in range(10):
                t.process(_source(f"id-{i}", i))
    finally:
        writer.close()


def test_header_checksum_reads_current_format_in_place() -> None:
    value = b"payload"
    raw = SourceStamper(ChecksumAlgorithm.SHA256).header("d", value)
    assert header_checksum(raw) == compute(ChecksumAlgorithm.SHA256, value)
    rec = StepRecorder.__new__(StepRecorder)
    rec.algorithm = ChecksumAlgorithm.CRC32C
    assert StepRecorder.input_ref(rec, None, value, "d") == DataRef.of("d", value)
