"""Sharing hf-tome models on the Hub: self-contained remote code (``auto_map``) and model cards."""
