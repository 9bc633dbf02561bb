"""The package's layers (README, "Architecture"): every import points down or sideways within a layer, never up,
and no group of modules imports itself in a circle, counting imports inside functions too."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("hf_tome.core", "hf_tome.config")),
    ("integration", ("hf_tome.integration",)),
    ("adapters", ("hf_tome.adapters",)),
    ("evaluation", ("hf_tome.evaluation",)),
    ("methods", ("hf_tome.budgets", "hf_tome.dcvit", "hf_tome.export", "hf_tome.hub")),
    ("api", ("hf_tome",)),  # the package's __init__ alone: the public names
    ("server", ("hf_tome_server",)),
    ("cli", ("hf_tome.cli",)),
]
# Folders as their import names.
PACKAGES = {"hf_tome": ROOT / "hf_tome", "hf_tome_server": ROOT / "server"}


def module_files() -> dict[str, Path]:
    modules = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int:
    """Index of the layer holding ``module``: the layer with the longest matching prefix."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_root = prefix == "hf_tome"
            matches = module == prefix if exact_root else module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and to the README's picture)"
    return best


def imported_modules(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from package import submodule`` depends on the submodule, ``from module import name`` on the module
            names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer_and_the_picture_names_every_layer():
    readme = (ROOT / "README.md").read_text()
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert prefix in readme, f"README's architecture section lacks {prefix}"
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str):
    own = layer_of(module)
    upward = sorted(f"{target} ({LAYERS[layer_of(target)][0]})" for target in GRAPH[module]
                    if layer_of(target) > own)
    assert upward == [], f"{module} ({LAYERS[own][0]}) imports a higher layer: {upward}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the import graph: each must be a single module."""
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index_of[module] = low[module] = len(index_of)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index_of:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index_of[target])
        if low[module] == index_of[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index_of:
            visit(module)
    assert cycles == []


def test_the_core_imports_no_transformers():
    """``hf_tome.core`` and ``hf_tome.config`` need torch at most."""
    for module, path in MODULES.items():
        if layer_of(module) != 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(name.split(".")[0] == "transformers" for name in names), module


# Namespace packages of other distributions that pyproject maps one of our folders into (they have no __init__.py):
# optimum-cli's command registry, where hf_tome/export/optimum_register installs `optimum-cli export hf-tome`.
NAMESPACE_PORTIONS = {"optimum.commands.register": "hf_tome/export/optimum_register"}


def test_pyproject_lists_every_package():
    """pyproject lists the packages (server/ installs as hf_tome_server, which find cannot map): none missing."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    packages = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    assert listed == packages | set(NAMESPACE_PORTIONS)
    for name, folder in NAMESPACE_PORTIONS.items():
        assert setuptools["package-dir"][name] == folder and not (ROOT / folder / "__init__.py").exists()
