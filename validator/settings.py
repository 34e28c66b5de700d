"""What the Validator service runs with, resolved once from `streamprov.yaml` (`StreamprovConfig`).

The YAML models (`streamprov.config`) describe what an operator writes; `ServiceSettings` is what the
loop needs, in the units it uses (librdkafka dict, milliseconds, a compiled `TopicPolicy` per topic),
plus the knobs that are not part of the file (bind host, commit interval, timeouts). Tests build it
directly; the CLI builds it with `from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamprov.ledger.config import checkpoint_verifier
from streamprov.ledger.signing import CheckpointVerifier
from validator.checks import TopicPolicy
from validator.errors import ValidatorConfigError

if TYPE_CHECKING:
    from streamprov.config.models import StreamprovConfig, TopicSettings


def _ms(value: timedelta | None) -> int | None:
    return None if value is None else round(value.total_seconds() * 1000)


def policy_from_settings(settings: TopicSettings) -> TopicPolicy:
    """The checks a topic's config block switches on, with limits in milliseconds."""
    checks = settings.checks
    staleness = checks.staleness
    rederivation = checks.rederivation
    return TopicPolicy(
        integrity=checks.integrity,
        source_drift=checks.source_drift,
        rederive_rate=rederivation.sample_rate if rederivation.enabled else 0.0,
        source_max_age_ms=_ms(staleness.source_max_age) if staleness.enabled else None,
        message_max_age_ms=_ms(staleness.message_max_age) if staleness.enabled else None,
        criticality=settings.criticality,
    )


@dataclass(frozen=True)
class ServiceSettings:
    """Everything `validator.service.Validator` needs."""

    kafka: Mapping[str, Any]
    """librdkafka settings shared by every client (bootstrap.servers, security)."""
    topics: tuple[str, ...]
    """Output topics to validate."""
    alerts_topic: str
    dead_letter_topic: str
    state_dir: Path
    sources: tuple[str, ...] = ()
    group_id: str = "streamprov-validator"
    policies: Mapping[str, TopicPolicy] = field(default_factory=dict)
    default_policy: TopicPolicy = field(default_factory=TopicPolicy)
    http_host: str = "0.0.0.0"  # noqa: S104 - a service in a pod is probed from outside it
    http_port: int | None = None
    """/healthz, /readyz (and /metrics); None: no HTTP server, 0: any free port."""
    metrics_port: int | None = None
    """/metrics for Prometheus; None: not served on a port of its own."""
    batch_size: int = 500
    poll_timeout_s: float = 0.5
    commit_interval_s: float = 1.0
    """Offsets are committed (after every alert so far is acknowledged) at most this often."""
    operation_timeout_s: float = 30.0
    flush_timeout_s: float = 5.0
    """How long one commit attempt waits for acknowledgements before trying again later."""
    source_catch_up_s: float = 10.0
    """How long a batch with drift findings waits for the source view to reach the topics' ends."""
    source_cache_size: int = 100_000
    source_refresh_s: float = 10.0
    """How often the source view looks for new source partitions and topics (also before every
    drift report)."""
    consumer_config: Mapping[str, Any] = field(default_factory=dict)
    producer_config: Mapping[str, Any] = field(default_factory=dict)
    ledger_topic: str | None = None
    """The provenance ledger topic: reduce outputs' sources are checked through it (None: they are
    not drift-checked). A ledger topic that does not exist is a warning, not an error."""
    ledger_id: str | None = None
    """The ledger's id (default: the ledger topic's name, as `streamprov ledger` assumes)."""
    checkpoint_verifier: CheckpointVerifier | None = None
    """Verifies the ledger's signed checkpoints as the index reads them (`ledger.checkpoint_key`); a
    ledger that fails it is not used (reduce outputs get no drift check; logged). None: the hash
    chain is checked, signatures are not."""
    ledger_refresh_s: float = 1.0
    """At most this often a record missing from the ledger index makes it catch up with the topic."""

    def __post_init__(self) -> None:
        problems = []
        if not self.topics or not all(self.topics):
            problems.append("no output topics to validate (list them under topics:)")
        if not self.alerts_topic or not self.dead_letter_topic:
            problems.append("the alerts and dead-letter topics must be named")
        if self.batch_size <= 0 or self.poll_timeout_s <= 0 or self.operation_timeout_s <= 0:
            problems.append("batch_size, poll_timeout_s and operation_timeout_s must be positive")
        if self.source_refresh_s <= 0 or self.ledger_refresh_s < 0:
            problems.append("source_refresh_s must be positive and ledger_refresh_s >= 0")
        if self.commit_interval_s < 0 or self.flush_timeout_s <= 0:
            problems.append("commit_interval_s must be >= 0 and flush_timeout_s positive")
        others = {self.alerts_topic, self.dead_letter_topic, *self.sources}
        if self.ledger_topic:
            others.add(self.ledger_topic)
        overlap = set(self.topics) & others
        if overlap:
            problems.append(
                f"topic(s) {sorted(overlap)} are both validated and an alert/dead-letter/source/ledger topic"
            )
        if problems:
            raise ValidatorConfigError("; ".join(problems))

    def policy(self, topic: str) -> TopicPolicy:
        return self.policies.get(topic, self.default_policy)

    @property
    def needs_registry(self) -> list[str]:
        """Topics with re-derivation switched on (they need a function registry)."""
        names = [t for t in self.topics if self.policy(t).rederive_rate > 0]
        return names

    @classmethod
    def from_config(
        cls,
        config: StreamprovConfig,
        *,
        topics: Sequence[str] | None = None,
        http_host: str = "0.0.0.0",  # noqa: S104
        **overrides: Any,
    ) -> ServiceSettings:
        """Settings from a loaded `streamprov.yaml`; `topics` (else those listed under topics:)."""
        chosen = tuple(topics) if topics else config.output_topics()
        v = config.validator
        return cls(
            kafka=config.kafka.librdkafka(),
            topics=chosen,
            alerts_topic=config.streams.alerts,
            dead_letter_topic=config.streams.dead_letters,
            state_dir=Path(v.state_dir),
            sources=tuple(config.sources),
            group_id=v.group_id,
            policies={t: policy_from_settings(config.topic(t)) for t in chosen},
            default_policy=policy_from_settings(config.defaults),
            http_host=http_host,
            http_port=v.http_port,
            metrics_port=v.metrics_port,
            batch_size=v.batch_size,
            **{
                "ledger_topic": config.streams.ledger,
                "ledger_id": config.ledger_id(),
                "checkpoint_verifier": checkpoint_verifier(config),
                **overrides,
            },
        )
