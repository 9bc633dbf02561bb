"""hf_tome models inside the rest of the ecosystem: pipeline, Trainer, visualisation."""

from __future__ import annotations

import numpy as np
import torch
import transformers as T
from conftest import make_model
from PIL import Image

import hf_tome
from hf_tome.evaluation.visualize import draw_groups, group_labels, visualize_merges


def _processor() -> T.ViTImageProcessor:
    return T.ViTImageProcessor(size={"height": 32, "width": 32})


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def test_pipeline_image_classification(tmp_path):
    model = make_model("vit-cls")
    model.save_pretrained(tmp_path)
    _processor().save_pretrained(tmp_path)
    merged = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_r=8)
    classifier = T.pipeline("image-classification", model=merged, image_processor=_processor())
    predictions = classifier([_image(0), _image(1)], top_k=3)
    assert [len(p) for p in predictions] == [3, 3]
    # Same scores as calling the model directly.
    with torch.no_grad():
        pixel_values = _processor()(images=[_image(0)], return_tensors="pt")["pixel_values"]
        probabilities = merged(pixel_values).logits.softmax(-1)[0]
    assert abs(predictions[0][0]["score"] - probabilities.max().item()) < 1e-5


def test_trainer_step_runs_and_changes_weights(tmp_path):
    model = make_model("deit-cls")
    hf_tome.apply(model, r=8)
    before = model.classifier.weight.detach().clone()
    torch.manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 5} for i in range(8)]
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    result = T.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model.classifier.weight.detach())
    assert hf_tome.is_patched(model)


def test_visualize_merges_draws_groups(tmp_path):
    model = make_model("vit-cls")
    hf_tome.apply(model, r=12)
    picture = visualize_merges(model, _image(), _processor())
    assert model.tome_config.trace_source is False  # settings restored
    assert picture.mode == "RGB" and picture.size[0] == picture.size[1]
    picture.save(tmp_path / "merges.png")
    assert (tmp_path / "merges.png").stat().st_size > 0
    # 64 patches merged down to 64 - 4 * 12 = 16 groups.
    with torch.no_grad():
        hf_tome.apply(model, r=12, trace_source=True)
        source = model.vit(_processor()(images=_image(), return_tensors="pt")["pixel_values"]).token_source
    labels = group_labels(source[0], 1, (8, 8))
    assert len(np.unique(labels)) == 16


def test_draw_groups_fills_each_group_with_its_mean_colour():
    image = Image.fromarray(np.concatenate([np.zeros((8, 4, 3)), np.full((8, 4, 3), 200)], 1).astype(np.uint8))
    labels = np.array([[0, 1], [0, 1]])
    drawn = np.asarray(draw_groups(image, labels, outline=(255, 0, 0)))
    # Resizing blurs the edge between the halves a little, so the means are close to 0 and 200, not exact.
    assert np.abs(drawn[0, 0].astype(int) - 0).max() <= 8
    assert np.abs(drawn[-1, -1].astype(int) - 200).max() <= 8
    assert tuple(drawn[0, drawn.shape[1] // 2 - 1]) == (255, 0, 0)  # border between the groups
