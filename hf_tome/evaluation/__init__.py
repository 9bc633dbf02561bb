"""Evaluation and assets: classification accuracy, dense saliency, merge visualisation, offline metrics, the
converters of the packaged real weights and data (``assets``) and Accelerate set-up. Imported by nothing in the
core; its heavy dependencies are the ``eval`` extra."""
