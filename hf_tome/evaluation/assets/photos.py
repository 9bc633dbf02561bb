"""Real colour photographs from the files bundled inside the scikit-image wheel.

Most ``skimage.data`` functions fetch their file with pooch and fall back to the copy shipped in
``skimage/data`` only when its hash matches; the ones listed here are all shipped in the wheel (checked
against scikit-image 0.26), and this module opens those files directly so that no code path can try the
network.
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
from PIL import Image

SKIMAGE_PHOTO_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    # Grayscale photos, converted to RGB on load; not in the default set.
    "camera": "camera.png",
    "coins": "coins.png",
    "moon": "moon.png",
}
"""Photo name (as in ``skimage.data``; ``motorcycle`` is the left view of ``stereo_motorcycle``) -> bundled file."""

DEFAULT_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field")
"""Six natural colour photos of different sizes and content: a person, a cat, a cup, a rocket, a bike, the sky."""


def skimage_data_dir() -> Path:
    """Return the folder of data files shipped inside the installed scikit-image package."""
    return Path(skimage.data.__file__).resolve().parent


def skimage_photos(names: list[str] | None = None) -> dict[str, Image.Image]:
    """Load scikit-image's bundled photos as RGB PIL images, without any download.

    Args:
        names: Keys of :data:`SKIMAGE_PHOTO_FILES`; ``None`` loads :data:`DEFAULT_PHOTOS`.

    Returns:
        ``{name: image}`` in the order requested, every image in mode ``"RGB"`` and fully loaded (the file is closed).

    Raises:
        ValueError: If a name is unknown.
        FileNotFoundError: If the installed scikit-image does not bundle the file.
    """
    requested = list(DEFAULT_PHOTOS if names is None else names)
    unknown = [name for name in requested if name not in SKIMAGE_PHOTO_FILES]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; available: {', '.join(SKIMAGE_PHOTO_FILES)}")
    data_dir = skimage_data_dir()
    photos: dict[str, Image.Image] = {}
    for name in requested:
        path = data_dir / SKIMAGE_PHOTO_FILES[name]
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is not bundled with the installed scikit-image; this helper never downloads photos"
            )
        with Image.open(path) as image:
            # convert() also forces the lazy decode, so the file handle can close here.
            photos[name] = image.convert("RGB")
    return photos
