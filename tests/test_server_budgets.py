"""The server's request validation helpers, inference API, guard and options, without starting a server (budget specs:
tests/test_server_budget_specs.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import transformers as T
from conftest import make_model
from hf_tome_server.api import ImageClassificationAPI
from hf_tome_server.app import OptionError, ServerOptions, model_display_name, resolve_device, run_server
from hf_tome_server.decode import to_8bit
from hf_tome_server.errors import sanitize, show
from hf_tome_server.guard import Limits, RequestError, check_image
from hf_tome_server.metrics import ServerMetrics, percentile
from hf_tome_server.pool import Preparer
from PIL import Image
from test_server_fuzz import LEAK, LIMITS, as_json, call, make_guard

import hf_tome
from hf_tome.integration.flops import decaying_r_for_macs
from hf_tome.integration.registry import find_adapter


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

SERVED_BUDGETS = ["full=r:0", "fast=r:6", "pruned=r:3,-1", "soft=macs:0.6,decay=0.8,mode=mlerp,prune=1"]


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
    """Requests as the worker gets them: prepared (validated, decoded, preprocessed) as the guard does."""
    preparer = Preparer(api.processor, list(api.budgets), Limits())
    bodies = [json.dumps({"image": base64.b64encode(_png(seed)).decode(), "budget": budget, "top_k": top_k}).encode()
              for seed, budget in enumerate(budgets)]
    return [api.decode_request(preparer(body, "application/json")) for body in bodies]


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
           "pruned": hf_tome.ToMeConfig(r=3, inflect=-1.0),
           "soft": hf_tome.ToMeConfig(r=decaying_r_for_macs(make_model("vit-cls"), 0.6, 0.8), merge_mode="mlerp",
                                     prune_matched_layers=1),
           }  # what SERVED_BUDGETS mean


def _without_timing(outputs: list[dict]) -> list[dict]:
    return [{key: value for key, value in output.items() if key != "forward_ms"} for output in outputs]


def test_one_batch_mixing_budgets_answers_each_request_as_the_library(model_folder) -> None:
    api = _api(model_folder)
    assert {name: budget.config for name, budget in api.budgets.items()} == CONFIGS
    order = ["fast", "full", "pruned", "soft", "fast", "full", "soft", "fast"]
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
    for one, other in [("full", "fast"), ("full", "pruned"), ("fast", "pruned"), ("full", "soft"), ("fast", "soft")]:
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


# The guard in process (tests/test_server_fuzz.py fuzzes it): its one boundary, the decode pool, time limits.

def _run(coroutine):
    return asyncio.run(coroutine)


def _json_answer(status: int, headers: dict, body: bytes) -> dict:
    assert headers[b"content-type"] == b"application/json"
    return {"status": status, **json.loads(body)}


def test_a_full_decode_pool_answers_503_with_retry_after_and_counts_it() -> None:
    gate = threading.Event()
    metrics = ServerMetrics()
    guard = make_guard(metrics, decode_workers=1, decode_queue=1, inline_pixels=0)  # every image to the pool
    preparer = guard.pool.preparer

    class Gated:
        def encoded(self, body, content_type):
            return gate.wait(10) and preparer.encoded(body, content_type)

    guard.pool.preparer = Gated()

    async def main():
        body = as_json(_png(0))
        waiting = [asyncio.create_task(call(guard, body)) for _ in range(2)]
        while guard.pool.pending < 2:
            await asyncio.sleep(0.01)
        refused = [await call(guard, body) for _ in range(2)]
        gate.set()
        return refused, await asyncio.gather(*waiting)

    refused, served = _run(main())
    for status, headers, body in refused:
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        assert _json_answer(status, headers, body)["error"] == "overloaded"
    assert [status for status, _, _ in served] == [200, 200]
    assert metrics.snapshot()["status_counts"] == {"200": 2, "503": 2} and guard.pool.pending == 0


def test_small_images_are_prepared_on_the_event_loop_and_the_rest_in_the_pool() -> None:
    from hf_tome_server.pool import INLINE_MAX_BODY_BYTES

    def grey_png(width: int, height: int, noise: bool = False) -> bytes:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 255, (height, width), dtype=np.uint8) if noise else np.zeros((height, width), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    guard = make_guard(inline_pixels=256 * 256)
    small, above, noisy = grey_png(256, 256), grey_png(257, 256), grey_png(300, 200, noise=True)
    assert len(base64.b64encode(noisy)) > INLINE_MAX_BODY_BYTES
    inline = []
    for data in (small, above, noisy, b"not an image"):
        before = guard.pool.prepared_inline
        status, _, body = _run(call(guard, as_json(data)))
        inline.append((status, guard.pool.prepared_inline - before))
    # a header that cannot be read is answered at once (the counter counts only images prepared inline)
    assert inline == [(200, 1), (200, 0), (200, 0), (400, 0)]
    assert make_guard(decode_pool="process", decode_workers=1).pool.inline_pixels == 0  # isolation stays whole
    with pytest.raises(ValueError, match="inline_pixels=-1"):
        make_guard(inline_pixels=-1)


def test_a_body_that_stops_arriving_gets_408_after_the_read_timeout() -> None:
    metrics = ServerMetrics()
    guard = make_guard(metrics, read_timeout=0.3)
    chunks = [{"type": "http.request", "body": b'{"image": "iVBO', "more_body": True}]

    async def stalled():
        return chunks.pop(0) if chunks else await asyncio.sleep(3600)

    start = time.perf_counter()
    status, headers, body = _run(call(guard, b"x" * 1000, receive=stalled))
    assert 0.3 <= time.perf_counter() - start < 2.0
    assert _json_answer(status, headers, body)["error"] == "read_timeout" and headers[b"connection"] == b"close"
    assert metrics.snapshot()["errors"] == {"read_timeout": 1}


def test_refusals_before_the_body_is_read() -> None:
    async def unread():
        raise AssertionError("the body was read")

    metrics = ServerMetrics()
    guard = make_guard(metrics)
    status, headers, body = _run(call(guard, b"", method="GET", receive=unread))
    assert (status, headers[b"allow"]) == (405, b"POST")
    assert _json_answer(status, headers, body)["detail"] == "GET is not allowed on /predict: expected POST"
    status, headers, body = _run(call(guard, b"", receive=unread, length=LIMITS.max_body_bytes + 1))
    assert (status, headers[b"connection"]) == (413, b"close")
    assert _json_answer(status, headers, body)["error"] == "payload_too_large"
    assert metrics.snapshot()["status_counts"] == {"405": 1, "413": 1}


def test_the_catch_all_answers_json_counts_and_logs_without_paths(caplog) -> None:
    async def broken(scope, receive, send):
        raise RuntimeError(f"boom in {__file__} at <object at 0x7f3a2b1c9d80>")

    async def litserve_error(scope, receive, send):
        await receive()
        status = 504 if scope["path"] == "/slow" else 500
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b'{"detail": "Internal server error"}'})

    metrics = ServerMetrics()
    body = as_json(_png(0))
    answers = [_json_answer(*_run(call(make_guard(metrics, app=broken), body)))]
    answers.append(_json_answer(*_run(call(make_guard(metrics, app=litserve_error), body))))
    answers.append(_json_answer(*_run(call(make_guard(metrics, app=broken), b"", method="GET", path="/health"))))
    assert [(answer["status"], answer["error"]) for answer in answers] == [(500, "internal_error")] * 3
    assert metrics.snapshot()["status_counts"] == {"500": 2}  # /predict requests; /health is not counted
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "RuntimeError" in logged and not LEAK.search(logged) and not LEAK.search(json.dumps(answers))


@pytest.mark.parametrize("inline_pixels", [0, 256 * 256])  # in a decode thread, and on the event loop
def test_a_preparer_bug_is_a_counted_500_not_an_escape(monkeypatch, inline_pixels: int) -> None:
    import hf_tome_server.pool as pool

    monkeypatch.setattr(pool, "decode_image", lambda data, max_pixels, **_: {}["no such key"])
    metrics = ServerMetrics()
    guard = make_guard(metrics, inline_pixels=inline_pixels)
    answer = _json_answer(*_run(call(guard, as_json(_png(0)))))
    assert (answer["status"], answer["error"]) == (500, "internal_error")
    assert metrics.snapshot()["errors"] == {"internal_error": 1}
    assert guard.pool.prepared_inline == (1 if inline_pixels else 0)


@pytest.mark.parametrize("text,expected", [
    ("cannot identify image file <_io.BytesIO object at 0x7f9c2d3e4f50>", "cannot identify image file <_io.BytesIO "
                                                                          "object>"),
    ("[Errno 2] No such file or directory: '/root/.cache/x/model.safetensors'", "[Errno 2] No such file or "
                                                                                 "directory: '<path>'"),
    ("expected multipart/form-data or application/json", "expected multipart/form-data or application/json"),
    (r"C:\Users\me\model.bin is missing", "<path> is missing"),
    ("the image is 4000x4000000 pixels, id 0x7f3a2b1c9d80", "the image is 4000x4000000 pixels, id"),
    ("x" * 1000, "x" * 297 + "..."),
])
def test_sanitize_removes_paths_and_addresses(text: str, expected: str) -> None:
    assert sanitize(text) == expected


def test_show_never_raises_on_huge_values() -> None:
    assert show(10**5000) == "an integer of 16610 bits" and show("9" * 5000).endswith("(5000 characters)")
    assert (show([1]), show({}), show(b"x"), show(True), show(2.5)) == ("an array", "an object", "b'x'", "True", "2.5")


# High bit depths are scaled by their range, not clipped: 16-bit mid-grey preprocesses as 8-bit mid-grey.

def _grey(mode: str, fmt: str) -> bytes:
    values = {"L": np.uint8(128), "I;16": np.uint16(32896), "F": np.float32(128 / 255)}[mode]
    buffer = io.BytesIO()
    Image.fromarray(np.full((30, 40), values)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt,decoded_mode", [("I;16", "PNG", "I;16"), ("I;16", "TIFF", "I;16"),
                                                   ("I;16", "PPM", "I"), ("F", "TIFF", "F")])
def test_high_bit_depth_mid_grey_preprocesses_like_8_bit_mid_grey(mode: str, fmt: str, decoded_mode: str) -> None:
    data = _grey(mode, fmt)
    assert Image.open(io.BytesIO(data)).mode == decoded_mode
    preparer = Preparer(T.ViTImageProcessor(size={"height": 32, "width": 32}), ["full"], Limits())
    expected = preparer.pixel_values(check_image(_grey("L", "PNG"), Limits()))
    assert check_image(data, Limits()).getpixel((0, 0)) == (128, 128, 128)
    np.testing.assert_array_equal(preparer.pixel_values(check_image(data, Limits())), expected)
    clipped = preparer.pixel_values(Image.open(io.BytesIO(data)).convert("RGB"))  # what Pillow alone gives
    assert abs(float(clipped.mean()) - float(expected.mean())) > 0.9  # near-white, not mid-grey


def _values(image: Image.Image) -> list[int]:
    return np.asarray(image).ravel().tolist()


def test_to_8bit_scales_each_high_bit_depth_mode() -> None:
    ramp = np.array([[0, 257, 32896, 65535]], np.uint16)
    for mode, raw in (("I;16", ramp.astype("<u2").tobytes()), ("I;16B", ramp.astype(">u2").tobytes())):
        assert _values(to_8bit(Image.frombytes(mode, (4, 1), raw))) == [0, 1, 128, 255]
    assert _values(to_8bit(Image.fromarray(np.array([[-5, 0, 5, 15]], np.int32)))) == [0, 64, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    assert _values(to_8bit(Image.fromarray(floats))) == [0, 128, 255, 0]
    assert to_8bit(Image.new("RGB", (2, 2))).mode == "RGB"


# Options: the device, the dtype, torch.compile, and the name /info shows.

def test_device_auto_resolves_to_cpu_and_cuda_without_a_gpu_stops_with_a_message(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(OptionError, match="--device cuda: torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(SystemExit, match="hf-tome serve: --device cuda") as stopped:
        run_server(ServerOptions(device="cuda", model="not-loaded"))
    assert "Traceback" not in str(stopped.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_unknown_queues_stop_with_a_message_before_anything_loads() -> None:
    with pytest.raises(SystemExit, match=r"^hf-tome serve: --queues 'zmq' is invalid: expected one of pipe, litserve$"):
        run_server(ServerOptions(queues="zmq", model="not-loaded"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_serve_with_device_cuda_and_no_gpu_exits_with_a_message_not_a_traceback() -> None:
    finished = subprocess.run([sys.executable, "-m", "hf_tome_server", "--device", "cuda", "--model", "unused"],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1 and "Traceback" not in finished.stderr
    assert "hf-tome serve: --device cuda: torch sees no CUDA device" in finished.stderr


def test_compile_runs_the_forward_through_torch_compile(model_folder, monkeypatch) -> None:
    compiled = []

    def fake_compile(model):
        def forward(**kwargs):
            compiled.append((kwargs["pixel_values"].shape[0], kwargs["tome_plan"]))
            return model(**kwargs)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    api = ImageClassificationAPI(str(model_folder), SERVED_BUDGETS, max_batch_size=4, compile=True)
    api.setup("cpu")
    warmed = [(size, plan) for size, plan in compiled]
    assert warmed == [(size, budget.plan) for budget in api.budgets.values() for size in (1, 4)]
    eager = _api(model_folder)
    order = ["fast", "full", "fast"]
    assert _without_timing(api.predict(_requests(api, order))) == _without_timing(eager.predict(_requests(eager,
                                                                                                          order)))
    assert len(compiled) == len(warmed) + 2  # one compiled forward per budget of the batch


def test_info_names_the_model_never_its_path(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert model_display_name(str(folder)) == "my-model"
    assert model_display_name(str(tmp_path / "gone")) == "gone"
    assert model_display_name("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert model_display_name(None) == "embedded default model (dinov2-small-fashion-mnist-2000)"


def test_the_process_decode_pool_answers_like_the_thread_pool() -> None:
    bodies = [as_json(_png(0)), b"{", as_json(_png(0)[:300]), as_json(_png(0), top_k="²")]

    async def answers(guard):
        try:
            return [(status, json.loads(body).get("error")) for status, _, body in
                    [await call(guard, body) for body in bodies]]
        finally:
            guard.pool.shutdown()

    threads = _run(answers(make_guard(decode_pool="thread")))
    guard = make_guard(decode_pool="process", decode_workers=1)
    guard.pool.start()
    assert _run(answers(guard)) == threads == [(200, None), (400, "bad_json"), (400, "truncated_image"),
                                               (400, "bad_top_k")]


def test_predict_needs_no_thread_for_authorization_unless_an_api_key_is_set(model_folder, monkeypatch) -> None:
    import inspect

    import litserve.server
    from hf_tome_server.app import build_server

    def predict_dependencies() -> list:
        server = build_server(ServerOptions(model=str(model_folder), budgets=["full=r:0"], device="cpu"))
        route = next(route for route in server.app.routes if getattr(route, "path", None) == "/predict")
        return [dependency.call for dependency in route.dependant.dependencies]

    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    calls = predict_dependencies()  # an async no-op: FastAPI awaits it on the event loop, no thread hand-off
    assert len(calls) == 1 and inspect.iscoroutinefunction(calls[0]) and asyncio.run(calls[0]()) is None
    monkeypatch.setenv("LIT_SERVER_API_KEY", "secret")  # as if the server started with it (LitServe reads it once)
    monkeypatch.setattr(litserve.server, "LIT_SERVER_API_KEY", "secret")
    assert predict_dependencies() == [litserve.server.api_key_auth]  # LitServe's own key check stays in charge
