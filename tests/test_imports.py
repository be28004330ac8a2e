"""The package's import graph, read from the source (ast): no module imports itself back.

Every import counts, at the top of a module or inside a function, and under
``TYPE_CHECKING`` too: a circle there is the same knot in the design.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

import asyncweights
from asyncweights.testing import StoreBuilder

PACKAGE = Path(asyncweights.__file__).parent


def _imports(path: Path) -> set[str]:
    """The asyncweights modules `path` imports (``asyncweights`` itself for the package)."""
    module = "asyncweights" if path.name == "__init__.py" else f"asyncweights.{path.stem}"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = "asyncweights"
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "asyncweights":
                # ``from . import x``: x is a submodule or a name of the package.
                for alias in node.names:
                    sub = f"asyncweights.{alias.name}"
                    found.add(sub if (PACKAGE / f"{alias.name}.py").exists() else target)
            elif target.startswith("asyncweights."):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("asyncweights"))
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        module = "asyncweights" if path.name == "__init__.py" else f"asyncweights.{path.stem}"
        edges[module] = _imports(path)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    # A few edges every reader of the package knows are there: the reader is seen.
    assert "asyncweights._names" in edges["asyncweights._store"]
    assert "asyncweights._plan" in edges["asyncweights._load"]
    assert "asyncweights._read" in edges["asyncweights._load"]
    assert "asyncweights._load" in edges["asyncweights"]


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_readme_layout_lists_modules_bottom_up() -> None:
    # The README's module map promises that each module imports only modules listed above it.
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    start = readme.index("Inside `src/asyncweights/`")
    first = readme.index("```\n", start) + 4
    block = readme[first : readme.index("\n```", first)]
    order: list[str] = []
    for line in block.splitlines():
        names = line.split("   ", 1)[0]
        order += [f"asyncweights.{n.strip()}" for n in names.split(",")]
    listed = set(order)
    modules = {m for m in graph() if m not in ("asyncweights", "asyncweights.__main__")}
    assert modules == listed
    position = {m: i for i, m in enumerate(order)}
    for module, deps in graph().items():
        for dep in deps & listed:
            if module in position:
                assert position[dep] < position[module], f"{module} imports {dep}"


def test_safetensors_loads_never_import_numpy(tmp_path: Path) -> None:
    # numpy is for GGUF models only: importing it is 60-90 ms of CPU (a 2-core VM) that a
    # safetensors load never needs.
    StoreBuilder(tmp_path).add_model("m:1", {"w": mx.arange(6, dtype=mx.float16)})
    script = (
        "import sys, anyio, asyncweights as aw\n"
        f"w = anyio.run(lambda: aw.load_weights('m:1', store={str(tmp_path)!r}))\n"
        "print(w['w'].tolist(), 'numpy' in sys.modules)\n"
    )
    src = str(PACKAGE.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0] False"
