"""Package structure: moejax modules import each other only at module level, without cycles.

A static walk (ast) of every module under moejax/: no function or class body may import a
moejax module (an import inside a function hides a dependency, usually a cycle), and the
graph of module-level imports between moejax modules has no cycle. `import a.b.c` and
`from a.b import c` depend on module a.b.c, `from a.b import name` on a.b; each also
depends on the packages above it (a, a.b: their __init__ runs first) unless the importer
is inside that package (then it is already being imported).
"""
from __future__ import annotations

import ast
import pathlib

from conftest import ROOT

PACKAGE = ROOT / "moejax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, known: set[str], here: str,
             is_package: bool) -> set[str]:
    """moejax modules an import statement depends on (the most specific known names)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = here.split(".")[:len(here.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return {n for n in names if n in known}


def inner_imports(tree: ast.Module) -> list[ast.AST]:
    """Import statements inside a function or class body."""
    found = []
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found += [n for n in ast.walk(scope) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def module_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> moejax modules its module-level statements import (TYPE_CHECKING blocks too)."""
    known = set(trees)
    graph = {}
    for name, tree in trees.items():
        is_package = (PACKAGE.parent / (name.replace(".", "/") + "/__init__.py")).exists()
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dep in imported(node, known, name, is_package):
                    deps |= {p for p in _with_packages(dep) if p in known
                             and not name.startswith(p + ".")}
        graph[name] = deps - {name}
    return graph


def _with_packages(module: str) -> list[str]:
    """a.b.c -> [a, a.b, a.b.c]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_moejax_module_is_imported_inside_a_function_or_class():
    trees = modules()
    known = set(trees)
    bad = sorted({f"{name}:{node.lineno}" for name, tree in trees.items()
                  for node in inner_imports(tree)
                  if imported(node, known, name, False) or
                  (isinstance(node, ast.ImportFrom) and node.level)})
    assert not bad, f"moejax imports inside functions (move them to the top): {bad}"


def test_module_level_imports_between_moejax_modules_have_no_cycle():
    cycle = find_cycle(module_graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
