"""Throughput rows for Swin-T with token merging inside every attention window.

``benchmarks/throughput.py --families Swin-T`` imports :func:`families`. Weights are random (speed does not
depend on them); the config is microsoft/swin-tiny-patch4-window7-224's sizes written out by hand. Each window
holds 7 x 7 = 49 tokens, so a per-window r is at most 24; r=8 and r=16 merge about a sixth and a third of each
window (24: half of it). Settings with "+mlp" also run the MLP on the merged tokens (``extra["swin_merge_mlp"]``);
"rep-bias" reads the relative position bias at one member per group (``extra["swin_bias"] = "representative"``)
instead of the default logsumexp rule, which costs more on CPU:

    python benchmarks/families_swin.py   # prints tokens and MACs of every setting, builds on the meta device
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T

import hf_tome

Builder = Callable[[], torch.nn.Module]
InputMaker = Callable[[int], torch.Tensor]

_MLP = {"swin_merge_mlp": True}
_REP = {"swin_merge_mlp": True, "swin_bias": "representative"}
SWIN_SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r_w=8": {"r": 8},
    "r_w=8 +mlp": {"r": 8, "extra": _MLP},
    "r_w=16": {"r": 16},
    "r_w=16 rep-bias": {"r": 16, "extra": {"swin_bias": "representative"}},
    "r_w=16 +mlp": {"r": 16, "extra": _MLP},
    "r_w=16 +mlp rep-bias": {"r": 16, "extra": _REP},
    "r_w=24 +mlp rep-bias": {"r": 24, "extra": _REP},
}


def swin_tiny() -> torch.nn.Module:
    """Swin-T: 224 px, patch 4, window 7, embed 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24]; 1000 classes."""
    config = T.SwinConfig(image_size=224, patch_size=4, window_size=7, embed_dim=96, depths=[2, 2, 6, 2],
                          num_heads=[3, 6, 12, 24], mlp_ratio=4.0, num_labels=1000)
    return T.SwinForImageClassification(config).eval()


def images(batch: int) -> torch.Tensor:
    """A batch of random 224 px RGB images."""
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def families() -> dict[str, tuple[Builder, InputMaker, dict[str, dict | None]]]:
    """Family name -> (model builder, batch -> inputs, setting name -> ToMeConfig kwargs or None)."""
    return {"Swin-T": (swin_tiny, images, SWIN_SETTINGS)}


def _print_macs() -> None:
    with torch.device("meta"):
        model = swin_tiny()
    for name, kwargs in SWIN_SETTINGS.items():
        if kwargs is None:
            hf_tome.remove(model)
        else:
            hf_tome.apply(model, hf_tome.ToMeConfig(**kwargs))
        report = hf_tome.compute_report(model)
        print(f"{name:>22}: {report.gmacs:.3f} GMACs, attention tokens per layer {report.tokens_in}")


if __name__ == "__main__":
    _print_macs()
