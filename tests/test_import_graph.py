"""The package's import graph has no cycle: each module of adazeta/ can be read knowing only the
modules it imports. Imports inside functions count too (a deferred import hides a cycle from
Python's loader, not from a reader). Run as a script, it prints the graph and any cycle:

    python tests/test_import_graph.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adazeta"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, modules: set[str], is_package: bool) -> set[str]:
    """The package's modules that `tree` (the module `name`) imports, anywhere in its body."""
    found = set()
    here = name if is_package else name.rpartition(".")[0]  # what a relative import is relative to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            # `from adazeta.engine import loop` imports the module adazeta.engine.loop; `from adazeta import X`
            # of a name defined in adazeta/__init__.py imports the package itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            # `import adazeta.a.b` also imports adazeta.a: the longest known module prefix.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, read with ast from the source files."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "conf" not in p.relative_to(PACKAGE).parts}
    modules = set(files)
    return {name: imported(ast.parse(path.read_text(), str(path)), name, modules, path.name == "__init__.py")
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each a cycle
    or a knot of cycles, with a module that imports itself counted as well."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_deferred_and_from_imports(tmp_path):
    tree = ast.parse("import adazeta.zo.spsa\nfrom adazeta.engine import loop\ndef f():\n    from adazeta.cli.train import CONF_DIR\n")
    modules = {"adazeta", "adazeta.zo", "adazeta.zo.spsa", "adazeta.engine", "adazeta.engine.loop", "adazeta.cli",
               "adazeta.cli.train", "adazeta.cli.replay"}
    assert imported(tree, "adazeta.cli.replay", modules, False) == {"adazeta.zo.spsa", "adazeta.engine.loop",
                                                                    "adazeta.cli.train"}
    tree = ast.parse("from adazeta import __version__\nfrom . import checkpoint\nfrom ..tasks import base\n")
    modules |= {"adazeta.engine.checkpoint", "adazeta.tasks", "adazeta.tasks.base"}
    assert imported(tree, "adazeta.engine.loop", modules, False) == {"adazeta", "adazeta.engine.checkpoint",
                                                                     "adazeta.tasks.base"}
    # In a package's __init__.py, `from . import x` is relative to the package itself.
    tree = ast.parse("from . import spsa\n")
    assert imported(tree, "adazeta.zo", modules, True) == {"adazeta.zo.spsa"}


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"adazeta.engine.loop", "adazeta.cli.replay", "adazeta.cli.train"} <= graph.keys()  # the graph holds the modules
    assert "adazeta.engine.build" in graph["adazeta.engine.loop"]  # and their imports
    found = cycles(graph)
    assert found == [], f"import cycles in adazeta/: {found}"


if __name__ == "__main__":
    graph = import_graph()
    for name, deps in sorted(graph.items()):
        print(f"{name} -> {', '.join(sorted(d.removeprefix('adazeta.') for d in deps)) or '-'}")
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, cycles: {found or 'none'}")
    sys.exit(1 if found else 0)
