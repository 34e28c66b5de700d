"""The shared service lifecycle (`streamprov.agents.lifecycle`) and the change service's failure
handling, without a broker: stop flag, liveness, readiness and probes; a failed batch is retried after
a backoff (the detector rewinds before it consumes again; a failed rewind is retried before anything is
consumed) and, after too many in a row, stops the service; settings and CLI errors."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError
from typer.testing import CliRunner

from streamprov.agents.lifecycle import ServiceState, beating, install_stop_signals, serve_probes
from streamprov.changes.detector import ChangeDetectorError, DetectorStats
from streamprov.changes.service import (
    ChangeService,
    ChangeServiceConfigError,
    ChangeServiceSettings,
    FatalChangeServiceError,
)
from streamprov.cli import app
from streamprov.config import loads_config
from streamprov.ledger.errors import LedgerError


def test_service_state_stop_liveness_and_readiness() -> None:
    state = ServiceState(5.0, not_ready="catching up")
    assert state.ready() == (False, "catching up") and state.alive() == (True, "alive")
    state.started = True
    state._heartbeat -= 10  # a loop stuck for longer than the limit
    assert state.alive()[0] is False
    assert state.beat() is True and state.alive() == (True, "alive")
    state.set_ready("watching")
    assert state.ready() == (True, "watching")
    state.stop()
    assert state.stopping and state.beat() is False
    state.clear_stop()
    assert not state.stopping
    state.closed = True
    assert state.ready() == (False, "stopped") and state.alive() == (True, "alive")


def test_probes_answer_from_the_state() -> None:
    state = ServiceState(5.0)
    servers = serve_probes(state, "127.0.0.1", 0, render_metrics=lambda: "m 1\n")
    try:
        (port,) = [s.port for s in servers]

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return int(r.status), r.read().decode()
            except urllib.error.HTTPError as e:
                return int(e.code), e.read().decode()

        assert get("/readyz") == (503, "not ok: starting\n")
        state.set_ready("ok now")
        assert get("/readyz") == (200, "ok: ok now\n") and get("/healthz") == (200, "ok: alive\n")
        assert get("/metrics") == (200, "m 1\n")
    finally:
        for s in servers:
            s.close()
    assert serve_probes(state, "127.0.0.1", None) == []


def test_stop_signals_and_beating() -> None:
    stopped: list[bool] = []
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        install_stop_signals(lambda: stopped.append(True))
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    assert stopped == [True]
    beats: list[int] = []
    assert list(beating(range(10), lambda: beats.append(1) is None, every=3)) == list(range(10))
    assert len(beats) == 3
    assert list(beating(range(10), lambda: False, every=4)) == [0, 1, 2, 3]  # a stop ends it early


# -- the change service --------------------------------------------------------------------------------
class FakeDetector:
    """Fails the first `failures` steps, then consumes one record per step."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or LedgerError("ledger topic unreadable")
        self.steps = 0
        self.stats = DetectorStats()

    def step(self) -> int:
        self.steps += 1
        if self.steps <= self.failures:
            raise self.error
        self.stats.records += 1
        return 1

    def close(self) -> None:
        pass


def settings(tmp_path: Path, **kw: Any) -> ChangeServiceSettings:
    return ChangeServiceSettings(
        kafka={"bootstrap.servers": "127.0.0.1:9"},
        sources=("src",),
        changes_topic="changes",
        ledger_topic="ledger",
        state_dir=tmp_path / "state",
        retry_backoff_s=0.01,
        **kw,
    )


@pytest.fixture
def service(tmp_path: Path) -> Any:
    svc = ChangeService(settings(tmp_path, max_consecutive_failures=3))
    svc.detector.close()  # never connects: a stand-in takes its place
    svc.state.started = True  # start() needs a broker; the loop is what is tested
    yield svc
    svc.close()


def test_a_failed_batch_is_retried_and_counted(service: Any) -> None:
    fake = service.detector = FakeDetector(failures=2)
    assert service._guarded(fake.step) == 0 and service._guarded(fake.step) == 0
    assert fake.steps == 2 and service._failures == 2
    assert service._guarded(fake.step) == 1 and service._failures == 0  # the batch went through


def test_a_failed_batch_is_rewound_before_anything_is_consumed_again(tmp_path: Path) -> None:
    """The service driving the real `ChangeDetector.step()` (consume and rewind stand in for the
    broker): the batch fails (broker down), then the rewind fails too (still down): each counts as a
    failure and nothing is consumed; then the rewind works, the batch is consumed again and the
    failures are forgotten; a later step does not rewind again."""
    svc = ChangeService(settings(tmp_path, max_consecutive_failures=5))
    svc.state.started = True
    detector = svc.detector
    calls: list[str] = []
    failing = iter([True, False, False])

    def consume(_count: int) -> list[Any]:
        calls.append("consume")
        if next(failing):
            raise ChangeDetectorError("consume failed: broker down")
        return []

    rewinds = iter([ChangeDetectorError("cannot rewind: timed out"), None])

    def rewind() -> None:
        calls.append("rewind")
        exc = next(rewinds)
        if exc is not None:
            raise exc
        detector._must_rewind = False

    try:
        detector._consume = consume  # type: ignore[method-assign]
        detector.rewind = rewind  # type: ignore[method-assign]
        assert svc._guarded(detector.step) == 0 and svc._failures == 1
        assert svc._guarded(detector.step) == 0 and svc._failures == 2  # the rewind failed
        assert calls == ["consume", "rewind"]  # nothing consumed past the failed batch
        assert svc._guarded(detector.step) == 0 and svc._failures == 0
        assert calls == ["consume", "rewind", "rewind", "consume"]
        assert svc._guarded(detector.step) == 0 and calls[-1] == "consume" and calls.count("rewind") == 2
    finally:
        svc.close()


def test_too_many_failures_in_a_row_stop_the_service(service: Any) -> None:
    fake = service.detector = FakeDetector(failures=10)
    service._guarded(fake.step)
    service._guarded(fake.step)
    with pytest.raises(ChangeDetectorError, match="3 batches in a row failed"):
        service._guarded(fake.step)


def test_a_fatal_kafka_error_stops_the_service_at_once(service: Any) -> None:
    fatal = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
    fake = service.detector = FakeDetector(failures=1, error=ChangeDetectorError("consume: fenced", fatal))
    with pytest.raises(FatalChangeServiceError):
        service._guarded(fake.step)


def test_the_loop_stops_on_request_and_when_idle(service: Any) -> None:
    service.detector = FakeDetector(failures=0)
    service.stop()
    assert service.run().records == 0 and not service.state.stopping  # stopped before a batch
    service.detector.step = lambda: 0  # nothing comes
    started = time.monotonic()
    service.run(idle_timeout_s=0.2)
    assert time.monotonic() - started < 5
    assert service.state.ready() == (False, "stopped")


def test_settings_refuse_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ChangeServiceConfigError, match="no source topics"):
        ChangeServiceSettings({}, (), "c", "l", tmp_path)
    with pytest.raises(ChangeServiceConfigError, match="both a source"):
        ChangeServiceSettings({}, ("c",), "c", "l", tmp_path)
    config = loads_config(
        'kafka: {bootstrap_servers: "h:1"}\nstreams: {changes: ch, ledger: led}\nsources: [a, b]\n'
    )
    s = ChangeServiceSettings.from_config(config, state_dir=tmp_path, group_id="g", http_port=None)
    assert (s.sources, s.changes_topic, s.ledger_topic, s.group_id) == (("a", "b"), "ch", "led", "g")
    assert s.kafka["bootstrap.servers"] == "h:1"
    assert s.http_port == 8082, "an option left out (None) keeps the file's value"
    assert (s.ledger_id, s.requests_topic) == ("led", "streamprov.ledger.requests")
    config = loads_config(
        'kafka: {bootstrap_servers: "h:1"}\nsources: [a]\nledger: {id: prov}\n'
        "changes: {group_id: cg, http_port: 9100, max_outputs: 7, progress_interval: 2s,"
        " record_sources: false}\n"
    )
    s = ChangeServiceSettings.from_config(config)
    assert (s.group_id, s.http_port, s.max_outputs, s.progress_interval_s) == ("cg", 9100, 7, 2.0)
    assert (s.ledger_id, s.requests_topic) == ("prov", None)


def test_cli_help_and_config_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "run" in runner.invoke(app, ["changes", "--help"]).output
    missing = runner.invoke(app, ["changes", "run", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    no_sources = tmp_path / "s.yaml"
    no_sources.write_text('kafka: {bootstrap_servers: "127.0.0.1:9"}\n')
    result = runner.invoke(
        app, ["changes", "run", "-c", str(no_sources), "--state-dir", str(tmp_path / "st")]
    )
    assert result.exit_code == 2 and "no source topics" in result.output
    bad_fns = tmp_path / "f.yaml"
    bad_fns.write_text('kafka: {bootstrap_servers: "127.0.0.1:9"}\nsources: [a]\n')
    args = ["changes", "run", "-c", str(bad_fns), "--state-dir", str(tmp_path / "st2"), "--functions", "nope"]
    assert runner.invoke(app, args).exit_code == 2
