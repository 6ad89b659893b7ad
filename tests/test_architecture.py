"""The package's shape, checked: no import cycle anywhere, and every import goes down the layers.

Every ``import`` in every module counts, including those inside functions (a lazy import is still a dependency);
only ``if TYPE_CHECKING:`` blocks are left out of the layering (cycles are checked with and without them). The
layers are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tailq"

# lower layers first; a module may import its own layer or any lower one
LAYERS = [
    ("tailq.options", "tailq.errors"),
    ("tailq.theory",),
    ("tailq.kernels",),
    ("tailq.codec",),
    ("tailq.comm",),
    ("tailq.hooks",),
    ("tailq.integrations",),
    ("tailq",),  # the package facade (tailq.compressor, tailq.ddp_hook)
    ("tailq.harness", "tailq.tools"),
    ("tailq.cli",),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, modules: set[str], type_checking: bool = False) -> set[str]:
    """The tailq modules ``name`` (at ``path``) imports (``type_checking``: those under ``if TYPE_CHECKING:`` too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` depends on the submodule itself
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def _graph(type_checking: bool = False) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules, type_checking) for name, path in paths.items()}


def _layer(module: str) -> int:
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return best


def test_the_import_graph_is_read_from_the_sources() -> None:
    graph = _graph()
    assert len(graph) > 40
    assert "tailq.codec.base" in graph["tailq.codec.tq"]  # relative imports resolve
    assert "tailq.comm.wire" in graph["tailq.comm.routes.allreduce"]  # `from ..wire import`
    assert "tailq.hooks" in graph["tailq.harness.config"]  # imports inside functions count


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_no_import_cycles(type_checking: bool) -> None:
    """No cycle at run time, nor through ``if TYPE_CHECKING:`` imports (a cycle there still ties two modules:
    neither can be understood, typed or moved without the other; comm/families <-> comm/routes was one)."""
    graph = _graph(type_checking)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_import_goes_down_the_layers() -> None:
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["tailq.comm.families", "tailq.comm.routes", "tailq.comm.agree",
                                    "tailq.hooks.tailq_hook"])
def test_comm_and_hooks_never_switch_on_compressor_names(module: str) -> None:
    """Families and routes are chosen from class attributes: no built-in compressor name appears in the code."""
    path = PKG / (module.replace("tailq.", "").replace(".", "/"))
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    names = ("tuq", "tnq", "tbq", "qsgd", "nuqsgd", "terngrad", "efsign", "topk", "single-scale", "multi-scale")
    for f in files:
        tree = ast.parse(f.read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        docstrings = {ast.get_docstring(n) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)}
        assert not {s for s in strings - docstrings if s in names}, f
