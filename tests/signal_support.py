"""A service command (`streamprov validator run`, `changes run`, `recompute-manager run`) signalled
during its start-up, as a process: the scaffolding the start-up signal tests share
(`tests/unit/test_*_start_signals.py`, `test_recompute_cli_signals.py`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STREAMPROV = Path(sys.executable).parent / "streamprov"

STOP_SIGNALS = pytest.mark.parametrize(
    "signals", [[signal.SIGTERM], [signal.SIGINT], [signal.SIGINT, signal.SIGTERM]]
)
"""One signal of each kind, and a second signal that does not wait for the start-up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_command(args: list[str], log_path: Path, starting_line: str) -> subprocess.Popen[bytes]:
    """`streamprov ARGS`, its output in `log_path`, once it logged `starting_line` (its signal
    handlers are installed) and half a second more (inside the start-up)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(STREAMPROV), *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 8  # imports and settings take 1-2 s
    while starting_line not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()[-2000:]
        if time.monotonic() >= deadline:
            break  # no such line before the fix: signalled all the same, and it fails below
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def assert_stops_during_start_up(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    signals: list[signal.Signals],
    service: str,
    prompt_s: float,
) -> str:
    """Send `signals` (0.1 s apart): the command exits 0 within `prompt_s`, its log saying it
    stopped during start-up, before `service` ran (and that a second signal did not wait), without a
    traceback. Its output."""
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
    assert took < prompt_s, f"exited {took:.1f} s after the signal: {out[-2000:]}"
    first = signals[0].name
    assert f"{first}: stopping during start-up" in out, out
    assert f"stopped: {first} during start-up, before {service} ran" in out, out
    if len(signals) > 1:
        assert f"{signals[1].name} again: not waiting for the start-up" in out, out
    assert "Traceback" not in out, out
    return out
