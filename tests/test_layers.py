"""Import structure of fltorrent_hpc: no import cycles, and imports only from lower layers (issue 15).

The module graph is read from the source with `ast` (nothing is imported): every `import` and
`from ... import` statement counts, including those inside functions, with relative imports resolved.
`from pkg import name` where `pkg.name` is a module counts as an import of that module (not of `pkg`).
The layer table below is the one in DESIGN.md; a new top-level module or package must be placed in it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "fltorrent_hpc"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# bottom to top; a module may import only from strictly lower layers or from its own unit
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("config", "launch", "trace"),
    ("chunks", "transport", "swarm"),
    ("runtime",),
    ("api", "privacy"),
    ("studies",),
    ("cli", "__init__"),
)
LAYER_OF: dict[str, int] = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py below `root` (a package's own name for __init__.py)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _deepest_known(name: str, known: Iterable[str]) -> str | None:
    """The longest prefix of dotted `name` that is a known module (`import a.b.c` runs a.b.c)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
            return cand
    return None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `module` (source at `path`) imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                hit = _deepest_known(alias.name, known)
                if hit:
                    found.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                hit = sub if sub in known else _deepest_known(base, known)
                if hit:
                    found.add(hit)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    files = module_files(root, package)
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (sorted): each is one or more cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (first module repeated at the end) per tangle."""
    return [_cycle_in(graph, comp) for comp in tangles(graph)]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in component {comp}")


def unit_of(module: str, package: str = PACKAGE) -> str:
    """The layer-table entry of a module: its top-level subpackage or module (`__init__` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(graph: dict[str, set[str]], layer_of: dict[str, int] = LAYER_OF) -> list[str]:
    """Imports that reach a unit of the same or a higher layer (other than the importer's own unit)."""
    out = []
    for m in sorted(graph):
        a = unit_of(m)
        for dep in sorted(graph[m]):
            b = unit_of(dep)
            if a == b:
                continue
            if a not in layer_of or b not in layer_of:
                out.append(f"{m} -> {dep}: {a if a not in layer_of else b!r} is not in the layer table")
            elif layer_of[b] >= layer_of[a]:
                how = "a higher layer" if layer_of[b] > layer_of[a] else "another package of the same layer"
                out.append(f"{m} (L{layer_of[a]}) -> {dep} (L{layer_of[b]}): import from {how}")
    return out


# ---------------------------------------------------------------------------------------------- the checks


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [
        f"  {' -> '.join(cycle)}  (modules in this tangle: {', '.join(comp)})"
        for comp, cycle in zip(tangles(graph), cycles(graph))
    ]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_only_downward() -> None:
    found = violations(import_graph())
    assert not found, "layer violations:\n" + "\n".join("  " + v for v in found)


def test_every_unit_is_in_the_layer_table() -> None:
    units = {unit_of(m) for m in module_files(ROOT, PACKAGE)}
    assert units <= set(LAYER_OF), f"place these in LAYERS: {sorted(units - set(LAYER_OF))}"
    assert units, f"no modules found under {ROOT}"


# ------------------------------------------------------------------------- the checker on known inputs


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, src in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src, encoding="utf-8")
    return pkg


def test_graph_resolves_relative_function_level_and_submodule_imports(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "__init__.py": "from .swarm import round\n",
            "errors.py": "",
            "config.py": "import pkg.errors\n",
            "swarm/__init__.py": "from .round import X\n",
            "swarm/round.py": "from . import rng\nfrom ..config import C\nX = 1\n",
            "swarm/rng.py": "def f():\n    from .. import errors\n    import os\n",
        },
    )
    g = import_graph(pkg, "pkg")
    assert g["pkg"] == {"pkg.swarm.round"}
    assert g["pkg.config"] == {"pkg.errors"}
    assert g["pkg.swarm"] == {"pkg.swarm.round"}
    assert g["pkg.swarm.round"] == {"pkg.swarm.rng", "pkg.config"}  # `from . import rng` is not `pkg.swarm`
    assert g["pkg.swarm.rng"] == {"pkg.errors"}  # found inside a function body


def test_cycle_and_upward_import_are_reported(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "swarm/__init__.py": "",
            "swarm/a.py": "from .b import x\n",
            "swarm/b.py": "def f():\n    from . import c\n",
            "swarm/c.py": "from .a import y\n",
            "chunks/__init__.py": "",
            "chunks/k.py": "from ..swarm import a\n",  # same layer, other package
            "config.py": "from .runtime import e\n",  # upward
            "runtime/__init__.py": "",
            "runtime/e.py": "from ..errors import E\n",  # downward: fine
        },
    )
    g = import_graph(pkg, "pkg")
    assert cycles(g) == [["pkg.swarm.a", "pkg.swarm.b", "pkg.swarm.c", "pkg.swarm.a"]]
    bad = violations(g)
    assert len(bad) == 2, bad
    assert "pkg.chunks.k (L2) -> pkg.swarm.a (L2): import from another package of the same layer" in bad
    assert "pkg.config (L1) -> pkg.runtime.e (L3): import from a higher layer" in bad


def test_layer_table_names_each_unit_once() -> None:
    names = [unit for units in LAYERS for unit in units]
    assert len(names) == len(set(names)), names
