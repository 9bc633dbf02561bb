"""The LitServe API: image classification with hf_tome under named, fixed token budgets.

Requests arrive validated, decoded and preprocessed (see :mod:`hf_tome_server.guard`): each carries its image's
pixels (base64; uint8 after the processor's resize and crop, which the worker rescales and normalises for the
whole batch at once, or finished float32 ``pixel_values`` for processors that cannot be split, see
:mod:`hf_tome_server.pixels`), its budget's name and ``top_k``, so the inference worker only stacks tensors and
runs the model. A batch may mix budgets;
``predict`` splits it into one forward pass per budget, so requests with different budgets never share a
forward pass and every pass has the same token count per layer for all its images. Each pass runs its budget's
reduction plan, built once at start-up, as ``model(..., tome_plan=plan)``: the model is patched once in ``setup``
(with the default budget) and never changed per request. With ``compile=True`` the forward runs through
``torch.compile`` (opt-in: compiling is slow, and each budget and batch size may compile again).
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass

import litserve as ls
import torch
from PIL import Image
from starlette.responses import JSONResponse, Response

import hf_tome

from .budgets import Budget, parse_budgets
from .errors import sanitize
from .pixels import split_normalization

_PIXEL_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


@dataclass
class _Decoded:
    pixels: torch.Tensor | None
    budget: str
    top_k: int
    error: str | None = None


async def _no_authorization() -> None:
    """Every client may call ``/predict`` (unless ``LIT_SERVER_API_KEY`` is set)."""


class ImageClassificationAPI(ls.LitAPI):
    """Serves ``hf_tome.AutoModelForImageClassification`` at ``api_path`` (default ``/predict``)."""

    def __init__(self, model: str, budget_specs: list[str], dtype: str = "float32", max_batch_size: int = 16,
                 batch_timeout: float = 0.01, api_path: str = "/predict", threads: int | None = None,
                 compile: bool = False, keep_freed_memory: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.model_name, self.budget_specs, self.dtype_name, self.threads = model, list(budget_specs), dtype, threads
        self.compile, self.keep_freed_memory = compile, keep_freed_memory
        if not os.environ.get("LIT_SERVER_API_KEY"):  # with a key set, LitServe checks it as usual
            # LitServe's default "no authentication" dependency is a plain function, which FastAPI runs in its thread
            # pool: a thread hand-off per request. LitAPI.authorize is LitServe's hook for this; an async one runs
            # on the event loop.
            self.authorize = _no_authorization

    def setup(self, device: str) -> None:
        from transformers import AutoImageProcessor

        from hf_tome.evaluation.classification import resolve_dtype

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.keep_freed_memory:  # this process only runs forwards: no page faults for their activations
            from hf_tome.core.allocator import keep_freed_memory

            keep_freed_memory()
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        self.model = hf_tome.AutoModelForImageClassification.from_pretrained(self.model_name).eval()
        self.processor = AutoImageProcessor.from_pretrained(self.model_name)
        probe = self.processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
        # the same decision, on the same probe, as the HTTP process's Preparer: uint8 requests are normalised here
        self.normalization = split_normalization(self.processor)
        self.channels = probe.shape[1]  # a grayscale request arrives as one channel (see hf_tome_server.geometry)
        # One plan per budget, built here and only here; predict hands them to the forward.
        self.budgets: dict[str, Budget] = parse_budgets(self.model, self.budget_specs, tuple(probe.shape[-2:]))
        # Patched once, with the default (first) budget as the model's own plan; requests never re-patch it.
        hf_tome.apply(self.model, next(iter(self.budgets.values())).config)
        self.model.to(device=self.device, dtype=self.dtype)
        self.labels = self.model.config.id2label
        self.forward = torch.compile(self.model) if self.compile else self.model
        if self.compile:  # compile now, for each budget at batch 1 and the largest batch, not on the first requests
            for budget in self.budgets.values():
                for size in sorted({1, self.max_batch_size}):
                    with torch.inference_mode():
                        self.forward(pixel_values=probe.expand(size, -1, -1, -1).to(self.device, self.dtype),
                                     tome_plan=budget.plan)

    def decode_request(self, request: dict) -> _Decoded:
        # The guard has validated and preprocessed the request; still never raise here (one raise fails the batch).
        try:
            shape = tuple(int(size) for size in request["shape"])
            dtype = _PIXEL_DTYPES[request.get("dtype", "float32")]
            if dtype == torch.uint8 and self.normalization is None:
                raise ValueError("uint8 pixels, but this worker's processor cannot be split")
            pixels = torch.frombuffer(bytearray(base64.b64decode(request["pixels"])), dtype=dtype)
            if request["budget"] not in self.budgets:
                raise ValueError(f"unknown budget {request['budget']!r}")
            pixels = pixels.reshape(shape)
            grayscale = dtype == torch.uint8 and shape[0] == 1  # stays one channel until normalised (_pixel_batch)
            if shape[0] != self.channels and not grayscale:
                raise ValueError(f"{shape[0]} channels, expected {self.channels}")
            return _Decoded(pixels, request["budget"], int(request["top_k"]))
        except Exception as error:  # noqa: BLE001
            return _Decoded(None, "", 1, error=f"{type(error).__name__}: {sanitize(error, 120)}")

    def batch(self, inputs: list[_Decoded]) -> list[_Decoded]:
        return inputs

    def unbatch(self, outputs: list) -> list:
        return outputs

    def predict(self, batch: list[_Decoded] | _Decoded) -> list[dict | _Decoded] | dict | _Decoded:
        if isinstance(batch, _Decoded):  # max_batch_size=1: LitServe's unbatched loop passes single requests
            return self.predict([batch])[0]
        outputs: list[dict | _Decoded] = list(batch)
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for index, item in enumerate(batch):
            if item.error is None:  # one forward per budget (and per input size, for processors that vary it)
                key = (item.budget, tuple(item.pixels.shape[1:]), item.pixels.dtype)
                groups.setdefault(key, []).append(index)
        for (budget_name, _, pixel_dtype), group in groups.items():
            budget = self.budgets[budget_name]
            start = time.perf_counter()
            with torch.inference_mode():
                pixels, indices = self._pixel_batch(batch, group, pixel_dtype)
                logits = self.forward(pixel_values=pixels.to(self.dtype), tome_plan=budget.plan).logits
                probabilities = logits.float().softmax(-1).cpu()  # on a GPU, waits for the forward to end
            forward_ms = 1000 * (time.perf_counter() - start)
            for row, index in enumerate(indices):
                top_k = min(batch[index].top_k, probabilities.shape[-1])
                scores, classes = probabilities[row].topk(top_k)
                outputs[index] = {
                    "labels": [{"label": self.labels.get(int(c), str(int(c))), "score": float(s)}
                               for s, c in zip(scores, classes, strict=True)],
                    "budget": budget.summary(),
                    "batch_size": len(indices),
                    "forward_ms": round(forward_ms, 2),
                }
        return outputs

    def _pixel_batch(self, batch: list[_Decoded], group: list[int],
                     pixel_dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
        """The group's pixels as one (B, C, H, W) batch on the device, and the requests its rows belong to.

        uint8 pixels are rescaled and normalised here for the whole batch (on the device: a quarter of the copy).
        Grayscale requests (one channel) are normalised before they are repeated: ``(x - mean) / std`` broadcasts
        the one channel against the per-channel mean and std, the same arithmetic per element as on an RGB copy, with
        a third of the reads (the float32 output is written once either way).
        """
        if pixel_dtype != torch.uint8:
            return torch.stack([batch[i].pixels for i in group]).to(self.device), group
        parts, indices = [], []
        for channels in sorted({batch[i].pixels.shape[0] for i in group}):
            members = [i for i in group if batch[i].pixels.shape[0] == channels]
            values = self.normalization.apply(torch.stack([batch[i].pixels for i in members]).to(self.device))
            parts.append(values.expand(-1, self.channels, -1, -1))  # no-op unless nothing normalised it
            indices += members
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), indices

    # No annotations here: LitServe turns them into the FastAPI route's types, and a Union with a Response fails.
    def encode_response(self, output):  # noqa: ANN001, ANN201
        if isinstance(output, _Decoded):  # the guard sent something unusable: a bug, answered without failing the batch
            return JSONResponse(content={"error": "internal_error",
                                         "detail": f"the request could not be run: {output.error}"}, status_code=500)
        # encoded here, once: FastAPI passes a Response through instead of walking the dict with jsonable_encoder
        return Response(content=json.dumps(output).encode(), media_type="application/json")
