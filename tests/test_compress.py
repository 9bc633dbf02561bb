"""DC-ViT end to end on a tiny Dinov2 classifier: metric set, fine-tuning, the script, resume, save, card, push."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from conftest import block2_compressed, make_model

import hf_tome
from hf_tome.dcvit import blocks
from hf_tome.dcvit.compress import CompressOptions, main, run_compress
from hf_tome.dcvit.metric_set import generate_metric_set, total_variation
from hf_tome.dcvit.mimic import feature_mse, finetune_mimic


def test_metric_set_generator_lowers_its_loss():
    model = make_model("dinov2-cls")
    model.requires_grad_(False)
    # No jitter on 32 px images (a 4 px roll is a whole patch for this tiny model); flips still apply.
    result = generate_metric_set(lambda x: model(pixel_values=x).logits, num_images=10, num_labels=5,
                                 image_shape=(3, 32, 32), steps=40, lr=0.1, max_shift=0, progress=False)
    assert len(result.losses) == 40
    assert sum(result.losses[-5:]) < 0.85 * sum(result.losses[:5])
    assert result.labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    predicted = model(pixel_values=result.pixel_values).logits.argmax(-1)
    assert (predicted == result.labels).float().mean() >= 0.8
    flat = torch.ones(1, 3, 8, 8)
    assert total_variation(flat).item() == 0.0


def test_finetuning_lowers_feature_mse_and_only_touches_early_blocks():
    _, pixels, teacher, student = block2_compressed(16)
    untouched = blocks.encoder_layers(student)[4].mlp.fc1.weight.detach().clone()
    before = feature_mse(student, pixels, teacher)
    losses = finetune_mimic(student, pixels, teacher, [2], Accelerator(cpu=True), epochs=8, batch_size=8, lr=3e-3)
    after = feature_mse(student, pixels, teacher)
    assert len(losses) == 16
    assert after < 0.7 * before
    torch.testing.assert_close(blocks.encoder_layers(student)[4].mlp.fc1.weight, untouched)  # past block 3: frozen


def _options(model_dir, image_folder, out, **changes) -> CompressOptions:
    values = dict(model=str(model_dir), data=str(image_folder), num_images=12, target=0.7, out=out,
                  epochs_per_block=2, trial_epochs=0.5, batch_size=4, lr=3e-4, metric_images=5, metric_steps=5)
    return CompressOptions(**{**values, **changes})


def test_compress_script_hits_the_target_and_saves_a_loadable_model(tiny_model_dir, image_folder, tmp_path):
    # The published init: its blocks start far from the original, so fine-tuning must lower every block's error
    # (the least-squares init starts near the optimum: tests/test_dcvit_refit.py).
    summary = run_compress(_options(tiny_model_dir, image_folder, tmp_path / "run", final_epochs=1,
                                    init="published"))
    assert len(summary["losses"]["final"]) == 3  # 12 images in batches of 4, every compressed block trainable
    assert "final" in summary["feature_mse"]
    model_dir = tmp_path / "run" / "model"
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    original = hf_tome.AutoModelForImageClassification.from_pretrained(tiny_model_dir).eval()
    costs_full = hf_tome.compute_report(original).total_macs
    unit_macs = 2 * 65 * 32
    achieved = hf_tome.compute_report(loaded).total_macs
    assert abs(achieved - 0.7 * costs_full) <= unit_macs
    section = loaded.config.block_compression
    assert section["method"] == "dc-vit" and section["num_samples"] == 12
    compressed = {int(k): v for k, v in section["mlp_kept"].items()}
    assert len(compressed) == 2 and 0 not in compressed and 5 not in compressed
    assert set(json.loads((tmp_path / "run" / "state" / "progress.json").read_text())["trial_scores"]) == {
        "1", "2", "3", "4"}
    mse = summary["feature_mse"]
    for block in compressed:
        assert mse[f"{block} after fine-tuning"] < mse[f"{block} before fine-tuning"]
    assert len(summary["metric_set_losses"]) == 5  # metric-set steps (its loss is tested on its own above)
    pixels = torch.randn(3, 3, 32, 32)
    again = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    torch.testing.assert_close(again(pixel_values=pixels).logits, loaded(pixel_values=pixels).logits)
    card = (model_dir / "README.md").read_text()
    assert "DC-ViT" in card and "12 unlabeled images" in card and "| removed |" in card
    assert "refit by least squares" not in card  # the published init


def test_resume_skips_finished_blocks(tiny_model_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_compress(_options(tiny_model_dir, image_folder, out))
    progress = out / "state" / "progress.json"
    state = json.loads(progress.read_text())
    assert len(state["done"]) == 2
    # Pretend the run stopped after the first block; the saved state model already has both blocks, so make the
    # state consistent with one done by reloading from a run that compressed only the first block.
    first = state["order"][0]
    state["done"] = [first]
    losses_first = state["losses"][str(first)]
    del state["losses"][str(state["order"][1])]
    progress.write_text(json.dumps(state))
    blocks_model = hf_tome.AutoModelForImageClassification.from_pretrained(out / "state" / "model")
    summary = run_compress(_options(tiny_model_dir, image_folder, out, resume=True))
    assert summary["losses"][str(first)] == losses_first  # not trained again
    assert str(state["order"][1]) in summary["losses"]
    assert blocks.compression_of(blocks_model)  # the state model reloads with its blocks


def test_drop_method_and_cli(tiny_model_dir, image_folder, tmp_path):
    assert main(["--model", str(tiny_model_dir), "--data", str(image_folder), "--num-images", "8", "--target", "0.7",
                 "--method", "drop", "--out", str(tmp_path / "drop"), "--epochs-per-block", "1", "--trial-epochs",
                 "0.5", "--batch-size", "4", "--metric-images", "5", "--metric-steps", "3"]) == 0
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "drop" / "model")
    kept = loaded.config.block_compression["mlp_kept"]
    assert set(kept.values()) == {0} and len(kept) == 2  # round(0.3 * 6 blocks' worth / 1 block) whole blocks


def test_bad_target_and_data_are_refused(tiny_model_dir, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"outside the range DC-ViT reaches"):
        run_compress(_options(tiny_model_dir, image_folder, tmp_path / "a", target=0.99))
    with pytest.raises(ValueError, match=r"num_images=50 is invalid: expected 1..12"):
        run_compress(_options(tiny_model_dir, image_folder, tmp_path / "b", num_images=50))


def test_push_to_hub_uploads_model_and_card(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    run_compress(_options(tiny_model_dir, image_folder, tmp_path / "run"))
    uploaded = {}

    class Repo:
        repo_id = "me/tiny-dcvit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded.update({path.name: path.read_bytes() for path in Path(folder_path).iterdir()})
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "model")
    model.push_to_hub("me/tiny-dcvit")
    assert uploaded["repo_id"] == "me/tiny-dcvit"
    assert {"config.json", "model.safetensors", "README.md"} <= uploaded.keys()
    card = uploaded["README.md"].decode()
    assert "me/tiny-dcvit" in card and "hf-tome" in card and "block_compression" in card


def test_model_card_reports_method_budget_samples_accuracy_and_speed():
    from hf_tome.dcvit.model_card import render_model_card

    model = make_model("dinov2-cls", num_hidden_layers=6)
    blocks.compress_layer(blocks.encoder_layers(model)[3], 40)
    blocks.record_compression(model, method="dc-vit", target=0.75, base_model="facebook/dinov2-small",
                              num_samples=500, samples_source="fashion-mnist, split 'train'", gmacs=4.59,
                              full_gmacs=6.12, measured={"accuracy": 0.7812, "original_accuracy": 0.812,
                                                         "images_per_s": 31.5, "original_images_per_s": 24.0,
                                                         "eval_dataset": "fashion-mnist", "eval_images": 2000})
    card = str(render_model_card(model, repo_id="me/dinov2-small-dcvit"))
    assert "base_model: facebook/dinov2-small" in card
    assert "DC-ViT (dense few-shot block compression)" in card
    assert "**75.0%** of its MACs" in card and "4.590 GMACs per image instead of 6.120" in card
    assert "**500 unlabeled images** (fashion-mnist, split 'train')" in card
    assert "| accuracy | 78.12% | 81.20% |" in card and "| images/s | 31.5 | 24.0 |" in card
    assert "| 3 | removed | 40 |" in card and "| 2 | kept | all |" in card
    uncompressed = make_model("vit-cls")
    with pytest.raises(ValueError, match=r"model has no config.block_compression: expected a model saved by hf-tome"):
        render_model_card(uncompressed)


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_gives_the_same_architecture(tiny_model_dir, image_folder, tmp_path):
    """Two gloo processes (data-parallel fine-tuning, bf16 autocast) write one model that hits the same target."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "-m", "hf_tome.dcvit.compress",
               "--model", str(tiny_model_dir), "--data", str(image_folder), "--num-images", "12", "--target", "0.7",
               "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--metric-images", "5", "--metric-steps", "3",
               "--trial-epochs", "0.5", "--epochs-per-block", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("compressed ") == 1  # only the main process reports and saves
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "ddp" / "model")
    original = hf_tome.AutoModelForImageClassification.from_pretrained(tiny_model_dir)
    target = 0.7 * hf_tome.compute_report(original).total_macs
    assert abs(hf_tome.compute_report(loaded).total_macs - target) <= 2 * 65 * 32


def test_hf_tome_cli_has_the_compress_subcommand():
    from hf_tome.cli.main import build_parser
    from hf_tome.dcvit.compress import options_from_args

    args = build_parser().parse_args(["compress", "--target", "0.6", "--method", "drop", "--num-images", "50",
                                      "--final-epochs", "2", "--resume", "--push-to-hub", "me/model"])
    options = options_from_args(args)
    assert (options.target, options.method, options.num_images, options.final_epochs) == (0.6, "drop", 50, 2.0)
    assert options.resume and options.push_to_hub == "me/model" and options.model is None
