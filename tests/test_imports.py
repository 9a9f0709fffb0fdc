"""The import graph of `prefix_jax`: no cycles, and no internal import hidden inside a function.

Read from the source with `ast` (nothing is imported), so a cycle is caught even where Python's import order
happens to hide it today.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "prefix_jax"

# Function-level `prefix_jax` imports that stay, each guarding a slow third-party import, not a cycle:
# (file, function) -> why.
ALLOWED_FUNCTION_IMPORTS = {
    ("train.py", "main"): "JAX loads only after the huge-pages restart (host_memory.reexec_with_huge_pages)",
    ("train.py", "help_text"): "run_options imports JAX: --help answers without it, only --helpfull pays",
    ("prefix_jax/models/__init__.py", "quantize_on_load"): "qwix (prefix_jax.quantize) only for quantized loads",
    ("prefix_jax/models/sharded_load.py", "load_sharded"): "qwix (prefix_jax.quantize) only for quantized loads",
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """`prefix_jax.x.y` -> its file (a package's `__init__.py`)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The `prefix_jax` modules an import statement loads (a `from package import name` names a submodule or
    an attribute of the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level or not node.module or node.module.split(".")[0] != PACKAGE:
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]


def _with_parents(target: str, importer: str) -> list[str]:
    """`target` and the packages Python runs first to import it, less those the importer sits in (already
    being imported when it runs)."""
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    inside = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    return [m for m in chain if m not in inside and m != importer]


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at the top level, or in a top-level `if`/`try`."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, (ast.ExceptHandler,)):
            todo.extend(node.body)
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the `prefix_jax` modules importing it loads (module-level imports only)."""
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text())):
            for target in _imported(node, modules):
                edges.update(m for m in _with_parents(target, name) if m in modules)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
    return sorted(found)


def function_level_imports(path: Path) -> list[tuple[str, int, str]]:
    """(function, line, module) of each `prefix_jax` import inside a function body."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found += [(fn.name, node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
                found += [(fn.name, node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return sorted(set(found))


def test_no_import_cycle():
    graph = import_graph(module_files())
    assert "prefix_jax.models.attention" in graph and "prefix_jax.data" in graph  # the graph was read
    assert cycles(graph) == []


def test_a_cycle_is_found(tmp_path):
    """The check itself: two modules importing each other (one through its package) are a cycle."""
    package = tmp_path / PACKAGE
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("from prefix_jax.models import a\n")
    (package / "models" / "a.py").write_text("import numpy\n")
    (package / "b.py").write_text("from prefix_jax.models.a import x\n")
    assert cycles(import_graph(module_files(tmp_path))) == []
    (package / "models" / "a.py").write_text("from prefix_jax import b\n")
    assert cycles(import_graph(module_files(tmp_path))) == [["prefix_jax.b", "prefix_jax.models",
                                                             "prefix_jax.models.a"]]


def test_no_function_level_internal_import():
    """Internal imports sit at the top of a module; a function-level one may only guard a slow third-party
    import (`ALLOWED_FUNCTION_IMPORTS`)."""
    files = [*module_files().values(), ROOT / "train.py", ROOT / "predict.py"]
    hidden = [f"{path.relative_to(ROOT)}:{line} {function}() imports {module}"
              for path in files for function, line, module in function_level_imports(path)
              if (str(path.relative_to(ROOT)), function) not in ALLOWED_FUNCTION_IMPORTS]
    assert hidden == []
