"""ONNX export of a merged model in Optimum's layout: ``hf-tome export onnx`` and ``optimum-cli export hf-tome``.

The folder holds what Optimum's ONNX Runtime backend reads: ``model.onnx`` (``encoder_model.onnx`` for the merged
Whisper encoder, Optimum's name for the encoder of a speech-to-text model), ``config.json`` (with the ``tome``
settings the graph runs) and the preprocessor config of the source folder. One export serves every batch size;
afterwards onnxruntime's outputs are compared with PyTorch's at batch sizes 1 and 5.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime
import torch
from optimum.utils.save_utils import maybe_save_preprocessors
from torch import nn
from transformers import AutoConfig

from hf_tome.export.options import DEFAULT_ATOL, DEFAULT_OPSET, ExportOptions
from hf_tome.export.program import Prepared, batch_dynamic_shapes, prepare, stock_class
from hf_tome.export.specs import file_name, model_class_for
from hf_tome.integration.loading import load_patched

VALIDATION_BATCHES = (1, 5)


@dataclass
class ExportResult:
    """Where an export went and how far onnxruntime's outputs were from PyTorch's (per batch size and output)."""

    onnx_file: Path
    task: str
    input_name: str
    output_names: tuple[str, ...]
    max_abs_diff: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def worst_diff(self) -> float:
        return max((d for per_batch in self.max_abs_diff.values() for d in per_batch.values()), default=0.0)


def load_model(source: str | Path, task: str | None = None, **tome_overrides) -> nn.Module:
    """A model folder loaded in float32 with hf_tome applied (``tome_r=``/``tome_budget=``, else its saved settings).

    The class is the checkpoint's architecture, or the one Optimum's TasksManager names for ``task``.
    """
    config = AutoConfig.from_pretrained(source)
    model_class = model_class_for(config, task)
    return load_patched(model_class, source, dtype=torch.float32, **tome_overrides).eval()


@contextmanager
def _quiet_exporters():
    """Without the exporters' chatter: tracer warnings on Python ints (the plan's fixed token counts, meant to be
    constants), the note that the TorchScript exporter is the older one, optional torchvision operators."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def _export_dynamo(prepared: Prepared, path: Path, opset: int) -> None:
    with torch.no_grad():
        program = torch.onnx.export(prepared.module, (prepared.example,), dynamo=True, opset_version=opset,
                                    input_names=[prepared.spec.INPUT_NAME], output_names=list(prepared.spec.outputs),
                                    dynamic_shapes=batch_dynamic_shapes(prepared), verbose=False)
    program.save(str(path))  # weights in the file, or beside it once past protobuf's 2 GB


def _export_torchscript(prepared: Prepared, path: Path, opset: int) -> None:
    spec = prepared.spec
    with torch.no_grad():
        torch.onnx.export(prepared.module, (prepared.example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[spec.INPUT_NAME], output_names=list(spec.outputs),
                          dynamic_axes={**spec.inputs, **spec.outputs})
    # This exporter records wrong shapes for a few intermediate values (onnxruntime warns at every run): keep the
    # shapes of the graph's inputs and outputs only, onnxruntime infers the rest.
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def compare_with_onnxruntime(path: Path, prepared: Prepared,
                             batch_sizes: tuple[int, ...] = VALIDATION_BATCHES) -> dict[int, dict[str, float]]:
    """Largest absolute difference of every output between onnxruntime and PyTorch, per batch size (fixed seed)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec, names = prepared.spec, list(prepared.spec.outputs)
    differences = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for batch in batch_sizes:
            inputs = spec.generate_dummy_inputs(framework="pt", batch_size=batch)[spec.INPUT_NAME]
            with torch.no_grad():
                expected = prepared.module(inputs)
            got = session.run(names, {spec.INPUT_NAME: inputs.numpy()})
            differences[batch] = {name: (torch.from_numpy(value) - reference).abs().max().item()
                                  for name, value, reference in zip(names, got, expected, strict=True)}
    return differences


def save_config(model: nn.Module, output: Path) -> None:
    """``config.json`` as the model has it (its ``tome`` settings included), naming the stock architecture.

    An ``auto_map`` to remote PyTorch code (a folder saved for the Hub) is left out: that code is not in the folder,
    the graph is the model."""
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [stock_class(model).__name__]
    if hasattr(config, "auto_map"):
        del config.auto_map
    config.save_pretrained(output)


def export_onnx(model: nn.Module, output: str | Path, *, task: str | None = None, source: str | Path | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "dynamo", validate: bool = True) -> ExportResult:
    """Export a patched ``model`` (any plan: ToMe, prune + merge, DC-ViT blocks) to ONNX in Optimum's layout.

    ``source`` is the folder it was loaded from (its preprocessor config is copied). The batch axis is dynamic;
    ``validate`` compares onnxruntime with PyTorch at batch sizes 1 and 5 (``ExportResult.max_abs_diff``).
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r} is invalid: expected 'dynamo' or 'torchscript'")
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"hf_tome export: the model's parameters are {sorted(map(str, dtypes))}; expected a float32 "
                         "model (call model.float() first)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    prepared = prepare(model.eval(), task)
    path = output / file_name(model.config)
    with _quiet_exporters():
        (_export_dynamo if exporter == "dynamo" else _export_torchscript)(prepared, path, opset)
    save_config(model, output)
    if source is not None:
        maybe_save_preprocessors(source, output)  # what the source has: image processor, feature extractor, ...
    result = ExportResult(path, prepared.task, prepared.spec.INPUT_NAME, tuple(prepared.spec.outputs))
    if validate:
        result.max_abs_diff = compare_with_onnxruntime(path, prepared)
    return result


def run_export(options: ExportOptions) -> int:
    """``hf-tome export``: load, export, check; 1 when onnxruntime and PyTorch differ by more than ``atol``."""
    model = load_model(options.model, options.task, **options.tome_overrides())
    result = export_onnx(model, options.output, task=options.task, source=options.model, opset=options.opset,
                         exporter=options.exporter, validate=options.validate)
    plan = model.config.tome
    print(f"wrote {result.onnx_file} ({result.task}: {result.input_name} -> {', '.join(result.output_names)}; "
          f"tome r={plan.get('r')}, prune_kept={plan.get('prune_kept')}, merge_kept={plan.get('merge_kept')})")
    for batch, differences in result.max_abs_diff.items():
        shown = ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
        print(f"onnxruntime vs PyTorch, batch {batch}: max |difference| {shown}")
    if options.validate and result.worst_diff > options.atol:
        print(f"hf-tome export: onnxruntime differs from PyTorch by {result.worst_diff:.2e} > --atol {options.atol} "
              f"(the files are kept in {options.output})", file=sys.stderr)
        return 1
    return 0


__all__ = ["DEFAULT_ATOL", "ExportResult", "compare_with_onnxruntime", "export_onnx", "load_model", "run_export"]
