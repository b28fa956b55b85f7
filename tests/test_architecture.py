"""The shape of the package: the core names no method, every method registers itself, every import
points down the layers of docs/architecture.md, no import cycles.

These read the source (AST), so they fail the moment a core module imports a method or reads a method's
config section by name, or an import (function-local and type-only ones included) points up a layer or
closes a cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cltk  # noqa: F401  (registers the methods)
from cltk import registry
from cltk.method import Method

PKG = Path(cltk.__file__).resolve().parent
# the core: config loading, the loop, one step, data, checkpoints, evaluation, shared helpers, and the
# modes on top of them (continual NER, `cltk bench`)
CORE = [
    p
    for p in sorted(PKG.rglob("*.py"))
    if "methods" not in p.relative_to(PKG).parts
    and p.name not in ("__init__.py", "__main__.py")
]
METHOD_NAMES = {s.name for s in registry.specs()}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every cltk module ``path`` imports: top level, inside functions and under ``TYPE_CHECKING``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def _third_party(path: Path) -> set[str]:
    """Top-level names of every non-cltk package ``path`` imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out - {"cltk"}


# The layers of docs/architecture.md, lowest first; a module belongs to its longest matching prefix.
# A module may import its own layer or a lower one, never a higher one.
LAYERS = [
    ("foundation", ["cltk.errors", "cltk.typed_config", "cltk.registry", "cltk.extensions",
                    "cltk.diskfull", "cltk.distributed", "cltk.tracking", "cltk.checkpoint",
                    "cltk.losses", "cltk.forward", "cltk.schedules", "cltk.metrics", "cltk.task_report",
                    "cltk.metrics_files", "cltk.data", "cltk.activations", "cltk.lock"]),
    ("schema", ["cltk.config"]),
    ("runtime", ["cltk.validate", "cltk.ds_config", "cltk.model_checks", "cltk.models", "cltk.plan",
                 "cltk.method", "cltk.perplexity", "cltk.engine", "cltk.data.prepare", "cltk.rundir",
                 "cltk.start", "cltk.tasks", "cltk.task_runs", "cltk.grow", "cltk.report",
                 "cltk.continual", "cltk.memplan", "cltk.config_checks", "cltk.model_files"]),
    ("method kit", ["cltk.methods.kit"]),
    ("methods", ["cltk.methods"]),
    ("modes", ["cltk.ner", "cltk.bench"]),
    ("front doors", ["cltk.cli", "cltk.__main__", "cltk"]),
]


def _layer(module: str) -> int:
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > depth:
                best, depth = i, len(pre)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def test_every_import_points_down_the_layers():
    up = []
    for p in sorted(PKG.rglob("*.py")):
        m = _module_name(p)
        for n in sorted(_imports(p)):
            if _layer(n) > _layer(m):
                up.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {n} ({LAYERS[_layer(n)][0]})")
    assert not up, "\n".join(up)


def test_the_schema_parses_only():
    """The run config's schema imports nothing above the foundation, not even lazily: validation,
    corpora, tokenizers and transformers sit above it."""
    path = PKG / "config.py"
    assert {_layer(n) for n in _imports(path)} <= {0}, _imports(path)
    assert not _third_party(path) & {"torch", "transformers", "deepspeed", "tokenizers", "numpy"}


def test_the_core_imports_no_method():
    bad = {
        str(p.relative_to(PKG)): sorted(m for m in _imports(p) if m.startswith("cltk.methods"))
        for p in CORE
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_core_reads_no_method_section_by_name():
    """``cfg.das``, ``self.cfg.lora``, ``c.blocks`` ... in a core module would make it know a method."""
    found = []
    for p in CORE:
        rel = str(p.relative_to(PKG))
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in METHOD_NAMES:
                owner = ast.unparse(node.value)
                if owner.split(".")[-1] in CFG_OWNERS and not _allowed(rel, node.attr):
                    found.append(f"{rel}:{node.lineno} {owner}.{node.attr}")
    assert not found


def test_every_method_package_registers_a_complete_spec():
    # kit/: helpers several methods share, no method of its own
    packages = {p.parent.name for p in (PKG / "methods").glob("*/__init__.py")} - {"kit"}
    assert packages, "no method packages found"
    for name in packages:
        specs = [s for s in registry.specs() if s.config.__module__.startswith(f"cltk.methods.{name}")]
        assert specs, f"cltk/methods/{name}/ registers no method"
        for s in specs:
            assert s.help and s.config.__doc__ is not None or s.help
            fields = s.config.__dataclass_fields__.values()
            assert all(f.metadata.get("help") for f in fields), f"{s.name}: a key without help"
            assert s.hooks.startswith(f"cltk.methods.{name}."), f"{s.name}: hooks outside its package"
            module, cls = s.hooks.split(":")
            assert issubclass(getattr(importlib.import_module(module), cls), Method), s.hooks


def test_no_import_cycles_even_through_function_local_or_type_only_imports():
    graph = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}
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


MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80
ROOT = PKG.parent


def _long_functions(path: Path) -> list[str]:
    """The functions (methods and nested ones included) of a file over 80 lines, docstring included."""
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_files_and_functions_stay_small(path):
    """Every module reads in one sitting: at most 500 lines, no function over 80 (docstring included)."""
    assert len(path.read_text().splitlines()) <= MAX_FILE_LINES
    assert not _long_functions(path)


def test_no_test_or_benchmark_function_is_long():
    """The tests and benchmarks keep the package's floor too: no function over 80 lines."""
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert files
    long = [line for p in files for line in _long_functions(p)]
    assert not long, "\n".join(long)


# Where a method's name may stand outside its package: the list of the packages cltk ships, the
# catalogue of `cltk bench` arms (run-config overrides, like the example configs), NER's own `distill:`
# section (another schema's key) and the HF Trainer door's `distill=` argument.
NAMING_ALLOWED = {"methods/__init__.py": None, "bench/arms.py": None, "ner/": {"distill"},
                  "methods/soft_targets/hf_trainer.py": {"distill"}}
CFG_OWNERS = ("cfg", "c", "config", "run_cfg")


def _names_of(spec) -> tuple[Path, set[str]]:
    package = PKG / "methods" / spec.config.__module__.split(".")[2]
    return package, {spec.config.__name__, spec.hooks.split(":")[1]}


def _allowed(rel: str, name: str) -> bool:
    for prefix, names in NAMING_ALLOWED.items():
        if rel.startswith(prefix) and (names is None or name in names):
            return True
    return False


def _naming(tree: ast.AST, name: str, classes: set[str], strict: bool) -> list[ast.AST]:
    """Nodes that name the method: its classes, its section read off a config (``cfg.blocks``), a
    key path under it (``"blocks.k"``); with ``strict`` (core, kit, modes) also the bare key as a
    string, outside a record's field names (``{"blocks": n}`` in plan.json is a stage's count)."""
    record_keys = {id(k) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            bare = strict and node.value == name and id(node) not in record_keys
            if bare or node.value.startswith(name + "."):
                hits.append(node)
        elif isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value).split(".")[-1]
            if node.attr in classes or (node.attr == name and owner in CFG_OWNERS):
                hits.append(node)
        elif (isinstance(node, ast.Name) and node.id in classes) or (
            isinstance(node, ast.alias) and node.name in classes
        ):
            hits.append(node)
    return hits


def test_no_file_outside_a_method_names_its_key_or_class():
    """Conflicts between methods, and keys a growing run keeps, come from the specs' flags: no other
    file spells a method's section (``"blocks"``, ``"das.mask"``, ``cfg.lora``) or its classes."""
    found = []
    for spec in registry.specs():
        package, classes = _names_of(spec)
        for p in sorted(PKG.rglob("*.py")):
            rel = str(p.relative_to(PKG))
            if package in p.parents or _allowed(rel, spec.name):
                continue
            strict = not rel.startswith("methods/") or rel.startswith("methods/kit/")
            for node in _naming(ast.parse(p.read_text()), spec.name, classes, strict):
                text = node.name if isinstance(node, ast.alias) else ast.unparse(node)
                found.append(f"{rel}:{getattr(node, 'lineno', '?')} names {spec.name}: {text}")
    assert not found, "\n".join(found)
