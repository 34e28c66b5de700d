"""Lineage and impact out of the ledger, in the formats other tools read.

A `LineageGraph` is the part of the provenance DAG a query returned: data nodes (DataID + checksum)
and the applications between them, in dependency order. It renders as

- `tree`: text for a terminal, from each target back to its sources (or from a root to what derives);
- `prov-json`: W3C PROV-JSON (entities = data nodes, activities = applications, agents = devices;
  used, wasGeneratedBy, wasDerivedFrom, wasAssociatedWith), loadable by the `prov` package;
- `openlineage`: one OpenLineage RunEvent (COMPLETE) per application: job = the function, run id =
  a UUID derived from the entry_id, datasets = DataIDs with the checksum as their version facet;
- `dot`: Graphviz text (data nodes as ellipses, applications as boxes).

Pure functions over the query results; no I/O.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from streamprov import __version__
from streamprov.ledger.model import Application, ApplicationKind, DataRef
from streamprov.ledger.queries import Applied, DownstreamResult, UpstreamResult

FORMATS = ("tree", "prov-json", "openlineage", "dot")
PRODUCER = f"https://github.com/streamprov/streamprov/tree/v{__version__}"
OPENLINEAGE_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
DATASET_VERSION_FACET = "https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet"
RUN_NAMESPACE = uuid.UUID("6f1d8e52-3c0b-5a7e-9d43-5e6b1c2a7f10")
"""UUIDv5 namespace of OpenLineage run ids: runId = uuid5(RUN_NAMESPACE, entry_id hex)."""
SP_NS = "https://streamprov.io/ns/ledger#"
_TREE_INPUTS = 5


@dataclass(frozen=True, slots=True)
class LineageGraph:
    """Applications (dependency order) and the nodes they touch; `targets` are what was asked about."""

    targets: tuple[DataRef, ...]
    applications: tuple[Applied, ...]
    sources: tuple[DataRef, ...]
    direction: str
    """'upstream' (lineage) or 'downstream' (impact)."""
    truncated: bool = False

    @classmethod
    def of_upstream(cls, results: Sequence[UpstreamResult]) -> LineageGraph:
        apps: dict[bytes, Applied] = {}
        sources: dict[DataRef, None] = {}
        for r in results:
            for a in r.applications:
                apps.setdefault(a.entry.entry_id, a)
            sources.update(dict.fromkeys(r.sources))
        ordered = sorted(apps.values(), key=lambda a: a.entry.seq)
        return cls(
            tuple(r.target for r in results),
            tuple(ordered),
            tuple(sources),
            "upstream",
            any(r.truncated for r in results),
        )

    @classmethod
    def of_downstream(cls, result: DownstreamResult) -> LineageGraph:
        return cls(result.roots, result.applications, result.roots, "downstream", result.truncated)

    @property
    def nodes(self) -> tuple[DataRef, ...]:
        seen: dict[DataRef, None] = dict.fromkeys(self.targets)
        for a in self.applications:
            app = a.entry.application
            seen.update(dict.fromkeys(app.inputs))
            seen[app.output] = None
        return tuple(seen)


def render(graph: LineageGraph, fmt: str, *, namespace: str = "streamprov") -> str:
    """The graph as text in one of `FORMATS`."""
    if fmt == "tree":
        return to_tree(graph)
    if fmt == "prov-json":
        return json.dumps(to_prov_json(graph), indent=2, sort_keys=True)
    if fmt == "openlineage":
        return "\n".join(json.dumps(e, sort_keys=True) for e in to_openlineage(graph, namespace=namespace))
    if fmt == "dot":
        return to_dot(graph)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


# -- tree ---------------------------------------------------------------------------------------------
def _app_label(app: Application) -> str:
    if app.kind is ApplicationKind.SOURCE:
        return f"source ({app.context.source or 'seen'})"
    args = ", ".join(f"{k}={v}" for k, v in sorted(app.parameters))
    window = ""
    if app.window_start is not None:
        window = f" window [{app.window_start}, {app.window_end})"
    origin = f" recompute {app.task_id or ''}".rstrip() if app.origin else ""
    return f"{app.kind.name.lower()} {app.function_id}@{app.function_version}({args}){window}{origin}"


def to_tree(graph: LineageGraph) -> str:
    """Indented text. Upstream: each target, the application that made it, its inputs, and so on back
    to the sources. Downstream: each root, the applications that consumed it, their outputs, ..."""
    producers: dict[DataRef, list[Applied]] = {}
    consumers: dict[DataRef, list[Applied]] = {}
    for a in graph.applications:
        app = a.entry.application
        producers.setdefault(app.output, []).append(a)
        for ref in dict.fromkeys(app.inputs):
            consumers.setdefault(ref, []).append(a)
    lines: list[str] = []
    upstream = graph.direction == "upstream"
    for target in graph.targets:
        lines.append(target.describe())
        _tree(lines, target, producers if upstream else consumers, upstream, "", set())
    if graph.truncated:
        lines.append(f"... ({truncation_note(graph)})")
    return "\n".join(lines)


def truncation_note(graph: LineageGraph) -> str:
    """What a graph cut short by its query's limit says, naming the option of the command that made
    it (lineage or impact); `tree` and `dot` carry it, the CLI prints it for every format."""
    return f"truncated: raise {'--max-depth' if graph.direction == 'upstream' else '--limit'} to see more"


def _tree(
    lines: list[str],
    ref: DataRef,
    edges: dict[DataRef, list[Applied]],
    upstream: bool,
    indent: str,
    path: set[bytes],
) -> None:
    apps = [a for a in edges.get(ref, []) if a.entry.entry_id not in path]
    for i, a in enumerate(apps):
        last = i == len(apps) - 1
        app = a.entry.application
        lines.append(
            f"{indent}{'└─ ' if last else '├─ '}{_app_label(app)}  [seq {a.entry.seq}, {app.device_id}]"
        )
        child_indent = indent + ("   " if last else "│  ")
        nexts = list(dict.fromkeys(app.inputs)) if upstream else [app.output]
        shown = nexts[:_TREE_INPUTS] if len(nexts) > _TREE_INPUTS + 1 else nexts
        for j, n in enumerate(shown):
            more = len(nexts) - len(shown)
            n_last = j == len(shown) - 1 and not more
            lines.append(f"{child_indent}{'└─ ' if n_last else '├─ '}{n.describe()}")
            if n != ref:  # an identity step maps a node onto itself: do not loop
                _tree(
                    lines,
                    n,
                    edges,
                    upstream,
                    child_indent + ("   " if n_last else "│  "),
                    path | {a.entry.entry_id},
                )
        if len(nexts) > len(shown):
            lines.append(f"{child_indent}└─ ... {len(nexts) - len(shown)} more inputs")


# -- W3C PROV-JSON --------------------------------------------------------------------------------------
def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _entity_id(ref: DataRef) -> str:
    c = ref.checksum
    return f"data:{quote(ref.data_id, safe='')}.{c.algorithm.name.lower()}.{c.value.hex()}"


def _activity_id(entry_id: bytes) -> str:
    return f"app:{entry_id.hex()}"


def _agent_id(device: str) -> str:
    return f"device:{quote(device, safe='') or 'unknown'}"


def to_prov_json(graph: LineageGraph) -> dict[str, Any]:
    """W3C PROV-JSON (https://www.w3.org/submissions/prov-json/) of the graph."""
    entity: dict[str, Any] = {}
    for ref in graph.nodes:
        entity[_entity_id(ref)] = {
            "prov:label": ref.describe(),
            "sp:dataId": ref.data_id,
            "sp:checksum": ref.checksum.hex(),
        }
    activity: dict[str, Any] = {}
    agent: dict[str, Any] = {}
    used: dict[str, Any] = {}
    generated: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    associated: dict[str, Any] = {}
    for a in graph.applications:
        e, app = a.entry, a.entry.application
        act = _activity_id(e.entry_id)
        time = {"$": _iso(app.timestamp_ms), "type": "xsd:dateTime"}
        attrs: dict[str, Any] = {
            "prov:label": _app_label(app),
            "prov:startTime": time["$"],
            "prov:endTime": time["$"],
            "sp:kind": app.kind.name,
            "sp:seq": e.seq,
            "sp:entryId": e.entry_id.hex(),
        }
        if app.kind is not ApplicationKind.SOURCE:
            attrs["sp:function"] = app.function_id
            attrs["sp:functionVersion"] = app.function_version
            attrs["sp:codeHash"] = app.code_hash.hex()
        for k, v in sorted(app.parameters):
            attrs[f"sp:param_{quote(k, safe='')}"] = v
        if app.context.source:
            attrs["sp:contextSource"] = app.context.source
        if app.context.location:
            attrs["sp:location"] = app.context.location
        if app.context.access_rights:
            attrs["sp:accessRights"] = ",".join(app.context.access_rights)
        activity[act] = attrs
        ag = _agent_id(app.device_id)
        agent.setdefault(ag, {"prov:type": {"$": "prov:SoftwareAgent", "type": "prov:QUALIFIED_NAME"}})
        associated[f"_:assoc{e.seq}"] = {"prov:activity": act, "prov:agent": ag}
        out = _entity_id(app.output)
        generated[f"_:gen{e.seq}"] = {"prov:entity": out, "prov:activity": act, "prov:time": time["$"]}
        for i, ref in enumerate(dict.fromkeys(app.inputs)):
            used[f"_:use{e.seq}.{i}"] = {"prov:activity": act, "prov:entity": _entity_id(ref)}
            derived[f"_:der{e.seq}.{i}"] = {
                "prov:generatedEntity": out,
                "prov:usedEntity": _entity_id(ref),
                "prov:activity": act,
            }
    doc: dict[str, Any] = {
        "prefix": {
            "sp": SP_NS,
            "data": "urn:streamprov:data:",
            "app": "urn:streamprov:application:",
            "device": "urn:streamprov:device:",
        },
        "entity": entity,
    }
    for name, part in (
        ("activity", activity),
        ("agent", agent),
        ("used", used),
        ("wasGeneratedBy", generated),
        ("wasDerivedFrom", derived),
        ("wasAssociatedWith", associated),
    ):
        if part:
            doc[name] = part
    return doc


# -- OpenLineage -------------------------------------------------------------------------------------------
def run_id(entry_id: bytes) -> str:
    """The OpenLineage runId of an application: deterministic, so re-exports name the same run."""
    return str(uuid.uuid5(RUN_NAMESPACE, entry_id.hex()))


def _dataset(ref: DataRef, namespace: str, io_facets: str) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "name": ref.data_id,
        "facets": {
            "version": {
                "_producer": PRODUCER,
                "_schemaURL": DATASET_VERSION_FACET,
                "datasetVersion": ref.checksum.hex(),
            }
        },
        io_facets: {},
    }


def to_openlineage(graph: LineageGraph, *, namespace: str = "streamprov") -> list[dict[str, Any]]:
    """One OpenLineage RunEvent (eventType COMPLETE) per non-SOURCE application, in dependency order.

    job = `<function_id>@<version>` in `namespace`; inputs/outputs = DataIDs (namespace `namespace`)
    with their checksum as the dataset version facet; runId = UUIDv5 of the entry_id.
    """
    events = []
    for a in graph.applications:
        app = a.entry.application
        if app.kind is ApplicationKind.SOURCE:
            continue
        events.append(
            {
                "eventType": "COMPLETE",
                "eventTime": _iso(app.timestamp_ms),
                "producer": PRODUCER,
                "schemaURL": OPENLINEAGE_SCHEMA,
                "run": {"runId": run_id(a.entry.entry_id), "facets": {}},
                "job": {
                    "namespace": namespace,
                    "name": f"{app.function_id}@{app.function_version}",
                    "facets": {},
                },
                "inputs": [_dataset(r, namespace, "inputFacets") for r in dict.fromkeys(app.inputs)],
                "outputs": [_dataset(app.output, namespace, "outputFacets")],
            }
        )
    return events


# -- Graphviz DOT ---------------------------------------------------------------------------------------
def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: LineageGraph) -> str:
    """Graphviz DOT text: data nodes are ellipses (targets bold), applications boxes."""
    ids: dict[DataRef, str] = {ref: f"n{i}" for i, ref in enumerate(graph.nodes)}
    targets = set(graph.targets)
    lines = [f"digraph {_dot_str(graph.direction)} {{", "  rankdir=LR;", "  node [fontsize=10];"]
    if graph.truncated:  # shown under the drawing
        lines.append(f"  label={_dot_str(truncation_note(graph))};")
    for ref, nid in ids.items():
        style = ", style=bold" if ref in targets else ""
        label = f"{ref.data_id}\n{ref.checksum.hex()}"
        lines.append(f"  {nid} [shape=ellipse, label={_dot_str(label)}{style}];")
    for a in graph.applications:
        app = a.entry.application
        aid = f"a{a.entry.seq}"
        lines.append(f"  {aid} [shape=box, label={_dot_str(_app_label(app))}];")
        for ref in dict.fromkeys(app.inputs):
            lines.append(f"  {ids[ref]} -> {aid};")
        lines.append(f"  {aid} -> {ids[app.output]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def targets_of(versions: Iterable[DataRef], consumed_same_id: set[DataRef]) -> list[DataRef]:
    """The latest versions of a DataID along its map chain: versions no same-DataID step consumed."""
    found = [v for v in versions if v not in consumed_same_id]
    return found or list(versions)
