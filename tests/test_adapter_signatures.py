"""Patched forwards look like the stock ones to transformers: it reads the ``**kwargs`` annotation
(``Unpack[TransformersKwargs]``) to learn which model-agnostic arguments, such as ``output_attentions``, a forward
takes."""

from __future__ import annotations

import inspect
import typing

import pytest
from transformers.utils import TransformersKwargs

from hf_tome.integration.registry import registered_adapters

PATCHED_FORWARDS = [
    pytest.param(stock, patched, id=f"{adapter.family}:{stock.__name__}")
    for adapter in registered_adapters()
    for stock, patched in adapter.class_map.items()
    if patched.forward is not stock.forward
]


def var_keyword_annotation(function) -> object:
    """The annotation of ``function``'s ``**kwargs`` as ``inspect.signature`` gives it, unresolved, which is how
    transformers' own tests read it ("absent" without ``**kwargs``). A string annotation (``from __future__ import
    annotations`` in the module) would not count there: the object must be the real ``Unpack[...]``."""
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            return parameter.annotation
    return "absent"


def can_output_attentions(function) -> bool:
    """What transformers' model tests conclude from a forward's signature."""
    annotation = var_keyword_annotation(function)
    return "output_attentions" in getattr(getattr(annotation, "__args__", [None])[0], "__annotations__", {})


def test_every_family_overrides_some_forward():
    assert {param.id.split(":")[0] for param in PATCHED_FORWARDS} == {a.family for a in registered_adapters()}
    assert len(PATCHED_FORWARDS) >= 30


@pytest.mark.compat
@pytest.mark.parametrize("stock,patched", PATCHED_FORWARDS)
def test_patched_forward_keeps_the_kwargs_annotation(stock, patched):
    stock_annotation = var_keyword_annotation(stock.forward)
    patched_annotation = var_keyword_annotation(patched.forward)
    if stock_annotation == "absent":  # the stock forward takes no **kwargs: ours may take them, annotated
        assert patched_annotation in ("absent", typing.Unpack[TransformersKwargs])
    else:
        assert patched_annotation == stock_annotation
        assert can_output_attentions(patched.forward) == can_output_attentions(stock.forward)

