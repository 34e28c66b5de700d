"""Re-derivation: replay a record's lineage on its original source value and compare checksums.

If the source is the version the record was derived from (the drift check agrees) and every step is
a registered map function, running the steps again must give the same bytes; a different checksum
means a step is nondeterministic or something went wrong silently when the record was made.

Only map chains are replayed: a reduce output derives from many source records whose list lives in
the provenance ledger, not in the header. Records are sampled deterministically from their
coordinates, so checking the same record again (after a restart) samples it again and any alert
repeats with the same id.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from streamprov.agents.serde import JsonSerde, Serde
from streamprov.checksum import ChecksumAlgorithm, digest
from streamprov.errors import FunctionNotFoundError
from streamprov.lineage import Lineage, Step, StepKind
from streamprov.registry import FunctionRegistry
from validator.alerts import AlertKind
from validator.errors import ValidatorConfigError

_SCALE = float(1 << 32)


def sampled(topic: str, partition: int, offset: int, rate: float) -> bool:
    """Deterministic sampling by coordinates: the same record is always in or always out."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return _crc32c.crc32c(f"{topic}/{partition}/{offset}".encode()) / _SCALE < rate


@dataclass(frozen=True, slots=True)
class Outcome:
    """A failed re-derivation: the alert kind and its evidence (expected, actual, reason)."""

    kind: AlertKind
    expected: str
    actual: str
    reason: str


def describe_chain(lineage: Lineage) -> str:
    return " -> ".join(s.describe() for s in lineage)


class Rederiver:
    """Replays map lineages with functions from a `FunctionRegistry` and a value serde."""

    def __init__(self, registry: FunctionRegistry, serde: Serde | None = None) -> None:
        self.registry = registry
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self._params: dict[Step, dict[str, Any]] = {}

    @staticmethod
    def replayable(lineage: Lineage) -> bool:
        """Only non-empty chains of map steps can be replayed from one source record."""
        return bool(lineage) and all(s.kind is StepKind.MAP for s in lineage)

    def _step_params(self, step: Step) -> dict[str, Any]:
        params = self._params.get(step)
        if params is None:
            if len(self._params) > 4096:
                self._params.clear()
            params = self._params[step] = step.params
        return params

    def check(
        self, lineage: Lineage, source_value: bytes, algorithm: ChecksumAlgorithm, expected_digest: bytes
    ) -> Outcome | None:
        """None when replaying `lineage` on `source_value` reproduces `expected_digest`."""
        expected = f"{algorithm.name.lower()}:{expected_digest.hex()}"
        functions = []
        for step in lineage:
            try:
                functions.append(self.registry.for_step(step))
            except FunctionNotFoundError as exc:
                return Outcome(
                    AlertKind.MISSING_FUNCTION,
                    f"{step.function_id}@{step.function_version} in the function registry",
                    "not registered",
                    f"cannot re-derive ({describe_chain(lineage)}): {exc}",
                )
        changed = [
            f"{s.function_id}@{s.function_version}"
            for s, f in zip(lineage, functions, strict=True)
            if f.code_hash != s.code_hash
        ]
        note = (
            f"; note: the registered code of {', '.join(changed)} differs from the code that ran"
            if changed
            else ""
        )
        try:
            value: Any = self.serde.loads(source_value)
            for step, function in zip(lineage, functions, strict=True):
                value = function.apply(value, params=self._step_params(step))
            output = self.serde.dumps(value)
        except Exception as exc:  # the user's function or serde: report it, never crash the loop
            return Outcome(
                AlertKind.REDERIVATION_MISMATCH,
                expected,
                f"replay raised {type(exc).__name__}: {exc}"[:500],
                f"replaying {describe_chain(lineage)} on the source value raised{note}",
            )
        actual_digest = digest(algorithm, output)
        if actual_digest == expected_digest:
            return None
        return Outcome(
            AlertKind.REDERIVATION_MISMATCH,
            expected,
            f"{algorithm.name.lower()}:{actual_digest.hex()}",
            f"replaying {describe_chain(lineage)} on the current source value "
            f"({self.serde.name}) gives another output{note}",
        )


class FunctionsLoadError(ValidatorConfigError):
    """`--functions` names no usable FunctionRegistry: the message has the spec and the cause."""


_WANTED = "name a FunctionRegistry, or a function that takes no arguments and returns one"


def load_registry(spec: str) -> FunctionRegistry:
    """`package.module:attribute` -> the FunctionRegistry it names (or that calling it returns).

    Raises `FunctionsLoadError` for anything the user's module does wrong (an import or factory that
    raises, a non-registry), so the services report a configuration error instead of a traceback.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise FunctionsLoadError(f"--functions must look like 'module:attribute', not {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error at import time is theirs to fix
        raise FunctionsLoadError(
            f"--functions {spec}: importing {module_name} failed: {type(exc).__name__}: {exc} "
            "(check the module and PYTHONPATH)"
        ) from exc
    try:
        for part in attribute.split("."):
            target = getattr(target, part)
    except AttributeError as exc:
        raise FunctionsLoadError(f"--functions {spec}: {exc}") from exc
    if not isinstance(target, FunctionRegistry) and callable(target):
        factory: Callable[[], Any] = target
        try:
            target = factory()
        except Exception as exc:  # a factory needing arguments, or failing
            raise FunctionsLoadError(
                f"--functions {spec}: calling {attribute}() raised {type(exc).__name__}: {exc}; {_WANTED}"
            ) from exc
        if not isinstance(target, FunctionRegistry):
            raise FunctionsLoadError(
                f"--functions {spec}: {attribute}() returned a {type(target).__name__}, "
                f"not a FunctionRegistry; {_WANTED}"
            )
    if not isinstance(target, FunctionRegistry):
        raise FunctionsLoadError(
            f"--functions {spec} is a {type(target).__name__}, not a FunctionRegistry; {_WANTED}"
        )
    return target


__all__ = ["FunctionsLoadError", "Outcome", "Rederiver", "load_registry", "sampled"]
