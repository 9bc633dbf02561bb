"""ToMeConfig validation and JSON round trip."""

from __future__ import annotations

import pytest

from hf_tome import ToMeConfig


def test_json_round_trip():
    config = ToMeConfig(r=[4, 3, 2], inflect=0.5, prop_attn=False, trace_source=True)
    assert ToMeConfig.from_json_string(config.to_json_string()) == config
    pruning = ToMeConfig(prune_kept=[197, 150, 120], merge_kept=[197, 140, 100])
    assert ToMeConfig.from_dict(pruning.to_dict()) == pruning


def test_tuple_r_is_tomes_r_and_inflect_and_a_list_is_per_layer():
    assert ToMeConfig(r=(16, -1)) == ToMeConfig(r=16, inflect=-1.0)
    assert ToMeConfig(r=[1, 2]).r == [1, 2]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": -1}, "ToMeConfig.r=-1 is invalid: expected an int >= 0 or a list of ints >= 0"),
        ({"r": 2.5}, "ToMeConfig.r=2.5 is invalid: expected an int >= 0 or a list of ints >= 0"),
        ({"r": [1, -2]}, "ToMeConfig.r=[1, -2] is invalid: expected an int >= 0 or a list of ints >= 0"),
        ({"inflect": 1.5}, "ToMeConfig.inflect=1.5 is invalid: expected a number in [-1, 1]"),
        ({"prop_attn": "yes"}, "ToMeConfig.prop_attn='yes' is invalid: expected True or False"),
        ({"prune_kept": [10, 12], "merge_kept": [10, 10]},
         "ToMeConfig.prune_kept=[10, 12] is invalid: expected a non-empty list of positive ints, non-increasing "
         "with depth (layer 1 keeps 12 > 10)"),
        ({"prune_kept": [10, 8]}, "ToMeConfig.merge_kept=None is invalid: expected given together with prune_kept"),
        ({"prune_kept": [10, 8], "merge_kept": [10, 9]},
         "ToMeConfig.merge_kept=[10, 9] is invalid: expected <= prune_kept at every layer (layer 1)"),
        ({"budget": -2}, "ToMeConfig.budget=-2 is invalid: expected a positive number"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as error:
        ToMeConfig(**kwargs)
    assert str(error.value).startswith(message)


def test_unknown_field():
    with pytest.raises(ValueError, match=r"unknown ToMeConfig field\(s\) \['ratio'\]: expected some of"):
        ToMeConfig.from_dict({"ratio": 3})


def test_merging_keeps_the_saved_merge_options_unless_asked_otherwise() -> None:
    from hf_tome.config import MERGE_OPTION_DEFAULTS

    assert MERGE_OPTION_DEFAULTS == {"merge_rule": "bipartite", "merge_mode": "mean", "prune_matched_layers": 0}
    assert ToMeConfig().merging() == MERGE_OPTION_DEFAULTS
    saved = ToMeConfig(r=8, merge_rule="pitome", merge_mode="mlerp", prune_matched_layers=2)
    assert saved.merging() == {"merge_rule": "pitome", "merge_mode": "mlerp", "prune_matched_layers": 2}
    assert saved.merging(merge_mode="mean", merge_rule=None, prune_matched_layers=0) == {
        "merge_rule": "pitome", "merge_mode": "mean", "prune_matched_layers": 0}
    with pytest.raises(ValueError, match=r"^\['r'\] are not merge options: expected some of \('merge_rule', "):
        saved.merging(r=4)
