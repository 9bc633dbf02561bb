"""The errors a request can get, and the one place that makes any text safe to send back or log.

Every refusal is a :class:`RequestError` (a 4xx/5xx status, a short ``code`` and a ``message`` naming the field and
the problem); the guard turns it into ``{"error": code, "detail": message}``. Messages built from a library's
exception or from a client's value go through :func:`sanitize` / :func:`show`, so no answer and no log line holds a
file-system path, a memory address (``<... at 0x7f...>``) or an unbounded echo of the client's input.
"""

from __future__ import annotations

import re

MAX_DETAIL = 300  # characters of a detail; longer ones are cut

# "<object at 0x7f...>" and a bare 0x7f3a2b1c9d80, not the "0x" inside "4000x4000000" (an image's size)
_ADDRESS = re.compile(r"\s+at\s+0x[0-9a-fA-F]+|(?<![0-9A-Za-z])0x[0-9a-fA-F]{6,}")
# An absolute POSIX path of two or more parts ("/root/x/y.py", "'/tmp/a'") or a Windows one ("C:\\x\\y"); a slash
# inside a word (multipart/form-data, image/png) is not one.
_POSIX_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s/'\"<>:,;()]+/)+[^\s/'\"<>:,;()]*")
_WINDOWS_PATH = re.compile(r"(?<![\w])[A-Za-z]:\\(?:[^\s\\'\"<>]+\\)*[^\s\\'\"<>]*")


class RequestError(Exception):
    """A request the server refuses: ``status``, a short ``code`` and a message naming the field and the problem.

    ``headers`` are added to the answer (``Retry-After`` of a 503, say); ``close`` asks to close the connection
    after answering (the request's body may be left unread).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        message = sanitize(message)
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.close = dict(headers or {}), close

    def __reduce__(self):  # noqa: ANN204  (a process decode worker sends it back pickled)
        return type(self), (self.status, self.code, self.message, self.headers, self.close)


def sanitize(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` without paths or memory addresses, on one line, at most ``limit`` characters."""
    try:
        text = str(text)
    except Exception:  # noqa: BLE001  (a str subclass or an object whose __str__ fails)
        return "(no description)"
    text = _ADDRESS.sub("", text)
    text = _POSIX_PATH.sub("<path>", text)
    text = _WINDOWS_PATH.sub("<path>", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: object, limit: int = 40) -> str:
    """A short, safe ``repr`` of a client's value for an error message (never raises: a huge ``int``'s repr does)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float | int):
        return repr(value)
    if isinstance(value, str | bytes):
        text = repr(value[: limit + 1])
        return text if len(value) <= limit else f"{text[:-1]}...{text[-1]} ({len(value)} characters)"
    kind = describe(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def describe(value: object) -> str:
    """The JSON name of a value's type: object, array, string, number, boolean, null."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "file"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__
