"""The package's import graph: no circle anywhere in prope_kernels/, and the backend registry
imports no backend when it is imported.

The graph is read statically (every import statement, function-level ones included, relative
imports resolved): an edge a -> b means module a imports module b somewhere. A circle is a
strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "prope_kernels"
EXTENSION = "prope_kernels._C"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PKG) -> dict:
    """{module: set of package modules it imports} over every .py file under ``root``."""
    files = {module_name(p): p for p in root.rglob("*.py")}
    # the compiled extension (csrc/, built or not): a module with no imports of the package
    mods = set(files) | {EXTENSION}
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        edges = set()

        def add(target: str) -> None:
            # the deepest package module that ``target`` names (a.b.c -> a.b when c is a name)
            parts = target.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = base[: len(base) - (node.level - 1)]
                    src = ".".join(up + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:   # "from pkg import mod" imports the submodule pkg.mod
                    full = f"{src}.{a.name}"
                    add(full if full in mods else src)
        graph[name] = edges
    return graph


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_graph_sees_relative_and_function_level_imports():
    g = import_graph()
    # a top-level relative import and a package-relative "from . import mod"
    assert "prope_kernels.interface" in g["prope_kernels"]
    assert "prope_kernels.rotary" in g["prope_kernels.reference"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    found = circles(import_graph())
    assert found == [], "import circles in prope_kernels/: " + "; ".join(
        " <-> ".join(c) for c in found)


BACKEND_MODULES = ("prope_kernels.backends.reference", "prope_kernels.backends.cuda",
                   "prope_kernels.backends.sdpa", "prope_kernels.backends.triton")


def test_backends_are_leaves():
    # a backend imports nothing above it: not the registry, the dispatch or the public API
    g = import_graph()
    above = {"prope_kernels", "prope_kernels.backends", "prope_kernels.backends.registry",
             "prope_kernels.dispatch", "prope_kernels.interface", "prope_kernels.validation"}
    for name, edges in g.items():
        if name.startswith(BACKEND_MODULES):
            assert not edges & above, f"{name} imports {sorted(edges & above)}"


def test_registry_imports_no_backend():
    # importing the registry (and the public API) loads no backend module: each is imported on
    # its first use, by its module path
    code = ("import sys, prope_kernels.backends.registry, prope_kernels\n"
            f"mods = {BACKEND_MODULES!r}\n"
            "print(sorted(m for m in sys.modules if m.startswith(mods)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True).stdout
    assert out.strip() == "[]", out


if __name__ == "__main__":   # print the graph's circles (and, with -v, its edges)
    g = import_graph()
    if "-v" in sys.argv:
        for m in sorted(g):
            print(m, "->", ", ".join(sorted(g[m])))
    print("circles:", circles(g) or "none")
