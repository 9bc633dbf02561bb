"""Throughput rows for the audio and video families: AST, VideoMAE-B and ViViT-B at their real sizes.

``benchmarks/throughput.py --families ...`` imports :func:`families`. Weights are random (speed does not depend
on them); the configs are written out by hand from the published checkpoints' sizes, since the Hub is not
reachable here. The r settings were picked with ``hf_tome.compute_report`` (MACs only, no forward pass):

    python benchmarks/families_av.py   # prints tokens and MACs of every setting, builds on the meta device
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T

import hf_tome

Builder = Callable[[], torch.nn.Module]
InputMaker = Callable[[int], torch.Tensor]


def ast_base() -> torch.nn.Module:
    """AST as MIT/ast-finetuned-audioset-10-10-0.4593: 1024 frames x 128 mel bins, 16x16 patches at stride 10.

    12 x 101 = 1212 overlapping patches + class and distillation tokens = 1214 tokens; 527 AudioSet classes.
    """
    config = T.ASTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         patch_size=16, frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128,
                         layer_norm_eps=1e-12, qkv_bias=True, num_labels=527)
    return T.ASTForAudioClassification(config).eval()


def videomae_base() -> torch.nn.Module:
    """VideoMAE-B as MCG-NJU/videomae-base-finetuned-kinetics: 16 frames of 224 px, 2x16x16 tubelets.

    8 x 14 x 14 = 1568 tokens, no class token, mean pooling; 400 Kinetics classes.
    """
    config = T.VideoMAEConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              image_size=224, patch_size=16, num_frames=16, tubelet_size=2, qv_bias=True,
                              use_mean_pooling=True, layer_norm_eps=1e-12, num_labels=400)
    return T.VideoMAEForVideoClassification(config).eval()


def vivit_base() -> torch.nn.Module:
    """ViViT-B as google/vivit-b-16x2-kinetics400: 32 frames of 224 px, 2x16x16 tubelets.

    16 x 14 x 14 = 3136 tubelets + class token = 3137 tokens; 400 Kinetics classes.
    """
    config = T.VivitConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, num_frames=32, tubelet_size=[2, 16, 16], hidden_act="gelu_fast",
                           layer_norm_eps=1e-6, qkv_bias=True, num_labels=400)
    return T.VivitForVideoClassification(config).eval()


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def spectrograms(batch: int) -> torch.Tensor:
    """[batch, 1024 frames, 128 mel bins], what ASTFeatureExtractor produces."""
    return _random(batch, 1024, 128)


def clips(frames: int) -> InputMaker:
    """Function of batch size giving [batch, frames, 3, 224, 224] video clips."""
    return lambda batch: _random(batch, frames, 3, 224, 224)


# Settings: unpatched, about 1.5x and about 2x fewer MACs with a constant r, and about 2x with the decreasing
# schedule (inflect -1: 2r in the first layer down to 0 in the last). MACs ratios from hf_tome.compute_report.
AST_SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r=65": {"r": 65},  # 1.56x fewer MACs
    "r=94": {"r": 94},  # 2.01x
    "r=(70,-1)": {"r": 70, "inflect": -1.0},  # 2.04x
}
# VideoMAE checkpoints are MAE-style (self-supervised pre-training, mean pooling): the spec turns proportional
# attention off for them.
VIDEOMAE_SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r=80": {"r": 80, "prop_attn": False},  # 1.53x
    "r=121": {"r": 121, "prop_attn": False},  # 2.01x
    "r=(90,-1)": {"r": 90, "inflect": -1.0, "prop_attn": False},  # 2.05x
}
VIVIT_SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r=145": {"r": 145},  # 1.51x
    "r=231": {"r": 231},  # 2.01x
    "r=(165,-1)": {"r": 165, "inflect": -1.0},  # 2.00x
}


def families() -> dict[str, tuple[Builder, InputMaker, dict[str, dict | None]]]:
    """Family label -> (model builder, inputs of a batch size, settings name -> ToMeConfig kwargs or None)."""
    return {
        "AST": (ast_base, spectrograms, AST_SETTINGS),
        "VideoMAE-B": (videomae_base, clips(16), VIDEOMAE_SETTINGS),
        "ViViT-B": (vivit_base, clips(32), VIVIT_SETTINGS),
    }


def macs_table() -> dict[str, dict[str, dict]]:
    """Tokens after the last layer and MACs of every setting, per family, without running a forward pass."""
    table: dict[str, dict[str, dict]] = {}
    for family, (build, _, settings) in families().items():
        with torch.device("meta"):  # real architecture, no memory or init cost
            model = build()
        full = hf_tome.compute_report(model).total_macs
        table[family] = {}
        for name, kwargs in settings.items():
            if kwargs is None:
                hf_tome.remove(model)
            else:
                hf_tome.apply(model, hf_tome.ToMeConfig(**kwargs))
            report = hf_tome.compute_report(model)
            table[family][name] = {"tokens_in": report.tokens_in[0], "tokens_out": report.tokens_out[-1],
                                   "gmacs": report.gmacs, "macs_reduction": full / report.total_macs}
    return table


if __name__ == "__main__":
    for family, rows in macs_table().items():
        print(f"\n{family}\n| setting | tokens in -> out | GMACs | MACs reduction |\n|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['tokens_in']} -> {row['tokens_out']} | {row['gmacs']:.1f} | "
                  f"{row['macs_reduction']:.2f}x |")
