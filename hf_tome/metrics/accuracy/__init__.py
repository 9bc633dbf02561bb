"""Local ``evaluate`` accuracy metric; load it with :func:`hf_tome.metrics.load_metric`."""
