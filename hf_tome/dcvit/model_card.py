"""Model cards of compressed models, rendered from ``model_cards/dc-vit.md``, and sharing them.

Everything a card says comes from ``config.block_compression`` (method, budget, samples, measured accuracy and
speed), so a card can be rebuilt from a saved model alone. The tags and the two ways to load the model are
``hf_tome.hub.card``'s; saving and pushing go through ``hf_tome.hub.publish``, which writes the remote code that
rebuilds the slim blocks in plain transformers (``trust_remote_code=True``) and this card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from hf_tome.dcvit.blocks import CONFIG_KEY, compressed_layers_from_config
from hf_tome.hub.card import base_model_id, card_tags, template_path, usage_section
from hf_tome.hub.publish import push_to_hub, save_for_hub, supports_remote_code

_METHODS = {
    "dc-vit": ("DC-ViT (dense few-shot block compression)",
               "The blocks below lost their attention branch and keep only the most important hidden units of "
               "their MLP (`x = x + mlp'(norm2(x))`). The blocks were chosen by a block trial scored on a synthetic "
               "metric set (images optimised from noise), then compressed one at a time, each followed by "
               "fine-tuning on the unlabeled images to mimic all output tokens of the original model."),
    "drop": ("block dropping",
             "The blocks below were removed entirely (the identity), chosen by the same block trial and followed "
             "by the same feature-mimicking fine-tuning as DC-ViT."),
}

_LEAST_SQUARES_INIT = ("Before its fine-tuning, each compressed block's MLP output layer was refit by least squares to "
                       "the original block's output on the same unlabeled images (hf-tome's addition to the published "
                       "method, which keeps the kept units' trained weights).")


def _measured_rows(measured: dict[str, Any]) -> str:
    if not measured:
        return "Nothing was measured when this model was saved."
    lines = ["| | this model | original |", "|---|---|---|"]
    labels = {"accuracy": "accuracy", "images_per_s": "images/s"}
    for key, label in labels.items():
        if key in measured:
            mine, theirs = measured[key], measured.get(f"original_{key}")
            fmt = "{:.2%}" if key == "accuracy" else "{:.1f}"
            lines.append(f"| {label} | {fmt.format(mine)} | {fmt.format(theirs) if theirs is not None else '-'} |")
    if "eval_dataset" in measured:
        lines.append(f"\nAccuracy on {measured.get('eval_images', '?')} images of {measured['eval_dataset']}; speed: "
                     f"{measured.get('speed_setup', 'forward passes on the evaluation images')}.")
    return "\n".join(lines)


def render_model_card(model: nn.Module, repo_id: str | None = None) -> ModelCard:
    """The card of a compressed ``model`` (``config.block_compression`` must be set)."""
    config = model.config
    section = getattr(config, CONFIG_KEY, None)
    if not section:
        raise ValueError(f"model has no config.{CONFIG_KEY}: expected a model saved by hf-tome compress")
    method = section.get("method", "dc-vit")
    title, description = _METHODS.get(method, (method, ""))
    if method == "dc-vit" and section.get("init") == "least-squares":
        description += " " + _LEAST_SQUARES_INIT
    layers = compressed_layers_from_config(config)
    num_layers = config.num_hidden_layers
    rows = "\n".join(f"| {index} | {'removed' if index in layers else 'kept'} | "
                     f"{layers.get(index, 'all')} |" for index in range(num_layers))
    base_model = section.get("base_model", config.name_or_path or "the original model")
    full, gmacs = section.get("full_gmacs"), section.get("gmacs")
    card_data = ModelCardData(library_name="transformers", tags=card_tags(model, method),
                              base_model=base_model_id(model, str(base_model)))
    return ModelCard.from_template(
        card_data, template_path=str(template_path("dc-vit.md")), model_name=repo_id or f"{base_model} ({title})",
        base_model=base_model, method_title=title, method_description=description, block_rows=rows,
        macs_fraction=f"{gmacs / full:.1%}" if gmacs and full else "?", gmacs=f"{gmacs:.3f}" if gmacs else "?",
        full_gmacs=f"{full:.3f}" if full else "?", num_samples=section.get("num_samples", "?"),
        samples_source=section.get("samples_source", "unknown source"),
        measured_rows=_measured_rows(section.get("measured", {})),
        usage=usage_section(model, repo_id, remote_code=supports_remote_code(model)),
    )


def save_with_card(model: nn.Module, folder: str | Path, **save_kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus the remote code, ``auto_map`` and this card (``hf_tome.hub``)."""
    return save_for_hub(model, folder, **save_kwargs)


def push_compressed_to_hub(model: nn.Module, repo_id: str, *, commit_message: str | None = None,
                           private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                           create_pr: bool = False, extra_files: dict[str, Path] | None = None) -> Any:
    """Create ``repo_id`` if needed and upload the model, its remote code, card and ``extra_files`` (e.g. the image
    processor), through ``hf_tome.hub.publish.push_to_hub``."""
    return push_to_hub(model, repo_id, commit_message=commit_message or "Upload model compressed with hf-tome",
                       private=private, token=token, revision=revision, create_pr=create_pr, extra_files=extra_files)
