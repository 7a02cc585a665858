"""Imports point down: the import graph of ``mmlm/`` (and that of ``scripts/``) has no cycle, and no file in
``mmlm/`` is over 600 lines (ARCHITECTURE.md, "Dependencies point down").

The graph is read from the source with ``ast``, so an import inside a function (a lazy import) counts as
much as one at the top: a lazy import that climbs back up is still a circle, it only fails later. Edges:

- ``import a.b.c`` -> ``a.b.c``; ``from a.b import c`` -> ``a.b.c`` when that is a module, else ``a.b``;
  relative imports are resolved against the importing module's package;
- importing a submodule implies no edge to its packages' ``__init__`` (Python runs them, but a package's
  ``__init__`` that imports nothing back cannot close a circle, and counting them would make every
  ``mmlm.x.y -> mmlm`` a false one);
- imports under ``if TYPE_CHECKING:`` are left out: they never run;
- only edges between modules of the tree itself (``mmlm.*``; for scripts, one script to another).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first such import}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of ``package`` (a package is named by its ``__init__.py``)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules one import statement of ``module`` names, before filtering to ``known`` ones."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the importing module's package, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]


def import_graph(modules: dict[str, Path]) -> Graph:
    """The import edges between ``modules`` (name -> file)."""
    known = set(modules)
    graph: Graph = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(node, name, path.name == "__init__.py", known):
                if target in known and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Cycles (``[a, b, ..., a]``) that together pass through every module of every knot (strongly connected
    component) of ``graph``: the shortest one through its first module, then through each module not yet
    shown, so that a knot of five modules is not reported as its shortest loop of two."""
    found = []
    for component in _knots(graph):
        shown: set[str] = set()
        for start in component:
            if start not in shown:
                found.append(_shortest_cycle(graph, set(component), start))
                shown.update(found[-1])
    return sorted(found)


def _knots(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative: no
    recursion limit), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
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
                    components.append(sorted(component))
    return components


def _shortest_cycle(graph: Graph, members: set[str], start: str) -> list[str]:
    """The shortest path from ``start`` back to itself inside ``members`` (breadth-first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while start not in parents:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child in members and child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    path, node = [start], parents[start]
    while node != start:
        path.append(node)
        node = parents[node]
    return [start, *reversed(path[1:]), start]


def describe(cycle: list[str], graph: Graph, modules: dict[str, Path], root: Path = ROOT) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: each arrow with the line of the import that makes it."""
    steps = [f"{a} ({modules[a].relative_to(root).as_posix()}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def report(graph: Graph, modules: dict[str, Path], root: Path = ROOT) -> str:
    """Every cycle of ``graph``, one readable chain a line (the assertion message)."""
    found = cycles(graph)
    return f"{len(found)} import cycle(s):\n" + "\n".join(f"  {describe(c, graph, modules, root)}" for c in found)


# ------------------------------------------------------------------------------ the checks


@pytest.fixture(scope="module")
def mmlm_modules() -> dict[str, Path]:
    return module_names(ROOT / "mmlm")


def test_the_mmlm_import_graph_is_acyclic(mmlm_modules):
    graph = import_graph(mmlm_modules)
    # the graph is really read: edges the code is known to have (a lazy one among them)
    assert "mmlm.models" in graph["mmlm.factory"] and "mmlm.data.tokenizers" in graph["mmlm.factory"]
    assert "mmlm.compress.quantize" in graph["mmlm.factory"]  # imported inside load()
    found = cycles(graph)
    assert not found, report(graph, mmlm_modules)


def test_the_scripts_import_graph_is_acyclic():
    modules = {path.stem: path for path in sorted((ROOT / "scripts").glob("*.py"))}
    graph = import_graph(modules)
    assert graph["bench"].keys() >= {"bench_harness", "bench_retrieval"}  # bench_retrieval: inside functions
    found = cycles(graph)
    assert not found, report(graph, modules)


def test_no_module_of_mmlm_is_over_600_lines(mmlm_modules):
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in mmlm_modules.values()}  # fmt: skip
    assert lengths["mmlm/factory.py"] > 100  # the files are really read
    over = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not over, "over 600 lines (split by concern): " + ", ".join(f"{k} ({v})" for k, v in over.items())


# ------------------------------------------------------------------------------ the graph reader itself
# (on a small package in tmp_path, named mmlm so that the dependency check reads its imports as first-party)


def write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return module_names(root / "mmlm")


def test_the_reader_resolves_relative_lazy_and_from_imports(tmp_path):
    modules = write(tmp_path, {
        "mmlm/__init__.py": "from mmlm.low import thing\n",
        "mmlm/low.py": "thing = 1\n",
        "mmlm/sub/__init__.py": "from .. import low\n",  # mmlm.low, a module: the edge goes there
        "mmlm/sub/a.py": "from . import b\nfrom .b import name\n\ndef f():\n    import mmlm.sub.c\n",
        "mmlm/sub/b.py": "from mmlm import thing\nfrom typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from mmlm.sub import a\nelse:\n    import mmlm.low\n",
        "mmlm/sub/c.py": "import os\nimport mmlm.sub.b as alias\n",
    })  # fmt: skip
    assert import_graph(modules) == {
        "mmlm": {"mmlm.low": 1},
        "mmlm.low": {},
        "mmlm.sub": {"mmlm.low": 1},
        "mmlm.sub.a": {"mmlm.sub.b": 1, "mmlm.sub.c": 5},  # no edge to mmlm.sub or mmlm for the submodules
        "mmlm.sub.b": {"mmlm": 1, "mmlm.low": 6},  # `thing` is no module: the edge goes to mmlm; TYPE_CHECKING's left out
        "mmlm.sub.c": {"mmlm.sub.b": 2},
    }
    assert cycles(import_graph(modules)) == []


def test_a_cycle_is_reported_as_a_chain_with_its_import_lines(tmp_path):
    modules = write(tmp_path, {
        "mmlm/__init__.py": "",
        "mmlm/a.py": "import mmlm.b\n",
        "mmlm/b.py": "import os\n\n\ndef late():\n    from mmlm import c\n",  # lazy: still a circle
        "mmlm/c.py": "from mmlm.a import x\n",
        "mmlm/d.py": "import mmlm.e\n",
        "mmlm/e.py": "import mmlm.d\n",
        "mmlm/f.py": "import mmlm.a\n",  # reaches the circle, is not in it
    })  # fmt: skip
    graph = import_graph(modules)
    assert cycles(graph) == [["mmlm.a", "mmlm.b", "mmlm.c", "mmlm.a"], ["mmlm.d", "mmlm.e", "mmlm.d"]]
    assert report(graph, modules, tmp_path).splitlines() == [
        "2 import cycle(s):",
        "  mmlm.a (mmlm/a.py:1) -> mmlm.b (mmlm/b.py:5) -> mmlm.c (mmlm/c.py:1) -> mmlm.a",
        "  mmlm.d (mmlm/d.py:1) -> mmlm.e (mmlm/e.py:1) -> mmlm.d",
    ]


@pytest.mark.slow  # a fresh interpreter imports torch: 9 s
def test_the_serving_process_does_not_import_lightning():
    """`mmlm serve` loads its model through mmlm.factory and its indexes through mmlm.retrieval.index: neither
    the training stack (Lightning) nor transformers comes into the serving process."""
    import subprocess
    import sys

    code = ("import sys, mmlm.serve.app, mmlm.serve.served, mmlm.factory, mmlm.retrieval.model\n"
            "print(sorted(m for m in ('lightning', 'transformers') if m in sys.modules))")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
