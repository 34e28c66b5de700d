"""A commented `streamprov.yaml` that validates as it is: `streamprov config example > streamprov.yaml`."""

from __future__ import annotations

from typing import Final

EXAMPLE_YAML: Final = """\
# streamprov.yaml - topic-level configuration for the Validator and the Recompute Manager.
# Check it with:  streamprov config validate streamprov.yaml
# Any setting can be overridden from the environment after this file is read, with the path in
# capitals joined by "__":  STREAMPROV__KAFKA__BOOTSTRAP_SERVERS=kafka-0.kafka:9092
# Durations are "500ms", "30s", "15m", "1h", "2d" (or "1h30m"), or a number of seconds.

kafka:
  bootstrap_servers: "127.0.0.1:9092"   # required: HOST:PORT[,HOST:PORT...]
  security_protocol: PLAINTEXT           # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
  # With SASL_SSL, give the password as a file or a variable, never in this file:
  # sasl:
  #   mechanism: SCRAM-SHA-512            # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | GSSAPI | OAUTHBEARER
  #   username: streamprov
  #   password_file: /etc/streamprov/secrets/sasl/password   # or password_env: KAFKA_PASSWORD
  # ssl:
  #   ca_location: /etc/streamprov/tls/ca.crt
  #   certificate_location: /etc/streamprov/tls/tls.crt      # client certificate (mutual TLS)
  #   key_location: /etc/streamprov/tls/tls.key
  client: {}                             # other librdkafka settings, e.g. {"socket.keepalive.enable": true}

# streamprov's own topics (create them before starting the services).
streams:
  alerts: streamprov.alerts
  dead_letters: streamprov.dead-letters
  ledger: streamprov.ledger
  ledger_requests: streamprov.ledger.requests  # to the ledger sequencer (one partition)
  changes: streamprov.changes
  recompute_tasks: streamprov.recompute.tasks
  recompute_progress: streamprov.recompute.progress

# Compacted topics holding the original records, keyed by DataID.
sources:
  - readings

# Settings of every output topic not listed under topics: (and the base of those listed).
defaults:
  criticality: medium                    # low | medium | high | critical

# Per output topic: what the Validator checks and when the Recompute Manager recomputes.
topics:
  fahrenheit:
    checksum_algorithm: crc32c           # crc32c | sha256
    criticality: high
    checks:
      integrity: true                    # payload checksum matches the header
      source_drift: true                 # the source record changed since this was computed
      rederivation: {enabled: false, sample_rate: 0.01}   # replay a sample (0..1) and compare
      staleness: {enabled: true, source_max_age: 1h, message_max_age: 15m}
    recompute:
      enabled: true
      triggers: [checksum_mismatch, source_changed, rederivation_mismatch, stale]
      acceptable_error_rate: 0.01        # 0..1: below this share of bad records, only alert
      rate_limit_per_s: 50               # recompute tasks started per second, at most
      budget_per_hour: 10000             # recompute tasks per hour, at most
      dedup_window: 5m                   # the same DataID is recomputed once per window
      max_fanout: 1000                   # at most this many outputs recomputed for one change
    signing: {key: null, verify: false}  # key: the key id stampers sign with; verify: require a signature
    priority_topic: null                 # corrected records go here; null: "fahrenheit.priority"

validator:
  group_id: streamprov-validator
  state_dir: /var/lib/streamprov/validator
  http_port: 8080                        # /healthz and /readyz
  metrics_port: 9464
  batch_size: 500

recompute_manager:
  group_id: streamprov-recompute-manager
  state_dir: /var/lib/streamprov/recompute
  http_port: 8081
  metrics_port: 9465
  workers: 4
  max_retries: 5
  record_in_ledger: true                 # each recompute's ledger entries, via the sequencer

changes:
  group_id: streamprov-changes
  state_dir: /var/lib/streamprov/changes
  http_port: 8082                        # /healthz and /readyz
  batch_size: 500
  max_outputs: 1000                      # impacted outputs listed per change event
  function_check_interval: 5m
  progress_interval: 30s
  record_sources: true                   # a SOURCE ledger entry per new source version

# The provenance ledger (docs/ledger.md). One sequencer seals what every process sends.
ledger:
  id: null                               # null: the ledger topic's name
  checkpoint_key: null                   # an ed25519 key id under signing.keys; null: unsigned
  sequencer:
    group_id: null                       # null: streamprov-ledger-sequencer.<ledger id>
    checkpoint_every: 1000               # entries per signed checkpoint
    batch_size: 500                      # requests per transaction
    http_port: 8083                      # /healthz and /readyz

# Traces and metrics (docs/telemetry.md). Tracing is off unless enabled.
telemetry:
  service_name: null                     # OpenTelemetry service.name; null: streamprov-validator, ...
  tracing:
    enabled: false
    sampling_ratio: 0.01                 # 0..1: share of new traces sampled; later stages follow
    exporter: none                       # none (context propagated only) | otlp | console
    max_queue_size: 2048                 # spans waiting for export; past it spans are dropped
  metrics:
    prometheus: true                     # /metrics on <service>.metrics_port
    otlp: false                          # also push metrics to otlp.endpoint
    export_interval: 60s
  otlp:
    endpoint: null                       # e.g. http://otel-collector:4318 (http/protobuf), :4317 (grpc)
    protocol: http/protobuf              # http/protobuf | grpc
    headers_env: {}                      # header -> variable holding its value: {authorization: OTLP_AUTH}
    timeout: 10s

# Signed provenance (docs/telemetry.md): keys by id, named by topics under signing:. Key material
# comes from files (mounted Secrets) or environment variables, never from this file.
signing:
  keys: {}
  # keys:
  #   pipeline-2026:
  #     algorithm: hmac                   # hmac | ed25519
  #     secret_file: /etc/streamprov/secrets/signing/pipeline-2026/secret   # or secret_env: SIGNING_KEY
  #   partner-2025:
  #     algorithm: ed25519                # stampers: private_key_file; validators: public_key_file
  #     public_key_file: /etc/streamprov/secrets/signing/partner-2025/public.pem
"""
