"""The RocksDB ledger index: materialising (resumable, idempotent, refusing a broken chain), the
graph queries (upstream, downstream, function impact, in dependency order) and proofs from it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_support import LEDGER, build, chain_apps, map_app, node, pipeline, signer, store_of, verifier
from rocksdict import Options, Rdict

from streamprov.ledger import (
    Application,
    ApplicationKind,
    Applied,
    ChainError,
    Checkpoint,
    DataRef,
    LedgerChain,
    LedgerEntry,
    LedgerIndex,
    LedgerIndexError,
    MemoryLedgerStore,
    MemoryProver,
    StoredRecord,
    encode_record,
    entry_id_of,
    entry_proven,
)
from streamprov.ledger import index as index_module
from streamprov.ledger import queries as q
from streamprov.ledger.index import NODE_KIND

GROUPS = 4
APPS = pipeline(GROUPS, chain_len=2, fan_in=3)  # per group: 3 sources, 6 maps, 1 reduce, 1 publish
STORE = build(APPS, checkpoint_every=8)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LedgerIndex]:
    with LedgerIndex(tmp_path / "idx", LEDGER, verifier=verifier()) as idx:
        idx.catch_up(STORE)
        yield idx


def describe(applied: tuple[Applied, ...]) -> list[str]:
    a = [x.entry.application for x in applied]
    return [f"{x.kind.name.lower()}:{x.function_id}:{x.output.data_id}" for x in a]


def assert_dependency_order(applied: tuple[Applied, ...]) -> None:
    position = {a.entry.application.output: i for i, a in enumerate(applied)}
    for i, a in enumerate(applied):
        for ref in a.entry.application.inputs:
            assert position.get(ref, -1) < i, f"{a.entry.application.describe()} before its input's producer"


def test_materialises_everything_and_checks_the_chain(index: LedgerIndex) -> None:
    assert index.size == len(APPS) == GROUPS * 11
    assert index.checkpoint_count == len([r for r in STORE.read() if isinstance(r.record, Checkpoint)])
    assert index.next_offset == len(STORE)
    assert index.entry_at(0).application == APPS[0]
    assert index.entry(entry_id_of(APPS[5])).application == APPS[5]
    with pytest.raises(LedgerIndexError):
        index.entry(b"\x00" * 32)
    with pytest.raises(LedgerIndexError):
        index.entry_at(index.size)


def test_upstream_lineage_reaches_the_sources_in_dependency_order(index: LedgerIndex) -> None:
    published = node("g1", "published")
    up = index.upstream(published)
    assert not up.truncated and not up.cyclic
    assert len(up.applications) == 11
    assert sorted(r.data_id for r in up.sources) == ["g1-s0", "g1-s1", "g1-s2"]
    assert_dependency_order(up.applications)
    assert describe(up.applications)[-2:] == ["reduce:sum:g1", "map:publish:g1"]
    depth = {a.entry.application.function_id or "source": a.depth for a in up.applications}
    assert depth == {"publish": 1, "sum": 2, "map1": 3, "map0": 4, "source": 5}
    assert all(a.entry.application.output.data_id.startswith("g1") for a in up.applications)


def test_upstream_depth_limit(index: LedgerIndex) -> None:
    up = index.upstream(node("g2", "published"), max_depth=2)
    assert describe(up.applications) == ["reduce:sum:g2", "map:publish:g2"] and up.truncated
    assert index.upstream(node("g2-s0", "v0")).applications[0].entry.application.kind.name == "SOURCE"
    unknown = index.upstream(node("nowhere", "x"))
    assert unknown.applications == () and unknown.sources == (node("nowhere", "x"),)


def test_downstream_impact_of_a_source_dataid(index: LedgerIndex) -> None:
    down = index.downstream("g3-s1")
    assert describe(down.applications) == [
        "map:map0:g3-s1",
        "map:map1:g3-s1",
        "reduce:sum:g3",
        "map:publish:g3",
    ]
    assert [a.depth for a in down.applications] == [1, 2, 3, 4]
    assert down.roots == (node("g3-s1", "v0"),)
    assert down.outputs[-1] == node("g3", "published")
    assert not down.truncated and not down.cyclic
    assert [v.data_id for v in index.versions("g3-s1")] == ["g3-s1"] * 3


def test_downstream_of_one_node(index: LedgerIndex) -> None:
    down = index.downstream(node("g0-s2", "m0"))
    assert describe(down.applications) == ["map:map1:g0-s2", "reduce:sum:g0", "map:publish:g0"]
    assert index.downstream(node("g0", "published")).applications == ()


def test_impact_of_a_function_version(index: LedgerIndex) -> None:
    impact = index.affected_by_function("map1", "1")
    kinds = describe(impact.applications)
    assert len(kinds) == GROUPS * 3 + GROUPS * 2
    assert sum(k.startswith("map:map1") for k in kinds) == GROUPS * 3
    assert_dependency_order(impact.applications)
    assert index.affected_by_function("map1", "2").applications == ()
    assert len(index.applications_of("map0")) == GROUPS * 3
    assert len(index.applications_of("map0", "1", b"map0".ljust(16, b"."))) == GROUPS * 3
    assert index.applications_of("map0", "1", b"other") == []


def test_limits_truncate(index: LedgerIndex) -> None:
    down = index.affected_by_function("map0", "1", limit=5)
    assert down.truncated and len(down.applications) == 12  # the 12 applications themselves, nothing more
    up = index.upstream(node("g1", "published"), limit=3)
    assert up.truncated and len(up.applications) < 11


class Counting:
    """A GraphLookup that counts the lookups a query makes."""

    def __init__(self, inner: LedgerIndex) -> None:
        self.inner = inner
        self.calls = 0

    def producers(self, n: DataRef) -> list[bytes]:
        self.calls += 1
        return self.inner.producers(n)

    def consumers(self, n: DataRef) -> list[bytes]:
        self.calls += 1
        return self.inner.consumers(n)

    def versions(self, data_id: str) -> list[DataRef]:
        self.calls += 1
        return self.inner.versions(data_id)

    def entry(self, entry_id: bytes) -> LedgerEntry:
        self.calls += 1
        return self.inner.entry(entry_id)


def test_query_work_depends_on_the_answer_not_on_the_ledger(tmp_path: Path) -> None:
    counts = []
    for groups in (2, 40):
        store = build(pipeline(groups, chain_len=2, fan_in=3), checkpoint_every=50)
        with LedgerIndex(tmp_path / f"idx{groups}", LEDGER) as idx:
            idx.catch_up(store)
            down, up = Counting(idx), Counting(idx)
            q.downstream(down, [node("g1-s0", "v0")])
            q.upstream(up, node("g1", "published"))
            counts.append((down.calls, up.calls))
    assert counts[0] == counts[1]


def test_resumes_where_it_stopped(tmp_path: Path) -> None:
    records = list(STORE.read())
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        assert idx.apply(records[:17], batch_size=5) == 17
        assert idx.next_offset == 17
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        assert idx.next_offset == 17
        assert idx.catch_up(STORE, compact_after=1) == len(records) - 17  # and compacts
        assert idx.catch_up(STORE) == 0
        with LedgerIndex(tmp_path / "full", LEDGER) as full:
            full.catch_up(STORE)
            assert (idx.size, idx.root_hash, idx.head_hash) == (full.size, full.root_hash, full.head_hash)
            assert describe(idx.downstream("g2-s2").applications) == describe(
                full.downstream("g2-s2").applications
            )


def test_a_catch_up_reports_its_progress_after_each_batch_and_the_compaction(tmp_path: Path) -> None:
    """A service indexing a large ledger on its loop's thread beats its liveness from here."""
    total = len(list(STORE.read()))
    seen: list[int] = []
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        assert idx.catch_up(STORE, batch_size=7, compact_after=1, on_progress=seen.append) == total
    assert total % 7 != 0  # the last batch is a partial one: reported only after the compaction
    assert seen == [*range(7, total, 7), total]


def test_applying_records_again_changes_nothing(index: LedgerIndex) -> None:
    before = (index.size, index.root_hash, index.next_offset)
    assert index.apply(STORE.read()) == 0  # offsets already applied: skipped
    # the same ledger at later offsets (a topic copied, or a different source): skipped by seq
    shifted = [StoredRecord(r.offset + 1000, r.record) for r in STORE.read()]
    assert index.apply(shifted) == len(shifted)
    assert (index.size, index.root_hash) == before[:2]
    assert index.next_offset == 1000 + len(shifted)


def test_a_replayed_application_appended_again_does_not_grow_the_graph(tmp_path: Path) -> None:
    store = MemoryLedgerStore()
    chain = LedgerChain(LEDGER, signer(), checkpoint_every=3, dedup_window=0)  # no dedup in the chain
    apps = chain_apps(4)
    for app in [*apps, dataclasses.replace(apps[1], timestamp_ms=99, device_id="other-pod")]:
        store.write(chain.append(app))
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(store)
        assert idx.size == 5  # the chain has the replay ...
        out = apps[1].output
        assert len(idx.producers(out)) == 1  # ... the graph does not
        assert idx.entry_at(4).application == apps[1]  # seq 4 points at the application's first entry
        assert len(idx.downstream(apps[1].inputs[0]).applications) == 1


def test_refuses_to_index_past_a_break_and_keeps_what_came_before(tmp_path: Path) -> None:
    raw = list(STORE.raw)
    del raw[11]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        with pytest.raises(ChainError) as err:
            idx.catch_up(store_of(raw), batch_size=4)
        assert err.value.seq == idx.size
        assert idx.size <= 11 and idx.next_offset == 11
        size = idx.size
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        assert idx.size == size  # what was good before the break stayed indexed


def test_refuses_a_modified_entry_and_a_bad_checkpoint_signature(tmp_path: Path) -> None:
    raw = list(STORE.raw)
    rec = next(r for r in STORE.read() if isinstance(r.record, LedgerEntry) and r.record.seq == 3)
    assert isinstance(rec.record, LedgerEntry)
    app = dataclasses.replace(rec.record.application, device_id="evil")
    raw[rec.offset] = encode_record(dataclasses.replace(rec.record, application=app))
    with LedgerIndex(tmp_path / "a", LEDGER) as idx, pytest.raises(ChainError):
        idx.catch_up(store_of(raw))
    with LedgerIndex(tmp_path / "b", LEDGER, verifier=verifier(bytes(32))) as idx, pytest.raises(ChainError):
        idx.catch_up(STORE)


def test_an_index_belongs_to_one_ledger(tmp_path: Path) -> None:
    LedgerIndex(tmp_path / "idx", LEDGER).close()
    with pytest.raises(LedgerIndexError):
        LedgerIndex(tmp_path / "idx", "another")


def test_cycles_from_content_addressing_terminate(tmp_path: Path) -> None:
    a, b = node("x", "a"), node("x", "b")
    store = build([map_app("noop", a, a), map_app("f", a, b), map_app("g", b, a)], checkpoint_every=10)
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(store)
        down = idx.downstream(a)
        assert {x.entry.application.function_id for x in down.applications} == {"noop", "f", "g"}
        assert down.cyclic  # a -> b -> a is a real cycle; the self-loop alone would not be
        only_loop = build([map_app("noop", a, a), map_app("f", a, b)], checkpoint_every=10)
    with LedgerIndex(tmp_path / "idx2", LEDGER) as idx:
        idx.catch_up(only_loop)
        down = idx.downstream(a)
        assert not down.cyclic and len(down.applications) == 2
        assert not idx.upstream(b).cyclic


def old_is_source(idx: LedgerIndex, ref: DataRef) -> bool:
    """The definition before node kinds: no producer, or a SOURCE entry among the producers."""
    producers = idx.producers(ref)
    return not producers or any(idx.entry(e).application.kind is ApplicationKind.SOURCE for e in producers)


def all_nodes(apps: list[Application]) -> list[DataRef]:
    return list(dict.fromkeys([r for a in apps for r in (*a.inputs, a.output)]))


def test_node_kinds_answer_is_source_without_decoding_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, mid = node("k", "v0"), node("k", "m")
    raw = node("r", "no-source-entry")  # an input the ledger never saw a SOURCE entry for
    apps = [
        *APPS,
        Application.of_source(src, timestamp_ms=1, device_id="src"),
        map_app("ident", src, src),  # an identity map onto a source node: still a source
        map_app("f", src, mid),
        map_app("g", raw, node("r", "out")),
    ]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps, checkpoint_every=10))
        nodes = [*all_nodes(apps), node("never", "seen")]
        expected = [old_is_source(idx, n) for n in nodes]
        assert idx.sources_among(nodes) == expected
        assert [idx.is_source(n) for n in nodes] == expected
        assert idx.is_source(src) and idx.is_source(raw) and not idx.is_source(mid)
        assert idx.sources_among([]) == []

        def no_decoding(body: bytes) -> LedgerEntry:
            raise AssertionError("an entry was decoded")

        monkeypatch.setattr(index_module, "decode_entry_body", no_decoding)
        assert idx.sources_among(nodes) == expected  # answered from the node kinds alone


def _strip_node_kinds(path: Path, *, kinds_to: int | None) -> None:
    """Make `path` look like an index written by a version without node kinds (kinds_to=None), or
    one such a version extended after offset `kinds_to`."""
    db = Rdict(str(path), Options(raw_mode=True))
    try:
        doomed = [k for k in db.keys(from_key=NODE_KIND) if isinstance(k, bytes) and k.startswith(NODE_KIND)]
        for k in doomed:
            db.delete(k)
        if kinds_to is None:
            db.delete(b"Mkinds_to")
        else:
            db.put(b"Mkinds_to", kinds_to.to_bytes(8, "big"))
    finally:
        db.close()


@pytest.mark.parametrize("kinds_to", [None, 3])
def test_an_index_without_node_kinds_is_upgraded_on_open(
    tmp_path: Path, kinds_to: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "idx"
    with LedgerIndex(path, LEDGER) as idx:
        idx.catch_up(STORE)
        nodes = all_nodes(APPS)
        expected = idx.sources_among(nodes)
        assert expected == [old_is_source(idx, n) for n in nodes] and any(expected) and not all(expected)
    _strip_node_kinds(path, kinds_to=kinds_to)
    with caplog.at_level(logging.WARNING, logger="streamprov.ledger.index"), LedgerIndex(path, LEDGER) as idx:
        assert idx.sources_among(nodes) == expected
        assert describe(idx.downstream("g0-s1").applications)[0] == "map:map0:g0-s1"
        assert idx.catch_up(STORE) == 0  # still resumes where it stopped
    assert "without node kinds" in caplog.text and f"{len(APPS)} entries" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamprov.ledger.index"):
        LedgerIndex(path, LEDGER).close()  # upgraded once: no second time
    assert caplog.text == ""


def test_node_kinds_follow_a_resumed_catch_up(tmp_path: Path) -> None:
    records = list(STORE.read())
    half = len(records) // 2
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.apply(records[:half])
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:  # no upgrade needed: kinds cover the offset
        idx.apply(records[half:])
        nodes = all_nodes(APPS)
        assert idx.sources_among(nodes) == [old_is_source(idx, n) for n in nodes]


# -- proofs ------------------------------------------------------------------------------------------
def test_inclusion_and_consistency_proofs_from_the_index(tmp_path: Path) -> None:
    store = build(chain_apps(150), checkpoint_every=37)  # 150 leaves: stored subtrees are used
    entries = [r.record for r in store.read() if isinstance(r.record, LedgerEntry)]
    checkpoints = [r.record for r in store.read() if isinstance(r.record, Checkpoint)]
    prover = MemoryProver([e.entry_hash for e in entries])
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(store)
        for seq in range(0, 150, 7):
            proof = idx.inclusion_proof(seq)
            cp = idx.checkpoint_covering(seq)
            assert cp is not None and cp.tree_size > seq and proof.verify(cp)
            assert proof == prover.inclusion(seq, cp.tree_size)
            assert entry_proven(entries[seq], proof, cp, verifier()) is None
            assert entry_proven(entries[(seq + 1) % 150], proof, cp, verifier()) is not None
            wrong = dataclasses.replace(proof, path=proof.path[:-1])
            assert not wrong.verify(cp)
        for old in checkpoints:
            for new in checkpoints:
                if old.tree_size <= new.tree_size:
                    proof = idx.consistency_proof(old.tree_size, new.tree_size)
                    assert proof.verify(old, new) and proof == prover.consistency(
                        old.tree_size, new.tree_size
                    )
        assert idx.latest_checkpoint() == checkpoints[-1]
        assert idx.checkpoint_covering(150) is None
        with pytest.raises(LedgerIndexError):
            idx.inclusion_proof(5, 151)
        with pytest.raises(LedgerIndexError):
            idx.checkpoint(99)


def test_an_inclusion_proof_fails_against_a_rewritten_ledger_checkpoint(tmp_path: Path) -> None:
    store = build(chain_apps(40), checkpoint_every=40)
    forged = build(chain_apps(40, prefix="z"), checkpoint_every=40)
    with LedgerIndex(tmp_path / "a", LEDGER) as a, LedgerIndex(tmp_path / "b", LEDGER) as b:
        a.catch_up(store)
        b.catch_up(forged)
        proof = a.inclusion_proof(17)
        other = b.latest_checkpoint()
        assert other is not None and not proof.verify(other)
