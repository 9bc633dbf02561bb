"""The model classes that a model shared by hf-tome names in its config's ``auto_map``.

:mod:`hf_tome.hub.bundle` inlines this module, with every hf_tome module it needs (the ToMe core, the ViT/DeiT and
Dinov2 adapters, DC-ViT's slim blocks), into the ``modeling_hf_tome.py`` written beside config.json. There,
``transformers.AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`` builds the
``HfTome...`` class of the saved stock class, which rebuilds DC-ViT's slim blocks (``config.block_compression``)
before the weights load, then patches the model as ``hf_tome.AutoModelForImageClassification`` does: the settings
saved under ``config.tome``, overridden by ``tome_config=`` and ``tome_<field>=`` keywords (``tome_r=16``). The
model is then an hf_tome model like any other (``model.set_tome(r=8)``, ``model.tome_compute()``), with torch and
transformers alone.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_reg
from transformers.models.vit import modeling_vit as vit

from hf_tome.dcvit.blocks import CONFIG_KEY, compression_of, rebuild_from_config
from hf_tome.integration.loading import _patch_loaded, _rebuild, _split_tome_kwargs
from hf_tome.integration.plain_transformers import install_pipeline_check
from hf_tome.integration.registry import (
    Publisher,
    StructureHook,
    register_publisher,
    register_structure_hook,
    share_checkpoint_conversions,
)

REMOTE_CODE_FILE = "modeling_hf_tome.py"
"""The name of the remote code beside config.json (``auto_map`` names its classes as ``modeling_hf_tome.<class>``)."""


class HfTomeRemoteMixin:
    """Loads the stock class's checkpoint (slim blocks rebuilt first), then patches it with the saved settings."""

    _hf_tome_stock: type

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self)  # DC-ViT's slim blocks, before from_pretrained loads the weights into them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, tome_config: Any = None,
                        **kwargs: Any):
        """The stock ``from_pretrained`` plus ``tome_config=`` and ``tome_<field>=`` keywords (``tome_r=16``)."""
        overrides = _split_tome_kwargs(kwargs)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return cls._hf_tome_patch(model, tome_config, overrides)

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any):
        tome_config = kwargs.pop("tome_config", None)
        overrides = _split_tome_kwargs(kwargs)
        return cls._hf_tome_patch(super()._from_config(config, **kwargs), tome_config, overrides)

    @classmethod
    def _hf_tome_patch(cls, model: Any, tome_config: Any, overrides: dict[str, Any]):
        model.__class__ = cls._hf_tome_stock  # patched from the stock class, as hf_tome's Auto classes patch
        return _patch_loaded(model, tome_config, overrides)

    @classmethod
    def is_custom_code(cls) -> bool:
        """What the stock class answers, so transformers converts old checkpoint key names as it does for it."""
        return cls._hf_tome_stock.is_custom_code()


class HfTomeViTModel(HfTomeRemoteMixin, vit.ViTModel):
    _hf_tome_stock = vit.ViTModel


class HfTomeViTForImageClassification(HfTomeRemoteMixin, vit.ViTForImageClassification):
    _hf_tome_stock = vit.ViTForImageClassification


class HfTomeDeiTModel(HfTomeRemoteMixin, deit.DeiTModel):
    _hf_tome_stock = deit.DeiTModel


class HfTomeDeiTForImageClassification(HfTomeRemoteMixin, deit.DeiTForImageClassification):
    _hf_tome_stock = deit.DeiTForImageClassification


class HfTomeDeiTForImageClassificationWithTeacher(HfTomeRemoteMixin, deit.DeiTForImageClassificationWithTeacher):
    _hf_tome_stock = deit.DeiTForImageClassificationWithTeacher


class HfTomeDinov2Model(HfTomeRemoteMixin, dinov2.Dinov2Model):
    _hf_tome_stock = dinov2.Dinov2Model


class HfTomeDinov2ForImageClassification(HfTomeRemoteMixin, dinov2.Dinov2ForImageClassification):
    _hf_tome_stock = dinov2.Dinov2ForImageClassification


class HfTomeDinov2WithRegistersModel(HfTomeRemoteMixin, dinov2_reg.Dinov2WithRegistersModel):
    _hf_tome_stock = dinov2_reg.Dinov2WithRegistersModel


class HfTomeDinov2WithRegistersForImageClassification(HfTomeRemoteMixin,
                                                      dinov2_reg.Dinov2WithRegistersForImageClassification):
    _hf_tome_stock = dinov2_reg.Dinov2WithRegistersForImageClassification


REMOTE_CLASSES = {cls._hf_tome_stock: cls for cls in HfTomeRemoteMixin.__subclasses__()}
"""Stock transformers class -> the remote-code class ``auto_map`` names for a model saved from it."""

share_checkpoint_conversions(REMOTE_CLASSES)

MARKER_KEY = "hf_tome.token_merging_off.load_with_trust_remote_code_True"
"""An empty tensor saved with the weights: the stock classes do not expect it, so plain transformers loading the model
without its remote code lists it in the load report it logs as a warning, saying what to do. The remote classes,
and the stock classes once hf_tome is imported (its own loaders load them), ignore it."""
MARKER_PATTERN = r"^hf_tome\."


def ignore_marker(classes: Any) -> None:
    """Make ``classes`` (transformers models) load a checkpoint with :data:`MARKER_KEY` without reporting it."""
    for cls in classes:
        patterns = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
        if MARKER_PATTERN not in patterns:
            cls._keys_to_ignore_on_load_unexpected = [*patterns, MARKER_PATTERN]


def _copy_remote_code(model: Any, folder: str) -> None:
    """Save this file beside a re-saved model: its config's ``auto_map`` names it."""
    target = os.path.join(folder, REMOTE_CODE_FILE)
    if not os.path.exists(target) or not os.path.samefile(__file__, target):
        shutil.copyfile(__file__, target)


if __name__ != "hf_tome.hub.remote":  # this module as the remote code (in hf_tome, the built-in plugins register)
    register_structure_hook(StructureHook(config_key=CONFIG_KEY, rebuild=rebuild_from_config,
                                          slim_layers=compression_of))
    register_publisher(Publisher(name="remote code", save_extras=_copy_remote_code))
    ignore_marker(REMOTE_CLASSES.values())
    install_pipeline_check()
