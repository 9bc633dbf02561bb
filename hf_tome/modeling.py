"""hf_tome's Auto classes: transformers' Auto classes plus ``tome_*`` keywords and ``tome_config=``."""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from .config import ToMeConfig
from .patch import apply


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


class _ToMeAutoClass:
    """Loads with the wrapped transformers Auto class, then applies hf_tome.

    The ToMe settings come from, in order of precedence: ``tome_<field>=`` keywords, ``tome_config=``,
    the ``tome`` section saved in the checkpoint's config, and ``ToMeConfig()`` defaults.
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
        model = cls._auto_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return _patch_loaded(model, tome_config, overrides)

    @classmethod
    def from_config(cls, config: Any, tome_config: ToMeConfig | dict | None = None, **kwargs: Any) -> nn.Module:
        """Same as transformers' ``from_config`` plus ``tome_config=`` and ``tome_<field>=`` keywords."""
        overrides = _split_tome_kwargs(kwargs)
        model = cls._auto_class.from_config(config, **kwargs)
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
