"""uvicorn's h11 protocol with the limits a public server needs before a request reaches the guard.

- Header size: a request line + headers over ``max_header_bytes`` is answered 431 (any other malformed HTTP 400)
  as JSON, instead of uvicorn's text/plain 400. h11's ``h11_max_incomplete_event_size`` only limits a header block
  that is still incomplete, so one that arrives whole in a single read is measured here too.
- Header read timeout: a connection whose request headers are not complete ``header_timeout`` seconds after it
  opened (or after its first byte of a next request) is answered 408 and closed, so slow clients cannot hold
  connections (uvicorn only times out idle keep-alive connections). The body's timeout is the guard's.

Both refusals are counted in the server's metrics. httptools (uvicorn's default when installed) has neither limit,
which is why the server runs this protocol: ``server.run(http=guarded_protocol(...))``.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import ServerMetrics
from .options import SERVE_MAX_HEADER_BYTES, SERVE_READ_TIMEOUT


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` answering protocol errors as JSON and timing out slow request headers."""

    header_timeout: float = SERVE_READ_TIMEOUT
    max_header_bytes: int = SERVE_MAX_HEADER_BYTES
    metrics: ServerMetrics | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._received = False
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
            self._unset_keepalive_if_required()
            self._refuse(431, "headers_too_large", f"the request line and headers are over {self.max_header_bytes} "
                                                   f"bytes")
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers are still arriving (or a new one began)
            if self._header_timer is None and data:
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def _headers_too_large(self, data: bytes) -> bool:
        """h11 limits only an *incomplete* header block; one that arrives whole in a read is measured here."""
        window = self.conn.trailing_data[0] + data[: self.max_header_bytes + 4]
        if b"\r\n\r\n" in window[: self.max_header_bytes + 4] or b"\n\n" in window[: self.max_header_bytes + 2]:
            return False
        return len(window) > self.max_header_bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is under way (pipelining): its own cycle ends the connection's turn
        if not self._received and self.cycle is None:  # opened and never used: close without a word
            self.transport.close()
            return
        self._refuse(408, "header_timeout", f"the request headers did not arrive within {self.header_timeout:g} s")

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the request line and headers are over {self.max_header_bytes} "
                                                   f"bytes")
        else:
            self._refuse(400, "bad_http_request", "the request is not valid HTTP/1.1")

    def _refuse(self, status: int, code: str, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.record(status, 0.0, error=code)
        if self.transport.is_closing():
            return
        body = json.dumps({"error": code, "detail": detail}).encode()
        reason = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def guarded_protocol(header_timeout: float, max_header_bytes: int,
                     metrics: ServerMetrics | None = None) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits (uvicorn builds one instance per connection)."""
    return type("ServerH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout,
                                                             "max_header_bytes": max_header_bytes,
                                                             "metrics": metrics})


def uvicorn_settings(header_timeout: float, max_header_bytes: int, metrics: ServerMetrics | None = None,
                     keep_alive: int = 5) -> dict:
    """What ``LitServer.run`` hands on to ``uvicorn.Config``."""
    return {"http": guarded_protocol(header_timeout, max_header_bytes, metrics),
            "h11_max_incomplete_event_size": max_header_bytes, "timeout_keep_alive": keep_alive}
