"""`streamprov changes run` stopped during its start-up, against brokers that do not answer
(127.0.0.1:1): SIGTERM and SIGINT end it within seconds as a stop request (exit 0) with a line saying
so; before, the start-up's librdkafka calls (10 s each) did not look at the stop flag and the command
failed 17-30 s later (exit 1). The service's start-up itself waits for the brokers stop-aware and
bounded. (`validator.cli.start_up`, which the command shares with the Validator's, is tested in
test_validator_start_signals.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamprov.changes.detector import ChangeDetectorError
from streamprov.changes.service import ChangeService, ChangeServiceSettings

STREAMPROV = Path(sys.executable).parent / "streamprov"
PROMPT_S = 8.0
"""About a second to see the stop, the exit, and room for a loaded machine (before the fix: exit 1
17-30 s after the signal)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        'kafka:\n  bootstrap_servers: "127.0.0.1:1"\n'
        "sources: [src]\n"
        f"changes:\n  state_dir: {tmp_path / 'state'}\n  http_port: {_free_port()}\n"
    )
    cmd = [str(STREAMPROV), "changes", "run", "--config", str(config), "--host", "127.0.0.1"]
    log_path = tmp_path / "changes.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 8  # imports and settings take ~1 s
    while "change detector starting" not in log_path.read_text():  # its handlers are installed
        assert proc.poll() is None, log_path.read_text()[-2000:]
        if time.monotonic() >= deadline:
            break  # no such line before the fix: signalled all the same, and it fails below
        time.sleep(0.1)
    time.sleep(0.5)  # inside the start-up (waiting for the brokers)
    return proc, log_path


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT], [signal.SIGINT, signal.SIGTERM]])
def test_a_stop_request_during_start_up_exits_promptly_and_cleanly(
    tmp_path: Path, signals: list[signal.Signals]
) -> None:
    proc, log_path = _start(tmp_path)
    try:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        sent = time.monotonic()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.1)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after {signals}: {log_path.read_text()[-2000:]}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-2000:]
    assert took < PROMPT_S, f"exited {took:.1f} s after the signal: {out[-2000:]}"
    first = signals[0].name
    assert f"{first}: stopping during start-up" in out, out
    assert f"stopped: {first} during start-up, before the change detector ran" in out, out
    if len(signals) > 1:
        assert f"{signals[1].name} again: not waiting for the start-up" in out, out
    assert "Traceback" not in out and "error:" not in out, out


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
