"""hf-tome: token merging and token compression for Hugging Face transformers vision/audio/video models.

>>> import hf_tome
>>> model = hf_tome.AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224", tome_r=16)
>>> hf_tome.remove(model)  # back to the exact original behaviour

The public names are imported on first use (PEP 562 ``__getattr__``), so ``import hf_tome`` imports neither
torch nor transformers and ``hf-tome --help`` answers at once. Every supported model family registers on the
first look-up of the adapter registry (see ``hf_tome.integration.registry``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from hf_tome.integration import plain_transformers as _plain_transformers
from hf_tome.integration import registry as _registry

if TYPE_CHECKING:
    from hf_tome.config import ToMeConfig
    from hf_tome.core.allocator import keep_freed_memory
    from hf_tome.core.ops import unmerge
    from hf_tome.core.plan import ReductionPlan
    from hf_tome.integration.encoder import TokenMergeOutput
    from hf_tome.integration.flops import ComputeReport, block_macs, compute_report, decaying_r_for_macs
    from hf_tome.integration.loading import (
        AutoModel,
        AutoModelForAudioClassification,
        AutoModelForImageClassification,
        AutoModelForSpeechSeq2Seq,
        AutoModelForVideoClassification,
    )
    from hf_tome.integration.patch import apply, build_plan, is_patched, remove
    from hf_tome.integration.registry import supported_class_names

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "AutoModelForAudioClassification",
    "AutoModelForImageClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForVideoClassification",
    "ComputeReport",
    "ReductionPlan",
    "ToMeConfig",
    "TokenMergeOutput",
    "apply",
    "block_macs",
    "build_plan",
    "compute_report",
    "decaying_r_for_macs",
    "is_patched",
    "keep_freed_memory",
    "remove",
    "supported_class_names",
    "unmerge",
]

# Public name -> the submodule that defines it (the same imports as the TYPE_CHECKING block above).
_ORIGINS = {
    "AutoModel": "integration.loading",
    "AutoModelForAudioClassification": "integration.loading",
    "AutoModelForImageClassification": "integration.loading",
    "AutoModelForSpeechSeq2Seq": "integration.loading",
    "AutoModelForVideoClassification": "integration.loading",
    "ComputeReport": "integration.flops",
    "ReductionPlan": "core.plan",
    "ToMeConfig": "config",
    "TokenMergeOutput": "integration.encoder",
    "apply": "integration.patch",
    "block_macs": "integration.flops",
    "build_plan": "integration.patch",
    "compute_report": "integration.flops",
    "decaying_r_for_macs": "integration.flops",
    "is_patched": "integration.patch",
    "keep_freed_memory": "core.allocator",
    "remove": "integration.patch",
    "supported_class_names": "integration.registry",
    "unmerge": "core.ops",
}

# transformers.AutoModel*.from_pretrained(..., tome_r=16) raises an error pointing at hf_tome's Auto classes.
_plain_transformers.install()
# What the registry imports on its first look-up: every model family (one module each under hf_tome.adapters),
# DC-ViT's slim blocks, which the loader rebuilds and the plans and MACs account for (a structure hook), and the
# Hub publisher, which saves remote code, auto_map and a model card with every patched model.
# Named here, at the top, because they sit above the registry; importing them now would import transformers.
_registry.set_builtin_plugins(("hf_tome.adapters", "hf_tome.dcvit.hook", "hf_tome.hub.hook"))


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``hf_tome.integration.patch``) on first use."""
    origin = _ORIGINS.get(name)
    if origin is not None:
        value = getattr(importlib.import_module(f"{__name__}.{origin}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
