"""hf-tome's LitServe inference server (installed as ``hf_tome_server``): fixed token budgets keep dynamically
batched requests rectangular.

``build_server``, ``run_server`` and ``ServerOptions`` load on first use, so ``hf_tome_server.options`` (the
command-line options, which ``hf-tome --help`` reads) imports neither litserve nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerOptions, build_server, run_server

__all__ = ["ServerOptions", "build_server", "run_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
