"""Model-family adapters; importing this package registers every family."""

from . import ast, dinov2, swin, videomae, vit, vivit, whisper  # noqa: F401  (registration side effect)
from .registry import find_adapter, supported_class_names

__all__ = ["find_adapter", "supported_class_names"]
