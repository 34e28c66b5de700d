"""Topic-level configuration: one YAML file (`streamprov.yaml`) for both services.

    from streamprov.config import load_config
    config = load_config("/etc/streamprov/streamprov.yaml")   # + STREAMPROV__A__B overrides
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": config.validator.group_id})
    settings = config.topic("fahrenheit")                       # defaults for topics not listed

See docs/configuration.md for every setting.
"""

from streamprov.config.errors import ConfigError, ConfigProblem
from streamprov.config.loader import ENV_PREFIX, env_overrides, load_config, loads_config
from streamprov.config.models import (
    ChecksSettings,
    ChecksumAlgorithm,
    Criticality,
    KafkaSettings,
    RecomputeManagerSettings,
    RecomputeSettings,
    RecomputeTrigger,
    RederivationCheck,
    SaslMechanism,
    SaslSettings,
    SecurityProtocol,
    SslSettings,
    StalenessCheck,
    StreamprovConfig,
    StreamSettings,
    TopicSettings,
    ValidatorSettings,
    format_duration,
    parse_duration,
)

__all__ = [
    "ENV_PREFIX",
    "ChecksSettings",
    "ChecksumAlgorithm",
    "ConfigError",
    "ConfigProblem",
    "Criticality",
    "KafkaSettings",
    "RecomputeManagerSettings",
    "RecomputeSettings",
    "RecomputeTrigger",
    "RederivationCheck",
    "SaslMechanism",
    "SaslSettings",
    "SecurityProtocol",
    "SslSettings",
    "StalenessCheck",
    "StreamSettings",
    "StreamprovConfig",
    "TopicSettings",
    "ValidatorSettings",
    "env_overrides",
    "format_duration",
    "load_config",
    "loads_config",
    "parse_duration",
]
