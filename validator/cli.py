"""`streamprov validator run`: the Validator service as a command (also `python -m validator run`).

Exit codes: 0 stopped cleanly (SIGTERM/SIGINT: the current batch is finished and committed; during
start-up they end it before it runs), 1 the service failed, 2 bad configuration, 3 a fatal Kafka
error (restart the process). Stop requests: `streamprov.stop_requests`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from streamprov.errors import StreamprovError
from streamprov.stop_requests import StopRequests, start_up

if TYPE_CHECKING:
    from streamprov.config.models import StreamprovConfig
    from streamprov.signing import KeyRing
    from validator.settings import ServiceSettings

log = logging.getLogger(__name__)

validator_app = typer.Typer(
    help="The Validator: check every record of the output topics, publish alerts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@validator_app.callback()
def _group() -> None:
    """The Validator service (a group, so `run` stays a subcommand however many commands there are)."""


EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_FATAL = 3


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception), for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


LOG_LEVELS = ("debug", "info", "warning", "error")


def check_log_level(value: str) -> str:
    """`--log-level` callback: an unknown level is a usage error (exit 2) listing the valid ones,
    rather than logging's `ValueError` traceback when the service configures its logging."""
    level = value.lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def configure_logging(level: str, json_logs: bool) -> None:
    """The service's own log setup (a command may install handlers; the library never does)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


GC_THRESHOLD = (50_000, 20, 100)
"""Generation-0 threshold for the service process (CPython's default is 700 allocations)."""


def tune_gc() -> None:
    """Garbage-collector settings for a process that runs the Validator (never done by the library).

    Every consumed record brings several container objects (the message, its header list and
    tuples) that die with their batch; with the default threshold the collector walks each batch's
    objects a few times per batch, which bench/bench_validator.py measured at a large share of the
    per-record cost. Objects alive at start (modules, settings) are frozen out of collections.
    Reference counting still frees everything at once; only cycle detection runs less often.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def service_settings(
    loaded: StreamprovConfig,
    keys: KeyRing,
    *,
    topics: list[str] | None = None,
    **overrides: Any,
) -> ServiceSettings:
    """The Validator's settings from `streamprov.yaml`, with what the `telemetry:` and `signing:`
    blocks add: no metrics port when `telemetry.metrics.prometheus` is off, and each topic's
    verifier (`topics.<t>.signing.verify`, the keys it accepts) on its policy. Reads the keys now, so
    a bad key fails the start (`SigningError`)."""
    from validator.settings import ServiceSettings  # noqa: PLC0415 - keep --help fast

    settings = ServiceSettings.from_config(loaded, topics=topics, **overrides)
    if not loaded.telemetry.metrics.prometheus:
        settings = dataclasses.replace(settings, metrics_port=None)
    policies = {
        t: dataclasses.replace(p, verifier=keys.verifier_for(loaded.topic(t)))
        for t, p in settings.policies.items()
    }
    default = dataclasses.replace(settings.default_policy, verifier=keys.verifier_for(loaded.defaults))
    verified = [t for t, p in policies.items() if p.verifier is not None]
    if verified:
        log.info("signatures required on: %s", ", ".join(verified))
    return dataclasses.replace(settings, policies=policies, default_policy=default)


def _fail(code: int, message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


@validator_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="streamprov.yaml", exists=False)],
    functions: Annotated[
        str | None,
        typer.Option(help="module:attribute of the FunctionRegistry used for re-derivation."),
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option("--topic", "-t", help="Validate this topic (repeatable); default: those under topics:."),
    ] = None,
    serde: Annotated[str, typer.Option(help="Value serde for re-derivation: json or raw.")] = "json",
    host: Annotated[str, typer.Option(help="Address the HTTP endpoints bind to.")] = "0.0.0.0",  # noqa: S104
    commit_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between offset commits (after acknowledgements).")
    ] = 1.0,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log one JSON object per line.")] = False,
    log_level: Annotated[
        str, typer.Option(callback=check_log_level, help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the Validator until SIGTERM/SIGINT."""
    configure_logging(log_level, json_logs)
    stops = StopRequests(log)
    stops.install()  # before anything slow: a stop request during start-up is honoured too
    from streamprov.agents.serde import JsonSerde, RawSerde, Serde  # noqa: PLC0415 - keep --help fast
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415
    from streamprov.signing import KeyRing, SigningError  # noqa: PLC0415
    from streamprov.telemetry.setup import TelemetryError, build_telemetry  # noqa: PLC0415
    from validator.errors import FatalValidatorError, ValidatorConfigError  # noqa: PLC0415
    from validator.rederive import load_registry  # noqa: PLC0415
    from validator.service import Validator  # noqa: PLC0415

    serdes: dict[str, type[JsonSerde] | type[RawSerde]] = {"json": JsonSerde, "raw": RawSerde}
    if serde not in serdes:
        raise _fail(EXIT_CONFIG, f"--serde must be one of {', '.join(serdes)}, not {serde!r}")
    try:
        loaded = load_config(config)
        settings = service_settings(
            loaded, KeyRing(loaded.signing), topics=topic, http_host=host, commit_interval_s=commit_interval
        )
        registry = load_registry(functions) if functions else None
        value_serde: Serde = serdes[serde]()
        telemetry = build_telemetry(loaded.telemetry, component="validator")
        tracing = telemetry.step_tracing(consumer_group=settings.group_id)
        log.info("validator starting: brokers %s", settings.kafka.get("bootstrap.servers"))
        validator = Validator(settings, registry=registry, serde=value_serde, tracing=tracing)
    except (ConfigError, ValidatorConfigError, SigningError, TelemetryError) as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    log.info("telemetry: %s", telemetry.describe())
    telemetry.push_metrics(validator.metrics.reader.get_metrics_data)
    tune_gc()
    try:
        if not start_up(validator, stops):  # closed
            log.info("stopped: %s during start-up, before the validator ran", stops.signal_name)
            return
        with validator:
            stats = validator.run()
    except ValidatorConfigError as exc:
        raise _fail(EXIT_CONFIG, str(exc)) from None
    except FatalValidatorError as exc:
        raise _fail(EXIT_FATAL, str(exc)) from None
    except StreamprovError as exc:
        raise _fail(EXIT_FAILED, str(exc)) from None
    finally:
        telemetry.shutdown()  # queued spans and the last metrics, bounded by telemetry.otlp.timeout
    summary = {
        "checked": stats.checked,
        "alerts": stats.alerts,
        "dead_letters": stats.dead_letters,
        "commits": stats.commits,
        "rewinds": stats.rewinds,
        "alerts_by_kind": dict(stats.alerts_by_kind),
    }
    log.info("stopped: %s", json.dumps(summary, sort_keys=True))
