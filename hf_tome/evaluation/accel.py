"""One ``accelerate.Accelerator`` factory for the scripts that run under ``accelerate launch``."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator


def make_accelerator(cpu: bool = False, **kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that also forms a process group on machines without GPUs.

    Several processes without GPUs (``torchrun``, ``accelerate launch --multi_gpu``) only form a gloo group with
    ``cpu=True``; without it every process would silently run the whole job alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu or (launched and not torch.cuda.is_available()), **kwargs)
