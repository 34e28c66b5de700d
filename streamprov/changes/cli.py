"""`streamprov changes run`: the change detector service (see `streamprov.changes.service`).

Exit codes as the Validator's: 0 stopped cleanly (SIGTERM/SIGINT: the current batch is finished and
committed; during start-up they end it before it runs), 1 the service failed, 2 bad configuration, 3
a fatal Kafka error (restart the process). The signals are handled as the Validator's
(`streamprov.stop_requests`).

Settings come from `changes:` in `streamprov.yaml`; command-line options override them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from streamprov.errors import StreamprovError
from streamprov.stop_requests import StopRequests, start_up
from validator.cli import check_log_level

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_FATAL = 3

changes_app = typer.Typer(
    help="Change detection: new source versions and changed functions -> change events with their impact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@changes_app.callback()
def _group() -> None:
    """The change detector service."""


def _fail(code: int, message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


@changes_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="streamprov.yaml")],
    state_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="STREAMPROV_CHANGES_STATE_DIR",
            help="Directory of the detector's RocksDB state (last checksums, ledger index). "
            "Default: changes.state_dir.",
        ),
    ] = None,
    group_id: Annotated[
        str | None, typer.Option(help="Consumer group of the source topics. Default: changes.group_id.")
    ] = None,
    functions: Annotated[
        str | None,
        typer.Option(
            help="module:attribute of the FunctionRegistry to compare with the ledger (function changes)."
        ),
    ] = None,
    ledger_id: Annotated[
        str | None,
        typer.Option(
            envvar="STREAMPROV_LEDGER_ID", help="Ledger id. Default: ledger.id, else the topic name."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the health endpoints bind to.")] = "0.0.0.0",  # noqa: S104
    http_port: Annotated[
        int | None,
        typer.Option(help="/healthz and /readyz port (0 = any free port). Default: changes.http_port."),
    ] = None,
    max_outputs: Annotated[
        int | None,
        typer.Option(min=0, help="Impacted outputs listed per event. Default: changes.max_outputs."),
    ] = None,
    function_check_interval: Annotated[
        float | None,
        typer.Option(min=1.0, help="Seconds between function checks (with --functions)."),
    ] = None,
    progress_interval: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds between progress lines in the log.")
    ] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log one JSON object per line.")] = False,
    log_level: Annotated[
        str, typer.Option(callback=check_log_level, help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the change detector until SIGTERM/SIGINT."""
    from validator.cli import configure_logging  # noqa: PLC0415 - looked up when run (tests patch it)

    configure_logging(log_level, json_logs)
    stops = StopRequests(log)
    stops.install()  # before anything slow: a stop request during start-up is honoured too
    from streamprov.changes.detector import ChangeDetectorError  # noqa: PLC0415 - keep --help fast
    from streamprov.changes.service import (  # noqa: PLC0415
        ChangeService,
        ChangeServiceConfigError,
        ChangeServiceSettings,
        FatalChangeServiceError,
    )
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415
    from validator.errors import ValidatorConfigError  # noqa: PLC0415 - load_registry's
    from validator.rederive import load_registry  # noqa: PLC0415

    try:
        loaded = load_config(config)
        settings = ChangeServiceSettings.from_config(
            loaded,
            state_dir=state_dir,
            group_id=group_id,
            ledger_id=ledger_id,
            http_host=host,
            http_port=http_port,
            max_outputs=max_outputs,
            function_check_interval_s=function_check_interval,
            progress_interval_s=progress_interval,
        )
        registry = load_registry(functions) if functions else None
        log.info("change detector starting: brokers %s", settings.kafka.get("bootstrap.servers"))
        service = ChangeService(settings, registry=registry)
    except (ConfigError, ChangeServiceConfigError, ValidatorConfigError) as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None

    try:
        if not start_up(service, stops):  # closed
            log.info("stopped: %s during start-up, before the change detector ran", stops.signal_name)
            return
        with service:
            stats = service.run()
    except ChangeServiceConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except FatalChangeServiceError as exc:
        raise _fail(EXIT_FATAL, str(exc)) from None
    except (ChangeDetectorError, StreamprovError) as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    log.info("stopped: %s", json.dumps(stats.as_dict(), sort_keys=True))
