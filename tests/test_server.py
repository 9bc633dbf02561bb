"""The real LitServe server in a subprocess on 127.0.0.1, serving a tiny local model."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import transformers as T
from conftest import make_model
from PIL import Image
from test_server_fuzz import CORPUS, LEAK, as_json, multipart, mutate

import hf_tome

MAX_BODY = 300_000
MAX_PIXELS = 250_000
READ_TIMEOUT = 2.0  # seconds for a request's headers, and again for its body (short: the slow-client tests wait it)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(folder: Path, max_batch_size: int, *options: str, log_name: str = "server.log"):
    """Start the server on a free port; yields its URL and ends the whole process group afterwards."""
    port = _free_port()
    command = [sys.executable, "-m", "hf_tome_server", "--model", str(folder), "--budget", "full=r:0", "--budget",
               "fast=r:6", "--port", str(port), "--threads", "1", "--max-batch-size", str(max_batch_size),
               "--batch-timeout", "0.2", "--max-body-bytes", str(MAX_BODY), "--max-pixels", str(MAX_PIXELS),
               "--device", "cpu", "--read-timeout", str(READ_TIMEOUT), *options]
    log = open(folder / log_name, "w")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # own process group: the workers end with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited: {(folder / log_name).read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy: {(folder / log_name).read_text()[-3000:]}")
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
    for url in _serve(folder, 1, log_name="server-unbatched.log"):
        image = _png(6)
        response = _predict_json(url, image, budget="fast", top_k=2)
        assert response.status_code == 200, response.text
        assert response.json()["batch_size"] == 1
        assert [entry["label"] for entry in response.json()["labels"]] == _library_top(folder, image, 6, 2)[0]
        assert _predict_json(url, b"not an image").status_code == 400


def test_litserve_queues_answer_as_the_pipe_queues(served) -> None:
    url, folder = served
    assert requests.get(f"{url}/info", timeout=10).json()["model"]["queues"] == "pipe"  # the default
    images = [_png(seed) for seed in (7, 8, 9)]
    expected = [_predict_json(url, image, budget="fast", top_k=2).json()["labels"] for image in images]
    for litserve_url in _serve(folder, 8, "--queues", "litserve", log_name="server-litserve-queues.log"):
        assert requests.get(f"{litserve_url}/info", timeout=10).json()["model"]["queues"] == "litserve"
        with ThreadPoolExecutor(3) as pool:  # concurrent, so that they can share a batch
            answers = list(pool.map(partial(_predict_json, litserve_url, budget="fast", top_k=2), images))
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert [answer.json()["labels"] for answer in answers] == expected
        assert _predict_json(litserve_url, b"not an image").status_code == 400


def test_two_workers_answer_as_one(served) -> None:
    url, folder = served
    images = [_png(seed) for seed in range(20, 28)]
    expected = [_predict_json(url, image, budget="fast", top_k=2).json()["labels"] for image in images]
    for workers_url in _serve(folder, 4, "--workers", "2", log_name="server-two-workers.log"):
        assert requests.get(f"{workers_url}/info", timeout=10).json()["model"]["workers"] == 2
        with ThreadPoolExecutor(8) as pool:  # eight at once: batches for both workers
            answers = list(pool.map(partial(_predict_json, workers_url, budget="fast", top_k=2), images))
        assert [answer.status_code for answer in answers] == [200] * 8
        for answer, single in zip(answers, expected, strict=True):  # other batch sizes: float32 rounding only
            assert [entry["label"] for entry in answer.json()["labels"]] == [entry["label"] for entry in single]
            np.testing.assert_allclose([entry["score"] for entry in answer.json()["labels"]],
                                       [entry["score"] for entry in single], atol=1e-5)
        assert {answer.json()["batch_size"] for answer in answers} <= {1, 2, 3, 4}


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


# Hostile clients on the real server: fuzzed bodies, two images, 16-bit images, slow and oversized requests.

def test_a_fuzzed_sample_gets_no_5xx_and_every_request_is_counted(served) -> None:
    url, _ = served
    rng = np.random.default_rng(3)
    names = sorted(CORPUS)
    cases = []
    for index in range(240):
        name = names[index % len(names)]
        data = mutate(CORPUS[name], rng, CORPUS[names[int(rng.integers(len(names)))]])
        cases.append(dict(data=as_json(data, top_k=2), headers={"Content-Type": "application/json"}))
    valid = as_json(CORPUS["PNG"], budget="fast")
    cases += [dict(data=mutate(valid, rng, b'{}[]",:\xff'), headers={"Content-Type": "application/json"})
              for _ in range(80)]
    body, content_type = multipart([("image", CORPUS["PNG"], "x.png"), ("top_k", b"3", None)])
    cases += [dict(data=mutate(body, rng, b"--fuzzbound\r\n"), headers={"Content-Type": content_type})
              for _ in range(80)]
    before = requests.get(f"{url}/metrics", timeout=10).json()["requests"]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda kwargs: requests.post(f"{url}/predict", timeout=60, **kwargs), cases))
    statuses = [response.status_code for response in responses]
    assert max(statuses) < 500, [(r.status_code, r.text[:200]) for r in responses if r.status_code >= 500]
    assert statuses.count(200) > 10 and statuses.count(400) > 10
    for response in responses:
        answer = response.json()
        if response.status_code != 200:
            assert set(answer) == {"error", "detail"} and not LEAK.search(answer["detail"]), answer
    assert requests.get(f"{url}/metrics", timeout=10).json()["requests"] == before + len(cases)


def test_two_images_or_two_budgets_in_one_upload_are_refused(served) -> None:
    url, _ = served
    two_images = [("image", ("a.png", _png(1), "image/png")), ("image", ("b.png", _png(2), "image/png"))]
    response = requests.post(f"{url}/predict", files=two_images, timeout=60)
    assert (response.status_code, response.json()) == (400, {
        "error": "duplicate_field", "detail": "field 'image' is given 2 times: expected one image per request"})
    response = requests.post(f"{url}/predict", files={"image": ("a.png", _png(1), "image/png")},
                             data=[("budget", "full"), ("budget", "fast")], timeout=60)
    assert response.status_code == 400 and response.json()["error"] == "duplicate_field"
    assert "'budget'" in response.json()["detail"]


def _grey_png(dtype, value) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48), value, dtype)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_image_is_classified_like_its_8_bit_twin(served) -> None:
    url, _ = served
    sixteen, eight = _grey_png(np.uint16, 32896), _grey_png(np.uint8, 128)
    assert Image.open(io.BytesIO(sixteen)).mode == "I;16"
    answers = [_predict_json(url, data, top_k=5).json() for data in (sixteen, eight)]
    assert answers[0]["labels"] == answers[1]["labels"]
    white = _predict_json(url, _grey_png(np.uint8, 255), top_k=5).json()  # what clipping gave
    assert white["labels"] != answers[0]["labels"]


def test_info_names_the_model_without_a_path(served) -> None:
    url, folder = served
    info = requests.get(f"{url}/info", timeout=10)
    assert info.json()["model"]["model"] == folder.name and info.json()["model"]["device"] == "cpu"
    assert str(folder.parent) not in info.text and not LEAK.search(info.text)


def _raw(url: str, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` on a raw socket, then wait, sending nothing more; the answer and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after answering
            answer += chunk
        return answer, time.perf_counter() - start


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_oversized_headers_are_refused_at_once(served) -> None:
    url, _ = served
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\n\r\n"
    answer, seconds = _raw(url, request)
    status, body = _status_and_json(answer)
    assert (status, body["error"]) == (431, "headers_too_large") and seconds < 2


MALFORMED_HTTP = {
    "garbage": b"GARBAGE\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",
    "header without colon": b"POST /predict HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "negative length": b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "length not a number": b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    "bad chunk size": b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nab\r\n",
    "NUL in target": b"POST /pre\x00dict HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED_HTTP))
def test_malformed_http_gets_a_json_answer(served, case: str) -> None:
    url, _ = served
    answer, seconds = _raw(url, MALFORMED_HTTP[case])
    status, body = _status_and_json(answer)
    assert 400 <= status < 500 and set(body) == {"error", "detail"} and seconds < READ_TIMEOUT, body


def test_a_chunked_upload_is_served(served) -> None:
    url, folder = served
    payload = as_json(_png(8), budget="fast", top_k=2)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:100], payload[100:]))
    request = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    head, _, body = _raw(url, request)[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert [entry["label"] for entry in json.loads(body)["labels"]] == _library_top(folder, _png(8), 6, 2)[0]


@pytest.mark.parametrize("stop_in", ["headers", "body"])
def test_a_client_that_stops_sending_gets_408_after_the_read_timeout(served, stop_in: str) -> None:
    url, _ = served
    payload = as_json(_png(7))
    request = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    stop = 30 if stop_in == "headers" else len(request) - len(payload) // 2
    answer, seconds = _raw(url, request[:stop])
    status, body = _status_and_json(answer)
    assert status == 408 and body["error"] == ("header_timeout" if stop_in == "headers" else "read_timeout")
    assert READ_TIMEOUT - 0.5 <= seconds < READ_TIMEOUT + 5  # the server's clock starts at its accept
    assert requests.get(f"{url}/health", timeout=5).status_code == 200


def _largest_jpeg(side: int = 4000) -> bytes:
    """A side x side JPEG (16,000,000 pixels: the default --max-pixels) of a few MB."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    pixels = (ramp[None, :, None] + rng.integers(0, 40, (side, side, 1), dtype=np.uint8)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(pixels, 3, axis=2)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


POLLER = """
import http.client, json, sys, time
connection, latencies = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10), []
print("ready", flush=True)
while sys.stdin.readline().strip() == "poll":  # the test writes "poll" until its requests are answered
    start = time.perf_counter()
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b"ok"
    latencies.append(time.perf_counter() - start)
print(json.dumps(latencies), flush=True)
"""


def _health_latencies_while(url: str, send) -> tuple[list[float], list]:
    """/health latencies (polled every 10 ms by a small process of its own, not this torch-laden one) while
    ``send()`` runs, and what ``send`` returned."""
    host, port = url.removeprefix("http://").split(":")
    poller = subprocess.Popen([sys.executable, "-c", POLLER, host, port], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert poller.stdout.readline().strip() == "ready"
    result, done = [], threading.Event()
    sender = threading.Thread(target=lambda: (result.append(send()), done.set()))
    sender.start()
    while not done.is_set():
        poller.stdin.write("poll\n")
        poller.stdin.flush()
        time.sleep(0.01)
    sender.join()
    latencies = json.loads(poller.communicate("stop\n", timeout=30)[0].strip().splitlines()[-1])
    return latencies, result[0]


def test_health_answers_quickly_while_the_largest_images_decode(served) -> None:
    _, folder = served
    body = as_json(_largest_jpeg())  # encoded once: the client threads only send it
    limits = ("--max-pixels", "16000000", "--max-body-bytes", str(10 * 1024 * 1024), "--decode-queue", "0")
    for url in _serve(folder, 8, *limits, log_name="server-large.log"):
        def send(count: int, url: str = url) -> list[requests.Response]:
            with ThreadPoolExecutor(count) as pool:
                return list(pool.map(lambda _: requests.post(f"{url}/predict", data=body, timeout=60,
                                                             headers={"Content-Type": "application/json"}),
                                     range(count)))

        latencies, responses = _health_latencies_while(url, lambda: send(4))  # 4 workers, queue 0: all admitted
        assert [response.status_code for response in responses] == [200] * 4, responses[0].text
        latencies.sort()
        # Decoding runs off the event loop: /health keeps answering in milliseconds (median ~2 ms, 90% within ~15 ms
        # on 2 busy cores). The OS may still hold any process back now and then, so the 100 ms bound is on 95% of
        # the answers, with a ceiling for all (decoding on the loop held every answer for the whole decode).
        assert len(latencies) >= 10 and latencies[int(0.95 * len(latencies))] < 0.1 and latencies[-1] < 1.0, (
            latencies[-10:])
        responses = send(12)  # more than the pool holds: the rest are answered 503 at once
        refused = [response for response in responses if response.status_code == 503]
        assert refused and all(response.status_code in (200, 503) for response in responses)
        assert refused[0].headers["Retry-After"] == "1" and refused[0].json()["error"] == "overloaded"
        metrics = requests.get(f"{url}/metrics", timeout=10).json()
        assert metrics["status_counts"]["503"] == len(refused) and metrics["requests"] == 16
