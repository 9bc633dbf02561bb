"""Tests for the real-data helpers: idx parsing, Fashion-MNIST, the offline metrics and the bundled photos."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_tome.evaluation.assets import fashion_mnist
from hf_tome.evaluation.assets.fashion_mnist import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    IdxFormatError,
    load_fashion_mnist,
    read_idx,
)
from hf_tome.evaluation.assets.photos import DEFAULT_PHOTOS, skimage_photos
from hf_tome.evaluation.metrics import AVAILABLE_METRICS, load_metric, metric_script_path
from hf_tome.evaluation.metrics.wer.wer import word_edit_distance

_REAL_FILES = [
    FASHION_MNIST_DIR / name
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
]
needs_fashion_mnist = pytest.mark.skipif(
    not all(path.is_file() for path in _REAL_FILES),
    reason=f"Fashion-MNIST idx files not in {FASHION_MNIST_DIR}; run `apt-get install dataset-fashion-mnist`",
)


def write_idx(path: Path, array: np.ndarray, dtype_code: int, compress: bool = False) -> Path:
    """Write ``array`` in idx layout (header, then big-endian payload), gzipped when ``compress``."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# --- idx parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_uint8_images(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "images-idx3-ubyte", images, 0x08, compress)
    loaded = read_idx(path)
    assert loaded.shape == (2, 3, 4)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, images)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=np.int32)
    loaded = read_idx(write_idx(tmp_path / "values.idx", values, 0x0C))
    # The payload is big-endian on disk; values must survive regardless of the host byte order.
    np.testing.assert_array_equal(loaded.astype(np.int32), values)


def test_read_idx_bad_magic_number(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(IdxFormatError, match="bad idx magic number 0x12340801"):
        read_idx(path)


def test_read_idx_unknown_dtype_code(tmp_path: Path) -> None:
    path = tmp_path / "odd-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IdxFormatError, match="unknown idx dtype code 0x07"):
        read_idx(path)


def test_read_idx_truncated_payload(tmp_path: Path) -> None:
    path = tmp_path / "short-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(IdxFormatError, match="payload is 2 bytes"):
        read_idx(path)


def test_idx_format_error_is_a_value_error() -> None:
    # Callers catching ValueError for bad input keep working.
    assert issubclass(IdxFormatError, ValueError)


# --- Fashion-MNIST loader on tiny files (no Debian package needed) --------------------------------------------


def _write_tiny_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x08, compress=True)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08, compress=True)


def test_load_fashion_mnist_from_tiny_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 5], dtype=np.uint8)
    _write_tiny_split(tmp_path, "t10k", images, labels)
    dataset = load_fashion_mnist("test", root=tmp_path)
    assert isinstance(dataset, datasets.Dataset)
    assert len(dataset) == 5
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.features["label"].names == list(FASHION_MNIST_LABELS)
    for index in range(5):
        example = dataset[index]
        assert isinstance(example["image"], Image.Image)
        assert example["image"].mode == "L"
        assert example["image"].size == (28, 28)
        # The hand-framed PNGs must decode to exactly the source pixels.
        np.testing.assert_array_equal(np.asarray(example["image"]), images[index])
        assert example["label"] == labels[index]
    assert len(load_fashion_mnist("test", limit=2, root=tmp_path)) == 2


def test_load_fashion_mnist_rejects_mismatched_files(tmp_path: Path) -> None:
    _write_tiny_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(IdxFormatError, match="do not match"):
        load_fashion_mnist("train", root=tmp_path)


def test_load_fashion_mnist_missing_files_explains_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")


def test_load_fashion_mnist_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation", root=tmp_path)
    with pytest.raises(ValueError, match="limit must be"):
        load_fashion_mnist("train", limit=-1, root=tmp_path)


def test_fashion_mnist_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default is read at import time, so execute a private copy of the module under the patched environment;
    # reloading the shared module instead would swap IdxFormatError for a new class under the other tests.
    monkeypatch.setenv("HF_TOME_FASHION_MNIST_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("_fashion_mnist_env_copy", fashion_mnist.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.FASHION_MNIST_DIR == tmp_path


def test_fashion_mnist_label_names() -> None:
    assert FASHION_MNIST_LABELS == (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )


# --- Fashion-MNIST from the Debian package --------------------------------------------------------------------


@needs_fashion_mnist
def test_real_fashion_mnist_test_split() -> None:
    dataset = load_fashion_mnist("test")
    assert len(dataset) == 10_000
    assert dataset.features["label"].names == list(FASHION_MNIST_LABELS)
    # The test split is balanced: 1,000 images per class.
    assert np.bincount(np.asarray(dataset["label"][:]), minlength=10).tolist() == [1000] * 10
    first = dataset[0]
    assert first["image"].mode == "L"
    assert first["image"].size == (28, 28)
    assert dataset.features["label"].int2str(first["label"]) == "Ankle boot"
    raw = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(np.asarray(dataset[1234]["image"]), raw[1234])


@needs_fashion_mnist
def test_real_fashion_mnist_train_split() -> None:
    dataset = load_fashion_mnist("train")
    assert len(dataset) == 60_000
    assert np.bincount(np.asarray(dataset["label"][:]), minlength=10).tolist() == [6000] * 10
    limited = load_fashion_mnist("train", limit=8)
    assert len(limited) == 8
    assert limited[7]["label"] == dataset[7]["label"]


# --- metrics --------------------------------------------------------------------------------------------------


def test_metric_scripts_are_packaged_files() -> None:
    for name in AVAILABLE_METRICS:
        script = metric_script_path(name)
        assert script.is_file()
        # setuptools' find only picks up folders that are regular packages.
        assert (script.parent / "__init__.py").is_file()
    with pytest.raises(ValueError, match="unknown metric"):
        metric_script_path("bleu")


def test_accuracy_metric() -> None:
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 2, 1]) == {"accuracy": 0.75}
    accuracy.add_batch(predictions=[3, 1], references=[3, 1])
    accuracy.add_batch(predictions=[2, 2], references=[2, 0])
    assert accuracy.compute() == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 2, 1], normalize=False) == {"accuracy": 3.0}


def test_word_edit_distance() -> None:
    assert word_edit_distance([], []) == 0
    assert word_edit_distance(["a", "b"], []) == 2
    assert word_edit_distance([], ["a"]) == 1
    assert word_edit_distance("a b c".split(), "a x c".split()) == 1


def test_wer_metric() -> None:
    wer = load_metric("wer")
    # One substitution (quick -> quack), one deletion (fox), one insertion (over): 3 edits / 5 reference words.
    result = wer.compute(
        predictions=["the quack brown jumps over"],
        references=["the quick brown fox jumps"],
    )
    assert result == {"wer": pytest.approx(0.6)}
    # Corpus-level: 1 edit over 2 + 3 reference words, not the mean of per-sentence rates.
    wer.add_batch(predictions=["hello world"], references=["hello world"])
    wer.add_batch(predictions=["good night"], references=["good night moon"])
    assert wer.compute() == {"wer": pytest.approx(1 / 5)}
    # No normalisation inside the metric: case and punctuation differences count as errors.
    assert wer.compute(predictions=["Hello, world."], references=["hello world"]) == {"wer": pytest.approx(1.0)}


# --- photos ---------------------------------------------------------------------------------------------------


def test_skimage_photos_are_rgb() -> None:
    photos = skimage_photos()
    assert list(photos) == list(DEFAULT_PHOTOS)
    assert len(photos) >= 6
    for name, photo in photos.items():
        assert photo.mode == "RGB", name
        assert min(photo.size) >= 256, name
        # A real colour photo has channels that differ somewhere.
        pixels = np.asarray(photo, dtype=np.int16)
        assert np.abs(pixels[..., 0] - pixels[..., 1]).max() > 0, name


def test_skimage_photos_grayscale_converted_and_unknown_rejected() -> None:
    coins = skimage_photos(["coins"])["coins"]
    assert coins.mode == "RGB"
    with pytest.raises(ValueError, match="unknown photo"):
        skimage_photos(["not-a-photo"])
