"""The faust agents with the ledger on, without a broker: MapHandler / ReduceHandler record their
applications; a reduce window's input list survives a restart through the state store (one entry
per input) and is deleted with the window; a map agent driven through faust's test context flushes
the ledger per batch of events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faust
from ledger_support import LEDGER

from streamprov.agents.faust_agents import (
    MapHandler,
    Outgoing,
    ProvenanceAgents,
    ReduceHandler,
    input_key,
    parse_input_key,
)
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import ApplicationKind, Context, DataRef, LedgerEntry, LedgerWriter, MemoryLedgerStore
from streamprov.ledger.recorder import StepRecorder
from streamprov.lineage import StepKind
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, SourceStamper

WINDOW = 1000
T0 = 1_731_000_000_000
CTX = Context("sensors", "edge-1", ())


def _scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {"v": value["v"] * factor}


def _sum(acc: int, value: dict[str, Any]) -> int:
    return acc + int(value["v"])


MAP = FunctionRegistry().add(_scale, "scale", "1", params={"factor": 2})
REDUCE = FunctionRegistry().add(_sum, "sum", "1", kind=StepKind.REDUCE, initial=lambda: 0)


def _entries(store: MemoryLedgerStore) -> list[LedgerEntry]:
    return [r.record for r in store.read() if isinstance(r.record, LedgerEntry)]


def _source(key: str, v: int, offset: int) -> InputRecord:
    raw = json.dumps({"v": v}, separators=(",", ":")).encode()
    return InputRecord(raw, [(HEADER_KEY, SourceStamper().header(key, raw))], key.encode(), "src", 0, offset)


def _mapped(key: str, v: int, offset: int) -> InputRecord:
    out = MapHandler(MAP, sink="mapped", dead_letter_topic="dlq").handle(_source(key, v, offset))
    return InputRecord(out.value or b"", out.headers, out.key, "mapped", 0, offset)


def _reducer(writer: LedgerWriter, store: dict[bytes, bytes]) -> ReduceHandler:
    return ReduceHandler(
        REDUCE,
        sink="totals",
        dead_letter_topic="dlq",
        window_ms=WINDOW,
        store=store,
        recorder=StepRecorder(writer, REDUCE.step(None), context=CTX, device_id="w1"),
    )


def _run(handler: ReduceHandler, items: list[tuple[InputRecord, int]]) -> list[Outgoing]:
    outs: list[Outgoing] = []
    for rec, ts in items:
        result = handler.handle(rec, ts)
        outs.extend(result.records)
        assert handler.recorder is not None
        handler.recorder.flush()
        handler.release(result)
    return outs


def test_map_handler_records_each_output() -> None:
    store = MemoryLedgerStore()
    with LedgerWriter(store, LEDGER, None) as writer:
        handler = MapHandler(
            MAP,
            sink="mid",
            dead_letter_topic="dlq",
            recorder=StepRecorder(writer, MAP.step(None), context=CTX, device_id="w1"),
        )
        good = handler.handle(_source("k1", 3, 0))
        bad = handler.handle(InputRecord(b'{"w":1}', [], b"k2", "src", 0, 1))
        assert not good.dead_letter and bad.dead_letter
        assert handler.recorder is not None
        handler.recorder.flush()
    [entry] = _entries(store)
    app = entry.application
    assert app.kind is ApplicationKind.MAP and app.function_key == ("scale", "1")
    assert app.parameters == (("factor", "2"),) and app.context == CTX and app.device_id == "w1"
    assert app.inputs == (DataRef("k1", compute(ChecksumAlgorithm.CRC32C, b'{"v":3}')),)
    header = ProvenanceHeader.from_headers(good.headers)
    assert header is not None and app.output == DataRef("k1", header.checksum)


def test_reduce_inputs_survive_a_restart_and_go_with_the_window() -> None:
    ledger = MemoryLedgerStore()
    state: dict[bytes, bytes] = {}
    first = [_mapped("k", i, i) for i in range(3)]
    with LedgerWriter(ledger, LEDGER, None) as writer:
        assert _run(_reducer(writer, state), [(r, T0 + r.offset) for r in first]) == []
        assert sum(parse_input_key(k) is not None for k in state) == 3
        # a new worker on the same store: the open window's inputs come back with it
        second = _mapped("k", 10, 3)
        outs = _run(_reducer(writer, state), [(second, T0 + 500), (_mapped("z", 0, 4), T0 + WINDOW)])
    (out,) = outs
    assert out.value == b"26"
    left = [parsed for k in state if (parsed := parse_input_key(k)) is not None and parsed[2] == "k"]
    assert left == []  # released with the window
    [entry] = _entries(ledger)
    app = entry.application
    header = ProvenanceHeader.from_headers(out.headers)
    assert header is not None
    digest = header.lineage[-1].inputs
    assert digest is not None and app.check_input_digest(digest)
    assert app.kind is ApplicationKind.REDUCE and (app.window_start, app.window_end) == (T0, T0 + WINDOW)
    assert [r.data_id for r in app.inputs] == ["k", "k", "k", "k"]
    assert app.output == DataRef("k", header.checksum)


def test_input_keys_parse_back() -> None:
    assert parse_input_key(input_key("t", 3, "key", T0, 42)) == ("t", 3, "key", T0, 42)
    assert parse_input_key(b"wxyz") is None


def test_map_agent_flushes_the_ledger_per_batch() -> None:
    store = MemoryLedgerStore()
    app = faust.App("streamprov-unit-ledger", broker="kafka://127.0.0.1:1", store="memory://")
    with LedgerWriter(store, LEDGER, None) as writer:
        prov = ProvenanceAgents(
            app,
            registry=FunctionRegistry(),
            dead_letter_topic="dlq",
            ledger=writer,
            ledger_context=CTX,
            ledger_batch=2,
            ledger_within_s=0.05,
        )
        sent: list[Outgoing] = []

        async def capture(out: Outgoing, *, force: bool = False) -> None:
            sent.append(out)

        prov.send = capture  # type: ignore[method-assign]

        @prov.map(source="src", sink="mid", function_id="scale", version="1", params={"factor": 2})
        def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
            return {"v": value["v"] * factor}

        async def drive() -> None:
            async with prov.agents["scale"].test_context() as agent:
                for i in range(3):
                    value = json.dumps({"v": i}).encode()
                    stamp = SourceStamper().header(f"k{i}", value)
                    await agent.put(value, key=f"k{i}".encode(), headers=[(HEADER_KEY, stamp)])
                await asyncio.sleep(0.3)  # the last, partial batch goes after `ledger_within_s`

        asyncio.run(drive())
        assert len(sent) == 3
    assert sorted(e.application.inputs[0].data_id for e in _entries(store)) == ["k0", "k1", "k2"]
