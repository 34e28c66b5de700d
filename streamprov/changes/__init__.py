"""Change detection: new source versions and changed functions, as change events with their impact.

event       ChangeEvent (schemas/change_event.avsc): what changed, the impacted outputs in order
detector    ChangeDetector: watches source topics (RocksDB view of the last checksums) and the
            function registry against the ledger; writes SOURCE ledger entries for new versions
"""

from __future__ import annotations

from streamprov.changes.detector import ChangeDetector, ChangeDetectorError, DetectorStats, SourceVersions
from streamprov.changes.event import (
    ChangeEvent,
    ChangeEventError,
    ChangeKind,
    FunctionChange,
    Impact,
    ImpactedOutput,
    SourceChange,
)

__all__ = [
    "ChangeDetector",
    "ChangeDetectorError",
    "ChangeEvent",
    "ChangeEventError",
    "ChangeKind",
    "DetectorStats",
    "FunctionChange",
    "Impact",
    "ImpactedOutput",
    "SourceChange",
    "SourceVersions",
]
