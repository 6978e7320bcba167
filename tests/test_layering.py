"""Layering rules, checked by parsing the sources (``ast``), never by importing them.

- ``shared`` is the core: it runs in Azure ML jobs and on laptops, where the Functions host is not
  installed, so nothing in it imports ``azure.functions`` (or the Durable extension) or the
  ``function_app`` package. The entry scripts (``shared/entry``) in particular never do.
- The Azure backends (``shared/azureml/``: the Blob lake, Azure ML) are optional: outside the
  package, no module imports them at module level, and only the backend factory
  ``shared/runs/backends.py`` imports them at all (inside functions). The modules of the package import
  each other without cycles.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"
MODULES = sorted(p for p in SHARED.rglob("*.py") if "__pycache__" not in p.parts)

HOST_ONLY = ("azure.functions", "azure.durable_functions", "function_app")
AZUREML = "shared.azureml"

# Modules outside shared/azureml/ that import shared.azureml, lazily (inside a function): the backend
# factory alone.
AZUREML_IMPORTERS = {
    "shared/runs/backends.py",
}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    module_level: bool  # executed when the module is imported (not inside a def, not TYPE_CHECKING)
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never executed


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def package_of(path: Path, root: Path) -> list[str]:
    """The dotted package a module belongs to, as parts (what relative imports start from)."""
    return list(path.relative_to(root).parent.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import in a module: statements (relative ones resolved) and importlib calls with a literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = package_of(path, root)
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_only: bool = False) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False, True)
            for child in node.orelse:
                visit(child, module_level, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, module_level, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(Import(target, node.lineno, module_level, type_only))
            # "from shared import azureml" imports the submodule
            found.extend(Import(f"{target}.{alias.name}", node.lineno, module_level, type_only)
                         for alias in node.names)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, node.lineno, module_level, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, module_level, type_only)

    visit(tree, True)
    return found


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_sources_found() -> None:
    assert len(MODULES) > 20
    assert SHARED / "entry" / "train.py" in MODULES and SHARED / "azureml" / "client.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_shared_never_imports_the_functions_host(path: Path) -> None:
    bad = [f"line {i.line}: {i.module}" for i in imports_of(path) if any(is_under(i.module, h) for h in HOST_ONLY)]
    assert not bad, f"{rel(path)} imports host-only code ({', '.join(HOST_ONLY)}): {bad}"


def test_entry_scripts_never_import_function_app() -> None:
    entry = [p for p in MODULES if p.parent == SHARED / "entry"]
    assert {p.name for p in entry} >= {"train.py", "score.py"}
    for path in entry:
        bad = [i for i in imports_of(path) if is_under(i.module, "function_app")
               or is_under(i.module, "azure.functions")]
        assert not bad, f"{rel(path)} imports {bad}"


OUTSIDE_AZUREML = [p for p in MODULES if not p.is_relative_to(SHARED / "azureml")]


@pytest.mark.parametrize("path", OUTSIDE_AZUREML, ids=rel)
def test_azureml_backend_is_never_imported_at_module_level(path: Path) -> None:
    bad = [i for i in imports_of(path) if is_under(i.module, AZUREML) and i.module_level]
    assert not bad, (f"{rel(path)} imports {AZUREML} at module level (line {bad[0].line}): the Azure ML "
                     f"backend is optional; import it inside the function that needs it")


def test_only_the_allow_list_imports_the_azureml_backend() -> None:
    importers = {rel(p) for p in OUTSIDE_AZUREML if any(is_under(i.module, AZUREML) for i in imports_of(p))}
    assert importers <= AZUREML_IMPORTERS, (
        f"new importers of {AZUREML}: {sorted(importers - AZUREML_IMPORTERS)}; go through the allow-listed "
        f"modules instead: backends are opened by one factory, shared/runs/backends.py")
    stale = AZUREML_IMPORTERS - importers
    assert not stale, f"{sorted(stale)} no longer import {AZUREML}: shrink AZUREML_IMPORTERS"


def test_the_checker_sees_relative_lazy_and_dynamic_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "shared"
    pkg.mkdir()
    source = pkg / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .azureml import client\n"
        "if TYPE_CHECKING:\n"
        "    import function_app\n"
        "def f():\n"
        "    import azure.functions as func\n"
        "    importlib.import_module('shared.azureml.jobs')\n",
        encoding="utf-8")
    found = {(i.module, i.module_level) for i in imports_of(source, root=tmp_path)}
    assert ("shared.azureml", True) in found and ("shared.azureml.client", True) in found
    assert ("function_app", False) in found
    assert ("azure.functions", False) in found
    assert ("shared.azureml.jobs", False) in found


def _graph(paths: list[Path], lazy: bool, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of ``paths`` it imports: at import time, or (``lazy``) whenever it runs,
    function-level imports included; never the ones under ``TYPE_CHECKING`` (annotations only)."""
    names = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        graph[name] = {i.module for i in imports_of(path, root) if i.module in names and i.module != name
                       and not i.type_only and (lazy or i.module_level)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_azure_backends_import_each_other_without_cycles() -> None:
    """Lazy imports included: registry.py once imported promotion.py inside a function that
    promotion.py's own import of registry.py depended on."""
    package = [p for p in MODULES if p.is_relative_to(SHARED / "azureml") and p.name != "__init__.py"]
    cycles = _cycles(_graph(package, lazy=True))
    assert not cycles, f"import cycles in shared/azureml: {[' -> '.join(c) for c in cycles]}"


def test_the_core_has_no_import_cycles_at_run_time() -> None:
    """Function-level imports included: a lazy import that closes a circle only moves the circle to
    run time (the stages once imported the backends, which imported the stages to run a group)."""
    cycles = _cycles(_graph(MODULES, lazy=True))
    assert not cycles, f"import cycles in shared: {[' -> '.join(c) for c in cycles]}"


def test_a_function_level_import_that_closes_a_circle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "shared"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "stages.py").write_text("from shared import backends\n", encoding="utf-8")
    (pkg / "backends.py").write_text("def run():\n    from shared.stages import go\n", encoding="utf-8")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from shared.stages import go\n", encoding="utf-8")
    (pkg / "helper.py").write_text("from shared import typed\n", encoding="utf-8")
    paths = sorted(pkg.glob("*.py"))
    graph = _graph(paths, lazy=True, root=tmp_path)
    assert _cycles(graph) == [["shared.backends", "shared.stages", "shared.backends"]]
    assert _cycles(_graph(paths, lazy=False, root=tmp_path)) == []  # what the old test checked


def test_the_cycle_checker_finds_a_lazy_cycle(tmp_path: Path) -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- the lake layout is built in one module ----------------------------------------------------------
LAYOUT = SHARED / "layout.py"
LAKE_PATH = re.compile(
    r"^(raw|prepared|runs|scoring|predictions|registry)/"  # a container (or the registry folder) and more
    r"|(^|/)(LATEST|run\.json|dataset\.json|manifest\.parquet|index\.sqlite|global\.pkl)$"
    r"|(^|/)(batches|models|results|jobs|inputs|global)/")
# Modules that still build lake paths by hand: none (every path comes from shared/layout.py).
LAKE_PATH_BUILDERS: set[str] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            found.add(id(body[0].value))
    return found


def lake_path_literals(path: Path) -> list[str]:
    """String literals (not docstrings, not messages with spaces, not URIs) that spell a lake path;
    an f-string is read whole, its placeholders as ``{}``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        else:
            continue
        if " " not in text and "://" not in text and LAKE_PATH.search(text):
            found.append(f"line {node.lineno}: {text!r}")
    return found


HOST_AND_CORE = [*MODULES, *sorted((ROOT / "function_app").glob("*.py"))]


@pytest.mark.parametrize("path", [p for p in HOST_AND_CORE if p != LAYOUT], ids=rel)
def test_lake_paths_are_built_by_shared_layout_only(path: Path) -> None:
    found = lake_path_literals(path)
    if rel(path) in LAKE_PATH_BUILDERS:
        assert found, f"{rel(path)} no longer builds lake paths: drop it from LAKE_PATH_BUILDERS"
        return
    assert not found, f"{rel(path)} builds lake paths by hand ({found}); use shared.layout"


def test_the_lake_path_checker_sees_f_strings_and_constants(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text('"""runs/<run>/run.json in a docstring is fine"""\n'
                      'a = f"runs/{run_id}/run.json"\n'
                      'b = "prepared/LATEST"\n'
                      'c = "no model in runs/ here"\n'
                      'd = "azureml://registries/x/models/"\n', encoding="utf-8")
    assert [f.split(":")[0] for f in lake_path_literals(source)] == ["line 2", "line 3"]


# -- a core grouped by what it does -----------------------------------------------------------------
SUBPACKAGES = ("data", "models", "registries", "forecasts", "results", "runs", "serving", "azureml", "entry")
FOUNDATIONS = ("__init__", "bounds", "cli", "cli_commands", "config", "errors", "faults", "keys", "lake", "layout",
               "locking", "settings", "trust")


def _group(module: str) -> str:
    """``shared.runs.pipeline`` -> ``runs``; a module of ``shared`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def test_the_core_is_a_few_foundations_and_subpackages_named_for_what_they_hold() -> None:
    top = sorted(p.stem for p in SHARED.glob("*.py"))
    assert top == sorted(FOUNDATIONS), f"a new top-level module of shared/: put it in a subpackage ({top})"
    packages = sorted(p.name for p in SHARED.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(SUBPACKAGES)
    for name in packages:  # each says what it holds
        assert (SHARED / name / "__init__.py").read_text(encoding="utf-8").startswith('"""'), name


def test_no_private_name_is_imported_across_subpackages() -> None:
    crossing = []
    for path in MODULES:
        me = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and is_under(node.module, "shared"):
                crossing += [f"{rel(path)}: {a.name} from {node.module}" for a in node.names
                             if a.name.startswith("_") and _group(me) != _group(node.module)]
    assert not crossing, f"private names used across subpackages (make them public where they live): {crossing}"
