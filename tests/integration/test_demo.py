"""`streamprov demo` end to end, the way a newcomer runs it: through the CLI, on a real broker.

Both stages of the product: the pipeline's provenance (stamping, lineage, dead letters, the ledger),
then a corrected source reading and a corrupted map output found by the Validator, the change
detector's event and its impact, and the Recompute Manager's corrected records on the priority
topics."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from streamprov.cli import app


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, ["demo", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _check_pipeline_output(out: str, records: int) -> None:
    assert f"Produced {records} source readings" in out
    assert re.search(rf"map to_fahrenheit@1 \([a-z-]+\): {records} out, 1 dead-lettered", out)
    assert "reduce max_fahrenheit@1 per sensor, 60 s windows: 3 out." in out
    # the map output keeps the source's DataID and source checksum
    assert "DataID    reading-0001" in out
    assert out.count("map to_fahrenheit@1(offset=32.0)") >= 4
    assert "reduce max_fahrenheit@1() <- 4 inputs" in out
    assert "matches the digest in the header" in out
    assert "DOES NOT MATCH" not in out
    assert "reading-tampered" in out and "checksum_mismatch" in out


def _check_repair_output(out: str) -> None:
    """Stages 4-6: the exact alerts, the change event's impact set, the corrected records."""
    found = re.search(r"Topics: (streamprov-demo-\w+)\.readings", out)
    assert found is not None, out
    prefix = found.group(1)
    assert "could not run on this broker" not in out and "skipped:" not in out, out
    assert "reading-0001 is corrected (sensor-a's new maximum)" in out

    alerts_part = out.split("--- Validator alerts")[1].split("\n5. ", maxsplit=1)[0]
    alerts = re.findall(r"^(\w+)  DataID (\S+)  at (\S+)/0/\d+$", alerts_part, re.M)
    assert sorted(alerts) == [
        ("checksum_mismatch", "reading-0002", f"{prefix}.fahrenheit"),  # the corrupted copy
        ("source_changed", "reading-0001", f"{prefix}.fahrenheit"),  # derived from the corrected reading
        ("source_changed", "sensor-a", f"{prefix}.max"),  # through the reduce, from the ledger
    ], alerts_part
    assert "records checked, 3 alerts" in alerts_part
    assert alerts_part.count("    expected ") == alerts_part.count("    actual   ") == 3

    assert "12 first seen, 1 changed,\n   1 skipped (the tampered one); 1 change event on" in out
    assert re.search(rf"^source_changed  DataID reading-0001  at {prefix}\.readings/0/\d+$", out, re.M)
    impact = re.findall(r"^ {13}(\S+)@crc32c:[0-9a-f]{8}  (\S+)  depth (\d)$", out, re.M)
    assert impact == [("reading-0001", "to_fahrenheit@1", "1"), ("sensor-a", "max_fahrenheit@1", "2")]
    assert "impact   2 outputs derived from the previous version (from the ledger, 15 entries)" in out

    assert "1 plan, 2 tasks ran of the ledger's 15 applications (2 changed, 0 dead-lettered);" in out
    assert "2 corrected records published to" in out
    corrected = out.split("--- corrected records (priority topics) ---")[1]
    new_max = '{"fahrenheit":79.7,"sensor":"sensor-a"}'  # 26.5 °C
    assert re.search(
        rf"^{prefix}\.max\.priority  key=sensor-a  value={re.escape(new_max)}\n"
        r"  DataID    sensor-a\n(?:  .*\n)*?"
        rf"  Supersedes {prefix}\.max/0/\d+$",
        corrected,
        re.M,
    ), corrected
    assert re.search(
        rf"^{prefix}\.fahrenheit\.priority  key=reading-0001  value={re.escape(new_max)}\n"
        r"  DataID    reading-0001\n(?:  .*\n)*?"
        rf"  Supersedes {prefix}\.fahrenheit/0/\d+$",
        corrected,
        re.M,
    ), corrected
    assert corrected.count("Supersedes ") == 2


def test_demo_on_embedded_broker_needs_no_setup() -> None:
    out = _run()
    assert "Started an embedded Kafka-compatible broker (Tansu)" in out
    assert "(at-least-once)" in out
    _check_pipeline_output(out, 12)
    _check_repair_output(out)
    assert "Stopping the embedded broker" in out


def test_demo_on_apache_kafka_is_exactly_once_and_keeps_topics(kafka_bootstrap: str) -> None:
    out = _run("--bootstrap-servers", kafka_bootstrap)
    assert "embedded" not in out.split("Topics:")[0]
    assert "(exactly-once)" in out
    _check_pipeline_output(out, 12)
    _check_repair_output(out)
    assert "streamprov inspect streamprov-demo-" in out

    topic = re.search(r"inspect (streamprov-demo-\w+\.max)", out)
    assert topic is not None
    inspected = CliRunner().invoke(app, ["inspect", topic.group(1), "-b", kafka_bootstrap, "--timeout", "3"])
    assert inspected.exit_code == 0, inspected.output
    assert inspected.output.count('"data_id": "sensor-') == 3
