"""Function registry: id + version -> callable, with a hash of its code.

The lineage names functions by id and version; the Validator and Recompute Manager replay a lineage by
looking them up here. The code hash is recorded too, so a function whose body changed without a
version bump is caught: at registration (same id and version, different code is refused) and later,
when a lineage step's hash differs from the registered function's.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import marshal
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import CodeType, MappingProxyType
from typing import Any

from streamprov.errors import FunctionNotFoundError, RegistryError
from streamprov.lineage import InputDigest, Step, StepKind
from streamprov.merkle import length_prefixed

CODE_HASH_SIZE = 16


def code_hash(func: Callable[..., Any], inverse: Callable[..., Any] | None = None) -> bytes:
    """First 16 bytes of SHA-256 over the function's normalised source.

    The source is parsed and dumped as an AST without decorators, positions or comments, so
    reformatting or moving a function does not change its hash but changing what it does does.
    Without source (built-ins, REPL lambdas) the bytecode is hashed instead.

    A reduce's `inverse` is part of what it does (the incremental recompute replays it): with one,
    the hash is over a tag and both materials, length-prefixed; without one it is the function's hash
    alone, as it always was.
    """
    if inverse is None:
        return hashlib.sha256(_material(func)).digest()[:CODE_HASH_SIZE]
    both = length_prefixed(b"reduce+inverse", _material(func), _material(inverse))
    return hashlib.sha256(both).digest()[:CODE_HASH_SIZE]


def _material(func: Callable[..., Any]) -> bytes:
    """What `code_hash` hashes: the normalised AST dump, else the bytecode material."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
        node = tree.body[0]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.decorator_list = []
            first = node.body[0] if node.body else None
            is_docstring = (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            )
            if is_docstring:  # a docstring edit is not a code change
                node.body = node.body[1:] or [ast.Pass()]
        return ast.dump(node, include_attributes=False).encode()
    except (OSError, TypeError, SyntaxError, IndexError):
        code = getattr(func, "__code__", None)
        return _bytecode_material(code) if code is not None else repr(func).encode()


def _bytecode_material(code: CodeType) -> bytes:
    """Opcodes alone miss constants (`x + 1` and `x + 2` share them): add constants and names too,
    nested code objects included, but not file names or line numbers."""
    consts = tuple(_bytecode_material(c) if isinstance(c, CodeType) else c for c in code.co_consts)
    try:
        return marshal.dumps((code.co_code, consts, code.co_names, code.co_varnames))
    except ValueError:  # an unmarshallable constant: its repr is stable enough
        return marshal.dumps((code.co_code, repr(consts), code.co_names, code.co_varnames))


@dataclass(frozen=True)
class RegisteredFunction:
    """A transformation the pipeline may apply and a recompute may replay."""

    function_id: str
    version: str
    kind: StepKind
    func: Callable[..., Any]
    code_hash: bytes
    default_params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Parameters applied unless a step overrides them (left out of the hash: a mapping is unhashable)."""
    initial: Callable[[], Any] | None = None
    """REDUCE only: a factory for the empty accumulator."""
    inverse: Callable[..., Any] | None = None
    """REDUCE only, optional: `inverse(accumulator, value, **params) -> accumulator` takes one input
    back out, so that `fn(inverse(acc, old), new)` is the fold with `old` replaced by `new` (the fold
    is then order-insensitive: a sum, a count; not a float sum, whose rounding depends on order). The
    executor then recomputes a reduce with few changed inputs from its previous output, which it
    reads back through the serde: the accumulator must survive `loads(dumps(acc))` unchanged for
    `fn` and `inverse` (an int or a dict of str keys does; a tuple or a set does not). Part of the
    code hash."""

    def step(self, params: Mapping[str, Any] | None = None, inputs: InputDigest | None = None) -> Step:
        merged = {**self.default_params, **(params or {})}
        return Step.create(self.kind, self.function_id, self.version, self.code_hash, merged, inputs)

    def apply(self, *args: Any, params: Mapping[str, Any] | None = None) -> Any:
        return self.func(*args, **{**self.default_params, **(params or {})})

    def retract(self, accumulator: Any, value: Any, params: Mapping[str, Any] | None = None) -> Any:
        """`inverse(accumulator, value)`: the accumulator without `value` (needs an inverse)."""
        if self.inverse is None:
            raise RegistryError(f"reduce function {self.function_id!r} has no inverse")
        return self.inverse(accumulator, value, **{**self.default_params, **(params or {})})


class FunctionRegistry:
    """Registered functions by (id, version); the newest registration of an id is its default."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], RegisteredFunction] = {}
        self._latest: dict[str, RegisteredFunction] = {}

    def add(
        self,
        func: Callable[..., Any],
        function_id: str,
        version: str,
        *,
        kind: StepKind = StepKind.MAP,
        params: Mapping[str, Any] | None = None,
        initial: Callable[[], Any] | None = None,
        inverse: Callable[..., Any] | None = None,
    ) -> RegisteredFunction:
        if not function_id or not version:
            raise RegistryError("a function needs a non-empty id and version")
        if inverse is not None and kind is not StepKind.REDUCE:
            raise RegistryError(f"only a reduce function takes an inverse ({function_id!r} is a {kind.name})")
        if kind is StepKind.REDUCE and initial is None:
            raise RegistryError(
                f"reduce function {function_id!r} needs initial=<factory of the empty accumulator>"
            )
        entry = RegisteredFunction(
            function_id,
            version,
            kind,
            func,
            code_hash(func, inverse),
            MappingProxyType(dict(params or {})),
            initial,
            inverse,
        )
        existing = self._by_key.get((function_id, version))
        if existing is not None and existing.code_hash != entry.code_hash:
            raise RegistryError(
                f"function {function_id!r} version {version!r} is already registered with other "
                "code; bump the version when the code changes"
            )
        self._by_key[(function_id, version)] = entry
        self._latest[function_id] = entry
        return entry

    def map(
        self, function_id: str, version: str, **params: Any
    ) -> Callable[[Callable[..., Any]], RegisteredFunction]:
        """Decorator: register `fn(value, **params) -> value`."""
        return lambda fn: self.add(fn, function_id, version, kind=StepKind.MAP, params=params)

    def reduce(
        self,
        function_id: str,
        version: str,
        *,
        initial: Callable[[], Any],
        inverse: Callable[..., Any] | None = None,
        **params: Any,
    ) -> Callable[[Callable[..., Any]], RegisteredFunction]:
        """Decorator: register `fn(accumulator, value, **params) -> accumulator`, optionally with its
        `inverse(accumulator, value, **params) -> accumulator` (see `RegisteredFunction.inverse`)."""
        return lambda fn: self.add(
            fn, function_id, version, kind=StepKind.REDUCE, params=params, initial=initial, inverse=inverse
        )

    def get(self, function_id: str, version: str | None = None) -> RegisteredFunction:
        entry = self._latest.get(function_id) if version is None else self._by_key.get((function_id, version))
        if entry is None:
            known = ", ".join(f"{i}@{v}" for i, v in sorted(self._by_key)) or "none"
            wanted = function_id if version is None else f"{function_id}@{version}"
            raise FunctionNotFoundError(f"no function {wanted} is registered (registered: {known})")
        return entry

    def for_step(self, step: Step) -> RegisteredFunction:
        """The function a lineage step names; its code hash may differ (see `changed`)."""
        return self.get(step.function_id, step.function_version)

    def changed(self, step: Step) -> bool:
        """True when the registered code for this step's id and version is not the code that ran."""
        return self.for_step(step).code_hash != step.code_hash

    def __iter__(self) -> Any:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)
