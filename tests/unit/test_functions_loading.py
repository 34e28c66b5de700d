"""`--functions module:attribute`: every way a user's module can fail is a `FunctionsLoadError`
(a configuration error, exit 2 from the services), never a traceback."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamprov.cli import app
from streamprov.registry import FunctionRegistry
from validator.errors import ValidatorConfigError
from validator.rederive import FunctionsLoadError, load_registry


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module(directory: Path, source: str) -> str:
    """A module with a name never imported before (so no earlier test's import is cached)."""
    name = f"fnmod_{uuid.uuid4().hex}"
    (directory / f"{name}.py").write_text(source)
    return name


@pytest.mark.parametrize(
    ("source", "attribute", "expected"),
    [
        ("def broken(:\n  pass\n", "x", r"importing fnmod_\w+ failed: SyntaxError"),
        ("x = 1 / 0\n", "x", r"importing fnmod_\w+ failed: ZeroDivisionError: division by zero"),
        ("import nonexistent_dep_xyz\n", "x", r"importing fnmod_\w+ failed: ModuleNotFoundError"),
        ("y = 1\n", "x", r"has no attribute 'x'"),
        (
            "from streamprov import FunctionRegistry\ndef make(name):\n    return FunctionRegistry()\n",
            "make",
            r"calling make\(\) raised TypeError: .*'name'.*takes no arguments",
        ),
        (
            "def make():\n    raise ZeroDivisionError('boom')\n",
            "make",
            r"calling make\(\) raised ZeroDivisionError: boom",
        ),
        ("def make():\n    return 42\n", "make", r"make\(\) returned a int, not a FunctionRegistry"),
        ("x = 'text'\n", "x", r"is a str, not a FunctionRegistry"),
    ],
)
def test_a_module_that_fails_gives_a_typed_error_with_spec_and_cause(
    module_dir: Path, source: str, attribute: str, expected: str
) -> None:
    spec = f"{_module(module_dir, source)}:{attribute}"
    with pytest.raises(FunctionsLoadError, match=expected) as info:
        load_registry(spec)
    assert spec in str(info.value)
    assert isinstance(info.value, ValidatorConfigError)  # what the CLIs treat as configuration


def test_a_function_that_is_not_a_factory_is_refused() -> None:
    with pytest.raises(FunctionsLoadError, match=r"json:loads: calling loads\(\) raised TypeError"):
        load_registry("json:loads")


def test_a_registry_and_a_factory_load(module_dir: Path) -> None:
    name = _module(
        module_dir,
        "from streamprov import FunctionRegistry\nregistry = FunctionRegistry()\n"
        "def make():\n    return registry\n",
    )
    assert isinstance(load_registry(f"{name}:registry"), FunctionRegistry)
    assert load_registry(f"{name}:make") is load_registry(f"{name}:registry")


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "streamprov.yaml"
    path.write_text(
        'kafka:\n  bootstrap_servers: "127.0.0.1:1"\n'
        "streams:\n  alerts: a\n  dead_letters: d\n"
        "sources:\n  - src\n"
        "topics:\n  out1: {}\n"
        f"validator:\n  state_dir: {tmp_path / 'state'}\n"
    )
    return path


@pytest.mark.parametrize("command", [["validator", "run"], ["recompute-manager", "run"], ["changes", "run"]])
def test_services_exit_2_without_a_traceback(module_dir: Path, command: list[str]) -> None:
    spec = _module(module_dir, "x = 1 / 0\n") + ":x"
    config = _config(module_dir)
    args = [*command, "--config", str(config), "--functions", spec]
    if command[0] == "changes":
        args += ["--state-dir", str(module_dir / "changes-state")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, ZeroDivisionError)
    assert f"error: --functions {spec}: importing" in result.output
    assert "ZeroDivisionError: division by zero" in result.output
