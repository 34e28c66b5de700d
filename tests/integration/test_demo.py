"""`streamprov demo` end to end, the way a newcomer runs it: through the CLI, on a real broker."""

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


def test_demo_on_embedded_broker_needs_no_setup() -> None:
    out = _run()
    assert "Started an embedded Kafka-compatible broker (Tansu)" in out
    assert "(at-least-once)" in out
    _check_pipeline_output(out, 12)
    assert "Stopping the embedded broker" in out


def test_demo_on_apache_kafka_is_exactly_once_and_keeps_topics(kafka_bootstrap: str) -> None:
    out = _run("--bootstrap-servers", kafka_bootstrap)
    assert "embedded" not in out.split("Topics:")[0]
    assert "(exactly-once)" in out
    _check_pipeline_output(out, 12)
    assert "streamprov inspect streamprov-demo-" in out

    topic = re.search(r"inspect (streamprov-demo-\w+\.max)", out)
    assert topic is not None
    inspected = CliRunner().invoke(app, ["inspect", topic.group(1), "-b", kafka_bootstrap, "--timeout", "3"])
    assert inspected.exit_code == 0, inspected.output
    assert inspected.output.count('"data_id": "sensor-') == 3
