"""What ``hf-tome export`` (and ``optimum-cli export hf-tome``) can be asked, without importing torch.

    hf-tome export onnx --model PATH [--tome-r 16 | --tome-budget 0.6] OUT/
    optimum-cli export hf-tome onnx --model PATH [--tome-r 16 | --tome-budget 0.6] OUT/
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("onnx",)
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
# float32 noise of large models stays below it; a changed matching (a bug, or a near-tie flipped by rounding) does not
DEFAULT_ATOL = 1e-3


@dataclass(frozen=True)
class ExportOptions:
    """What an export was asked to do (see ``hf-tome export --help``)."""

    model: str
    output: Path
    format: str = "onnx"
    tome_r: int | None = None
    tome_budget: float | None = None
    task: str | None = None
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    validate: bool = True
    atol: float = DEFAULT_ATOL

    def tome_overrides(self) -> dict:
        """``tome_*`` keywords for hf_tome's loaders: the ones given (none: the checkpoint's own settings)."""
        overrides = {}
        if self.tome_r is not None:
            overrides["tome_r"] = self.tome_r
        if self.tome_budget is not None:
            overrides["tome_budget"] = self.tome_budget
        return overrides


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="what to export to: ONNX in Optimum's layout")
    parser.add_argument("output", type=Path, help="folder to write model.onnx (encoder_model.onnx for Whisper), "
                        "config.json and the preprocessor config to")
    parser.add_argument("--model", required=True, help="local folder (or Hub id) of a supported model")
    reduction = parser.add_mutually_exclusive_group()
    reduction.add_argument("--tome-r", type=int, default=None,
                           help="tokens merged per layer (default: the settings saved in the model's config, else 0)")
    reduction.add_argument("--tome-budget", type=float, default=None,
                           help="prune + merge at this FLOPs budget (a fraction <= 1 or GFLOPs) from the budget "
                                "table of the model's config (written by `hf-tome search`)")
    parser.add_argument("--task", default=None,
                        help="Optimum task name (default: inferred from the model's class by Optimum's TasksManager)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                        help="torch.onnx exporter: 'dynamo' (torch.export based) or the older, faster-to-run "
                             "'torchscript' one")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the check of onnxruntime's outputs against PyTorch at batch sizes 1 and 5")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="largest absolute difference allowed by the check")


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(model=args.model, output=args.output, format=args.format, tome_r=args.tome_r,
                         tome_budget=args.tome_budget, task=args.task, opset=args.opset, exporter=args.exporter,
                         validate=not args.no_validate, atol=args.atol)
