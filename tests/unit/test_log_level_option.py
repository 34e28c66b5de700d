"""`--log-level` on the three services: an unknown level is a usage error (exit 2) listing the valid
ones, not logging's `ValueError` traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamprov.cli import app

COMMANDS = [["validator", "run"], ["recompute-manager", "run", "--functions", "x:y"], ["changes", "run"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_log_level_is_a_usage_error_listing_the_levels(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "streamprov.yaml"
    config.write_text('kafka:\n  bootstrap_servers: "127.0.0.1:1"\n')
    result = CliRunner().invoke(app, [*command, "--config", str(config), "--log-level", "verbose"])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, ValueError)
    assert "'verbose' is not a log level" in result.output
    assert "debug, info, warning, error" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_log_level_in_capitals_is_accepted(
    tmp_path: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The level reaches the logging setup (the command then fails later, on its empty config)."""
    levels: list[str] = []
    monkeypatch.setattr("validator.cli.configure_logging", lambda level, _json: levels.append(level))
    monkeypatch.setattr("recompute_manager.cli.configure_logging", lambda level, _json: levels.append(level))
    config = tmp_path / "streamprov.yaml"
    config.write_text('kafka:\n  bootstrap_servers: "127.0.0.1:1"\n')
    result = CliRunner().invoke(app, [*command, "--config", str(config), "--log-level", "WARNING"])
    assert levels == ["warning"], result.output
    assert result.exit_code == 2, result.output  # the config lists nothing to run
