"""Helpers for the ledger tests: deterministic keys, synthetic pipelines, small ledgers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.ledger import (
    Application,
    ApplicationKind,
    CheckpointSigner,
    CheckpointVerifier,
    Context,
    DataRef,
    LedgerChain,
    MemoryLedgerStore,
)

LEDGER = "test-ledger"
SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
CTX = Context("orders", "eu-west-1", ("pii",))


def signer(seed: bytes = SEED) -> CheckpointSigner:
    return CheckpointSigner(Ed25519PrivateKey.from_private_bytes(seed))


def verifier(seed: bytes = SEED) -> CheckpointVerifier:
    return CheckpointVerifier([signer(seed).public_key])


def node(data_id: str, content: str) -> DataRef:
    return DataRef.of(data_id, content.encode())


def map_app(
    fid: str, inp: DataRef, out: DataRef, *, version: str = "1", ts: int = 1_700_000_000_000, **params: object
) -> Application:
    return Application.create(
        ApplicationKind.MAP,
        fid,
        version,
        fid.encode().ljust(16, b"."),
        params,
        [inp],
        out,
        timestamp_ms=ts,
        device_id="pod-1",
        context=CTX,
    )


def reduce_app(fid: str, inputs: Sequence[DataRef], out: DataRef, *, version: str = "1") -> Application:
    return Application.create(
        ApplicationKind.REDUCE,
        fid,
        version,
        fid.encode().ljust(16, b"."),
        {},
        inputs,
        out,
        timestamp_ms=1_700_000_000_000,
        device_id="pod-2",
        context=CTX,
        window_start=0,
        window_end=60_000,
    )


def chain_apps(n: int, *, prefix: str = "d") -> list[Application]:
    """n independent one-step applications (source node -> map output)."""
    return [map_app("f", node(f"{prefix}{i}", "src"), node(f"{prefix}{i}", "out")) for i in range(n)]


def pipeline(groups: int, *, chain_len: int = 2, fan_in: int = 3) -> list[Application]:
    """`groups` x (fan_in sources, each through `chain_len` maps, then one reduce, then one map).

    The applications come in an order a pipeline could record them (each after its inputs exist).
    """
    apps: list[Application] = []
    for g in range(groups):
        tails = []
        for s in range(fan_in):
            data_id = f"g{g}-s{s}"
            prev = node(data_id, "v0")
            apps.append(Application.of_source(prev, timestamp_ms=1, device_id="src", context=CTX))
            for m in range(chain_len):
                out = node(data_id, f"m{m}")
                apps.append(map_app(f"map{m}", prev, out))
                prev = out
            tails.append(prev)
        total = node(f"g{g}", "sum")
        apps.append(reduce_app("sum", tails, total))
        apps.append(map_app("publish", total, node(f"g{g}", "published")))
    return apps


def build(
    apps: Iterable[Application],
    *,
    checkpoint_every: int = 5,
    final_checkpoint: bool = True,
    with_signer: bool = True,
) -> MemoryLedgerStore:
    store = MemoryLedgerStore()
    chain = LedgerChain(LEDGER, signer() if with_signer else None, checkpoint_every=checkpoint_every)
    for app in apps:
        store.write(chain.append(app))
    if final_checkpoint:
        cp = chain.checkpoint()
        if cp is not None:
            store.write([cp])
    return store


def store_of(raw: list[bytes]) -> MemoryLedgerStore:
    store = MemoryLedgerStore()
    store.raw = list(raw)
    return store
