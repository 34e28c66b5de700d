"""The function registry: ids and versions, the decorator API, and the code hash.

Functions whose hash we compare are written to files under tmp_path and imported from there, so
`inspect.getsource` sees real source text exactly as a user's module would have it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import itertools
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from streamprov.errors import FunctionNotFoundError, RegistryError, StreamprovError
from streamprov.lineage import Step, StepKind
from streamprov.registry import CODE_HASH_SIZE, FunctionRegistry, RegisteredFunction, code_hash

_counter = itertools.count()


def load(tmp_path: Path, source: str) -> ModuleType:
    """Import `source` as a fresh module from its own file (distinct names defeat linecache reuse)."""
    name = f"sp_registry_case_{next(_counter)}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source), "utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hash_of(tmp_path: Path, source: str, name: str = "transform") -> bytes:
    return code_hash(getattr(load(tmp_path, source), name))


BASE = '''
def passthrough(f):
    return f


@passthrough
def transform(value, factor=2):
    """Scale the value."""
    scaled = value * factor
    return scaled + 1
'''

SAME_CODE = {
    "reformatted": '''
        def passthrough(f):
            return f
        @passthrough
        def transform(value,
                      factor = 2):
            """Scale the value."""
            scaled = (value  *  factor)
            return (scaled + 1)
    ''',
    "comments": '''
        def passthrough(f):
            return f


        # Scales a value.
        @passthrough
        def transform(value, factor=2):  # the factor defaults to 2
            """Scale the value."""
            # multiply first
            scaled = value * factor
            return scaled + 1  # then shift
    ''',
    "docstring edited": '''
        def passthrough(f):
            return f


        @passthrough
        def transform(value, factor=2):
            """Multiply the value by `factor`, then add one.

            A longer, rewritten docstring.
            """
            scaled = value * factor
            return scaled + 1
    ''',
    "docstring removed": """
        def passthrough(f):
            return f


        @passthrough
        def transform(value, factor=2):
            scaled = value * factor
            return scaled + 1
    """,
    "single-quoted docstring": """
        def passthrough(f):
            return f


        @passthrough
        def transform(value, factor=2):
            'Scale the value.'
            scaled = value * factor
            return scaled + 1
    """,
    "decorator removed": '''
        def transform(value, factor=2):
            """Scale the value."""
            scaled = value * factor
            return scaled + 1
    ''',
    "decorators changed": '''
        import functools


        def passthrough(*args, **kwargs):
            return lambda f: f


        @passthrough("other", retries=3)
        @passthrough()
        def transform(value, factor=2):
            """Scale the value."""
            scaled = value * factor
            return scaled + 1
    ''',
    "moved down the file": '''
        import math

        CONSTANT = math.pi


        def helper():
            return CONSTANT


        def transform(value, factor=2):
            """Scale the value."""
            scaled = value * factor
            return scaled + 1
    ''',
    "a method-like indentation": '''
        class Holder:
            @staticmethod
            def transform(value, factor=2):
                """Scale the value."""
                scaled = value * factor
                return scaled + 1


        transform = Holder.transform
    ''',
}

DIFFERENT_CODE = {
    "body constant": """
        def transform(value, factor=2):
            scaled = value * factor
            return scaled + 2
    """,
    "body operator": """
        def transform(value, factor=2):
            scaled = value * factor
            return scaled - 1
    """,
    "extra statement": """
        def transform(value, factor=2):
            scaled = value * factor
            scaled = abs(scaled)
            return scaled + 1
    """,
    "default parameter": """
        def transform(value, factor=3):
            scaled = value * factor
            return scaled + 1
    """,
    "variable name": """
        def transform(value, factor=2):
            result = value * factor
            return result + 1
    """,
    "string literal that looks like a docstring but is not first": '''
        def transform(value, factor=2):
            scaled = value * factor
            """not a docstring"""
            return scaled + 1
    ''',
}


def test_code_hash_is_16_bytes_of_sha256_over_the_normalised_ast(tmp_path: Path) -> None:
    """The documented definition, recomputed independently."""
    module = load(tmp_path, BASE)
    node = ast.parse(textwrap.dedent(BASE)).body[1]
    assert isinstance(node, ast.FunctionDef)
    node.decorator_list = []
    node.body = node.body[1:]  # drop the docstring
    expected = hashlib.sha256(ast.dump(node, include_attributes=False).encode()).digest()[:16]
    assert code_hash(module.transform) == expected
    assert CODE_HASH_SIZE == 16


@pytest.mark.parametrize("variant", list(SAME_CODE))
def test_code_hash_ignores_what_does_not_change_behaviour(tmp_path: Path, variant: str) -> None:
    assert hash_of(tmp_path, SAME_CODE[variant]) == hash_of(tmp_path, BASE)


@pytest.mark.parametrize("variant", list(DIFFERENT_CODE))
def test_code_hash_changes_with_the_code(tmp_path: Path, variant: str) -> None:
    assert hash_of(tmp_path, DIFFERENT_CODE[variant]) != hash_of(tmp_path, BASE)


def test_code_hash_is_stable_across_loads(tmp_path: Path) -> None:
    assert len({hash_of(tmp_path, BASE) for _ in range(3)}) == 1


def test_docstring_only_function(tmp_path: Path) -> None:
    doc_only = hash_of(tmp_path, 'def transform(v):\n    """Nothing."""\n')
    assert doc_only == hash_of(tmp_path, "def transform(v):\n    pass\n")
    assert doc_only != hash_of(tmp_path, "def transform(v):\n    return v\n")


def test_code_hash_without_source_uses_constants_too() -> None:
    """exec'd or REPL code has no source file: the bytecode fallback must still see `+ 1` vs `+ 2`."""
    ns: dict[str, Any] = {}
    exec("def a(x):\n    return x + 1\ndef b(x):\n    return x + 2\ndef c(x):\n    return x + 1\n", ns)
    exec("def d(x):\n    return (lambda y: y * 3)(x)\ndef e(x):\n    return (lambda y: y * 4)(x)\n", ns)
    exec("def f(x):\n    return x.upper()\ndef g(x):\n    return x.lower()\n", ns)
    assert code_hash(ns["a"]) != code_hash(ns["b"])
    assert code_hash(ns["a"]) == code_hash(ns["c"])  # same code, same hash, wherever it lives
    assert code_hash(ns["d"]) != code_hash(ns["e"])  # constants of nested code objects count
    assert code_hash(ns["f"]) != code_hash(ns["g"])  # so do the names it calls
    assert len(code_hash(ns["a"])) == CODE_HASH_SIZE


def test_code_hash_of_a_builtin_is_stable() -> None:
    assert code_hash(len) == code_hash(len)
    assert code_hash(len) != code_hash(abs)


# --- ids, versions and the decorator API --------------------------------------------------------


def test_add_get_and_versions(tmp_path: Path) -> None:
    module = load(tmp_path, BASE + "\n\ndef other(value):\n    return value\n")
    reg = FunctionRegistry()
    v1 = reg.add(module.transform, "scale", "1", params={"factor": 3})
    v2 = reg.add(module.other, "scale", "2")
    assert isinstance(v1, RegisteredFunction)
    assert (v1.function_id, v1.version, v1.kind) == ("scale", "1", StepKind.MAP)
    assert reg.get("scale") is v2  # the newest registration is the default
    assert reg.get("scale", "1") is v1
    assert reg.get("scale", "2") is v2
    assert len(reg) == 2
    assert set(reg) == {v1, v2}
    assert v1.code_hash == code_hash(module.transform) != v2.code_hash
    assert v1.apply(2) == 7  # default params applied
    assert v1.apply(2, params={"factor": 10}) == 21


@pytest.mark.parametrize(("fid", "version"), [("", "1"), ("f", ""), ("", "")])
def test_id_and_version_must_be_non_empty(fid: str, version: str) -> None:
    with pytest.raises(RegistryError):
        FunctionRegistry().add(lambda v: v, fid, version)


def test_decorators() -> None:
    reg = FunctionRegistry()

    @reg.map("double", "1.0", factor=2)
    def double(value: int, factor: int) -> int:
        return value * factor

    @reg.reduce("total", "7", initial=int, scale=1)
    def total(acc: int, value: int, scale: int) -> int:
        return acc + value * scale

    assert isinstance(double, RegisteredFunction) and isinstance(total, RegisteredFunction)
    assert double.kind is StepKind.MAP and total.kind is StepKind.REDUCE
    assert double.apply(4) == 8
    assert total.initial is int
    acc = total.initial()
    for v in (1, 2, 3):
        acc = total.apply(acc, v, params={"scale": 10})
    assert acc == 60
    assert reg.get("double", "1.0") is double and reg.get("total") is total


def test_step_carries_id_version_hash_and_merged_params() -> None:
    reg = FunctionRegistry()
    fn = reg.add(lambda v, a, b: v, "f", "2", params={"a": 1, "b": {"x": [1, 2]}})
    step = fn.step({"b": "over", "c": None})
    assert step == Step(
        StepKind.MAP, "f", "2", fn.code_hash, (("a", "1"), ("b", '"over"'), ("c", "null")), None
    )
    assert step.params == {"a": 1, "b": "over", "c": None}
    assert fn.step().params == {"a": 1, "b": {"x": [1, 2]}}
    assert reg.for_step(step) is fn


def test_reduce_without_initial_raises() -> None:
    reg = FunctionRegistry()
    with pytest.raises(RegistryError, match="initial"):
        reg.add(lambda acc, v: acc + v, "sum", "1", kind=StepKind.REDUCE)
    assert len(reg) == 0


def test_re_registering_same_id_version(tmp_path: Path) -> None:
    reg = FunctionRegistry()
    first = reg.add(load(tmp_path, BASE).transform, "scale", "1")
    # The same code from another module or file (reformatted, commented) is the same function.
    again = reg.add(load(tmp_path, SAME_CODE["comments"]).transform, "scale", "1")
    assert again.code_hash == first.code_hash
    with pytest.raises(RegistryError, match="bump the version"):
        reg.add(load(tmp_path, DIFFERENT_CODE["body constant"]).transform, "scale", "1")
    assert reg.get("scale", "1").code_hash == first.code_hash  # the refused code did not replace it
    bumped = reg.add(load(tmp_path, DIFFERENT_CODE["body constant"]).transform, "scale", "2")
    assert reg.get("scale") is bumped


def test_changed_detects_a_body_change_without_a_version_bump(tmp_path: Path) -> None:
    """The code that ran (a lineage step) vs the code registered now, in a later process."""
    ran = FunctionRegistry().add(load(tmp_path, BASE).transform, "scale", "1").step({"factor": 5})
    later_same = FunctionRegistry()
    later_same.add(load(tmp_path, SAME_CODE["reformatted"]).transform, "scale", "1")
    assert later_same.changed(ran) is False
    later_edited = FunctionRegistry()
    later_edited.add(load(tmp_path, DIFFERENT_CODE["body operator"]).transform, "scale", "1")
    assert later_edited.changed(ran) is True
    with pytest.raises(FunctionNotFoundError):
        FunctionRegistry().changed(ran)


def test_function_not_found_lists_what_is_registered() -> None:
    reg = FunctionRegistry()
    with pytest.raises(FunctionNotFoundError, match=r"registered: none"):
        reg.get("x")
    reg.add(lambda v: v, "zeta", "1")
    reg.add(lambda v: v * 2, "alpha", "3")
    reg.add(lambda v: v * 3, "alpha", "10")
    with pytest.raises(FunctionNotFoundError) as info:
        reg.get("alpha", "4")
    message = str(info.value)
    assert "alpha@4" in message
    assert "registered: alpha@10, alpha@3, zeta@1" in message
    assert isinstance(info.value, RegistryError) and isinstance(info.value, StreamprovError)
    with pytest.raises(FunctionNotFoundError, match="no function missing@1 is registered"):
        reg.for_step(Step.create(StepKind.MAP, "missing", "1", b"", {}))


# --- a reduce's inverse -------------------------------------------------------------------------------

SUM = """
def total(acc, value, scale=1):
    return acc + value * scale


def untotal(acc, value, scale=1):
    return acc - value * scale


def untotal_reformatted(acc,  value, scale = 1):  # named untotal by one test
    # the same code
    return (acc - value * scale)


def untotal_other(acc, value, scale=1):
    return acc - value
"""


def _ast_material(source: str, name: str) -> bytes:
    """The documented `code_hash` material of a function without decorators or docstring."""
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.dump(node, include_attributes=False).encode()


def test_only_a_reduce_takes_an_inverse(tmp_path: Path) -> None:
    m = load(tmp_path, SUM)
    reg = FunctionRegistry()
    with pytest.raises(RegistryError, match="only a reduce function takes an inverse"):
        reg.add(m.total, "total", "1", inverse=m.untotal)  # kind defaults to MAP
    assert len(reg) == 0
    fn = reg.add(m.total, "total", "1", kind=StepKind.REDUCE, initial=int, inverse=m.untotal)
    assert fn.inverse is m.untotal and len(reg) == 1


def test_inverse_retracts_with_the_merged_params(tmp_path: Path) -> None:
    m = load(tmp_path, SUM)
    reg = FunctionRegistry()
    fn = reg.reduce("total", "1", initial=int, inverse=m.untotal, scale=10)(m.total)
    assert fn.kind is StepKind.REDUCE and fn.inverse is m.untotal
    acc = fn.apply(fn.apply(0, 1), 2)
    assert acc == 30
    assert fn.retract(acc, 1) == 20
    assert fn.retract(acc, 1, params={"scale": 1}) == 29
    plain = reg.reduce("plain", "1", initial=int)(m.total)
    with pytest.raises(RegistryError, match="has no inverse"):
        plain.retract(1, 1)


def test_code_hash_with_an_inverse(tmp_path: Path) -> None:
    m = load(tmp_path, SUM)
    source = textwrap.dedent(SUM)
    # Without an inverse: the function's hash alone, as before (the documented definition).
    alone = hashlib.sha256(_ast_material(source, "total")).digest()[:16]
    assert code_hash(m.total) == code_hash(m.total, None) == alone
    assert FunctionRegistry().reduce("t", "1", initial=int)(m.total).code_hash == alone
    # With one: over a tag and both materials, length-prefixed.
    both = b"".join(
        len(p).to_bytes(4, "big") + p
        for p in (b"reduce+inverse", _ast_material(source, "total"), _ast_material(source, "untotal"))
    )
    with_inverse = FunctionRegistry().reduce("t", "1", initial=int, inverse=m.untotal)(m.total)
    assert with_inverse.code_hash == code_hash(m.total, m.untotal) == hashlib.sha256(both).digest()[:16]
    assert with_inverse.code_hash != alone
    # The inverse is part of the code: a changed inverse changes the hash, a reformatted one does not.
    assert code_hash(m.total, m.untotal_other) != with_inverse.code_hash
    reformatted = SUM.replace("def untotal(", "def untotal_old(").replace(
        "def untotal_reformatted(", "def untotal("
    )
    assert code_hash(m.total, load(tmp_path, reformatted).untotal) == with_inverse.code_hash
    # The function and its inverse are not interchangeable.
    assert code_hash(m.untotal, m.total) != code_hash(m.total, m.untotal)


def test_re_registering_with_another_inverse_needs_a_version_bump(tmp_path: Path) -> None:
    m = load(tmp_path, SUM)
    reg = FunctionRegistry()
    reg.add(m.total, "total", "1", kind=StepKind.REDUCE, initial=int, inverse=m.untotal)
    reg.add(load(tmp_path, SUM).total, "total", "1", kind=StepKind.REDUCE, initial=int, inverse=m.untotal)
    with pytest.raises(RegistryError, match="bump the version"):
        reg.add(m.total, "total", "1", kind=StepKind.REDUCE, initial=int, inverse=m.untotal_other)
    with pytest.raises(RegistryError, match="bump the version"):
        reg.add(m.total, "total", "1", kind=StepKind.REDUCE, initial=int)  # inverse dropped
