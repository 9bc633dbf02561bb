"""Local ``evaluate`` word error rate metric; load it with :func:`hf_tome.metrics.load_metric`."""
