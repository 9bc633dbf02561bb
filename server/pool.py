"""Parsing, decoding and preprocessing off the event loop, in a bounded pool.

:class:`Preparer` turns a request body into the canonical payload the inference worker runs: it parses and
validates the fields (:mod:`.parse`), decodes the image (:mod:`.decode`) and runs the model's image processor, so
the worker gets ready pixels (base64: uint8 for the worker to rescale and normalise in one batched step where that
is exact, see :mod:`.pixels`, else float32 ``pixel_values``) and never touches client bytes. :class:`DecodePool` runs
it in ``workers`` threads (or processes) and admits at most ``queue`` requests beyond those being decoded; past
that it answers 503 with ``Retry-After`` at once instead of queueing without bound.

Threads are the default: Pillow, numpy and the processor's resize release the GIL for their heavy loops, and JSON
bodies are capped to a few values, so the event loop keeps answering (``/health`` within 100 ms while maximum-size
images decode, see tests/test_server.py). ``kind="process"`` isolates decoding in spawned processes instead.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import multiprocessing
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from .decode import decode_image, open_image
from .errors import RequestError, sanitize
from .geometry import Geometry, fast_geometry
from .options import SERVE_DECODE_QUEUE, SERVE_DECODE_WORKERS, SERVE_INLINE_PIXELS
from .parse import Fields, Limits, parse_body, validate
from .pixels import split_normalization


class Preparer:
    """Picklable: ``preparer(body, content_type)`` -> ``{"pixels", "shape", "dtype", "budget", "top_k"}``.

    ``dtype`` is ``"uint8"`` when the processor's rescale and normalize steps can be left to the worker exactly
    (:func:`~hf_tome_server.pixels.split_normalization`), else ``"float32"`` (finished ``pixel_values``).
    """

    def __init__(self, processor: Any, budgets: list[str], limits: Limits) -> None:
        self.processor, self.budgets, self.limits = processor, list(budgets), limits
        self.normalization = split_normalization(processor)
        # resize and crop without the processor's round trips, where that is exact (uint8 path only)
        self.geometry = fast_geometry(processor) if self.normalization is not None else None

    def __call__(self, body: bytes, content_type: str) -> dict:
        return self.prepared(self.fields(body, content_type))

    def fields(self, body: bytes, content_type: str) -> Fields:
        """The request's fields, parsed and validated (the image is not decoded yet)."""
        return validate(parse_body(body, content_type), self.budgets, self.limits)

    def prepared(self, fields: Fields, opened: Image.Image | None = None) -> dict:
        """The payload of valid fields: the image decoded (``opened``: its header already read) and preprocessed."""
        geometry = self.fast_geometry
        image = decode_image(fields.image if opened is None else opened, self.limits.max_pixels,
                             keep_grayscale=geometry is not None and geometry.grayscale)
        pixels = self.pixel_values(image)
        return {"pixels": base64.b64encode(pixels.tobytes()).decode("ascii"), "shape": list(pixels.shape),
                "dtype": str(pixels.dtype), "budget": fields.budget, "top_k": fields.top_k}

    def encoded(self, body: bytes, content_type: str) -> tuple[str, bytes]:
        """The budget's name and the payload as a JSON body (encoded here too, not on the event loop)."""
        return self.encoded_fields(self.fields(body, content_type))

    def encoded_fields(self, fields: Fields, opened: Image.Image | None = None) -> tuple[str, bytes]:
        """:meth:`encoded` for fields already parsed (and the image's header, if read: see :meth:`prepared`)."""
        payload = self.prepared(fields, opened)
        pixels = payload.pop("pixels")  # base64 needs no JSON escaping: spliced in, not scanned by json.dumps
        return payload["budget"], b'{"pixels": "' + pixels.encode("ascii") + b'", ' + json.dumps(payload)[1:].encode()

    @property
    def fast_geometry(self) -> Geometry | None:
        """The processor's resize and crop without its round trips, if exact here (only for uint8 requests)."""
        return self.geometry if self.normalization is not None else None

    def pixel_values(self, image: Any) -> Any:
        """One image as a C-contiguous (C, H, W) numpy array: the processor's float32 ``pixel_values``, or its
        uint8 geometric output when the worker normalises (``self.normalization``); one channel for a grayscale
        image when ``self.geometry`` may send it so (the worker repeats it)."""
        try:
            if self.fast_geometry is not None:
                return self.fast_geometry(image)
            if self.normalization is not None:
                batch = self.processor(images=image, return_tensors="np", input_data_format="channels_last",
                                       do_rescale=False, do_normalize=False)
                return np.ascontiguousarray(batch["pixel_values"][0], dtype=np.uint8)
            batch = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")
            return batch["pixel_values"][0].float().contiguous().numpy()
        except MemoryError:
            raise RequestError(413, "image_too_large", "the image is too large to preprocess") from None
        except Exception as error:  # noqa: BLE001  (a shape the processor cannot resize, say)
            raise RequestError(422, "unprocessable_image", f"the image could not be preprocessed: "
                                                           f"{type(error).__name__}: {sanitize(error, 160)}") from None


_PREPARER: Preparer | None = None
WORKER_NICENESS = 10  # decode workers yield the CPU to the event loop (and to inference) when cores are short


def _lower_priority() -> None:
    """Run this thread (Linux: a thread is scheduled like a process) or process at a lower priority, if allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (AttributeError, OSError):  # no setpriority (Windows), or not allowed: run at normal priority
        pass


def _install(preparer: Preparer) -> None:  # a process worker's initializer
    global _PREPARER
    _PREPARER = preparer
    _lower_priority()


def _prepare_in_process(body: bytes, content_type: str) -> tuple[str, bytes]:
    return _PREPARER.encoded(body, content_type)


def _ready() -> bool:
    return True


INLINE_MAX_BODY_BYTES = 64 * 1024  # bodies this small parse in well under a millisecond


class DecodePool:
    """``workers`` threads or processes running a :class:`Preparer`, at most ``workers + queue`` requests at once.

    With a thread pool, an image of at most ``inline_pixels`` pixels (from its header) in a body of at most
    :data:`INLINE_MAX_BODY_BYTES` is prepared on the event loop instead: handing it to a thread and back costs more
    CPU than the work, which these bounds keep to about a millisecond (1.5 ms at most measured, 128 x 128 WebP).
    """

    def __init__(self, preparer: Preparer, workers: int = SERVE_DECODE_WORKERS, queue: int = SERVE_DECODE_QUEUE,
                 kind: str = "thread", inline_pixels: int = SERVE_INLINE_PIXELS) -> None:
        if workers < 1 or queue < 0 or inline_pixels < 0:
            raise ValueError(f"decode workers={workers}, queue={queue} and inline_pixels={inline_pixels} are "
                             f"invalid: expected >= 1, >= 0 and >= 0")
        self.preparer, self.workers, self.queue, self.kind = preparer, workers, queue, kind
        self.inline_pixels = inline_pixels if kind == "thread" else 0  # a process pool is there to isolate decoding
        self.capacity, self.pending, self.prepared_inline = workers + queue, 0, 0
        self._executor: concurrent.futures.Executor | None = None

    def _started(self) -> concurrent.futures.Executor:
        if self._executor is None:
            if self.kind == "process":
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_install,
                    initargs=(self.preparer,))
            elif self.kind == "thread":
                self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, "hf-tome-decode",
                                                                       initializer=_lower_priority)
            else:
                raise ValueError(f"decode pool kind={self.kind!r} is invalid: expected 'thread' or 'process'")
        return self._executor

    def start(self) -> None:
        """Start the workers now (processes take seconds to spawn and import), not on the first request."""
        executor = self._started()
        if self.kind == "process":
            for future in [executor.submit(_ready) for _ in range(self.workers)]:
                future.result()

    def check(self) -> None:
        """Raise the 503 now if the pool is full (before reading a body that could not be decoded anyway)."""
        if self.pending >= self.capacity:
            raise RequestError(503, "overloaded", f"the server is decoding {self.workers} images with "
                                                  f"{self.pending - self.workers} waiting (the most it queues): "
                                                  f"retry after 1 s", headers={"retry-after": "1"}, close=True)

    async def prepare(self, body: bytes, content_type: str) -> tuple[str, bytes]:
        """A request's budget and canonical JSON payload, prepared in the pool (the event loop only waits)."""
        self.check()
        loop = asyncio.get_running_loop()
        executor = self._started()
        if self.kind == "process":
            future = executor.submit(_prepare_in_process, body, content_type)
        elif self.inline_pixels and len(body) <= INLINE_MAX_BODY_BYTES:
            # parsing a small body and reading an image header are quick: their errors are answered right here
            fields = self.preparer.fields(body, content_type)
            image = open_image(fields.image, self.preparer.limits.max_pixels)
            if image.width * image.height <= self.inline_pixels:
                self.prepared_inline += 1
                return self.preparer.encoded_fields(fields, image)
            future = executor.submit(self.preparer.encoded_fields, fields, image)
        else:
            future = executor.submit(self.preparer.encoded, body, content_type)
        self.pending += 1  # released when the work ends, even if the client has gone meanwhile

        def release(_: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(self._release)
            except RuntimeError:  # the loop has closed: nothing waits for the count any more
                pass

        future.add_done_callback(release)
        try:
            return await asyncio.wrap_future(future)
        except concurrent.futures.BrokenExecutor:
            self.shutdown()  # a worker process died (a crash in a decoder): the next request gets a fresh pool
            raise RequestError(500, "decoder_crashed", "the image decoder stopped while decoding this request; it "
                                                       "has been restarted") from None

    def _release(self) -> None:
        self.pending -= 1

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
