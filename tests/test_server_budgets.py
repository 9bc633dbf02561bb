"""Budget specs of the server and the request validation helpers, without starting a server."""

from __future__ import annotations

import io

import pytest
from conftest import make_model
from hf_tome_server.budgets import parse_budgets
from hf_tome_server.guard import Limits, RequestError, check_image
from hf_tome_server.metrics import ServerMetrics, percentile
from PIL import Image

import hf_tome


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
