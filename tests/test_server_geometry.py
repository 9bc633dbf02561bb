"""The HTTP process's resize and crop without the processor's round trips: exactly the processor's uint8 output,
grayscale images sent as one channel and answered as if they had been converted to RGB."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import transformers as T
from hf_tome_server.decode import decode_image
from hf_tome_server.geometry import Geometry, fast_geometry
from hf_tome_server.parse import Limits
from hf_tome_server.pool import Preparer
from PIL import Image
from test_server_budgets import _api, _without_timing, model_folder  # noqa: F401  (the fixture)
from test_server_pixels import PROCESSORS

# sizes (width, height) other than the probes': tiny, thin, wide, larger than any crop
SIZES = [(1, 1), (3, 500), (500, 3), (29, 31), (64, 48), (257, 255), (640, 480)]


def _noise(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _processor_uint8(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"][0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_fast_geometry_equals_the_processor_bit_for_bit(name: str) -> None:
    processor = PROCESSORS[name]()
    geometry = fast_geometry(processor)
    assert geometry is not None and geometry.grayscale
    for seed, (width, height) in enumerate(SIZES):
        rgb = _noise("RGB", width, height, seed)
        expected = _processor_uint8(processor, rgb)
        assert np.array_equal(geometry(rgb), expected), (width, height)
        gray = _noise("L", width, height, seed)
        one_channel = geometry(gray)
        assert one_channel.shape == (1, *expected.shape[1:])
        as_rgb = _processor_uint8(processor, gray.convert("RGB"))
        assert np.array_equal(np.broadcast_to(one_channel, expected.shape), as_rgb)


def test_the_settings_are_read_from_the_processor() -> None:
    assert fast_geometry(PROCESSORS["shortest-edge+crop"]()) == Geometry(
        height_width=None, shortest_edge=40, resample=int(Image.Resampling.BICUBIC), crop=(32, 32), grayscale=True)
    assert fast_geometry(PROCESSORS["vit"]()) == Geometry(
        height_width=(32, 32), shortest_edge=None, resample=int(Image.Resampling.BILINEAR), crop=None, grayscale=True)


@pytest.mark.parametrize("processor", [
    T.ConvNextImageProcessorPil(size={"shortest_edge": 32}),  # crop_pct: a resize the fast path does not know
    T.ViTImageProcessorPil(size={"height": 16, "width": 16}, do_pad=True),
    T.BitImageProcessorPil(size={"shortest_edge": 40, "longest_edge": 60}),
])
def test_processors_with_other_steps_run_themselves(processor) -> None:
    assert fast_geometry(processor) is None


def test_grayscale_is_decoded_as_one_channel_only_when_asked() -> None:
    data = _png(_noise("L", 20, 10))
    assert decode_image(data, 10**6).mode == "RGB"
    assert decode_image(data, 10**6, keep_grayscale=True).mode == "L"
    sixteen = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert np.asarray(decode_image(_png(sixteen), 10**6, keep_grayscale=True)).tolist() == [[128] * 4] * 4
    assert decode_image(_png(_noise("RGB", 20, 10)), 10**6, keep_grayscale=True).mode == "RGB"


def test_grayscale_requests_travel_as_one_channel_and_answer_as_rgb(model_folder) -> None:  # noqa: F811
    api = _api(model_folder)
    preparer = Preparer(api.processor, list(api.budgets), Limits())
    assert preparer.geometry is not None and preparer.geometry.grayscale
    bodies = [json.dumps({"image": base64.b64encode(_png(_noise("L", 40 + seed, 30, seed))).decode(),
                          "budget": budget}).encode() for seed, budget in enumerate(["fast", "full", "pruned"])]
    fast = [preparer(body, "application/json") for body in bodies]
    assert [payload["shape"] for payload in fast] == [[1, 32, 32]] * 3
    assert len(base64.b64decode(fast[0]["pixels"])) == 32 * 32  # a third of the RGB bytes
    api_geometry, preparer.geometry = preparer.geometry, None  # the processor's own path: RGB, three channels
    slow = [preparer(body, "application/json") for body in bodies]
    assert [payload["shape"] for payload in slow] == [[3, 32, 32]] * 3
    fast_answers = _without_timing(api.predict([api.decode_request(payload) for payload in fast]))
    slow_answers = _without_timing(api.predict([api.decode_request(payload) for payload in slow]))
    assert fast_answers == slow_answers and all("labels" in answer for answer in fast_answers)
    # a batch mixing one- and three-channel requests of one budget is still one forward pass
    mixed = api.predict([api.decode_request(fast[0]), api.decode_request(slow[0])])
    assert [answer["batch_size"] for answer in mixed] == [2, 2]
    # channels interleaved within one budget: each answer still belongs to its own request
    same_budget = [json.dumps({"image": base64.b64encode(_png(_noise("L", 30, 30, seed))).decode(),
                               "budget": "fast"}).encode() for seed in range(10, 14)]
    gray = [preparer(body, "application/json") for body in same_budget]
    preparer.geometry = api_geometry
    rgb = [preparer(body, "application/json") for body in same_budget]
    interleaved = [rgb[0], gray[1], rgb[2], gray[3]]
    alone = [_without_timing(api.predict([api.decode_request(payload)]))[0] for payload in interleaved]
    together = _without_timing(api.predict([api.decode_request(payload) for payload in interleaved]))
    assert [answer["batch_size"] for answer in api.predict([api.decode_request(p) for p in interleaved])] == [4] * 4
    for joint, single in zip(together, alone, strict=True):  # batch 4 against batch 1: float32 rounding only
        assert [entry["label"] for entry in joint["labels"]] == [entry["label"] for entry in single["labels"]]
        np.testing.assert_allclose([entry["score"] for entry in joint["labels"]],
                                   [entry["score"] for entry in single["labels"]], atol=1e-6)
    assert len({round(answer["labels"][0]["score"], 4) for answer in together}) == 4  # the images are told apart


def test_the_encoded_body_is_the_payload_as_json(model_folder) -> None:  # noqa: F811
    api = _api(model_folder)
    preparer = Preparer(api.processor, list(api.budgets), Limits())
    body = json.dumps({"image": base64.b64encode(_png(_noise("RGB", 33, 21))).decode(), "top_k": 2}).encode()
    budget, encoded = preparer.encoded(body, "application/json")
    assert budget == "full" and json.loads(encoded) == preparer(body, "application/json")
