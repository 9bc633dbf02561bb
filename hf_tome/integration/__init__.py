"""The transformers glue: the adapter registry, ``apply``/``remove``, the Auto classes and the model mixin,
the shared encoder loop and MACs read off a model. Model families live in ``hf_tome.adapters``, one per module."""
