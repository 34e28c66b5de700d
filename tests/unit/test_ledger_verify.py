"""`verify_ledger` on a clean ledger and on every kind of tampering, naming the first bad entry.

The ledger under test: 30 entries, a checkpoint after every 10, so entry `seq` is stored at offset
seq + seq // 10 and checkpoint n at offset 11 n + 10. Tampering works on the stored bytes, as an
attacker with write access to the topic would (rewriting records, deleting, inserting, reordering).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_support import LEDGER, OTHER_SEED, build, chain_apps, map_app, node, signer, store_of, verifier

from streamprov.ledger import (
    Checkpoint,
    CheckpointVerifier,
    LedgerChain,
    LedgerEntry,
    ProblemKind,
    VerifyReport,
    decode_record,
    encode_record,
    seal,
    verify_ledger,
)

N = 30
EVERY = 10
CLEAN = build(chain_apps(N), checkpoint_every=EVERY).raw


def at(seq: int) -> int:
    return seq + seq // EVERY


def cp_at(number: int) -> int:
    return 11 * number + 10


def entry(raw: list[bytes], seq: int) -> LedgerEntry:
    rec = decode_record(raw[at(seq)])
    assert isinstance(rec, LedgerEntry) and rec.seq == seq
    return rec


def check(raw: list[bytes], **kwargs: object) -> VerifyReport:
    return verify_ledger(store_of(raw).read(), LEDGER, verifier(), **kwargs)  # type: ignore[arg-type]


def assert_problem(
    report: VerifyReport, kind: ProblemKind, seq: int | None, offset: int | None = None
) -> None:
    assert report.problem is not None, report.describe()
    assert (report.problem.kind, report.problem.seq) == (kind, seq), report.describe()
    if offset is not None:
        assert report.problem.offset == offset, report.describe()


def test_a_clean_ledger_verifies() -> None:
    report = check(list(CLEAN), require_signed=True)
    assert report.ok and report.entries == N and report.checkpoints == 3 and report.unsigned_tail == 0
    assert report.signatures_checked and "OK, 30 entries, 3 checkpoints" in report.describe()
    assert check([]).ok


def test_without_keys_signatures_are_not_checked_and_the_report_says_so() -> None:
    report = verify_ledger(store_of(list(CLEAN)).read(), LEDGER, None)
    assert report.ok and not report.signatures_checked and "NOT checked" in report.describe()


def test_the_wrong_ledger_id_fails_at_the_first_entry() -> None:
    report = verify_ledger(store_of(list(CLEAN)).read(), "another", verifier())
    assert_problem(report, ProblemKind.MODIFIED, 0, 0)


# -- modification --------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [0, 7, 9, 10, 29])
def test_modified_content_is_named(seq: int) -> None:
    raw = list(CLEAN)
    e = entry(raw, seq)
    forged_app = dataclasses.replace(e.application, output=node("evil", "content"))
    raw[at(seq)] = encode_record(dataclasses.replace(e, application=forged_app))
    report = check(raw)
    assert_problem(report, ProblemKind.MODIFIED, seq, at(seq))
    assert report.entries == seq and "FAILED" in report.describe()


def test_a_modified_timestamp_is_caught_by_the_entry_hash() -> None:
    raw = list(CLEAN)
    e = entry(raw, 12)
    raw[at(12)] = encode_record(
        dataclasses.replace(e, application=dataclasses.replace(e.application, timestamp_ms=0))
    )
    report = check(raw)
    assert_problem(report, ProblemKind.MODIFIED, 12, at(12))
    assert report.problem is not None and "entry_hash" in report.problem.detail


@pytest.mark.parametrize("seq", [0, 14, 9, 29])  # 9 and 29 end a checkpoint: it names them
def test_modified_and_rehashed_entry_is_named_by_its_successor_or_checkpoint(seq: int) -> None:
    raw = list(CLEAN)
    e = entry(raw, seq)
    forged = seal(dataclasses.replace(e.application, output=node("evil", "x")), seq, e.prev_hash)
    raw[at(seq)] = encode_record(forged)
    assert_problem(check(raw), ProblemKind.MODIFIED, seq, at(seq))


def test_a_record_that_no_longer_decodes_is_modified() -> None:
    raw = list(CLEAN)
    raw[at(5)] = raw[at(5)][:-3]
    assert_problem(check(raw), ProblemKind.MODIFIED, 5, at(5))


def test_rewritten_and_rechained_entries_fail_the_signed_checkpoint() -> None:
    """The attacker changes seq 13 and re-chains every later entry, keeping the signed checkpoints."""
    raw = list(CLEAN)
    entries = [entry(raw, s) for s in range(N)]
    prev = entries[12].entry_hash
    for s in range(13, N):
        app = entries[s].application
        if s == 13:
            app = dataclasses.replace(app, output=node("evil", "x"))
        forged = seal(app, s, prev)
        raw[at(s)] = encode_record(forged)
        prev = forged.entry_hash
    report = check(raw)
    assert report.problem is not None and report.problem.kind is ProblemKind.REWRITTEN
    assert report.problem.checkpoint == 1 and report.problem.offset == cp_at(1)
    assert report.problem.seq is not None and 10 <= report.problem.seq <= 13
    # checkpoint 0 vouches for 0..9 and the frontier of checkpoint 1 (16 + 4 entries) for 16..19
    assert "seq 10..15" in report.problem.detail


def test_a_rechained_tail_without_checkpoints_needs_require_signed_or_a_trusted_checkpoint() -> None:
    raw = list(CLEAN[: cp_at(1) + 1])  # entries 0..19 and checkpoints 0, 1
    entries = [entry(raw, s) for s in range(20)]
    prev = entries[14].entry_hash
    for s in range(15, 20):
        forged = seal(dataclasses.replace(entries[s].application, device_id="evil"), s, prev)
        raw[at(s)] = encode_record(forged)
        prev = forged.entry_hash
    del raw[cp_at(1)]  # drop the checkpoint that would expose it
    assert check(raw).ok and check(raw).unsigned_tail == 10
    assert_problem(check(raw, require_signed=True), ProblemKind.UNSIGNED, 10)
    trusted = decode_record(CLEAN[cp_at(1)])
    assert isinstance(trusted, Checkpoint)
    report = check(raw, trusted=[trusted])
    assert report.problem is not None and report.problem.kind is ProblemKind.REWRITTEN


# -- deletion ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [0, 1, 13, 21, 28])
def test_deleted_entry_is_named(seq: int) -> None:
    raw = list(CLEAN)
    del raw[at(seq)]
    report = check(raw)
    assert_problem(report, ProblemKind.DELETED, seq, at(seq))
    assert report.entries == seq


def test_several_deleted_entries_are_named_as_a_range() -> None:
    raw = list(CLEAN)
    del raw[at(3) : at(6)]
    report = check(raw)
    assert_problem(report, ProblemKind.DELETED, 3)
    assert report.problem is not None and "seq 3..5 missing" in report.problem.detail


def test_deleting_the_entry_before_a_checkpoint_is_named_by_the_checkpoint() -> None:
    raw = list(CLEAN)
    del raw[at(19)]
    report = check(raw)
    assert_problem(report, ProblemKind.DELETED, 19)
    assert report.problem is not None and report.problem.checkpoint == 1


def test_a_deleted_checkpoint_is_named() -> None:
    raw = list(CLEAN)
    del raw[cp_at(1)]
    report = check(raw)
    assert report.problem is not None and report.problem.kind is ProblemKind.DELETED
    assert report.problem.checkpoint == 1


def test_a_cut_tail_is_caught_by_a_trusted_checkpoint() -> None:
    raw = list(CLEAN[: at(25)])  # entries 0..24 and checkpoints 0, 1: looks like a ledger in progress
    assert check(raw).ok
    trusted = decode_record(CLEAN[cp_at(2)])
    assert isinstance(trusted, Checkpoint)
    assert_problem(check(raw, trusted=[trusted]), ProblemKind.TRUNCATED, 25)


# -- insertion -----------------------------------------------------------------------------------
def test_an_inserted_forged_entry_is_named() -> None:
    raw = list(CLEAN)
    before = entry(raw, 16)
    forged = seal(map_app("f", node("evil", "in"), node("evil", "out")), 17, before.entry_hash)
    raw.insert(at(17), encode_record(forged))  # well formed for seq 17, and the real 17 follows
    report = check(raw)
    assert_problem(report, ProblemKind.INSERTED, 17, at(17))
    assert report.problem is not None and "inserted" in report.problem.detail


def test_an_inserted_entry_with_a_bad_link_is_named() -> None:
    raw = list(CLEAN)
    forged = seal(map_app("f", node("evil", "in"), node("evil", "out")), 4, b"\x00" * 32)
    raw.insert(at(4), encode_record(forged))
    assert_problem(check(raw), ProblemKind.INSERTED, 4, at(4))


@pytest.mark.parametrize("copied", [2, 22])
def test_an_inserted_copy_of_another_entry_is_named(copied: int) -> None:
    raw = list(CLEAN)
    raw.insert(at(15), raw[at(copied)])
    assert_problem(check(raw), ProblemKind.INSERTED, 15, at(15))


def test_inserted_garbage_is_named() -> None:
    raw = list(CLEAN)
    raw.insert(at(8), b"\xc3\x01 not a ledger record")
    assert_problem(check(raw), ProblemKind.INSERTED, 8, at(8))


def test_an_inserted_entry_of_another_ledger_is_named() -> None:
    other = build(chain_apps(3, prefix="x"), checkpoint_every=100).raw
    raw = list(CLEAN)
    raw.insert(at(1), other[1])
    assert_problem(check(raw), ProblemKind.INSERTED, 1, at(1))


def test_an_inserted_checkpoint_of_another_ledger_is_named() -> None:
    foreign = LedgerChain("another", signer(), checkpoint_every=2)
    records = [r for app in chain_apps(2) for r in foreign.append(app)]
    cp = records[-1]
    assert isinstance(cp, Checkpoint)
    raw = list(CLEAN)
    raw.insert(at(5), encode_record(cp))
    report = check(raw)
    assert report.problem is not None and report.problem.kind is ProblemKind.INSERTED
    assert report.problem.offset == at(5)


def test_an_appended_entry_is_unsigned_until_a_checkpoint_covers_it() -> None:
    raw = list(CLEAN)
    last = entry(raw, N - 1)
    raw.append(encode_record(seal(map_app("f", node("evil", "a"), node("evil", "b")), N, last.entry_hash)))
    assert check(raw).ok and check(raw).unsigned_tail == 1
    assert_problem(check(raw, require_signed=True), ProblemKind.UNSIGNED, N)


# -- reordering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [0, 4, 11, 27])
def test_swapped_neighbours_are_named(seq: int) -> None:
    raw = list(CLEAN)
    raw[at(seq)], raw[at(seq + 1)] = raw[at(seq + 1)], raw[at(seq)]
    report = check(raw)
    assert_problem(report, ProblemKind.REORDERED, seq)
    assert report.entries == seq


@pytest.mark.parametrize(("seq", "to"), [(3, 7), (7, 3)])
def test_an_entry_moved_further_is_named(seq: int, to: int) -> None:
    raw = list(CLEAN)
    moved = raw.pop(at(seq))
    raw.insert(at(to), moved)
    assert_problem(check(raw), ProblemKind.REORDERED, min(seq, to))


def test_a_moved_checkpoint_is_named() -> None:
    raw = list(CLEAN)
    raw[cp_at(0)], raw[cp_at(0) - 1] = raw[cp_at(0) - 1], raw[cp_at(0)]
    report = check(raw)
    assert_problem(report, ProblemKind.REORDERED, 9)
    assert report.problem is not None and report.problem.checkpoint == 0
    raw = list(CLEAN)
    raw[cp_at(0)], raw[cp_at(0) + 1] = raw[cp_at(0) + 1], raw[cp_at(0)]
    assert_problem(check(raw), ProblemKind.REORDERED, 10)


# -- signatures ----------------------------------------------------------------------------------
def test_a_flipped_signature_byte_is_a_bad_signature() -> None:
    raw = list(CLEAN)
    rec = bytearray(raw[cp_at(1)])
    rec[-5] ^= 0x01
    raw[cp_at(1)] = bytes(rec)
    report = check(raw)
    assert_problem(report, ProblemKind.BAD_SIGNATURE, 19, cp_at(1))
    assert report.problem is not None and report.problem.checkpoint == 1


@pytest.mark.parametrize("field", ["root_hash", "tree_size", "number", "ledger_id", "timestamp_ms"])
def test_a_changed_checkpoint_field_breaks_its_signature(field: str) -> None:
    raw = list(CLEAN)
    cp = decode_record(raw[cp_at(2)])
    assert isinstance(cp, Checkpoint)
    value: object = {"root_hash": b"\x01" * 32, "ledger_id": "x"}.get(field, 1)
    raw[cp_at(2)] = encode_record(dataclasses.replace(cp, **{field: value}))
    report = check(raw)
    if field == "tree_size":  # its frontier no longer fits the size: the record does not decode
        assert_problem(report, ProblemKind.MODIFIED, None, cp_at(2))
        assert report.problem is not None and report.problem.checkpoint == 2
    else:
        assert_problem(report, ProblemKind.BAD_SIGNATURE, 29, cp_at(2))


def test_a_checkpoint_signed_by_an_untrusted_key_is_a_bad_signature() -> None:
    raw = list(CLEAN)
    cp = decode_record(raw[cp_at(0)])
    assert isinstance(cp, Checkpoint)
    resigned = signer(OTHER_SEED).sign(
        cp.ledger_id, cp.number, cp.tree_size, cp.root_hash, cp.head_hash, cp.frontier, cp.timestamp_ms
    )
    raw[cp_at(0)] = encode_record(resigned)
    report = check(raw)
    assert_problem(report, ProblemKind.BAD_SIGNATURE, 9, cp_at(0))
    assert report.problem is not None and "not a trusted key" in report.problem.detail
    both = CheckpointVerifier([signer().public_key, signer(OTHER_SEED).public_key])
    assert verify_ledger(store_of(raw).read(), LEDGER, both).ok  # a rotated key, once trusted


# -- any single tampering, anywhere --------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["modify", "rehash", "delete", "swap", "insert-copy", "insert-forged"]),
    st.integers(1, N - 2),
)
def test_any_single_tampering_is_found_at_the_right_entry(op: str, seq: int) -> None:
    raw = list(CLEAN)
    e = entry(raw, seq)
    expected = {
        "modify": ProblemKind.MODIFIED,
        "rehash": ProblemKind.MODIFIED,
        "delete": ProblemKind.DELETED,
        "swap": ProblemKind.REORDERED,
        "insert-copy": ProblemKind.INSERTED,
        "insert-forged": ProblemKind.INSERTED,
    }[op]
    if op == "modify":
        raw[at(seq)] = encode_record(
            dataclasses.replace(e, application=dataclasses.replace(e.application, device_id="x"))
        )
    elif op == "rehash":
        raw[at(seq)] = encode_record(
            seal(dataclasses.replace(e.application, device_id="x"), seq, e.prev_hash)
        )
    elif op == "delete":
        del raw[at(seq)]
    elif op == "swap":
        raw[at(seq)], raw[at(seq + 1)] = raw[at(seq + 1)], raw[at(seq)]
    elif op == "insert-copy":
        raw.insert(at(seq), raw[at(seq - 1)])
    else:
        raw.insert(
            at(seq), encode_record(seal(map_app("g", node("z", "1"), node("z", "2")), seq, e.prev_hash))
        )
    assert_problem(check(raw), expected, seq)
