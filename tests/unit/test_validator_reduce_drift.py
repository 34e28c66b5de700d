"""Source drift for reduce outputs through the ledger, without a broker: headers stamped as the
processor stamps them, the matching applications in an in-memory ledger, and the checks' findings
when a source behind a reduce changes, disappears, or the ledger cannot explain the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ledger_support import LEDGER, signer
from test_validator_checks import NOW, FakeView, Msg, dumps, map_output

from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import Application, DataRef, LedgerChain, LedgerIndex, MemoryLedgerStore
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, ReduceState
from validator.alerts import AlertKind
from validator.checks import Checker, TopicPolicy
from validator.reduce_drift import LedgerSources, Reduced, Unexplained, source_checksum, source_versions

fns = FunctionRegistry()


@fns.reduce("total", "1", initial=lambda: {"c": 0.0})
def total(acc: dict[str, float], value: dict[str, float]) -> dict[str, float]:
    return {"c": round(acc["c"] + value["c"], 3)}


@fns.map("publish", "1")
def publish(value: dict[str, float]) -> dict[str, float]:
    return {"total": value["c"]}


class Ledger:
    """An in-memory ledger and the index the checks read, appended to as a pipeline would."""

    def __init__(self, tmp: Path) -> None:
        self.store = MemoryLedgerStore()
        self.chain = LedgerChain(LEDGER, signer(), checkpoint_every=5)
        self.index = LedgerIndex(tmp / "index", LEDGER)
        self.sources = LedgerSources(self.index, self.store, refresh_s=0.0)

    def record(self, app: Application) -> None:
        self.store.write(self.chain.append(app))


def reduce_output(
    ledger: Ledger | None,
    group: str,
    sources: dict[str, bytes],
    *,
    window: tuple[int, int] = (0, 60_000),
) -> tuple[bytes, bytes]:
    """Each source through f2c, then `total` over them: (value, header); the ledger gets every
    application with the inputs the processor would record."""
    state = ReduceState(total.initial())  # type: ignore[misc]
    refs = []
    for data_id, source in sources.items():
        value, header = map_output(data_id, source)
        decoded = ProvenanceHeader.decode(header)
        if ledger is not None:
            step = decoded.lineage[-1]
            src = DataRef.of(data_id, source)
            ledger.record(
                Application.of_step(step, [src], DataRef(data_id, decoded.checksum), timestamp_ms=1)
            )
        state.add(total, {}, decoded, json.loads(value))
        refs.append(DataRef(data_id, decoded.checksum))
    out = dumps(state.accumulator)
    header = state.header(total.step(), group, out, ChecksumAlgorithm.CRC32C, window)
    if ledger is not None:
        ledger.record(
            Application.of_step(header.lineage[-1], refs, DataRef(group, header.checksum), timestamp_ms=2)
        )
    return out, header.encode()


def published(ledger: Ledger | None, value: bytes, header: bytes) -> tuple[bytes, bytes]:
    """A map step after the reduce (`publish`): same DataID, the reduce's source checksum copied."""
    out = dumps(publish.apply(json.loads(value)))
    stamped = MapStamper(publish).stamp(InputRecord(value, [(HEADER_KEY, header)], None, "r", 0, 0), out)
    if ledger is not None:
        h, o = ProvenanceHeader.decode(header), ProvenanceHeader.decode(stamped)
        ledger.record(
            Application.of_step(
                o.lineage[-1],
                [DataRef(h.data_id, h.checksum)],
                DataRef(o.data_id, o.checksum),
                timestamp_ms=3,
            )
        )
    return out, stamped


SOURCES = {f"s-{i}": dumps({"f": 32 + i}) for i in range(4)}


def view_of(sources: dict[str, bytes]) -> FakeView:
    view = FakeView()
    for data_id, value in sources.items():
        view.put(data_id, value)
    return view


def checker(view: FakeView, ledger: Ledger | None, policy: TopicPolicy | None = None) -> Checker:
    pol = policy or TopicPolicy()

    def refresh() -> None:
        view.refreshed += 1

    return Checker(
        lambda _t: pol,
        view,
        dead_letter_topic="dlq",
        refresh=refresh,
        ledger=ledger.sources if ledger is not None else None,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    led = Ledger(tmp_path)
    yield led
    led.index.close()


def test_unchanged_sources_behind_a_reduce_give_no_alert(ledger: Ledger) -> None:
    value, header = reduce_output(ledger, "group-a", SOURCES)
    view = view_of(SOURCES)
    result = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and result.reduce_checked == 1 and result.drift_skipped == 0
    assert view.refreshed == 0  # nothing suspect: the view was not caught up


def test_a_changed_source_behind_a_reduce_is_source_changed(ledger: Ledger) -> None:
    value, header = reduce_output(ledger, "group-a", SOURCES)
    now = {**SOURCES, "s-2": dumps({"f": 99})}
    view = view_of(now)
    result = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)], k=b"group-a", o=4)], NOW)
    (alert,) = result.alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED and alert.data_id == "group-a" and alert.offset == 4
    claimed = ProvenanceHeader.decode(header).source_checksum
    assert alert.evidence.expected == claimed.hex()
    _, expected_now = reduce_output(None, "group-a", now)  # what a recompute would stamp
    assert alert.evidence.actual == ProvenanceHeader.decode(expected_now).source_checksum.hex()
    assert "1 of the 4 source record(s)" in alert.evidence.reason and "'s-2'" in alert.evidence.reason
    assert view.refreshed == 1  # reported only after the view caught up


def test_a_change_the_view_had_not_read_yet_is_not_reported(ledger: Ledger) -> None:
    value, header = reduce_output(ledger, "group-a", SOURCES)
    view = view_of({**SOURCES, "s-1": dumps({"f": 0})})
    check = checker(view, ledger)
    check.refresh = lambda: view.put("s-1", SOURCES["s-1"])  # the refresh brings the right version
    assert check.check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts == []


def test_a_deleted_source_behind_a_reduce_is_missing_source(ledger: Ledger) -> None:
    value, header = reduce_output(ledger, "group-a", SOURCES)
    view = view_of({k: v for k, v in SOURCES.items() if k != "s-3"})
    (alert,) = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.MISSING_SOURCE
    assert alert.evidence.actual.startswith("1 not in the source view: 's-3'")


def test_a_map_after_the_reduce_is_checked_through_it(ledger: Ledger) -> None:
    value, header = published(ledger, *reduce_output(ledger, "group-a", SOURCES))
    good = checker(view_of(SOURCES), ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert good.alerts == [] and good.reduce_checked == 1
    changed = view_of({**SOURCES, "s-0": dumps({"f": 1})})
    (alert,) = checker(changed, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED and "'s-0'" in alert.evidence.reason


def test_a_reduce_of_reduces_reaches_every_source(ledger: Ledger) -> None:
    a_value, a_header = reduce_output(ledger, "a", {"s-0": SOURCES["s-0"], "s-1": SOURCES["s-1"]})
    b_value, b_header = reduce_output(ledger, "b", {"s-2": SOURCES["s-2"]})
    state = ReduceState(total.initial())  # type: ignore[misc]
    refs = []
    for v, h in ((a_value, a_header), (b_value, b_header)):
        decoded = ProvenanceHeader.decode(h)
        state.add(total, {}, decoded, json.loads(v))
        refs.append(DataRef(decoded.data_id, decoded.checksum))
    out = dumps(state.accumulator)
    header = state.header(total.step(), "all", out, ChecksumAlgorithm.CRC32C, (0, 60_000))
    ledger.record(Application.of_step(header.lineage[-1], refs, DataRef("all", header.checksum)))
    ledger.sources.catch_up()
    found = ledger.sources.explain("all", header.checksum, header.source_checksum, frozenset())
    assert isinstance(found, Reduced)
    assert [r.data_id for r in source_versions(found)] == ["s-0", "s-1", "s-2"]
    assert source_checksum(found) == header.source_checksum
    view = view_of({**SOURCES, "s-2": dumps({"f": 7})})
    (alert,) = checker(view, ledger).check([Msg(out, [(HEADER_KEY, header.encode())])], NOW).alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED and "'s-2'" in alert.evidence.reason


def test_two_windows_with_the_same_result_are_told_apart_by_the_input_digest(ledger: Ledger) -> None:
    first = {"s-0": SOURCES["s-0"], "s-3": SOURCES["s-3"]}  # 0 + 1.667 = 0.556 + 1.111
    value1, header1 = reduce_output(ledger, "g", first, window=(0, 60_000))
    second = {"s-1": SOURCES["s-1"], "s-2": SOURCES["s-2"]}
    value2, header2 = reduce_output(ledger, "g", second, window=(60_000, 120_000))
    assert value1 == value2 and header1 != header2  # one output node, two reduce applications
    view = view_of({**SOURCES, "s-3": dumps({"f": 5})})  # only the first window's source changed
    check = checker(view, ledger)
    result = check.check(
        [Msg(value1, [(HEADER_KEY, header1)], o=0), Msg(value2, [(HEADER_KEY, header2)], o=1)], NOW
    )
    assert [(a.offset, a.kind) for a in result.alerts] == [(0, AlertKind.SOURCE_CHANGED)]
    assert result.reduce_checked == 2


def test_a_record_not_in_the_ledger_yet_is_looked_up_after_a_catch_up(ledger: Ledger) -> None:
    value, header = reduce_output(None, "group-a", SOURCES)  # its entries are not written yet
    view = view_of({**SOURCES, "s-1": dumps({"f": 0})})
    result = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and result.drift_skipped == 1  # skipped, never flagged
    reduce_output(ledger, "group-a", SOURCES)  # the pipeline's entries arrive
    (alert,) = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts
    assert alert.kind is AlertKind.SOURCE_CHANGED


def test_a_ledger_that_does_not_give_the_header_is_not_trusted(ledger: Ledger) -> None:
    value, header = reduce_output(None, "group-a", SOURCES)
    # The ledger says this output came from other inputs: their sources do not give the header's root.
    decoded = ProvenanceHeader.decode(header)
    refs = [DataRef("x", compute(ChecksumAlgorithm.CRC32C, b"x"))]
    ledger.record(Application.of_step(decoded.lineage[-1], refs, DataRef("group-a", decoded.checksum)))
    ledger.sources.catch_up()
    found = ledger.sources.explain("group-a", decoded.checksum, decoded.source_checksum, frozenset())
    assert isinstance(found, Unexplained) and "header says" in found.reason
    view = view_of({"x": b"changed"})
    result = checker(view, ledger).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and result.drift_skipped == 1


def test_without_a_ledger_reduce_outputs_are_skipped_and_staleness_ignores_the_group_key() -> None:
    value, header = reduce_output(None, "group-a", SOURCES)
    view = view_of(SOURCES)
    result = checker(view, None).check([Msg(value, [(HEADER_KEY, header)])], NOW)
    assert result.alerts == [] and result.drift_skipped == 1
    # drift off, source staleness on: the group key is no source record, so no missing_source
    stale_only = TopicPolicy(source_drift=False, source_max_age_ms=1000)
    assert checker(view, None, stale_only).check([Msg(value, [(HEADER_KEY, header)])], NOW).alerts == []


def test_map_outputs_still_take_the_fast_path_with_a_ledger(ledger: Ledger) -> None:
    view = view_of(SOURCES)
    msgs = [
        Msg(value, [(HEADER_KEY, header)]) for value, header in (map_output(k, v) for k, v in SOURCES.items())
    ]
    result = checker(view, ledger).check(msgs, NOW)
    assert result.alerts == [] and result.reduce_checked == 0 and result.checked == 4
