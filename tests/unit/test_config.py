# ruff: noqa: E501  (the issue's YAML is quoted verbatim)
"""streamprov.yaml: the models, the loader's located and actionable errors, env overrides, secrets."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from streamprov.checksum import ChecksumAlgorithm
from streamprov.cli import app
from streamprov.config import (
    ConfigError,
    Criticality,
    RecomputeTrigger,
    SecurityProtocol,
    StreamprovConfig,
    format_duration,
    load_config,
    loads_config,
    parse_duration,
)
from streamprov.config.example import EXAMPLE_YAML
from streamprov.config.schema import config_json_schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Hunter2-do-not-print"

# The shape agreed in issue 6, verbatim (other components are written against these names).
ISSUE_YAML = """\
kafka:
  bootstrap_servers: "127.0.0.1:9092"
  security_protocol: PLAINTEXT
  client: {}
streams:
  alerts: streamprov.alerts
  dead_letters: streamprov.dead-letters
  ledger: streamprov.ledger
  changes: streamprov.changes
  recompute_tasks: streamprov.recompute.tasks
  recompute_progress: streamprov.recompute.progress
sources:
  - readings
topics:
  fahrenheit:
    checksum_algorithm: crc32c
    criticality: high
    checks:
      integrity: true
      source_drift: true
      rederivation: {enabled: false, sample_rate: 0.01}
      staleness: {enabled: true, source_max_age: 1h, message_max_age: 15m}
    recompute:
      enabled: true
      triggers: [checksum_mismatch, source_changed, rederivation_mismatch, stale]
      acceptable_error_rate: 0.01
      rate_limit_per_s: 50
      budget_per_hour: 10000
      dedup_window: 5m
      max_fanout: 1000
    priority_topic: null
validator: {group_id: streamprov-validator, state_dir: /var/lib/streamprov/validator, http_port: 8080, metrics_port: 9464, batch_size: 500}
recompute_manager: {group_id: streamprov-recompute-manager, state_dir: /var/lib/streamprov/recompute, http_port: 8081, metrics_port: 9465, workers: 4, max_retries: 5}
"""


def write(tmp_path: Path, text: str, name: str = "streamprov.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value


def find(error: ConfigError, location: str) -> str:
    """The rendered problem at `location` (fails listing all problems if there is none)."""
    for problem in error.problems:
        if problem.location == location:
            return str(problem)
    raise AssertionError(f"no problem at {location}:\n{error}")


# --------------------------------------------------------------------------------- valid files


def test_the_issue_shape_loads_with_every_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_YAML), environ={})
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert config.kafka.security_protocol is SecurityProtocol.PLAINTEXT
    assert config.streams.dead_letters == "streamprov.dead-letters"
    assert config.streams.recompute_progress == "streamprov.recompute.progress"
    assert config.sources == ("readings",)
    topic = config.topic("fahrenheit")
    assert topic.checksum_algorithm is ChecksumAlgorithm.CRC32C
    assert topic.criticality is Criticality.HIGH
    assert topic.checks.integrity and topic.checks.source_drift
    assert topic.checks.rederivation.enabled is False
    assert topic.checks.rederivation.sample_rate == 0.01
    assert topic.checks.staleness.source_max_age == timedelta(hours=1)
    assert topic.checks.staleness.message_max_age == timedelta(minutes=15)
    assert topic.recompute.triggers == tuple(RecomputeTrigger)
    assert topic.recompute.acceptable_error_rate == 0.01
    assert topic.recompute.rate_limit_per_s == 50
    assert topic.recompute.budget_per_hour == 10000
    assert topic.recompute.dedup_window == timedelta(minutes=5)
    assert topic.recompute.max_fanout == 1000
    assert topic.priority_topic_name("fahrenheit") == "fahrenheit.priority"
    assert config.validator.http_port == 8080
    assert config.validator.state_dir == Path("/var/lib/streamprov/validator")
    assert config.recompute_manager.workers == 4
    assert config.recompute_manager.max_retries == 5
    assert config.kafka.librdkafka() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "PLAINTEXT",
    }


def test_example_validates_and_is_what_the_cli_prints(tmp_path: Path) -> None:
    config = loads_config(EXAMPLE_YAML, environ={})
    assert config.topic("fahrenheit").criticality is Criticality.HIGH
    printed = CliRunner().invoke(app, ["config", "example"])
    assert printed.exit_code == 0
    assert printed.output == EXAMPLE_YAML
    path = write(tmp_path, printed.output)
    checked = CliRunner().invoke(app, ["config", "validate", str(path), "--no-env"])
    assert checked.exit_code == 0, checked.output
    assert checked.output.startswith(f"ok: {path}")
    assert "topic fahrenheit: high, crc32c" in checked.output


def test_minimal_file_gets_documented_defaults() -> None:
    config = loads_config("kafka: {bootstrap_servers: 'k:9092'}", environ={})
    assert config.streams.alerts == "streamprov.alerts"
    assert config.sources == ()
    unlisted = config.topic("anything")
    assert unlisted == config.defaults
    assert unlisted.checksum_algorithm is ChecksumAlgorithm.CRC32C
    assert unlisted.criticality is Criticality.MEDIUM
    assert unlisted.checks.staleness.enabled is False
    assert unlisted.priority_topic_name("anything") == "anything.priority"
    assert config.recompute_manager.http_port == 8081


def test_defaults_block_is_the_base_of_listed_topics() -> None:
    config = loads_config(
        """
        kafka: {bootstrap_servers: "k:9092"}
        defaults:
          criticality: low
          checksum_algorithm: sha256
          checks: {staleness: {enabled: true, source_max_age: 2d}}
        topics:
          a: {criticality: critical, checks: {integrity: false}}
          b:
        """,
        environ={},
    )
    a, b, other = config.topic("a"), config.topic("b"), config.topic("c")
    assert a.criticality is Criticality.CRITICAL
    assert a.checksum_algorithm is ChecksumAlgorithm.SHA256
    assert a.checks.integrity is False
    assert a.checks.staleness.enabled and a.checks.staleness.source_max_age == timedelta(days=2)
    assert b.criticality is Criticality.LOW
    assert other.criticality is Criticality.LOW
    assert config.output_topics() == ("a", "b")


def test_models_are_frozen_and_reject_unknown_keys() -> None:
    config = loads_config(EXAMPLE_YAML, environ={})
    with pytest.raises(ValidationError):
        config.validator.http_port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        StreamprovConfig.model_validate({"kafka": {"bootstrap_servers": "k:1"}, "extra": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(minutes=90)),
        ("500ms", timedelta(milliseconds=500)),
        (90, timedelta(seconds=90)),
        ("2.5", timedelta(seconds=2.5)),
    ],
)
def test_durations(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


def test_duration_spelling_is_short() -> None:
    assert format_duration(timedelta(hours=1)) == "1h"
    assert format_duration(timedelta(seconds=90)) == "90s"
    assert format_duration(timedelta(minutes=90)) == "90m"
    assert format_duration(timedelta(milliseconds=1500)) == "1500ms"


def test_helm_style_large_numbers_read_as_numbers() -> None:
    """Helm's toYaml writes 1000000 as 1e+06; PyYAML alone would read that as a string."""
    config = loads_config(
        "kafka: {bootstrap_servers: 'k:9092'}\ntopics: {t: {recompute: {budget_per_hour: 1e+06}}}",
        environ={},
    )
    assert config.topic("t").recompute.budget_per_hour == 1_000_000


# ------------------------------------------------------------------------------------- mistakes

MISTAKES = """\
kafka:
  bootstrap_servers: "127.0.0.1:9092"
topics:
  fahrenheit:
    criticallity: high
    checksum_algorithm: md5
    checks:
      rederivation: {enabled: true, sample_rate: 1.5}
      staleness:
        enabled: true
        source_max_age: 1 hour
    recompute:
      triggers: [checksum_mismatch, stael]
      workers: 4
  celsius:
    criticality: urgent
"""


def test_every_mistake_is_reported_at_once_with_line_and_fix(tmp_path: Path) -> None:
    path = write(tmp_path, MISTAKES)
    error = problems_of(path)
    assert len(error.problems) == 7, str(error)
    text = str(error)
    assert text.startswith(f"7 problems in {path}:")

    unknown = find(error, "topics.fahrenheit.criticallity")
    assert f"{path}:5:" in unknown
    assert "unknown setting 'criticallity'" in unknown
    assert "did you mean 'criticality'?" in unknown

    algorithm = find(error, "topics.fahrenheit.checksum_algorithm")
    assert f"{path}:6:" in algorithm and "'md5' is not allowed" in algorithm and "crc32c, sha256" in algorithm

    rate = find(error, "topics.fahrenheit.checks.rederivation.sample_rate")
    assert f"{path}:8:" in rate and "less than or equal to 1" in rate and "got 1.5" in rate
    assert "between 0 and 1" in rate

    duration = find(error, "topics.fahrenheit.checks.staleness.source_max_age")
    assert f"{path}:11:" in duration and "'1 hour' is not a duration" in duration and "'15m'" in duration

    trigger = find(error, "topics.fahrenheit.recompute.triggers[1]")
    assert f"{path}:13:" in trigger and "did you mean 'stale'?" in trigger

    misplaced = find(error, "topics.fahrenheit.recompute.workers")
    assert "unknown setting 'workers'" in misplaced and "allowed here:" in misplaced

    enum = find(error, "topics.celsius.criticality")
    assert f"{path}:16:" in enum
    assert "'urgent' is not allowed" in enum
    assert "write one of: low, medium, high, critical" in enum


def test_missing_bootstrap_servers(tmp_path: Path) -> None:
    error = problems_of(write(tmp_path, "kafka:\n  security_protocol: PLAINTEXT\n"))
    problem = find(error, "kafka.bootstrap_servers")
    assert "is required" in problem
    assert ":1:" in problem  # the kafka: block that lacks it
    assert "HOST:PORT" in problem


def test_missing_kafka_and_bad_bootstrap_servers(tmp_path: Path) -> None:
    assert "kafka: is required" in str(problems_of(write(tmp_path, "sources: [a]\n")))
    error = problems_of(write(tmp_path, "kafka: {bootstrap_servers: 'broker'}\n"))
    assert "'broker' is not HOST:PORT" in find(error, "kafka.bootstrap_servers")


def test_wrong_types_say_what_to_write(tmp_path: Path) -> None:
    error = problems_of(
        write(
            tmp_path,
            """\
            kafka: {bootstrap_servers: "k:9092", security_protocol: sasl_ssl}
            validator: {batch_size: many, http_port: 9464}
            recompute_manager: {workers: 0}
            sources: readings
            """,
        )
    )
    assert "did you mean 'SASL_SSL'?" in find(error, "kafka.security_protocol")
    assert "whole number" in find(error, "validator.batch_size")
    assert "greater than or equal to 1" in find(error, "recompute_manager.workers")
    assert "write a list" in find(error, "sources")


def test_cross_checks_are_located(tmp_path: Path) -> None:
    error = problems_of(
        write(
            tmp_path,
            """\
            kafka: {bootstrap_servers: "k:9092"}
            sources: [readings, readings]
            topics:
              readings: {}
              out: {priority_topic: shared}
              out2: {priority_topic: shared}
              streamprov.alerts: {}
            """,
        )
    )
    assert "listed twice" in find(error, "sources[1]")
    assert "also listed under sources" in find(error, "topics.readings")
    assert "also the priority topic of 'out'" in find(error, "topics.out2.priority_topic")
    assert "streams.alerts" in find(error, 'topics["streamprov.alerts"]')
    ports = problems_of(
        write(tmp_path, "kafka: {bootstrap_servers: 'k:1'}\nvalidator: {metrics_port: 8080}\n")
    )
    assert ":2:" in find(ports, "validator.metrics_port")


def test_yaml_syntax_error_has_line_and_hides_the_line_text(tmp_path: Path) -> None:
    path = write(tmp_path, f'kafka:\n  sasl: {{password: "{SECRET}\n  bootstrap_servers: [\n')
    error = problems_of(path)
    assert "not valid YAML" in str(error)
    assert error.problems[0].line is not None
    assert SECRET not in str(error)


def test_duplicate_keys_are_problems(tmp_path: Path) -> None:
    error = problems_of(write(tmp_path, "kafka: {bootstrap_servers: 'k:1'}\nsources: [a]\nsources: [b]\n"))
    assert "set twice (first on line 2)" in find(error, "sources")


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    assert "not settings" in str(problems_of(write(tmp_path, "- a\n- b\n")))
    missing = problems_of(tmp_path / "nope.yaml")
    assert "file not found" in str(missing) and "config example" in str(missing)


def test_cli_validate_exits_1_and_lists_problems(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "validate", str(write(tmp_path, MISTAKES)), "--no-env"])
    assert result.exit_code == 1
    assert "7 problems" in result.output
    assert "did you mean 'criticality'?" in result.output


# -------------------------------------------------------------------------------------- secrets

SASL_YAML = f"""\
kafka:
  bootstrap_servers: "k:9093"
  security_protocol: SASL_SSL
  sasl: {{mechanism: SCRAM-SHA-512, username: streamprov, password: "{SECRET}"}}
  ssl: {{ca_location: /tls/ca.crt}}
  client: {{"sasl.oauthbearer.client.secret": "{SECRET}", "linger.ms": 5, "enable.idempotence": true}}
"""


def test_password_is_printed_nowhere(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SASL_YAML), environ={})
    assert config.kafka.librdkafka()["sasl.password"] == SECRET
    assert config.kafka.librdkafka()["sasl.oauthbearer.client.secret"] == SECRET
    shown = [
        repr(config),
        str(config),
        repr(config.kafka),
        str(config.kafka.sasl),
        str(config.as_dict()),
        str(config.kafka.as_dict()),
        config.redacted(),
        str(config.kafka.redacted()),
    ]
    for text in shown:
        assert SECRET not in text
    assert config.kafka.redacted()["sasl.password"] == "**********"
    assert config.kafka.librdkafka()["linger.ms"] == "5"
    assert config.kafka.librdkafka()["enable.idempotence"] == "true"


def test_password_is_not_in_error_messages(tmp_path: Path) -> None:
    bad = SASL_YAML.replace("username: streamprov, ", "").replace("k:9093", "nope")
    bad += f'  extra: "{SECRET}"\n'
    error = problems_of(write(tmp_path, bad))
    text = str(error)
    assert "needs a username" in text
    assert SECRET not in text
    both = SASL_YAML.replace("password:", "password_env: X, password:")
    error = problems_of(write(tmp_path, both))
    assert "given twice" in str(error) and SECRET not in str(error)
    assert SECRET not in repr(error.problems)
    # a secret with a wrong type: the value is never echoed
    with pytest.raises(ConfigError) as info:
        loads_config(SASL_YAML, environ={"STREAMPROV__KAFKA__CLIENT__SASL.PASSWORD": SECRET})
    assert SECRET not in str(info.value)
    result = CliRunner().invoke(app, ["config", "validate", str(write(tmp_path, bad)), "--no-env"])
    assert result.exit_code == 1 and SECRET not in result.output


def test_cli_show_masks_secrets(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["config", "validate", str(write(tmp_path, SASL_YAML)), "--show", "--no-env"]
    )
    assert result.exit_code == 0, result.output
    assert "SASL SCRAM-SHA-512" in result.output
    assert "**********" in result.output
    assert SECRET not in result.output


def test_password_from_file_and_from_env(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    from_file = SASL_YAML.replace(f'password: "{SECRET}"', f"password_file: {secret_file}")
    config = load_config(write(tmp_path, from_file), environ={})
    assert config.kafka.librdkafka()["sasl.password"] == SECRET  # trailing newline dropped
    assert SECRET not in repr(config) + config.redacted()

    from_env = SASL_YAML.replace(f'password: "{SECRET}"', "password_env: KAFKA_PASSWORD")
    config = load_config(write(tmp_path, from_env), environ={"KAFKA_PASSWORD": SECRET})
    assert config.kafka.librdkafka(environ={"KAFKA_PASSWORD": SECRET})["sasl.password"] == SECRET


def test_unreadable_secrets_fail_at_load_unless_skipped(tmp_path: Path) -> None:
    missing = SASL_YAML.replace(f'password: "{SECRET}"', "password_file: /nonexistent/password")
    path = write(tmp_path, missing)
    problem = find(problems_of(path), "kafka.sasl.password_file")
    assert "cannot read '/nonexistent/password'" in problem and ":4:" in problem
    assert load_config(path, environ={}, check_secrets=False).kafka.sasl is not None
    unset = SASL_YAML.replace(f'password: "{SECRET}"', "password_env: NOT_SET_ANYWHERE")
    assert "NOT_SET_ANYWHERE is not set" in str(problems_of(write(tmp_path, unset)))
    result = CliRunner().invoke(app, ["config", "validate", str(path), "--skip-secrets", "--no-env"])
    assert result.exit_code == 0, result.output


def test_sasl_and_protocol_must_agree(tmp_path: Path) -> None:
    error = problems_of(write(tmp_path, "kafka: {bootstrap_servers: 'k:1', security_protocol: SASL_SSL}\n"))
    assert "needs a sasl block" in find(error, "kafka.sasl")
    error = problems_of(write(tmp_path, "kafka: {bootstrap_servers: 'k:1', sasl: {mechanism: GSSAPI}}\n"))
    assert "use SASL_SSL" in find(error, "kafka.security_protocol")


def test_client_keys_with_their_own_setting_are_refused(tmp_path: Path) -> None:
    error = problems_of(
        write(tmp_path, "kafka: {bootstrap_servers: 'k:1', client: {bootstrap.servers: x}}\n")
    )
    assert "set kafka.bootstrap_servers instead" in str(error)
    error = problems_of(write(tmp_path, "kafka: {bootstrap_servers: 'k:1', client: {linger_ms: 5}}\n"))
    assert "'linger.ms'" in str(error)


# ---------------------------------------------------------------------------- environment overrides


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_YAML)
    config = load_config(
        path,
        environ={
            "STREAMPROV__KAFKA__BOOTSTRAP_SERVERS": "kafka-0.kafka:9092,kafka-1.kafka:9092",
            "STREAMPROV__TOPICS__FAHRENHEIT__CHECKS__REDERIVATION__SAMPLE_RATE": "0.5",
            "STREAMPROV__TOPICS__FAHRENHEIT__RECOMPUTE__TRIGGERS": "[stale]",
            "STREAMPROV__TOPICS__NEW_TOPIC__CRITICALITY": "critical",
            "STREAMPROV__VALIDATOR__BATCH_SIZE": "100",
            "STREAMPROV__SOURCES": "[readings, other]",
            "STREAMPROV__KAFKA__CLIENT__LINGER.MS": "20",
            "UNRELATED": "x",
            "STREAMPROV_BOOTSTRAP_SERVERS": "single-underscore-is-not-an-override:1",
        },
    )
    assert config.kafka.bootstrap_servers == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert config.topic("fahrenheit").checks.rederivation.sample_rate == 0.5
    assert config.topic("fahrenheit").criticality is Criticality.HIGH  # the rest of the file stays
    assert config.topic("fahrenheit").recompute.triggers == (RecomputeTrigger.STALE,)
    assert config.topic("new_topic").criticality is Criticality.CRITICAL
    assert config.validator.batch_size == 100
    assert config.sources == ("readings", "other")
    assert config.kafka.librdkafka()["linger.ms"] == "20"
    assert load_config(path, environ={}).validator.batch_size == 500


def test_env_password_replaces_the_files_password_source(tmp_path: Path) -> None:
    path = write(tmp_path, SASL_YAML.replace(f'password: "{SECRET}"', "password_file: /nonexistent"))
    config = load_config(path, environ={"STREAMPROV__KAFKA__SASL__PASSWORD": SECRET})
    assert config.kafka.sasl is not None and config.kafka.sasl.password_file is None
    assert config.kafka.librdkafka()["sasl.password"] == SECRET
    assert SECRET not in repr(config)


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    error = problems_of(
        write(tmp_path, ISSUE_YAML),
        environ={
            "STREAMPROV__TOPICS__FAHRENHEIT__CRITICALITY": "urgent",
            "STREAMPROV__VALIDATOR__BACTH_SIZE": "5",
            "STREAMPROV__SOURCES__X": "y",
            "STREAMPROV____": "z",
        },
    )
    enum = find(error, "topics.fahrenheit.criticality")
    assert enum.startswith("environment variable STREAMPROV__TOPICS__FAHRENHEIT__CRITICALITY: ")
    assert "'urgent' is not allowed" in enum
    assert "did you mean 'batch_size'?" in find(error, "validator.bacth_size")
    assert "cannot set a key inside it" in find(error, "sources")
    assert "not a setting path" in str(error)


def test_a_misspelt_section_in_a_variable_is_blamed_on_the_variable(tmp_path: Path) -> None:
    """The unknown key is the section the variable made, which the file does not have: it was
    reported against the file (found by probing)."""
    error = problems_of(write(tmp_path, ISSUE_YAML), environ={"STREAMPROV__VALIDATR__BATCH_SIZE": "5"})
    assert find(error, "validatr").startswith("environment variable STREAMPROV__VALIDATR__BATCH_SIZE: ")


# ------------------------------------------------------------------------------------- schema / docs


def _fields(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    names: set[str] = set()
    if model in seen:
        return names
    seen.add(model)
    for name, field in model.model_fields.items():
        names.add(name)
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            for arg in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    names |= _fields(arg, seen)
    return names


def test_docs_describe_every_setting() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name in sorted(_fields(StreamprovConfig, set())):
        described = f"`{name}`" in docs or f".{name}`" in docs
        assert described, f"docs/configuration.md does not describe `{name}`"
    assert "STREAMPROV__KAFKA__BOOTSTRAP_SERVERS" in docs
    assert EXAMPLE_YAML in docs, "docs/configuration.md must show `streamprov config example` verbatim"


def test_json_schema_matches_the_models() -> None:
    schema = config_json_schema()
    assert schema["required"] == ["kafka"]
    criticality = schema["$defs"]["Criticality"]
    assert criticality["enum"] == [c.value for c in Criticality]
    draft7 = config_json_schema(draft="07")
    assert "$defs" not in draft7 and "Criticality" in draft7["definitions"]
    assert "#/$defs/" not in str(draft7)


def test_librdkafka_names_and_values_in_kafka_client_are_checked(tmp_path: Path) -> None:
    """librdkafka checks them when a client is built: a misspelt `lingr.ms` passed `config validate`
    and stopped the service at start (found by probing). Checked without connecting anywhere."""
    text = ISSUE_YAML.replace(
        "  client: {}\n", '  client: {"lingr.ms": 5, "linger.ms": "soon", "fetch.wait.max.ms": 10}\n', 1
    )
    assert text != ISSUE_YAML
    error = problems_of(write(tmp_path, text), environ={"STREAMPROV__KAFKA__CLIENT__RETRIES.MAX": "x"})
    assert "librdkafka has no such setting" in find(error, 'kafka.client["lingr.ms"]')
    assert "refuses its value" in find(error, 'kafka.client["linger.ms"]')
    assert find(error, 'kafka.client["retries.max"]').startswith("environment variable STREAMPROV__")
    assert 'kafka.client["fetch.wait.max.ms"]' not in str(error)
