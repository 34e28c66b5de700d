"""The Validator service: checks every record of the output topics and publishes alerts.

Per record, switched per topic: integrity (payload checksum vs header), source drift (the header's
source checksum vs the current source record in a local RocksDB view of the source topics),
sampled re-derivation (replay the lineage's registered map functions on the source value),
staleness (source and record age). Findings go out as Avro `Alert`s (`schemas/alert.avsc`);
malformed records go to the dead-letter topic too. See docs/validator.md.

    from validator import ServiceSettings, Validator
    with Validator(ServiceSettings.from_config(load_config("streamprov.yaml"))) as v:
        v.run()
"""

from validator.alerts import Alert, AlertKind, Evidence
from validator.checks import Checker, TopicPolicy
from validator.errors import FatalValidatorError, SourceViewError, ValidatorConfigError, ValidatorError
from validator.service import Validator, ValidatorStats
from validator.settings import ServiceSettings
from validator.source_view import SourceView

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
