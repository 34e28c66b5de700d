"""The `streamprov` command: run the demo, look inside topics and headers."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sys
from typing import Annotated, Any

import typer

from recompute_manager.cli import recompute_app, recompute_manager_app
from streamprov import __version__
from streamprov.changes.cli import changes_app
from streamprov.config.cli import config_app
from streamprov.errors import StreamprovError
from streamprov.export.cli import impact as impact_command
from streamprov.export.cli import lineage as lineage_command
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger.cli import ledger_app
from validator.cli import validator_app

app = typer.Typer(
    name="streamprov",
    help="Provenance and selective recomputation for Apache Kafka pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
header_app = typer.Typer(help="Work with single provenance headers.", no_args_is_help=True)
app.add_typer(header_app, name="header")
app.add_typer(ledger_app, name="ledger")
app.add_typer(config_app, name="config")
app.add_typer(validator_app, name="validator")
app.add_typer(changes_app, name="changes")
app.add_typer(recompute_manager_app, name="recompute-manager")
app.add_typer(recompute_app, name="recompute")
app.command("lineage")(lineage_command)
app.command("impact")(impact_command)

BootstrapOption = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers",
        "-b",
        envvar="STREAMPROV_BOOTSTRAP_SERVERS",
        help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT].",
        show_default=False,
    ),
]


def _fail(message: str, hint: str | None = None) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code=1)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def version() -> None:
    """Print the streamprov version."""
    typer.echo(__version__)


@app.command()
def demo(
    bootstrap_servers: BootstrapOption = None,
    records: Annotated[int, typer.Option(min=1, max=100_000, help="Source records to produce.")] = 12,
) -> None:
    """Run a small source -> map -> reduce pipeline and show the provenance it records.

    Without --bootstrap-servers an embedded Kafka-compatible broker is started and stopped again;
    with it, the pipeline runs on that cluster and its topics are left there for inspection.
    """
    from streamprov.demo import run_demo  # noqa: PLC0415 - keep `--help` fast

    try:
        run_demo(bootstrap_servers, records, echo=typer.echo)
    except StreamprovError as exc:
        _fail(str(exc), "run with -v for details")


@app.command()
def inspect(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    bootstrap_servers: BootstrapOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Stop after this many records.")] = 10,
    timeout: Annotated[float, typer.Option(min=0.1, help="Give up after this many idle seconds.")] = 10.0,
) -> None:
    """Print records of a topic (from the beginning) with their decoded provenance headers."""
    if not bootstrap_servers:
        _fail(
            "no Kafka to read from", "pass --bootstrap-servers HOST:PORT or set STREAMPROV_BOOTSTRAP_SERVERS"
        )
    from streamprov.inspect import describe_message, read_topic  # noqa: PLC0415

    assert bootstrap_servers is not None
    shown = 0
    try:
        for msg in read_topic(bootstrap_servers, topic, limit=limit, idle_timeout_s=timeout):
            typer.echo(json.dumps(describe_message(msg), indent=2, ensure_ascii=False))
            shown += 1
    except StreamprovError as exc:
        _fail(str(exc))
    if not shown:  # say so: silence looks like a hang or a failure
        typer.echo(f"no records in {topic} (waited {timeout:g} s)")


@header_app.command("decode")
def header_decode(
    value: Annotated[
        str, typer.Argument(help="Header bytes as hex or base64; '-' reads raw bytes from stdin.")
    ],
) -> None:
    """Decode one provenance header (the value of the Kafka record header 'streamprov')."""
    raw = sys.stdin.buffer.read() if value == "-" else _parse_bytes(value)
    try:
        typer.echo(json.dumps(ProvenanceHeader.decode(raw).describe(), indent=2, ensure_ascii=False))
    except StreamprovError as exc:
        _fail(str(exc), f"is this the value of the '{HEADER_KEY}' record header?")


def _parse_bytes(text: str) -> bytes:
    cleaned = text.strip()
    try:
        return bytes.fromhex(cleaned.removeprefix("0x"))
    except ValueError:
        pass
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        _fail("the value is neither hex nor base64")
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return app(args=argv)
