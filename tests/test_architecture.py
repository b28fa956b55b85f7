"""The shape of the package: the core names no method, every method registers itself, no import cycles.

These read the source (AST), so they fail the moment a core module imports a method or reads a method's
config section by name, or an import (function-local ones included) closes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cltk  # noqa: F401  (registers the methods)
from cltk import registry

PKG = Path(cltk.__file__).resolve().parent
# the core: config loading, the loop, one step, data, checkpoints, evaluation, shared helpers
CORE = [
    p
    for p in sorted(PKG.rglob("*.py"))
    if "methods" not in p.relative_to(PKG).parts
    and "ner" not in p.relative_to(PKG).parts  # the NER mode is its own front door (docs/ner.md)
    and p.name not in ("__init__.py", "__main__.py")
]
METHOD_NAMES = {s.name for s in registry.specs()}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """Every cltk module ``path`` imports at run time (top level and inside functions), leaving out
    ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cltk"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "cltk":
                continue
            for a in node.names:  # `from cltk import registry` imports the module cltk.registry
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    PKG.parent / sub.replace(".", "/") / "__init__.py"
                ).is_file()
                out.add(sub if is_module else node.module)
    return out


def test_the_core_imports_no_method():
    bad = {
        str(p.relative_to(PKG)): sorted(m for m in _runtime_imports(p) if m.startswith("cltk.methods"))
        for p in CORE
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_core_reads_no_method_section_by_name():
    """``cfg.das``, ``self.cfg.lora``, ``c.blocks`` ... in a core module would make it know a method."""
    found = []
    for p in CORE:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in METHOD_NAMES:
                owner = ast.unparse(node.value)
                if owner.split(".")[-1] in ("cfg", "c", "config"):
                    found.append(f"{p.relative_to(PKG)}:{node.lineno} {owner}.{node.attr}")
    assert not found


def test_every_method_package_registers_a_complete_spec():
    packages = {p.parent.name for p in (PKG / "methods").glob("*/__init__.py")} - {"kit"}
    assert packages, "no method packages found"
    for name in packages:
        specs = [s for s in registry.specs() if s.build.__module__ == f"cltk.methods.{name}"]
        assert specs, f"cltk/methods/{name}/ registers no method"
        for s in specs:
            assert s.help and s.config.__doc__ is not None or s.help
            fields = s.config.__dataclass_fields__.values()
            assert all(f.metadata.get("help") for f in fields), f"{s.name}: a key without help"


def test_no_import_cycles_even_through_function_local_imports():
    graph = {_module_name(p): _runtime_imports(p) for p in PKG.rglob("*.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_core_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= 520
