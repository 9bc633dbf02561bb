"""Image bytes -> a fully decoded 8-bit RGB ``PIL.Image``, or a :class:`RequestError` naming the problem.

:func:`decode_image` is the decoding boundary: whatever Pillow raises while identifying, decoding or converting
(``OSError``, ``SyntaxError``, ``struct.error``, ``IndexError``, ``ZeroDivisionError``, ``MemoryError``,
``DecompressionBombError`` ...) becomes a 4xx ``RequestError``; nothing else escapes it.

- Formats: only :data:`FORMATS` are opened (no Ghostscript for EPS, no stubs that need a handler).
- Size: the width x height from the header is checked against ``max_pixels`` *before* decoding, and again after.
- High bit depths are scaled, not clipped: ``I;16*`` by 255/65535; ``I`` (32-bit integer, what Pillow opens 16-bit
  PPM as) the same when its values lie in 0..65535, else its actual min..max is stretched to 0..255; ``F`` (float)
  by 255 when its values lie in [0, 1], else min..max stretched (non-finite values count as 0). A 16-bit mid-grey
  (32896 = 128 x 257) gives exactly the 8-bit mid-grey 128. Other modes convert with Pillow's ``convert("RGB")``
  (alpha dropped, as the library's preprocessing does); EXIF orientation is not applied (neither does it).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RequestError, sanitize

Image.init()
# Formats a request may send (those this Pillow build can open); EPS (Ghostscript), PDF, WMF and the stub formats
# that need an external handler are left out.
FORMATS = tuple(name for name in ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "TGA",
                                  "JPEG2000", "AVIF", "QOI", "SGI", "PCX", "DDS", "PSD")
                if name in Image.OPEN)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The server checks max_pixels itself (before decoding); Pillow's own bomb *error* (2x MAX_IMAGE_PIXELS) stays on.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Damaged files make Pillow's plugins warn (TIFF tags past the end, say): the answer says what failed, and a warning
# printed to the log would carry the plugin's file path.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _error_text(error: BaseException) -> str:
    text = sanitize(str(error), limit=160)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(400, "empty_image", f"the image is {width}x{height} pixels: expected at least 1x1")
    if width * height > max_pixels:
        raise RequestError(413, "image_too_large", f"the image is {width}x{height} = {width * height} pixels: "
                                                   f"expected at most {max_pixels} pixels")


def to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image for the high-bit-depth modes (I;16*, I, F), scaled by their range; other images unchanged."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image
    with np.errstate(all="ignore"):  # NaN and infinities in F images are expected input, not warnings
        values = np.nan_to_num(_scaled(image), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _scaled(image: Image.Image) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) * np.float32(255 / 65535)
    else:
        values = np.asarray(image, dtype=np.float64)
        values = np.where(np.isfinite(values), values, 0.0)
        low, high = float(values.min()), float(values.max())
        top = 65535.0 if image.mode == "I" else 1.0
        if low >= 0.0 and high <= top:
            values = values * (255.0 / top)
        else:  # outside the type's usual range: stretch what is there
            values = (values - low) * (255.0 / (high - low) if high > low else 0.0)
    return values


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, its size checked against ``max_pixels``; failures are RequestErrors."""
    if not data:
        raise RequestError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise RequestError(413, "image_too_large", f"the image is too large: {_error_text(error)}") from None
    except UnidentifiedImageError:
        raise RequestError(400, "not_an_image", f"the data is not an image in a supported format "
                                                f"({', '.join(FORMATS)})") from None
    except Exception as error:  # noqa: BLE001  (a broken header raises whatever its plugin trips on)
        raise RequestError(400, "not_an_image", f"the image header could not be read: {_error_text(error)}") from None
    _check_size(image, max_pixels)  # from the header: a decompression bomb is refused before decoding
    return image


def decode_image(data: bytes | Image.Image, max_pixels: int, keep_grayscale: bool = False) -> Image.Image:
    """Open (unless ``data`` is already :func:`open_image`'s answer), check, fully decode and convert to 8-bit RGB;
    every failure is a :class:`RequestError`.

    With ``keep_grayscale``, a one-channel image (``L``, or a high bit depth scaled to ``L``) stays ``L``.
    """
    image = data if isinstance(data, Image.Image) else open_image(data, max_pixels)
    try:
        image.load()
    except (Image.DecompressionBombError, MemoryError) as error:
        raise RequestError(413, "image_too_large", f"the image is too large to decode: {_error_text(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise RequestError(400, "truncated_image", f"the image could not be decoded (truncated or corrupt): "
                                                   f"{_error_text(error)}") from None
    _check_size(image, max_pixels)  # some formats only know their final size once loaded
    try:
        image = to_8bit(image)
        return image if keep_grayscale and image.mode == "L" else image.convert("RGB")
    except MemoryError as error:
        raise RequestError(413, "image_too_large", f"the image is too large to convert: {_error_text(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise RequestError(400, "unsupported_mode", f"the image's mode {image.mode!r} could not be converted to RGB: "
                                                    f"{_error_text(error)}") from None
