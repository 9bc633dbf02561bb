"""What every benchmark and job writes beside its numbers: the machine it ran on, and the JSON file itself."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine_info() -> dict[str, str | int]:
    """Platform, processor, torch threads and the torch / transformers versions, for a result file."""
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (non-JSON values as their str), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
