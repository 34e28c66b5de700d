"""Topic-level configuration: one YAML file (`streamprov.yaml`) for both services.

    from streamprov.config import load_config
    config = load_config("/etc/streamprov/streamprov.yaml")   # + STREAMPROV__A__B overrides
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": config.validator.group_id})
    settings = config.topic("fahrenheit")                       # defaults for topics not listed

See docs/configuration.md for every setting. Names are imported on first use, so importing
this package (as the `streamprov` command does) does not load pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "ConfigError": "errors",
    "ConfigProblem": "errors",
    "ENV_PREFIX": "loader",
    "env_overrides": "loader",
    "load_config": "loader",
    "loads_config": "loader",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES.get(name, 'models')}")
    value = getattr(module, name)
    globals()[name] = value
    return value


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
