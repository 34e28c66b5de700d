"""The Validator's parts without a broker: the alert wire format, the RocksDB source view, settings
from streamprov.yaml, the Prometheus rendering, the HTTP endpoints and the CLI's argument handling."""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import crc32c
import fastavro
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from fastavro.schema import load_schema
from typer.testing import CliRunner

from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.config import loads_config
from streamprov.config.models import Criticality
from streamprov.header import HEADER_KEY, ProvenanceHeader, encode_checksum
from streamprov.merkle import length_prefixed
from validator.alerts import MAX_DATA_ID_BYTES, PREFIX, Alert, AlertError, AlertKind, Evidence, alert_id
from validator.checks import TopicPolicy
from validator.cli import JsonFormatter, validator_app
from validator.errors import ValidatorConfigError
from validator.health import HttpEndpoints, metrics_route, probe_route
from validator.metrics import ValidatorMetrics, metric_name, render_prometheus
from validator.settings import ServiceSettings
from validator.source_view import SourceView, source_key

REPO = Path(__file__).resolve().parents[2]


def _alert(**kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "data_id": "sensor-ü",
        "topic": "fahrenheit",
        "partition": 3,
        "offset": 123456789,
        "header": b"\xc3\x01hdr",
        "evidence": Evidence("crc32c:00000001", "crc32c:00000002", "why ✓"),
        "criticality": Criticality.HIGH,
        "detected_at_ms": 1_731_000_000_123,
    }
    fields.update(kw)
    return Alert.create(AlertKind.CHECKSUM_MISMATCH, **fields)


# -- alerts ------------------------------------------------------------------------------------------------
def test_alert_round_trip_and_plain_fastavro_reads_it() -> None:
    alert = _alert()
    raw = alert.encode()
    assert Alert.decode(raw) == alert
    assert Alert.decode(_alert(header=None).encode()).header is None
    schema = load_schema(str(REPO / "schemas" / "alert.avsc"))
    assert raw[:2] == b"\xc3\x01"
    record: Any = fastavro.schemaless_reader(io.BytesIO(raw[10:]), schema, None)
    assert record["alert_id"] == alert.alert_id and record["kind"] == "checksum_mismatch"
    assert record["evidence"] == {
        "expected": "crc32c:00000001",
        "actual": "crc32c:00000002",
        "reason": "why ✓",
    }
    assert record["criticality"] == "high" and record["offset"] == 123456789
    assert int(record["detected_at"].timestamp() * 1000) == 1_731_000_000_123


def test_an_alert_too_large_for_a_record_is_cut_to_fit_and_says_so() -> None:
    """A 600 KB key (the DataID of a record without header) or a 400 KB DataID plus a 600 KB header
    made an alert the broker refused, and the service retried it until it exited, on every restart
    (found by probing). Small alerts are kept as they are."""
    small = _alert()
    assert small.fitted() is small
    big = _alert(data_id="D" * 400_000, header=b"\xc3\x01" + b"G" * 600_000)
    fitted = big.fitted()
    assert len(fitted.encode()) + len(fitted.key) <= 900_000
    assert fitted.alert_id == big.alert_id and fitted.kind is big.kind
    assert fitted.data_id == "D" * MAX_DATA_ID_BYTES and fitted.header == big.header  # fits once cut
    reason = fitted.evidence.reason
    assert reason.startswith("why ✓ [alert cut to fit a record: a DataID of 400000 bytes cut")
    assert "fahrenheit/3/123456789" in reason
    assert Alert.decode(fitted.encode()) == fitted
    huge = _alert(header=b"\xc3\x01" + b"G" * 950_000).fitted()  # from a topic allowing larger records
    assert huge.header is None and "the header (950002 bytes) left out" in huge.evidence.reason
    assert len(huge.encode()) + len(huge.key) <= 900_000
    # a DataID that only fits once cut keeps its header; multi-byte text is cut on a character
    wide = _alert(data_id="ü" * 500_000).fitted()
    assert wide.header == b"\xc3\x01hdr" and wide.data_id == "ü" * (MAX_DATA_ID_BYTES // 2)
    assert len(wide.encode()) + len(wide.key) <= 900_000


def test_alert_enums_match_the_schema_symbols_in_order() -> None:
    schema = json.loads((REPO / "schemas" / "alert.avsc").read_text())
    fields = {f["name"]: f["type"] for f in schema["fields"]}
    assert fields["kind"]["symbols"] == [k.value for k in AlertKind]
    assert fields["criticality"]["symbols"] == [c.value for c in Criticality]


def test_alert_id_is_deterministic_and_length_prefixed() -> None:
    a = alert_id("t", 1, 23, AlertKind.STALE, "message")
    assert a == alert_id("t", 1, 23, "stale", "message")
    expected = hashlib.sha256(length_prefixed(b"t", b"1", b"23", b"stale", b"message")).hexdigest()
    assert a == expected and len(a) == 64
    assert alert_id("t1", 1, 23, "stale") != alert_id("t", 11, 23, "stale")  # no plain concatenation
    assert alert_id("t", 1, 23, "stale", "message") != alert_id("t", 1, 23, "stale", "source")
    assert _alert().alert_id == alert_id("fahrenheit", 3, 123456789, AlertKind.CHECKSUM_MISMATCH)
    assert _alert().key == "sensor-ü".encode()


@pytest.mark.parametrize("raw", [b"", b"nope", PREFIX, PREFIX + b"\x02", b"\xc3\x01" + b"\x00" * 8])
def test_alert_decode_raises_only_alert_error(raw: bytes) -> None:
    with pytest.raises(AlertError):
        Alert.decode(raw)


def test_alert_describe() -> None:
    d = _alert().describe()
    assert d["kind"] == "checksum_mismatch" and d["at"] == "fahrenheit/3/123456789"


# -- source view -------------------------------------------------------------------------------------------
def _rec(offset: int, key: bytes | None, value: bytes | None, ts: int = 1000, headers: Any = None) -> Any:
    return ("src", 0, offset, key, value, headers, ts)


def test_source_view_stores_latest_versions_tombstones_and_resumes(tmp_path: Path) -> None:
    view = SourceView(tmp_path / "v", {"bootstrap.servers": "127.0.0.1:1"}, ["src"], cache_size=2)
    view.apply([_rec(0, b"a", b"v1"), _rec(1, b"b", b"w1", ts=5)])
    entry = view.get(b"a")
    assert entry is not None and entry.crc32c == crc32c.crc32c(b"v1") and entry.coordinates == "src/0/0"
    assert view.get(b"zzz") is None and b"zzz" in view.cache  # misses are cached too
    view.apply([_rec(2, b"a", b"v2", ts=9)])  # a new version replaces the cached one
    entry = view.get(b"a")
    assert entry is not None and entry.crc32c == crc32c.crc32c(b"v2") and entry.timestamp_ms == 9
    assert entry.checksum == encode_checksum(compute(ChecksumAlgorithm.CRC32C, b"v2"))
    assert view.value(b"a") == b"v2"
    assert view.encoded_checksum(b"a", ChecksumAlgorithm.SHA256) == encode_checksum(
        compute(ChecksumAlgorithm.SHA256, b"v2")
    )
    assert len(view.cache) <= 2 and set(view.crcs) <= set(view.cache)
    assert view.crcs[b"a"] == crc32c.crc32c(b"v2")
    view.apply([_rec(3, b"b", None)])  # tombstone
    assert view.cache[b"b"] is None
    assert view.get(b"b") is None and view.value(b"b") is None
    view.close()

    again = SourceView(tmp_path / "v", {"bootstrap.servers": "127.0.0.1:1"}, ["src"])
    assert again.value(b"a") == b"v2" and again.get(b"b") is None
    assert again._next == {}  # loaded in start(); read the stored offset directly instead
    stored = again._db.get(b"osrc\x00" + (0).to_bytes(4, "big"))
    assert stored is not None and int.from_bytes(stored, "big") == 4
    again.close()


def test_source_keys() -> None:
    assert source_key(b"abc", None) == b"abc"
    assert source_key(b"\xff", None) == b"hex:ff"
    header = ProvenanceHeader.for_source("from-header", b"v").encode()
    assert source_key(None, [(HEADER_KEY, header)]) == b"from-header"
    assert source_key(b"", [(HEADER_KEY, b"junk")]) is None
    assert source_key(None, None) is None


def test_source_view_skips_records_without_a_data_id(tmp_path: Path) -> None:
    view = SourceView(tmp_path / "v", {}, ["src"])
    view.apply([_rec(0, None, b"v")])
    assert view.records_skipped == 1 and view.records_applied == 0
    view.close()


def test_source_view_refuses_a_locked_directory(tmp_path: Path) -> None:
    first = SourceView(tmp_path / "v", {}, ["src"])
    with pytest.raises(Exception, match="cannot open the source view"):
        SourceView(tmp_path / "v", {}, ["src"])
    first.close()


class _Meta:
    """What `Consumer.list_topics` returns, as far as the source view reads it."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self.topics = {t: _TopicMeta(n) for t, n in partitions.items()}


class _TopicMeta:
    def __init__(self, n: int) -> None:
        self.error = None
        self.partitions = dict.fromkeys(range(n))


class _MetadataConsumer:
    """A stand-in consumer whose topics grow while the view runs (no broker)."""

    def __init__(self) -> None:
        self.partitions: dict[str, int] = {"src": 1}
        self.assigned: list[tuple[str, int, int]] = []
        self.requests = 0
        self.fail = False

    def list_topics(self, topic: str, timeout: float) -> _Meta:
        self.requests += 1
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "down"))
        return _Meta({t: n for t, n in self.partitions.items() if t == topic})

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned += [(tp.topic, tp.partition, tp.offset) for tp in tps]

    incremental_assign = assign

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, 0

    def consume(self, n: int, timeout: float) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_source_view_picks_up_new_partitions_and_topics_periodically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _MetadataConsumer()
    monkeypatch.setattr("validator.source_view.Consumer", lambda _settings: fake)
    view = SourceView(tmp_path / "v", {}, ["src", "later"], refresh_interval_s=0.05)
    view.apply([("src", 0, 6, b"a", b"v", None, 1)])  # src/0 resumes at offset 7 after a restart
    view.start()  # "later" does not exist yet: not an error
    assert fake.assigned == [("src", 0, 7)] and view.caught_up
    view.poll()  # within the interval: no metadata request
    assert fake.requests == 2  # one per source topic, at start
    fake.partitions = {"src": 3, "later": 1}
    time.sleep(0.06)
    fake.fail = True
    view.poll()  # the broker does not answer: tried again at the next interval
    assert view.partitions_added == 0
    fake.fail = False
    time.sleep(0.06)
    view.poll()
    begin = OFFSET_BEGINNING
    assert fake.assigned[1:] == [("src", 1, begin), ("src", 2, begin), ("later", 0, begin)]
    assert view.partitions_added == 3 and fake.requests == 5
    assert view.refresh_partitions() == 0  # nothing new: nothing assigned twice
    view.close()


# -- settings ----------------------------------------------------------------------------------------------
YAML = """
kafka: {bootstrap_servers: "127.0.0.1:39092"}
streams: {alerts: my.alerts, dead_letters: my.dlq}
sources: [readings]
defaults: {criticality: low, checks: {source_drift: false}}
topics:
  fahrenheit:
    criticality: high
    checks:
      integrity: true
      source_drift: true
      rederivation: {enabled: true, sample_rate: 0.25}
      staleness: {enabled: true, source_max_age: 1h, message_max_age: 15m}
  celsius: {}
validator: {group_id: v1, state_dir: /tmp/x, http_port: 8088, metrics_port: 9999, batch_size: 50}
"""


def test_settings_from_config() -> None:
    s = ServiceSettings.from_config(loads_config(YAML), http_host="127.0.0.1", commit_interval_s=2.0)
    assert s.topics == ("fahrenheit", "celsius") and s.sources == ("readings",)
    assert (s.alerts_topic, s.dead_letter_topic, s.group_id) == ("my.alerts", "my.dlq", "v1")
    assert (s.http_port, s.metrics_port, s.batch_size, s.commit_interval_s) == (8088, 9999, 50, 2.0)
    assert s.kafka["bootstrap.servers"] == "127.0.0.1:39092" and s.state_dir == Path("/tmp/x")
    assert s.policy("fahrenheit") == TopicPolicy(
        integrity=True,
        source_drift=True,
        rederive_rate=0.25,
        source_max_age_ms=3_600_000,
        message_max_age_ms=900_000,
        criticality=Criticality.HIGH,
    )
    celsius = s.policy("celsius")
    assert celsius.criticality is Criticality.LOW and not celsius.source_drift and celsius.rederive_rate == 0
    assert s.policy("unlisted") == s.default_policy
    assert s.needs_registry == ["fahrenheit"]
    only = ServiceSettings.from_config(loads_config(YAML), topics=["other"])
    assert only.topics == ("other",) and only.policy("other").criticality is Criticality.LOW


def test_settings_refuse_what_cannot_work(tmp_path: Path) -> None:
    base: dict[str, Any] = {"kafka": {}, "alerts_topic": "a", "dead_letter_topic": "d", "state_dir": tmp_path}
    with pytest.raises(ValidatorConfigError, match="no output topics"):
        ServiceSettings(topics=(), **base)
    with pytest.raises(ValidatorConfigError, match="both validated"):
        ServiceSettings(topics=("a",), **base)
    with pytest.raises(ValidatorConfigError, match="positive"):
        ServiceSettings(topics=("t",), batch_size=0, **base)


# -- metrics -----------------------------------------------------------------------------------------------
def test_prometheus_rendering_of_the_validator_metrics() -> None:
    m = ValidatorMetrics()
    m.messages_checked.add(500)
    m.messages_checked.add(250)
    m.alerts.add(2, {"kind": "stale", "topic": 'we"ird\\topic\n'})
    m.latency.record(0.003)
    m.latency.record(0.2)
    m.set_lag({("out", 0): 7, ("out", 1): 0}, source_lag=3)
    text = m.render()
    lines = text.splitlines()
    assert "# TYPE streamprov_validator_messages_checked_total counter" in lines
    assert "streamprov_validator_messages_checked_total 750" in lines
    assert 'streamprov_validator_alerts_total{kind="stale",topic="we\\"ird\\\\topic\\n"} 2' in lines
    assert "# TYPE streamprov_validator_batch_processing_seconds histogram" in lines
    assert 'streamprov_validator_batch_processing_seconds_bucket{le="0.0025"} 0' in lines
    assert 'streamprov_validator_batch_processing_seconds_bucket{le="0.005"} 1' in lines
    assert 'streamprov_validator_batch_processing_seconds_bucket{le="+Inf"} 2' in lines
    assert "streamprov_validator_batch_processing_seconds_count 2" in lines
    assert any(line.startswith("streamprov_validator_batch_processing_seconds_sum 0.203") for line in lines)
    assert 'streamprov_validator_consumer_lag{partition="0",topic="out"} 7' in lines
    assert "streamprov_validator_source_view_lag 3" in lines
    assert text.endswith("\n")
    m.shutdown()


def test_prometheus_names_and_empty_data() -> None:
    assert metric_name("a.b-c") == "a_b_c" and metric_name("1x") == "_1x"
    assert render_prometheus(None) == ""


# -- HTTP ----------------------------------------------------------------------------------------------------
def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_http_endpoints() -> None:
    state = {"ready": False}

    def ready() -> tuple[bool, str]:
        return state["ready"], "because"

    def broken() -> tuple[bool, str]:
        raise RuntimeError("x")

    routes = {
        "/healthz": probe_route(lambda: (True, "alive")),
        "/readyz": probe_route(ready),
        "/metrics": metrics_route(lambda: "m 1\n"),
        "/broken": probe_route(broken),
    }
    http = HttpEndpoints("127.0.0.1", 0, routes).start()
    try:
        assert _get(http.port, "/healthz")[::2] == (200, "ok: alive\n")
        assert _get(http.port, "/readyz")[::2] == (503, "not ok: because\n")
        state["ready"] = True
        assert _get(http.port, "/readyz?verbose=1")[0] == 200
        status, ctype, body = _get(http.port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4") and body == "m 1\n"
        assert _get(http.port, "/nope")[0] == 404
        assert _get(http.port, "/broken")[0] == 500
    finally:
        http.close()


# -- CLI -----------------------------------------------------------------------------------------------------
def test_cli_help_and_config_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(validator_app, ["run", "--help"])
    assert result.exit_code == 0 and "--functions" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: {}\n")
    result = runner.invoke(validator_app, ["run", "--config", str(bad)])
    assert result.exit_code == 2
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(YAML.replace("/tmp/x", str(tmp_path / "state")))
    result = runner.invoke(validator_app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2 and "no function registry" in result.output
    result = runner.invoke(validator_app, ["run", "--config", str(cfg), "--functions", "nope"])
    assert result.exit_code == 2 and "module:attribute" in result.output
    result = runner.invoke(validator_app, ["run", "--config", str(cfg), "--serde", "xml"])
    assert result.exit_code == 2


def test_json_log_lines() -> None:
    import logging  # noqa: PLC0415

    record = logging.LogRecord("validator.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["message"] == "hello you" and line["logger"] == "validator.x"
