"""Sharing hf-tome models: self-contained remote code (``modeling_hf_tome.py``, ``auto_map``) and model cards, so that
transformers alone loads a shared model merged with ``trust_remote_code=True``."""
