"""`streamprov ledger ...` on dump files: verify's exit codes and messages, index, queries, keygen."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_support import LEDGER, OTHER_SEED, build, pipeline, signer, store_of
from typer.testing import CliRunner

from streamprov.ledger import LedgerEntry, StoredRecord
from streamprov.ledger.cli import (
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_TAMPERED,
    ledger_app,
    read_dump,
    write_dump,
)
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.signing import public_key_pem

runner = CliRunner()
STORE = build(pipeline(3), checkpoint_every=6)


def files(tmp_path: Path, raw: list[bytes] | None = None) -> tuple[Path, Path]:
    store = STORE if raw is None else store_of(raw)
    dump = tmp_path / "ledger.dump"
    write_dump(dump, store.read())
    key = tmp_path / "ledger.pub"
    key.write_bytes(public_key_pem(signer().public_key))
    return dump, key


def verify(*args: str) -> tuple[int, str]:
    result = runner.invoke(ledger_app, ["verify", "--ledger-id", LEDGER, *args])
    return result.exit_code, result.output


def test_dump_round_trips_every_record(tmp_path: Path) -> None:
    dump, _ = files(tmp_path)
    assert [r.record for r in read_dump(dump)] == [r.record for r in STORE.read()]


def test_verify_a_clean_dump(tmp_path: Path) -> None:
    dump, key = files(tmp_path)
    code, out = verify("--dump", str(dump), "--public-key", str(key), "--require-signed")
    assert code == 0 and "OK, 33 entries" in out
    raw_hex = signer().public_key.public_bytes_raw().hex()
    assert verify("--dump", str(dump), "-k", raw_hex)[0] == 0


def test_verify_names_the_first_bad_entry_and_exits_1(tmp_path: Path) -> None:
    raw = list(STORE.raw)
    del raw[4]
    dump, key = files(tmp_path, raw)
    code, out = verify("--dump", str(dump), "--public-key", str(key))
    assert code == EXIT_TAMPERED
    assert "DELETED at seq 4, offset 4" in out


def test_verify_with_the_wrong_key_is_a_bad_signature(tmp_path: Path) -> None:
    dump, _ = files(tmp_path)
    code, out = verify("--dump", str(dump), "-k", signer(OTHER_SEED).public_key.public_bytes_raw().hex())
    assert code == EXIT_TAMPERED and "BAD SIGNATURE" in out


def test_verify_needs_a_key_and_a_ledger(tmp_path: Path) -> None:
    dump, _ = files(tmp_path)
    code, out = verify("--dump", str(dump))
    assert code == EXIT_ERROR and "no public key" in out
    assert verify("--dump", str(dump), "--no-signatures")[0] == 0
    assert verify("--dump", str(tmp_path / "missing"), "--no-signatures")[0] == EXIT_ERROR
    assert verify("--no-signatures")[0] == EXIT_ERROR
    assert verify("--dump", str(dump), "-k", "not-a-key")[0] == EXIT_ERROR


def test_truncated_dump_is_reported(tmp_path: Path) -> None:
    dump, key = files(tmp_path)
    dump.write_bytes(dump.read_bytes()[:-7])
    code, out = verify("--dump", str(dump), "-k", str(key))
    assert code == EXIT_TAMPERED and "no longer decodes" in out


def test_index_queries_and_trusted_checkpoints(tmp_path: Path) -> None:
    dump, key = files(tmp_path)
    idx = str(tmp_path / "idx")
    result = runner.invoke(ledger_app, ["index", "-i", idx, "--dump", str(dump), "--ledger-id", LEDGER])
    assert result.exit_code == 0 and "33 entries" in result.output
    again = runner.invoke(ledger_app, ["index", "-i", idx, "--dump", str(dump), "--ledger-id", LEDGER])
    assert "0 records applied" in again.output

    down = runner.invoke(ledger_app, ["downstream", "g1-s0", "-i", idx, "--ledger-id", LEDGER])
    functions = [line.split()[4].split("@")[0] for line in down.output.splitlines()]
    assert down.exit_code == 0 and functions == ["map0", "map1", "sum", "publish"]

    last = [r.record for r in STORE.read() if isinstance(r.record, LedgerEntry)][-1]
    target = last.application.output.describe()
    up = runner.invoke(ledger_app, ["upstream", target, "-i", idx, "--ledger-id", LEDGER, "--json"])
    lines = [json.loads(line) for line in up.output.splitlines()]
    assert up.exit_code == 0 and len(lines) == 11 and lines[-1]["seq"] == last.seq

    cp = runner.invoke(ledger_app, ["checkpoint", "-i", idx, "--ledger-id", LEDGER])
    trusted = tmp_path / "cp.json"
    trusted.write_text(cp.output)
    assert verify("--dump", str(dump), "-k", str(key), "--trusted", str(trusted))[0] == 0
    (tmp_path / "short").mkdir()
    short, _ = files(tmp_path / "short", STORE.raw[:20])
    code, out = verify("--dump", str(short), "-k", str(key), "--trusted", str(trusted))
    assert code == EXIT_TAMPERED and "TRUNCATED" in out


def test_keygen_writes_a_private_and_a_public_key(tmp_path: Path) -> None:
    out = tmp_path / "ledger.pem"
    result = runner.invoke(ledger_app, ["keygen", str(out)])
    assert result.exit_code == 0 and out.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ledger.pem.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert runner.invoke(ledger_app, ["keygen", str(out)]).exit_code == EXIT_ERROR


def test_garbage_records_in_a_dump_are_named(tmp_path: Path) -> None:
    raw = list(STORE.raw)
    raw.insert(3, b"hello")
    dump, key = files(tmp_path, raw)
    code, out = verify("--dump", str(dump), "-k", str(key))
    assert code == EXIT_TAMPERED and "INSERTED at seq 3, offset 3" in out


def test_a_node_with_a_malformed_digest_is_a_usage_error(tmp_path: Path) -> None:
    dump, _ = files(tmp_path)
    idx = str(tmp_path / "idx")
    built = runner.invoke(ledger_app, ["index", "-i", idx, "--dump", str(dump), "--ledger-id", LEDGER])
    assert built.exit_code == 0
    for bad in ("g1@crc32c:abc", "g1@crc32c:deadbeef01", "g1@sha256:00"):
        for command in ("upstream", "downstream"):
            res = runner.invoke(ledger_app, [command, bad, "-i", idx, "--ledger-id", LEDGER])
            assert res.exit_code == EXIT_ERROR and "hex digits" in res.output, (command, bad, res.output)


def _indexed(tmp_path: Path) -> str:
    dump, _ = files(tmp_path)
    idx = str(tmp_path / "idx")
    built = runner.invoke(ledger_app, ["index", "-i", idx, "--dump", str(dump), "--ledger-id", LEDGER])
    assert built.exit_code == 0, built.output
    return idx


def test_queries_never_create_an_index(tmp_path: Path) -> None:
    missing = tmp_path / "newidx"
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (missing, empty):
        for args in (
            ["upstream", "g1@crc32c:01a4bfc1"],
            ["downstream", "g1"],
            ["checkpoint"],
        ):
            res = runner.invoke(ledger_app, [*args, "-i", str(where), "--ledger-id", LEDGER])
            assert res.exit_code == EXIT_ERROR, (args, res.output)
            assert f"no ledger index at {where}" in res.output and "streamprov ledger index" in res.output
    assert not missing.exists() and not any(empty.iterdir())


def test_an_unknown_node_or_data_id_is_not_in_the_ledger(tmp_path: Path) -> None:
    idx = _indexed(tmp_path)
    for args in (
        ["downstream", "nosuch"],
        ["downstream", "g1@crc32c:deadbeef"],
        ["upstream", "g1@crc32c:deadbeef"],
    ):
        res = runner.invoke(ledger_app, [*args, "-i", idx, "--ledger-id", LEDGER])
        assert res.exit_code == EXIT_NOT_FOUND and "not in the ledger" in res.output, (args, res.output)
    res = runner.invoke(ledger_app, ["checkpoint", "-i", idx, "--ledger-id", LEDGER, "--number", "999"])
    assert res.exit_code == EXIT_ERROR and "no checkpoint 999" in res.output


def test_an_index_path_that_is_a_file_or_cannot_be_made_is_named(tmp_path: Path) -> None:
    dump, _ = files(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    not_a_dir = a_file / "idx"  # a path under a regular file cannot be created
    for where in (a_file, not_a_dir):
        res = runner.invoke(
            ledger_app, ["index", "-i", str(where), "--dump", str(dump), "--ledger-id", LEDGER]
        )
        assert res.exit_code == EXIT_ERROR and str(where) in res.output, res.output
        assert isinstance(res.exception, SystemExit), res.exception
        res = runner.invoke(
            ledger_app, ["upstream", "g1@crc32c:01a4bfc1", "-i", str(where), "--ledger-id", "x"]
        )
        assert res.exit_code == EXIT_ERROR and str(where) in res.output, res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    res = runner.invoke(ledger_app, ["index", "-i", str(other), "--dump", str(dump), "--ledger-id", LEDGER])
    assert res.exit_code == EXIT_ERROR and "not a ledger index" in res.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_failed_dump_leaves_an_existing_one_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = tmp_path / "keep.bin"
    write_dump(keep, STORE.read())
    before = keep.read_bytes()

    def broken(*_args: object) -> Iterator[StoredRecord]:
        yield from list(STORE.read())[:3]
        raise LedgerError("reading ledger topic t: the broker went away")

    monkeypatch.setattr("streamprov.ledger.cli._source", broken)
    res = runner.invoke(ledger_app, ["dump", str(keep), "-t", "t", "-b", "127.0.0.1:1"])
    assert res.exit_code == EXIT_ERROR and "the broker went away" in res.output
    assert keep.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]  # no temporary file left behind


def test_dump_to_a_directory_or_nowhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streamprov.ledger.cli._source", lambda *_a: STORE.read())
    for out, said in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.bin", "there is no directory")):
        res = runner.invoke(ledger_app, ["dump", str(out), "-t", "t", "-b", "127.0.0.1:1"])
        assert res.exit_code == EXIT_ERROR and said in res.output, res.output
        assert isinstance(res.exception, SystemExit), res.exception
    res = runner.invoke(ledger_app, ["dump", str(tmp_path / "ok.bin"), "-t", "t", "-b", "127.0.0.1:1"])
    assert res.exit_code == 0 and [r.record for r in read_dump(tmp_path / "ok.bin")] == [
        r.record for r in STORE.read()
    ]


def test_no_signatures_is_a_plain_flag() -> None:
    res = runner.invoke(ledger_app, ["verify", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0 and "--no-signatures" in res.output
    assert "--no-no-signatures" not in res.output


# -- the sequencer with brokers that do not answer --------------------------------------------------------
SEQUENCER = [
    "sequencer",
    "-b",
    "127.0.0.1:1",
    "--topic",
    "t",
    "--unsigned",
    "--host",
    "127.0.0.1",
    "--http-port",
    "0",
]


def test_the_sequencer_says_which_brokers_did_not_answer_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an uncaught `cimpl.KafkaException` traceback and exit 1 (as a probe saw): an `error:` line
    naming the brokers and what to check, exit 2 ("could not"). The start-up deadline is the
    sequencer's timeout (30 s), 2 s here."""
    import logging  # noqa: PLC0415

    from streamprov.ledger.sequencer import LedgerSequencer  # noqa: PLC0415

    init = LedgerSequencer.__init__
    monkeypatch.setattr(init, "__kwdefaults__", {**(init.__kwdefaults__ or {}), "timeout_s": 2.0})
    monkeypatch.setattr(signal, "signal", lambda *_a: None)  # not this test process's handlers
    monkeypatch.setattr(logging, "basicConfig", lambda **_kw: None)  # nor its logging
    res = runner.invoke(ledger_app, SEQUENCER)
    assert res.exit_code == EXIT_ERROR, (res.output, res.exception)
    assert "error: cannot list the topics on 127.0.0.1:1 within 2 s" in res.output
    assert "reachable" in res.output and "Traceback" not in res.output


def test_sigterm_while_the_brokers_do_not_answer_stops_the_sequencer_at_once(tmp_path: Path) -> None:
    """Documented as stop-aware: before, the metadata request held the loop for the whole 30 s."""
    streamprov = Path(sys.executable).with_name("streamprov")
    log = tmp_path / "sequencer.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(streamprov), "ledger", *SEQUENCER], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "serving /healthz" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # started: the stop signal handlers are in place
        time.sleep(1.0)  # inside the topic check
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-2000:]
        assert time.monotonic() - sent < 5, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "stopped while starting" in log.read_text() and "Traceback" not in log.read_text()
