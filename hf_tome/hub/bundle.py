"""The remote code of a shared model: hf_tome's own modules inlined into one file that imports no hf_tome.

:func:`remote_code` reads :mod:`hf_tome.hub.remote` (the classes ``auto_map`` names), the family adapters the
remote code serves and every hf_tome module these import, in import order, and joins their source into one module:
``from hf_tome... import`` statements are dropped (the names are defined earlier in the same file; inside a
function or an ``if`` block they become ``pass``), ``from __future__ import annotations`` opens the file once, and
a top-level name that two modules define is renamed in the later one (``_loop_module__adapters_dinov2``), with the
modules importing it. Nothing is maintained by hand: the file is regenerated from the installed sources at every
save, and its header carries a digest of them (:func:`sources_digest`).
"""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "hf_tome.hub.remote"
FAMILY_MODULES = ("hf_tome.adapters.vit", "hf_tome.adapters.dinov2")
"""The adapter modules the remote code carries: the families it serves (ViT, DeiT, Dinov2 with and without
registers)."""


class BundleError(ValueError):
    """The sources cannot be joined into one module (a name bound two ways, an import the bundler cannot place)."""


def source_path(module: str) -> Path:
    """The file of the hf_tome module ``module``."""
    base = PACKAGE_ROOT.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise BundleError(f"{module} has no source file under {PACKAGE_ROOT}")


def _is_ours(module: str | None) -> bool:
    return module is not None and (module == "hf_tome" or module.startswith("hf_tome."))


def _hf_tome_imports(tree: ast.Module, module: str) -> list[ast.ImportFrom]:
    """Every ``from hf_tome... import`` statement of ``module`` (at any depth); ``import hf_tome...`` is refused."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_ours(alias.name) for alias in node.names):
            raise BundleError(f"{module} line {node.lineno}: `import hf_tome...` cannot be inlined; expected "
                              "`from hf_tome.<module> import <name>`")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise BundleError(f"{module} line {node.lineno}: relative imports cannot be inlined")
        if isinstance(node, ast.ImportFrom) and _is_ours(node.module):
            for alias in node.names:
                if (PACKAGE_ROOT.joinpath(*node.module.split(".")[1:], alias.name)).exists() or \
                        PACKAGE_ROOT.joinpath(*node.module.split(".")[1:], f"{alias.name}.py").exists():
                    raise BundleError(f"{module} line {node.lineno}: `from {node.module} import {alias.name}` imports "
                                      "a module, which cannot be inlined; expected names")
            found.append(node)
    return found


def _parsed(module: str) -> tuple[str, ast.Module]:
    """The current source of ``module`` and its syntax tree (parsed once per source text)."""
    text = source_path(module).read_text(encoding="utf-8")
    return text, _parse(text, str(source_path(module)))


@cache
def _parse(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)


def modules_in_order(entries: Iterable[str] = (ENTRY_MODULE, *FAMILY_MODULES)) -> list[str]:
    """``entries`` and every hf_tome module they import, each after the modules it imports."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(module: str) -> None:
        if module in ordered:
            return
        if module in visiting:
            raise BundleError(f"{module} imports itself through other modules")
        visiting.add(module)
        for node in _hf_tome_imports(_parsed(module)[1], module):
            visit(node.module)
        visiting.discard(module)
        ordered.append(module)

    for entry in entries:
        visit(entry)
    return ordered


def _top_level_bindings(tree: ast.Module) -> dict[str, str]:
    """Names the module binds at top level -> what binds them: "def" or the import that does."""
    bound: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound[node.name] = "def"
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id != "__all__":
                        bound[name.id] = "def"
        elif isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a, as `import a` does
                imported = alias.name if alias.asname else alias.name.split(".")[0]
                bound[alias.asname or imported] = f"import {imported}"
        elif isinstance(node, ast.ImportFrom) and not _is_ours(node.module) and node.module != "__future__":
            for alias in node.names:
                bound[alias.asname or alias.name] = f"from {node.module} import {alias.name}"
    return bound


def _tag(module: str) -> str:
    return "_".join(module.split(".")[1:])


def _flat_names(modules: list[str]) -> dict[tuple[str, str], str]:
    """(module, name it defines) -> its name in the bundle: the first definer keeps it, later ones get a suffix."""
    flat: dict[tuple[str, str], str] = {}
    owners: dict[str, str] = {}  # bundle name -> what binds it
    for module in modules:
        for name, binding in _top_level_bindings(_parsed(module)[1]).items():
            if binding != "def":
                if owners.setdefault(name, binding) != binding:
                    raise BundleError(f"{module} binds {name!r} by `{binding}`, another module by `{owners[name]}`: "
                                      "rename one of the two")
                continue
            target = name if name not in owners else f"{name}__{_tag(module)}"
            owners[target] = "def"
            flat[(module, name)] = target
    return flat


def _resolve(module: str, name: str, flat: dict[tuple[str, str], str]) -> str:
    """The bundle name of ``name`` as ``module`` provides it (followed through re-exports)."""
    if (module, name) in flat:
        return flat[(module, name)]
    for node in _hf_tome_imports(_parsed(module)[1], module):
        for alias in node.names:
            if (alias.asname or alias.name) == name:
                return _resolve(node.module, alias.name, flat)
    raise BundleError(f"{name!r} is not defined in {module}")


def _renames(module: str, flat: dict[tuple[str, str], str]) -> dict[str, str]:
    """Local name -> bundle name, for the names of ``module`` that differ in the bundle."""
    tree = _parsed(module)[1]
    renames = {name: flat[(module, name)] for name, binding in _top_level_bindings(tree).items()
               if binding == "def" and flat[(module, name)] != name}
    for node in _hf_tome_imports(tree, module):
        for alias in node.names:
            target = _resolve(node.module, alias.name, flat)
            if target != (alias.asname or alias.name):
                renames[alias.asname or alias.name] = target
    return renames


def _inline(module: str, renames: dict[str, str]) -> str:
    """The source of ``module`` as it goes into the bundle."""
    text, tree = _parsed(module)
    lines = text.splitlines()
    drops: dict[int, str | None] = {}  # 0-based first line -> replacement ("pass" at its indent) or None (delete)
    spans: list[tuple[int, int]] = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        ours = isinstance(node, ast.ImportFrom) and (_is_ours(node.module) or node.module == "__future__")
        dunder_all = (id(node) in top_level and isinstance(node, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))
        if ours or dunder_all:
            indent = " " * node.col_offset
            drops[node.lineno - 1] = None if id(node) in top_level else f"{indent}pass"
            spans.append((node.lineno - 1, node.end_lineno))
    _check_renames_are_safe(module, tree, renames)
    edits = _token_edits(text, renames)
    for (row, col, old, new) in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old):]
    skipped = {row for start, end in spans for row in range(start, end)}
    kept = []
    for index, line in enumerate(lines):
        if index in drops:
            if drops[index] is not None:
                kept.append(drops[index])
        elif index not in skipped:
            kept.append(line)
    return "\n".join(kept).strip("\n")


def _check_renames_are_safe(module: str, tree: ast.Module, renames: dict[str, str]) -> None:
    """Refuse a renamed name that is also a parameter or a local variable somewhere (it would be renamed too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            arguments = node.args
            names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
            names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
            clash = sorted(set(names) & renames.keys())
            if clash:
                raise BundleError(f"{module}: parameter {clash[0]!r} has the name of a top-level name the bundle "
                                  "renames; rename the parameter")


def _token_edits(text: str, renames: dict[str, str]) -> list[tuple[int, int, str, str]]:
    """(row, col, old, new) for every use of a renamed name: not after a dot, not a keyword argument's name."""
    if not renames:
        return []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    edits, depth = [], 0
    for index, token in enumerate(tokens):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        if token.type != tokenize.NAME or token.string not in renames:
            continue
        before = tokens[index - 1].string if index else ""
        after = tokens[index + 1].string if index + 1 < len(tokens) else ""
        if before == "." or (depth and after == "=" and before in "(,"):
            continue
        edits.append((*token.start, token.string, renames[token.string]))
    return edits


def sources_digest(modules: Iterable[str] | None = None) -> str:
    """sha256 of the sources the remote code is made of (its header names it)."""
    digest = hashlib.sha256()
    for module in modules if modules is not None else modules_in_order():
        digest.update(module.encode() + b"\0" + source_path(module).read_bytes() + b"\0")
    return digest.hexdigest()


HEADER = '''"""hf-tome remote code: token merging (ToMe), prune + merge budget tables and DC-ViT slim blocks
for ViT, DeiT and Dinov2, with torch and transformers alone.

Generated by hf_tome.hub.bundle from hf-tome's own modules (listed below, in this order); do not edit by hand.
Sources digest: {digest}

    transformers.AutoModelForImageClassification.from_pretrained(<this folder or repo>, trust_remote_code=True)
    transformers.AutoModelForImageClassification.from_pretrained(..., trust_remote_code=True, tome_r=16)

Modules:
{modules}
"""

from __future__ import annotations
'''


def remote_code() -> str:
    """The text of ``modeling_hf_tome.py``: the bundle of the current hf_tome sources."""
    modules = modules_in_order()
    flat = _flat_names(modules)
    parts = [HEADER.format(digest=sources_digest(modules), modules="\n".join(f"    {module}" for module in modules))]
    for module in modules:
        relative = source_path(module).relative_to(PACKAGE_ROOT.parent)
        parts.append(f"# {'=' * 40} {relative} {'=' * 40}\n\n{_inline(module, _renames(module, flat))}\n")
    return "\n\n".join(parts)
