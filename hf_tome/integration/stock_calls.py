"""Calling stock transformers forwards from overrides, by name.

An override that must read or replace one argument of a stock forward binds the call to the installed stock
signature and calls the stock forward with keywords only, so a parameter transformers renames or reorders
(``past_key_values`` became ``cache`` in 5.24) cannot shift the others.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""Names transformers 5 releases have given the key/value cache argument (renamed in 5.24)."""


@functools.cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def named_parameters(function: Callable) -> frozenset[str]:
    """The names ``function`` declares (not its ``*args``/``**kwargs``), as the installed transformers spells them."""
    return frozenset(name for name, parameter in _signature(function).parameters.items()
                     if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD))


def stock_arguments(function: Callable, module: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call ``function(module, *args, **kwargs)`` by name (``**kwargs`` flattened in).

    Overrides of stock forwards read and replace the arguments they care about by name and call the stock forward
    with keywords only, so a parameter transformers renames or reorders cannot shift the others.
    """
    signature = _signature(function)
    bound = signature.bind(module, *args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is the module itself
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"hf_tome: {function.__qualname__} got extra positional arguments; pass them by name")
        else:
            named[name] = value
    return named


def with_stock_signature(function: Callable) -> Callable[[Callable], Callable]:
    """Give an ``(*args, **kwargs)`` override the signature of the stock ``function`` it binds its calls to, so
    code that inspects forwards (transformers' generation and tests) sees the stock parameters, e.g. ``cache``."""

    def decorate(override: Callable) -> Callable:
        override.__signature__ = _signature(function)
        return override

    return decorate
