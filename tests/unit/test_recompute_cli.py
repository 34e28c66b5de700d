"""`streamprov recompute ...` without a broker: clear errors and exit codes, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from recompute_manager import progress as progress_module
from recompute_manager.progress import ProgressLog, read_progress
from streamprov.cli import app
from streamprov.errors import StreamprovError

UNREACHABLE = "127.0.0.1:1"


@pytest.fixture
def unreachable_config(tmp_path: Path) -> Path:
    path = tmp_path / "streamprov.yaml"
    path.write_text(f'kafka:\n  bootstrap_servers: "{UNREACHABLE}"\n')
    return path


def test_read_progress_without_a_broker_raises_a_typed_error() -> None:
    with pytest.raises(
        StreamprovError, match=r"127\.0\.0\.1:1.*did not answer.*check kafka.bootstrap_servers"
    ):
        read_progress({"bootstrap.servers": UNREACHABLE}, "progress", timeout_s=0.5)
    with pytest.raises(StreamprovError, match="more than 0 seconds"):
        read_progress({"bootstrap.servers": UNREACHABLE}, "progress", timeout_s=0)


def test_status_without_a_broker_says_so_and_exits_1(unreachable_config: Path) -> None:
    result = CliRunner().invoke(
        app, ["recompute", "status", "--config", str(unreachable_config), "--timeout", "0.5"]
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error: the brokers at '127.0.0.1:1' did not answer" in result.output
    assert "Traceback" not in result.output


def test_status_refuses_a_timeout_of_zero(unreachable_config: Path) -> None:
    result = CliRunner().invoke(
        app, ["recompute", "status", "--config", str(unreachable_config), "--timeout", "0"]
    )
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.output


def test_status_with_no_plans_says_so(unreachable_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "read_progress", lambda *_a, **_k: ProgressLog())
    result = CliRunner().invoke(app, ["recompute", "status", "--config", str(unreachable_config)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no plans on streamprov.recompute.progress"


def test_approve_without_a_broker_names_the_brokers(unreachable_config: Path) -> None:
    result = CliRunner().invoke(
        app, ["recompute", "approve", "abc", "--config", str(unreachable_config), "--timeout", "1"]
    )
    assert result.exit_code == 1, result.output
    assert "error: the brokers at '127.0.0.1:1' did not answer within 1 s" in result.output
    assert "check kafka.bootstrap_servers" in result.output
