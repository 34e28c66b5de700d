"""`streamprov recompute-manager run` stopped during its start-up, against brokers that do not answer
(127.0.0.1:1: the manager's construction blocks in init_transactions for 30 s): SIGTERM and SIGINT
end it within seconds, as a stop request (exit 0) with a message saying so; a second signal does not
wait for the construction at all. And `streamprov.stop_requests.start_up_by_building` without a
broker: a construction that does not look at the stop request does not hold the command."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from signal_support import STOP_SIGNALS, assert_stops_during_start_up, start_command

from streamprov import stop_requests
from streamprov.errors import StreamprovError

PROMPT_S = 8.0
"""The start-up's stop grace (3 s) and the process's exit, well under the 30 s the construction blocks
for (before the fix: SIGINT ~26 s, SIGTERM killed the process with -15 and no message)."""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f'kafka:\n  bootstrap_servers: "127.0.0.1:1"\nrecompute_manager:\n  state_dir: {tmp_path / "state"}\n'
    )
    args = ["recompute-manager", "run", "--config", str(config)]
    args += ["--functions", "streamprov.demo:registry", "--http-port", "0"]
    log_path = tmp_path / "manager.log"
    return start_command(args, log_path, "recompute manager starting"), log_path  # in init_transactions


@STOP_SIGNALS
def test_a_stop_request_during_start_up_exits_promptly_and_cleanly(
    tmp_path: Path, signals: list[signal.Signals]
) -> None:
    proc, log_path = _start(tmp_path)
    assert_stops_during_start_up(proc, log_path, signals, "the manager", PROMPT_S)


class _Built:
    """Stands in for what the construction returns (only `close` is used on the stop path; `stop` is
    what a signal calls once it is built)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.closed.set()


def _signal_soon(stops: stop_requests.StopRequests, after_s: float) -> None:
    threading.Timer(after_s, stops.on_signal, args=(signal.SIGTERM, None)).start()


def test_a_construction_that_does_not_look_at_the_stop_request_is_left_behind_and_closed_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step of the start-up that ignores the stop event (an uninterruptible init_transactions): the
    command stops waiting after the grace, and what the construction builds later is closed."""
    monkeypatch.setattr(stop_requests, "STOP_GRACE_S", 0.3)
    release = threading.Event()
    built = _Built()

    def build() -> Any:
        release.wait(10)
        return built

    stops = stop_requests.StopRequests()
    _signal_soon(stops, 0.2)
    started = time.monotonic()
    assert stop_requests.start_up_by_building(build, stops) is None
    assert time.monotonic() - started < 2.0
    assert stops.requested and stops.signal_name == "SIGTERM"
    assert not built.closed.is_set()
    release.set()
    assert built.closed.wait(5)  # by the construction's thread: nobody else holds it


def test_a_construction_that_returns_within_the_grace_is_closed_and_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stop_requests, "STOP_GRACE_S", 5.0)
    built = _Built()

    def build() -> Any:
        time.sleep(0.5)
        return built

    stops = stop_requests.StopRequests()
    _signal_soon(stops, 0.1)
    assert stop_requests.start_up_by_building(build, stops) is None
    assert built.closed.is_set()


def test_without_a_stop_the_construction_s_result_or_error_is_the_command_s() -> None:
    built = _Built()
    result: object = stop_requests.start_up_by_building(
        lambda: cast(Any, built), stop_requests.StopRequests()
    )
    assert result is built
    assert not built.closed.is_set()

    def fail() -> Any:
        raise StreamprovError("brokers gone")

    with pytest.raises(StreamprovError, match="brokers gone"):
        stop_requests.start_up_by_building(fail, stop_requests.StopRequests())
    stopped = stop_requests.StopRequests()
    stopped.on_signal(signal.SIGINT, None)
    never = stop_requests.start_up_by_building(lambda: pytest.fail("built after the stop"), stopped)
    assert never is None
