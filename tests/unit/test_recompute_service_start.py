"""`RecomputeManager` start-up without a broker: a state dir that cannot be made is a configuration
error naming it (the CLI exits 2, no traceback); waiting for brokers that do not answer is stop-aware
(the caller's `stop` event, set by a signal handler installed before the construction, ends it with
`ManagerStoppedError` within about a second) and bounded (`start_timeout_s`: `ManagerError` naming them)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recompute_manager.service import ManagerError, ManagerSettings, ManagerStoppedError, RecomputeManager
from recompute_manager.views import StateError
from streamprov.cli import app
from streamprov.config import ConfigError
from streamprov.registry import FunctionRegistry

UNREACHABLE = "127.0.0.1:1"


def _settings(state_dir: Path, **kw: object) -> ManagerSettings:
    return ManagerSettings(
        kafka={"bootstrap.servers": UNREACHABLE},
        group_id="g",
        alerts_topic="alerts",
        changes_topic="changes",
        tasks_topic="tasks",
        progress_topic="progress",
        dead_letter_topic="dlq",
        ledger_topic="ledger",
        sources=(),
        outputs=(),
        state_dir=state_dir,
        **kw,  # type: ignore[arg-type]
    )


def _under_a_file(tmp_path: Path) -> Path:
    a_file = tmp_path / "hostname"
    a_file.write_text("not a directory\n")
    return a_file / "sub"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_state_dir_that_cannot_be_made_is_a_configuration_error_naming_it(
    tmp_path: Path, where: str
) -> None:
    """Before: the raw FileNotFoundError / NotADirectoryError of `mkdir` (a traceback, exit 1)."""
    state_dir = _under_a_file(tmp_path) if where == "under_a_file" else Path("/proc/streamprov-rm-nope")
    with pytest.raises(StateError) as caught:
        RecomputeManager(_settings(state_dir), FunctionRegistry())
    assert isinstance(caught.value, ConfigError)  # the CLIs' configuration errors: exit 2
    text = str(caught.value)
    assert "recompute_manager.state_dir" in text and str(state_dir) in text
    assert "hint:" in text and "writable directory" in text


def test_the_cli_says_so_and_exits_2(tmp_path: Path) -> None:
    state_dir = _under_a_file(tmp_path)
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f'kafka:\n  bootstrap_servers: "{UNREACHABLE}"\nrecompute_manager:\n  state_dir: {state_dir}\n'
    )
    result = CliRunner().invoke(
        app,
        ["recompute-manager", "run", "--config", str(config), "--functions", "streamprov.demo:registry"],
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "error:" in result.output and str(state_dir) in result.output
    assert "Traceback" not in result.output


def test_a_stop_request_while_the_brokers_do_not_answer_ends_the_construction_at_once(tmp_path: Path) -> None:
    """Before: `init_transactions` blocked the construction for 30 s whatever was asked (there was
    nothing to ask: `stop()` needs the object the construction has not returned yet)."""
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ManagerStoppedError, match="stopped during start-up"):
            RecomputeManager(_settings(tmp_path / "rm"), FunctionRegistry(), stop=stop)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 3.0


def test_a_stop_requested_before_the_construction_ends_it_before_any_wait(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(ManagerStoppedError):
        RecomputeManager(_settings(tmp_path / "rm"), FunctionRegistry(), stop=stop)
    assert time.monotonic() - started < 1.0


def test_brokers_that_do_not_answer_within_the_start_timeout_are_named(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ManagerError, match=r"127\.0\.0\.1:1.*within 1\.5 s") as caught:
        RecomputeManager(_settings(tmp_path / "rm", start_timeout_s=1.5), FunctionRegistry())
    assert not isinstance(caught.value, ManagerStoppedError)
    assert time.monotonic() - started < 5.0


def test_a_start_up_that_fails_does_not_set_the_callers_stop_event(tmp_path: Path) -> None:
    """The construction closes what it opened when it fails; closing must not set the caller's stop
    event, or the CLI (whose signal handlers share it) takes the failure for a stop request and exits
    0 with 'stopped:  during start-up' instead of the error (found re-probing unreachable.py none)."""
    stop = threading.Event()
    with pytest.raises(ManagerError) as caught:
        RecomputeManager(_settings(tmp_path / "rm", start_timeout_s=1.0), FunctionRegistry(), stop=stop)
    assert not isinstance(caught.value, ManagerStoppedError)
    assert not stop.is_set()
