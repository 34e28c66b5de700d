"""`streamprov validator run` stopped during its start-up, against brokers that do not answer
(127.0.0.1:1): SIGTERM and SIGINT end it within seconds as a stop request (exit 0) with a line saying
so; before, the start-up's librdkafka calls (10 s, then 5 s attempts for 30 s) did not look at the
stop flag and the command failed about 40 s later (exit 1). The Validator's start-up itself waits for
the brokers stop-aware and bounded. And the shared `streamprov.stop_requests.start_up` without a
broker: a start-up that does not look at the stop flag does not hold the command."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from signal_support import STOP_SIGNALS, assert_stops_during_start_up, free_port, start_command

from streamprov import stop_requests
from validator.errors import ValidatorError
from validator.service import Validator
from validator.settings import ServiceSettings

PROMPT_S = 8.0
"""About a second to see the stop, the exit, and room for a loaded machine (before the fix: exit 1
about 40 s after the signal)."""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        'kafka:\n  bootstrap_servers: "127.0.0.1:1"\n'
        "sources: [src]\ntopics:\n  out: {}\n"
        f"validator:\n  state_dir: {tmp_path / 'state'}\n  http_port: {free_port()}\n"
        "telemetry:\n  metrics:\n    prometheus: false\n"
    )
    args = ["validator", "run", "--config", str(config), "--host", "127.0.0.1"]
    log_path = tmp_path / "validator.log"
    return start_command(args, log_path, "validator starting"), log_path  # waiting for the brokers


@STOP_SIGNALS
def test_a_stop_request_during_start_up_exits_promptly_and_cleanly(
    tmp_path: Path, signals: list[signal.Signals]
) -> None:
    proc, log_path = _start(tmp_path)
    out = assert_stops_during_start_up(proc, log_path, signals, "the validator", PROMPT_S)
    assert "error:" not in out, out


# -- the Validator's start-up, no broker -------------------------------------------------------------
def _validator(tmp_path: Path, operation_timeout_s: float = 30.0) -> Validator:
    settings = ServiceSettings(
        kafka={"bootstrap.servers": "127.0.0.1:1"},
        topics=("out",),
        alerts_topic="alerts",
        dead_letter_topic="dlq",
        sources=("src",),
        state_dir=tmp_path / "state",
        operation_timeout_s=operation_timeout_s,
    )
    return Validator(settings)


def test_a_stop_while_the_brokers_do_not_answer_ends_the_start_up_within_a_second(tmp_path: Path) -> None:
    """Before: start() went on for about 40 s whatever was asked, then raised."""
    with _validator(tmp_path) as validator:
        timer = threading.Timer(0.5, validator.stop)
        timer.start()
        started = time.monotonic()
        try:
            validator.start()  # returns: a stop request is not an error
        finally:
            timer.cancel()
        assert time.monotonic() - started < 3.0
        assert validator.ready() == (False, "the source view is catching up")


def test_brokers_that_do_not_answer_within_the_operation_timeout_are_named(tmp_path: Path) -> None:
    started = time.monotonic()
    named = r"127\.0\.0\.1:1 within 1\.5 s.*check the bootstrap"
    with _validator(tmp_path, 1.5) as validator, pytest.raises(ValidatorError, match=named):
        validator.start()
    assert time.monotonic() - started < 6.0


# -- start_up: the start-up in another thread, no broker ---------------------------------------------
class _Service:
    """Stands in for a service: `start()` waits for `release` (not looking at the stop flag, as a
    librdkafka call does), or raises `error`."""

    def __init__(self, *, release: threading.Event | None = None, error: Exception | None = None) -> None:
        self.release = release
        self.error = error
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.closed = threading.Event()

    def start(self) -> None:
        self.started.set()
        if self.release is not None:
            self.release.wait(10)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.closed.set()


def _signal_soon(stops: stop_requests.StopRequests, after_s: float, signum: int = signal.SIGTERM) -> None:
    threading.Timer(after_s, stops.on_signal, args=(signum, None)).start()


def test_a_start_up_that_does_not_look_at_the_stop_request_is_left_behind_and_closed_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stop_requests, "STOP_GRACE_S", 0.3)
    release = threading.Event()
    service = _Service(release=release)
    stops = stop_requests.StopRequests()
    _signal_soon(stops, 0.1)
    started = time.monotonic()
    assert stop_requests.start_up(service, stops) is False
    assert time.monotonic() - started < 2.0
    assert service.stopped.is_set() and not service.closed.is_set()  # still starting: not closed under it
    release.set()
    assert service.closed.wait(5)  # by the start-up's thread, once it returned
    assert not stops.running


def test_a_second_signal_does_not_wait_for_the_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stop_requests, "STOP_GRACE_S", 30.0)
    release = threading.Event()
    service = _Service(release=release)
    stops = stop_requests.StopRequests()
    _signal_soon(stops, 0.1, signal.SIGINT)
    _signal_soon(stops, 0.4)
    started = time.monotonic()
    try:
        assert stop_requests.start_up(service, stops) is False
        assert time.monotonic() - started < 3.0
        assert stops.signal_name == "SIGINT" and stops.count == 2
    finally:
        release.set()
    assert service.closed.wait(5)


def test_a_start_up_that_returns_within_the_grace_is_closed_and_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stop_requests, "STOP_GRACE_S", 5.0)
    release = threading.Event()
    service = _Service(release=release)
    stops = stop_requests.StopRequests()
    _signal_soon(stops, 0.1)
    threading.Timer(0.5, release.set).start()
    assert stop_requests.start_up(service, stops) is False
    assert service.closed.is_set() and not stops.running


def test_without_a_stop_the_start_up_s_result_or_error_is_the_command_s() -> None:
    service = _Service()
    stops = stop_requests.StopRequests()
    assert stop_requests.start_up(service, stops) is True
    assert stops.running and not service.closed.is_set()  # the caller runs and closes it
    stops.on_signal(signal.SIGTERM, None)  # now a stop after the current batch
    assert service.stopped.is_set()

    failing = _Service(error=ValidatorError("brokers gone"))
    with pytest.raises(ValidatorError, match="brokers gone"):
        stop_requests.start_up(failing, stop_requests.StopRequests())
    assert failing.closed.is_set()

    stopped = stop_requests.StopRequests()
    stopped.on_signal(signal.SIGINT, None)
    never = _Service()
    assert stop_requests.start_up(never, stopped) is False
    assert not never.started.is_set() and never.stopped.is_set() and never.closed.is_set()
