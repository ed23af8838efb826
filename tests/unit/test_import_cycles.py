"""No import cycles between the package's modules (module-level or deferred inside functions).

A deferred `from .x import y` inside a function still ties two modules together: it only
hides the cycle from the interpreter. Imports under `if TYPE_CHECKING:` are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"loraplex.server": "server", "loraplex.client": "client",
            "loraplex.adapters_store": "adapters_store", "loraplex": "loraplex"}


def _modules() -> dict[str, Path]:
    """Importable module name -> source file, for every .py file of the package."""
    modules: dict[str, Path] = {}
    for prefix, directory in PACKAGES.items():
        for path in (ROOT / directory).rglob("*.py"):
            parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_only: bool = False):
    """Every Import/ImportFrom in the tree, skipping `if TYPE_CHECKING:` bodies unless `type_only`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_only and isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """The package modules one import statement loads (the most specific known name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (with `type_only`, also under TYPE_CHECKING)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _import_nodes(tree, type_only):
            edges |= _targets(name, is_package, node, known)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are not cycles of ours.
        graph[name] = {t for t in edges if t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_deferred_and_relative_imports():
    graph = import_graph()
    assert "loraplex.server.engine.engine" in graph["loraplex.server.engine.async_engine"]
    assert "loraplex.server.app" in graph["loraplex.cli"]          # imported inside a function


def test_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles (break them): " + "; ".join(" <-> ".join(c) for c in found)


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between loraplex.server's folders (engine, layers, kernels, ...) and
    top-level modules: an arrow a -> b when any module of a imports any module of b."""
    def folder(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["loraplex", "server"] and len(parts) > 3 else module

    folders: dict[str, set[str]] = {}
    for source, targets in graph.items():
        folders.setdefault(folder(source), set()).update(folder(t) for t in targets if folder(t) != folder(source))
    return folders


def test_no_import_cycles_even_through_type_only_imports():
    """Issue 31: server/config <-> server/config_checks was a loop through TYPE_CHECKING imports
    (config_checks now describes what it reads with Protocols)."""
    found = cycles(import_graph(type_only=True))
    assert found == [], "type-only import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_folder_level_cycles_and_kernels_are_the_ground_floor():
    """Issue 31: kernels/native.py and kernels/linear_choice.py imported layers/ and model/, which
    import kernels/. The kernels import none of layers, model, lora, engine (the linear-kernel
    choice moved to layers/linear_choice.py; cache_root to server/cache_dirs.py)."""
    folders = folder_graph(import_graph(type_only=True))
    found = cycles(folders)
    assert found == [], "folder-level import cycles: " + "; ".join(" <-> ".join(c) for c in found)
    upward = {t for t in folders["loraplex.server.kernels"]
              if t.split(".")[-1] in ("layers", "model", "lora", "engine", "service", "http", "frontdoor")}
    assert upward == set(), f"server/kernels imports {sorted(upward)}"
    assert "loraplex.server.service" not in folders["loraplex.server.frontdoor"]      # below the transports
    assert "loraplex.server.http" not in folders["loraplex.server.frontdoor"]


def test_folder_graph_sees_a_folder_cycle():
    graph = {"loraplex.server.a.x": {"loraplex.server.b.y"}, "loraplex.server.b.y": {"loraplex.server.a.z"},
             "loraplex.server.a.z": set()}
    assert cycles(folder_graph(graph)) == [["loraplex.server.a", "loraplex.server.b"]]
