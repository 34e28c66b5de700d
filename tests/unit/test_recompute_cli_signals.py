"""`streamprov recompute-manager run` stopped during its start-up, against brokers that do not answer
(127.0.0.1:1: the manager's construction blocks in init_transactions for 30 s): SIGTERM and SIGINT
end it within seconds, as a stop request (exit 0) with a message saying so; a second signal does not
wait for the construction at all. And `cli._start` without a broker: a construction that does not
look at the stop request does not hold the command."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from recompute_manager import cli
from streamprov.errors import StreamprovError

STREAMPROV = Path(sys.executable).parent / "streamprov"
PROMPT_S = 8.0
"""The start-up's stop grace (3 s) and the process's exit, well under the 30 s the construction blocks
for (before the fix: SIGINT ~26 s, SIGTERM killed the process with -15 and no message)."""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f'kafka:\n  bootstrap_servers: "127.0.0.1:1"\nrecompute_manager:\n  state_dir: {tmp_path / "state"}\n'
    )
    cmd = [str(STREAMPROV), "recompute-manager", "run", "--config", str(config)]
    cmd += ["--functions", "streamprov.demo:registry", "--http-port", "0"]
    log_path = tmp_path / "manager.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 8  # imports and settings take ~2 s
    while "recompute manager starting" not in log_path.read_text():  # its handlers are installed
        assert proc.poll() is None, log_path.read_text()[-2000:]
        if time.monotonic() >= deadline:
            break  # no such line before the fix: signalled all the same, and it fails below
        time.sleep(0.1)
    time.sleep(0.5)  # inside the construction (init_transactions)
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
    assert f"stopped: {first} during start-up, before the manager ran" in out, out
    if len(signals) > 1:
        assert f"{signals[1].name} again: not waiting for the start-up" in out, out
    assert "Traceback" not in out, out


class _Built:
    """Stands in for what the construction returns (only `close` is used on the stop path)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def _signal_soon(stops: cli._StopRequests, after_s: float) -> None:
    threading.Timer(after_s, stops.on_signal, args=(signal.SIGTERM, None)).start()


def test_a_construction_that_does_not_look_at_the_stop_request_is_left_behind_and_closed_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step of the start-up that ignores the stop event (an uninterruptible init_transactions): the
    command stops waiting after the grace, and what the construction builds later is closed."""
    monkeypatch.setattr(cli, "STOP_GRACE_S", 0.3)
    release = threading.Event()
    built = _Built()

    def build() -> Any:
        release.wait(10)
        return built

    stops = cli._StopRequests()
    _signal_soon(stops, 0.2)
    started = time.monotonic()
    assert cli._start(build, stops) is None
    assert time.monotonic() - started < 2.0
    assert stops.requested and stops.signal_name == "SIGTERM"
    assert not built.closed.is_set()
    release.set()
    assert built.closed.wait(5)  # by the construction's thread: nobody else holds it


def test_a_construction_that_returns_within_the_grace_is_closed_and_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "STOP_GRACE_S", 5.0)
    built = _Built()

    def build() -> Any:
        time.sleep(0.5)
        return built

    stops = cli._StopRequests()
    _signal_soon(stops, 0.1)
    assert cli._start(build, stops) is None
    assert built.closed.is_set()


def test_without_a_stop_the_construction_s_result_or_error_is_the_command_s() -> None:
    built = _Built()
    result: object = cli._start(lambda: cast(Any, built), cli._StopRequests())
    assert result is built
    assert not built.closed.is_set()

    def fail() -> Any:
        raise StreamprovError("brokers gone")

    with pytest.raises(StreamprovError, match="brokers gone"):
        cli._start(fail, cli._StopRequests())
    stopped = cli._StopRequests()
    stopped.on_signal(signal.SIGINT, None)
    assert cli._start(lambda: pytest.fail("built after the stop"), stopped) is None
