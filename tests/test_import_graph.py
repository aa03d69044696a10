"""The package's import graph has no cycle, and its imports point down the layers of LAYERS: each
module of adazeta/ can be read knowing only the modules it imports, and those sit at its own level
or below it. Imports inside functions count too (a deferred import hides a cycle from Python's
loader, not from a reader). Run as a script, it prints the graph, any cycle and any import against
the layers:

    python tests/test_import_graph.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adazeta"

# The layers of adazeta/, top to bottom. A module may import the modules of its own side of its
# layer and of every layer below it; the sides of one layer (the commands and the library API;
# zo and trainable) never import each other. A name places that module and, for a subpackage,
# every module in it; the package itself ("adazeta", no dot) places only its __init__.py.
Layers = tuple[dict[str, tuple[str, ...]], ...]
LAYERS: Layers = (
    {"commands": ("adazeta.cli",), "library API": ("adazeta", "adazeta.api", "adazeta.hf_trainer")},
    {"engine": ("adazeta.engine",)},
    {"methods": ("adazeta.methods", "adazeta.first_order", "adazeta.objectives")},
    {"zo": ("adazeta.zo",), "trainable": ("adazeta.trainable",)},
    {"models and tasks": ("adazeta.models", "adazeta.tasks")},
    # step.py is the contract (and the registry) of the steps of zo/ (MeZO's, FZOO, LOZO, HiZOO) and
    # first_order.py: it sits below both, beside the types and the config it is written in.
    {"base": ("adazeta.config", "adazeta.errors", "adazeta.legacy_keys", "adazeta.validate", "adazeta.params",
              "adazeta.step")},
)


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


def place(module: str, layers: Layers) -> tuple[int, str] | None:
    """(layer index from the top, side) of `module`, by the longest name in `layers` that places
    it; None when none does."""
    best = None
    for rank, sides in enumerate(layers):
        for side, names in sides.items():
            for name in names:
                covers = module == name or ("." in name and module.startswith(name + "."))
                if covers and (best is None or len(name) > best[0]):
                    best = (len(name), rank, side)
    return None if best is None else best[1:]


def against_layers(graph: dict[str, set[str]], layers: Layers) -> list[str]:
    """Each import of `graph` that the layering forbids, as "a -> b (why)": into a layer above
    (up), into another side of the same layer (across), or of or into a module no layer places."""
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            pa, pb = place(a, layers), place(b, layers)
            if pa is None or pb is None:
                found.append(f"{a} -> {b} ({a if pa is None else b} is in no layer)")
            elif pb[0] < pa[0]:
                found.append(f"{a} -> {b} (up: {pa[1]} imports {pb[1]})")
            elif pb[0] == pa[0] and pb[1] != pa[1]:
                found.append(f"{a} -> {b} (across: {pa[1]} imports {pb[1]})")
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layer_check_catches_an_upward_edge_and_accepts_downward_ones():
    layers = ({"top": ("p.top",)}, {"left": ("p.left",), "right": ("p.right",)}, {"base": ("p", "p.base")})
    downward = {"p.top": {"p.left.a", "p.right", "p.base"}, "p.left.a": {"p.left.b", "p.base"}, "p.left.b": set(),
                "p.right": {"p"}, "p.base": {"p"}, "p": set()}
    assert against_layers(downward, layers) == []
    upward = {"p.base": {"p.top", "p"}, "p.top": set()}
    assert against_layers(upward, layers) == ["p.base -> p.top (up: base imports top)"]
    across = {"p.left.a": {"p.right"}}
    assert against_layers(across, layers) == ["p.left.a -> p.right (across: left imports right)"]
    assert against_layers({"p.other": {"p.base"}}, layers) == ["p.other -> p.base (p.other is in no layer)"]
    # A subpackage's name places the modules in it; the package's own name places only itself.
    assert place("p.left.a", layers) == (1, "left") and place("p", layers) == (2, "base")
    assert place("p.x", layers) is None


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


def test_the_package_imports_point_down_the_layers():
    graph = import_graph()
    unplaced = sorted(m for m in graph if place(m, LAYERS) is None)
    assert unplaced == [], f"modules of adazeta/ in no layer of LAYERS: {unplaced}"
    found = against_layers(graph, LAYERS)
    assert found == [], "imports against the layers of LAYERS:\n  " + "\n  ".join(found)


if __name__ == "__main__":
    graph = import_graph()
    for name, deps in sorted(graph.items()):
        print(f"{name} -> {', '.join(sorted(d.removeprefix('adazeta.') for d in deps)) or '-'}")
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, cycles: {found or 'none'}")
    against = against_layers(graph, LAYERS)
    print("imports against the layers:", "".join(f"\n  {edge}" for edge in against) or "none")
    sys.exit(1 if found or against else 0)
