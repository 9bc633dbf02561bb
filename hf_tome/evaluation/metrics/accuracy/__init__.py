"""Local ``evaluate`` accuracy metric; load it with :func:`hf_tome.evaluation.metrics.load_metric`."""
