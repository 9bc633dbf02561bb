"""The image processor's resize and crop, run straight on the decoded ``PIL.Image``, when that is exact.

transformers' PIL image processors turn the image into a numpy array, back into a ``PIL.Image`` for the resize,
back into numpy for the crop, and validate their arguments on every call: about a third of the HTTP process's
CPU time per request under load (py-spy, 64 clients, the embedded default model). :class:`Geometry` does the
same two steps with the processor's own settings (``size``, ``resample``, ``crop_size``) and transformers' own
size and crop functions, without the round trips.

A grayscale image is resized as one channel, a third of the work, and sent as one channel: the inference worker
repeats it, which equals converting it to RGB first (Pillow resizes each channel alike).

:func:`fast_geometry` decides per processor, by trying it: the fast path is used only when it gives exactly the
processor's own uint8 output on probe images of several sizes and shapes (and the one-channel path only when it
gives exactly the RGB conversion's). Any other processor runs the processor itself, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_transforms import center_crop, get_resize_output_image_size
from transformers.image_utils import ChannelDimension

# Processor switches whose steps Geometry does not run: any of them on means the processor runs itself.
_UNSUPPORTED_STEPS = ("do_pad", "do_reduce_labels", "do_flip_channel_order")
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
# Probe sizes (width, height): smaller and larger than any crop, landscape and portrait, odd and even.
_PROBE_SIZES = ((37, 53), (53, 37), (28, 28), (301, 240), (240, 301))


@dataclass(frozen=True)
class Geometry:
    """Resize (to ``height x width``, or the shortest edge to ``shortest_edge``) then center-crop, like the processor.

    ``grayscale`` is True when one-channel (``L``) images may be sent as one channel (see :func:`fast_geometry`).
    """

    height_width: tuple[int, int] | None
    shortest_edge: int | None
    resample: int
    crop: tuple[int, int] | None
    grayscale: bool = False

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the resized image, computed by transformers' own function."""
        if self.height_width is not None:
            return self.height_width
        shape_only = np.broadcast_to(np.uint8(0), (1, height, width))  # a zero-byte stand-in for the image
        return tuple(get_resize_output_image_size(shape_only, size=self.shortest_edge, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A C-contiguous (C, H, W) uint8 array: C is 3 for RGB images, 1 for ``L`` images."""
        if self.height_width is not None or self.shortest_edge is not None:
            height, width = self.output_size(*image.size)
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if self.crop is not None:
            array = center_crop(array, self.crop, data_format=ChannelDimension.FIRST,
                                input_data_format=ChannelDimension.FIRST)
        return np.ascontiguousarray(array, dtype=np.uint8)


def _size_dict(value: Any) -> dict:
    """A processor's ``size``/``crop_size`` (a dict, or transformers' ``SizeDict``) as a dict of its set keys."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        value = {key: getattr(value, key, None) for key in _SIZE_KEYS}
    return {key: value[key] for key in _SIZE_KEYS if value.get(key) is not None}


def _from_settings(processor: Any) -> Geometry | None:
    if any(getattr(processor, step, False) for step in _UNSUPPORTED_STEPS):
        return None
    height_width = shortest_edge = crop = None
    if getattr(processor, "do_resize", False):
        size = _size_dict(getattr(processor, "size", None))
        if set(size) == {"height", "width"}:
            height_width = (int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            shortest_edge = int(size["shortest_edge"])
        else:  # longest_edge limits, max sizes...: the processor's own path
            return None
    if getattr(processor, "do_center_crop", False):
        crop_size = _size_dict(getattr(processor, "crop_size", None))
        if set(crop_size) != {"height", "width"}:
            return None
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    resample = getattr(processor, "resample", None)
    resample = int(Image.Resampling.BILINEAR if resample is None else resample)
    return Geometry(height_width=height_width, shortest_edge=shortest_edge, resample=resample, crop=crop)


def _processor_geometry(processor: Any, image: Image.Image) -> np.ndarray | None:
    """The processor's own uint8 (C, H, W) output for ``image`` with rescale and normalize off (None if not that)."""
    batch = processor(images=image, return_tensors="np", input_data_format="channels_last", do_rescale=False,
                      do_normalize=False)
    expected = np.asarray(batch["pixel_values"])[0]
    return expected if expected.dtype == np.uint8 and expected.ndim == 3 else None


def _probes(mode: str) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = {"RGB": (3,), "L": ()}[mode]
    return [Image.fromarray(rng.integers(0, 256, (height, width, *shape), dtype=np.uint8), mode=mode)
            for width, height in _PROBE_SIZES]


def fast_geometry(processor: Any) -> Geometry | None:
    """A :class:`Geometry` equal to ``processor``'s resize and crop on every probe image, else None."""
    try:
        geometry = _from_settings(processor)
        if geometry is None:
            return None
        for probe in _probes("RGB"):
            expected = _processor_geometry(processor, probe)
            if expected is None or not np.array_equal(geometry(probe), expected):
                return None
        grayscale = True
        for probe in _probes("L"):
            expected = _processor_geometry(processor, probe.convert("RGB"))
            one_channel = geometry(probe)
            if expected is None or one_channel.shape[0] != 1 or not np.array_equal(
                    np.broadcast_to(one_channel, expected.shape), expected):
                grayscale = False
                break
    except Exception:  # noqa: BLE001  settings of another shape than the standard processors': the processor runs
        return None
    return dataclasses.replace(geometry, grayscale=grayscale)
