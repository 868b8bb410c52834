"""The repository's own modules import each other without circles, and bench/ imports them at the top of its
modules only: a deferred import inside a function is how an import circle gets patched over instead of removed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "flexlora", "recipes", "eval")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement asks for: ``from a import b`` names ``a.b`` (a module, or a name in
    module ``a``: ``owning_module`` tells); relative imports are resolved against ``module``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def owning_module(name: str, modules: set[str]) -> str | None:
    """The longest repo-internal module that ``name`` is or lies in (``flexlora.config.FlexLoRAConfig`` ->
    ``flexlora.config``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def inside_function(tree: ast.Module) -> set[int]:
    """ids of the import statements in a function body (at any depth)."""
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(inner) for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))}
    return nested


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the repo-internal modules it imports, anywhere in it; every import of a repo-internal module
    inside a function as (module, line, imported module)). Importing ``a.b.c`` also runs ``a`` and ``a.b``."""
    files = {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    deferred = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nested = inside_function(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(node, module, path.name == "__init__.py"):
                target = owning_module(name, modules)
                if target is None:
                    continue
                parts = target.split(".")
                graph[module] |= {".".join(parts[:end]) for end in range(1, len(parts) + 1)} - {module}
                if id(node) in nested:
                    deferred.append((module, node.lineno, target))
    # a package's own __init__ runs before its submodules: a submodule "importing" its parent is no edge back
    for module in graph:
        graph[module] = {target for target in graph[module] if not module.startswith(target + ".")}
    return graph, sorted(set(deferred))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it was followed
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_repository_modules_import_without_circles():
    graph, _ = import_graph(ROOT)
    assert {"bench.quality", "bench.quality_plan", "flexlora.allocator", "recipes.deberta_glue"} <= set(graph)
    assert {"bench.quality_plan", "bench.quality_runner", "bench.quality_report"} <= graph["bench.quality"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_bench_imports_repository_modules_at_module_level_only():
    _, deferred = import_graph(ROOT)
    in_bench = [f"{module} line {line}: {target}" for module, line, target in deferred if module.startswith("bench.")]
    assert not in_bench, "deferred imports in bench/:\n" + "\n".join(in_bench)


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_circle_through_a_function_level_import_is_found_and_named(tmp_path):
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/cli.py": "from pkg.plan import ROWS\n\n\ndef main():\n    from pkg import report\n",
            "pkg/plan.py": "ROWS = 1\n",
            "pkg/report.py": "from .cli import main\n",
        },
    )
    graph, deferred = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.cli"] == {"pkg.plan", "pkg.report"} and graph["pkg.report"] == {"pkg.cli"}
    assert deferred == [("pkg.cli", 5, "pkg.report")]
    assert find_cycle(graph) == ["pkg.cli", "pkg.report", "pkg.cli"]
    (tmp_path / "pkg" / "report.py").write_text("from pkg.plan import ROWS\n")
    graph, _ = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) is None


def test_importing_a_submodule_counts_its_parent_package(tmp_path):
    """``import a.b`` runs ``a/__init__.py`` first: a circle through a package's __init__ is a circle too."""
    write_package(
        tmp_path,
        {
            "a/__init__.py": "from a.b import VALUE\n",
            "a/b.py": "VALUE = 1\n",
            "c/__init__.py": "",
            "c/d.py": "import a.b\n",
            "a/e.py": "from c.d import *\n",
        },
    )
    graph, _ = import_graph(tmp_path, ("a", "c"))
    assert graph["c.d"] == {"a", "a.b"} and graph["a"] == {"a.b"}
    assert find_cycle(graph) is None  # a.e -> c.d -> a is a submodule's parent, which __init__ already ran
    (tmp_path / "a" / "__init__.py").write_text("from a.e import *\n")
    graph, _ = import_graph(tmp_path, ("a", "c"))
    assert find_cycle(graph) == ["a", "a.e", "c.d", "a"]
