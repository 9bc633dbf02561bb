"""What `pip install hf-tome` needs, and which extra provides what the upper layers import.

The library for ToMe (hf_tome.core, hf_tome.config, hf_tome.integration, hf_tome.adapters, the package's
``__init__`` and the built-in plugins it names) depends on torch and transformers only; the layers above it import
their other libraries from the extra that the README's "Architecture" section names for them. Every import is read
from the source (those inside functions too; imports under ``if TYPE_CHECKING:`` never run and are left out).
.ci/run checks the same thing at run time, in an environment with only torch and transformers installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]

# The library for ToMe: the core, integration and adapters layers and the package's __init__.
CORE_LAYERS = ("hf_tome/core", "hf_tome/config.py", "hf_tome/integration", "hf_tome/adapters", "hf_tome/__init__.py")
CORE_DISTRIBUTIONS = {"torch", "transformers"}

# The layers above it and the extra the README's "Architecture" section names for each: the evaluation layer takes
# the `eval` extra; the methods layer (budgets, DC-ViT) the `methods` extra; the server the `server` extra.
LAYER_EXTRAS = {
    "hf_tome/evaluation": "eval",
    "hf_tome/budgets": "methods",
    "hf_tome/dcvit": "methods",
    "hf_tome/export": "export",
    "hf_tome/hub": "methods",
    "server": "server",  # installed as hf_tome_server
}

# Import name -> distribution, where the two differ.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "multipart": "python-multipart",
    "huggingface_hub": "huggingface-hub",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
}

# Imported directly but not declared: provided by a requirement of a declared distribution (checked below against
# the installed metadata), import name -> the declared distribution that brings it.
INDIRECT = {
    "huggingface_hub": "transformers",  # dcvit.model_card (reached from the built-in plugin dcvit.hook)
    "safetensors": "transformers",  # evaluation.assets.dinov2
    "pyarrow": "datasets",  # evaluation.assets.fashion_mnist
    "starlette": "litserve",  # server (litserve serves through FastAPI, on Starlette)
    "uvicorn": "litserve",  # server/protocol.py: the h11 protocol uvicorn runs LitServe with
    "h11": "litserve",  # through uvicorn
}

# A module whose import belongs to another extra than its layer's, and the only modules allowed to import it.
# hf_tome.evaluation.accel makes the accelerate.Accelerator of the methods' `hf-tome search` and `hf-tome compress`;
# no evaluation module imports it, so the `eval` extra alone still serves the whole evaluation layer otherwise.
OTHER_EXTRA = {
    ("hf_tome/evaluation/accel.py", "accelerate"): ("methods", ("hf_tome.budgets", "hf_tome.dcvit")),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python_files(path: str) -> list[Path]:
    target = ROOT / path
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "server":
        parts[0] = "hf_tome_server"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            for statement in node.body:
                skipped.update(id(child) for child in ast.walk(statement))
    return skipped


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports at run time (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = type_checking_nodes(tree)
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            # `from pkg import submodule`: the submodule is imported too (only ours matter for what follows)
            names.update(f"{base}.{alias.name}" for alias in node.names if base.split(".")[0] in ("hf_tome",
                                                                                                  "hf_tome_server"))
    return names


def third_party(modules: set[str]) -> set[str]:
    tops = {name.split(".")[0] for name in modules}
    return {top for top in tops if top not in sys.stdlib_module_names and top not in ("hf_tome", "hf_tome_server")}


def source_of(module: str) -> Path | None:
    """The file of one of our modules, or None where ``module`` names something else (a class, a function)."""
    parts = module.split(".")
    root = ROOT / ("server" if parts[0] == "hf_tome_server" else "hf_tome")
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def builtin_plugins() -> tuple[str, ...]:
    """The modules hf_tome/__init__.py hands to ``set_builtin_plugins``: the registry imports them on first use."""
    tree = ast.parse((ROOT / "hf_tome/__init__.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "set_builtin_plugins"):
            return tuple(ast.literal_eval(node.args[0]))
    raise AssertionError("hf_tome/__init__.py no longer calls set_builtin_plugins")


def core_install_files() -> set[Path]:
    """The core layers' files and every module of ours they or the built-in plugins import, transitively."""
    todo = [path for layer in CORE_LAYERS for path in python_files(layer)]
    for plugin in builtin_plugins():
        path = source_of(plugin)
        assert path is not None, f"built-in plugin {plugin} has no source file"
        if path.name == "__init__.py":  # a package of plugins (hf_tome.adapters): all its modules
            todo.extend(sorted(path.parent.glob("*.py")))
        else:
            todo.append(path)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            # importing hf_tome.a.b runs hf_tome/__init__.py and hf_tome/a/__init__.py too
            parts = module.split(".")
            for end in range(1, len(parts) + 1):
                if parts[0] in ("hf_tome", "hf_tome_server") and (found := source_of(".".join(parts[:end]))):
                    todo.append(found)
    return seen


def declared(extra: str | None) -> set[str]:
    """Normalized distributions that ``pip install hf-tome[extra]`` (None: no extra) installs by name."""
    names = {normalize(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    if extra is None:
        return names
    for text in PYPROJECT["project"]["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if normalize(requirement.name) == normalize(PROJECT):
            for inner in requirement.extras:
                names |= declared(inner)
        else:
            names.add(normalize(requirement.name))
    return names


def requires_closure(distribution: str) -> set[str]:
    """Normalized distributions that installing ``distribution`` (no extras) brings in, read from its metadata."""
    environment = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    todo = [distribution]
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return seen


def test_core_dependencies_are_torch_and_transformers():
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    assert {normalize(r.name) for r in requirements} == CORE_DISTRIBUTIONS
    assert all(not r.extras for r in requirements)
    # and both keep a version range (.ci/run reads transformers' from here)
    assert all(str(r.specifier) for r in requirements)


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) == {"eval", "methods", "server", "export", "all", "dev"}
    assert declared("all") == declared("eval") | declared("methods") | declared("server") | declared("export")
    # the methods and the server run hf_tome.evaluation: their extras include `eval`
    assert declared("eval") <= declared("methods") and declared("eval") <= declared("server")
    assert not declared("all") & {"pytest", "ruff"}  # test tools only in `dev`


def test_core_layers_import_only_torch_and_transformers():
    offenders = {}
    for layer in CORE_LAYERS:
        for path in python_files(layer):
            extra = third_party(imported_modules(path)) - CORE_DISTRIBUTIONS
            if extra:
                offenders[str(path.relative_to(ROOT))] = sorted(extra)
    assert not offenders, f"the core layers may import only the standard library, torch and transformers: {offenders}"


def test_import_hf_tome_needs_only_torch_and_transformers():
    """The core layers, the built-in plugins the registry imports on its first look-up (DC-ViT's structure hook)
    and every module of ours these import. Besides torch and transformers they may use a library that those two
    themselves require, when INDIRECT names it (huggingface_hub)."""
    files = core_install_files()
    assert {source_of(plugin) for plugin in builtin_plugins()} <= files
    with_core = requires_closure("transformers") | requires_closure("torch")
    offenders = {}
    for path in sorted(files):
        for name in sorted(third_party(imported_modules(path)) - CORE_DISTRIBUTIONS):
            distribution = normalize(DISTRIBUTION_OF.get(name, name))
            # allowed: a library that torch or transformers requires, named in INDIRECT (a conscious choice)
            if INDIRECT.get(name) not in CORE_DISTRIBUTIONS or distribution not in with_core:
                offenders.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert not offenders, ("`import hf_tome; hf_tome.apply(...)` may import only torch, transformers and, named in "
                           f"INDIRECT, what those two require: {offenders}")


@pytest.mark.parametrize("layer", sorted(LAYER_EXTRAS))
def test_upper_layers_import_what_their_extra_provides(layer):
    extra = LAYER_EXTRAS[layer]
    missing = {}
    for path in python_files(layer):
        relative = str(path.relative_to(ROOT))
        for name in sorted(third_party(imported_modules(path))):
            provider = extra
            if (relative, name) in OTHER_EXTRA:
                provider = OTHER_EXTRA[(relative, name)][0]
            distribution = normalize(DISTRIBUTION_OF.get(name, name))
            if distribution in declared(provider):
                continue
            carrier = INDIRECT.get(name)
            if carrier is not None and normalize(carrier) in declared(provider):
                assert distribution in requires_closure(carrier), (
                    f"{relative} imports {name}, which INDIRECT says {carrier} brings; its metadata says otherwise")
                continue
            missing.setdefault(relative, []).append(f"{name} (distribution {distribution})")
    assert not missing, f"imports that the `{extra}` extra does not provide: {missing}"


def test_other_extra_modules_are_imported_only_by_that_layer():
    for (relative, _), (_, importers) in OTHER_EXTRA.items():
        module = module_name(ROOT / relative)
        users = {
            module_name(path)
            for layer in ("hf_tome", "server")
            for path in python_files(layer)
            if module in imported_modules(path)
        }
        assert users, f"nothing imports {module}: drop it from OTHER_EXTRA"
        stray = sorted(user for user in users if not user.startswith(importers))
        assert not stray, f"{module} needs another extra than its layer's; only {importers} may import it: {stray}"


def test_indirect_entries_are_imported():
    imported = set()
    for layer in ("hf_tome", "server"):
        for path in python_files(layer):
            imported |= third_party(imported_modules(path))
    stale = sorted(set(INDIRECT) - imported)
    assert not stale, f"no module imports these any more: drop them from INDIRECT: {stale}"
