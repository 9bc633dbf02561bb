"""`ToMeModelMixin`: what every hf_tome-patched model class adds to the stock transformers class."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hf_tome.config import ToMeConfig
from hf_tome.integration.flops import compute_report
from hf_tome.integration.loading import load_patched
from hf_tome.integration.patch import apply, tome_config_of
from hf_tome.integration.registry import find_adapter, publishers, stock_class_of, structure_hooks


class ToMeModelMixin:
    """Mixed into the patched classes: configure merging from the model and save like the stock class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Load the stock class's checkpoint and patch it: ``ToMeViTModel.from_pretrained(folder, tome_r=8)``.

        transformers' own ``from_pretrained`` would build the patched class without a reduction plan; the stock
        class loads instead (with its checkpoint key conversion), and the ToMe settings come from ``tome_config=``
        / ``tome_<field>=`` / the saved config, as with the hf_tome Auto classes.
        """
        return load_patched(stock_class_of(cls), pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        """What the stock class answers: a patched class runs the stock modeling code on the same weights and names.

        transformers skips its checkpoint key conversion for custom code; answering like the stock class lets the
        conversions it finds by ``model_type`` apply (those it finds by class name are registered under the patched
        names, see ``hf_tome.integration.registry``), so a model patched before its weights load loads as stock does.
        """
        return stock_class_of(cls).is_custom_code()

    @property
    def tome_config(self):
        """The ``ToMeConfig`` this model runs with."""
        return tome_config_of(self)

    def set_tome(self, config=None, **overrides: Any) -> nn.Module:
        """Re-configure token merging in place (same arguments as ``hf_tome.apply``)."""
        return apply(self, config, **overrides)

    def set_tome_budget(self, budget: float | None) -> nn.Module:
        """Run with the budget-table row that has the most FLOPs not above ``budget``.

        ``budget`` is GFLOPs (GMACs per image, > 1) or a fraction (<= 1) of the uncompressed model; the table
        comes from ``hf-tome search`` (``config.tome["budget_table"]``). A budget below every row raises
        ``ValueError`` naming the range the table covers; None switches compression off (the table is kept).
        """
        config = self.tome_config or ToMeConfig()
        if budget is None:
            return apply(self, config.replace(budget=None, prune_kept=None, merge_kept=None))
        return apply(self, config.replace(budget=budget, r=0))

    def tome_compute(self, image_size: tuple[int, int] | None = None):
        """Token counts entering each layer and MACs per image (see ``hf_tome.compute_report``)."""
        return compute_report(self, image_size)

    def save_pretrained(self, *args: Any, **kwargs: Any):
        """Save exactly like the stock class (``architectures`` names it), with ``config.tome`` kept, plus what the
        publishers add (``hf_tome.hub``: the remote code ``modeling_hf_tome.py``, ``auto_map`` in config.json and the
        model card README.md, so transformers alone loads the model merged with ``trust_remote_code=True``) and the
        extra files of a structure change. ``push_to_hub=True`` saves, then uploads through :meth:`push_to_hub`."""
        push = kwargs.pop("push_to_hub", False)
        push_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "token", "revision",
                                                         "create_pr") if key in kwargs}
        patched_class = type(self)
        self.__class__ = find_adapter(self).reverse_map[patched_class]
        try:
            saved = self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched_class
        folder = args[0] if args else kwargs.get("save_directory")
        if folder and kwargs.get("is_main_process", True):  # distributed saves: one process writes, as transformers
            folder = os.fspath(folder)
            for publisher in publishers():
                publisher.save_extras(self, folder)
            for hook in structure_hooks(self.config):
                if hook.save_extras is not None:
                    hook.save_extras(self, folder)
            if push:
                repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(folder))
                self.push_to_hub(repo_id, **push_kwargs)
        return saved

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        """Upload the model with what :meth:`save_pretrained` writes (remote code, ``auto_map``, model card), through
        the publisher that ``hf_tome.hub`` registers; without one, a structure change's own upload or transformers'
        ``push_to_hub``."""
        for publisher in publishers():
            if publisher.push_to_hub is not None:
                return publisher.push_to_hub(self, repo_id, **kwargs)
        for hook in structure_hooks(self.config):
            if hook.push_to_hub is not None:
                return hook.push_to_hub(self, repo_id, **kwargs)
        return super().push_to_hub(repo_id, *args, **kwargs)
