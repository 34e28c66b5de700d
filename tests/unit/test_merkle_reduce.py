"""RFC 6962 Merkle hashing, the O(log n) accumulator, windowed reduction and the reduce header."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamprov.checksum import Checksum, ChecksumAlgorithm, compute
from streamprov.errors import StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.lineage import InputDigest, Step, StepKind, common_prefix
from streamprov.merkle import (
    HASH_SIZE,
    MerkleAccumulator,
    leaf_hash,
    length_prefixed,
    levels_of,
    merkle_root,
    node_hash,
    root_of,
    root_with,
)
from streamprov.reduce import LateRecordError, WindowedReducer
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import ReduceState

CRC, SHA = ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.SHA256

# --- Merkle -------------------------------------------------------------------------------------

# Certificate Transparency's published test vectors for RFC 6962 (tree sizes 0..8).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("n", range(len(CT_ROOTS)))
def test_rfc6962_reference_roots(n: int) -> None:
    assert merkle_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]
    acc = MerkleAccumulator()
    for leaf in CT_LEAVES[:n]:
        acc.add(leaf)
    assert acc.root().hex() == CT_ROOTS[n]


def test_accumulator_matches_reference_for_every_size_up_to_70() -> None:
    leaves = [hashlib.sha256(i.to_bytes(2, "big")).digest()[: i % 7] for i in range(71)]
    acc = MerkleAccumulator()
    assert acc.root() == merkle_root([]) == hashlib.sha256(b"").digest()
    for n in range(1, 71):
        acc.add(leaves[n - 1])
        assert acc.count == n
        assert acc.root() == merkle_root(leaves[:n]), n
        # O(log n) state: one hash per set bit of the count.
        assert len(acc.to_bytes()) == 8 + HASH_SIZE * n.bit_count()


@settings(deadline=None, max_examples=150)
@given(st.lists(st.binary(max_size=40), max_size=80))
def test_accumulator_equals_reference(leaves: list[bytes]) -> None:
    acc = MerkleAccumulator()
    for leaf in leaves:
        acc.add(leaf)
    assert acc.root() == merkle_root(leaves)
    restored = MerkleAccumulator.from_bytes(acc.to_bytes())
    assert restored.count == len(leaves) and restored.root() == acc.root()


@settings(deadline=None, max_examples=100)
@given(st.lists(st.binary(max_size=8), max_size=60), st.integers(min_value=0, max_value=60))
def test_state_round_trip_then_continue(leaves: list[bytes], cut: int) -> None:
    """Persisting the accumulator mid-window and resuming gives the uninterrupted root."""
    cut = min(cut, len(leaves))
    acc = MerkleAccumulator()
    for leaf in leaves[:cut]:
        acc.add(leaf)
    resumed = MerkleAccumulator.from_bytes(acc.to_bytes())
    assert resumed.to_bytes() == acc.to_bytes()
    for leaf in leaves[cut:]:
        resumed.add(leaf)
    assert resumed.root() == merkle_root(leaves)


@pytest.mark.parametrize(
    "state",
    [
        b"",
        b"\x00" * 7,
        b"\x00" * 8 + b"\x01",  # not a whole hash
        b"\x00" * 8 + b"\x00" * 31,
        (1).to_bytes(8, "big"),  # count 1 needs one hash, has none
        (3).to_bytes(8, "big") + b"\x00" * 32,  # count 3 needs two
        (0).to_bytes(8, "big") + b"\x00" * 32,  # count 0 needs none
        (2**64 - 1).to_bytes(8, "big") + b"\x00" * 32,
    ],
)
def test_from_bytes_rejects_bad_state(state: bytes) -> None:
    with pytest.raises(StreamprovError):
        MerkleAccumulator.from_bytes(state)


def test_domain_separation_and_length_prefixing() -> None:
    left, right = leaf_hash(b"a"), leaf_hash(b"b")
    # A leaf whose data is two hashes is not the node over them (second-preimage resistance).
    assert merkle_root([left + right]) != node_hash(left, right) == merkle_root([b"a", b"b"])
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    # Field boundaries are part of the leaf: ("ab", "c") and ("a", "bc") differ.
    assert length_prefixed(b"ab", b"c") != length_prefixed(b"a", b"bc")
    assert length_prefixed(b"ab", b"c") == b"\x00\x00\x00\x02ab\x00\x00\x00\x01c"
    # Order matters: the root is over arrival order.
    assert merkle_root([b"1", b"2", b"3"]) != merkle_root([b"2", b"1", b"3"])


# --- reduce header ------------------------------------------------------------------------------


def _total() -> RegisteredFunction:
    reg = FunctionRegistry()

    @reg.reduce("total", "1", initial=int, scale=1)
    def total_fn(acc: int, value: int, scale: int) -> int:
        return acc + value * scale

    return total_fn


TOTAL = _total()


@pytest.fixture
def total() -> RegisteredFunction:
    return TOTAL


def _map_step(fid: str) -> Step:
    return Step.create(StepKind.MAP, fid, "1", fid.encode().ljust(16, b"_"), {})


def _input(data_id: str, value: bytes, lineage: tuple[Step, ...] = (), ts: int = 1_000) -> ProvenanceHeader:
    source = compute(SHA, b"source of " + data_id.encode())
    return ProvenanceHeader(data_id, compute(CRC, value), source, ts, lineage)


def _leaf(data_id: str, checksum: Checksum) -> bytes:
    """The documented leaf: length-prefixed (DataID UTF-8, algorithm byte, digest)."""
    parts = (data_id.encode(), bytes([checksum.algorithm]), checksum.value)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def test_reduce_header_digests_its_inputs(total: RegisteredFunction) -> None:
    upstream = (_map_step("parse"), _map_step("clean"))
    inputs = [_input(f"order-{i}", str(i).encode(), upstream) for i in range(5)]
    state = ReduceState(total.initial())  # type: ignore[misc]
    for i, header in enumerate(inputs):
        state.add(total, {"scale": 2}, header, i)
    assert state.accumulator == 2 * sum(range(5)) and state.count == 5

    header = state.header(total.step({"scale": 2}), "customer-1", b"20", SHA, window=(0, 60_000))
    assert header.data_id == "customer-1"
    assert header.checksum == compute(SHA, b"20")
    *prefix, reduce_step = header.lineage
    assert tuple(prefix) == upstream
    assert (reduce_step.kind, reduce_step.function_id, reduce_step.code_hash) == (
        StepKind.REDUCE,
        "total",
        total.code_hash,
    )
    assert reduce_step.params == {"scale": 2}
    assert reduce_step.inputs == InputDigest(
        5, merkle_root([_leaf(h.data_id, h.checksum) for h in inputs]), 0, 60_000
    )
    # The source checksum is the Merkle root over the inputs' source checksums, always SHA-256.
    assert header.source_checksum == Checksum(
        SHA, merkle_root([_leaf(h.data_id, h.source_checksum) for h in inputs])
    )
    assert ProvenanceHeader.decode(header.encode()) == header


def test_reduce_digest_depends_on_every_input(total: RegisteredFunction) -> None:
    def root(headers: list[ProvenanceHeader]) -> tuple[bytes, bytes]:
        state = ReduceState(0)
        for h in headers:
            state.add(total, {}, h, 1)
        out = state.header(total.step(), "k", b"v", CRC)
        assert out.lineage[-1].inputs is not None
        return out.lineage[-1].inputs.merkle_root, out.source_checksum.value

    base = [_input(f"d{i}", b"v") for i in range(4)]
    reference = root(base)
    changed_value = [*base[:2], _input("d2", b"other"), base[3]]
    changed_id = [*base[:2], _input("dX", b"v"), base[3]]
    reordered = [base[1], base[0], *base[2:]]
    assert root(changed_value)[0] != reference[0] and root(changed_value)[1] == reference[1]
    assert root(changed_id) != reference
    assert root(reordered) != reference
    assert root(base) == reference


@pytest.mark.parametrize(
    ("lineages", "expected"),
    [
        ([("a", "b", "c"), ("a", "b", "c")], ("a", "b", "c")),
        ([("a", "b", "c"), ("a", "b")], ("a", "b")),
        ([("a", "b"), ("a", "x"), ("a", "b")], ("a",)),
        ([("a",), ("b",)], ()),
        ([("a", "b"), ()], ()),
        ([(), ()], ()),
    ],
)
def test_upstream_is_the_common_prefix(total: RegisteredFunction, lineages, expected) -> None:
    state = ReduceState(0)
    for i, names in enumerate(lineages):
        state.add(total, {}, _input(f"d{i}", b"v", tuple(_map_step(n) for n in names)), 1)
    header = state.header(total.step(), "k", b"v", CRC)
    assert header.lineage[:-1] == tuple(_map_step(n) for n in expected)
    assert header.lineage[-1].function_id == "total"
    assert common_prefix([tuple(_map_step(n) for n in names) for names in lineages]) == header.lineage[:-1]


def test_header_size_is_bounded_whatever_the_fan_in(total: RegisteredFunction) -> None:
    upstream = (_map_step("parse"),)
    sizes = {}
    state = ReduceState(0)
    added = 0
    for n in (10, 100, 1_000, 10_000):
        while added < n:
            state.add(total, {}, _input(f"order-{added}", b"v", upstream), 1)
            added += 1
        header = state.header(total.step(), "customer", b"out", CRC, window=(0, 60_000))
        sizes[n] = len(header.encode())
        assert header.lineage[-1].inputs is not None and header.lineage[-1].inputs.count == n
        # The windowed state is O(log n) hashes, not O(n) inputs.
        assert len(state.inputs.to_bytes()) <= 8 + HASH_SIZE * n.bit_length()
    # Only the count's varint grows (10 -> 10 000 takes 1 -> 3 bytes); nothing else depends on n.
    assert max(sizes.values()) - sizes[10] <= 2, sizes
    assert sizes[10_000] < 250, sizes


# --- windowed reducer ---------------------------------------------------------------------------


def _reducer(total: RegisteredFunction, window_ms: int = 10, grace_ms: int = 0) -> WindowedReducer:
    return WindowedReducer(total, window_ms, grace_ms)


def _add(r: WindowedReducer, key: str, ts: int, value: int = 1, position=None) -> None:
    r.add(key, _input(f"{key}@{ts}", str(value).encode(), ts=ts), value, ts, position)


def test_constructor_validation(total: RegisteredFunction) -> None:
    mapper = FunctionRegistry().add(lambda v: v, "m", "1")
    with pytest.raises(StreamprovError, match="not a reduce"):
        WindowedReducer(mapper, 10)
    for window_ms, grace_ms in ((0, 0), (-5, 0), (10, -1)):
        with pytest.raises(StreamprovError):
            WindowedReducer(total, window_ms, grace_ms)


def test_window_of(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10)
    assert r.window_of(0) == (0, 10)
    assert r.window_of(9) == (0, 10)
    assert r.window_of(10) == (10, 20)
    assert r.window_of(-1) == (-10, 0)


def test_tumbling_windows(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10)
    for ts, value in ((0, 1), (5, 2), (9, 4), (10, 8), (19, 16)):
        _add(r, "k", ts, value)
    _add(r, "j", 3, 100)
    assert len(r) == 3 and r.watermark_ms == 19
    out = r.close_due()  # horizon 19: [0, 10) ended, [10, 20) has not
    assert [(o.key, o.window, o.value, o.state.count) for o in out] == [
        ("j", (0, 10), 100, 1),
        ("k", (0, 10), 7, 3),
    ]
    assert r.close_due() == []  # nothing is emitted twice
    _add(r, "k", 20, 32)
    (out_k,) = r.close_due()
    assert (out_k.key, out_k.window, out_k.value) == ("k", (10, 20), 24)
    assert len(r) == 1  # [20, 30) is still open


def test_grace_keeps_a_window_open(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10, grace_ms=5)
    _add(r, "k", 2, 1)
    _add(r, "k", 14, 10)
    assert r.close_due() == []  # horizon 9: [0, 10) is in its grace period
    _add(r, "k", 7, 100)  # late but within grace: accepted
    _add(r, "k", 15, 1000)
    (out,) = r.close_due()  # horizon 10
    assert (out.window, out.value, out.state.count) == ((0, 10), 101, 2)
    with pytest.raises(LateRecordError, match="grace"):
        _add(r, "k", 9, 1)


def test_late_records_raise_and_change_nothing(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10)
    _add(r, "a", 5)
    _add(r, "a", 31)
    assert [o.window for o in r.close_due()] == [(0, 10)]
    before = (len(r), r.open_offsets(), r.watermark_ms)
    for key, ts in (("a", 0), ("a", 9), ("a", 29), ("b", 15), ("new", 20)):
        # Every window that ended by the watermark is closed, including windows no key had used.
        with pytest.raises(LateRecordError):
            _add(r, key, ts)
    assert (len(r), r.open_offsets(), r.watermark_ms) == before
    _add(r, "b", 30)  # the window holding the watermark is open for every key
    assert len(r) == 2


def test_lateness_does_not_depend_on_other_keys(total: RegisteredFunction) -> None:
    """Regression: a window was closed only if some key happened to have emitted it."""
    with_other = _reducer(total)
    without_other = _reducer(total)
    _add(with_other, "x", 15)  # only this reducer has a record in [10, 20)
    for r in (with_other, without_other):
        _add(r, "a", 5)
        _add(r, "a", 25)
        r.close_due()
    for r in (with_other, without_other):
        with pytest.raises(LateRecordError):
            _add(r, "c", 12)


def test_close_due_is_oldest_first(total: RegisteredFunction) -> None:
    """Regression: windows were emitted in (key, start) order, so an older window of a later key
    came after newer windows of earlier keys."""
    r = _reducer(total, window_ms=10)
    _add(r, "a", 25)
    _add(r, "b", 5)
    _add(r, "a", 12)
    _add(r, "c", 15)
    _add(r, "z", 40)
    out = r.close_due()
    assert [(o.window[0], o.key) for o in out] == [(0, "b"), (10, "a"), (10, "c"), (20, "a")]
    with pytest.raises(LateRecordError):
        _add(r, "d", 15)


def test_open_offsets_low_watermark(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10)
    assert r.open_offsets() == {}
    _add(r, "k", 1, position=("in", 0, 100))
    _add(r, "j", 12, position=("in", 0, 101))
    _add(r, "k", 3, position=("in", 0, 102))  # still [0, 10): close_due has not run
    _add(r, "k", 13, position=("in", 1, 50))
    _add(r, "k", 14, position=("in", 1, 51))
    _add(r, "k", 15)  # no position: held, but not tied to an offset
    # Nothing at or after the oldest offset held by an open window may be committed.
    assert r.open_offsets() == {("in", 0): 100, ("in", 1): 50}
    r.close_due()  # [0, 10) closes: offsets 100 and 102 are done
    assert r.open_offsets() == {("in", 0): 101, ("in", 1): 50}
    _add(r, "k", 25, position=("in", 1, 52))
    r.close_due()  # [10, 20) closes
    assert r.open_offsets() == {("in", 1): 52}
    r.close_all()
    assert r.open_offsets() == {}


def test_close_all(total: RegisteredFunction) -> None:
    r = _reducer(total, window_ms=10, grace_ms=100)
    for key, ts in (("b", 35), ("a", 35), ("c", 5), ("a", 12)):
        _add(r, key, ts)
    assert r.close_due() == []
    out = r.close_all()
    assert [(o.window[0], o.key) for o in out] == [(0, "c"), (10, "a"), (30, "a"), (30, "b")]
    assert len(r) == 0 and r.close_all() == [] and r.close_due() == []


def test_reduce_output_header(total: RegisteredFunction) -> None:
    r = WindowedReducer(total, 60_000, params={"scale": 3})
    inputs = [_input(f"o{i}", b"v", (_map_step("parse"),), ts=1_000 + i) for i in range(3)]
    for i, h in enumerate(inputs):
        r.add("cust", h, i + 1, h.timestamp_ms)
    (out,) = r.close_all()
    assert out.value == 3 * (1 + 2 + 3)
    header = out.header(total, {"scale": 3}, b"18", CRC)
    assert header.data_id == "cust"
    assert header.lineage[0] == _map_step("parse")
    assert header.lineage[-1].inputs == InputDigest(
        3, merkle_root([_leaf(h.data_id, h.checksum) for h in inputs]), 0, 60_000
    )
    assert header.checksum == compute(CRC, b"18")


events = st.lists(
    st.one_of(
        st.tuples(st.sampled_from("abc"), st.integers(min_value=0, max_value=120)),
        st.just("close"),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=200)
@given(events, st.sampled_from([(10, 0), (10, 7), (25, 30)]))
def test_reducer_model(script, shape) -> None:
    """Against a model: every accepted record lands in exactly one emitted window, windows come out
    oldest first and at most once, and a record is late exactly when its window ended before the
    horizon of an earlier close."""
    window_ms, grace_ms = shape
    r = WindowedReducer(TOTAL, window_ms, grace_ms)
    accepted: dict[tuple[str, int], int] = {}
    closed_before = None
    emitted: list[tuple[int, str]] = []
    watermark = -1
    for n, event in enumerate(itertools.chain(script, ["close"])):
        if event == "close":
            for out in r.close_due():
                emitted.append((out.window[0], out.key))
                assert out.value == accepted.pop((out.key, out.window[0]))
                assert out.window[1] + grace_ms <= watermark
            horizon = watermark - grace_ms
            boundary = horizon - horizon % window_ms
            closed_before = boundary if closed_before is None else max(closed_before, boundary)
            continue
        key, ts = event
        start = ts - ts % window_ms
        if closed_before is not None and start < closed_before:
            with pytest.raises(LateRecordError):
                r.add(key, _input(key, b"v", ts=ts), n, ts)
            continue
        r.add(key, _input(key, b"v", ts=ts), n, ts)
        accepted[(key, start)] = accepted.get((key, start), 0) + n
        watermark = max(watermark, ts)
    assert emitted == sorted(emitted) and len(set(emitted)) == len(emitted)
    rest = {(o.key, o.window[0]): o.value for o in r.close_all()}
    assert rest == accepted


def test_root_of_a_leaf_list_equals_the_reference_and_the_accumulator() -> None:
    rng = random.Random(7)
    for n in [*range(0, 40), 63, 64, 65, 100, 127, 128, 129]:
        leaves = [rng.randbytes(rng.randrange(0, 9)) for _ in range(n)]
        acc = MerkleAccumulator()
        for leaf in leaves:
            acc.add(leaf)
        assert root_of(leaves) == merkle_root(leaves) == acc.root(), n


def test_root_with_replaced_leaves_equals_the_root_of_the_replaced_list() -> None:
    """`root_with` rehashes only the replaced leaves' paths; the result is the reference root of the
    list with those leaves replaced, for every tree shape (odd carries included) and any set of
    positions, and the levels are left as they were."""
    rng = random.Random(11)
    for n in [*range(1, 34), 63, 64, 65, 100, 129]:
        leaves = [rng.randbytes(rng.randrange(1, 9)) for _ in range(n)]
        levels = levels_of(leaves)
        before = [list(level) for level in levels]
        assert levels[-1] == [merkle_root(leaves)]
        for k in {0, 1, min(2, n), n // 2, n}:
            replaced = {i: rng.randbytes(5) for i in rng.sample(range(n), k)}
            expected = merkle_root([replaced.get(i, leaf) for i, leaf in enumerate(leaves)])
            assert root_with(levels, replaced) == expected, (n, sorted(replaced))
        assert levels == before
    assert root_with(levels_of([]), {}) == merkle_root([])
    with pytest.raises(StreamprovError, match="outside"):
        root_with(levels_of([b"a", b"b"]), {2: b"c"})
