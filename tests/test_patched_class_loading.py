"""``type(patched_model).from_pretrained(folder)`` gives the saved weights.

transformers converts checkpoint key names only for classes defined inside ``transformers``; a patched class
loading by itself used to leave every renamed layer at random weights, silently (the base models below all
have such renames)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import hf_tome

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CONFIGS = {
    "vit": lambda: T.ViTModel(T.ViTConfig(**SMALL, image_size=32, patch_size=8)),
    "deit": lambda: T.DeiTModel(T.DeiTConfig(**SMALL, image_size=32, patch_size=8)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, image_size=32, patch_size=8)),
    "ast": lambda: T.ASTModel(T.ASTConfig(**SMALL, max_length=32, num_mel_bins=16, frequency_stride=8,
                                          time_stride=8, patch_size=8)),
    "vivit": lambda: T.VivitModel(T.VivitConfig(**SMALL, image_size=32, tubelet_size=[2, 8, 8], num_frames=4)),
    "swin": lambda: T.SwinModel(T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4,
                                              window_size=4)),
    "whisper": lambda: T.WhisperModel(T.WhisperConfig(
        vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
        max_target_positions=40, pad_token_id=0)),
}


def max_weight_difference(model: torch.nn.Module, other: torch.nn.Module) -> float:
    state, other_state = model.state_dict(), other.state_dict()
    assert state.keys() == other_state.keys()
    return max((state[key] - other_state[key]).abs().max().item() for key in state)


@pytest.mark.compat
@pytest.mark.parametrize("family", list(CONFIGS))
def test_patched_class_from_pretrained_loads_the_saved_weights(family, tmp_path):
    torch.manual_seed(0)
    model = CONFIGS[family]()
    hf_tome.apply(model, r=2)
    model.save_pretrained(tmp_path)
    patched_class = type(model)
    assert patched_class.__module__.startswith("hf_tome.")

    reloaded = patched_class.from_pretrained(tmp_path)
    assert type(reloaded) is patched_class
    assert max_weight_difference(reloaded, model) == 0.0
    assert reloaded.tome_config == hf_tome.ToMeConfig(r=2)  # the saved settings come back too
    assert patched_class.from_pretrained(tmp_path, tome_r=1).tome_config.r == 1
    # transformers' own loading of a patched class (a model patched before its weights load) converts the
    # checkpoint's key names as for the stock class: hf_tome registers the stock mapping under the patched name.
    loaded_by_transformers = T.PreTrainedModel.from_pretrained.__func__(patched_class, tmp_path)
    assert max_weight_difference(loaded_by_transformers, model) == 0.0


def test_a_class_hf_tome_did_not_make_is_refused():
    from hf_tome.integration.registry import stock_class_of

    with pytest.raises(ValueError, match="ViTModel is not an hf_tome patched class"):
        stock_class_of(T.ViTModel)


@pytest.mark.parametrize("load", ["auto", "patched class"])
def test_config_keywords_update_the_config_as_in_transformers(load, tmp_path):
    """``num_labels=`` (any config attribute) goes to the config, as plain transformers does, not to __init__."""
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(**SMALL, image_size=32, patch_size=8, num_labels=3))
    hf_tome.apply(model, r=1)
    model.save_pretrained(tmp_path)
    loader = hf_tome.AutoModelForImageClassification if load == "auto" else type(model)
    reloaded = loader.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert reloaded.config.num_labels == 5 and reloaded.classifier.out_features == 5
    assert reloaded.tome_config.r == 1
