"""Model cards of shared hf-tome models: tags, both ways to load, MACs, settings and measured figures.

:func:`render_card` writes the card of any hf-tome model from ``model_cards/hf-tome.md``; a model carrying a
structure change whose hook renders its own card (DC-ViT's, ``model_cards/dc-vit.md``) gets that one, built on the
same pieces (:func:`card_tags`, :func:`usage_section`). Everything comes from the model and its config, so a card can
be rebuilt from a saved model alone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.integration.flops import compute_report
from hf_tome.integration.patch import tome_config_of
from hf_tome.integration.registry import adapter_or_none, structure_hooks, unwrap_compiled

PROJECT_URL = "https://github.com/hf-tome/hf-tome"


def template_path(name: str) -> Path:
    """A card template: ``model_cards/`` of the source tree, or the copy installed under ``<prefix>/share``."""
    for folder in (Path(__file__).resolve().parents[2] / "model_cards", Path(sys.prefix) / "share/hf-tome/model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"model card template {name!r} not found: expected it in hf-tome's model_cards/ folder")


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))


def auto_class_name(model: nn.Module) -> str:
    """The Auto class that loads ``model`` (hf_tome's and transformers' have the same names)."""
    return "AutoModelForImageClassification" if is_classifier(model) else "AutoModel"


def stock_class_name(model: nn.Module) -> str:
    """The transformers class ``model``'s class is (or derives from, when hf_tome patched it)."""
    return next((cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers.")),
                type(model).__name__)


def saved_tome_config(model: nn.Module) -> ToMeConfig | None:
    """The ToMe settings the model runs with (patched) or carries in its config (saved), else None."""
    config = tome_config_of(model)
    if config is None and getattr(model.config, "tome", None):
        config = ToMeConfig.from_dict(model.config.tome)
    return config


def base_model_id(model: nn.Module, fallback: str | None = None) -> str | None:
    """The Hub id the model was loaded from (``config._name_or_path``) when it is one, not a local folder."""
    name = fallback or getattr(model.config, "_name_or_path", "") or ""
    return name if "/" in name and not Path(name).exists() and not name.startswith((".", "/")) else None


def card_tags(model: nn.Module, *extra: str) -> list[str]:
    """hf-tome, token-merging, the family, the task, prune-merge / dc-vit when they apply, then ``extra``."""
    adapter = adapter_or_none(unwrap_compiled(model))
    config = saved_tome_config(model)
    tags = ["hf-tome", "token-merging"]
    if adapter is not None:
        tags.append(adapter.family)
    tags.append("image-classification" if is_classifier(model) else "image-feature-extraction")
    if config is not None and (config.prune_kept is not None or config.budget_table):
        tags.append("prune-merge")
    section = getattr(model.config, "block_compression", None)
    if section:
        tags.append(section.get("method", "dc-vit"))
    return list(dict.fromkeys([*tags, *extra]))


def usage_section(model: nn.Module, repo_id: str | None, remote_code: bool = True) -> str:
    """Both ways to load the model: hf_tome's Auto class, and transformers with ``trust_remote_code=True``."""
    repo = repo_id or "path/to/this/model"
    auto = auto_class_name(model)
    config = saved_tome_config(model)
    alternative = ("tome_budget=0.5)  # the largest budget-table row within 50% of the full MACs"
                   if config is not None and config.budget_table else "tome_r=8)  # another merging rate")
    lines = ["With hf-tome (`pip install hf-tome`):", "", "```python", "import hf_tome", "",
             f'model = hf_tome.{auto}.from_pretrained("{repo}")  # the saved settings',
             f'model = hf_tome.{auto}.from_pretrained("{repo}", {alternative}', "```", ""]
    stock = stock_class_name(model)
    if not remote_code:
        lines.append(f"hf-tome's remote code does not serve {stock}: load this model with hf-tome.")
        return "\n".join(lines)
    pipeline = ([f'classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)']
                if is_classifier(model) else [])
    lines += ["With transformers alone (torch and transformers: `trust_remote_code=True` runs the "
              "`modeling_hf_tome.py` saved with the model, generated from hf-tome's own code):", "", "```python",
              f"from transformers import {auto}{', pipeline' if pipeline else ''}", "",
              f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)',
              f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True, {alternative}', *pipeline, "```", "",
              f"Without `trust_remote_code=True` transformers builds the stock `{stock}`"
              + (", which the weights of the slim blocks do not fit: loading fails."
                 if getattr(model.config, "block_compression", None) else
                 ": token merging is off, and transformers' load report lists the unexpected tensor "
                 "`hf_tome.token_merging_off.load_with_trust_remote_code_True` saved with the weights to say so.")]
    return "\n".join(lines)


def macs_summary(model: nn.Module) -> dict[str, Any]:
    """GMACs per image with the model's settings and without token reduction, at the config's input size."""
    model = unwrap_compiled(model)
    report = compute_report(model)
    full = compute_report(model, config=ToMeConfig())
    size = getattr(model.config, "image_size", None)
    return {"gmacs": report.gmacs, "full_gmacs": full.gmacs, "tokens_in": report.tokens_in,
            "image_size": f"{size}x{size}" if isinstance(size, int) else str(size)}


def _settings_rows(config: ToMeConfig | None) -> str:
    if config is None:
        return "No token reduction is configured (r=0): pass `tome_r=` to merge tokens."
    rows = ["| setting | value |", "|---|---|"]
    if config.prune_kept is not None:
        rows += [f"| prune_kept | {config.prune_kept} |", f"| merge_kept | {config.merge_kept} |",
                 f"| merge_match | {config.merge_match} |"]
    else:
        rows += [f"| r | {config.r} |", f"| inflect | {config.inflect} |"]
    rows += [f"| merge_rule | {config.merge_rule} |", f"| merge_mode | {config.merge_mode} |",
             f"| prop_attn | {config.prop_attn} |"]
    if config.prune_matched_layers:
        rows.append(f"| prune_matched_layers | {config.prune_matched_layers} |")
    if config.budget is not None:
        rows.append(f"| budget | {config.budget} |")
    return "\n".join(rows)


def _measured(config: ToMeConfig | None) -> str:
    table = config.budget_table if config is not None else None
    if not table:
        return ("Nothing was measured when this model was saved: the MACs above are computed from the architecture "
                "and the settings.")
    rows = ["Budget table searched by `hf-tome search` (accuracy measured at each row's kept counts):", "",
            "| GMACs | of the full model | accuracy |", "|---|---|---|"]
    for row in sorted(table, key=lambda row: row["gflops"]):
        fraction, accuracy = row.get("fraction"), row.get("accuracy")
        rows.append(f"| {row['gflops']:.3f} | {f'{fraction:.1%}' if fraction is not None else '-'} | "
                    f"{f'{accuracy:.2%}' if accuracy is not None else '-'} |")
    return "\n".join(rows)


def render_card(model: nn.Module, repo_id: str | None = None, remote_code: bool = True,
                tags: tuple[str, ...] = ()) -> ModelCard:
    """The card of an hf-tome model (a structure change's own card where its hook renders one)."""
    for hook in structure_hooks(model.config):
        if hook.model_card is not None:
            return hook.model_card(model, repo_id)
    config = saved_tome_config(model)
    macs = macs_summary(model)
    base_model = base_model_id(model)
    if config is not None and config.prune_kept is not None:
        method = "prune + merge token compression (class-attention pruning, then merging)"
    else:
        method = "token merging (ToMe)"
    card_data = ModelCardData(library_name="transformers", tags=card_tags(model, *tags), base_model=base_model,
                              pipeline_tag="image-classification" if is_classifier(model) else
                              "image-feature-extraction")
    fraction = macs["gmacs"] / macs["full_gmacs"] if macs["full_gmacs"] else 1.0
    return ModelCard.from_template(
        card_data, template_path=str(template_path("hf-tome.md")),
        model_name=repo_id or f"{base_model or stock_class_name(model)} with hf-tome",
        base_model=base_model or getattr(model.config, "_name_or_path", "") or f"a {stock_class_name(model)}",
        method=method, project_url=PROJECT_URL, gmacs=f"{macs['gmacs']:.4g}", full_gmacs=f"{macs['full_gmacs']:.4g}",
        macs_fraction=f"{fraction:.1%}", image_size=macs["image_size"],
        tokens=" → ".join(str(count) for count in macs["tokens_in"]), settings=_settings_rows(config),
        usage=usage_section(model, repo_id, remote_code), measured=_measured(config),
    )
