"""uint8 pixels from the HTTP process, normalised by the worker: exactly the processor's float32 pixel_values."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import transformers as T
from hf_tome_server.parse import Limits
from hf_tome_server.pixels import Normalization, split_normalization
from hf_tome_server.pool import Preparer
from PIL import Image
from test_server_budgets import _api, _png, _without_timing, model_folder  # noqa: F401  (the fixture)

from hf_tome.evaluation.assets.dinov2 import _image_processor as default_model_processor


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(28, 28), (300, 200),
                                                                                            (224, 224), (7, 501)]]


PROCESSORS = {
    "vit": lambda: T.ViTImageProcessorPil(size={"height": 32, "width": 32}),
    "dinov2-default": default_model_processor,
    "shortest-edge+crop": lambda: T.BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32,
                                                                                             "width": 32}),
    "no-normalize": lambda: T.ViTImageProcessorPil(size={"height": 16, "width": 16}, do_normalize=False),
    "scalar-mean": lambda: T.ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=0.3, image_std=0.2),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_uint8_then_normalization_equals_the_processor_bit_for_bit(name: str) -> None:
    processor = PROCESSORS[name]()
    normalization = split_normalization(processor)
    assert normalization is not None
    for image in _images():
        expected = processor(images=image, return_tensors="np")["pixel_values"][0]
        geometric = processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)
        pixels = torch.from_numpy(geometric["pixel_values"])
        assert pixels.dtype == torch.uint8
        applied = normalization.apply(pixels)[0].numpy()
        assert applied.dtype == np.float32 and np.array_equal(applied, expected)


def test_a_batch_is_normalised_per_channel() -> None:
    normalization = Normalization(rescale_factor=0.5, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    pixels = torch.full((2, 3, 2, 2), 10, dtype=torch.uint8)
    applied = normalization.apply(pixels)
    assert applied.dtype == torch.float32 and applied.shape == (2, 3, 2, 2)
    assert applied[:, :, 0, 0].tolist() == [[2.0, 0.75, 0.25]] * 2


class _FloatOnly:
    """A processor that ignores the switches and always returns float32: it cannot be split."""

    def __call__(self, images, return_tensors=None, **kwargs):
        values = np.full((1, 3, 8, 8), 0.25, np.float32)
        return {"pixel_values": torch.from_numpy(values) if return_tensors == "pt" else values}


class _Unswitchable(_FloatOnly):
    """A processor without the do_rescale / do_normalize switches (a TypeError when they are passed)."""

    def __call__(self, images, return_tensors=None, input_data_format=None):
        return super().__call__(images, return_tensors=return_tensors)


@pytest.mark.parametrize("processor", [_FloatOnly(), _Unswitchable()])
def test_processors_that_cannot_be_split_send_float32(processor) -> None:
    assert split_normalization(processor) is None
    preparer = Preparer(processor, ["full"], Limits())
    body = json.dumps({"image": base64.b64encode(_png(0)).decode()}).encode()
    payload = preparer(body, "application/json")
    assert payload["dtype"] == "float32" and payload["shape"] == [3, 8, 8]
    assert len(base64.b64decode(payload["pixels"])) == 3 * 8 * 8 * 4


def test_the_worker_answers_uint8_and_float32_requests_the_same(model_folder) -> None:  # noqa: F811
    api = _api(model_folder)
    assert api.normalization is not None
    preparer = Preparer(api.processor, list(api.budgets), Limits())
    bodies = [json.dumps({"image": base64.b64encode(_png(seed)).decode(), "budget": budget}).encode()
              for seed, budget in enumerate(["fast", "full", "fast", "pruned"])]
    as_uint8 = [preparer(body, "application/json") for body in bodies]
    assert {payload["dtype"] for payload in as_uint8} == {"uint8"}
    assert len(base64.b64decode(as_uint8[0]["pixels"])) == 3 * 32 * 32  # a byte per value, not four
    preparer.normalization = None  # what a processor that cannot be split sends
    as_float32 = [preparer(body, "application/json") for body in bodies]
    assert {payload["dtype"] for payload in as_float32} == {"float32"}
    uint8_answers = _without_timing(api.predict([api.decode_request(payload) for payload in as_uint8]))
    float32_answers = _without_timing(api.predict([api.decode_request(payload) for payload in as_float32]))
    assert uint8_answers == float32_answers


def test_uint8_requests_to_a_worker_that_cannot_split_are_answered_as_errors(model_folder) -> None:  # noqa: F811
    api = _api(model_folder)
    payload = Preparer(api.processor, list(api.budgets), Limits())(
        json.dumps({"image": base64.b64encode(_png(3)).decode()}).encode(), "application/json")
    api.normalization = None
    decoded = api.decode_request(payload)
    assert decoded.pixels is None and "cannot be split" in decoded.error
    assert api.encode_response(api.predict([decoded])[0]).status_code == 500
