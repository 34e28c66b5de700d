"""The writer's per-entry fast path (rows under templates, sealed straight into bytes) writes exactly
what the object path (`LedgerChain.append` + `encode_record`) writes, so verification and the index
cannot tell them apart; and LedgerWriter / ProcessLedgerWriter take rows end to end."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_support import LEDGER, SEED, signer, verifier

from streamprov.checksum import ChecksumAlgorithm
from streamprov.ledger import (
    ApplicationKind,
    Context,
    LedgerChain,
    LedgerEntry,
    LedgerIndex,
    LedgerWriteFailedError,
    LedgerWriter,
    MemoryLedgerStore,
    Origin,
    encode_record,
    verify_ledger,
)
from streamprov.ledger.codec import record_key
from streamprov.ledger.model import AppTemplate, Row, application_of
from streamprov.ledger.process_writer import ProcessLedgerWriter
from streamprov.ledger.rows import RowSealer

TEMPLATES = [
    AppTemplate(
        ApplicationKind.MAP, "f", "1", b"c" * 16, (("k", "1"),), "pod-1", Context("s", "l", ("a", "b"))
    ),
    AppTemplate(ApplicationKind.REDUCE, "sum", "2", b"r" * 16, (), "pod-é", Context()),
    AppTemplate(
        ApplicationKind.MAP,
        "g",
        "9",
        b"",
        (("b", '"x"'), ("a", "[1]")),
        "",
        Context(),
        Origin.RECOMPUTE,
        "t-1",
    ),
    AppTemplate(ApplicationKind.SOURCE, "", "", b"", (), "det", Context("src")),
]

refs = st.tuples(
    st.text(min_size=0, max_size=80),
    st.sampled_from([0, 1]),
    st.binary(min_size=4, max_size=32),
)
rows = st.tuples(
    st.integers(0, len(TEMPLATES) - 1),
    st.lists(refs, max_size=6).map(tuple),
    refs,
    st.integers(-(2**40), 2**42),
    st.none() | st.integers(-(2**40), 2**40),
    st.none() | st.integers(-(2**40), 2**40),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_rows_seal_to_the_same_bytes_as_objects(batch: list[Row]) -> None:
    by_objects = LedgerChain(LEDGER, signer(), checkpoint_every=7)
    by_rows = LedgerChain(LEDGER, signer(), checkpoint_every=7, clock=by_objects._clock)
    fixed = 1_700_000_000_000
    by_objects._clock = by_rows._clock = lambda: fixed  # checkpoints carry the time: the same for both
    sealer = RowSealer(by_rows)
    for row in [*batch, *batch[:3]]:  # and a few replays: both drop them
        expected = [
            (record_key(r), encode_record(r))
            for r in by_objects.append(application_of(TEMPLATES[row[0]], row))
        ]
        got: list[tuple[bytes, bytes]] = []
        sealer.seal(TEMPLATES[row[0]], row, got)
        assert got == expected
    assert by_rows.state.tree.root() == by_objects.state.tree.root()


def _row(i: int, key: int = 0) -> Row:
    return (
        key,
        ((f"d{i}", 0, i.to_bytes(4, "big")),),
        (f"d{i}", 1, bytes(32)),
        1_700_000_000_000 + i,
        None,
        None,
    )


def test_writer_takes_rows_and_the_ledger_verifies(tmp_path: Path) -> None:
    store = MemoryLedgerStore()
    with LedgerWriter(store, LEDGER, signer(), checkpoint_every=50) as w:
        key = w.template(TEMPLATES[0])
        assert w.template(TEMPLATES[0]) == key
        w.append_rows([_row(i, key) for i in range(120)])
        w.append_rows([_row(i, key) for i in range(10)])  # replays
        w.flush()
        assert (w.stats.entries, w.stats.duplicates, w.stats.checkpoints) == (120, 10, 2)
    report = verify_ledger(store.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == 120, report.describe()
    with LedgerIndex(tmp_path / "idx", LEDGER, verifier=verifier()) as idx:
        idx.catch_up(store)
        assert len(idx.applications_of("f", "1")) == 120


class _ObjectsOnly:
    """A sink without write_encoded: the writer falls back to objects."""

    def __init__(self) -> None:
        self.inner = MemoryLedgerStore()

    def __getattr__(self, name: str) -> object:
        if name == "write_encoded":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_rows_through_a_sink_that_takes_objects() -> None:
    sink = _ObjectsOnly()
    with LedgerWriter(sink, LEDGER, None) as w:  # type: ignore[arg-type]
        w.append_rows([_row(i, w.template(TEMPLATES[1])) for i in range(5)])
    assert sum(isinstance(r.record, LedgerEntry) for r in sink.inner.read()) == 5


def _memory_sink(path: str) -> MemoryLedgerStore:
    return _FileStore(path)


class _FileStore(MemoryLedgerStore):
    """A memory store that also dumps its records to a file on close (to read them in the parent)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def close(self) -> None:
        Path(self.path).write_bytes(b"".join(len(r).to_bytes(4, "big") + r for r in self.raw))


def _read_back(path: Path) -> MemoryLedgerStore:
    store = MemoryLedgerStore()
    data = path.read_bytes()
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        store.raw.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return store


def test_process_writer_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "ledger.bin"
    w = ProcessLedgerWriter(functools.partial(_memory_sink, str(out)), LEDGER, SEED, checkpoint_every=40)
    with w:
        key = w.template(TEMPLATES[0])
        for k in range(0, 100, 25):
            w.append_rows([_row(i, key) for i in range(k, k + 25)])
            w.flush(10)
        w.append_rows([_row(i, key) for i in range(5)])  # replays
        w.append(application_of(TEMPLATES[1], _row(1000, 1)))
        w.flush(10)
        assert (w.stats.entries, w.stats.duplicates) == (101, 5)
    store = _read_back(out)
    report = verify_ledger(store.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == 101 and report.checkpoints == 3, report.describe()
    with pytest.raises(Exception, match="closed"):
        w.append_rows([_row(1, key)])


def _failing_sink() -> MemoryLedgerStore:
    raise RuntimeError("no storage here")


def test_process_writer_reports_a_child_that_cannot_start() -> None:
    with pytest.raises(LedgerWriteFailedError, match="no storage here"):
        ProcessLedgerWriter(_failing_sink, LEDGER, None).start()


def test_process_writer_fails_flushes_when_the_child_dies(tmp_path: Path) -> None:
    w = ProcessLedgerWriter(functools.partial(_memory_sink, str(tmp_path / "x")), LEDGER, None).start()
    try:
        key = w.template(TEMPLATES[0])
        w.append_rows([_row(1, key)])
        w.flush(10)
        assert w._process is not None
        w._process.kill()
        w._process.wait(5)
        with pytest.raises(LedgerWriteFailedError):
            for _ in range(50):  # the pipe breaks, or the reader sees the child gone: either fails
                w.append_rows([_row(random.randrange(10**6), key)])
                w.flush(5)
    finally:
        with pytest.raises(LedgerWriteFailedError):
            w.close(5)
    assert ChecksumAlgorithm(1) is ChecksumAlgorithm.SHA256


def test_process_writer_fails_the_flush_after_a_refused_append(tmp_path: Path) -> None:
    w = ProcessLedgerWriter(
        functools.partial(_memory_sink, str(tmp_path / "y")), LEDGER, None, max_entry_bytes=2000, nice=5
    )
    with w:
        huge = TEMPLATES[0]._replace(parameters=(("blob", "x" * 5000),))
        key = w.template(huge)  # refused in the child: too large for max_entry_bytes
        w.append_rows([_row(1, key)])
        with pytest.raises(LedgerWriteFailedError):
            w.flush(10)
        ok = w.template(TEMPLATES[0])
        w.append_rows([_row(2, ok)])
        w.flush(10)  # the error was reported once; the writer goes on
        assert w.stats.entries == 1


@settings(max_examples=80, deadline=None)
@given(
    st.text(min_size=0, max_size=90),
    st.sampled_from(list(ChecksumAlgorithm)),
    st.sampled_from(list(ChecksumAlgorithm)),
    st.binary(max_size=40),
    st.booleans(),
)
def test_map_rows_cut_from_headers_seal_like_expanded_rows(
    data_id: str, in_alg: ChecksumAlgorithm, out_alg: ChecksumAlgorithm, value: bytes, with_header: bool
) -> None:
    from streamprov.checksum import compute  # noqa: PLC0415
    from streamprov.header import HEADER_KEY  # noqa: PLC0415
    from streamprov.ledger.rows import expand  # noqa: PLC0415
    from streamprov.lineage import StepKind  # noqa: PLC0415
    from streamprov.registry import FunctionRegistry  # noqa: PLC0415
    from streamprov.stamp import InputRecord, MapStamper, SourceStamper  # noqa: PLC0415

    fn = FunctionRegistry().add(lambda v: v, "id", "1", kind=StepKind.MAP)
    source = SourceStamper(in_alg).header(data_id, value) if with_header else None
    record = InputRecord(value, [(HEADER_KEY, source)] if source else [], data_id.encode() or b"k", "t", 0, 7)
    out_header = MapStamper(fn, None, out_alg).stamp(record, value + b"!")
    c = compute(out_alg, value)
    row = (0, source, None if source else (int(c.algorithm), c.value), out_header)
    template = TEMPLATES[0]
    fast: list[tuple[bytes, bytes]] = []
    general: list[tuple[bytes, bytes]] = []
    RowSealer(LedgerChain(LEDGER, None)).seal(template, row, fast)  # type: ignore[arg-type]
    RowSealer(LedgerChain(LEDGER, None)).seal(template, expand(row), general)  # type: ignore[arg-type]
    assert fast == general
