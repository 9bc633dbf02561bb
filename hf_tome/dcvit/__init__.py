"""DC-ViT few-shot block compression: slim blocks (``blocks``, registered with the loader as a structure hook),
block planning under a MACs budget, the metric set, feature mimicking, ``hf-tome compress`` and model cards."""
