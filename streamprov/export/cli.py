"""`streamprov lineage` and `streamprov impact`: query the ledger and export what it says.

Both read a local `LedgerIndex` (`--index-dir`), first brought up to date from the ledger topic
(`--bootstrap-servers`, `--ledger-topic`; without them the index is used as it is, offline).

    streamprov lineage <data-id | id@crc32c:hex> [--format tree|prov-json|openlineage|dot] [--max-depth N]
    streamprov impact <data-id | id@crc32c:hex> [--format tree|json|prov-json|openlineage|dot] [--limit N]

A bare DataID means: lineage of its latest versions along its map chain (the versions no step of the
same DataID consumed); impact of its source versions. An exact node (`id@crc32c:` 8 hex digits,
`id@sha256:` 64) must be one an application read or wrote. Exit codes: 0 found, 1 not in the ledger
(a DataID or node the index does not have), 2 could not read it or a usage error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.errors import StreamprovError
from streamprov.export.lineage import FORMATS, LineageGraph, render, targets_of, truncation_note
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import DataRef

EXIT_NOT_FOUND = 1
EXIT_ERROR = 2
_NODE = re.compile(r"^(?P<id>.+)@(?P<alg>crc32c|sha256):(?P<hex>.*)$")
_HEX = re.compile(r"[0-9a-fA-F]*")
DIGEST_HEX_DIGITS = {ChecksumAlgorithm.CRC32C: 8, ChecksumAlgorithm.SHA256: 64}
NODE_FORM = "DATAID@crc32c:<8 hex digits> or DATAID@sha256:<64 hex digits>"

Bootstrap = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers", "-b", envvar="STREAMPROV_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers."
    ),
]
LedgerTopic = Annotated[
    str | None,
    typer.Option("--ledger-topic", "-t", envvar="STREAMPROV_LEDGER_TOPIC", help="The ledger topic."),
]
IndexDir = Annotated[
    Path,
    typer.Option(
        "--index-dir", "-i", envvar="STREAMPROV_LEDGER_INDEX", help="Local RocksDB index directory."
    ),
]
LedgerId = Annotated[
    str | None,
    typer.Option("--ledger-id", envvar="STREAMPROV_LEDGER_ID", help="Ledger id (default: the topic name)."),
]
Target = Annotated[
    str, typer.Argument(help="A DataID, or one version of it: DATA_ID@crc32c:HEX (as printed).")
]
Namespace = Annotated[str, typer.Option(help="OpenLineage namespace of jobs and datasets.")]
Svg = Annotated[
    Path | None,
    typer.Option(help="With --format dot: also render SVG to this file (needs Graphviz `dot` on PATH)."),
]


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class TargetError(StreamprovError, ValueError):
    """A `DATAID@alg:...` whose digest is not its algorithm's: a mistyped node, not a DataID to look up."""


def parse_target(text: str) -> DataRef | str:
    """`id@alg:hex` is one node (as `DataRef.describe()` prints it); anything else is a DataID.

    Raises `TargetError` when the digest is not hex of the algorithm's length (a node with a 5-byte
    CRC32C cannot be in any ledger; saying "not found" for a typo would mislead).
    """
    m = _NODE.match(text)
    if m is None:
        return text
    algorithm = ChecksumAlgorithm[m["alg"].upper()]
    digits = m["hex"]
    if len(digits) != DIGEST_HEX_DIGITS[algorithm] or not _HEX.fullmatch(digits):
        raise TargetError(f"bad node {text!r}: expected {NODE_FORM}")
    return DataRef(m["id"], Checksum(algorithm, bytes.fromhex(digits)))


def in_ledger(index: LedgerIndex, node: DataRef) -> bool:
    """Some application read or wrote `node` (an exact node the index does not know is not found)."""
    return bool(index.producers(node) or index.consumers(node))


def _target(text: str) -> DataRef | str:
    try:
        return parse_target(text)
    except TargetError as exc:
        _fail(str(exc))


def open_index(
    index_dir: Path, ledger_topic: str | None, bootstrap: str | None, ledger_id: str | None
) -> LedgerIndex:
    """The index, caught up with the topic when one is given."""
    lid = ledger_id or ledger_topic
    if not lid:
        _fail("which ledger? pass --ledger-topic (and --bootstrap-servers), or --ledger-id for an index")
    from streamprov.ledger.cli import check_ledger_topic, open_ledger_index  # noqa: PLC0415

    if bootstrap and ledger_topic:  # before the index: none is made for a topic that is not there
        try:
            check_ledger_topic(bootstrap, ledger_topic, option="--ledger-topic")
        except StreamprovError as exc:
            _fail(str(exc))
    hint = "pass --bootstrap-servers and --ledger-topic to build it (or run `streamprov ledger index`)"
    try:
        index = open_ledger_index(index_dir, lid, create=bool(bootstrap and ledger_topic), build_hint=hint)
    except StreamprovError as exc:
        _fail(str(exc))
    if bootstrap and ledger_topic:
        from streamprov.ledger.kafka import KafkaLedgerReader  # noqa: PLC0415 - keep --help fast

        try:
            index.catch_up(KafkaLedgerReader(bootstrap, ledger_topic))
        except StreamprovError as exc:
            index.close()
            _fail(f"reading ledger topic {ledger_topic}: {exc}")
    return index


def lineage_targets(index: LedgerIndex, target: DataRef | str) -> list[DataRef]:
    """The nodes to walk back from; none when the ledger does not have the target."""
    if isinstance(target, DataRef):
        return [target] if in_ledger(index, target) else []
    versions = index.versions(target)
    consumed_same_id = {
        v
        for v in versions
        for eid in index.consumers(v)
        if index.entry(eid).application.output.data_id == target
    }
    return targets_of(versions, consumed_same_id)


def _emit(graph: LineageGraph, fmt: str, namespace: str, svg: Path | None) -> None:
    text = render(graph, fmt, namespace=namespace)
    typer.echo(text)
    if graph.truncated and fmt != "tree":  # the tree says so in its last line
        typer.secho(f"note: {truncation_note(graph)}", err=True)
    if svg is not None:
        if fmt != "dot":
            _fail("--svg needs --format dot")
        dot = shutil.which("dot")
        if dot is None:
            typer.secho("note: Graphviz `dot` is not installed; no SVG written", err=True)
            return
        done = subprocess.run([dot, "-Tsvg", "-o", str(svg)], input=text, text=True, check=False, timeout=60)
        if done.returncode != 0:
            _fail(f"dot failed with exit code {done.returncode}")


def lineage(
    target: Target,
    bootstrap_servers: Bootstrap = None,
    ledger_topic: LedgerTopic = None,
    index_dir: IndexDir = Path(".streamprov/ledger-index"),
    ledger_id: LedgerId = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of {', '.join(FORMATS)}.")] = "tree",
    max_depth: Annotated[int | None, typer.Option(min=1, help="Applications to walk back at most.")] = None,
    namespace: Namespace = "streamprov",
    svg: Svg = None,
) -> None:
    """Where data came from: the applications back to its sources (from the provenance ledger)."""
    if fmt not in FORMATS:
        _fail(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    parsed = _target(target)
    with open_index(index_dir, ledger_topic, bootstrap_servers, ledger_id) as index:
        targets = lineage_targets(index, parsed)
        if not targets:
            _fail(f"{target} is not in the ledger", EXIT_NOT_FOUND)
        graph = LineageGraph.of_upstream([index.upstream(t, max_depth=max_depth) for t in targets])
    _emit(graph, fmt, namespace, svg)


def impact(
    target: Target,
    bootstrap_servers: Bootstrap = None,
    ledger_topic: LedgerTopic = None,
    index_dir: IndexDir = Path(".streamprov/ledger-index"),
    ledger_id: LedgerId = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help=f"json, or one of {', '.join(FORMATS)}.")
    ] = "tree",
    limit: Annotated[int | None, typer.Option(min=1, help="Applications to visit at most.")] = None,
    namespace: Namespace = "streamprov",
    svg: Svg = None,
) -> None:
    """What derives from data: every affected application and output, in dependency (replay) order."""
    if fmt not in (*FORMATS, "json"):
        _fail(f"unknown format {fmt!r}; json or one of {', '.join(FORMATS)}")
    parsed = _target(target)
    with open_index(index_dir, ledger_topic, bootstrap_servers, ledger_id) as index:
        if not (in_ledger(index, parsed) if isinstance(parsed, DataRef) else index.versions(parsed)):
            _fail(f"{target} is not in the ledger", EXIT_NOT_FOUND)
        result = index.downstream(parsed, limit=limit)
    graph = LineageGraph.of_downstream(result)
    if fmt == "json":
        typer.echo(
            json.dumps(
                {
                    "roots": [r.describe() for r in result.roots],
                    "outputs": [o.describe() for o in result.outputs],
                    "applications": [
                        {
                            "seq": a.entry.seq,
                            "entry_id": a.entry.entry_id.hex(),
                            "depth": a.depth,
                            "application": a.entry.application.describe(),
                        }
                        for a in result.applications
                    ],
                    "truncated": result.truncated,
                    "cyclic": result.cyclic,
                },
                indent=2,
            )
        )
        return
    _emit(graph, fmt, namespace, svg)
