"""The request guard: the one boundary between clients and LitServe, which answers any input with JSON.

An ASGI middleware in the HTTP process. For ``POST /predict`` it

1. refuses at once (503 + ``Retry-After``) when the decode pool is full, before reading the body;
2. reads the body, bounded in size (413) and in time (408 after ``read_timeout`` seconds: uvicorn has no body
   timeout of its own);
3. parses, validates, decodes and preprocesses it in the decode pool, off the event loop (:mod:`.pool`);
4. forwards only the canonical payload (ready ``pixel_values``) to LitServe, whose answer it buffers and passes
   on; a LitServe error (``{"detail": ...}``) is rewritten to the same ``{"error", "detail"}`` form.

:meth:`RequestGuard._predict` is the boundary: a :class:`RequestError` raised anywhere below becomes its 4xx/5xx
JSON answer, and any other exception a 500 ``internal_error`` JSON answer, logged without paths or addresses;
either way exactly one answer is sent and exactly one request is recorded in :class:`ServerMetrics`. Other paths
pass through, with a catch-all of their own. Connection-level limits (header size, header read timeout) are set
on uvicorn's protocol (:mod:`.protocol`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .decode import decode_image
from .errors import RequestError, sanitize
from .metrics import ServerMetrics
from .options import (
    SERVE_DECODE_POOLS,
    SERVE_DECODE_QUEUE,
    SERVE_DECODE_WORKERS,
    SERVE_INLINE_PIXELS,
    SERVE_READ_TIMEOUT,
)
from .parse import Limits
from .pool import DecodePool, Preparer

__all__ = ["Limits", "RequestError", "RequestGuard", "check_image"]

logger = logging.getLogger("hf_tome_server")


def check_image(data: bytes, limits: Limits):  # noqa: ANN201  (a PIL image)
    """Decode ``data`` as the server does (8-bit RGB); raise :class:`RequestError` for anything it refuses."""
    return decode_image(data, limits.max_pixels)


def error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": sanitize(detail)}).encode()


class RequestGuard:
    """ASGI middleware: validates requests to ``paths`` off the event loop and records metrics for them."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...], preparer: Preparer, metrics: ServerMetrics,
                 decode_workers: int = SERVE_DECODE_WORKERS, decode_queue: int = SERVE_DECODE_QUEUE,
                 decode_pool: str = SERVE_DECODE_POOLS[0], read_timeout: float = SERVE_READ_TIMEOUT,
                 inline_pixels: int = SERVE_INLINE_PIXELS) -> None:
        self.app, self.paths, self.metrics, self.read_timeout = app, paths, metrics, read_timeout
        self.limits = preparer.limits
        self.pool = DecodePool(preparer, decode_workers, decode_queue, decode_pool, inline_pixels=inline_pixels)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan(receive), send)
        elif scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["path"] in self.paths:
            await self._predict(scope, receive, send)
        else:
            await self._pass_through(scope, receive, send)

    def _lifespan(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.to_thread(self.pool.start)  # process workers spawn before the first request
                # What start-up loaded (torch, transformers, the processor: ~470k objects) never becomes garbage;
                # frozen, the collector stops walking it (a full collection over it held the GIL ~0.25 s here).
                gc.collect()
                gc.freeze()
            elif message["type"] == "lifespan.shutdown":
                self.pool.shutdown()
            return message

        return wrapped

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, answer = time.perf_counter(), _Answer(send)
        budget = batch_size = None
        try:
            if scope["method"] != "POST":
                raise RequestError(405, "method_not_allowed", f"{sanitize(scope['method'], 20)} is not allowed on "
                                                              f"{scope['path']}: expected POST",
                                   headers={"allow": "POST"})
            self.pool.check()
            body = await self._read_body(scope, receive)
            budget, payload = await self.pool.prepare(body, _header(scope, b"content-type"))
            batch_size = await self._forward(scope, payload, answer)
            status, code = answer.status, answer.error
        except RequestError as error:
            status, code = error.status, error.code
            await answer.error_response(error.status, error.code, error.message, error.headers, error.close)
        except Exception as error:  # noqa: BLE001  the catch-all: a bug of ours, answered and counted, never raw
            status, code = 500, "internal_error"
            reference = uuid.uuid4().hex[:12]
            logger.error("internal error %s on %s %s: %s: %s", reference, scope["method"], scope["path"],
                         type(error).__name__, sanitize(error))
            await answer.error_response(500, code, f"the server failed on this request (reference {reference})")
        self.metrics.record(status, time.perf_counter() - start, batch_size=batch_size, budget=budget,
                            error=None if status == 200 else code)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        limit = self.limits.max_body_bytes
        if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
            raise RequestError(413, "payload_too_large", f"the body is {int(declared)} bytes: expected at most "
                                                         f"{limit} bytes", close=True)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise RequestError(400, "client_disconnected", "the client disconnected before sending the "
                                                                       "body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, "payload_too_large", f"the body is over {limit} bytes", close=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise RequestError(408, "read_timeout", f"the request body did not arrive within {self.read_timeout:g} s "
                                                    f"({size} bytes came)", close=True) from None

    async def _forward(self, scope: Scope, body: bytes, answer: _Answer) -> int | None:
        """Run LitServe on the canonical JSON payload; send its answer (errors in our form); return the batch size."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length",
                                                                             b"content-encoding")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, response_headers, chunks = 500, [], []

        async def capture(message: Message) -> None:
            nonlocal status, response_headers
            if message["type"] == "http.response.start":
                status, response_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app({**scope, "headers": headers}, receive, capture)
        content = b"".join(chunks)
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        if status == 200 and isinstance(parsed, dict) and "labels" in parsed:
            await answer.send(200, response_headers, content)
            return parsed.get("batch_size")
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and "detail" in parsed and status >= 400:
            await answer.send(status, response_headers, content, error=parsed["error"])
            return None
        detail = parsed.get("detail") if isinstance(parsed, dict) else None
        logger.error("the inference worker answered %s: %s", status, sanitize(str(detail or content[:200])))
        if status < 500:  # LitServe's own refusal (there is none for valid requests), kept with its status
            raise RequestError(status, "refused", str(detail or "the request was refused"))
        code = "timeout" if status == 504 else "internal_error"
        raise RequestError(status if status <= 599 else 500, code,
                           "the model could not answer this request" + (" in time" if status == 504 else ""))

    async def _pass_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = _Answer(send)
        try:
            await self.app(scope, receive, answer.relay)
        except Exception as error:  # noqa: BLE001
            logger.error("internal error on %s %s: %s: %s", scope["method"], scope["path"], type(error).__name__,
                         sanitize(error))
            await answer.error_response(500, "internal_error", "the server failed on this request")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class _Answer:
    """Sends at most one response; remembers its status and error code."""

    def __init__(self, send: Send) -> None:
        self._send, self.started, self.status, self.error = send, False, 500, "internal_error"

    async def relay(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        await self._send(message)

    async def send(self, status: int, headers: list, body: bytes, error: str | None = None) -> None:
        self.status, self.error = status, error
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def error_response(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                             close: bool = False) -> None:
        if self.started:  # too late for another answer: the connection ends with what was sent
            return
        extra = [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in (headers or {}).items()]
        if close:
            extra.append((b"connection", b"close"))
        await self.send(status, [(b"content-type", b"application/json"), *extra], error_body(code, detail), code)

