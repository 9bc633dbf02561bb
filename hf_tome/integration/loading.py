"""hf_tome's Auto classes: transformers' Auto classes plus ``tome_*`` keywords and ``tome_config=``."""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from transformers.models.auto.auto_factory import _get_model_class

from hf_tome.config import ToMeConfig
from hf_tome.integration.patch import apply
from hf_tome.integration.registry import structure_hooks

# Keywords of ``from_pretrained`` that say where to find the files (read before the config is loaded).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _split_tome_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop ``tome_<field>`` keywords (transformers would pass them on to ``__init__`` and fail)."""
    return {key.removeprefix("tome_"): kwargs.pop(key) for key in list(kwargs) if key.startswith("tome_")}


def _patch_loaded(model: nn.Module, tome_config: ToMeConfig | dict | None, overrides: dict[str, Any]) -> nn.Module:
    if isinstance(tome_config, dict):
        tome_config = ToMeConfig.from_dict(tome_config)
    if tome_config is None:
        saved = getattr(model.config, "tome", None)
        tome_config = ToMeConfig.from_dict(saved) if saved is not None else ToMeConfig()
    return apply(model, tome_config, **overrides)


def _rebuild(model: nn.Module) -> nn.Module:
    """Give ``model`` the modules of every structure change its config records (DC-ViT's slim blocks)."""
    for hook in structure_hooks(model.config):
        hook.rebuild(model)
    return model


def _block_compressed_class(stock_class: type[nn.Module]) -> type[nn.Module]:
    """``stock_class`` whose ``__init__`` also builds the compressed blocks ``config.block_compression`` names,
    so transformers' own ``from_pretrained`` loads the slim weights into matching modules."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        stock_class.__init__(self, config, *args, **kwargs)
        _rebuild(self)

    return type(stock_class.__name__, (stock_class,), {"__init__": __init__, "__module__": stock_class.__module__})


def _peek_config(pretrained_model_name_or_path: Any, kwargs: dict[str, Any]) -> Any:
    """The checkpoint's config (or ``config=``), read only to see whether it has DC-ViT compressed blocks.

    It is not handed on: transformers reads the config again itself, so config keywords such as
    ``num_labels=10`` still update it there instead of reaching the model's ``__init__``.
    """
    if kwargs.get("config") is not None:
        return kwargs["config"]
    hub_kwargs = {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
    return transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path,
                                                   trust_remote_code=kwargs.get("trust_remote_code"), **hub_kwargs)


def _load_compressed(stock_class: type[nn.Module], pretrained_model_name_or_path: Any, *model_args: Any,
                     **kwargs: Any) -> nn.Module:
    """``stock_class.from_pretrained`` with the DC-ViT compressed blocks rebuilt before the weights are loaded."""
    model = _block_compressed_class(stock_class).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                                  **kwargs)
    model.__class__ = stock_class  # saves, patches and prints as the stock class
    return model


def load_stock(stock_class: type[nn.Module], pretrained_model_name_or_path: Any, *model_args: Any,
               **kwargs: Any) -> nn.Module:
    """``stock_class.from_pretrained`` (a transformers class, so its checkpoint key conversion runs), rebuilding
    DC-ViT compressed blocks before the weights are loaded."""
    if not structure_hooks(_peek_config(pretrained_model_name_or_path, kwargs)):
        return stock_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    return _load_compressed(stock_class, pretrained_model_name_or_path, *model_args, **kwargs)


def _load(auto_class: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained``, rebuilding DC-ViT compressed blocks before the weights are loaded."""
    config = _peek_config(pretrained_model_name_or_path, kwargs)
    if not structure_hooks(config):
        return auto_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    stock_class = _get_model_class(config, auto_class._model_mapping)
    return _load_compressed(stock_class, pretrained_model_name_or_path, *model_args, **kwargs)


def load_patched(stock_class: type[nn.Module], pretrained_model_name_or_path: Any, *model_args: Any,
                 tome_config: ToMeConfig | dict | None = None, **kwargs: Any) -> nn.Module:
    """``stock_class`` loaded like transformers does, then patched as the hf_tome Auto classes patch."""
    overrides = _split_tome_kwargs(kwargs)
    model = load_stock(stock_class, pretrained_model_name_or_path, *model_args, **kwargs)
    return _patch_loaded(model, tome_config, overrides)


class _ToMeAutoClass:
    """Loads with the wrapped transformers Auto class, then applies hf_tome.

    Models compressed by ``hf-tome compress`` (``config.block_compression``) get their slim blocks rebuilt before
    the weights are loaded. The ToMe settings come from, in order of precedence: ``tome_<field>=`` keywords,
    ``tome_config=``, the ``tome`` section saved in the checkpoint's config, and ``ToMeConfig()`` defaults.
    """

    _auto_class: type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with "
                      f"`{type(self).__name__}.from_pretrained(...)` or `.from_config(...)`")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any,
                        tome_config: ToMeConfig | dict | None = None, **kwargs: Any) -> nn.Module:
        """Same as transformers' ``from_pretrained`` plus ``tome_config=`` and ``tome_<field>=`` keywords."""
        overrides = _split_tome_kwargs(kwargs)
        model = _load(cls._auto_class, pretrained_model_name_or_path, *model_args, **kwargs)
        return _patch_loaded(model, tome_config, overrides)

    @classmethod
    def from_config(cls, config: Any, tome_config: ToMeConfig | dict | None = None, **kwargs: Any) -> nn.Module:
        """Same as transformers' ``from_config`` plus ``tome_config=`` and ``tome_<field>=`` keywords."""
        overrides = _split_tome_kwargs(kwargs)
        model = cls._auto_class.from_config(config, **kwargs)
        _rebuild(model)
        return _patch_loaded(model, tome_config, overrides)


class AutoModel(_ToMeAutoClass):
    """``transformers.AutoModel`` with token merging."""

    _auto_class = transformers.AutoModel


class AutoModelForImageClassification(_ToMeAutoClass):
    """``transformers.AutoModelForImageClassification`` with token merging."""

    _auto_class = transformers.AutoModelForImageClassification


class AutoModelForAudioClassification(_ToMeAutoClass):
    """``transformers.AutoModelForAudioClassification`` with token merging (AST)."""

    _auto_class = transformers.AutoModelForAudioClassification


class AutoModelForVideoClassification(_ToMeAutoClass):
    """``transformers.AutoModelForVideoClassification`` with token merging (VideoMAE, ViViT)."""

    _auto_class = transformers.AutoModelForVideoClassification


class AutoModelForSpeechSeq2Seq(_ToMeAutoClass):
    """``transformers.AutoModelForSpeechSeq2Seq`` with token merging in the encoder (Whisper)."""

    _auto_class = transformers.AutoModelForSpeechSeq2Seq
