"""The package's layout: no import cycles, and no part of the path imports a part above it.

The import graph is read from the sources with `ast`, imports inside
functions included: an import deferred to run time is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zerogpu"

# Bottom to top. A module may import its own layer and the layers below it.
LAYERS = [
    ["zerogpu.errors"],
    ["zerogpu.units", "zerogpu.settings", "zerogpu.identity", "zerogpu.progress", "zerogpu.telemetry"],
    ["zerogpu.cuda"],
    ["zerogpu.snapshot"],
    ["zerogpu.schedule"],
    ["zerogpu.runtime"],
    ["zerogpu.call"],
    ["zerogpu.integrations"],
    ["zerogpu.bench", "zerogpu.cli", "zerogpu.metrics", "zerogpu"],
]

# Well past what the issue asks (about 500): a module this long wants splitting.
MAX_LINES = 550


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(name: str, known: dict[str, Path]) -> str:
    """The module `name` stands for: itself, or the package of a name imported from it."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "zerogpu" or target.startswith("zerogpu."):
                found.add(resolve(target, known))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(name: str) -> int:
    best, rank = -1, None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{name} is in no layer of tests/test_layout.py: add it where it belongs"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    assert not cycles(graph), "\n".join(" -> ".join(cycle) for cycle in cycles(graph))


def test_no_part_imports_a_part_above_it():
    upward = [
        f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if target != "zerogpu" and layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_only_the_integrations_import_a_web_framework():
    frameworks = ("gradio", "fastapi", "starlette", "uvicorn")
    offenders = []
    for name, path in modules().items():
        if name.startswith("zerogpu.integrations"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{name} imports {n}" for n in names if n.split(".")[0] in frameworks]
    assert not offenders, offenders


def test_no_module_is_too_long_to_read():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility: {long}"


def test_the_graph_reader_sees_cycles_and_layers():
    # The checks above pass on an empty graph too; this one shows they can fail.
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert layer_of("zerogpu.call.worker") > layer_of("zerogpu.cuda.attach") > layer_of("zerogpu.errors")
    graph = import_graph()
    assert "zerogpu.errors" in graph["zerogpu.call.call"]
    assert "zerogpu.cuda.engine" in graph["zerogpu.cuda.attach"]  # an import inside a function counts
