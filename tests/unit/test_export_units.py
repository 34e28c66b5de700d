"""Lineage/impact exports from a ledger index: the text tree, W3C PROV-JSON (loaded back by the `prov`
package), OpenLineage RunEvents (rebuilt with the OpenLineage client's classes, generated from the
spec, and serialised back to the same JSON), DOT; and the `streamprov lineage` / `impact` commands."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from ledger_support import LEDGER, build, node, pipeline
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
from openlineage.client.serde import Serde
from prov.model import ProvDocument
from typer.testing import CliRunner

from streamprov.cli import app
from streamprov.export import LineageGraph, run_id, to_dot, to_openlineage, to_prov_json, to_tree
from streamprov.export.cli import TargetError, parse_target
from streamprov.export.lineage import PRODUCER, render
from streamprov.ledger import DataRef, LedgerIndex

runner = CliRunner()


@pytest.fixture
def index(tmp_path: Path) -> LedgerIndex:
    idx = LedgerIndex(tmp_path / "idx", LEDGER)
    idx.catch_up(build(pipeline(2, chain_len=2, fan_in=3)))
    return idx


def _final(idx: LedgerIndex) -> DataRef:
    return node("g1", "published")


def test_tree_walks_back_to_every_source(index: LedgerIndex) -> None:
    graph = LineageGraph.of_upstream([index.upstream(_final(index))])
    text = to_tree(graph)
    assert text.splitlines()[0] == _final(index).describe()
    assert "map publish@1()" in text and "reduce sum@1()" in text and "window [0, 60000)" in text
    for s in range(3):
        assert node(f"g1-s{s}", "v0").describe() in text
    assert text.count("source (orders)") == 3
    shallow = to_tree(LineageGraph.of_upstream([index.upstream(_final(index), max_depth=1)]))
    assert "reduce" not in shallow and "truncated" in shallow
    down = to_tree(LineageGraph.of_downstream(index.downstream("g0-s0")))
    assert down.index("map0") < down.index("map1") < down.index("sum") < down.index("publish")


def test_prov_json_loads_with_the_prov_package(index: LedgerIndex) -> None:
    graph = LineageGraph.of_upstream([index.upstream(_final(index))])
    text = render(graph, "prov-json")
    doc = ProvDocument.deserialize(content=text, format="json")
    records = list(doc.get_records())
    kinds = {}
    for r in records:
        kinds[r.get_type().localpart] = kinds.get(r.get_type().localpart, 0) + 1
    apps = len(graph.applications)  # 3 sources + 6 maps + 1 reduce + 1 publish
    assert apps == 11
    assert kinds["Activity"] == apps and kinds["Entity"] == len(graph.nodes) == 3 + 6 + 2
    assert kinds["Generation"] == apps and kinds["Usage"] == 6 + 3 + 1 and kinds["Association"] == apps
    assert kinds["Derivation"] == kinds["Usage"]
    again = ProvDocument.deserialize(content=doc.serialize(format="json"), format="json")
    assert again == doc
    raw = to_prov_json(graph)
    labels = {v["prov:label"] for v in raw["entity"].values()}
    assert _final(index).describe() in labels


def test_openlineage_events_match_the_spec_generated_classes(index: LedgerIndex) -> None:
    graph = LineageGraph.of_upstream([index.upstream(_final(index))])
    events = to_openlineage(graph, namespace="kafka://cluster")
    assert len(events) == 8  # SOURCE entries are not runs
    for ours, applied in zip(
        events, [a for a in graph.applications if a.entry.application.function_id], strict=True
    ):
        app = applied.entry.application

        def ds(cls: type, ref: DataRef) -> object:
            return cls(
                namespace="kafka://cluster",
                name=ref.data_id,
                facets={
                    "version": DatasetVersionDatasetFacet(
                        datasetVersion=ref.checksum.hex(), producer=PRODUCER
                    )
                },
            )

        theirs = RunEvent(
            eventType=RunState.COMPLETE,
            eventTime=ours["eventTime"],
            run=Run(runId=ours["run"]["runId"]),
            job=Job(namespace="kafka://cluster", name=f"{app.function_id}@{app.function_version}"),
            inputs=[ds(InputDataset, r) for r in dict.fromkeys(app.inputs)],
            outputs=[ds(OutputDataset, app.output)],
            producer=PRODUCER,
        )
        assert Serde.to_dict(theirs) == ours
        assert uuid.UUID(ours["run"]["runId"]).version == 5
        assert ours["run"]["runId"] == run_id(applied.entry.entry_id)
    reduce = next(e for e in events if e["job"]["name"] == "sum@1")
    assert len(reduce["inputs"]) == 3 and reduce["outputs"][0]["name"] == "g1"


def test_dot_is_graphviz_text(index: LedgerIndex, tmp_path: Path) -> None:
    graph = LineageGraph.of_downstream(index.downstream("g0-s1"))
    dot = to_dot(graph)
    assert dot.startswith('digraph "downstream" {') and dot.rstrip().endswith("}")
    assert dot.count("shape=box") == len(graph.applications) == 4
    assert dot.count(" -> ") == sum(len(set(a.entry.application.inputs)) + 1 for a in graph.applications)
    if shutil.which("dot"):  # optional: render it when Graphviz is installed
        import subprocess  # noqa: PLC0415

        svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg


def test_parse_target() -> None:
    ref = node("a@b", "x")
    assert parse_target(ref.describe()) == ref
    assert parse_target("plain-id") == "plain-id"
    parsed = parse_target("id@sha256:" + "ab" * 32)
    assert isinstance(parsed, DataRef) and parsed.checksum.value == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize(
    "text", ["id@crc32c:abc", "id@crc32c:deadbeef01", "id@crc32c:xyzw1234", "id@sha256:abcd", "id@crc32c:"]
)
def test_parse_target_refuses_a_digest_of_the_wrong_form(text: str) -> None:
    with pytest.raises(TargetError, match="8 hex digits"):
        parse_target(text)


def test_cli_an_exact_node_the_ledger_lacks_is_not_found(index: LedgerIndex) -> None:
    path = index.path
    index.close()
    base = ["--index-dir", str(path), "--ledger-id", LEDGER]
    for command in ("lineage", "impact"):
        res = runner.invoke(app, [command, "g1@crc32c:deadbeef", *base])
        assert res.exit_code == 1 and "not in the ledger" in res.output, res.output
        res = runner.invoke(app, [command, "g1@crc32c:abc", *base])  # odd-length hex: a typo
        assert res.exit_code == 2 and "DATAID@crc32c:<8 hex digits>" in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        res = runner.invoke(app, [command, "g1@crc32c:deadbeef01", *base])  # 5 bytes
        assert res.exit_code == 2 and "8 hex digits" in res.output, res.output
    res = runner.invoke(app, ["impact", "nosuch@crc32c:deadbeef", *base, "-f", "json"])
    assert res.exit_code == 1 and "not in the ledger" in res.output


def test_cli_lineage_and_impact_offline(index: LedgerIndex) -> None:
    path = index.path
    index.close()
    base = ["--index-dir", str(path), "--ledger-id", LEDGER]
    res = runner.invoke(app, ["lineage", "g1", *base])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == _final(index).describe()  # the latest version of g1
    res = runner.invoke(app, ["lineage", "g1-s2", *base, "--format", "prov-json"])
    assert res.exit_code == 0, res.output
    ProvDocument.deserialize(content=res.output, format="json")
    res = runner.invoke(app, ["lineage", "g1", *base, "--format", "openlineage", "--max-depth", "2"])
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [e["job"]["name"] for e in lines] == ["sum@1", "publish@1"]
    assert res.stderr == "note: truncated: raise --max-depth to see more\n"
    res = runner.invoke(app, ["impact", "g0-s2", *base, "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [a["application"].split(" ")[1] for a in out["applications"]] == [
        "map0@1():",
        "map1@1():",
        "sum@1():",
        "publish@1():",
    ]
    assert out["outputs"][-1] == node("g0", "published").describe()
    res = runner.invoke(app, ["impact", "g0-s2", *base, "--format", "dot"])
    assert res.exit_code == 0 and res.output.startswith("digraph")
    res = runner.invoke(app, ["impact", "nope", *base])
    assert res.exit_code == 1 and "not in the ledger" in res.output
    res = runner.invoke(app, ["lineage", "g1", *base, "--format", "xml"])
    assert res.exit_code == 2


def test_cli_an_index_dir_that_is_missing_or_a_file_is_a_clear_error(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("lineage", "impact"):
        for where in (tmp_path / "missing", empty, a_file, a_file / "idx"):
            res = runner.invoke(app, [command, "g1", "--index-dir", str(where), "--ledger-id", LEDGER])
            assert res.exit_code == 2 and str(where) in res.output, res.output
            assert isinstance(res.exception, SystemExit), res.exception
    assert not (tmp_path / "missing").exists() and not any(empty.iterdir())


def test_cli_truncated_trees_name_the_option_that_widens_them(index: LedgerIndex) -> None:
    path = index.path
    index.close()
    base = ["--index-dir", str(path), "--ledger-id", LEDGER]
    res = runner.invoke(app, ["impact", "g0-s2", *base, "--limit", "1"])
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "... (truncated: raise --limit to see more)"
    res = runner.invoke(app, ["lineage", "g1", *base, "--max-depth", "1"])
    assert res.exit_code == 0
    assert res.output.splitlines()[-1] == "... (truncated: raise --max-depth to see more)"


@pytest.mark.parametrize("fmt", ["prov-json", "openlineage", "dot"])
def test_cli_every_format_says_when_it_is_truncated(index: LedgerIndex, fmt: str) -> None:
    """Only `tree` said so: a PROV-JSON, OpenLineage or DOT export cut short by --limit/--max-depth
    looked complete. The note goes to stderr (the document stays valid); DOT also labels the drawing."""
    path = index.path
    index.close()
    base = ["--index-dir", str(path), "--ledger-id", LEDGER, "--format", fmt]
    res = runner.invoke(app, ["impact", "g0-s2", *base, "--limit", "1"])
    assert res.exit_code == 0 and "note: truncated: raise --limit to see more" in res.stderr
    assert "truncated" not in res.stdout or fmt == "dot"
    full = runner.invoke(app, ["impact", "g0-s2", *base])
    assert full.exit_code == 0 and "truncated" not in full.stderr + full.stdout
    if fmt == "dot":
        assert 'label="truncated: raise --limit to see more";' in res.stdout
    res = runner.invoke(app, ["lineage", "g1", *base, "--max-depth", "1"])
    assert res.exit_code == 0 and "note: truncated: raise --max-depth to see more" in res.stderr
