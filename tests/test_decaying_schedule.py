"""Decaying merge schedules (``decaying_schedule``) and their fit to a MACs target (``decaying_r_for_macs``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import hf_tome
from hf_tome import ToMeConfig
from hf_tome.core.schedule import decaying_schedule
from hf_tome.integration.flops import constant_r_for_macs, decaying_r_for_macs


def _macs(model, schedule) -> int:
    return hf_tome.compute_report(model, config=ToMeConfig(r=schedule)).total_macs


def test_decaying_schedule_values() -> None:
    assert decaying_schedule(10, 0.5, 4) == [10, 5, 2, 1]  # 2.5 and 1.25 round to 2 and 1
    assert decaying_schedule(7.4, 1.0, 3) == [7, 7, 7]
    assert decaying_schedule(0, 0.8, 2) == [0, 0]
    assert decaying_schedule(34.2, 0.85, 12) == [34, 29, 25, 21, 18, 15, 13, 11, 9, 8, 7, 6]


@pytest.mark.parametrize(("scale", "decay", "message"), [
    (10, 0.0, r"^decay=0\.0 is invalid: expected a factor in \(0, 1\]$"),
    (10, 1.5, r"^decay=1\.5 is invalid: expected a factor in \(0, 1\]$"),
    (-1, 0.5, r"^scale=-1 is invalid: expected a number of tokens >= 0$"),
])
def test_decaying_schedule_refuses_bad_arguments(scale, decay, message) -> None:
    with pytest.raises(ValueError, match=message):
        decaying_schedule(scale, decay, 4)


@pytest.mark.parametrize("fraction", [0.8, 0.6, 0.45])
@pytest.mark.parametrize("decay", [0.7, 0.85])
def test_decaying_r_for_macs_is_the_most_macs_under_the_target(fraction: float, decay: float) -> None:
    model = make_model("vit-cls")  # 65 tokens, 2 layers
    full = _macs(model, 0)
    schedule = decaying_r_for_macs(model, fraction, decay)
    layers = len(hf_tome.compute_report(model).tokens_in)
    assert len(schedule) == layers and schedule == sorted(schedule, reverse=True) and schedule[0] > schedule[-1]
    found = _macs(model, schedule)
    assert found <= fraction * full
    # brute force over the family: no schedule of this decay costs more while staying under the target
    family = {tuple(decaying_schedule(step / 100, decay, layers)) for step in range(0, 100 * 70)}
    best = max(_macs(model, list(other)) for other in family if _macs(model, list(other)) <= fraction * full)
    assert found == best
    assert decaying_r_for_macs(model, fraction * full, decay) == schedule  # absolute MACs per image
    assert not hf_tome.is_patched(model)


def test_decay_one_is_constant_r_and_reachable_edges() -> None:
    model = make_model("vit-cls")
    layers = len(hf_tome.compute_report(model).tokens_in)
    assert decaying_r_for_macs(model, 0.6, 1.0) == [constant_r_for_macs(model, 0.6)] * layers
    assert decaying_r_for_macs(model, 1.0, 0.8) == [0] * layers  # the unreduced model meets its own MACs
    with pytest.raises(ValueError, match=r"^MACs target 0\.01 is out of reach with decay=0\.8 for this model: the "
                                         r"most merging gives 0\.\d{4} of the full model's MACs$"):
        decaying_r_for_macs(model, 0.01, 0.8)
    with pytest.raises(ValueError, match=r"^decay=0 is invalid: expected a factor in \(0, 1\]$"):
        decaying_r_for_macs(model, 0.5, 0)


def test_a_first_step_replaces_layer_0_only() -> None:
    assert decaying_schedule(10, 0.5, 4, first=20) == [20, 5, 2, 1]
    assert decaying_schedule(10, 0.5, 4, first=0) == [0, 5, 2, 1]
    assert decaying_schedule(10, 0.5, 4, first=None) == decaying_schedule(10, 0.5, 4)
    assert decaying_schedule(10, 0.5, 0, first=3) == []


@pytest.mark.parametrize("first", [-1, 2.5, True, "4"])
def test_a_bad_first_step_is_refused(first) -> None:
    with pytest.raises(ValueError, match=rf"^first={first!r} is invalid: expected a whole number of tokens >= 0, "
                                         r"or None$"):
        decaying_schedule(10, 0.5, 4, first=first)


@pytest.mark.parametrize("first", [0, 6, 12])
def test_decaying_r_for_macs_with_a_first_step_fits_the_other_layers(first: int) -> None:
    model = make_model("vit-cls", num_hidden_layers=4)  # 65 tokens, 4 layers
    full = _macs(model, 0)
    schedule = decaying_r_for_macs(model, 0.6, 0.8, first=first)
    assert len(schedule) == 4 and schedule[0] == first
    found = _macs(model, schedule)
    assert found <= 0.6 * full
    family = {tuple(decaying_schedule(step / 100, 0.8, 4, first)) for step in range(0, 100 * 70)}
    best = max(_macs(model, list(other)) for other in family if _macs(model, list(other)) <= 0.6 * full)
    assert found == best


def test_a_larger_first_step_leaves_the_later_layers_less_to_merge() -> None:
    model = make_model("vit-cls", num_hidden_layers=4)
    assert decaying_r_for_macs(model, 0.6, 0.8) == [15, 12, 9, 8]
    assert decaying_r_for_macs(model, 0.6, 0.8, first=20) == [20, 7, 6, 4]
    with pytest.raises(ValueError, match=r"^MACs target 0\.05 is out of reach with decay=0\.8 and first=0 for this "
                                         r"model: the most merging gives 0\.\d{4} of the full model's MACs$"):
        decaying_r_for_macs(model, 0.05, 0.8, first=0)


def test_a_decaying_schedule_runs_with_the_reported_token_counts() -> None:
    model = make_model("vit-cls").eval()
    schedule = decaying_r_for_macs(model, 0.5, 0.8)
    report = hf_tome.compute_report(model, config=ToMeConfig(r=schedule, merge_mode="mlerp"))
    hf_tome.apply(model, ToMeConfig(r=schedule, merge_mode="mlerp"))
    pixel_values = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        output = model.vit(pixel_values=pixel_values)
    remaining = report.tokens_in[-1] - min(schedule[-1], (report.tokens_in[-1] - 1) // 2)
    assert output.last_hidden_state.shape[1] == remaining
    assert output.token_sizes[..., 0].sum(dim=1).tolist() == [report.tokens_in[0]] * 2
