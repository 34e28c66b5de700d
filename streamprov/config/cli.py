"""`streamprov config ...`: check a configuration file, print a commented example or the JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from streamprov.config.errors import ConfigError
from streamprov.config.example import EXAMPLE_YAML

if TYPE_CHECKING:
    from streamprov.config.models import StreamprovConfig

# pydantic models are imported inside the commands: `streamprov --help` stays fast.

config_app = typer.Typer(
    help="Check and write the topic-level configuration file (streamprov.yaml).",
    no_args_is_help=True,
)


def summary(config: StreamprovConfig, overrides: list[str]) -> list[str]:
    """What a person wants to see after `validate`: where it connects and what each topic does."""
    kafka = config.kafka
    auth = f", SASL {kafka.sasl.mechanism}" if kafka.sasl is not None else ""
    lines = [f"  kafka: {kafka.bootstrap_servers} ({kafka.security_protocol}{auth})"]
    lines.append("  streams: " + ", ".join(f"{k}={v}" for k, v in config.streams.names().items()))
    lines.append(f"  sources: {', '.join(config.sources) if config.sources else '(none)'}")
    if not config.topics:
        lines.append("  topics: (none listed; every topic uses defaults)")
    for name, topic in config.topics.items():
        rederivation = topic.checks.rederivation
        checks = [
            check
            for check, on in (
                ("integrity", topic.checks.integrity),
                ("source_drift", topic.checks.source_drift),
                (f"rederivation {rederivation.sample_rate:g}", rederivation.enabled),
                ("staleness", topic.checks.staleness.enabled),
            )
            if on
        ]
        recompute = (
            f"recompute on {', '.join(topic.recompute.triggers)} -> {topic.priority_topic_name(name)}"
            if topic.recompute.enabled
            else "recompute off"
        )
        lines.append(
            f"  topic {name}: {topic.criticality}, {topic.checksum_algorithm.name.lower()}, "
            f"checks {', '.join(checks) or 'none'}; {recompute}"
        )
    lines.append(
        f"  validator: group {config.validator.group_id}, http :{config.validator.http_port}, "
        f"metrics :{config.validator.metrics_port}"
    )
    lines.append(
        f"  recompute_manager: group {config.recompute_manager.group_id}, "
        f"http :{config.recompute_manager.http_port}, metrics :{config.recompute_manager.metrics_port}, "
        f"{config.recompute_manager.workers} workers"
    )
    tracing, metrics, otlp = config.telemetry.tracing, config.telemetry.metrics, config.telemetry.otlp
    traced = f"tracing {tracing.sampling_ratio:g} -> {tracing.exporter}" if tracing.enabled else "tracing off"
    pushed = ", ".join(n for n, on in (("prometheus", metrics.prometheus), ("otlp", metrics.otlp)) if on)
    target = f"; otlp {otlp.protocol} {otlp.endpoint}" if otlp.endpoint else ""
    lines.append(f"  telemetry: {traced}; metrics {pushed or 'off'}{target}")
    if config.signing.keys:
        keys = ", ".join(f"{k} ({v.algorithm})" for k, v in config.signing.keys.items())
        blocks = [("defaults", config.defaults), *config.topics.items()]
        signed = [f"{n} by {t.signing.key}" for n, t in blocks if t.signing.key]
        verified = [n for n, t in blocks if t.signing.verify]
        lines.append(
            f"  signing: keys {keys}; signs {', '.join(signed) or 'nothing'}; "
            f"verifies {', '.join(verified) or 'nothing'}"
        )
    if overrides:
        lines.append(f"  environment overrides: {', '.join(overrides)}")
    return lines


@config_app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="The configuration file, e.g. streamprov.yaml.")],
    use_env: Annotated[
        bool, typer.Option("--env/--no-env", help="Apply STREAMPROV__A__B environment overrides.")
    ] = True,
    skip_secrets: Annotated[
        bool,
        typer.Option(
            "--skip-secrets", help="Do not require password files and variables to exist (e.g. in CI)."
        ),
    ] = False,
    show: Annotated[
        bool, typer.Option("--show", help="Print the effective configuration (secrets masked).")
    ] = False,
) -> None:
    """Check FILE: exit 0 with a summary, or exit 1 listing every problem and how to fix it."""
    from streamprov.config.loader import env_overrides, load_config  # noqa: PLC0415

    environ: dict[str, str] | None = None if use_env else {}
    try:
        config = load_config(file, environ=environ, check_secrets=not skip_secrets)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    overrides = list(env_overrides()) if use_env else []
    typer.echo(f"ok: {file}")
    for line in summary(config, overrides):
        typer.echo(line)
    if show:
        typer.echo("---")
        typer.echo(config.redacted(), nl=False)


@config_app.command("example")
def example() -> None:
    """Print a commented example configuration (it validates as it is)."""
    typer.echo(EXAMPLE_YAML, nl=False)


@config_app.command("schema")
def schema(
    draft: Annotated[str, typer.Option(help="JSON Schema draft: 2020-12 or 07.")] = "2020-12",
) -> None:
    """Print the JSON Schema of the configuration file (for editors' YAML completion)."""
    from streamprov.config.schema import config_json_schema, dumps  # noqa: PLC0415

    try:
        typer.echo(dumps(config_json_schema(draft=draft)), nl=False)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
