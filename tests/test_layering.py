"""The house plan's import rules (ARCHITECTURE.md): arrows only point down the table."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("language", "vision", "video", "speech", "adapters", "training", "experiments", "demo")
ALLOWED = {
    "language": set(),
    "vision": set(),
    "video": {"vision"},
    "speech": set(),
    "adapters": {"language", "vision", "video", "speech"},
    "training": set(),
    "experiments": set(PACKAGES) - {"experiments", "demo"},
    "demo": {"adapters", "language", "training"},
}
# The one exception: the `herd` command-line dispatcher starts the chat front end (`herd chat`). No recipe or
# library module of experiments/ may depend on demo/.
EXCEPTIONS = {("experiments/cli.py", "demo")}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_the_plan_allows(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for imported in _imported_packages(path) - ALLOWED[package] - {package}:
            if (str(path.relative_to(REPO)), imported) in EXCEPTIONS:
                continue
            bad.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not bad, "imports against ARCHITECTURE.md:\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (top level or inside a function: a lazy
    import still closes a cycle). `from pkg import name` points at pkg.name when that is a module, else pkg."""
    paths = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}

    def known(name: str):
        parts = name.split(".")
        while parts and ".".join(parts) not in paths:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for module, path in paths.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets |= {known(f"{base}.{alias.name}") or known(base) for alias in node.names}
        graph[module] = targets - {None, module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert not _cycles(_import_graph()), "modules importing each other (directly or through others)"


def test_the_cycle_finder_sees_a_lazy_import_cycle(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _import_graph()
    assert "language.checkpoints" in graph["language.model"]  # the build step reads checkpoints, not the reverse
    assert "language.model" not in graph["language.checkpoints.hf"]
