"""Check two rules of compress's layout, so they stay true: no import cycles between the library's modules
(counting imports inside functions, not those under ``if TYPE_CHECKING:``), and no module importing another
module's private (``_underscore``) names. Also reports function lengths: none over 150 lines, at most six over 100.

Run: ``python tools/check_architecture.py`` (exit status 1 and a list of what breaks a rule). ``.ci/run`` runs it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compress"
MAX_LINES = 150
LONG_LINES = 100
MAX_LONG = 6


def modules(folder: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package in ``folder`` (named after the folder): dotted name -> file."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([folder.name, *parts])] = path
    return found


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it (shorter messages), else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import statements anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _add(targets: set[str], importer: str, module: str) -> None:
    """An edge from ``importer`` to ``module``, and to every package above ``module`` that is not also above
    ``importer``: importing ``a.b.c`` runs ``a/b/__init__.py`` first, so a cycle through another subpackage's
    ``__init__`` is a real one. (A package the importer lives in is already running when the importer runs.)"""
    targets.add(module)
    parts = module.split(".")
    for n in range(1, len(parts)):
        package = ".".join(parts[:n])
        if importer != package and not importer.startswith(package + "."):
            targets.add(package)


def edges(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> modules it imports (within the package), and every private name imported across modules."""
    graph: dict[str, set[str]] = {name: set() for name in mods}
    private: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        _add(graph[name], name, alias.name)
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in mods:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in mods:  # `from . import module`: an edge to that module
                    _add(graph[name], name, sub)
                    continue
                _add(graph[name], name, source)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{_shown(path)}:{node.lineno}: imports {alias.name} from {source}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(mods: dict[str, Path]) -> list[tuple[int, str]]:
    """(lines, where) for every function over LONG_LINES lines, longest first."""
    out = []
    for path in mods.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > LONG_LINES:
                    out.append((lines, f"{_shown(path)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def problems(folder: Path = PACKAGE) -> tuple[list[str], int]:
    """What breaks a rule in the package in ``folder``, and how many functions are over LONG_LINES lines."""
    mods = modules(folder)
    graph, private = edges(mods)
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    found += [f"private name: {p}" for p in private]
    long = long_functions(mods)
    found += [f"function over {MAX_LINES} lines: {w} ({n})" for n, w in long if n > MAX_LINES]
    if len(long) > MAX_LONG:
        found.append(
            f"{len(long)} functions over {LONG_LINES} lines (at most {MAX_LONG}): "
            + ", ".join(f"{w} ({n})" for n, w in long)
        )
    return found, len(long)


def main() -> int:
    found, long = problems()
    for p in found:
        print(p)
    if not found:
        print(f"architecture ok: no import cycles, no private imports, {long} functions over {LONG_LINES} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
