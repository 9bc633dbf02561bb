"""A request body (JSON or multipart) -> validated :class:`Fields`, or a :class:`RequestError` naming the problem.

Everything here is plain synchronous code that the guard runs in its decode pool, off the event loop. It accepts
any bytes: JSON is parsed strictly (no ``NaN``/``Infinity``, no duplicate keys, at most a few thousand values, so
no parse holds the interpreter for long), multipart is parsed by python-multipart in memory (the body is already
bounded), and every field value is checked for its type and range, so "²", "1e3", ``True`` or a 5000-digit
``top_k`` are refused as such. Each field may appear once: two images (or two budgets) in one request are refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import RequestError, describe, sanitize, show

FIELDS = ("image", "budget", "top_k")
MAX_JSON_VALUES = 1000  # ',', '[' and '{' in a JSON body; a valid one has a handful (base64 has none of them)
MAX_PARTS = 16  # parts of a multipart body; a valid one has at most 3
_TOP_K = re.compile(r"[0-9]{1,6}")  # ASCII digits only: int() would also take "١٢" and str.isdigit() takes "²"
_DATA_URL = re.compile(r"data:[\w.+/-]*(;[\w.+=-]+)*;base64,", re.ASCII)
# python-multipart logs every malformed body it meets; the client's answer already says what was wrong.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_top_k: int = 100


@dataclass(frozen=True)
class Fields:
    """A valid request: the image's bytes (not decoded yet), its budget's name and how many classes to answer."""

    image: bytes
    budget: str
    top_k: int


class JSONObject(dict):
    """A JSON object that remembers its keys in order, repeats included (``dict`` keeps only the last)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> list[tuple[str, object]]:
    """The top-level ``(key, value)`` pairs of a JSON object body, in order."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_JSON_VALUES:
        raise RequestError(400, "bad_json", f"the JSON body holds over {MAX_JSON_VALUES} values: expected one object "
                                            f"with 'image' and optionally 'budget' and 'top_k'")
    try:
        parsed = json.loads(body, object_pairs_hook=JSONObject, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, "bad_json", "the request body is not valid JSON: it is nested too deeply") from None
    except Exception as error:  # noqa: BLE001  (JSONDecodeError, UnicodeDecodeError, the int digit limit ...)
        raise RequestError(400, "bad_json", f"the request body is not valid JSON: {sanitize(error)}") from None
    if not isinstance(parsed, JSONObject):
        raise RequestError(400, "bad_json", f"the JSON body is {describe(parsed)}: expected an object like "
                                            f"{{\"image\": \"<base64>\"}}")
    return parsed.pairs


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, object]]:
    """The ``(name, value)`` pairs of a multipart/form-data body: files as bytes, other fields as text."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise RequestError(400, "bad_multipart", "the multipart Content-Type has no usable boundary parameter")
    pairs: list[tuple[str, object]] = []
    part: dict = {}
    ended = []

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, name=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["name"].lower()] = part["value"]
        part["name"] = part["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].append(data[start:end])

    def on_part_end() -> None:
        if len(pairs) >= MAX_PARTS:
            raise RequestError(400, "bad_multipart", f"the multipart body has over {MAX_PARTS} parts: expected "
                                                     f"'image' and optionally 'budget' and 'top_k'")
        disposition, params = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise RequestError(400, "bad_multipart", "a multipart part has no Content-Disposition: form-data with a "
                                                     "name")
        name = params[b"name"].decode("utf-8", "replace")
        value = b"".join(part["data"])
        if b"filename" not in params:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(400, "bad_multipart", f"multipart field {show(name)} is not UTF-8 text (send "
                                                         f"files with a filename)") from None
        pairs.append((name, value))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_part_data": on_part_data,
                 "on_part_end": on_part_end, "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as error:  # noqa: BLE001  (MultipartParseError and whatever a broken body trips)
        raise RequestError(400, "bad_multipart", f"the multipart body could not be parsed: {sanitize(error)}") from None
    if not ended:
        raise RequestError(400, "bad_multipart", "the multipart body ends before its closing boundary")
    return pairs


def parse_body(body: bytes, content_type: str) -> list[tuple[str, object]]:
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty: expected JSON or a multipart upload")
    if content_type.lower().startswith("multipart/form-data"):
        return parse_multipart(body, content_type)
    return parse_json(body)


def _image_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise RequestError(400, "bad_image_field", f"field 'image' is {describe(value)}: expected a base64 string "
                                                   f"(JSON) or a file (multipart)")
    prefix = _DATA_URL.match(value) if value.startswith("data:") else None  # data:image/png;base64,...
    try:
        return base64.b64decode(value[prefix.end():] if prefix else value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "bad_base64", "field 'image' is not valid base64") from None


def _top_k(value: object, limits: Limits) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _TOP_K.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not 1 <= number <= limits.max_top_k:
        raise RequestError(400, "bad_top_k", f"top_k={show(value)} is invalid: expected an integer from 1 to "
                                             f"{limits.max_top_k}")
    return number


def validate(pairs: list[tuple[str, object]], budgets: list[str], limits: Limits) -> Fields:
    """Check the fields of a parsed body; the image's bytes are not decoded here."""
    names = [name for name, _ in pairs]
    unknown = sorted({name for name in names if name not in FIELDS})
    if unknown:
        raise RequestError(400, "unknown_field", f"unknown field(s) {', '.join(show(name) for name in unknown[:5])}: "
                                                 f"expected 'image' and optionally 'budget' and 'top_k'")
    for name in FIELDS:
        if names.count(name) > 1:
            what = "one image" if name == "image" else f"one {name}"
            raise RequestError(400, "duplicate_field", f"field {name!r} is given {names.count(name)} times: expected "
                                                       f"{what} per request")
    fields = dict(pairs)
    if "image" not in fields:
        raise RequestError(400, "missing_image", "no image: expected a JSON field 'image' with base64 data or a "
                                                 "multipart file field 'image'")
    budget = fields.get("budget", budgets[0])
    if not isinstance(budget, str):
        raise RequestError(400, "bad_budget", f"field 'budget' is {describe(budget)}: expected one of "
                                              f"{', '.join(budgets)}")
    if budget not in budgets:
        raise RequestError(400, "unknown_budget", f"unknown budget {show(budget)}: expected one of "
                                                  f"{', '.join(budgets)}")
    top_k = _top_k(fields.get("top_k", 5), limits)
    return Fields(_image_bytes(fields["image"]), budget, top_k)
