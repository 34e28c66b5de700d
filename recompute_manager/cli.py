"""`streamprov recompute-manager run` (the service), `streamprov recompute status [PLAN]` and
`streamprov recompute approve PLAN`.

Exit codes as the Validator's: 0 stopped cleanly (SIGTERM/SIGINT finish the current batch and units,
whose transactions commit; during start-up they end it before it runs), 1 the service (or the
command) failed, 2 bad configuration.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from streamprov.errors import StreamprovError
from streamprov.stop_requests import StopRequests, start_up_by_building
from validator.cli import EXIT_CONFIG, EXIT_FAILED, check_log_level, configure_logging

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
    log_level: Annotated[
        str, typer.Option(callback=check_log_level, help="debug, info, warning or error.")
    ] = "info",
    workers: Annotated[
        int | None, typer.Option(help="Worker threads (default: recompute_manager.workers; 0 = plan only).")
    ] = None,
    ledger_id: Annotated[
        str | None, typer.Option(help="The ledger's id (default: the ledger topic's name).")
    ] = None,
    replica: Annotated[
        str | None,
        typer.Option(
            help="This replica's stable, unique name (default: STREAMPROV_REPLICA_ID, POD_NAME, "
            "HOSTNAME, else the host name): its workers' group.instance.id and transactional.id."
        ),
    ] = None,
) -> None:
    """Run the Recompute Manager (planner and workers) until SIGTERM/SIGINT."""
    configure_logging(log_level, json_logs)
    from recompute_manager.service import (  # noqa: PLC0415 - fast --help
        ManagerSettings,
        ManagerStoppedError,
        RecomputeManager,
    )
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415
    from streamprov.telemetry.setup import TelemetryError  # noqa: PLC0415
    from validator.rederive import FunctionsLoadError, load_registry  # noqa: PLC0415

    stops = StopRequests(log)  # its event is the manager's stop event (stop=): the start-up watches it
    stops.install()  # before anything slow: a stop request during start-up is honoured too
    try:
        loaded = load_config(config)
        overrides: dict[str, object] = {"http_host": host}
        if http_port is not None:
            overrides["http_port"] = http_port
        if workers is not None:
            overrides["workers"] = workers
        if replica:
            overrides["replica_id"] = replica
        if ledger_id:
            overrides["ledger_id"] = ledger_id
        settings = ManagerSettings.from_config(loaded, **overrides)
        registry = load_registry(functions)
        brokers = settings.kafka.get("bootstrap.servers")
        log.info("recompute manager starting: brokers %s", brokers)
        manager = start_up_by_building(lambda: RecomputeManager(settings, registry, stop=stops.event), stops)
    except ManagerStoppedError:  # the start-up saw the stop request (stops.event) itself
        manager = None
    except (ConfigError, TelemetryError, FunctionsLoadError) as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    if manager is None:  # a stop request during start-up; from now on a signal stops it after a batch
        log.info("stopped: %s during start-up, before the manager ran", stops.signal_name)
        return
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
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to read the progress topic for.")] = 10.0,
) -> None:
    """Each plan's progress (tasks done / total, units done, a progress bar), from the progress topic."""
    from recompute_manager.progress import read_progress  # noqa: PLC0415 - fast --help
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    try:
        progress = read_progress(
            loaded.kafka.librdkafka(), loaded.streams.recompute_progress, timeout_s=timeout
        )
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    shown = [st for pid, st in progress.statuses().items() if plan is None or pid.startswith(plan)]
    if plan is not None and not shown:
        raise _fail(EXIT_FAILED, f"no progress for plan {plan}")
    if not shown:
        typer.echo(f"no plans on {loaded.streams.recompute_progress}")
    for st in shown:
        typer.echo(st.line())
    if not progress.complete:
        typer.secho("warning: the progress topic was not read to its end", fg=typer.colors.YELLOW, err=True)


@recompute_app.command("approve")
def approve(
    plan: Annotated[str, typer.Argument(help="The plan id (or an unambiguous prefix) to run.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="streamprov.yaml")] = Path("streamprov.yaml"),
    by: Annotated[str | None, typer.Option(help="Who approves (default: the user name).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for Kafka operations.")] = 30.0,
) -> None:
    """Run a plan held back for approval (`needs_approval`: more tasks than max_fanout); idempotent."""
    from recompute_manager.approval import approve as approve_plan  # noqa: PLC0415 - fast --help
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    try:
        done = approve_plan(
            loaded.kafka.librdkafka(),
            group_id=loaded.recompute_manager.group_id,
            tasks_topic=loaded.streams.recompute_tasks,
            progress_topic=loaded.streams.recompute_progress,
            prefix=plan,
            by=by,
            timeout_s=timeout,
        )
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    if done.already:
        typer.echo(f"plan {done.plan_id[:16]} was approved before: nothing to do")
    else:
        typer.echo(f"plan {done.plan_id[:16]} approved: {done.tasks} tasks in {done.units} units queued")
