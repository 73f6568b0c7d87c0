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
