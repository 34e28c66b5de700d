"""`streamprov demo` records its pipeline in a provenance ledger and shows a lineage from it."""

from __future__ import annotations

from typer.testing import CliRunner

from streamprov.cli import app


def test_demo_verifies_its_ledger_and_prints_lineage_from_it(kafka_bootstrap: str) -> None:
    result = CliRunner().invoke(app, ["demo", "--bootstrap-servers", kafka_bootstrap, "--records", "9"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "12 entries, 1 signed checkpoints: verified (hash chain, Merkle roots, signatures)" in out
    # from the ledger's lineage of sensor-a to the next stage (which prints corrected records' lineages)
    section = out.split("lineage of sensor-a from the ledger")[1].split("\n4. ")[0]
    assert section.count("map to_fahrenheit@1(offset=32.0)") == 3
    assert "reduce max_fahrenheit@1() window" in section
    assert "not available" not in out
