"""`streamprov changes run` stopped during its start-up, against brokers that do not answer
(127.0.0.1:1): SIGTERM and SIGINT end it within seconds as a stop request (exit 0) with a line saying
so; before, the start-up's librdkafka calls (10 s each) did not look at the stop flag and the command
failed 17-30 s later (exit 1). The service's start-up itself waits for the brokers stop-aware and
bounded. (`streamprov.stop_requests.start_up`, which the command shares with the Validator's, is
tested in test_validator_start_signals.py.)"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from signal_support import STOP_SIGNALS, assert_stops_during_start_up, free_port, start_command

from streamprov.changes.detector import ChangeDetectorError
from streamprov.changes.service import ChangeService, ChangeServiceSettings

PROMPT_S = 8.0
"""About a second to see the stop, the exit, and room for a loaded machine (before the fix: exit 1
17-30 s after the signal)."""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        'kafka:\n  bootstrap_servers: "127.0.0.1:1"\n'
        "sources: [src]\n"
        f"changes:\n  state_dir: {tmp_path / 'state'}\n  http_port: {free_port()}\n"
    )
    args = ["changes", "run", "--config", str(config), "--host", "127.0.0.1"]
    log_path = tmp_path / "changes.log"
    return start_command(args, log_path, "change detector starting"), log_path  # waiting for the brokers


@STOP_SIGNALS
def test_a_stop_request_during_start_up_exits_promptly_and_cleanly(
    tmp_path: Path, signals: list[signal.Signals]
) -> None:
    proc, log_path = _start(tmp_path)
    out = assert_stops_during_start_up(proc, log_path, signals, "the change detector", PROMPT_S)
    assert "error:" not in out, out


# -- the service's start-up, no broker ---------------------------------------------------------------
def _service(tmp_path: Path, operation_timeout_s: float = 30.0) -> ChangeService:
    settings = ChangeServiceSettings(
        kafka={"bootstrap.servers": "127.0.0.1:1"},
        sources=("src",),
        changes_topic="changes",
        ledger_topic="ledger",
        state_dir=tmp_path / "state",
        operation_timeout_s=operation_timeout_s,
    )
    return ChangeService(settings)


def test_a_stop_while_the_brokers_do_not_answer_ends_the_start_up_within_a_second(tmp_path: Path) -> None:
    """Before: start() went on for about 30 s whatever was asked, then raised."""
    with _service(tmp_path) as service:
        timer = threading.Timer(0.5, service.stop)
        timer.start()
        started = time.monotonic()
        try:
            service.start()  # returns: a stop request is not an error
        finally:
            timer.cancel()
        assert time.monotonic() - started < 3.0
        assert service.state.ready() == (False, "starting")


def test_brokers_that_do_not_answer_within_the_operation_timeout_are_named(tmp_path: Path) -> None:
    started = time.monotonic()
    named = r"127\.0\.0\.1:1 within 1\.5 s.*check the bootstrap"
    with _service(tmp_path, 1.5) as service, pytest.raises(ChangeDetectorError, match=named):
        service.start()
    assert time.monotonic() - started < 6.0
