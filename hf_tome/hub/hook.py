"""Registers :mod:`hf_tome.hub` as the publisher of hf_tome models: ``save_pretrained`` of a patched model writes the
remote code, ``auto_map`` and the model card, and ``push_to_hub`` uploads them with the model.

A built-in plugin of the adapter registry (imported on its first look-up, like the model families), so the
integration layer saves through the hub without importing it. It also makes the stock classes the remote code
serves ignore the marker tensor a shared model carries (``hf_tome.hub.remote.MARKER_KEY``): hf_tome's loaders load
them, and only plain transformers should report it.
"""

from __future__ import annotations

from hf_tome.hub.publish import push_to_hub, save_extras
from hf_tome.hub.remote import REMOTE_CLASSES, ignore_marker
from hf_tome.integration.registry import Publisher, register_publisher

ignore_marker(REMOTE_CLASSES)

PUBLISHER = register_publisher(Publisher(name="hf_tome.hub", save_extras=save_extras, push_to_hub=push_to_hub))
