"""`streamprov lineage` / `streamprov impact` against a ledger topic on Apache Kafka, built by a real
processor pipeline (source -> map -> map) with the ledger on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from ledger_pipeline import ledger_writer, produce_sources, run_step, value
from ledger_support import LEDGER
from prov.model import ProvDocument
from typer.testing import CliRunner

from streamprov.cli import app
from streamprov.ledger import DataRef
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG

pytestmark = pytest.mark.kafka


def test_lineage_and_impact_from_the_ledger_topic(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 20
    src, mid, out, dlq = new_topic(), new_topic(), new_topic(), new_topic()
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:02d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        run_step(kafka_bootstrap, processor_fns.enrich, src, mid, dlq, unique_group(), writer, records=n)
        run_step(kafka_bootstrap, processor_fns.tag, mid, out, dlq, unique_group(), writer, records=n)

    runner = CliRunner()
    where = ["-b", kafka_bootstrap, "--ledger-topic", ledger_topic, "--ledger-id", LEDGER]
    where += ["--index-dir", str(tmp_path / "index")]
    res = runner.invoke(app, ["lineage", "id-05", *where])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "map tag@1()" in lines[1] and "map enrich@1(factor=3)" in res.output
    assert lines[-1].strip().endswith(DataRef.of("id-05", sources["id-05"]).describe())

    res = runner.invoke(app, ["lineage", "id-05", *where, "--format", "prov-json"])
    assert res.exit_code == 0, res.output
    doc = ProvDocument.deserialize(content=res.output, format="json")
    assert len(list(doc.get_records())) > 4

    res = runner.invoke(app, ["impact", "id-05", *where, "--format", "openlineage"])
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in res.output.splitlines()]
    assert [e["job"]["name"] for e in events] == ["enrich@1", "tag@1"]
    assert (
        events[0]["outputs"][0]["facets"]["version"]["datasetVersion"]
        == (events[1]["inputs"][0]["facets"]["version"]["datasetVersion"])
    )
