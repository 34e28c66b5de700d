"""Ledger query cost against ledger size: a 10-application downstream query on 10k vs 1M entries.

Claim under test: a graph query over the ledger index costs in proportion to its answer, not to the
ledger. Two indexes are built in one run from the same synthetic pipeline, one small (10k entries)
and one large (1M by default), then the same shape of query is timed on both:

  pipeline   groups of 4 sources; each source goes through 7 maps; the 4 tails are reduced; the
             reduce output goes through 2 more maps. 35 entries per group (4 SOURCE + 28 MAP +
             1 REDUCE + 2 MAP), groups independent of each other.
  query      LedgerIndex.downstream(source node of a random group): its 7 maps, the reduce and the
             2 maps after it: 10 applications, in dependency order (checked on every query).
  also       LedgerIndex.upstream(final output of a random group): 35 applications.

Entries go through the real LedgerChain (sequencing, hash chain, Ed25519 checkpoints every 10k) and
LedgerIndex.apply (RocksDB WriteBatch of 10k records, chain re-checked, entry hashes not re-derived
by default; --verify-hashes re-derives them too), then compacted as `LedgerIndex.catch_up` does
after a bulk load (included in the build time). Each index is closed and reopened before querying,
so its block cache starts cold; queries on the two sizes are interleaved in rounds (ABAB...) and each
size is summarised by the median over all its queries. The last line is
`query_scaling_ratio=<median 1M / median 10k>`: close to 1 means the cost follows the answer.

Usage: python bench/bench_ledger_queries.py [--entries N] [--small N] [--rounds R] [--queries Q]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.ledger import (
    Application,
    ApplicationKind,
    CheckpointSigner,
    Context,
    DataRef,
    LedgerChain,
    LedgerIndex,
    StoredRecord,
)

LEDGER = "bench-ledger"
FAN_IN = 4
MAPS = 7
POST = 2
PER_GROUP = FAN_IN * (1 + MAPS) + 1 + POST  # 35
ANSWER = MAPS + 1 + POST  # 10
CTX = Context("bench-source", "bench-site", ("internal",))
_SHA = ChecksumAlgorithm.SHA256


def _ref(data_id: str, version: int) -> DataRef:
    # a deterministic, distinct 4-byte "checksum" per (data_id, version): no hashing per entry
    return DataRef(data_id, Checksum(ChecksumAlgorithm.CRC32C, version.to_bytes(4, "big")))


_CODE = {f"m{i}": f"m{i}".encode().ljust(16, b".") for i in range(MAPS)}
_CODE.update({"sum": b"sum".ljust(16, b"."), "p0": b"p0".ljust(16, b"."), "p1": b"p1".ljust(16, b".")})
_PARAMS = (("factor", "2"),)


def _apply(
    kind: ApplicationKind, fid: str, inputs: tuple[DataRef, ...], out: DataRef, ts: int
) -> Application:
    return Application(kind, fid, "1", _CODE[fid], _PARAMS, inputs, out, ts, "bench-pod", CTX)


def group_apps(g: int) -> Iterator[Application]:
    """The 35 applications of group g, in an order a pipeline could record them."""
    ts = 1_700_000_000_000 + g
    tails = []
    for s in range(FAN_IN):
        data_id = f"g{g}-s{s}"
        prev = _ref(data_id, 0)
        yield Application.of_source(prev, timestamp_ms=ts, device_id="bench-src", context=CTX)
        for m in range(MAPS):
            out = _ref(data_id, m + 1)
            yield _apply(ApplicationKind.MAP, f"m{m}", (prev,), out, ts)
            prev = out
        tails.append(prev)
    total = _ref(f"g{g}", 0)
    yield _apply(ApplicationKind.REDUCE, "sum", tuple(tails), total, ts)
    for p in range(POST):
        out = _ref(f"g{g}", p + 1)
        yield _apply(ApplicationKind.MAP, f"p{p}", (total,), out, ts)
        total = out


def build(path: Path, entries: int, verify_hashes: bool) -> tuple[int, float]:
    """Build an index of about `entries` entries; returns (groups, seconds)."""
    groups = max(1, entries // PER_GROUP)
    signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    chain = LedgerChain(LEDGER, signer, checkpoint_every=10_000, dedup_window=1_000)
    started = time.perf_counter()
    offset = 0
    with LedgerIndex(path, LEDGER, verify_hashes=verify_hashes) as index:
        batch: list[StoredRecord] = []
        for g in range(groups):
            for app in group_apps(g):
                for record in chain.append(app):
                    batch.append(StoredRecord(offset, record))
                    offset += 1
            if len(batch) >= 10_000:
                index.apply(batch, batch_size=20_000)
                batch = []
        final = chain.checkpoint()
        if final is not None:
            batch.append(StoredRecord(offset, final))
        index.apply(batch, batch_size=20_000)
        assert index.size == groups * PER_GROUP
        index.compact()  # as LedgerIndex.catch_up does after a bulk load
    return groups, time.perf_counter() - started


def timed_queries(
    index: LedgerIndex, groups: int, rng: random.Random, n: int
) -> tuple[list[float], list[float]]:
    down_times, up_times = [], []
    for _ in range(n):
        g = rng.randrange(groups)
        source = _ref(f"g{g}-s{rng.randrange(FAN_IN)}", 0)
        t = time.perf_counter()
        down = index.downstream(source)
        down_times.append(time.perf_counter() - t)
        assert len(down.applications) == ANSWER and not down.truncated, len(down.applications)
        assert down.applications[-1].entry.application.output == _ref(f"g{g}", POST)
        final = _ref(f"g{g}", POST)
        t = time.perf_counter()
        up = index.upstream(final)
        up_times.append(time.perf_counter() - t)
        assert len(up.applications) == PER_GROUP
    return down_times, up_times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries in the large index")
    parser.add_argument("--small", type=int, default=10_000, help="entries in the small index")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=100, help="queries per size per round")
    parser.add_argument("--verify-hashes", action="store_true", help="re-derive entry hashes while indexing")
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the indexes")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="sp-bench-ledger-", dir=args.dir))
    try:
        sizes = {"small": args.small, "large": args.entries}
        groups: dict[str, int] = {}
        for name, entries in sizes.items():
            groups[name], seconds = build(root / name, entries, args.verify_hashes)
            n = groups[name] * PER_GROUP
            print(f"build {name}: {n} entries in {seconds:.1f}s ({n / seconds:,.0f} entries/s)", flush=True)
            sizes[name] = n

        indexes = {name: LedgerIndex(root / name, LEDGER) for name in sizes}  # reopened: cold caches
        rng = random.Random(42)
        down: dict[str, list[float]] = {name: [] for name in sizes}
        up: dict[str, list[float]] = {name: [] for name in sizes}
        try:
            for r in range(args.rounds):
                order = list(sizes) if r % 2 == 0 else list(reversed(sizes))
                for name in order:
                    d, u = timed_queries(indexes[name], groups[name], rng, args.queries)
                    down[name] += d
                    up[name] += u
        finally:
            for index in indexes.values():
                index.close()

        def ms(values: list[float]) -> str:
            values = sorted(values)
            p90 = values[int(len(values) * 0.9)]
            return f"median {statistics.median(values) * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms"

        for name, n in sizes.items():
            print(f"{name} ({n} entries): downstream ({ANSWER} applications) {ms(down[name])}")
            print(f"{name} ({n} entries): upstream ({PER_GROUP} applications) {ms(up[name])}")
        up_ratio = statistics.median(up["large"]) / statistics.median(up["small"])
        ratio = statistics.median(down["large"]) / statistics.median(down["small"])
        print(f"ledger_size_ratio={sizes['large'] / sizes['small']:.1f}")
        print(f"upstream_scaling_ratio={up_ratio:.3f}")
        print(f"query_scaling_ratio={ratio:.3f}")
    finally:
        if args.keep:
            print(f"indexes kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
