"""Pixels between the HTTP process and the inference worker: 8-bit when that is exact, float32 otherwise.

The image processor's geometry (resize, crop) runs where the image is decoded, in the HTTP process; its last two
steps, ``rescale`` (x * rescale_factor, in float64, cast to float32) and ``normalize`` ((x - mean) / std, in
float32), are elementwise, so the worker can run them on the whole batch at once. Sending the geometric result as
uint8 moves a quarter of the bytes of float32 ``pixel_values`` (150 KB instead of 600 KB for 224 x 224 RGB) and
saves the per-image normalisation in the HTTP process.

:func:`split_normalization` decides per processor, by trying it: the split is used only when the processor's
uint8 output, normalised by :meth:`Normalization.apply`, equals its own float32 output exactly on a probe image.
Any other processor (no such steps, other arithmetic, other output) sends float32 ``pixel_values`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Normalization:
    """The processor's ``rescale`` then ``normalize`` steps, for a batch of uint8 (B, C, H, W) tensors."""

    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 pixel values, computed as transformers' numpy ``rescale`` and ``normalize`` compute them."""
        if self.rescale_factor is not None:  # transformers upcasts to float64 before scaling, then casts back
            values = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            values = pixels.to(torch.float32)
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (values.dim() - 2)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=values.device).view(shape)
            values = (values - mean) / std
        return values


def _as_tuple(value: Any, channels: int) -> tuple[float, ...]:
    values = np.asarray(value, dtype=np.float32).reshape(-1)
    return tuple(float(v) for v in (np.repeat(values, channels) if values.size == 1 else values))


def _run(processor: Any, image: Any, **overrides: Any) -> np.ndarray:
    batch = processor(images=image, return_tensors="np", input_data_format="channels_last", **overrides)
    return np.asarray(batch["pixel_values"])[0]


def probe_image() -> Any:
    """The image both processes try the split on: random RGB noise of an odd size (so resizing runs)."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))


def split_normalization(processor: Any, probe: Any = None) -> Normalization | None:
    """The processor's rescale/normalize as a :class:`Normalization` if splitting them off is exact, else None."""
    probe = probe_image() if probe is None else probe
    try:
        expected = _run(processor, probe)
        geometric = _run(processor, probe, do_rescale=False, do_normalize=False)
    except Exception:  # noqa: BLE001  a processor without these switches: no split
        return None
    if geometric.dtype != np.uint8 or geometric.shape != expected.shape or geometric.ndim != 3:
        return None
    channels = geometric.shape[0]
    do_rescale, do_normalize = getattr(processor, "do_rescale", False), getattr(processor, "do_normalize", False)
    try:
        normalization = Normalization(
            rescale_factor=float(processor.rescale_factor) if do_rescale else None,
            mean=_as_tuple(processor.image_mean, channels) if do_normalize else None,
            std=_as_tuple(processor.image_std, channels) if do_normalize else None)
        applied = normalization.apply(torch.from_numpy(geometric)[None])[0].numpy()
    except Exception:  # noqa: BLE001  attributes of another shape than the standard processors': no split
        return None
    return normalization if applied.dtype == expected.dtype and np.array_equal(applied, expected) else None
