"""Budget specs of the server and the request validation helpers, without starting a server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import transformers as T
from conftest import make_model
from hf_tome_server.api import ImageClassificationAPI
from hf_tome_server.budgets import parse_budgets
from hf_tome_server.guard import Limits, RequestError, check_image
from hf_tome_server.metrics import ServerMetrics, percentile
from PIL import Image

import hf_tome
from hf_tome.core.schedule import merge_schedule
from hf_tome.integration.registry import find_adapter


def test_budgets_fix_tokens_per_layer_and_macs() -> None:
    model = make_model("vit-cls")
    budgets = parse_budgets(model, ["full=r:0", "fast=r:4", "dec=r:4,-1", "half=macs:0.5"])
    assert list(budgets) == ["full", "fast", "dec", "half"]
    assert not hf_tome.is_patched(model)
    assert budgets["full"].tokens_per_layer == [65, 65, 65, 65]
    assert budgets["fast"].tokens_per_layer == [65, 61, 57, 53]
    assert budgets["dec"].config.inflect == -1.0
    assert budgets["half"].gmacs <= budgets["full"].gmacs / 2
    smaller_r = hf_tome.ToMeConfig(r=budgets["half"].config.r - 1)
    assert hf_tome.compute_report(hf_tome.apply(model, smaller_r)).gmacs > budgets["full"].gmacs / 2


def test_each_budget_carries_its_plan_and_leaves_the_model_as_it_was() -> None:
    model = hf_tome.apply(make_model("vit-cls"), r=3)
    default_plan = find_adapter(model).loop_module(model)._tome_plan
    budgets = parse_budgets(model, ["full=r:0", "fast=r:4", "dec=r:4,-1", "half=macs:0.5"])
    assert hf_tome.is_patched(model) and model.config.tome["r"] == 3  # still patched, with its own settings
    assert find_adapter(model).loop_module(model)._tome_plan is default_plan
    for budget in budgets.values():
        assert budget.plan == hf_tome.build_plan(model, budget.config)
        report = hf_tome.compute_report(model, plan=budget.plan)
        assert budget.tokens_per_layer == report.tokens_in and budget.gmacs == report.gmacs
    assert budgets["fast"].plan.layer_r == (4, 4, 4, 4)
    assert budgets["dec"].plan.layer_r == tuple(merge_schedule(4, 4, -1.0)) and budgets["dec"].plan.layer_r[0] == 8


@pytest.mark.parametrize("spec,message", [
    ("full", r"budget 'full' is invalid: expected 'name=spec'"),
    ("x=r:abc", r"budget spec 'r:abc' is invalid: expected 'r:<int>'"),
    ("x=macs:0", r"budget spec 'macs:0' is invalid"),
    ("x=flops:3", r"budget spec 'flops:3' is invalid"),
    ("x=macs:0.001", r"MACs reduction 1000.0x is out of reach"),
])
def test_bad_budget_specs_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budgets(make_model("vit-cls"), [spec])


def test_duplicate_budget_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"budget name 'a' is given twice"):
        parse_budgets(make_model("vit-cls"), ["a=r:0", "a=r:2"])


def test_check_image_refuses_large_and_truncated_images() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buffer, format="PNG")
    assert check_image(buffer.getvalue(), Limits(max_pixels=60_000)).size == (300, 200)
    with pytest.raises(RequestError, match=r"300x200 = 60000 pixels: expected at most 59999") as raised:
        check_image(buffer.getvalue(), Limits(max_pixels=59_999))
    assert raised.value.status == 413
    with pytest.raises(RequestError, match="truncated or corrupt"):
        check_image(buffer.getvalue()[:-40], Limits())


def test_metrics_snapshot_counts_batches_and_percentiles() -> None:
    metrics = ServerMetrics()
    for size, latency in [(1, 0.1), (4, 0.2), (4, 0.3)]:
        metrics.record(200, latency, batch_size=size, budget="full")
    metrics.record(400, 0.01, error="bad_json")
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == 4 and snapshot["status_counts"] == {"200": 3, "400": 1}
    assert snapshot["batch_size_counts"] == {"1": 1, "4": 2} and snapshot["max_batch_size_seen"] == 4
    assert snapshot["mean_batch_size"] == pytest.approx(3.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and percentile([], 0.5) is None


# The inference API in process (no HTTP): what predict does with a batch.

SERVED_BUDGETS = ["full=r:0", "fast=r:6", "pruned=r:3,-1"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget-model")
    make_model("vit-cls").save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _api(folder) -> ImageClassificationAPI:
    api = ImageClassificationAPI(str(folder), SERVED_BUDGETS, max_batch_size=8)
    api.setup("cpu")
    return api


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _requests(api: ImageClassificationAPI, budgets: list[str], top_k: int = 3) -> list:
    return [api.decode_request({"image": base64.b64encode(_png(seed)).decode(), "budget": budget, "top_k": top_k})
            for seed, budget in enumerate(budgets)]


def _library_top(folder, config: hf_tome.ToMeConfig, image: bytes, k: int) -> tuple[list[str], list[float]]:
    """The top ``k`` of the library run directly: a freshly loaded model patched with ``config``."""
    model = hf_tome.AutoModelForImageClassification.from_pretrained(folder).eval()
    hf_tome.apply(model, config)
    processor = T.AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores, classes = model(pixel_values=pixel_values).logits.softmax(-1)[0].topk(k)
    return [model.config.id2label[int(c)] for c in classes], scores.tolist()


CONFIGS = {"full": hf_tome.ToMeConfig(r=0), "fast": hf_tome.ToMeConfig(r=6),
           "pruned": hf_tome.ToMeConfig(r=3, inflect=-1.0)}  # what SERVED_BUDGETS mean


def _without_timing(outputs: list[dict]) -> list[dict]:
    return [{key: value for key, value in output.items() if key != "forward_ms"} for output in outputs]


def test_one_batch_mixing_budgets_answers_each_request_as_the_library(model_folder) -> None:
    api = _api(model_folder)
    assert {name: budget.config for name, budget in api.budgets.items()} == CONFIGS
    order = ["fast", "full", "pruned", "fast", "full", "fast"]
    outputs = api.predict(_requests(api, order))
    assert [output["budget"]["name"] for output in outputs] == order
    assert [output["batch_size"] for output in outputs] == [order.count(name) for name in order]
    for seed, (budget, output) in enumerate(zip(order, outputs, strict=True)):
        labels, scores = _library_top(model_folder, CONFIGS[budget], _png(seed), 3)
        assert [entry["label"] for entry in output["labels"]] == labels
        np.testing.assert_allclose([entry["score"] for entry in output["labels"]], scores, atol=1e-6)
        assert output["budget"]["tokens_per_layer"] == hf_tome.compute_report(
            make_model("vit-cls"), config=CONFIGS[budget]).tokens_in
    # The same image under each budget on its own: the budgets do differ, and batching with others changed nothing.
    alone = {name: [entry["score"] for entry in api.predict(_requests(api, [name]))[0]["labels"]]
             for name in CONFIGS}
    np.testing.assert_allclose(alone["fast"], [entry["score"] for entry in outputs[0]["labels"]], atol=1e-6)
    for one, other in [("full", "fast"), ("full", "pruned"), ("fast", "pruned")]:
        assert np.abs(np.subtract(alone[one], alone[other])).max() > 1e-5  # well above the 1e-6 tolerance


def test_serving_never_patches_the_model_again(model_folder, monkeypatch) -> None:
    api = _api(model_folder)
    loop = find_adapter(api.model).loop_module(api.model)
    default_plan, tome_settings = loop._tome_plan, dict(api.model.config.tome)
    assert default_plan == api.budgets["full"].plan  # patched once at start-up, with the first budget
    mixed = ["fast", "full", "pruned", "fast"]
    expected = _without_timing(api.predict(_requests(api, mixed)))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was re-patched (or a plan rebuilt) while serving")

    for owner in (hf_tome, hf_tome.integration.patch):
        for name in ("apply", "remove", "build_plan"):
            monkeypatch.setattr(owner, name, refuse)
    for _ in range(3):
        assert _without_timing(api.predict(_requests(api, mixed))) == expected
    single = api.predict(_requests(api, mixed)[2])  # max_batch_size=1: LitServe passes one request, not a list
    assert single["labels"] == expected[2]["labels"]
    assert loop._tome_plan is default_plan
    assert api.model.config.tome == tome_settings
