"""`streamprov recompute-manager run` (the service) and `streamprov recompute status [PLAN]`.

Exit codes as the Validator's: 0 stopped cleanly (SIGTERM/SIGINT finish the current batch, whose
transaction commits), 1 the service failed, 2 bad configuration.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from streamprov.errors import StreamprovError
from validator.cli import EXIT_CONFIG, EXIT_FAILED, configure_logging

log = logging.getLogger(__name__)

recompute_manager_app = typer.Typer(
    help="The Recompute Manager: alerts and change events -> recomputed records on priority topics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recompute_app = typer.Typer(
    help="Recompute plans: progress as the Recompute Manager reports it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@recompute_manager_app.callback()
def _manager_group() -> None:
    """The Recompute Manager service."""


@recompute_app.callback()
def _recompute_group() -> None:
    """Recompute plans."""


def _fail(code: int, message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


@recompute_manager_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="streamprov.yaml")],
    functions: Annotated[str, typer.Option(help="module:attribute of the FunctionRegistry to replay.")],
    host: Annotated[str, typer.Option(help="Address the health endpoints bind to.")] = "127.0.0.1",
    http_port: Annotated[
        int | None, typer.Option(help="Health port (default: recompute_manager.http_port; 0 = any).")
    ] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log one JSON object per line.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the Recompute Manager until SIGTERM/SIGINT."""
    configure_logging(log_level, json_logs)
    from recompute_manager.service import ManagerSettings, RecomputeManager  # noqa: PLC0415 - fast --help
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415
    from validator.rederive import load_registry  # noqa: PLC0415

    try:
        loaded = load_config(config)
        overrides: dict[str, object] = {"http_host": host}
        if http_port is not None:
            overrides["http_port"] = http_port
        settings = ManagerSettings.from_config(loaded, **overrides)
        registry = load_registry(functions)
        manager = RecomputeManager(settings, registry)
    except ConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after the current batch", signal.Signals(signum).name)
        manager.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with manager:
            stats = manager.run()
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    log.info("stopped: %s", json.dumps(stats.__dict__, sort_keys=True))


@recompute_app.command("status")
def status(
    plan: Annotated[str | None, typer.Argument(help="A plan id (or a prefix); default: every plan.")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="streamprov.yaml")] = Path("streamprov.yaml"),
    timeout: Annotated[float, typer.Option(help="Seconds to read the progress topic for.")] = 10.0,
) -> None:
    """The latest progress of each plan (tasks done/total), read from the progress topic."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    from recompute_manager.service import Progress  # noqa: PLC0415
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    topic = loaded.streams.recompute_progress
    consumer = Consumer(
        {
            **loaded.kafka.librdkafka(),
            "group.id": "streamprov-recompute-status",  # assign() only, never commits
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    latest: dict[str, Progress] = {}
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise _fail(EXIT_FAILED, f"progress topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p, 0) for p in sorted(meta.partitions)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout)[1] for tp in tps}
        consumer.assign(tps)
        done = {part: False for part in ends}
        deadline = time.monotonic() + timeout
        while not all(done.values()) and time.monotonic() < deadline:
            for part, end in ends.items():
                pos = consumer.position([TopicPartition(topic, part)])[0].offset
                done[part] = end == 0 or pos >= end
            for msg in consumer.consume(500, 0.2):
                raw = msg.value() if msg.error() is None else None
                if raw:
                    progress = Progress.decode(raw)
                    latest[progress.plan_id] = progress
    finally:
        consumer.close()
    shown = [p for p in latest.values() if plan is None or p.plan_id.startswith(plan)]
    if plan is not None and not shown:
        raise _fail(EXIT_FAILED, f"no progress for plan {plan}")
    for p in shown:
        typer.echo(
            f"{p.plan_id[:16]} {p.state:<14} {p.done}/{p.total} tasks "
            f"(recomputed {p.recomputed}, unchanged {p.unchanged}, skipped {p.skipped}, dead {p.dead}) "
            f"{p.cause} {p.subject}: {p.reason}"
        )
