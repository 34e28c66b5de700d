"""`telemetry:` and `signing:` in streamprov.yaml: defaults, located errors, secrets never shown, env
overrides, and what `streamprov.telemetry.setup` / `streamprov.signing.KeyRing` build from them
(spans to an in-memory exporter, OTLP over HTTP and gRPC to a collector stand-in on 127.0.0.1)."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from streamprov.cli import app
from streamprov.config import ConfigError, loads_config
from streamprov.config.models import SigningAlgorithm, TracingExporter
from streamprov.config.schema import config_json_schema
from streamprov.header import ProvenanceHeader
from streamprov.signing import KeyRing, SigningError
from streamprov.telemetry import sampled
from streamprov.telemetry.setup import TelemetryError, build_telemetry
from validator.metrics import ValidatorMetrics

SECRET = "hmac-Secret-never-PRINTED-0123456789"
BASE = 'kafka: {bootstrap_servers: "k:9092"}\n'


def problems(
    text: str, environ: dict[str, str] | None = None, **kw: Any
) -> list[tuple[str, int | None, str, str]]:
    with pytest.raises(ConfigError) as err:
        loads_config(BASE + textwrap.dedent(text), environ=environ or {}, **kw)
    return [(p.location, p.line, p.message, p.hint or "") for p in err.value.problems]


def ed25519_pems(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = tmp_path / f"{name}.pem"
    public = tmp_path / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def test_defaults_are_off_and_prometheus_on() -> None:
    config = loads_config(BASE, environ={})
    t = config.telemetry
    assert (t.tracing.enabled, t.tracing.sampling_ratio, t.tracing.exporter) == (
        False,
        0.01,
        TracingExporter.NONE,
    )
    assert (t.metrics.prometheus, t.metrics.otlp, t.otlp.endpoint, t.otlp.protocol) == (
        True,
        False,
        None,
        "http/protobuf",
    )
    assert config.signing.keys == {}
    assert config.topic("x").signing.key is None and config.topic("x").signing.verify is False
    telemetry = build_telemetry(t, component="validator")
    assert telemetry.tracer_provider is None and telemetry.step_tracing() is None
    assert telemetry.recompute_tracing() is None and telemetry.push_metrics(lambda: None) is None


def test_keys_sign_and_verify_per_topic(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text(SECRET + "\n")
    private, public = ed25519_pems(tmp_path, "partner")
    text = f"""\
    signing:
      keys:
        pipeline-2026: {{algorithm: hmac, secret_file: {tmp_path / "hmac"}}}
        partner-2025: {{algorithm: ed25519, private_key_file: {private}, public_key_file: {public}}}
    defaults:
      signing: {{key: pipeline-2026}}
    topics:
      signed: {{signing: {{verify: true}}}}
      partner: {{signing: {{key: partner-2025, verify: true, accept: [partner-2025]}}}}
    """
    config = loads_config(BASE + textwrap.dedent(text), environ={})
    ring = KeyRing(config.signing, environ={})
    header = ProvenanceHeader.for_source("id-1", b"v").encode()
    value = b"v"
    own = ring.signer_for(config.topic("signed"))
    partner = ring.signer_for(config.topic("partner"))
    assert own is not None and partner is not None and "Secret" not in repr(own)
    assert ring.signer_for(config.topic("unlisted")) is own  # defaults: the pipeline's key
    everything = ring.verifier_for(config.topic("signed"))
    only_partner = ring.verifier_for(config.topic("partner"))
    assert everything is not None and only_partner is not None
    assert ring.verifier_for(config.topic("unlisted")) is None  # verify off
    for sig in (own.sign(header), partner.sign(header)):
        assert everything.verify(header, value, sig) is None
    assert only_partner.verify(header, value, partner.sign(header)) is None
    refused = only_partner.verify(header, value, own.sign(header))
    assert refused is not None and "unknown key" in refused.reason
    # where records are only verified, the public key (inline PEM) is enough
    pem = public.read_text().replace("\n", "\\n")
    validator_side = (
        BASE + f'signing: {{keys: {{partner-2025: {{algorithm: ed25519, public_key: "{pem}"}}}}}}\n'
    )
    verify_only = KeyRing(loads_config(validator_side, environ={}).signing, environ={})
    assert verify_only.verifier().verify(header, value, partner.sign(header)) is None
    with pytest.raises(SigningError, match="no private key to sign with"):
        verify_only.signer("partner-2025")
    assert config.signing.keys["partner-2025"].algorithm is SigningAlgorithm.ED25519


def test_mistakes_are_located_with_a_fix() -> None:
    found = problems(
        """\
        telemetry:
          tracing: {enabled: true, sampling_ratio: 1.5, exporter: jaeger}
          otlp: {endpoint: "collector:4318", protocol: http}
        signing:
          keys:
            "bad id!": {algorithm: hmac, secret_env: K}
            k1: {algorithm: hmac, public_key_file: /x.pub}
            k2: {algorithm: ed25519}
            k3: {algorithm: rsa, secret_env: K}
        """
    )
    by_location = {loc: (line, msg, hint) for loc, line, msg, hint in found}
    assert by_location["telemetry.tracing.sampling_ratio"][:2] == (
        3,
        "should be less than or equal to 1, got 1.5",
    )
    assert by_location["telemetry.tracing.exporter"][1] == "'jaeger' is not allowed"
    assert "none, otlp, console" in by_location["telemetry.tracing.exporter"][2]
    assert by_location["telemetry.otlp.endpoint"][1] == "'collector:4318' is not an http(s) URL"
    assert "http/protobuf, grpc" in by_location["telemetry.otlp.protocol"][2]
    assert by_location['signing.keys["bad id!"]'][1] == "'bad id!' is not a key id"
    assert "hmac, ed25519" in by_location["signing.keys.k3.algorithm"][2]
    # the models' own checks come in the same round
    found = problems(
        """\
        signing:
          keys:
            k1: {algorithm: hmac, secret_env: K, public_key_file: /x.pub}
            k2: {algorithm: ed25519}
            k4: {algorithm: hmac}
        """
    )
    by_location = {loc: (line, msg, hint) for loc, line, msg, hint in found}
    assert by_location["signing.keys.k1.public_key_file"][:2] == (4, "is for ed25519 keys")
    assert "private key (to sign) or a public key" in by_location["signing.keys.k2.public_key_file"][1]
    assert by_location["signing.keys.k4.secret_file"][1:] == (
        "an hmac key needs its secret",
        "set secret_file (a mounted Secret) or secret_env (a variable holding it)",
    )
    # the second round (each value valid, the combination not)
    found = problems(
        """\
        signing:
          keys:
            k1: {algorithm: hmac, secret_env: K}
            k3: {algorithm: ed25519, public_key_file: /x.pub}
        topics:
          a: {signing: {key: nope, accept: [k1, missing]}}
          b: {signing: {key: k3}}
          c: {signing: {verify: true, accept: []}}
        """,
        check_secrets=False,
    )
    by_location = {loc: (line, msg, hint) for loc, line, msg, hint in found}
    assert by_location["topics.a.signing.key"][:2] == (7, "no key 'nope' in signing.keys (k1, k3)")
    assert by_location["topics.a.signing.accept[1]"][1].startswith("no key 'missing'")
    # whether a key can sign depends on the pod (the Validator gets public keys only): asked at start
    assert "topics.b.signing.key" not in by_location
    assert by_location["topics.c.signing.verify"][1] == "signatures are required but no key is accepted"
    [(loc, line, msg, hint)] = problems(
        "telemetry: {tracing: {enabled: true, exporter: otlp}, metrics: {otlp: true}}"
    )
    assert (loc, line) == ("telemetry.otlp.endpoint", 2)
    assert msg == "tracing.exporter: otlp and metrics.otlp: true need an OTLP endpoint"
    assert hint == "set otlp.endpoint, e.g. http://otel-collector:4318"


def test_key_material_is_checked_at_load_and_never_shown(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort")
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("-----BEGIN PRIVATE KEY-----\n" + SECRET + "\n-----END PRIVATE KEY-----\n")
    text = f"""\
    signing:
      keys:
        a: {{algorithm: hmac, secret_file: {short}}}
        b: {{algorithm: hmac, secret_env: SIGNING_B}}
        c: {{algorithm: ed25519, private_key_file: {bad_pem}}}
        d: {{algorithm: hmac, secret_file: {tmp_path / "missing"}}}
    """
    found = problems(text)
    shown = "\n".join(f"{loc} {msg} {hint}" for loc, _, msg, hint in found)
    assert SECRET not in shown and "tooshort" not in shown
    by_location = {loc: (line, msg) for loc, line, msg, _ in found}
    assert by_location["signing.keys.a.secret_file"] == (
        4,
        "the HMAC secret has 8 bytes; it needs at least 16",
    )
    assert by_location["signing.keys.b.secret_env"][1] == "environment variable SIGNING_B is not set"
    assert by_location["signing.keys.c.private_key_file"][1].startswith(
        "not an unencrypted PEM Ed25519 private key"
    )
    assert by_location["signing.keys.d.secret_file"][1].startswith("cannot read")
    loads_config(BASE + textwrap.dedent(text), environ={}, check_secrets=False)  # --skip-secrets
    ring = KeyRing(
        loads_config(BASE + textwrap.dedent(text), environ={}, check_secrets=False).signing, environ={}
    )
    with pytest.raises(SigningError, match=r"signing\.keys\.b\.secret_env: environment variable SIGNING_B"):
        ring.signer("b")


def test_secrets_are_printed_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "streamprov.yaml"
    path.write_text(
        BASE
        + textwrap.dedent(
            """\
            telemetry:
              otlp:
                endpoint: "http://c:4318"
                headers: {x-api-key: HEADER-SECRET-xyz}
                headers_env: {authorization: OTLP_AUTH}
            signing:
              keys:
                k: {algorithm: hmac, secret_env: SIGNING_K}
            topics:
              out: {signing: {key: k, verify: true}}
            """
        )
    )
    env = {"SIGNING_K": SECRET, "OTLP_AUTH": "Bearer AUTH-SECRET-abc"}
    config = loads_config(path.read_text(), environ=env)
    for shown in (config.redacted(), repr(config), str(config.as_dict())):
        assert SECRET not in shown and "HEADER-SECRET" not in shown and "AUTH-SECRET" not in shown
    assert config.telemetry.otlp.resolve_headers(env) == {
        "x-api-key": "HEADER-SECRET-xyz",
        "authorization": "Bearer AUTH-SECRET-abc",
    }
    result = CliRunner(env=env).invoke(app, ["config", "validate", str(path), "--show"])
    assert result.exit_code == 0, result.output
    assert (
        SECRET not in result.output
        and "HEADER-SECRET" not in result.output
        and "AUTH-SECRET" not in result.output
    )
    assert "signing: keys k (hmac); signs out by k; verifies out" in result.output
    missing = CliRunner(env={"SIGNING_K": SECRET}).invoke(app, ["config", "validate", str(path)])
    assert missing.exit_code == 1 and "telemetry.otlp.headers_env.authorization" in missing.output
    assert "OTLP_AUTH is not set" in missing.output


def test_env_overrides(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    text = BASE + "signing:\n  keys:\n    Pipeline-1: {algorithm: hmac, secret_env: NOT_SET}\n"
    env = {
        "STREAMPROV__TELEMETRY__TRACING__ENABLED": "true",
        "STREAMPROV__TELEMETRY__TRACING__SAMPLING_RATIO": "0.25",
        "STREAMPROV__TELEMETRY__TRACING__EXPORTER": "console",
        "STREAMPROV__TELEMETRY__OTLP__HEADERS_ENV": "{authorization: OTLP_AUTH}",
        "STREAMPROV__TELEMETRY__OTLP__ENDPOINT": "https://collector.example:4318",
        # the chart's way: the key's file replaces the file's secret_env (one source of a secret)
        "STREAMPROV__SIGNING__KEYS__Pipeline-1__SECRET_FILE": str(tmp_path / "secret"),
        "STREAMPROV__DEFAULTS__SIGNING__KEY": "Pipeline-1",
        "OTLP_AUTH": "x",
    }
    config = loads_config(text, environ=env)
    t = config.telemetry
    assert (t.tracing.enabled, t.tracing.sampling_ratio, t.tracing.exporter) == (
        True,
        0.25,
        TracingExporter.CONSOLE,
    )
    assert t.otlp.headers_env == {"authorization": "OTLP_AUTH"}
    key = config.signing.keys["Pipeline-1"]
    assert key.secret_file == tmp_path / "secret" and key.secret_env is None
    assert config.topic("any").signing.key == "Pipeline-1"
    found = problems("", environ={"STREAMPROV__TELEMETRY__TRACING__SAMPLING_RATIO": "lots"})
    assert found[0][:1] == ("telemetry.tracing.sampling_ratio",)


def test_schema_has_the_new_sections() -> None:
    schema = config_json_schema(draft="07")
    assert {"telemetry", "signing"} <= set(schema["properties"])
    definitions = schema["definitions"]
    assert definitions["TracingExporter"]["enum"] == ["none", "otlp", "console"]
    assert definitions["SigningAlgorithm"]["enum"] == ["hmac", "ed25519"]
    assert definitions["TracingSettings"]["properties"]["sampling_ratio"]["maximum"] == 1.0
    printed = CliRunner().invoke(app, ["config", "schema"])
    assert printed.exit_code == 0 and '"TelemetrySettings"' in printed.output


# ------------------------------------------------------------------------------------ the factory


def test_tracing_on_samples_at_the_ratio_and_names_the_service() -> None:
    exporter = InMemorySpanExporter()
    config = loads_config(BASE + "telemetry: {tracing: {enabled: true, sampling_ratio: 1.0}}", environ={})
    telemetry = build_telemetry(config.telemetry, component="recompute-manager", span_exporter=exporter)
    tracing = telemetry.step_tracing(consumer_group="g")
    assert tracing is not None and telemetry.recompute_tracing({}) is not None
    headers: list[tuple[str, Any]] = []
    tracing.on_produce("src", "id-1", headers)
    telemetry.shutdown()  # the batch processor exports on shutdown
    (span,) = exporter.get_finished_spans()
    assert (
        span.name == "src publish"
        and span.resource.attributes["service.name"] == "streamprov-recompute-manager"
    )
    none = loads_config(BASE + "telemetry: {tracing: {enabled: true, sampling_ratio: 0}}", environ={})
    off = build_telemetry(none.telemetry, component="validator", span_exporter=InMemorySpanExporter())
    step = off.step_tracing()
    assert step is not None
    headers = []
    step.on_produce("src", "id-1", headers)
    assert headers and not sampled(headers[0][1])  # context propagated, not sampled


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def http_collector() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    received: list[tuple[str, dict[str, str], bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_http_exports_spans_and_pushes_metrics_with_headers_from_env(http_collector: Any) -> None:
    endpoint, received = http_collector
    text = f"""\
    telemetry:
      service_name: my-validator
      tracing: {{enabled: true, sampling_ratio: 1, exporter: otlp}}
      metrics: {{otlp: true, export_interval: 1s}}
      otlp: {{endpoint: "{endpoint}", headers_env: {{authorization: OTLP_AUTH}}, timeout: 5s}}
    """
    env = {"OTLP_AUTH": "Bearer abc"}
    config = loads_config(BASE + textwrap.dedent(text), environ=env)
    telemetry = build_telemetry(config.telemetry, component="validator", environ=env)
    tracing = telemetry.step_tracing()
    assert tracing is not None
    tracing.on_produce("readings", "id-7", [])
    metrics = ValidatorMetrics()
    metrics.messages_checked.add(42)
    pusher = telemetry.push_metrics(metrics.reader.get_metrics_data)
    assert pusher is not None
    telemetry.shutdown()
    traces = [(h, b) for p, h, b in received if p == "/v1/traces"]
    pushed = [(h, b) for p, h, b in received if p == "/v1/metrics"]
    assert traces and pushed and pusher.exports >= 1
    headers, body = traces[0]
    assert headers["authorization"] == "Bearer abc"
    request = ExportTraceServiceRequest.FromString(body)
    resource = {a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "my-validator"
    assert [s.name for s in request.resource_spans[0].scope_spans[0].spans] == ["readings publish"]
    names = {
        m.name: m
        for body in (b for _, b in pushed)
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names["streamprov_validator_messages_checked"].sum.data_points[0].as_int == 42


def test_otlp_grpc_exports_spans() -> None:
    grpc = pytest.importorskip("grpc")
    received: list[ExportTraceServiceRequest] = []
    metadata: list[dict[str, str]] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
            received.append(request)
            metadata.append(dict(context.invocation_metadata()))
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        text = f"""\
        telemetry:
          tracing: {{enabled: true, sampling_ratio: 1, exporter: otlp}}
          otlp: {{endpoint: "http://127.0.0.1:{port}", protocol: grpc, headers_env: {{x-tenant: TENANT}}}}
        """
        env = {"TENANT": "blue"}
        config = loads_config(BASE + textwrap.dedent(text), environ=env)
        telemetry = build_telemetry(config.telemetry, component="processor", environ=env)
        tracing = telemetry.step_tracing()
        assert tracing is not None
        tracing.on_produce("readings", "id-1", [])
        telemetry.shutdown()
    finally:
        server.stop(None)
    (request,) = received
    assert request.resource_spans[0].scope_spans[0].spans[0].name == "readings publish"
    assert metadata[0]["x-tenant"] == "blue"


def test_a_missing_exporter_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    config = loads_config(
        BASE + 'telemetry: {tracing: {enabled: true, exporter: otlp}, otlp: {endpoint: "http://c:4318"}}',
        environ={},
    )
    with pytest.raises(TelemetryError, match=r"needs the package opentelemetry-exporter-otlp-proto-http"):
        build_telemetry(config.telemetry, component="validator")
