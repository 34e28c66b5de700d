"""`streamprov ledger verify/index/dump`, `lineage` and `impact` against Apache Kafka when the ledger
topic is not there: one message naming the topic, exit 2, nothing created or overwritten."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamprov.agents.kafka_io import list_all_topics
from streamprov.cli import app

pytestmark = pytest.mark.kafka


def test_a_missing_ledger_topic_is_named_and_nothing_is_made(kafka_bootstrap: str, tmp_path: Path) -> None:
    missing = f"sp-missing-ledger-{uuid.uuid4().hex[:8]}"
    index = tmp_path / "index"
    keep = tmp_path / "keep.bin"
    keep.write_bytes(b"an earlier dump")
    b = ["-b", kafka_bootstrap]
    runs = {
        "--topic": [
            ["ledger", "verify", "-t", missing, *b, "--no-signatures"],
            ["ledger", "index", "-i", str(index), "-t", missing, *b],
            ["ledger", "dump", str(keep), "-t", missing, *b],
        ],
        "--ledger-topic": [
            ["lineage", "id-1", "--ledger-topic", missing, *b, "-i", str(index)],
            ["impact", "id-1", "--ledger-topic", missing, *b, "-i", str(index)],
        ],
    }
    runner = CliRunner()
    for option, commands in runs.items():
        for args in commands:
            res = runner.invoke(app, args)
            assert res.exit_code == 2, (args, res.output)
            assert f"topic {missing} does not exist on {kafka_bootstrap}: check {option}" in res.output
            assert "UNKNOWN_PARTITION" not in res.output
    assert keep.read_bytes() == b"an earlier dump"
    assert not index.exists()
    assert missing not in list_all_topics({"bootstrap.servers": kafka_bootstrap}, 10)
