"""The topic-level configuration: frozen pydantic models, one per block of `streamprov.yaml`.

Every model is frozen and rejects unknown keys, so a typo is an error and not a silently ignored
setting. Secrets are `SecretStr` (masked in `repr`, `str`, `as_dict()` and errors). Durations are
written `"30s"`, `"15m"`, `"1h"`, `"2d"` (combinations such as `"1h30m"`, and `"500ms"`, work too) or a
number of seconds, and become `datetime.timedelta`.

Load a file with `streamprov.config.load_config`; it applies `STREAMPROV__A__B` environment
overrides and turns validation errors into a `ConfigError` that lists every problem with its line.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from streamprov.checksum import ChecksumAlgorithm

__all__ = [
    "ChecksSettings",
    "ChecksumAlgorithm",
    "Criticality",
    "Duration",
    "KafkaSettings",
    "MetricsSettings",
    "OtlpProtocol",
    "OtlpSettings",
    "RecomputeManagerSettings",
    "RecomputeSettings",
    "RecomputeTrigger",
    "RederivationCheck",
    "SaslMechanism",
    "SaslSettings",
    "SecurityProtocol",
    "SigningAlgorithm",
    "SigningKey",
    "SigningSettings",
    "SslSettings",
    "StalenessCheck",
    "StreamSettings",
    "StreamprovConfig",
    "TelemetrySettings",
    "TopicSettings",
    "TopicSigning",
    "TracingExporter",
    "TracingSettings",
    "ValidatorSettings",
    "format_duration",
    "parse_duration",
]

# --------------------------------------------------------------------------------------- errors

CROSS_CHECK_ERROR: Final = "streamprov_config"
"""Error type of cross-field problems; ctx["problems"] holds (relative location, message, hint)."""

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str, str | None]


def _problems(problems: list[Problem]) -> PydanticCustomError:
    """One validation error carrying several located problems (the loader spreads them out again)."""
    summary = "; ".join(f"{_dotted(loc)}: {msg}" if loc else msg for loc, msg, _ in problems)
    return PydanticCustomError(CROSS_CHECK_ERROR, "{summary}", {"summary": summary, "problems": problems})


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def _custom(kind: str, message: str, hint: str | None = None) -> PydanticCustomError:
    """A single error; `hint` (what to write instead) rides in ctx for the loader to show."""
    ctx: dict[str, Any] = {"detail": message}
    if hint:
        ctx["hint"] = hint
    return PydanticCustomError(kind, "{detail}", ctx)


# ------------------------------------------------------------------------------------ durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_PATTERN: Final = r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h|d))+)\s*$"
_DURATION_HINT: Final = "write a number with a unit - '500ms', '30s', '15m', '1h', '2d', '1h30m' - or seconds"


def parse_duration(value: object) -> timedelta:
    """`"30s"`, `"15m"`, `"1h30m"`, `"2d"`, `"500ms"`, `90` (seconds) or a timedelta -> timedelta (>= 0)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise _custom("duration", "is not a duration (true/false)", _DURATION_HINT)
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_FULL.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise _custom("duration", f"{value!r} is not a duration", _DURATION_HINT)
    else:
        raise _custom("duration", f"is not a duration ({type(value).__name__})", _DURATION_HINT)
    if not math.isfinite(seconds) or seconds < 0:
        raise _custom("duration", "must not be negative", _DURATION_HINT)
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling: 3600s -> "1h", 90s -> "90s", 0.5s -> "500ms"."""
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    for unit, factor in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis % factor == 0:
            return f"{millis // factor}{unit}"
    return f"{millis}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: '500ms', '30s', '15m', '1h', '2d', '1h30m', or a number of seconds.",
        }
    ),
]

# ---------------------------------------------------------------------------------- small types

_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
TOPIC_NAME_PATTERN: Final = r"^[a-zA-Z0-9._-]{1,249}$"


def _check_topic_name(name: str) -> str:
    if not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
        raise _custom(
            "topic_name",
            f"{name!r} is not a valid Kafka topic name",
            "use 1-249 characters from a-z A-Z 0-9 . _ - (not '.' or '..')",
        )
    return name


TopicName = Annotated[
    str,
    AfterValidator(_check_topic_name),
    WithJsonSchema({"type": "string", "pattern": TOPIC_NAME_PATTERN}),
]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise _custom(
            "env_name",
            f"{name!r} is not an environment variable name",
            "name the variable that holds the secret, e.g. KAFKA_PASSWORD (letters, digits, _)",
        )
    return name


EnvName = Annotated[
    str,
    AfterValidator(_check_env_name),
    WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"}),
]

Port = Annotated[int, Field(ge=1, le=65535)]


def _checksum_algorithm(value: object) -> ChecksumAlgorithm:
    if isinstance(value, ChecksumAlgorithm):
        return value
    if isinstance(value, str):
        try:
            return ChecksumAlgorithm[value.strip().upper().replace("-", "")]
        except KeyError:
            pass
    raise PydanticCustomError(
        "enum", "Input should be 'crc32c' or 'sha256'", {"expected": "'crc32c' or 'sha256'"}
    )


ChecksumName = Annotated[
    ChecksumAlgorithm,
    BeforeValidator(_checksum_algorithm),
    PlainSerializer(lambda algorithm: algorithm.name.lower(), return_type=str),
    WithJsonSchema({"type": "string", "enum": ["crc32c", "sha256"]}),
]


class SecurityProtocol(enum.StrEnum):
    """librdkafka `security.protocol`."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def uses_sasl(self) -> bool:
        return self in {SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL}

    @property
    def uses_tls(self) -> bool:
        return self in {SecurityProtocol.SSL, SecurityProtocol.SASL_SSL}


class SaslMechanism(enum.StrEnum):
    """librdkafka `sasl.mechanism`."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    GSSAPI = "GSSAPI"
    OAUTHBEARER = "OAUTHBEARER"

    @property
    def needs_password(self) -> bool:
        return self in {SaslMechanism.PLAIN, SaslMechanism.SCRAM_SHA_256, SaslMechanism.SCRAM_SHA_512}


class Criticality(enum.StrEnum):
    """How much a wrong result on a topic matters; orders recompute work (`rank`: low 0 .. critical 3)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return list(Criticality).index(self)


class RecomputeTrigger(enum.StrEnum):
    """What may start a recompute of a topic's records."""

    CHECKSUM_MISMATCH = "checksum_mismatch"
    SOURCE_CHANGED = "source_changed"
    REDERIVATION_MISMATCH = "rederivation_mismatch"
    STALE = "stale"


class _Settings(BaseModel):
    """Frozen, strict about unknown keys, and never echoes inputs (which may be secrets) in errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible values, durations as strings, every secret masked as '**********'."""
        return self.model_dump(mode="json")


def _read_secret(
    location: str, value: SecretStr | None, file: Path | None, env: str | None, environ: Mapping[str, str]
) -> SecretStr | None:
    """The secret from whichever source is set; ValueError (with no secret in it) if it can't be read."""
    if value is not None:
        return value
    if file is not None:
        try:
            return SecretStr(file.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise ValueError(
                f"{location}_file: cannot read {str(file)!r} ({exc.strerror or type(exc).__name__})"
            ) from None
    if env is not None:
        if env not in environ:
            raise ValueError(f"{location}_env: environment variable {env} is not set")
        return SecretStr(environ[env])
    return None


# ---------------------------------------------------------------------------------------- kafka


class SaslSettings(_Settings):
    """SASL credentials. Give the password one way: `password`, `password_file` or `password_env`."""

    mechanism: SaslMechanism = SaslMechanism.SCRAM_SHA_512
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: EnvName | None = None

    @model_validator(mode="after")
    def _credentials(self) -> SaslSettings:
        problems: list[Problem] = []
        sources = [n for n in ("password", "password_file", "password_env") if getattr(self, n) is not None]
        if len(sources) > 1:
            problems.append(
                (
                    (sources[1],),
                    f"the password is given twice ({' and '.join(sources)})",
                    "keep one of password, password_file, password_env",
                )
            )
        if self.mechanism.needs_password:
            if not self.username:
                problems.append((("username",), f"{self.mechanism} needs a username", None))
            if not sources:
                problems.append(
                    (
                        ("password",),
                        f"{self.mechanism} needs a password",
                        "set password_file (a mounted secret) or password_env (a variable holding it), "
                        "or the environment variable STREAMPROV__KAFKA__SASL__PASSWORD",
                    )
                )
        if problems:
            raise _problems(problems)
        return self

    def resolve_password(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        """The password from `password`, the file or the variable; ValueError if it cannot be read."""
        return _read_secret(
            "password",
            self.password,
            self.password_file,
            self.password_env,
            os.environ if environ is None else environ,
        )


class SslSettings(_Settings):
    """TLS files (PEM) and the private key's password (given one way, like the SASL password)."""

    ca_location: str | None = None
    certificate_location: str | None = None
    key_location: str | None = None
    key_password: SecretStr | None = None
    key_password_file: Path | None = None
    key_password_env: EnvName | None = None

    @model_validator(mode="after")
    def _pairs(self) -> SslSettings:
        problems: list[Problem] = []
        if (self.certificate_location is None) != (self.key_location is None):
            missing = "key_location" if self.key_location is None else "certificate_location"
            problems.append(
                (
                    (missing,),
                    "a client certificate needs both certificate_location and key_location",
                    f"set {missing}, or remove the other one",
                )
            )
        sources = [
            n
            for n in ("key_password", "key_password_file", "key_password_env")
            if getattr(self, n) is not None
        ]
        if len(sources) > 1:
            problems.append(
                (
                    (sources[1],),
                    f"the key password is given twice ({' and '.join(sources)})",
                    "keep one of key_password, key_password_file, key_password_env",
                )
            )
        if problems:
            raise _problems(problems)
        return self

    def resolve_key_password(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        return _read_secret(
            "key_password",
            self.key_password,
            self.key_password_file,
            self.key_password_env,
            os.environ if environ is None else environ,
        )


_BOOTSTRAP = re.compile(r"(?:[A-Za-z_]+://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")
_BOOTSTRAP_HINT: Final = 'write HOST:PORT[,HOST:PORT...], e.g. bootstrap_servers: "kafka-0.kafka:9092"'

_TYPED_KEYS: Final = {
    "bootstrap.servers": "kafka.bootstrap_servers",
    "metadata.broker.list": "kafka.bootstrap_servers",
    "security.protocol": "kafka.security_protocol",
    "sasl.mechanism": "kafka.sasl.mechanism",
    "sasl.mechanisms": "kafka.sasl.mechanism",
    "sasl.username": "kafka.sasl.username",
    "sasl.password": "kafka.sasl.password (or password_file / password_env)",
    "ssl.ca.location": "kafka.ssl.ca_location",
    "ssl.certificate.location": "kafka.ssl.certificate_location",
    "ssl.key.location": "kafka.ssl.key_location",
    "ssl.key.password": "kafka.ssl.key_password (or key_password_file / key_password_env)",
    "group.id": "validator.group_id / recompute_manager.group_id",
}
_SECRET_MARKERS: Final = (
    "password",
    "secret",
    "token",
    "jaas",
    "key.pem",
    "credential",
    "oauthbearer.config",
)


def is_secret_key(key: str) -> bool:
    """Whether a setting's name says it holds a secret (its value is masked and never printed)."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def _client_key(key: str) -> str:
    if key in _TYPED_KEYS:
        raise _custom("client_key", f"{key!r} has its own setting", f"set {_TYPED_KEYS[key]} instead")
    if "_" in key and "." not in key:
        raise _custom(
            "client_key",
            f"{key!r} does not look like a librdkafka setting",
            f"librdkafka settings are dotted, e.g. {key.replace('_', '.')!r}",
        )
    return key


def _client_value(value: object) -> str | SecretStr:
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise _custom(
        "client_value",
        f"must be a single value, not {type(value).__name__}",
        "librdkafka settings are strings, numbers or true/false",
    )


ClientKey = Annotated[str, AfterValidator(_client_key)]
ClientValue = Annotated[
    str | SecretStr,
    BeforeValidator(_client_value),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]


class KafkaSettings(_Settings):
    """How the services reach Kafka; `librdkafka()` turns it into a client configuration."""

    bootstrap_servers: str
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl: SaslSettings | None = None
    ssl: SslSettings | None = None
    client: dict[ClientKey, ClientValue] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",")]
        for server in servers:
            match = _BOOTSTRAP.fullmatch(server)
            if match is None or not 1 <= int(match.group(1)) <= 65535:
                shown = f"{server!r} is not HOST:PORT" if server else "is empty"
                raise _custom("bootstrap_servers", shown, _BOOTSTRAP_HINT)
        return ",".join(servers)

    @field_validator("client", mode="after")
    @classmethod
    def _mask_client_secrets(cls, value: dict[str, str | SecretStr]) -> dict[str, str | SecretStr]:
        return {
            key: SecretStr(item) if isinstance(item, str) and is_secret_key(key) else item
            for key, item in value.items()
        }

    @model_validator(mode="after")
    def _protocol_matches_blocks(self) -> KafkaSettings:
        problems: list[Problem] = []
        protocol = self.security_protocol
        if protocol.uses_sasl and self.sasl is None:
            problems.append(
                (
                    ("sasl",),
                    f"security_protocol {protocol} needs a sasl block",
                    "add sasl: {mechanism: SCRAM-SHA-512, username: ..., password_file: ...}",
                )
            )
        if self.sasl is not None and not protocol.uses_sasl:
            problems.append(
                (
                    ("security_protocol",),
                    f"a sasl block is set but security_protocol is {protocol}",
                    "use SASL_SSL (or SASL_PLAINTEXT), or remove the sasl block",
                )
            )
        if self.ssl is not None and not protocol.uses_tls:
            problems.append(
                (
                    ("security_protocol",),
                    f"an ssl block is set but security_protocol is {protocol}",
                    "use SSL or SASL_SSL, or remove the ssl block",
                )
            )
        if problems:
            raise _problems(problems)
        return self

    def librdkafka(self, *, redact: bool = False, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The librdkafka configuration, secrets included (read now from their file or variable).

        With `redact=True` every secret is '**********' instead: for logs and `config validate`.
        ValueError if a password file or variable cannot be read (the message names no secret).
        """
        conf: dict[str, str] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol.value,
        }

        def secret(value: SecretStr | None) -> str | None:
            if value is None:
                return None
            return "**********" if redact else value.get_secret_value()

        if self.sasl is not None:
            conf["sasl.mechanism"] = self.sasl.mechanism.value
            if self.sasl.username is not None:
                conf["sasl.username"] = self.sasl.username
            password = self.sasl.password if redact else self.sasl.resolve_password(environ)
            if redact and password is None and (self.sasl.password_file or self.sasl.password_env):
                password = SecretStr("x")
            shown = secret(password)
            if shown is not None:
                conf["sasl.password"] = shown
        if self.ssl is not None:
            for key, value in (
                ("ssl.ca.location", self.ssl.ca_location),
                ("ssl.certificate.location", self.ssl.certificate_location),
                ("ssl.key.location", self.ssl.key_location),
            ):
                if value is not None:
                    conf[key] = value
            ssl = self.ssl
            key_password = ssl.key_password if redact else ssl.resolve_key_password(environ)
            if redact and key_password is None and (ssl.key_password_file or ssl.key_password_env):
                key_password = SecretStr("x")
            shown = secret(key_password)
            if shown is not None:
                conf["ssl.key.password"] = shown
        for key, item in self.client.items():
            conf[key] = (secret(item) or "") if isinstance(item, SecretStr) else item
        return conf

    def redacted(self) -> dict[str, str]:
        """`librdkafka()` with every secret masked: safe to log."""
        return self.librdkafka(redact=True)


# ------------------------------------------------------------------------------------ telemetry


class TracingExporter(enum.StrEnum):
    """Where finished spans go: nowhere (context is still propagated), an OTLP collector, stdout."""

    NONE = "none"
    OTLP = "otlp"
    CONSOLE = "console"


class OtlpProtocol(enum.StrEnum):
    HTTP_PROTOBUF = "http/protobuf"
    GRPC = "grpc"


_URL = re.compile(r"https?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::\d{1,5})?(?:/\S*)?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _check_url(value: str) -> str:
    if not _URL.fullmatch(value):
        raise _custom(
            "url",
            f"{value!r} is not an http(s) URL",
            "write the collector's base URL, e.g. http://otel-collector:4318 (http/protobuf) or "
            "http://otel-collector:4317 (grpc)",
        )
    return value


def _check_header_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise _custom("header_name", f"{name!r} is not an HTTP header name", "e.g. authorization, x-api-key")
    return name.lower()


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


class OtlpSettings(_Settings):
    """The OTLP collector traces and metrics are exported to (`tracing.exporter: otlp`, `metrics.otlp`).

    Header values are often credentials: name an environment variable holding each one
    (`headers_env`); `headers` is for values that are not secret, and is masked anyway.
    """

    endpoint: Annotated[str, AfterValidator(_check_url)] | None = None
    protocol: OtlpProtocol = OtlpProtocol.HTTP_PROTOBUF
    headers: dict[HeaderName, SecretStr] = Field(default_factory=dict)
    headers_env: dict[HeaderName, EnvName] = Field(default_factory=dict)
    timeout: Duration = timedelta(seconds=10)

    @model_validator(mode="after")
    def _headers_once(self) -> OtlpSettings:
        both = sorted(set(self.headers) & set(self.headers_env))
        if both:
            raise _problems(
                [(("headers_env", both[0]), f"header {both[0]!r} is also under headers", "keep one of them")]
            )
        return self

    def resolve_headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every header with its value (read now from the variables); ValueError names a missing one."""
        env = os.environ if environ is None else environ
        out = {name: value.get_secret_value() for name, value in self.headers.items()}
        for name, variable in self.headers_env.items():
            if variable not in env:
                raise ValueError(f"headers_env.{name}: environment variable {variable} is not set")
            out[name] = env[variable]
        return out


class TracingSettings(_Settings):
    """OpenTelemetry tracing of the data path (docs/telemetry.md)."""

    enabled: bool = False
    sampling_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """Share of new traces sampled at their root; downstream stages follow the root's decision."""
    exporter: TracingExporter = TracingExporter.NONE
    max_queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 2048
    """Finished spans waiting for export; past it spans are dropped, never the data path blocked."""


class MetricsSettings(_Settings):
    """Service metrics: Prometheus `/metrics` on `<service>.metrics_port`, optionally pushed over OTLP."""

    prometheus: bool = True
    otlp: bool = False
    export_interval: Duration = timedelta(seconds=60)

    @field_validator("export_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1:
            raise _custom("export_interval", "must be at least 1s", "e.g. 15s or 60s")
        return value


class TelemetrySettings(_Settings):
    """Traces and metrics of the services and agents (`streamprov.telemetry.setup` builds them)."""

    service_name: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    """OpenTelemetry `service.name`; null: the component's own (`streamprov-validator`, ...)."""
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    otlp: OtlpSettings = Field(default_factory=OtlpSettings)

    @model_validator(mode="after")
    def _otlp_endpoint(self) -> TelemetrySettings:
        users = []
        if self.tracing.enabled and self.tracing.exporter is TracingExporter.OTLP:
            users.append("tracing.exporter: otlp")
        if self.metrics.otlp:
            users.append("metrics.otlp: true")
        if users and self.otlp.endpoint is None:
            raise _problems(
                [
                    (
                        ("otlp", "endpoint"),
                        f"{' and '.join(users)} need an OTLP endpoint",
                        "set otlp.endpoint, e.g. http://otel-collector:4318",
                    )
                ]
            )
        return self


# -------------------------------------------------------------------------------------- signing


class SigningAlgorithm(enum.StrEnum):
    HMAC = "hmac"
    """HMAC-SHA256: one shared secret, held by stampers and validators."""
    ED25519 = "ed25519"
    """Ed25519: stampers hold the private key, validators only the public key."""


_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_ID_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"


def _check_key_id(value: str) -> str:
    if not _KEY_ID.fullmatch(value):
        raise _custom(
            "key_id",
            f"{value!r} is not a key id",
            "use 1-64 characters from a-z A-Z 0-9 . _ - (e.g. pipeline-2026)",
        )
    return value


KeyId = Annotated[
    str, AfterValidator(_check_key_id), WithJsonSchema({"type": "string", "pattern": KEY_ID_PATTERN})
]


class SigningKey(_Settings):
    """One key, by id. Secrets come from a file (a mounted Secret) or an environment variable only.

    hmac: `secret_file` or `secret_env` (at least 16 bytes). ed25519: the PEM private key
    (`private_key_file` / `private_key_env`) where records are signed, the PEM public key
    (`public_key`, `public_key_file`) where they are verified; a private key verifies too.
    """

    algorithm: SigningAlgorithm
    secret_file: Path | None = None
    secret_env: EnvName | None = None
    private_key_file: Path | None = None
    private_key_env: EnvName | None = None
    public_key: str | None = None
    public_key_file: Path | None = None

    @model_validator(mode="after")
    def _material(self) -> SigningKey:
        problems: list[Problem] = []
        given = {n for n in type(self).model_fields if n != "algorithm" and getattr(self, n) is not None}
        hmac_fields = {"secret_file", "secret_env"}
        ed_fields = given - hmac_fields
        if self.algorithm is SigningAlgorithm.HMAC:
            for name in sorted(ed_fields):
                problems.append(
                    ((name,), "is for ed25519 keys", "an hmac key takes secret_file or secret_env")
                )
            if not given & hmac_fields:
                problems.append(
                    (
                        ("secret_file",),
                        "an hmac key needs its secret",
                        "set secret_file (a mounted Secret) or secret_env (a variable holding it)",
                    )
                )
            elif len(given & hmac_fields) > 1:
                problems.append(
                    (("secret_env",), "the secret is given twice", "keep secret_file or secret_env")
                )
        else:
            for name in sorted(given & hmac_fields):
                problems.append(
                    ((name,), "is for hmac keys", "an ed25519 key takes private_key_* and/or public_key*")
                )
            private = [n for n in ("private_key_file", "private_key_env") if n in given]
            public = [n for n in ("public_key", "public_key_file") if n in given]
            if len(private) > 1:
                problems.append(((private[1],), "the private key is given twice", "keep one of them"))
            if len(public) > 1:
                problems.append(((public[1],), "the public key is given twice", "keep one of them"))
            if not private and not public:
                problems.append(
                    (
                        ("public_key_file",),
                        "an ed25519 key needs a private key (to sign) or a public key (to verify)",
                        "set private_key_file where records are signed, public_key_file where verified",
                    )
                )
        if problems:
            raise _problems(problems)
        return self

    @property
    def can_sign(self) -> bool:
        if self.algorithm is SigningAlgorithm.HMAC:
            return True
        return self.private_key_file is not None or self.private_key_env is not None


class TopicSigning(_Settings):
    """Signed provenance on one output topic (or, under `defaults:`, on every topic)."""

    key: KeyId | None = None
    """The key id stampers writing this topic sign with (from `signing.keys`); null: unsigned."""
    verify: bool = False
    """The Validator requires a valid signature (`bad_signature` alert otherwise)."""
    accept: tuple[KeyId, ...] | None = None
    """Key ids the Validator accepts here; null: every key of `signing.keys`."""


class SigningSettings(_Settings):
    """The keys, by id; topics name them under `topics.<topic>.signing` (docs/telemetry.md)."""

    keys: dict[KeyId, SigningKey] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------- topics


class StreamSettings(_Settings):
    """Names of streamprov's own topics. Nothing else in streamprov hard-codes a topic name."""

    alerts: TopicName = "streamprov.alerts"
    dead_letters: TopicName = "streamprov.dead-letters"
    ledger: TopicName = "streamprov.ledger"
    ledger_requests: TopicName = "streamprov.ledger.requests"
    """Applications sent to the shared ledger sequencer (one partition; `ledger.sequencer`)."""
    changes: TopicName = "streamprov.changes"
    recompute_tasks: TopicName = "streamprov.recompute.tasks"
    recompute_progress: TopicName = "streamprov.recompute.progress"

    @model_validator(mode="after")
    def _distinct(self) -> StreamSettings:
        seen: dict[str, str] = {}
        problems: list[Problem] = []
        for field, name in self.names().items():
            if name in seen:
                problems.append(
                    ((field,), f"{name!r} is also streams.{seen[name]}", "give each stream its own topic")
                )
            seen.setdefault(name, field)
        if problems:
            raise _problems(problems)
        return self

    def names(self) -> dict[str, str]:
        """Field -> topic name, e.g. {"alerts": "streamprov.alerts", ...}."""
        return {field: getattr(self, field) for field in type(self).model_fields}


class RederivationCheck(_Settings):
    """Replay the lineage on the original data for a sample of records and compare checksums."""

    enabled: bool = False
    sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01


class StalenessCheck(_Settings):
    """Flag records whose source was not updated within `source_max_age`, or older than `message_max_age`.

    Either age may be null: that half of the check is off.
    """

    enabled: bool = False
    source_max_age: Duration | None = timedelta(hours=1)
    message_max_age: Duration | None = None

    @model_validator(mode="after")
    def _something_to_check(self) -> StalenessCheck:
        if self.enabled and self.source_max_age is None and self.message_max_age is None:
            raise _problems(
                [
                    (
                        ("enabled",),
                        "staleness is enabled but both source_max_age and message_max_age are null",
                        "set source_max_age and/or message_max_age (e.g. '1h'), or enabled: false",
                    )
                ]
            )
        return self


class ChecksSettings(_Settings):
    """What the Validator checks on each record of the topic."""

    integrity: bool = True
    source_drift: bool = True
    rederivation: RederivationCheck = Field(default_factory=RederivationCheck)
    staleness: StalenessCheck = Field(default_factory=StalenessCheck)


class RecomputeSettings(_Settings):
    """The topic's recompute policy, applied by the Recompute Manager."""

    enabled: bool = True
    triggers: tuple[RecomputeTrigger, ...] = tuple(RecomputeTrigger)
    acceptable_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    rate_limit_per_s: Annotated[float, Field(gt=0)] = 50.0
    budget_per_hour: Annotated[int, Field(ge=0)] = 10_000
    dedup_window: Duration = timedelta(minutes=5)
    max_fanout: Annotated[int, Field(ge=1)] = 1000

    @field_validator("triggers")
    @classmethod
    def _unique(cls, value: tuple[RecomputeTrigger, ...]) -> tuple[RecomputeTrigger, ...]:
        repeated = sorted({t.value for t in value if value.count(t) > 1})
        if repeated:
            raise _custom(
                "triggers", f"listed more than once: {', '.join(repeated)}", "list each trigger once"
            )
        return value

    @model_validator(mode="after")
    def _has_trigger(self) -> RecomputeSettings:
        if self.enabled and not self.triggers:
            raise _problems(
                [
                    (
                        ("triggers",),
                        "recompute is enabled but has no triggers",
                        f"list some of {', '.join(t.value for t in RecomputeTrigger)}, or set enabled: false",
                    )
                ]
            )
        return self


class TopicSettings(_Settings):
    """Settings of one output topic (or, under `defaults:`, of every topic not listed)."""

    checksum_algorithm: ChecksumName = ChecksumAlgorithm.CRC32C
    criticality: Criticality = Criticality.MEDIUM
    checks: ChecksSettings = Field(default_factory=ChecksSettings)
    recompute: RecomputeSettings = Field(default_factory=RecomputeSettings)
    signing: TopicSigning = Field(default_factory=TopicSigning)
    priority_topic: TopicName | None = None

    def priority_topic_name(self, topic: str) -> str:
        """Where corrected records of `topic` are published: `priority_topic`, else "<topic>.priority"."""
        return self.priority_topic if self.priority_topic is not None else f"{topic}.priority"


# ------------------------------------------------------------------------------------- services


class ValidatorSettings(_Settings):
    """The Validator service."""

    group_id: Annotated[str, Field(min_length=1)] = "streamprov-validator"
    state_dir: Path = Path("/var/lib/streamprov/validator")
    http_port: Port = 8080
    metrics_port: Port = 9464
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500

    @model_validator(mode="after")
    def _ports(self) -> ValidatorSettings:
        _distinct_ports(self.http_port, self.metrics_port)
        return self


class RecomputeManagerSettings(_Settings):
    """The Recompute Manager service."""

    group_id: Annotated[str, Field(min_length=1)] = "streamprov-recompute-manager"
    state_dir: Path = Path("/var/lib/streamprov/recompute")
    http_port: Port = 8081
    metrics_port: Port = 9465
    workers: Annotated[int, Field(ge=1, le=256)] = 4
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    record_in_ledger: bool = True
    """Send each recompute's ledger entries (origin RECOMPUTE) to the sequencer, in the transaction
    that publishes the corrected records (`streams.ledger_requests`)."""

    @model_validator(mode="after")
    def _ports(self) -> RecomputeManagerSettings:
        _distinct_ports(self.http_port, self.metrics_port)
        return self


class SequencerSettings(_Settings):
    """The shared ledger sequencer (`streamprov ledger sequencer --config`, docs/ledger.md)."""

    group_id: Annotated[str, Field(min_length=1)] | None = None
    """Default: streamprov-ledger-sequencer.<ledger id>."""
    checkpoint_every: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    http_port: Port = 8083


class LedgerSettings(_Settings):
    """The provenance ledger: its id and who signs its checkpoints."""

    id: Annotated[str, Field(min_length=1)] | None = None
    """Default: the ledger topic's name (`streams.ledger`), as `streamprov ledger` assumes."""
    checkpoint_key: KeyId | None = None
    """An ed25519 key under `signing.keys`: the sequencer signs checkpoints with its private key,
    indexes and `ledger verify` check them with its public key. None: unsigned (chain only)."""
    sequencer: SequencerSettings = Field(default_factory=SequencerSettings)


class ChangesSettings(_Settings):
    """The change detector service (`streamprov changes run`, docs/changes.md)."""

    group_id: Annotated[str, Field(min_length=1)] = "streamprov-changes"
    state_dir: Path = Path("/var/lib/streamprov/changes")
    http_port: Port = 8082
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    max_outputs: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    function_check_interval: Duration = timedelta(minutes=5)
    progress_interval: Duration = timedelta(seconds=30)
    record_sources: bool = True
    """Send a SOURCE ledger entry per new source version to the sequencer (`streams.ledger_requests`):
    the Recompute Manager finds a source's current version through them."""


def _distinct_ports(http_port: int, metrics_port: int) -> None:
    if http_port == metrics_port:
        raise _problems(
            [(("metrics_port",), f"is the same port as http_port ({http_port})", "give metrics its own port")]
        )


# ------------------------------------------------------------------------------------------ root


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = _merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return merged


class StreamprovConfig(_Settings):
    """The whole `streamprov.yaml`."""

    kafka: KafkaSettings
    streams: StreamSettings = Field(default_factory=StreamSettings)
    sources: tuple[TopicName, ...] = ()
    defaults: TopicSettings = Field(default_factory=TopicSettings)
    topics: dict[TopicName, TopicSettings] = Field(default_factory=dict)
    validator: ValidatorSettings = Field(default_factory=ValidatorSettings)
    recompute_manager: RecomputeManagerSettings = Field(default_factory=RecomputeManagerSettings)
    changes: ChangesSettings = Field(default_factory=ChangesSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    signing: SigningSettings = Field(default_factory=SigningSettings)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        """Each listed topic starts from `defaults:` (when that block is valid; else it reports alone)."""
        if not isinstance(data, Mapping):
            return data
        topics = data.get("topics")
        if not isinstance(topics, Mapping):
            return data
        defaults = data.get("defaults")
        base: Mapping[str, Any] = {}
        if isinstance(defaults, Mapping):
            try:
                TopicSettings.model_validate(defaults)
            except ValueError:
                base = {}
            else:
                base = {k: v for k, v in defaults.items() if k != "priority_topic"}
        merged = {
            name: _merge(base, settings if settings is not None else {})
            if isinstance(settings, Mapping) or settings is None
            else settings
            for name, settings in topics.items()
        }
        return {**data, "topics": merged}

    @model_validator(mode="after")
    def _topics_do_not_collide(self) -> StreamprovConfig:
        problems: list[Problem] = []
        system = {name: f"streams.{field}" for field, name in self.streams.names().items()}
        seen_sources: set[str] = set()
        for index, source in enumerate(self.sources):
            if source in seen_sources:
                problems.append((("sources", index), f"{source!r} is listed twice", "list each source once"))
            seen_sources.add(source)
            if source in system:
                problems.append(
                    (
                        ("sources", index),
                        f"{source!r} is also {system[source]}",
                        "a source must be its own topic",
                    )
                )
        if self.defaults.priority_topic is not None:
            problems.append(
                (
                    ("defaults", "priority_topic"),
                    "one priority topic for every topic would mix their records",
                    "set priority_topic per topic, or leave it out for '<topic>.priority'",
                )
            )
        priority_of: dict[str, str] = {}
        for name, settings in self.topics.items():
            where: Loc = ("topics", name)
            if name in system:
                problems.append((where, f"{name!r} is also {system[name]}", "validate output topics only"))
            if name in seen_sources:
                problems.append(
                    (
                        where,
                        f"{name!r} is also listed under sources",
                        "a topic is a source or an output, not both",
                    )
                )
            priority = settings.priority_topic_name(name)
            clash = priority_of.get(priority)
            if clash is not None:
                problems.append(
                    (
                        (*where, "priority_topic"),
                        f"{priority!r} is also the priority topic of {clash!r}",
                        "give each topic its own priority topic",
                    )
                )
            priority_of[priority] = name
            if priority in system or priority in seen_sources or priority in self.topics:
                problems.append(
                    (
                        (*where, "priority_topic"),
                        f"{priority!r} is already used as another topic",
                        "name a topic of its own",
                    )
                )
        problems.extend(self._signing_problems())
        problems.extend(self._ledger_key_problems())
        if problems:
            raise _problems(problems)
        return self

    def _signing_problems(self) -> list[Problem]:
        """Every key a topic names exists and can do what the topic asks of it."""
        problems: list[Problem] = []
        keys = self.signing.keys
        known = ", ".join(sorted(keys)) or "none defined"
        blocks: list[tuple[Loc, TopicSettings]] = [(("defaults",), self.defaults)]
        blocks += [(("topics", name), settings) for name, settings in self.topics.items()]
        for where, settings in blocks:
            signing = settings.signing
            if signing.key is not None and signing.key not in keys:
                problems.append(
                    ((*where, "signing", "key"), f"no key {signing.key!r} in signing.keys ({known})",
                     "define it under signing.keys, or name one that is defined")
                )  # fmt: skip
            for index, kid in enumerate(signing.accept or ()):
                if kid not in keys:
                    problems.append(
                        ((*where, "signing", "accept", index), f"no key {kid!r} in signing.keys ({known})",
                         "define it under signing.keys")
                    )  # fmt: skip
            if signing.verify and (not keys or signing.accept == ()):
                problems.append(
                    ((*where, "signing", "verify"), "signatures are required but no key is accepted",
                     "define keys under signing.keys (and list them in accept, or leave accept out)")
                )  # fmt: skip
        return problems

    def _ledger_key_problems(self) -> list[Problem]:
        kid = self.ledger.checkpoint_key
        if kid is None:
            return []
        key = self.signing.keys.get(kid)
        where: Loc = ("ledger", "checkpoint_key")
        if key is None:
            known = ", ".join(sorted(self.signing.keys)) or "none defined"
            return [(where, f"no key {kid!r} in signing.keys ({known})", "define it under signing.keys")]
        if key.algorithm is not SigningAlgorithm.ED25519:
            return [
                (
                    where,
                    f"key {kid!r} is {key.algorithm.value}; checkpoints need a public-key signature",
                    "name an ed25519 key (auditors verify with its public key alone)",
                )
            ]
        return []

    def ledger_id(self) -> str:
        """The ledger's id: `ledger.id`, else the ledger topic's name."""
        return self.ledger.id or self.streams.ledger

    def topic(self, name: str) -> TopicSettings:
        """Settings of output topic `name`: its own block, else `defaults`."""
        return self.topics.get(name, self.defaults)

    def output_topics(self) -> tuple[str, ...]:
        """The output topics listed under `topics:`, in file order."""
        return tuple(self.topics)

    def redacted(self) -> str:
        """The effective configuration as YAML, secrets masked: safe to print."""
        return yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=False)
