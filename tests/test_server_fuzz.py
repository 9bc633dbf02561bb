"""Fuzzing the request guard in process: any body, any image bytes -> one JSON answer, never a 5xx, always counted.

The guard (:class:`hf_tome_server.guard.RequestGuard`) runs here with the real parser, decoder, image processor
and decode pool, in front of a stand-in for LitServe that checks the canonical payload it is handed (a
``(3, 32, 32)`` uint8 tensor that normalises to finite values, a served budget, a valid ``top_k``) and answers
200. Seeded, so every run sends the same requests: images of every format Pillow writes (mutated by byte flips,
truncation, splicing, insertion,
repetition and zeroing), random and mutated JSON bodies, and mutated multipart bodies, plus curated pathological
cases with the exact error each must get. tests/test_server.py sends a sample of the same requests to the real
server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import transformers as T
from hf_tome_server.decode import FORMATS
from hf_tome_server.guard import RequestGuard
from hf_tome_server.metrics import ServerMetrics
from hf_tome_server.parse import Limits
from hf_tome_server.pixels import split_normalization
from hf_tome_server.pool import Preparer
from PIL import Image

BUDGETS = ["full", "fast"]
IMAGE_MUTATIONS, JSON_CASES, MULTIPART_CASES = 600, 5000, 4000  # per format; random + mutated; mutated
LIMITS = Limits(max_body_bytes=400_000, max_pixels=250_000)
# what an answer or a log line must not hold: a memory address, a file-system path, a traceback
LEAK = re.compile(r"(?<![0-9A-Za-z])0x[0-9a-fA-F]{4,}|/(?:root|tmp|home|usr|work|proc)\b|site-packages|\.py\b"
                  r"|Traceback")
PROCESSOR = T.ViTImageProcessor(size={"height": 32, "width": 32})
NORMALIZATION = split_normalization(PROCESSOR)
OK_STATUSES = {200, 400, 405, 408, 413, 422}
# Pillow warns about damaged files and huge headers, as it should (the server silences both: its answers say it)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


def make_guard(metrics: ServerMetrics | None = None, app=None, **options) -> RequestGuard:
    preparer = Preparer(PROCESSOR, BUDGETS, LIMITS)
    assert preparer.normalization is not None  # ViT's processor splits: the worker gets uint8
    options = {"decode_workers": 2, "decode_queue": 100_000, "read_timeout": 5.0} | options
    return RequestGuard(app or stand_in, ("/predict",), preparer, metrics or ServerMetrics(), **options)


async def stand_in(scope, receive, send) -> None:
    """LitServe's place: the payload must be canonical and valid; answers like the real API."""
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    payload = json.loads(body)
    assert payload["dtype"] == "uint8"
    pixels = np.frombuffer(base64.b64decode(payload["pixels"]), np.uint8).reshape(payload["shape"])
    pixels = NORMALIZATION.apply(torch.from_numpy(pixels.copy())[None])[0].numpy()
    assert pixels.shape == (3, 32, 32) and np.isfinite(pixels).all() and np.abs(pixels).max() <= 1.0 + 1e-6
    assert payload["budget"] in BUDGETS and 1 <= payload["top_k"] <= LIMITS.max_top_k
    answer = json.dumps({"labels": [], "budget": {"name": payload["budget"]}, "batch_size": 1}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


async def call(guard: RequestGuard, body: bytes, content_type: str | None = "application/json", method: str = "POST",
               path: str = "/predict", receive=None, length: int | None = None) -> tuple[int, dict, bytes]:
    headers = [(b"content-length", str(len(body) if length is None else length).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1")))
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    sent = []

    async def send(message) -> None:
        sent.append(message)

    await guard(scope, receive or replay, send)
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert sum(message["type"] == "http.response.start" for message in sent) == 1
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def check(status: int, headers: dict, body: bytes, case: str = "") -> dict:
    """Never a 5xx; a non-200 answer is JSON with a code and a detail that leaks no path or address."""
    assert status in OK_STATUSES, (case, status, body[:300])
    if status == 200:
        return json.loads(body)
    assert headers[b"content-type"] == b"application/json", case
    answer = json.loads(body)
    assert set(answer) == {"error", "detail"} and answer["error"] and answer["detail"], (case, answer)
    assert not LEAK.search(answer["detail"]), (case, answer)
    return answer


def run_all(guard: RequestGuard, cases: list[tuple[str, bytes, str | None]]) -> list[tuple[int, dict]]:
    async def main():
        results = []
        for name, body, content_type in cases:
            status, headers, answer = await call(guard, body, content_type)
            results.append((status, check(status, headers, answer, name)))
        return results

    return asyncio.run(main())


# Images: every format this Pillow writes, in the modes it takes, plus high bit depths and odd variants.

def _base(seed: int = 0, size: tuple[int, int] = (20, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def image_corpus() -> dict[str, bytes]:
    Image.init()
    base, corpus = _base(), {}
    for fmt in sorted(set(Image.SAVE)):
        for mode in ("RGB", "L", "P", "1"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # Pillow deprecates writing IM
                    data = _save(base.convert(mode), fmt)
            except Exception:  # noqa: BLE001  (a format that takes other modes, or has no save handler)
                continue
            if len(data) < 200_000:  # ICNS writes every icon size: over the body limit
                corpus[fmt] = data
            break
    grey = np.full((20, 24), 32896, np.uint16)
    corpus |= {
        "PNG-16bit": _save(Image.fromarray(grey), "PNG"),
        "TIFF-16bit": _save(Image.fromarray(grey), "TIFF"),
        "PPM-16bit": _save(Image.fromarray(grey), "PPM"),
        "TIFF-float": _save(Image.fromarray(np.linspace(0, 1, 480, dtype=np.float32).reshape(20, 24)), "TIFF"),
        "PNG-RGBA": _save(base.convert("RGBA"), "PNG"),
        "PNG-LA": _save(base.convert("LA"), "PNG"),
        "JPEG-CMYK": _save(base.convert("CMYK"), "JPEG"),
        "JPEG-progressive": _save(base, "JPEG", progressive=True),
        "GIF-animated": _save(base, "GIF", save_all=True, append_images=[_base(1)]),
        "TIFF-pages": _save(base, "TIFF", save_all=True, append_images=[_base(2)]),
        "WEBP-lossless": _save(base, "WEBP", lossless=True),
    }
    return corpus


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-checked) header claims ``width`` x ``height``; its data is one row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 7))
            + chunk(b"IEND", b""))


def mutate(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    """One random damage: flips, truncation, splice with ``other``, insertion, repetition or zeroing."""
    if not data:
        return other[: int(rng.integers(1, 64))]
    data = bytearray(data)
    kind = rng.integers(6)
    at = int(rng.integers(len(data)))
    if kind == 0:
        for position in rng.integers(len(data), size=int(rng.integers(1, 9))):
            data[position] ^= int(rng.integers(1, 256))
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data = data[:at] + other[int(rng.integers(len(other))):]
    elif kind == 3:
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:
        data[at:at] = data[at:at + int(rng.integers(1, 256))] * int(rng.integers(2, 5))
    else:
        data[at:at + int(rng.integers(1, 128))] = bytes(min(127, len(data) - at))
    return bytes(data)


def as_json(image: bytes, **fields) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), **fields}).encode()


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "fuzzbound") -> tuple[bytes, str]:
    """A multipart/form-data body of ``(name, data, filename)`` parts and its Content-Type."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


CORPUS = image_corpus()


def test_the_corpus_covers_every_format_pillow_writes_and_the_supported_ones_decode() -> None:
    assert {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "EPS", "PDF", "XBM"} <= set(CORPUS)
    metrics = ServerMetrics()
    results = run_all(make_guard(metrics), [(name, as_json(data), "application/json") for name, data in CORPUS.items()])
    for (name, _), (status, answer) in zip(CORPUS.items(), results, strict=True):
        if name.split("-")[0] in FORMATS or name == "MPO":  # a one-frame MPO is a JPEG
            assert status == 200, (name, answer)
        else:  # written by Pillow, but not a format the server opens (EPS would run Ghostscript)
            assert answer["error"] == "not_an_image", (name, answer)
    assert metrics.snapshot()["requests"] == len(CORPUS)


def test_mutated_images_of_every_format_never_get_a_5xx() -> None:
    rng = np.random.default_rng(0)
    names, cases = sorted(CORPUS), []
    for name in names:
        for index in range(IMAGE_MUTATIONS):
            other = CORPUS[names[int(rng.integers(len(names)))]]
            data = CORPUS[name]
            for _ in range(1 + index % 3):  # one, two or three damages
                data = mutate(data, rng, other)
            if index % 8 == 7:  # some as multipart uploads
                cases.append((f"{name}#{index}", *multipart([("image", data, "x.bin")])))
            else:
                cases.append((f"{name}#{index}", as_json(data), "application/json"))
    for size in [(0, 10), (100_000, 100_000), (250_001, 1), (2**31 - 1, 2**31 - 1), (1, 250_000)]:
        cases.append((f"png {size}", as_json(png_with_size(*size)), "application/json"))
    metrics = ServerMetrics()
    guard = make_guard(metrics)
    results = run_all(guard, cases)
    codes = {answer.get("error") for status, answer in results if status != 200}
    assert {"truncated_image", "not_an_image", "image_too_large"} <= codes
    assert sum(status == 200 for status, _ in results) > len(cases) // 10  # many damages still decode
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == len(cases) and not any(code.startswith("5") for code in snapshot["status_counts"])
    # small images were prepared on the event loop, the rest in the pool; with every image in the pool, every
    # answer is the same
    assert len(cases) // 2 < guard.pool.prepared_inline < len(cases)
    assert run_all(make_guard(inline_pixels=0), cases) == results


def _random_json(rng: np.random.Generator, depth: int = 0):
    kind = int(rng.integers(9 if depth < 4 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(2))
    if kind == 2:
        return int(rng.integers(-10**6, 10**6)) * int(10 ** int(rng.integers(0, 40)))
    if kind == 3:
        return float(rng.choice([0.5, -1e308, 1e-320, 3.0, float("nan"), float("inf")]))
    if kind in (4, 5):
        return "".join(chr(int(c)) for c in rng.choice([48, 49, 0xB2, 0x0662, 0xD800, 0x1F600, 0x22, 0x5C, 0],
                                                         size=int(rng.integers(0, 6))))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    keys = ["image", "budget", "top_k", "x", ""]
    return {str(rng.choice(keys)): _random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def test_random_and_mutated_json_bodies_never_get_a_5xx() -> None:
    rng = np.random.default_rng(1)
    valid = as_json(CORPUS["PNG"], budget="fast", top_k=3)
    cases = []
    for index in range(JSON_CASES):
        value = _random_json(rng)
        if index % 3 == 0:  # an object with a real image and random other fields
            value = {"image": base64.b64encode(CORPUS["PNG"]).decode(), **(value if isinstance(value, dict) else {})}
        cases.append((f"random {index}", json.dumps(value).encode(), "application/json"))
    for index in range(JSON_CASES):
        cases.append((f"mutated {index}", mutate(valid, rng, b'{}[]:,"\\\x00\xff\xfe'), "application/json"))
    metrics = ServerMetrics()
    results = run_all(make_guard(metrics), cases)
    assert {answer.get("error") for _, answer in results} >= {"bad_json", "missing_image", "bad_base64"}
    assert metrics.snapshot()["requests"] == len(cases)


PNG = CORPUS["PNG"]
PNG64 = base64.b64encode(PNG).decode()
PATHOLOGICAL_JSON = {
    "deep arrays": (b"[" * 200_000 + b"]" * 200_000, "bad_json"),
    "deep objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "bad_json"),
    "many values": (b"[" + b"0," * 100_000 + b"0]", "bad_json"),
    "5000-digit integer": (b'{"image": "", "top_k": ' + b"9" * 5000 + b"}", "bad_json"),
    "huge float": (b'{"image": "' + PNG64.encode() + b'", "top_k": 1e999}', "bad_top_k"),
    "NaN": (b'{"image": "' + PNG64.encode() + b'", "top_k": NaN}', "bad_json"),
    "Infinity": (b'{"top_k": -Infinity}', "bad_json"),
    "invalid UTF-8": (b'{"image": "\xff\xfe\xfd"}', "bad_json"),
    "lone surrogate budget": (b'{"image": "' + PNG64.encode() + b'", "budget": "\\ud800"}', "unknown_budget"),
    "UTF-16 body": (json.dumps({"image": PNG64}).encode("utf-16"), None),
    "BOM": (b"\xef\xbb\xbf" + json.dumps({"image": PNG64}).encode(), None),
    "duplicate key": (b'{"image": "' + PNG64.encode() + b'", "image": "' + PNG64.encode() + b'"}', "duplicate_field"),
    "duplicate top_k": (b'{"image": "' + PNG64.encode() + b'", "top_k": 1, "top_k": 2}', "duplicate_field"),
    "array root": (b"[1, 2]", "bad_json"),
    "string root": (b'"image"', "bad_json"),
    "number root": (b"12", "bad_json"),
    "null root": (b"null", "bad_json"),
    "empty": (b"", "empty_body"),
    "whitespace": (b"  \n ", "bad_json"),
    "NUL bytes": (b"\x00" * 100, "bad_json"),
    "unknown field": (as_json(PNG, extra=1), "unknown_field"),
    "missing image": (b'{"budget": "full"}', "missing_image"),
}
FIELD_VALUES = [  # (field, value, the error it gets; None: accepted)
    ("top_k", "²", "bad_top_k"), ("top_k", "١٢", "bad_top_k"), ("top_k", "1e3", "bad_top_k"),
    ("top_k", 1.0, "bad_top_k"), ("top_k", True, "bad_top_k"), ("top_k", "9" * 5000, "bad_top_k"),
    ("top_k", -1, "bad_top_k"), ("top_k", 101, "bad_top_k"), ("top_k", None, "bad_top_k"), ("top_k", [3], "bad_top_k"),
    ("top_k", " 7 ", None), ("top_k", "100", None), ("top_k", 1, None),
    ("budget", 1, "bad_budget"), ("budget", None, "bad_budget"), ("budget", ["full"], "bad_budget"),
    ("budget", {"name": "full"}, "bad_budget"), ("budget", "FULL", "unknown_budget"),
    ("budget", "x" * 10_000, "unknown_budget"),
    ("image", [1, 2], "bad_image_field"), ("image", {"data": PNG64}, "bad_image_field"),
    ("image", 7, "bad_image_field"),
    ("image", None, "bad_image_field"), ("image", "%%%", "bad_base64"), ("image", PNG64[:-1], "bad_base64"),
    ("image", "aGVsbG8=", "not_an_image"), ("image", "", "empty_image"),
    ("image", "data:image/png;base64," + PNG64, None),
    ("image", base64.b64encode(b"\x00" * 1000).decode(), "not_an_image"),
]


@pytest.mark.parametrize("case", list(PATHOLOGICAL_JSON))
def test_pathological_json_gets_its_error(case: str) -> None:
    body, code = PATHOLOGICAL_JSON[case]
    [(status, answer)] = run_all(make_guard(), [(case, body, "application/json")])
    assert (status, answer.get("error")) == ((200, None) if code is None else (status, code)), answer
    if code == "duplicate_field" and "image" in answer["detail"]:
        assert answer["detail"] == "field 'image' is given 2 times: expected one image per request"


def test_field_values_that_only_look_valid_are_refused_by_name() -> None:
    cases = [(f"{field}={value!r:.40}", json.dumps({"image": PNG64, field: value}).encode(), "application/json")
             for field, value, _ in FIELD_VALUES]
    for (field, value, code), (status, answer) in zip(FIELD_VALUES, run_all(make_guard(), cases), strict=True):
        assert (status == 200) if code is None else (answer["error"] == code), (field, value, answer)
        if code is not None and field != "image":
            assert field in answer["detail"], answer
            assert len(answer["detail"]) < 300, answer


def test_mutated_multipart_bodies_never_get_a_5xx_and_duplicates_are_refused() -> None:
    rng = np.random.default_rng(2)
    valid, content_type = multipart([("image", PNG, "x.png"), ("budget", b"fast", None), ("top_k", b"2", None)])
    cases = [(f"mutated {index}", mutate(valid, rng, b"--fuzzbound\r\n"), content_type)
             for index in range(MULTIPART_CASES)]
    curated = {
        "valid": ((valid, content_type), None),
        "two images": (multipart([("image", PNG, "a.png"), ("image", CORPUS["JPEG"], "b.jpg")]), "duplicate_field"),
        "two budgets": (multipart([("image", PNG, "a.png"), ("budget", b"full", None), ("budget", b"fast", None)]),
                        "duplicate_field"),
        "two top_k": (multipart([("image", PNG, "a.png"), ("top_k", b"1", None), ("top_k", b"1", None)]),
                      "duplicate_field"),
        "image as base64 text": (multipart([("image", PNG64.encode(), None)]), None),
        "budget as a file": (multipart([("image", PNG, "a.png"), ("budget", b"full", "b.txt")]), "bad_budget"),
        "top_k as a file": (multipart([("image", PNG, "a.png"), ("top_k", b"3", "k.txt")]), "bad_top_k"),
        "non-UTF-8 text field": (multipart([("image", PNG, "a.png"), ("budget", b"\xff\xfe", None)]),
                                 "bad_multipart"),
        "no boundary parameter": ((valid, "multipart/form-data"), "bad_multipart"),
        "other boundary": ((valid, "multipart/form-data; boundary=other"), "bad_multipart"),
        "quoted boundary": ((valid, 'multipart/form-data; boundary="fuzzbound"'), None),
        "no closing boundary": ((valid[: valid.rindex(b"--fuzzbound--")], content_type), "bad_multipart"),
        "no name": ((valid.replace(b'; name="image"', b"", 1), content_type), "bad_multipart"),
        "no disposition": ((valid.replace(b"Content-Disposition", b"Content-Dispositiox", 1), content_type),
                           "bad_multipart"),
        "huge part header": ((valid.replace(b'filename="x.png"', b'filename="' + b"x" * 10_000 + b'"', 1),
                              content_type), "bad_multipart"),
        "empty upload": (multipart([("image", b"", "a.png")]), "empty_image"),
        "unknown part": (multipart([("image", PNG, "a.png"), ("file", PNG, "b.png")]), "unknown_field"),
        "json content under a multipart type": ((as_json(PNG), content_type), "bad_multipart"),
        "many parts": (multipart([("image", PNG, "a.png")] + [("budget", b"full", None)] * 5000), "bad_multipart"),
    }
    cases += [(name, *body) for name, (body, _) in curated.items()]
    metrics = ServerMetrics()
    results = run_all(make_guard(metrics), cases)
    for name, (status, answer) in zip(curated, results[-len(curated):], strict=True):
        assert (status == 200) if curated[name][1] is None else (answer["error"] == curated[name][1]), (name, answer)
    assert results[-len(curated) + 1][1]["detail"] == "field 'image' is given 2 times: expected one image per request"
    assert metrics.snapshot()["requests"] == len(cases)
