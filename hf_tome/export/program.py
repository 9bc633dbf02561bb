"""A merged model as an exportable function, and its ``torch.export`` program with a dynamic batch axis.

Exporters take a module from tensors to tensors: :class:`ExportModule` calls the patched model (or, for an
encoder-decoder such as Whisper, its merged encoder) on one input and returns the task's outputs as a tuple.
The reduction plan fixes the token count of every layer, so the program has static shapes apart from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_tome.export.specs import ToMeExporterConfig, encoder_only, exporter_config_for, infer_task, task_outputs

DUMMY_BATCH = 2  # the example batch traced; any batch runs afterwards (1 included)


class ExportModule(nn.Module):
    """``model`` as a function of its one input tensor returning a tuple of its ``output_names`` (in order)."""

    def __init__(self, model: nn.Module, input_name: str, output_names: tuple[str, ...], encoder_only: bool = False):
        super().__init__()
        self.model = model.get_encoder() if encoder_only else model
        self.input_name = input_name
        self.output_names = output_names

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(**{self.input_name: inputs})
        return tuple(getattr(output, name) for name in self.output_names)


@dataclass
class Prepared:
    """What an exporter needs: the module, its Optimum export config and an example input."""

    module: ExportModule
    spec: ToMeExporterConfig
    example: torch.Tensor
    task: str


def stock_class(model: nn.Module) -> type:
    """The transformers class a patched model subclasses (hf_tome's classes are named ``ToMe...``)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise ValueError(f"{type(model).__name__} is not a transformers model")


def prepare(model: nn.Module, task: str | None = None, batch_size: int = DUMMY_BATCH) -> Prepared:
    """Wrap the patched ``model`` (eval mode, float32) for export; ``task`` defaults to Optimum's for its class.

    The outputs are the task's (``logits`` for classifiers; ``last_hidden_state`` and ``token_sizes`` otherwise,
    sizes only when the plan merges tokens, as only then does the model return them).
    """
    task = task or infer_task(stock_class(model))
    spec = exporter_config_for(model.config, task, task_outputs(task))
    with torch.random.fork_rng():  # the same example every time, and the caller's random state untouched
        torch.manual_seed(0)
        example = spec.generate_dummy_inputs(framework="pt", batch_size=batch_size)[spec.INPUT_NAME]
    only_encoder = encoder_only(model.config)
    probe = ExportModule(model, spec.INPUT_NAME, tuple(spec.outputs), only_encoder).eval()
    with torch.no_grad():
        returned = probe.model(**{spec.INPUT_NAME: example})
    outputs = tuple(name for name in spec.outputs if getattr(returned, name, None) is not None)
    spec = spec.with_outputs(outputs)
    return Prepared(ExportModule(model, spec.INPUT_NAME, outputs, only_encoder).eval(), spec, example, task)


def batch_dynamic_shapes(prepared: Prepared) -> tuple[dict[int, torch.export.Dim]]:
    """``dynamic_shapes`` for ``torch.export``: the batch axis of the one input, any size from 1."""
    return ({0: torch.export.Dim(prepared.spec.inputs[prepared.spec.INPUT_NAME][0], min=1)},)


def export_program(model: nn.Module, task: str | None = None,
                   batch_size: int = DUMMY_BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` of a patched model (merging on or off): one input, the task's outputs, dynamic batch.

    >>> program = export_program(hf_tome.apply(model, r=8))
    >>> logits, = program.module()(pixel_values)
    """
    prepared = prepare(model, task, batch_size)
    return program_of(prepared)


def program_of(prepared: Prepared) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(prepared.module, (prepared.example,), dynamic_shapes=batch_dynamic_shapes(prepared))
