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
the check never sees their calls. With ``trust_remote_code=True`` the keywords go through: the remote code that
``hf_tome.hub`` saves with a model (``modeling_hf_tome.py``) takes them; without such code the ``TypeError`` above
is raised.

Two more things plain transformers gets wrong about hf_tome models, fixed the same way (wrapped after import):

- a model saved by hf_tome (``config.tome`` or DC-ViT's ``config.block_compression``) loaded by a transformers Auto
  class without its remote code is the stock model, silently unmerged: the wrapped ``from_pretrained`` warns
  (:func:`merging_off_warning`), for ``pipeline(model=<folder>)`` too;
- ``pipeline(task, model=<an hf_tome model>)`` logged "The model 'ToMeViTForImageClassification' is not supported
  for image-classification": ``Pipeline.check_model_type`` now checks an hf_tome class under its stock name
  (:func:`accept_tome_models_in_pipelines`; the remote code installs it too).
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

AUTO_FACTORY = "transformers.models.auto.auto_factory"
PIPELINES_BASE = "transformers.pipelines.base"
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
        tome = any(key.startswith("tome_") for key in kwargs)
        if tome and not kwargs.get("trust_remote_code"):
            raise tome_keyword_error(cls.__name__, name, kwargs)
        try:
            model = method(cls, *args, **kwargs)
        except TypeError as error:  # no remote code took the tome_* keywords: the model's __init__ refused them
            if tome and "tome_" in str(error):
                raise tome_keyword_error(cls.__name__, name, kwargs) from error
            raise
        # hf_tome's own loaders load the stock model on purpose (and patch it next): only other callers are warned
        if name == "from_pretrained" and not _called_by_hf_tome():
            message = merging_off_warning(model, cls.__name__, args[0] if args else kwargs.get(
                "pretrained_model_name_or_path"))
            if message is not None:
                warnings.warn(message, UserWarning, stacklevel=2)
        return model

    setattr(checked, _CHECKED, True)
    return checked


def is_tome_model(model: Any) -> bool:
    """True for a model of an hf_tome class (patched by ``hf_tome.apply``, or the remote code's), by duck typing so
    that the classes of hf_tome's remote code (``hf_tome.hub``), a copy of hf_tome's, count too."""
    return callable(getattr(type(model), "set_tome", None))


def stock_class_name(model: Any) -> str:
    """The name of the transformers class an hf_tome model's class derives from (``ViTForImageClassification``)."""
    return next((cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers.")),
                type(model).__name__)


def merging_off_warning(model: Any, auto_class: str, source: Any) -> str | None:
    """The warning for a model saved by hf_tome that a transformers Auto class loaded as the stock model, or None.

    Such a model has ``config.tome`` (token merging, a budget table) or ``config.block_compression`` (DC-ViT) but
    runs transformers' own forward: every token goes through every layer.
    """
    config = getattr(model, "config", None)
    tome, blocks = getattr(config, "tome", None), getattr(config, "block_compression", None)
    if not (tome or blocks) or is_tome_model(model):
        return None
    if isinstance(tome, dict) and tome.get("budget_table"):
        saved = "a prune + merge budget table"
    elif isinstance(tome, dict) and tome.get("prune_kept"):
        saved = "prune + merge kept counts"
    elif isinstance(tome, dict):
        saved = f"token merging r={tome.get('r', 0)}"
    else:
        saved = "DC-ViT compressed blocks"
    # Only families with remote code (ViT, DeiT, DINOv2) save an auto_map; the others can only load through hf_tome.
    remote = (", or pass trust_remote_code=True to run the modeling_hf_tome.py saved with it"
              if getattr(config, "auto_map", None) else "")
    return (f"{source} was saved by hf-tome with {saved}, but transformers.{auto_class}.from_pretrained loaded it "
            f"as the stock {type(model).__name__}: token merging is off. Load it with hf_tome.{auto_class}"
            f".from_pretrained(...){remote}.")


def _names(values: Any) -> list[str]:
    names = []
    for value in values:
        for item in value if isinstance(value, tuple) else (value,):
            names.append(item if isinstance(item, str) else getattr(item, "__name__", str(item)))
    return names


def _accepting_tome_models(method: Callable) -> Callable:
    """``Pipeline.check_model_type`` checking an hf_tome model under its stock class's name."""

    @functools.wraps(method)
    def check_model_type(self, supported_models: Any) -> Any:
        if is_tome_model(self.model):
            stock, name = stock_class_name(self.model), type(self.model).__name__
            if isinstance(supported_models, list) and stock in supported_models:
                supported_models = [*supported_models, name]
            elif isinstance(supported_models, dict) and stock in _names(supported_models.values()):
                supported_models = {**supported_models, "hf_tome": name}
        return method(self, supported_models)

    setattr(check_model_type, _CHECKED, True)
    return check_model_type


def accept_tome_models_in_pipelines(pipelines_base: ModuleType | None = None) -> None:
    """Wrap ``Pipeline.check_model_type`` (of ``pipelines_base``, else of the imported
    ``transformers.pipelines.base``) so an hf_tome model passes as its stock class. Idempotent."""
    module = pipelines_base if pipelines_base is not None else sys.modules.get(PIPELINES_BASE)
    pipeline = getattr(module, "Pipeline", None)
    method = getattr(pipeline, "check_model_type", None)
    if method is not None and not getattr(method, _CHECKED, False):
        pipeline.check_model_type = _accepting_tome_models(method)


def _called_by_hf_tome() -> bool:
    """True when the wrapped method's caller is hf_tome's own code (two frames up: past ``checked``)."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller == "hf_tome" or caller.startswith("hf_tome.")


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
    """Runs the real loader of a module, then its finder's ``callback``, then hands the module back to the real
    loader and takes the finder off ``sys.meta_path``."""

    def __init__(self, loader: importlib.abc.Loader, finder: _AfterImportFinder) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.finder.callback(module)
        _remove_finder(self.finder.marker)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... while the module executes
        return getattr(self.loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for ``target`` and wraps the loader they return."""

    target: str
    marker: str  # an attribute set to True on the class: how a re-imported hf_tome's finders are told apart

    def callback(self, module: ModuleType) -> None:
        raise NotImplementedError

    def find_spec(self, fullname: str, path, target=None):
        if fullname != self.target:
            return None
        for finder in sys.meta_path:
            if _is_ours(finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CheckAfterExec(spec.loader, self)
                return spec
        return None


class _AutoFactoryFinder(_AfterImportFinder):
    """Wraps the Auto classes of ``auto_factory`` right after it is executed."""

    # Told apart by this marker rather than by class, so a re-imported hf_tome (a second class object) neither
    # installs a second finder nor asks an older one, which would ask this one back.
    _hf_tome_auto_factory_finder = True
    target, marker = AUTO_FACTORY, "_hf_tome_auto_factory_finder"

    def callback(self, module: ModuleType) -> None:
        check_auto_classes(module)


class _PipelinesFinder(_AfterImportFinder):
    """Wraps ``Pipeline.check_model_type`` right after ``transformers.pipelines.base`` is executed."""

    _hf_tome_pipelines_finder = True
    target, marker = PIPELINES_BASE, "_hf_tome_pipelines_finder"

    def callback(self, module: ModuleType) -> None:
        accept_tome_models_in_pipelines(module)


_MARKERS = (_AutoFactoryFinder.marker, _PipelinesFinder.marker)


def _is_ours(finder: Any, marker: str | None = None) -> bool:
    return any(getattr(finder, name, False) is True for name in ((marker,) if marker else _MARKERS))


def _remove_finder(marker: str) -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_ours(finder, marker)]


def install() -> None:
    """Make transformers' Auto classes refuse ``tome_*`` keywords with a clear error and warn when they load an
    hf-tome model unmerged, and pipelines accept hf_tome models (see the module docstring): now for the modules
    already imported, else right after they are. Imports nothing from transformers."""
    module = sys.modules.get(AUTO_FACTORY)
    if module is not None and hasattr(module, "_BaseAutoModelClass"):
        check_auto_classes(module)
    elif not any(_is_ours(finder, _AutoFactoryFinder.marker) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoFactoryFinder())
    install_pipeline_check()


def install_pipeline_check() -> None:
    """:func:`accept_tome_models_in_pipelines` now if ``transformers.pipelines.base`` is imported, else right after
    it is (the remote code of ``hf_tome.hub`` calls this alone)."""
    if PIPELINES_BASE in sys.modules:
        accept_tome_models_in_pipelines()
    elif not any(_is_ours(finder, _PipelinesFinder.marker) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PipelinesFinder())
