"""Model cards of compressed models, rendered from the templates in ``model_cards/``, and pushing to the Hub.

Everything a card says comes from ``config.block_compression`` (method, budget, samples, measured accuracy and
speed), so a card can be rebuilt from a saved model alone.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from hf_tome.dcvit.blocks import CONFIG_KEY, compressed_layers_from_config

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


def template_path(name: str = "dc-vit.md") -> Path:
    """The card template: ``model_cards/`` of the source tree, or the copy installed under ``<prefix>/share``."""
    for folder in (Path(__file__).resolve().parents[2] / "model_cards", Path(sys.prefix) / "share/hf-tome/model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"model card template {name!r} not found: expected it in hf-tome's model_cards/ folder")


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
    layers = compressed_layers_from_config(config)
    num_layers = config.num_hidden_layers
    rows = "\n".join(f"| {index} | {'removed' if index in layers else 'kept'} | "
                     f"{layers.get(index, 'all')} |" for index in range(num_layers))
    base_model = section.get("base_model", config.name_or_path or "the original model")
    full, gmacs = section.get("full_gmacs"), section.get("gmacs")
    card_data = ModelCardData(library_name="transformers", tags=["hf-tome", method, "image-classification"],
                              base_model=base_model if "/" in str(base_model) and not Path(base_model).exists()
                              else None)
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=repo_id or f"{base_model} ({title})",
        base_model=base_model, method_title=title, method_description=description, block_rows=rows,
        macs_fraction=f"{gmacs / full:.1%}" if gmacs and full else "?", gmacs=f"{gmacs:.3f}" if gmacs else "?",
        full_gmacs=f"{full:.3f}" if full else "?", num_samples=section.get("num_samples", "?"),
        samples_source=section.get("samples_source", "unknown source"),
        measured_rows=_measured_rows(section.get("measured", {})), repo_id=repo_id or "path/to/this/model",
    )


def save_with_card(model: nn.Module, folder: str | Path, **save_kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus ``README.md`` rendered from the template."""
    folder = Path(folder)
    model.save_pretrained(folder, **save_kwargs)
    render_model_card(model).save(folder / "README.md")
    return folder


def push_compressed_to_hub(model: nn.Module, repo_id: str, *, commit_message: str | None = None,
                           private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                           create_pr: bool = False, extra_files: dict[str, Path] | None = None) -> Any:
    """Create ``repo_id`` if needed and upload the model, its card and ``extra_files`` (e.g. the image processor)."""
    api = HfApi(token=token if isinstance(token, str) else None)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        render_model_card(model, repo_id=repo_id).save(Path(tmp) / "README.md")
        for name, path in (extra_files or {}).items():
            (Path(tmp) / name).write_bytes(Path(path).read_bytes())
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or
                                 "Upload model compressed with hf-tome", revision=revision, create_pr=create_pr)
