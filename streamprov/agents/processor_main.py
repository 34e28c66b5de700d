"""Run one `Processor` as a process: `python -m streamprov.agents.processor_main --help`.

The registered function is named as `module:attribute` (a `RegisteredFunction`, or a callable that
returns one), so a test or a deployment can run its own functions without writing a script. With
`--config-file streamprov.yaml` the Kafka settings, tracing (`telemetry:`) and the output topic's
signing key (`topics.<output>.signing.key`, else `defaults:`) come from the file, and with
`--record-ledger` every application goes to the ledger sequencer (`streams.ledger_requests`). SIGTERM
and SIGINT stop the loop after the current batch; the final stats are printed as one JSON line.
Exit codes: 0 done, 1 processor error, 2 bad arguments, 3 fenced or fatal Kafka error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from streamprov.agents.kafka_io import kafka_error
from streamprov.agents.processor import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    FatalProcessorError,
    Processor,
    ProcessorError,
)
from streamprov.agents.serde import JsonSerde, RawSerde, Serde
from streamprov.checksum import ChecksumAlgorithm
from streamprov.config.loader import load_config
from streamprov.errors import StreamprovError
from streamprov.ledger.requests import KafkaLedgerClient
from streamprov.registry import RegisteredFunction
from streamprov.signing import KeyRing

if TYPE_CHECKING:
    from streamprov.signing import Signer
    from streamprov.telemetry.setup import Telemetry
    from streamprov.telemetry.tracing import StepTracing

log = logging.getLogger(__name__)

SERDES: dict[str, type[JsonSerde] | type[RawSerde]] = {"json": JsonSerde, "raw": RawSerde}


def load_function(spec: str) -> RegisteredFunction:
    """`package.module:attribute` -> the RegisteredFunction it names (or that calling it returns)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise StreamprovError(f"--function must look like 'module:attribute', not {spec!r}")
    try:  # the user's module: whatever importing it or calling the factory raises is a start error
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        if not isinstance(target, RegisteredFunction) and callable(target):
            target = target()
    except Exception as exc:
        raise StreamprovError(f"--function {spec}: cannot load it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(target, RegisteredFunction):
        raise StreamprovError(f"{spec} is not a RegisteredFunction (register it with FunctionRegistry)")
    return target


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamprov.agents.processor_main", description=__doc__)
    p.add_argument("--bootstrap", default=None, help="bootstrap.servers (default: --config-file's kafka)")
    p.add_argument(
        "--config-file",
        type=Path,
        default=None,
        help="streamprov.yaml: kafka settings, telemetry (tracing) and the output topic's signing key",
    )
    p.add_argument("--input", required=True, action="append", help="input topic (repeatable)")
    p.add_argument("--output", required=True, help="output topic")
    p.add_argument("--dlq", required=True, help="dead-letter topic")
    p.add_argument("--group", required=True, help="consumer group id")
    p.add_argument("--function", required=True, help="module:attribute of a RegisteredFunction")
    p.add_argument("--params", default="{}", help="function parameters as a JSON object")
    p.add_argument("--guarantee", choices=[EXACTLY_ONCE, AT_LEAST_ONCE], default=EXACTLY_ONCE)
    p.add_argument("--transactional-id", default=None)
    p.add_argument("--serde", choices=sorted(SERDES), default="json")
    p.add_argument("--checksum", choices=[a.name.lower() for a in ChecksumAlgorithm], default="crc32c")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--poll-timeout", type=float, default=0.5, help="seconds")
    p.add_argument("--window-ms", type=int, default=None, help="reduce: tumbling window size")
    p.add_argument("--grace-ms", type=int, default=0, help="reduce: grace period after a window's end")
    p.add_argument("--flush-windows-on-stop", action="store_true")
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this many idle seconds")
    p.add_argument(
        "--config",
        action="append",
        type=_key_value,
        default=[],
        help="extra librdkafka key=value (repeatable)",
    )
    p.add_argument(
        "--record-ledger",
        action="store_true",
        help="record every application in the provenance ledger: sent to the ledger sequencer "
        "(streams.ledger_requests, ledger.id of --config-file) before each offset commit",
    )
    p.add_argument("--log-level", default="INFO")
    return p


class _Wiring:
    """What `--config-file` sets up: Kafka settings, telemetry, the signer, the ledger client."""

    def __init__(self) -> None:
        self.kafka: dict[str, Any] = {}
        self.telemetry: Telemetry | None = None
        self.tracing: StepTracing | None = None
        self.signer: Signer | None = None
        self.ledger: KafkaLedgerClient | None = None

    def load(self, args: argparse.Namespace) -> None:
        loaded = load_config(args.config_file)
        self.kafka = dict(loaded.kafka.librdkafka())
        from streamprov.telemetry.setup import build_telemetry  # noqa: PLC0415 - needs the SDK

        self.telemetry = build_telemetry(loaded.telemetry, component="processor")
        self.tracing = self.telemetry.step_tracing(consumer_group=args.group)
        self.signer = KeyRing(loaded.signing).signer_for(loaded.topic(args.output))
        log.info("telemetry: %s; signing: %s", self.telemetry.describe(), self.signer or "off")
        if args.record_ledger:
            self.ledger = KafkaLedgerClient(self.kafka, loaded.streams.ledger_requests, loaded.ledger_id())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    wiring = _Wiring()
    try:
        if args.config_file is not None:
            wiring.load(args)
        elif args.record_ledger:
            raise StreamprovError("--record-ledger needs --config-file (streams.ledger_requests, ledger.id)")
        kafka, telemetry, ledger = wiring.kafka, wiring.telemetry, wiring.ledger
        if args.bootstrap is not None:
            kafka["bootstrap.servers"] = args.bootstrap
        if "bootstrap.servers" not in kafka:
            raise StreamprovError("give --bootstrap or --config-file")
        function = load_function(args.function)
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise StreamprovError("--params must be a JSON object")
        serde: Serde = SERDES[args.serde]()
        processor = Processor(
            {**kafka, **dict(args.config)},
            group_id=args.group,
            input_topics=args.input,
            output_topic=args.output,
            dead_letter_topic=args.dlq,
            function=function,
            params=params,
            serde=serde,
            algorithm=ChecksumAlgorithm[args.checksum.upper()],
            guarantee=args.guarantee,
            transactional_id=args.transactional_id,
            batch_size=args.batch_size,
            poll_timeout_s=args.poll_timeout,
            window_ms=args.window_ms,
            grace_ms=args.grace_ms,
            flush_windows_on_stop=args.flush_windows_on_stop,
            tracing=wiring.tracing,
            signer=wiring.signer,
            ledger=ledger,
        )
    except (StreamprovError, ValueError, ImportError, AttributeError) as exc:
        log.error("cannot start the processor: %s", exc)
        if wiring.telemetry is not None:
            wiring.telemetry.shutdown()
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping after the current batch", signum)
        processor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        processor.run(max_records=args.max_records, idle_timeout_s=args.idle_timeout)
    except FatalProcessorError as exc:
        log.error("fatal: %s", exc)
        code = 3
    except ProcessorError as exc:
        log.error("processor error: %s", exc)
        code = 1
    except KafkaException as exc:  # the brokers did not answer a call the loop does not retry
        log.error("Kafka error: %s (brokers: %s)", kafka_error(exc).str(), kafka.get("bootstrap.servers"))
        code = 1
    finally:
        processor.close()
        if ledger is not None:
            ledger.close()  # the processor flushed before each commit: nothing committed is unsent
        if telemetry is not None:
            telemetry.shutdown()  # export queued spans (bounded by telemetry.otlp.timeout)
    print(json.dumps(processor.stats.as_dict()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
