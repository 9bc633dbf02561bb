"""Saving and pushing hf-tome models so that anyone loads them merged: remote code, ``auto_map`` and a model card.

:func:`write_hub_files` adds to a folder that ``save_pretrained`` wrote: ``modeling_hf_tome.py`` (generated from
hf_tome's sources by :mod:`hf_tome.hub.bundle`), ``auto_map`` in config.json (naming its ``HfTome...`` classes for
``AutoModel`` and, for classifiers, ``AutoModelForImageClassification``) and README.md (:mod:`hf_tome.hub.card`).
``architectures`` still names the stock class, so plain transformers without ``trust_remote_code`` loads the stock
model (and, with hf_tome imported, warns that merging is off). The patched models' ``save_pretrained`` and
``push_to_hub`` come here through the publisher :mod:`hf_tome.hub.hook` registers.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from hf_tome.hub.bundle import remote_code
from hf_tome.hub.card import auto_class_name, is_classifier, render_card
from hf_tome.hub.remote import MARKER_KEY, REMOTE_CLASSES, REMOTE_CODE_FILE
from hf_tome.integration.registry import adapter_or_none, unwrap_compiled

_MODULE = REMOTE_CODE_FILE.removesuffix(".py")
_PUSH_KEYWORDS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")


def stock_class(model: nn.Module) -> type[nn.Module]:
    """The transformers class of ``model`` (its stock class when hf_tome patched it)."""
    model = unwrap_compiled(model)
    adapter = adapter_or_none(model)
    return adapter.reverse_map.get(type(model), type(model)) if adapter is not None else type(model)


def supports_remote_code(model: nn.Module) -> bool:
    return stock_class(model) in REMOTE_CLASSES


def remote_class(model: nn.Module) -> type[nn.Module]:
    """The ``HfTome...`` class of the remote code for ``model``; ``ValueError`` naming the classes it serves."""
    stock = stock_class(model)
    if stock not in REMOTE_CLASSES:
        served = ", ".join(sorted(cls.__name__ for cls in REMOTE_CLASSES))
        raise ValueError(f"hf-tome's remote code does not serve {stock.__name__}: expected a model of one of "
                         f"{served} (ViT, DeiT, Dinov2 and Dinov2 with registers); share other families for loading "
                         "with hf_tome")
    return REMOTE_CLASSES[stock]


def auto_map(model: nn.Module) -> dict[str, str]:
    """``auto_map`` of config.json: the Auto classes that load ``model`` through the remote code (``AutoModel``
    the base model, as transformers' does; a classifier's head class for ``AutoModelForImageClassification``)."""
    model = unwrap_compiled(model)
    head = remote_class(model)  # checked first: the error names the class the user saved
    mapping = {"AutoModel": f"{_MODULE}.{remote_class(model.base_model).__name__}"}
    if is_classifier(model):
        mapping[auto_class_name(model)] = f"{_MODULE}.{head.__name__}"
    return mapping


def write_remote_code(folder: str | os.PathLike) -> Path:
    """Write ``modeling_hf_tome.py`` (regenerated from the current hf_tome sources) into ``folder``."""
    path = Path(folder) / REMOTE_CODE_FILE
    path.write_text(remote_code(), encoding="utf-8")
    return path


def add_auto_map(folder: str | os.PathLike, mapping: dict[str, str]) -> None:
    """Set ``auto_map`` in the config.json of ``folder`` (written as transformers writes it)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **mapping}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_marker(folder: str | os.PathLike) -> None:
    """Save the empty tensor :data:`~hf_tome.hub.remote.MARKER_KEY` with the weights of ``folder``
    (``model.safetensors``, or a shard of its own added to the index of a sharded checkpoint)."""
    import torch
    from safetensors.torch import load_file, save_file

    marker = {MARKER_KEY: torch.zeros(0, dtype=torch.uint8)}
    single, index = Path(folder) / "model.safetensors", Path(folder) / "model.safetensors.index.json"
    if single.is_file():
        save_file({**load_file(single), **marker}, single, metadata={"format": "pt"})
    elif index.is_file():
        shard = "model-hf-tome-marker.safetensors"
        save_file(marker, Path(folder) / shard, metadata={"format": "pt"})
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("weight_map", {})[MARKER_KEY] = shard
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_hub_files(model: nn.Module, folder: str | os.PathLike, repo_id: str | None = None,
                    tags: tuple[str, ...] = ()) -> None:
    """Add the remote code, ``auto_map``, the marker tensor and the model card to a folder ``model.save_pretrained``
    wrote.

    ``ValueError`` for a family the remote code does not serve (see :func:`remote_class`).
    """
    mapping = auto_map(model)
    write_remote_code(folder)
    add_auto_map(folder, mapping)
    add_marker(folder)
    render_card(model, repo_id=repo_id, tags=tags).save(Path(folder) / "README.md")


def save_extras(model: nn.Module, folder: str, repo_id: str | None = None, tags: tuple[str, ...] = ()) -> None:
    """What ``save_pretrained`` of an hf_tome model adds: :func:`write_hub_files`; for a family the remote code does
    not serve, the card alone (for loading with hf_tome) and a warning."""
    if supports_remote_code(model):
        write_hub_files(model, folder, repo_id, tags)
        return
    warnings.warn(f"{folder}: saved without remote code, which serves ViT, DeiT and Dinov2 only: transformers alone "
                  f"loads this {stock_class(model).__name__} unmerged; load it with hf_tome", UserWarning, stacklevel=3)
    render_card(model, repo_id=repo_id, remote_code=False, tags=tags).save(Path(folder) / "README.md")


def save_for_hub(model: nn.Module, folder: str | os.PathLike, repo_id: str | None = None, tags: tuple[str, ...] = (),
                 **save_kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus the remote code, ``auto_map`` and the card, for patched and stock
    models alike (e.g. a DC-ViT model that ``hf-tome compress`` made, which is not patched)."""
    folder = Path(folder)
    unwrap_compiled(model).save_pretrained(folder, **save_kwargs)
    save_extras(model, os.fspath(folder), repo_id, tags)  # again for a patched model: now with repo_id and tags
    return folder


def push_to_hub(model: nn.Module, repo_id: str, *, extra_files: dict[str, str | os.PathLike] | None = None,
                tags: list[str] | None = None, max_shard_size: int | str | None = None, **kwargs: Any) -> Any:
    """Create ``repo_id`` if needed and upload the model, its remote code, ``auto_map``, card and ``extra_files``
    (``{name in the repo: local path}``, e.g. the image processor's preprocessor_config.json) in one commit.

    Takes transformers' ``push_to_hub`` keywords: commit_message, commit_description, private, token, revision,
    create_pr, max_shard_size and tags (added to the card's).
    """
    from huggingface_hub import HfApi

    options = {key: kwargs[key] for key in _PUSH_KEYWORDS if key in kwargs}
    token = options.pop("token", None)
    api = HfApi(token=token if isinstance(token, str) else None)
    repo_id = api.create_repo(repo_id, private=options.pop("private", None), exist_ok=True).repo_id
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hub(model, tmp, repo_id=repo_id, tags=tuple(tags or ()), **save_kwargs)
        for name, path in (extra_files or {}).items():
            (Path(tmp) / name).write_bytes(Path(path).read_bytes())
        message = options.pop("commit_message", None) or "Upload model with hf-tome remote code and model card"
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=message, **options)
