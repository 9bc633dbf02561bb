"""`ToMeModelMixin`: what every hf_tome-patched model class adds to the stock transformers class."""

from __future__ import annotations

import os
from typing import Any

from torch import nn


class ToMeModelMixin:
    """Mixed into the patched classes: configure merging from the model and save like the stock class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Load the stock class's checkpoint and patch it: ``ToMeViTModel.from_pretrained(folder, tome_r=8)``.

        transformers' own ``from_pretrained`` would build the patched class without a reduction plan; the stock
        class loads instead (with its checkpoint key conversion), and the ToMe settings come from ``tome_config=``
        / ``tome_<field>=`` / the saved config, as with the hf_tome Auto classes.
        """
        from .adapters.registry import stock_class_of
        from .modeling import load_patched

        return load_patched(stock_class_of(cls), pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        """What the stock class answers: a patched class runs the stock modeling code on the same weights and names.

        transformers skips its checkpoint key conversion for custom code; answering like the stock class lets the
        conversions it finds by ``model_type`` apply (those it finds by class name are registered under the patched
        names, see ``hf_tome.adapters.registry``), so a model patched before its weights load loads as stock does.
        """
        from .adapters.registry import stock_class_of

        return stock_class_of(cls).is_custom_code()

    @property
    def tome_config(self):
        """The ``ToMeConfig`` this model runs with."""
        from .patch import tome_config_of

        return tome_config_of(self)

    def set_tome(self, config=None, **overrides: Any) -> nn.Module:
        """Re-configure token merging in place (same arguments as ``hf_tome.apply``)."""
        from .patch import apply

        return apply(self, config, **overrides)

    def set_tome_budget(self, budget: float | None) -> nn.Module:
        """Run with the budget-table row that has the most FLOPs not above ``budget``.

        ``budget`` is GFLOPs (GMACs per image, > 1) or a fraction (<= 1) of the uncompressed model; the table
        comes from ``hf-tome search`` (``config.tome["budget_table"]``). A budget below every row raises
        ``ValueError`` naming the range the table covers; None switches compression off (the table is kept).
        """
        from .config import ToMeConfig
        from .patch import apply

        config = self.tome_config or ToMeConfig()
        if budget is None:
            return apply(self, config.replace(budget=None, prune_kept=None, merge_kept=None))
        return apply(self, config.replace(budget=budget, r=0))

    def tome_compute(self, image_size: tuple[int, int] | None = None):
        """Token counts entering each layer and MACs per image (see ``hf_tome.compute_report``)."""
        from .flops import compute_report

        return compute_report(self, image_size)

    def save_pretrained(self, *args: Any, **kwargs: Any):
        """Save exactly like the stock class (``architectures`` names it), with ``config.tome`` kept."""
        from .adapters.registry import find_adapter
        from .blocks import CONFIG_KEY

        patched_class = type(self)
        self.__class__ = find_adapter(self).reverse_map[patched_class]
        try:
            saved = self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched_class
        folder = args[0] if args else kwargs.get("save_directory")
        if getattr(self.config, CONFIG_KEY, None) and folder:  # a block-compressed model carries its model card
            from .model_card import render_model_card

            render_model_card(self).save(os.path.join(folder, "README.md"))
        return saved

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        """transformers' ``push_to_hub``; a block-compressed model uploads its hf-tome model card instead."""
        from .blocks import CONFIG_KEY

        if not getattr(self.config, CONFIG_KEY, None):
            return super().push_to_hub(repo_id, *args, **kwargs)
        from .model_card import push_compressed_to_hub

        allowed = {"commit_message", "private", "token", "revision", "create_pr"}
        return push_compressed_to_hub(self, repo_id, **{key: value for key, value in kwargs.items() if key in allowed})
