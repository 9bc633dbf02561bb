"""hf-tome: token merging and token compression for Hugging Face transformers vision/audio/video models.

>>> import hf_tome
>>> model = hf_tome.AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224", tome_r=16)
>>> hf_tome.remove(model)  # back to the exact original behaviour

The public names are imported on first use (PEP 562 ``__getattr__``), so ``import hf_tome`` imports neither
torch nor transformers and ``hf-tome --help`` answers at once. The first use of any of them but ``ToMeConfig``
registers every supported model family.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import plain_transformers as _plain_transformers

if TYPE_CHECKING:
    from .adapters.common import TokenMergeOutput
    from .adapters.registry import supported_class_names
    from .config import ToMeConfig
    from .flops import ComputeReport, block_macs, compute_report
    from .modeling import (
        AutoModel,
        AutoModelForAudioClassification,
        AutoModelForImageClassification,
        AutoModelForSpeechSeq2Seq,
        AutoModelForVideoClassification,
    )
    from .ops import unmerge
    from .patch import apply, is_patched, remove

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "AutoModelForAudioClassification",
    "AutoModelForImageClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForVideoClassification",
    "ComputeReport",
    "ToMeConfig",
    "TokenMergeOutput",
    "apply",
    "block_macs",
    "compute_report",
    "is_patched",
    "remove",
    "supported_class_names",
    "unmerge",
]

# Public name -> the submodule that defines it (the same imports as the TYPE_CHECKING block above).
_ORIGINS = {
    "AutoModel": "modeling",
    "AutoModelForAudioClassification": "modeling",
    "AutoModelForImageClassification": "modeling",
    "AutoModelForSpeechSeq2Seq": "modeling",
    "AutoModelForVideoClassification": "modeling",
    "ComputeReport": "flops",
    "ToMeConfig": "config",
    "TokenMergeOutput": "adapters.common",
    "apply": "patch",
    "block_macs": "flops",
    "compute_report": "flops",
    "is_patched": "patch",
    "remove": "patch",
    "supported_class_names": "adapters.registry",
    "unmerge": "ops",
}

# transformers.AutoModel*.from_pretrained(..., tome_r=16) raises an error pointing at hf_tome's Auto classes.
_plain_transformers.install()


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``hf_tome.patch``) on first use."""
    origin = _ORIGINS.get(name)
    if origin is not None:
        if origin != "config":
            # registers every model family, as the eager ``import hf_tome`` did before any name was used
            importlib.import_module(f"{__name__}.adapters")
        value = getattr(importlib.import_module(f"{__name__}.{origin}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
