"""The `streamprov` command without a broker: help, header decoding, clear errors."""

from __future__ import annotations

import base64

import pytest
from typer.testing import CliRunner

from streamprov.cli import app
from streamprov.errors import StreamprovError
from streamprov.header import ProvenanceHeader


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "inspect", "header", "version"):
        assert command in result.output


def test_header_decode_reads_hex_and_base64() -> None:
    raw = ProvenanceHeader.for_source("r-1", b"payload").encode()
    for text in (raw.hex(), base64.b64encode(raw).decode()):
        result = CliRunner().invoke(app, ["header", "decode", text])
        assert result.exit_code == 0, result.output
        assert '"data_id": "r-1"' in result.output
        assert '"lineage": []' in result.output


def test_header_decode_rejects_garbage_with_a_hint() -> None:
    result = CliRunner().invoke(app, ["header", "decode", "c301deadbeef"])
    assert result.exit_code == 1
    assert "error:" in result.output
    assert "hint:" in result.output
    not_bytes = CliRunner().invoke(app, ["header", "decode", "not hex!"])
    assert not_bytes.exit_code == 1
    assert "neither hex nor base64" in not_bytes.output


def test_inspect_without_bootstrap_says_what_to_do(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("STREAMPROV_BOOTSTRAP_SERVERS", raising=False)
    result = CliRunner().invoke(app, ["inspect", "some-topic"])
    assert result.exit_code == 1
    assert "--bootstrap-servers" in result.output


def test_inspect_of_an_empty_topic_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("streamprov.inspect.read_topic", lambda *_a, **_k: iter(()))
    result = CliRunner().invoke(app, ["inspect", "empty-topic", "-b", "127.0.0.1:1", "--timeout", "0.5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no records in empty-topic (waited 0.5 s)"


def test_inspect_of_an_unreachable_broker_prints_no_raw_librdkafka_lines(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from streamprov.inspect import read_topic  # noqa: PLC0415

    with pytest.raises(StreamprovError, match="reading 'foo'"):
        list(read_topic("127.0.0.1:1", "foo", limit=1, idle_timeout_s=0.5))
    err = capfd.readouterr().err
    assert "%3|" not in err and "|FAIL|" not in err, err[:300]
