"""A clear error for ``tome_*`` keywords given to transformers' own Auto classes.

Why: after ``import hf_tome``, ``transformers.AutoModel.from_pretrained(path, tome_r=16)`` looks as if it should
work, but transformers hands unknown keywords on to the model's ``__init__``, which fails with ``TypeError:
ViTModel.__init__() got an unexpected keyword argument 'tome_r'``, naming neither the cause nor the fix. With this
module installed, such a call raises a ``TypeError`` that names the keyword and the call that takes it:
``hf_tome.AutoModel.from_pretrained(..., tome_r=16)`` or ``hf_tome.apply(model, r=16)``.

How: ``import hf_tome`` must stay light, and importing ``transformers.models.auto.auto_factory`` takes seconds,
so :func:`install` never imports it. If the module is already imported, ``from_pretrained`` and ``from_config``
of ``_BaseAutoModelClass`` and of every Auto class made from it are wrapped at once (transformers copies the
base methods into each Auto class). Otherwise a meta path finder wraps them right after the module has been
executed, before any Auto class is made from it, and removes itself. A wrapped method looks only for
``tome_*`` keywords; without them it calls transformers' own method with the same arguments. hf_tome's Auto
classes (:mod:`hf_tome.integration.loading`) take the ``tome_*`` keywords out before they call transformers, so
the check
never sees their calls.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

AUTO_FACTORY = "transformers.models.auto.auto_factory"
HF_TOME_AUTO_CLASSES = ("AutoModel", "AutoModelForAudioClassification", "AutoModelForImageClassification",
                        "AutoModelForSpeechSeq2Seq", "AutoModelForVideoClassification")
"""The transformers Auto classes hf_tome has a counterpart of (same name, in :mod:`hf_tome.integration.loading`)."""

_CHECKED = "_hf_tome_checks_tome_keywords"  # set on wrapped methods (and kept by transformers' copies of them)
_METHODS = ("from_pretrained", "from_config")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else "..."


def tome_keyword_error(auto_class: str, method: str, kwargs: dict[str, Any]) -> TypeError:
    """The error for ``transformers.<auto_class>.<method>(..., **kwargs)`` where ``kwargs`` has ``tome_*`` keys."""
    tome = {key: value for key, value in kwargs.items() if key.startswith("tome_")}
    given = ", ".join(f"{key}={_shown(value)}" for key, value in tome.items())
    names = ", ".join(tome)
    apply_args = ["model"]
    if "tome_config" in tome:
        apply_args.append(_shown(tome["tome_config"]))
    apply_args += [f"{key.removeprefix('tome_')}={_shown(value)}" for key, value in tome.items()
                   if key != "tome_config"]
    apply_call = f"hf_tome.apply({', '.join(apply_args)})"
    head = (f"transformers.{auto_class}.{method}() does not take {names}: transformers would pass "
            f"{'it' if len(tome) == 1 else 'them'} on to the model's __init__.")
    if auto_class in HF_TOME_AUTO_CLASSES:
        return TypeError(f"{head} Load with hf_tome's Auto class instead: hf_tome.{auto_class}.{method}(..., "
                         f"{given}), or load without {names} and call {apply_call}")
    return TypeError(f"{head} hf_tome has no {auto_class}: load without {names} and call {apply_call}")


def _checked(method: Callable, name: str) -> Callable:
    """``method`` (the function of a classmethod) refusing ``tome_*`` keywords, otherwise unchanged."""

    @functools.wraps(method)
    def checked(cls, *args: Any, **kwargs: Any) -> Any:
        if any(key.startswith("tome_") for key in kwargs):
            raise tome_keyword_error(cls.__name__, name, kwargs)
        return method(cls, *args, **kwargs)

    setattr(checked, _CHECKED, True)
    return checked


def _subclasses(cls: type) -> list[type]:
    found, stack = [], [cls]
    while stack:
        for subclass in stack.pop().__subclasses__():
            if subclass not in found:
                found.append(subclass)
                stack.append(subclass)
    return found


def check_auto_classes(auto_factory: ModuleType) -> None:
    """Wrap ``from_pretrained``/``from_config`` of ``_BaseAutoModelClass`` and of the Auto classes made so far
    (each holds its own copy). Idempotent; does nothing for a transformers without ``_BaseAutoModelClass``."""
    base = getattr(auto_factory, "_BaseAutoModelClass", None)
    if base is None:
        return
    for cls in [base, *_subclasses(base)]:
        for name in _METHODS:
            attribute = cls.__dict__.get(name)
            if isinstance(attribute, classmethod) and not getattr(attribute.__func__, _CHECKED, False):
                setattr(cls, name, classmethod(_checked(attribute.__func__, name)))


class _CheckAfterExec(importlib.abc.Loader):
    """Runs the real loader of ``auto_factory``, then :func:`check_auto_classes`, then hands the module back to
    the real loader and takes the finder off ``sys.meta_path``."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        check_auto_classes(module)
        _remove_finder()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... while the module executes
        return getattr(self.loader, name)


class _AutoFactoryFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for ``auto_factory`` and wraps the loader they return."""

    # Told apart by this marker rather than by class, so a re-imported hf_tome (a second class object) neither
    # installs a second finder nor asks an older one, which would ask this one back.
    _hf_tome_auto_factory_finder = True

    def find_spec(self, fullname: str, path, target=None):
        if fullname != AUTO_FACTORY:
            return None
        for finder in sys.meta_path:
            if _is_ours(finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CheckAfterExec(spec.loader)
                return spec
        return None


def _is_ours(finder: Any) -> bool:
    return getattr(finder, "_hf_tome_auto_factory_finder", False) is True


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_ours(finder)]


def install() -> None:
    """Make transformers' Auto classes refuse ``tome_*`` keywords with a clear error (see the module docstring),
    now if ``auto_factory`` is imported, else right after it is. Imports nothing from transformers."""
    module = sys.modules.get(AUTO_FACTORY)
    if module is not None and hasattr(module, "_BaseAutoModelClass"):
        check_auto_classes(module)
    elif not any(_is_ours(finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoFactoryFinder())
