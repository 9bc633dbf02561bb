"""Tiny random models of every supported class, built from configs (no Hub access)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=4, num_labels=5)

# (model class, config class, extra config, protected tokens)
IMAGE_MODELS = {
    "vit": (T.ViTModel, T.ViTConfig, {}, 1),
    "vit-cls": (T.ViTForImageClassification, T.ViTConfig, {}, 1),
    "deit": (T.DeiTModel, T.DeiTConfig, {}, 2),
    "deit-cls": (T.DeiTForImageClassification, T.DeiTConfig, {}, 2),
    "deit-teacher": (T.DeiTForImageClassificationWithTeacher, T.DeiTConfig, {}, 2),
    "dinov2": (T.Dinov2Model, T.Dinov2Config, {"mlp_ratio": 2}, 1),
    "dinov2-cls": (T.Dinov2ForImageClassification, T.Dinov2Config, {"mlp_ratio": 2}, 1),
    "dinov2-reg": (T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig,
                   {"mlp_ratio": 2, "num_register_tokens": 3}, 4),
    "dinov2-reg-cls": (T.Dinov2WithRegistersForImageClassification, T.Dinov2WithRegistersConfig,
                       {"mlp_ratio": 2, "num_register_tokens": 3}, 4),
}


def make_model(name: str, attn_implementation: str = "sdpa", **config_overrides) -> torch.nn.Module:
    """A tiny random model of ``name`` in eval mode (deterministic weights)."""
    model_class, config_class, extra, _ = IMAGE_MODELS[name]
    config = config_class(**{**TINY, **extra, **config_overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return model_class(config).eval()


def main_output(output) -> torch.Tensor:
    """The tensor a user reads: logits for heads, last hidden state for base models."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.fixture
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def tokens_seen_by(modules, run) -> list[int]:
    """Token count (dim 1 of the first argument) each of ``modules`` receives, per call, while ``run()`` runs."""
    seen: list[int] = []
    hooks = [module.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
             for module in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def mlp_norms(model) -> list[torch.nn.Module]:
    """The norm before the MLP of every encoder block: it sees the tokens left after the block's reduction."""
    from hf_tome.integration.encoder import encoder_layers

    return [getattr(layer, "layernorm_after", None) or layer.norm2 for layer in encoder_layers(model)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved 6-layer tiny DINOv2 classifier with its image processor (the DC-ViT tests' model)."""
    from transformers import BitImageProcessor

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    model = make_model("dinov2-cls", num_hidden_layers=6)
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder of 12 random 40x40 PNG images (the DC-ViT tests' unlabeled images)."""
    import numpy as np
    from PIL import Image  # here, not at the top: the compat environment has no pillow

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    return folder


def block2_compressed(num_images: int) -> tuple:
    """A tiny 6-block DINOv2 teacher, ``num_images`` random 32 px images, the teacher's output tokens and a student
    copy whose block 2 keeps 20 MLP units: the starting point of the DC-ViT fine-tuning tests."""
    import copy

    from hf_tome.dcvit import blocks
    from hf_tome.dcvit.mimic import output_tokens

    torch.manual_seed(0)
    original = make_model("dinov2-cls", num_hidden_layers=6)
    pixels = torch.randn(num_images, 3, 32, 32)
    teacher = output_tokens(original, pixels)
    student = copy.deepcopy(original)
    blocks.compress_layer(blocks.encoder_layers(student)[2], 20)
    return original, pixels, teacher, student
