"""The real LitServe server in a subprocess on 127.0.0.1, serving a tiny local model."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import transformers as T
from conftest import make_model
from PIL import Image

import hf_tome

MAX_BODY = 300_000
MAX_PIXELS = 250_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(folder: Path, max_batch_size: int):
    """Start the server on a free port; yields its URL and ends the whole process group afterwards."""
    port = _free_port()
    command = [sys.executable, "-m", "hf_tome_server", "--model", str(folder), "--budget", "full=r:0", "--budget",
               "fast=r:6", "--port", str(port), "--threads", "1", "--max-batch-size", str(max_batch_size),
               "--batch-timeout", "0.2", "--max-body-bytes", str(MAX_BODY), "--max-pixels", str(MAX_PIXELS)]
    log = open(folder / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # own process group: the workers end with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited: {(folder / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-model")
    make_model("vit-cls").save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    for url in _serve(folder, max_batch_size=8):
        yield url, folder


def test_unbatched_server_answers_and_refuses_bad_input(served) -> None:
    _, folder = served
    for url in _serve(folder, max_batch_size=1):
        image = _png(6)
        response = _predict_json(url, image, budget="fast", top_k=2)
        assert response.status_code == 200, response.text
        assert response.json()["batch_size"] == 1
        assert [entry["label"] for entry in response.json()["labels"]] == _library_top(folder, image, 6, 2)[0]
        assert _predict_json(url, b"not an image").status_code == 400


def _predict_json(url: str, image: bytes, **fields) -> requests.Response:
    return requests.post(f"{url}/predict", json={"image": base64.b64encode(image).decode(), **fields}, timeout=60)


def _library_top(folder: Path, image: bytes, r: int, k: int) -> tuple[list[str], list[float]]:
    model = hf_tome.AutoModelForImageClassification.from_pretrained(folder, tome_r=r).eval()
    processor = T.AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores, classes = model(pixel_values=pixel_values).logits.softmax(-1)[0].topk(k)
    return [model.config.id2label[int(c)] for c in classes], scores.tolist()


@pytest.mark.parametrize("budget,r", [("full", 0), ("fast", 6)])
def test_predictions_equal_the_library(served, budget: str, r: int) -> None:
    url, folder = served
    image = _png(0)
    response = _predict_json(url, image, budget=budget, top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    labels, scores = _library_top(folder, image, r, 3)
    assert [entry["label"] for entry in body["labels"]] == labels
    np.testing.assert_allclose([entry["score"] for entry in body["labels"]], scores, atol=1e-5)
    assert body["budget"]["name"] == budget
    assert body["budget"]["tokens_per_layer"] == hf_tome.compute_report(
        hf_tome.apply(make_model("vit-cls"), r=r)).tokens_in


def test_multipart_upload_gives_the_same_answer(served) -> None:
    url, _ = served
    image = _png(1)
    as_json = _predict_json(url, image, budget="fast").json()
    upload = requests.post(f"{url}/predict", files={"image": ("x.png", image, "image/png")},
                           data={"budget": "fast"}, timeout=60)
    assert upload.status_code == 200, upload.text
    assert upload.json()["labels"] == as_json["labels"]


def test_concurrent_requests_are_batched_per_budget(served) -> None:
    url, folder = served
    images = [_png(seed) for seed in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: _predict_json(url, images[i], budget=("full", "fast")[i % 2], top_k=3),
                                  range(16)))
    assert all(response.status_code == 200 for response in responses)
    assert max(response.json()["batch_size"] for response in responses) > 1
    # a forward pass never mixes budgets: each one's batch holds at most the 8 requests of its budget
    assert all(response.json()["batch_size"] <= 8 for response in responses)
    # batches mixing both budgets still answer every request as the library does with that request's budget
    for i, response in enumerate(responses):
        body = response.json()
        assert body["budget"]["name"] == ("full", "fast")[i % 2]
        labels, scores = _library_top(folder, images[i], (0, 6)[i % 2], 3)
        assert [entry["label"] for entry in body["labels"]] == labels
        np.testing.assert_allclose([entry["score"] for entry in body["labels"]], scores, atol=1e-5)
    metrics = requests.get(f"{url}/metrics", timeout=10).json()
    assert metrics["max_batch_size_seen"] > 1 and metrics["budget_counts"]["fast"] >= 8


def _truncated_png() -> bytes:
    return _png(2)[:200]


def _huge_png() -> bytes:  # 600x600 = 360k pixels over the 250k limit, but a small file
    buffer = io.BytesIO()
    Image.new("RGB", (600, 600), "white").save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "not_an_image": (dict(json={"image": base64.b64encode(b"hello, not a picture").decode()}), 400, "not_an_image"),
    "empty_body": (dict(data=b"", headers={"Content-Type": "application/json"}), 400, "empty_body"),
    "truncated": (dict(json={"image": base64.b64encode(_truncated_png()).decode()}), 400, "truncated_image"),
    "wrong_json": (dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), 400, "bad_json"),
    "json_list": (dict(json=[1, 2]), 400, "bad_json"),
    "missing_image": (dict(json={"budget": "full"}), 400, "missing_image"),
    "bad_base64": (dict(json={"image": "%%%not base64%%%"}), 400, "bad_base64"),
    "unknown_budget": (dict(json={"image": base64.b64encode(_png(3)).decode(), "budget": "tiny"}), 400,
                       "unknown_budget"),
    "bad_top_k": (dict(json={"image": base64.b64encode(_png(3)).decode(), "top_k": 0}), 400, "bad_top_k"),
    "too_big_payload": (dict(data=b"x" * (MAX_BODY + 10), headers={"Content-Type": "application/json"}), 413,
                        "payload_too_large"),
    "too_many_pixels": (dict(json={"image": base64.b64encode(_huge_png()).decode()}), 413, "image_too_large"),
    "empty_upload": (dict(files={"image": ("x.png", b"", "image/png")}), 400, "empty_image"),
    "broken_multipart": (dict(data=b"--xx\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=yy"}),
                         400, "bad_multipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_4xx_and_the_server_keeps_answering(served, case: str) -> None:
    url, _ = served
    kwargs, status, code = BAD_REQUESTS[case]
    response = requests.post(f"{url}/predict", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert response.json()["detail"]
    assert _predict_json(url, _png(4)).status_code == 200


def test_unknown_budget_error_names_the_choices(served) -> None:
    url, _ = served
    response = _predict_json(url, _png(5), budget="tiny")
    assert response.json()["detail"] == "unknown budget 'tiny': expected one of full, fast"


def test_health_metrics_and_budgets_endpoints(served) -> None:
    url, _ = served
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/budgets", timeout=10).json() == {"default": "full",
                                                                 "budgets": ["full=r:0", "fast=r:6"]}
    metrics = requests.get(f"{url}/metrics", timeout=10).json()
    assert metrics["requests"] >= 1 and "p99" in metrics["latency_ms"]
