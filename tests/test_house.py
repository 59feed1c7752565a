"""The house rules a reader relies on: imports run one way without circles, routes stay thin, functions short."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "knn_router", "decoding")  # each may import only the ones after it
MAX_FUNCTION_LINES, MAX_ROUTE_LINES = 80, 15


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere (function-local imports too), resolved to module names."""
    package = name if name in PACKAGES or name + ".__init__" in known else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_imports_run_one_way_without_circles() -> None:
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    for name, targets in graph.items():
        rank = PACKAGES.index(name.split(".")[0])
        upward = [t for t in targets if PACKAGES.index(t.split(".")[0]) < rank]
        assert not upward, f"{name} imports {upward}: imports run server -> knn_router -> decoding"
    # a module's package __init__ re-exporting it is not a circle of the code's own
    edges = {n: {t for t in ts if not (t in PACKAGES and n.startswith(t + "."))} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_80_lines() -> None:
    long = [f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines" for name, tree in _modules().items()
            for fn in _functions(tree) if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_routes_are_thin() -> None:
    tree = ast.parse((ROOT / "server" / "app.py").read_text())
    routes = [fn for fn in _functions(tree) if any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                                                   and isinstance(d.func.value, ast.Name) and d.func.value.id == "app"
                                                   for d in fn.decorator_list)]
    assert len(routes) >= 12
    fat = [f"{fn.name}: {fn.end_lineno - fn.body[0].lineno + 1} lines" for fn in routes
           if fn.end_lineno - fn.body[0].lineno + 1 > MAX_ROUTE_LINES]
    assert not fat, fat


def test_the_single_process_server_never_imports_ray() -> None:
    """Ray is an optional extra: the default install lacks it, and serving one process must not need it."""
    import subprocess
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("ray") for dep in project["dependencies"])
    assert any(dep.startswith("ray[serve]") for dep in project["optional-dependencies"]["ray"])
    code = ("import sys, server.cli, server.app, server.state; server.cli.build_parser(); "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
