"""Exports of the provenance ledger: lineage and impact as a tree, W3C PROV-JSON, OpenLineage, DOT.

lineage     LineageGraph + renderers (pure functions over ledger query results)
cli         `streamprov lineage` and `streamprov impact` (mounted by streamprov/cli.py)
"""

from __future__ import annotations

from streamprov.export.lineage import (
    FORMATS,
    LineageGraph,
    render,
    run_id,
    to_dot,
    to_openlineage,
    to_prov_json,
    to_tree,
)

__all__ = [
    "FORMATS",
    "LineageGraph",
    "render",
    "run_id",
    "to_dot",
    "to_openlineage",
    "to_prov_json",
    "to_tree",
]
