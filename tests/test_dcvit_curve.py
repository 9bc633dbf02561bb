"""DC-ViT fine-tuning checkpoints (``run_compress(on_checkpoint=...)``) and the benchmark's accuracy curve."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import block2_compressed, make_model

import hf_tome
from hf_tome.dcvit.compress import CompressOptions, run_compress
from hf_tome.dcvit.mimic import checkpoint_steps, finetune_mimic

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "dcvit_vs_blockdrop.py"


def test_checkpoint_steps_are_evenly_spaced_and_end_the_phase():
    assert checkpoint_steps(10, 4) == [3, 5, 8, 10]
    assert checkpoint_steps(5, 4) == [2, 3, 4, 5]
    assert checkpoint_steps(2, 4) == [1, 2]  # a phase shorter than the points: no repeats
    assert checkpoint_steps(7, 1) == [7]
    assert checkpoint_steps(0, 4) == [] and checkpoint_steps(10, 0) == []


def test_checkpoints_see_the_model_in_eval_mode_and_leave_training_unchanged():
    _, pixels, teacher, student = block2_compressed(8)
    plain, hooked = copy.deepcopy(student), copy.deepcopy(student)
    seen = []

    def on_checkpoint(step: int, model: torch.nn.Module) -> None:
        with torch.no_grad():
            seen.append((step, model.training, model(pixel_values=pixels[:2]).logits.clone()))

    settings = dict(iterations=5, batch_size=4, lr=3e-3, seed=0)
    plain_losses = finetune_mimic(plain, pixels, teacher, [2], Accelerator(cpu=True), **settings)
    hooked_losses = finetune_mimic(hooked, pixels, teacher, [2], Accelerator(cpu=True), **settings,
                                   on_checkpoint=on_checkpoint, checkpoints=2)
    assert [step for step, _, _ in seen] == [3, 5]
    assert not any(training for _, training, _ in seen)
    assert not torch.equal(seen[0][2], seen[1][2])  # the student moved between the two checkpoints
    assert hooked_losses == plain_losses
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(hooked.state_dict()[name], value)
    with torch.no_grad():
        torch.testing.assert_close(hooked(pixel_values=pixels[:2]).logits, seen[-1][2])


def _options(model_dir, image_folder, out, **changes) -> CompressOptions:
    values = dict(model=str(model_dir), data=str(image_folder), num_images=12, target=0.7, out=out,
                  iterations_per_block=2, final_iterations=5, trial_iterations=0, batch_size=4, lr=3e-4,
                  metric_images=4, metric_steps=1, pool_copies=1, augment="none")  # small: a few seconds
    return CompressOptions(**{**values, **changes})


def test_run_compress_calls_the_checkpoint_hook_at_the_planned_iterations(tiny_model_dir, image_folder, tmp_path):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []

    def on_checkpoint(iterations: int, student: torch.nn.Module) -> None:
        with torch.no_grad():
            calls.append((iterations, student.training, student(pixel_values=pixels).logits.clone()))

    out = tmp_path / "run"
    summary = run_compress(_options(tiny_model_dir, image_folder, out), on_checkpoint=on_checkpoint,
                           final_checkpoints=4)
    # Two compressed blocks of 2 iterations each, then a final phase of 5 seen at steps 2, 3, 4 and 5.
    assert [iterations for iterations, _, _ in calls] == [2, 4, 6, 7, 8, 9]
    assert not any(training for _, training, _ in calls)
    assert not torch.allclose(calls[0][2], calls[-1][2])
    saved = hf_tome.AutoModelForImageClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(pixel_values=pixels).logits, calls[-1][2])  # the last point: the model
    written = json.loads((out / "compress.json").read_text())
    assert set(written["options"]) == set(CompressOptions.__dataclass_fields__) == set(summary["options"])
    for text in ((out / "compress.json").read_text(), (out / "model" / "config.json").read_text()):
        assert "checkpoint" not in text

    # A resumed final phase counts the per-block iterations already done.
    progress = out / "state" / "progress.json"
    state = json.loads(progress.read_text())
    del state["losses"]["final"]
    progress.write_text(json.dumps(state))
    resumed = []
    run_compress(_options(tiny_model_dir, image_folder, out, resume=True),
                 on_checkpoint=lambda iterations, student: resumed.append(iterations), final_checkpoints=2)
    assert resumed == [7, 9]


@pytest.fixture(scope="module")
def blockdrop_script():
    spec = importlib.util.spec_from_file_location("dcvit_vs_blockdrop", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_curve_records_points_on_a_copy_and_plots_them(blockdrop_script, tmp_path):
    model = make_model("dinov2-cls")
    evaluated = []

    def fake_accuracy(student: torch.nn.Module) -> float:
        evaluated.append(student)
        student.to(torch.float16)  # what a real evaluator may do: it must not reach the model being trained
        return 0.5 + 0.1 * len(evaluated)

    points = []
    record = blockdrop_script.curve_recorder("dc-vit", fake_accuracy, 100, points)
    record(10, model)
    record(25, model)
    assert points == [{"method": "dc-vit", "iterations": 10, "accuracy": 0.6, "images": 100},
                      {"method": "dc-vit", "iterations": 25, "accuracy": pytest.approx(0.7), "images": 100}]
    assert all(student is not model for student in evaluated)
    assert next(model.parameters()).dtype == torch.float32

    old = [{"method": "drop", "iterations": 5, "accuracy": 0.1, "images": 100},
           {"method": "drop", "iterations": 10, "accuracy": 0.2, "images": 100}]
    new = [{"method": "drop", "iterations": 10, "accuracy": 0.3, "images": 100}]
    assert [p["accuracy"] for p in blockdrop_script.merge_curve(old, new)] == [0.1, 0.3]

    path = tmp_path / "curve.png"
    blockdrop_script.plot_curve(points + old, 0.9, {"dc-vit": 10, "drop": 10}, "tiny", path)
    assert path.stat().st_size > 0
