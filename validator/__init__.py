"""The Validator service: checks every record of the output topics and publishes alerts.

Per record, switched per topic: integrity (payload checksum vs header), source drift (the header's
source checksum vs the current source record in a local RocksDB view of the source topics),
sampled re-derivation (replay the lineage's registered map functions on the source value),
staleness (source and record age). Findings go out as Avro `Alert`s (`schemas/alert.avsc`);
malformed records go to the dead-letter topic too. See docs/validator.md.

    from streamprov.config import load_config
    from validator import ServiceSettings, Validator
    with Validator(ServiceSettings.from_config(load_config("streamprov.yaml"))) as v:
        v.run()

Names are imported on first use, so mounting the CLI (`streamprov validator`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from validator.alerts import Alert, AlertKind, Evidence
    from validator.checks import Checker, TopicPolicy
    from validator.errors import FatalValidatorError, SourceViewError, ValidatorConfigError, ValidatorError
    from validator.service import Validator, ValidatorStats
    from validator.settings import ServiceSettings
    from validator.source_view import SourceView

_MODULES = {
    "Alert": "alerts",
    "AlertKind": "alerts",
    "Evidence": "alerts",
    "Checker": "checks",
    "TopicPolicy": "checks",
    "FatalValidatorError": "errors",
    "SourceViewError": "errors",
    "ValidatorConfigError": "errors",
    "ValidatorError": "errors",
    "Validator": "service",
    "ValidatorStats": "service",
    "ServiceSettings": "settings",
    "SourceView": "source_view",
}

__all__ = [
    "Alert",
    "AlertKind",
    "Checker",
    "Evidence",
    "FatalValidatorError",
    "ServiceSettings",
    "SourceView",
    "SourceViewError",
    "TopicPolicy",
    "Validator",
    "ValidatorConfigError",
    "ValidatorError",
    "ValidatorStats",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value
