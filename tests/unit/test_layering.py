"""The layering of the server package and the client, read from the code's own imports.

The import graph is built with `ast` from every `.py` file: `import x`, `from x import y` (an edge to the
submodule `x.y` where there is one), relative imports, and imports anywhere in a file — inside functions
and under `if TYPE_CHECKING:` too, since that is where circles hide. Imports made by `importlib` or
`__import__` are not seen. A package's `__init__.py` is the module named after the package; importing a
submodule draws no edge to the packages above it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = {"patchscope": ROOT / "services" / "patchscope"}
CLIENT = {"patchscope_client": ROOT / "clients" / "python" / "patchscope_client"}

Graph = dict[str, set[str]]  # module -> what it imports: modules of the graph, or external dotted names


def module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Every dotted name the module imports; `from x import y` gives `x.y` (a submodule or a name in x)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            yield from (origin if alias.name == "*" else f"{origin}.{alias.name}" for alias in node.names)


def resolve(name: str, modules: set[str]) -> str | None:
    """The most specific module of the graph that `name` names or lies in; None for an external name."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(roots: Mapping[str, Path]) -> Graph:
    """module -> what it imports: modules of the graph, and external names as written (`ray.serve`)."""
    files = {
        module_name(package, root, path): path
        for package, root in roots.items()
        for path in sorted(root.rglob("*.py"))
    }
    modules = set(files)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            internal = resolve(name, modules)
            if internal is not None:
                edges.add(internal)
            elif name.split(".")[0] not in roots:
                edges.add(name)  # external, as written: `ray.serve`, `torch.nn`
        edges.discard(module)
        graph[module] = edges
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def path_between(graph: Graph, start: str, goal, within: set[str] | None = None) -> list[str] | None:
    """The shortest import chain [start, ..., x] to the nearest module or name x that `goal` accepts."""
    parents: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if within is not None and nxt not in within:
                    continue
                if goal(nxt):
                    chain = [nxt]
                    while node != start:
                        chain.append(node)
                        node = parents[node]
                    return [start, *reversed(chain)]
                if nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return None


def cycle_through(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it: [a, b, ..., a]."""
    first = component[0]
    cycle = path_between(graph, first, lambda name: name == first, within=set(component))
    assert cycle is not None, component
    return cycle


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def reaches(graph: Graph, under: str, forbidden: Iterable[str]) -> list[str]:
    """For each module under `under` that imports a forbidden module or name, straight or through other
    modules of the graph: the shortest chain, as one line."""
    forbidden = tuple(forbidden)
    found = []
    for module in sorted(m for m in graph if is_under(m, under)):
        chain = path_between(graph, module, lambda name: any(is_under(name, f) for f in forbidden))
        if chain is not None:
            found.append(" -> ".join(chain))
    return found


def describe(graph: Graph, components: list[list[str]]) -> str:
    """Each circle's modules, and one shortest cycle through it, in the order of its imports."""
    return "\n".join(
        f"{len(c)} modules import each other: {', '.join(c)}\n  e.g. " + " -> ".join(cycle_through(graph, c))
        for c in components
    )


def whole_graph() -> Graph:
    return import_graph({**SERVER, **CLIENT})


def test_the_engine_imports_no_serving_layer_and_nothing_above_it():
    forbidden = [
        "ray",
        "grpc",
        "patchscope.serve",
        "patchscope.mapping",
        "patchscope.cli",
        "patchscope.eval",
        "patchscope_client",
    ]
    found = reaches(whole_graph(), "patchscope.engine", forbidden)
    assert not found, "the engine reaches what lies above it:\n" + "\n".join(found)


def test_eval_and_serve_never_import_the_cli():
    graph = whole_graph()
    found = reaches(graph, "patchscope.eval", ["patchscope.cli"])
    found += reaches(graph, "patchscope.serve", ["patchscope.cli"])
    assert not found, "the cli is the top floor; these reach it:\n" + "\n".join(found)


def test_the_client_imports_nothing_from_the_server_package():
    found = reaches(whole_graph(), "patchscope_client", ["patchscope"])
    assert not found, "patchscope-client must install without the server:\n" + "\n".join(found)


def test_the_package_has_no_import_circles():
    graph = whole_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + describe(graph, found)


def test_the_checker_finds_a_planted_circle_and_a_planted_forbidden_import(tmp_path):
    package = tmp_path / "planted"
    (package / "engine").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from planted import b\n",
        "b.py": "def late():\n    from . import a\n",  # a circle inside a function
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from planted.d import D\n",
        "d.py": "import planted.c\nD = 1\n",  # and one under TYPE_CHECKING
        "engine/__init__.py": "",
        "engine/core.py": "from ..engine import helper\n",
        "engine/helper.py": "from planted import serving\n",
        "serving.py": "import ray.serve\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph({"planted": package})

    assert circles(graph) == [["planted.a", "planted.b"], ["planted.c", "planted.d"]]
    assert "e.g. planted.a -> planted.b -> planted.a" in describe(graph, circles(graph))
    assert graph["planted.engine.core"] == {"planted.engine.helper"}
    assert reaches(graph, "planted.engine", ["ray"]) == [
        "planted.engine.core -> planted.engine.helper -> planted.serving -> ray.serve",
        "planted.engine.helper -> planted.serving -> ray.serve",
    ]
    assert reaches(graph, "planted.engine", ["grpc", "planted.a"]) == []
