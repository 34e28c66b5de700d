"""Change events and the detector's parts without a broker: the wire format (read back by plain fastavro
with the .avsc alone), deterministic ids, bounded impact sets, the RocksDB state, and the index's
recorded function versions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest
from ledger_support import LEDGER, build, map_app, node, pipeline

from streamprov.changes import (
    ChangeEvent,
    ChangeEventError,
    ChangeKind,
    FunctionChange,
    Impact,
    SourceChange,
    SourceVersions,
)
from streamprov.changes.event import PREFIX
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.ledger import LedgerIndex

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "change_event.avsc"


def _index(tmp_path: Path) -> LedgerIndex:
    idx = LedgerIndex(tmp_path / "idx", LEDGER)
    idx.catch_up(build(pipeline(3, chain_len=2, fan_in=3)))
    return idx


def test_event_round_trips_and_plain_fastavro_reads_it(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        impact = Impact.of(idx.downstream("g1-s2"), max_outputs=10, ledger_size=idx.size)
    previous = node("g1-s2", "v0").checksum
    change = SourceChange(
        "src", 1, 42, "g1-s2", previous, compute(ChecksumAlgorithm.SHA256, b"x"), b"\x01" * 32
    )
    event = ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, change, impact, 1_700_000_000_000)
    raw = event.encode()
    assert ChangeEvent.decode(raw) == event

    schema = json.loads(SCHEMA_FILE.read_text())
    assert raw[:2] == b"\xc3\x01" and raw[2:10] == PREFIX[2:10]
    plain = fastavro.schemaless_reader(io.BytesIO(raw[10:]), fastavro.parse_schema(schema), None)
    assert plain["kind"] == "source_changed" and plain["source"]["offset"] == 42
    assert [o["data_id"] for o in plain["impact"]["outputs"]] == ["g1-s2", "g1-s2", "g1", "g1"]
    assert [o["function_id"] for o in plain["impact"]["outputs"]] == ["map0", "map1", "sum", "publish"]
    assert plain["impact"]["total"] == 4 and plain["function"] is None


def test_change_ids_are_deterministic_and_distinguish_changes() -> None:
    a, b = node("d", "1").checksum, node("d", "2").checksum
    empty = Impact((), 0, False, True, 0)
    e1 = ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, SourceChange("t", 0, 1, "d", a, b), empty, 1)
    e2 = ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, SourceChange("t", 3, 9, "d", a, b), empty, 2)
    e3 = ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, SourceChange("t", 0, 1, "d", b, a), empty, 1)
    e4 = ChangeEvent.for_source(ChangeKind.SOURCE_DELETED, SourceChange("t", 0, 1, "d", a, None), empty, 1)
    assert e1.change_id == e2.change_id  # the same change seen again (a replay): the same id
    assert len({e1.change_id, e3.change_id, e4.change_id}) == 3
    f = ChangeEvent.for_function(FunctionChange("f", "1", b"a" * 16, "2", b"b" * 16), empty, 5)
    assert f.key == b"f" and ChangeEvent.decode(f.encode()) == f
    assert len(f.change_id) == 64 and int(f.change_id, 16) >= 0


def test_impact_is_bounded_with_total_and_flags(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        full = idx.affected_by_function("map0", "1")
        impact = Impact.of(full, max_outputs=4, ledger_size=idx.size)
        assert impact.total == 9 * 2 + 3 * 2 and len(impact.outputs) == 4
        assert impact.truncated and impact.complete and impact.ledger_size == idx.size
        walked = Impact.of(idx.affected_by_function("map0", "1", limit=5), max_outputs=100, ledger_size=1)
        assert not walked.complete and not walked.truncated


def test_recorded_functions_lists_each_version_once(tmp_path: Path) -> None:
    apps = [map_app("f", node(f"d{i}", "a"), node(f"d{i}", "b")) for i in range(20)]
    apps += [map_app("f", node(f"d{i}", "b"), node(f"d{i}", "c"), version="2") for i in range(5)]
    apps += [map_app("fx", node("e", "a"), node("e", "b"))]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        assert idx.recorded_functions("f") == [("1", b"f".ljust(16, b".")), ("2", b"f".ljust(16, b"."))]
        assert idx.recorded_functions("fx") == [("1", b"fx".ljust(16, b"."))]
        assert idx.recorded_functions("nope") == []


def test_source_versions_state(tmp_path: Path) -> None:
    state = SourceVersions(tmp_path / "s")
    a, b = node("d", "1").checksum, compute(ChecksumAlgorithm.SHA256, b"2")
    state.write({("t", "d"): a, ("t", "e"): b, ("u", "d"): b})
    assert (state.get("t", "d"), state.get("t", "e"), state.get("u", "d")) == (a, b, b)
    state.write({("t", "d"): None})
    assert state.get("t", "d") is None and state.get("t", "x") is None
    assert state.next_offset("t", 0) is None
    state.write({("t", "e"): None}, {("t", 0): 17, ("t", 1): 2**40})  # in one WriteBatch
    assert (state.next_offset("t", 0), state.next_offset("t", 1), state.get("t", "e")) == (17, 2**40, None)
    assert state.next_offset("u", 0) is None
    assert not state.reported_synced("changes")
    state.mark_reported_synced("changes")
    assert state.reported_synced("changes") and not state.reported_synced("other")
    change = FunctionChange("f", "1", b"h1", "2", b"h2")
    assert not state.reported("f", "1", b"h1", ("2", b"h2"))
    state.mark_reported(change)
    assert state.reported("f", "1", b"h1", ("2", b"h2"))
    assert not state.reported("f", "1", b"h1", ("3", b"h3"))  # a newer function: report again
    state.close()


def test_garbage_is_a_typed_error() -> None:
    with pytest.raises(ChangeEventError):
        ChangeEvent.decode(b"nope")
    with pytest.raises(ChangeEventError):
        ChangeEvent.decode(PREFIX + b"\xff\xff")
