"""DC-ViT's compressed blocks as a structure hook of the adapter registry.

``import hf_tome`` names this module among the built-in plugins, so the loader rebuilds compressed blocks before the
weights load, ``build_plan`` leaves them unreduced and ``compute_report`` counts their slim MLPs, while the ToMe
core never imports DC-ViT. A shared compressed model (``save_pretrained``, ``push_to_hub``) gets DC-ViT's model card
beside the remote code that ``hf_tome.hub`` writes, which rebuilds the slim blocks in plain transformers.
"""

from __future__ import annotations

from hf_tome.dcvit.blocks import CONFIG_KEY, compression_of, rebuild_from_config
from hf_tome.dcvit.model_card import render_model_card
from hf_tome.integration.registry import StructureHook, register_structure_hook

register_structure_hook(StructureHook(config_key=CONFIG_KEY, rebuild=rebuild_from_config, slim_layers=compression_of,
                                      model_card=render_model_card))
