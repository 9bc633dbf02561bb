"""Validation in front of LitServe: every bad request is answered 4xx here, before it can join a batch.

LitServe parses the body in the HTTP process (invalid JSON there becomes a 500) and fails a whole batch when
one request raises in ``decode_request``. So this ASGI middleware reads the body itself (bounded), checks
everything a request can get wrong, answers 4xx with a JSON error naming the problem, and forwards only
valid requests, rewritten to one canonical JSON form (multipart uploads included). It also times every
request and records status, batch size and budget in :class:`ServerMetrics`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx), a short ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_top_k: int = 100


def check_image(data: bytes, limits: Limits) -> Image.Image:
    """Open and fully decode ``data``; raise :class:`RequestError` for non-images, truncation or huge images."""
    if not data:
        raise RequestError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise RequestError(400, "not_an_image", f"the data is not an image PIL can read: {error}") from None
    width, height = image.size  # read from the header: a decompression bomb is refused before decoding
    if width * height > limits.max_pixels:
        raise RequestError(413, "image_too_large",
                           f"the image is {width}x{height} = {width * height} pixels: expected at most "
                           f"{limits.max_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(400, "truncated_image", f"the image could not be decoded (truncated or corrupt): "
                                                   f"{error}") from None
    return image


def _parse_fields(fields: dict, budgets: list[str], limits: Limits) -> dict:
    unknown = set(fields) - {"image", "budget", "top_k"}
    if unknown:
        raise RequestError(400, "unknown_field", f"unknown field(s) {sorted(unknown)}: expected 'image' and "
                                                 f"optionally 'budget' and 'top_k'")
    if "image" not in fields:
        raise RequestError(400, "missing_image", "no image: expected a JSON field 'image' with base64 data or a "
                                                 "multipart file field 'image'")
    image = fields["image"]
    if isinstance(image, str):
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_base64", "field 'image' is not valid base64") from None
    elif not isinstance(image, bytes):
        raise RequestError(400, "bad_image_field", f"field 'image' is a {type(image).__name__}: expected a "
                                                   f"base64 string")
    check_image(image, limits)
    budget = fields.get("budget", budgets[0])
    if budget not in budgets:
        raise RequestError(400, "unknown_budget", f"unknown budget {budget!r}: expected one of {', '.join(budgets)}")
    top_k = fields.get("top_k", 5)
    if isinstance(top_k, str) and top_k.strip().isdigit():
        top_k = int(top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise RequestError(400, "bad_top_k", f"top_k={top_k!r} is invalid: expected an integer from 1 to "
                                             f"{limits.max_top_k}")
    return {"image": base64.b64encode(image).decode("ascii"), "budget": budget, "top_k": top_k}


async def _form_fields(scope: Scope, body: bytes) -> dict:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form(max_part_size=len(body) + 1)
    except Exception as error:  # starlette raises several types for malformed multipart bodies
        raise RequestError(400, "bad_multipart", f"the multipart body could not be parsed: {error}") from None
    fields = {}
    for key, value in form.multi_items():
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields


async def canonical_request(scope: Scope, body: bytes, budgets: list[str], limits: Limits) -> dict:
    """Validate a request body (JSON or multipart) and return its canonical JSON fields."""
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty: expected JSON or a multipart upload")
    headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        fields = await _form_fields(scope, body)
    else:
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, "bad_json", f"the request body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise RequestError(400, "bad_json", f"the JSON body is a {type(fields).__name__}: expected an object "
                                                f"like {{\"image\": \"<base64>\"}}")
    return _parse_fields(fields, budgets, limits)


class RequestGuard:
    """ASGI middleware: validates requests to ``paths`` and records metrics for them."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...], budgets: list[str], limits: Limits,
                 metrics: ServerMetrics) -> None:
        self.app, self.paths, self.budgets, self.limits, self.metrics = app, paths, budgets, limits, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            body = await self._read_body(scope, receive)
            fields = await canonical_request(scope, body, self.budgets, self.limits)
        except RequestError as error:
            self.metrics.record(error.status, time.perf_counter() - start, error=error.code)
            await self._send_error(send, error)
            return
        await self._forward(scope, send, fields, start)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise RequestError(413, "payload_too_large", f"the body is {int(declared)} bytes: expected at most "
                                                         f"{self.limits.max_body_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client_disconnected", "the client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise RequestError(413, "payload_too_large", f"the body is over {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope: Scope, send: Send, fields: dict, start: float) -> None:
        body = json.dumps(fields).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, response_body = 500, []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                response_body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app({**scope, "headers": headers}, receive, capture)
        finally:
            batch_size = None
            if status == 200:
                try:
                    batch_size = json.loads(b"".join(response_body)).get("batch_size")
                except (ValueError, AttributeError):
                    pass
            self.metrics.record(status, time.perf_counter() - start, batch_size=batch_size, budget=fields["budget"],
                                error=None if status == 200 else f"status_{status}")

    @staticmethod
    async def _send_error(send: Send, error: RequestError) -> None:
        body = json.dumps({"error": error.code, "detail": error.message}).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
