"""DC-ViT's compressed blocks as a structure hook of the adapter registry.

``import hf_tome`` names this module among the built-in plugins, so the loader rebuilds compressed blocks before the
weights load, ``build_plan`` leaves them unreduced and ``compute_report`` counts their slim MLPs, while the ToMe
core never imports DC-ViT. Saving writes the model card; pushing uploads it with the model.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hf_tome.dcvit.blocks import CONFIG_KEY, compression_of, rebuild_from_config
from hf_tome.dcvit.model_card import push_compressed_to_hub, render_model_card
from hf_tome.integration.registry import StructureHook, register_structure_hook

_PUSH_KEYWORDS = ("commit_message", "private", "token", "revision", "create_pr")


def _save_model_card(model: nn.Module, folder: str) -> None:
    render_model_card(model).save(os.path.join(folder, "README.md"))


def _push_with_card(model: nn.Module, repo_id: str, **kwargs: Any) -> Any:
    return push_compressed_to_hub(model, repo_id, **{key: value for key, value in kwargs.items()
                                                     if key in _PUSH_KEYWORDS})


register_structure_hook(StructureHook(config_key=CONFIG_KEY, rebuild=rebuild_from_config, slim_layers=compression_of,
                                      save_extras=_save_model_card, push_to_hub=_push_with_card))
