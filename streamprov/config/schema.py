"""JSON Schema of `streamprov.yaml`, for editors (YAML language server) and the Helm chart's values."""

from __future__ import annotations

import json
from typing import Any

from streamprov.config.models import StreamprovConfig

__all__ = ["config_json_schema"]

_DROP = frozenset({"title", "format"})


def _draft07(node: Any) -> Any:
    """pydantic's 2020-12 schema -> draft-07: `$defs` -> `definitions`, titles and formats dropped."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP and not isinstance(value, dict):
                continue
            if key == "$ref" and isinstance(value, str):
                out[key] = value.replace("#/$defs/", "#/definitions/")
            else:
                out["definitions" if key == "$defs" else key] = _draft07(value)
        return out
    if isinstance(node, list):
        return [_draft07(item) for item in node]
    return node


def config_json_schema(*, draft: str = "2020-12") -> dict[str, Any]:
    """The schema of the whole file. `draft="07"` gives JSON Schema draft-07 (what Helm charts use)."""
    schema = StreamprovConfig.model_json_schema(mode="validation")
    if draft == "2020-12":
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    if draft == "07":
        converted: dict[str, Any] = _draft07(schema)
        return converted
    raise ValueError(f"unknown JSON Schema draft {draft!r}: use '2020-12' or '07'")


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
