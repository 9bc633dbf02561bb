"""Model-family adapters; importing this package registers every family."""

from . import dinov2, vit  # noqa: F401  (registration side effect)
from .registry import find_adapter, supported_class_names

__all__ = ["find_adapter", "supported_class_names"]
