"""Model-family adapters, one module per family; importing this package registers every family.

Each module here wires one transformers model family (its patched classes and an ``Adapter`` passed to
``hf_tome.integration.registry.register_adapter``) and knows nothing of the others. The modules are found by
listing this folder, so a new family is one new module and nothing else.
"""

import importlib
import pkgutil

FAMILY_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")))
"""The family modules found in this folder (each registers its adapter when imported)."""

for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
