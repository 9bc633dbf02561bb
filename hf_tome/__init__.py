"""hf-tome: token merging and token compression for Hugging Face transformers vision/audio/video models.

>>> import hf_tome
>>> model = hf_tome.AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224", tome_r=16)
>>> hf_tome.remove(model)  # back to the exact original behaviour
"""

from . import adapters  # noqa: F401  (registers the model families)
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
